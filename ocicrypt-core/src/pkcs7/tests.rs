use std::path::{Path, PathBuf};

use super::*;
use crate::keys::{generate_ec, generate_rsa, PrivateKey};

fn vectors() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/vectors")
}

/// The PKCS#7 blob skopeo 1.9.3 wrote into `layouts/enc-p7`.
fn skopeo_blob() -> Vec<u8> {
    let layout = vectors().join("layouts/enc-p7");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let d = index["manifests"][0]["digest"].as_str().unwrap();
    let m: serde_json::Value = serde_json::from_slice(
        &std::fs::read(layout.join("blobs/sha256").join(d.trim_start_matches("sha256:"))).unwrap(),
    )
    .unwrap();
    let a = m["layers"][0]["annotations"]["org.opencontainers.image.enc.keys.pkcs7"]
        .as_str()
        .unwrap();
    crate::options::decode_b64(a).unwrap()
}

fn vector_key() -> PrivateKey {
    PrivateKey::from_file(&vectors().join("keys/cert.key.pem"), None).unwrap()
}

fn vector_cert() -> Certificate {
    Certificate::from_file(&vectors().join("keys/cert.pem")).unwrap()
}

/// A self-signed RSA certificate for a fresh key, made with OpenSSL.
fn fresh_cert(cn: &str, serial: u32) -> (Certificate, PrivateKey) {
    use openssl::x509::{X509Builder, X509NameBuilder};
    let (priv_pem, _) = generate_rsa(2048).unwrap();
    let key = PrivateKey::from_bytes(priv_pem.as_bytes(), None, "k").unwrap();
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_text("CN", cn).unwrap();
    let name = name.build();
    let mut b = X509Builder::new().unwrap();
    b.set_version(2).unwrap();
    b.set_serial_number(
        &openssl::bn::BigNum::from_u32(serial)
            .unwrap()
            .to_asn1_integer()
            .unwrap(),
    )
    .unwrap();
    b.set_subject_name(&name).unwrap();
    b.set_issuer_name(&name).unwrap();
    b.set_pubkey(key.pkey()).unwrap();
    b.set_not_before(&openssl::asn1::Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    b.set_not_after(&openssl::asn1::Asn1Time::days_from_now(1).unwrap())
        .unwrap();
    b.sign(key.pkey(), openssl::hash::MessageDigest::sha256())
        .unwrap();
    let der = b.build().to_der().unwrap();
    (Certificate::from_bytes(&der, cn).unwrap(), key)
}

#[test]
fn opens_the_skopeo_vector_with_the_key_alone() {
    let opts = Pkcs7Unwrapper::new(vec![vector_key()])
        .unwrap_key(&skopeo_blob())
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&opts).unwrap();
    assert_eq!(
        v["digest"], "sha256:1c1b98c9551f0866da476a38c850d62f2af2f409a18145a8c384be96fa37e8b2",
        "{v}"
    );
    // with the certificate too (the skopeo way)
    let u = Pkcs7Unwrapper::new(vec![vector_key()]).with_certificates(vec![vector_cert()]);
    assert_eq!(u.unwrap_key(&skopeo_blob()).unwrap(), opts);
}

#[test]
fn writes_what_go_writes() {
    let theirs = skopeo_blob();
    let opts = Pkcs7Unwrapper::new(vec![vector_key()])
        .unwrap_key(&theirs)
        .unwrap();
    let blob = Pkcs7Wrapper::new(vec![vector_cert()])
        .unwrap()
        .wrap_keys(&opts)
        .unwrap();
    // Byte for byte the same outside the random parts (encrypted key, nonce, ciphertext).
    assert_eq!(blob.len(), theirs.len());
    for (range, what) in [
        (0..104, "head"),
        (360..394, "content algorithm"),
        (406..412, "content header"),
    ] {
        assert_eq!(blob[range.clone()], theirs[range], "{what}");
    }
    // Same structure up to the random parts: the RecipientInfo prefix (issuer, serial,
    // algorithm) and the content-algorithm prefix are byte-identical to skopeo's.
    let ri_prefix = &theirs[30..104];
    assert!(blob.windows(ri_prefix.len()).any(|w| w == ri_prefix));
    let gcm_prefix = [
        0x30, 0x20, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x01, 0x06, 0x10, 0x13, 0x30, 0x11,
        0x84, 0x0c,
    ];
    assert!(theirs.windows(gcm_prefix.len()).any(|w| w == gcm_prefix));
    assert!(blob.windows(gcm_prefix.len()).any(|w| w == gcm_prefix));
    let back = Pkcs7Unwrapper::new(vec![vector_key()]).unwrap_key(&blob).unwrap();
    assert_eq!(back, opts);
}

#[test]
fn several_recipients_each_open_it_and_others_do_not() {
    let (c1, k1) = fresh_cert("one", 1);
    let (c2, k2) = fresh_cert("two", 0x80ff);
    let (_, k3) = fresh_cert("three", 3);
    let blob = Pkcs7Wrapper::new(vec![c1, c2])
        .unwrap()
        .wrap_keys(b"secret opts")
        .unwrap();
    for k in [k1, k2] {
        assert_eq!(
            &Pkcs7Unwrapper::new(vec![k]).unwrap_key(&blob).unwrap()[..],
            b"secret opts"
        );
    }
    let e = Pkcs7Unwrapper::new(vec![k3]).unwrap_key(&blob).unwrap_err();
    assert!(matches!(e, UnwrapError::NoMatchingKey { .. }), "{e}");
    let ids: Vec<String> = inspect(&blob).unwrap().into_iter().map(|r| r.id).collect();
    assert_eq!(ids, ["issuer=CN=one serial=01", "issuer=CN=two serial=0080ff"]);
}

#[test]
fn ec_keys_and_certificates_are_refused_clearly() {
    let (ec_priv, _) = generate_ec("P-256").unwrap();
    let ec = PrivateKey::from_bytes(ec_priv.as_bytes(), None, "ec").unwrap();
    let e = Pkcs7Unwrapper::new(vec![ec])
        .unwrap_key(&skopeo_blob())
        .unwrap_err();
    assert!(matches!(e, UnwrapError::NoMatchingKey { .. }));
    let e = Certificate::from_file(&vectors().join("keys/rsa.pub.pem")).unwrap_err();
    assert!(e.to_string().contains("no CERTIFICATE block"), "{e}");
    let e = Certificate::from_bytes(b"\x30\x03\x02\x01\x00", "x.der").unwrap_err();
    assert!(e.to_string().contains("no X.509 certificate"), "{e}");
}

#[test]
fn tampering_anywhere_fails_without_panic() {
    let blob = skopeo_blob();
    let key = Pkcs7Unwrapper::new(vec![vector_key()]);
    for i in 0..blob.len() {
        for flip in [0x01u8, 0x80] {
            let mut b = blob.clone();
            b[i] ^= flip;
            if let Ok(pt) = key.unwrap_key(&b) {
                // Only bytes GCM does not cover can change without failing: none of them may
                // change the plaintext.
                assert_eq!(pt, key.unwrap_key(&blob).unwrap(), "byte {i}");
            }
        }
    }
    for len in 0..blob.len() {
        assert!(key.unwrap_key(&blob[..len]).is_err());
    }
}

#[test]
fn pkcs1_select_is_correct() {
    let fb = [0xaa; 16];
    let mut em = vec![0u8; 256];
    em[1] = 2;
    for b in &mut em[2..239] {
        *b = 0x55;
    }
    em[239] = 0;
    for (i, b) in em[240..].iter_mut().enumerate() {
        *b = i as u8;
    }
    let good: Vec<u8> = (0..16).collect();
    assert_eq!(&pkcs1_v15_select(&em, 16, &fb)[..], &good[..]);
    for (i, v) in [(0usize, 1u8), (1, 1), (239, 1), (5, 0)] {
        let mut bad = em.clone();
        bad[i] = v;
        assert_eq!(&pkcs1_v15_select(&bad, 16, &fb)[..], &fb, "byte {i}");
    }
    // a message of another length is a bad padding too
    let mut other = em.clone();
    other[238] = 0;
    other[239] = 7;
    assert_eq!(&pkcs1_v15_select(&other, 16, &fb)[..], &fb);
    assert_eq!(&pkcs1_v15_select(&em[..20], 16, &fb)[..], &fb);
}

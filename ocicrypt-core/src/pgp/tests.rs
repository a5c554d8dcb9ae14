use std::path::{Path, PathBuf};

use super::*;

fn vectors() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/vectors")
}

/// The OpenPGP blob skopeo 1.9.3 wrote into `layouts/enc-pgp`.
fn skopeo_blob() -> Vec<u8> {
    let layout = vectors().join("layouts/enc-pgp");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let d = index["manifests"][0]["digest"].as_str().unwrap();
    let m: serde_json::Value = serde_json::from_slice(
        &std::fs::read(layout.join("blobs/sha256").join(d.trim_start_matches("sha256:"))).unwrap(),
    )
    .unwrap();
    let a = m["layers"][0]["annotations"]["org.opencontainers.image.enc.keys.pgp"]
        .as_str()
        .unwrap();
    crate::options::decode_b64(a).unwrap()
}

fn secret() -> Vec<PgpSecretKey> {
    PgpSecretKey::from_file(&vectors().join("keys/pgp-secret.asc"), None).unwrap()
}

#[test]
fn opens_the_skopeo_vector_with_an_armored_key() {
    let opts = PgpUnwrapper::new(secret()).unwrap_key(&skopeo_blob()).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&opts).unwrap();
    assert_eq!(
        v["digest"],
        "sha256:1c1b98c9551f0866da476a38c850d62f2af2f409a18145a8c384be96fa37e8b2"
    );
}

#[test]
fn round_trip_and_key_ids() {
    let public = PgpPublicKey::from_file(&vectors().join("keys/pgp-public.asc")).unwrap();
    assert!(public[0].matches("test@example.com"));
    assert!(public[0].matches("Test User"));
    assert!(!public[0].matches("other@example.com"));
    let blob = PgpWrapper::new(public).unwrap().wrap_keys(b"{\"x\":1}").unwrap();
    assert_eq!(blob[0] & 0x80, 0x80, "binary, not armored");
    assert_eq!(
        &PgpUnwrapper::new(secret()).unwrap_key(&blob).unwrap()[..],
        b"{\"x\":1}"
    );
    // the same PKESK key id as skopeo's message (the encryption subkey)
    assert_eq!(
        pkesk_key_ids(&blob).unwrap(),
        pkesk_key_ids(&skopeo_blob()).unwrap()
    );
    assert_eq!(pkesk_key_ids(&blob).unwrap().len(), 1);
}

#[test]
fn tampering_fails_without_panic() {
    let blob = skopeo_blob();
    let u = PgpUnwrapper::new(secret());
    let good = u.unwrap_key(&blob).unwrap();
    for i in (0..blob.len()).step_by(11) {
        let mut b = blob.clone();
        b[i] ^= 0x40;
        if let Ok(pt) = u.unwrap_key(&b) {
            assert_eq!(pt, good, "byte {i} changed the plaintext");
        }
    }
    for len in (0..blob.len()).step_by(23) {
        assert!(u.unwrap_key(&blob[..len]).is_err());
    }
}

#[test]
fn keys_that_are_not_openpgp_are_refused() {
    let e = PgpSecretKey::from_bytes_many(b"not a key", None, "x").unwrap_err();
    assert!(e.to_string().contains('x'), "{e}");
    assert!(PgpPublicKey::from_bytes_many(b"", "empty").is_err());
    assert!(looks_like_openpgp(
        &std::fs::read(vectors().join("keys/pgp-secret.asc")).unwrap()
    ));
    assert!(!looks_like_openpgp(
        &std::fs::read(vectors().join("keys/rsa.pem")).unwrap()
    ));
}

#[test]
fn user_id_parts() {
    assert_eq!(split_uid("A B (c) <a@b>"), ("A B", Some("a@b")));
    assert_eq!(split_uid("A B"), ("A B", None));
    assert_eq!(split_uid("<a@b>"), ("", Some("a@b")));
}

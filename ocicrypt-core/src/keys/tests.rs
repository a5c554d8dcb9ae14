//! Key parsing tests. Keys are made at test time with the `openssl` command (an implementation
//! independent of our parser); JWKs come from josekit.

use std::path::{Path, PathBuf};
use std::process::Command;

use josekit::jwk::KeyPair as _;

use super::*;

/// Runs `openssl ARGS` in `dir`, panicking with its stderr on failure.
pub(crate) fn ossl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl command is needed by these tests (Debian package openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn read(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap()
}

/// An RSA key in every encoding, made by the openssl CLI.
fn rsa_set(dir: &Path, bits: u32) -> PathBuf {
    let p = dir.to_owned();
    let bits = format!("rsa_keygen_bits:{bits}");
    ossl(
        &p,
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            &bits,
            "-out",
            "rsa.p8.pem",
        ],
    );
    ossl(
        &p,
        &[
            "pkcs8",
            "-topk8",
            "-nocrypt",
            "-in",
            "rsa.p8.pem",
            "-outform",
            "DER",
            "-out",
            "rsa.p8.der",
        ],
    );
    ossl(
        &p,
        &["rsa", "-in", "rsa.p8.pem", "-traditional", "-out", "rsa.p1.pem"],
    );
    ossl(
        &p,
        &[
            "rsa",
            "-in",
            "rsa.p8.pem",
            "-traditional",
            "-outform",
            "DER",
            "-out",
            "rsa.p1.der",
        ],
    );
    ossl(
        &p,
        &[
            "pkey",
            "-in",
            "rsa.p8.pem",
            "-aes256",
            "-passout",
            "pass:s3cret",
            "-out",
            "rsa.enc8.pem",
        ],
    );
    ossl(
        &p,
        &[
            "pkcs8",
            "-topk8",
            "-in",
            "rsa.p8.pem",
            "-v2",
            "aes256",
            "-passout",
            "pass:s3cret",
            "-outform",
            "DER",
            "-out",
            "rsa.enc8.der",
        ],
    );
    ossl(
        &p,
        &[
            "rsa",
            "-in",
            "rsa.p8.pem",
            "-aes256",
            "-traditional",
            "-passout",
            "pass:s3cret",
            "-out",
            "rsa.legacy.pem",
        ],
    );
    ossl(
        &p,
        &["pkey", "-in", "rsa.p8.pem", "-pubout", "-out", "rsa.pub.pem"],
    );
    ossl(
        &p,
        &[
            "pkey",
            "-in",
            "rsa.p8.pem",
            "-pubout",
            "-outform",
            "DER",
            "-out",
            "rsa.pub.der",
        ],
    );
    ossl(
        &p,
        &[
            "rsa",
            "-in",
            "rsa.p8.pem",
            "-RSAPublicKey_out",
            "-out",
            "rsa.p1pub.pem",
        ],
    );
    ossl(
        &p,
        &[
            "rsa",
            "-in",
            "rsa.p8.pem",
            "-RSAPublicKey_out",
            "-outform",
            "DER",
            "-out",
            "rsa.p1pub.der",
        ],
    );
    ossl(
        &p,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "rsa.p8.pem",
            "-subj",
            "/CN=imgcrypt-test",
            "-days",
            "2",
            "-out",
            "cert.pem",
        ],
    );
    ossl(
        &p,
        &["x509", "-in", "cert.pem", "-outform", "DER", "-out", "cert.der"],
    );
    p
}

/// An EC key in every encoding.
fn ec_set(dir: &Path, curve: &str) {
    let c = format!("ec_paramgen_curve:{curve}");
    ossl(
        dir,
        &["genpkey", "-algorithm", "EC", "-pkeyopt", &c, "-out", "ec.p8.pem"],
    );
    ossl(
        dir,
        &[
            "pkcs8",
            "-topk8",
            "-nocrypt",
            "-in",
            "ec.p8.pem",
            "-outform",
            "DER",
            "-out",
            "ec.p8.der",
        ],
    );
    ossl(dir, &["ec", "-in", "ec.p8.pem", "-out", "ec.sec1.pem"]);
    ossl(
        dir,
        &["ec", "-in", "ec.p8.pem", "-outform", "DER", "-out", "ec.sec1.der"],
    );
    ossl(
        dir,
        &[
            "ec",
            "-in",
            "ec.p8.pem",
            "-aes256",
            "-passout",
            "pass:s3cret",
            "-out",
            "ec.legacy.pem",
        ],
    );
    ossl(
        dir,
        &[
            "pkey",
            "-in",
            "ec.p8.pem",
            "-aes256",
            "-passout",
            "pass:s3cret",
            "-out",
            "ec.enc8.pem",
        ],
    );
    ossl(
        dir,
        &["pkey", "-in", "ec.p8.pem", "-pubout", "-out", "ec.pub.pem"],
    );
    ossl(
        dir,
        &[
            "pkey",
            "-in",
            "ec.p8.pem",
            "-pubout",
            "-outform",
            "DER",
            "-out",
            "ec.pub.der",
        ],
    );
}

fn check_private(dir: &Path, reference: &PublicKey, name: &str, pw: Option<&[u8]>, format: KeyFormat) {
    let k = PrivateKey::from_bytes(&read(dir, name), pw, name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(k.public_key().same_key(reference), "{name} is not the same key");
    assert_eq!(k.format(), format, "{name}");
    assert_eq!(k.describe(), reference.describe(), "{name}");
    assert_eq!(k.source_name(), name);
}

fn check_public(dir: &Path, reference: &PublicKey, name: &str, format: KeyFormat) {
    let k = PublicKey::from_bytes(&read(dir, name), name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(k.same_key(reference), "{name} is not the same key");
    assert_eq!(k.format(), format, "{name}");
}

fn rsa_formats(bits: u32) {
    let t = tempfile::tempdir().unwrap();
    let d = rsa_set(t.path(), bits);
    let reference = PublicKey::from_file(&d.join("rsa.pub.pem")).unwrap();
    assert_eq!(reference.describe(), format!("RSA-{bits}"));
    assert_eq!(reference.kind(), KeyKind::Rsa { bits });
    assert_eq!(reference.format(), KeyFormat::SpkiPem);
    check_private(&d, &reference, "rsa.p8.pem", None, KeyFormat::Pkcs8Pem);
    check_private(&d, &reference, "rsa.p8.der", None, KeyFormat::Pkcs8Der);
    check_private(&d, &reference, "rsa.p1.pem", None, KeyFormat::Pkcs1Pem);
    check_private(&d, &reference, "rsa.p1.der", None, KeyFormat::Pkcs1Der);
    // A password for an unencrypted key is ignored, as in Go.
    check_private(&d, &reference, "rsa.p8.pem", Some(b"unused"), KeyFormat::Pkcs8Pem);
    check_private(
        &d,
        &reference,
        "rsa.enc8.pem",
        Some(b"s3cret"),
        KeyFormat::EncryptedPkcs8Pem,
    );
    check_private(
        &d,
        &reference,
        "rsa.enc8.der",
        Some(b"s3cret"),
        KeyFormat::EncryptedPkcs8Der,
    );
    check_private(
        &d,
        &reference,
        "rsa.legacy.pem",
        Some(b"s3cret"),
        KeyFormat::LegacyEncryptedPem,
    );
    check_public(&d, &reference, "rsa.pub.der", KeyFormat::SpkiDer);
    check_public(&d, &reference, "rsa.p1pub.pem", KeyFormat::Pkcs1PublicPem);
    check_public(&d, &reference, "rsa.p1pub.der", KeyFormat::Pkcs1PublicDer);
    check_public(&d, &reference, "cert.pem", KeyFormat::CertificatePem);
    check_public(&d, &reference, "cert.der", KeyFormat::CertificateDer);

    for enc in ["rsa.enc8.pem", "rsa.enc8.der", "rsa.legacy.pem"] {
        match PrivateKey::from_bytes(&read(&d, enc), None, enc) {
            Err(e @ KeyError::NeedsPassword { .. }) => {
                let m = e.to_string();
                assert!(m.contains(enc) && m.contains("FILE:PASSWORD"), "{m}");
            }
            other => panic!("{enc} without password: {other:?}"),
        }
        match PrivateKey::from_bytes(&read(&d, enc), Some(b"wrong"), enc) {
            Err(e @ KeyError::WrongPassword { .. }) => assert!(e.to_string().contains(enc)),
            other => panic!("{enc} with a wrong password: {other:?}"),
        }
    }
}

#[test]
fn rsa_2048_every_format() {
    rsa_formats(2048);
}

#[test]
fn rsa_4096_every_format() {
    rsa_formats(4096);
}

fn ec_formats(curve: &str) {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    ec_set(d, curve);
    let reference = PublicKey::from_file(&d.join("ec.pub.pem")).unwrap();
    assert_eq!(reference.describe(), format!("EC {curve}"));
    check_private(d, &reference, "ec.p8.pem", None, KeyFormat::Pkcs8Pem);
    check_private(d, &reference, "ec.p8.der", None, KeyFormat::Pkcs8Der);
    check_private(d, &reference, "ec.sec1.pem", None, KeyFormat::Sec1Pem);
    check_private(d, &reference, "ec.sec1.der", None, KeyFormat::Sec1Der);
    check_private(
        d,
        &reference,
        "ec.legacy.pem",
        Some(b"s3cret"),
        KeyFormat::LegacyEncryptedPem,
    );
    check_private(
        d,
        &reference,
        "ec.enc8.pem",
        Some(b"s3cret"),
        KeyFormat::EncryptedPkcs8Pem,
    );
    check_public(d, &reference, "ec.pub.der", KeyFormat::SpkiDer);
    assert!(!KeyFormat::Sec1Pem.go_ocicrypt_reads());
    assert!(KeyFormat::Sec1Der.go_ocicrypt_reads());
}

#[test]
fn ec_p256_every_format() {
    ec_formats("P-256");
}

#[test]
fn ec_p384_every_format() {
    ec_formats("P-384");
}

#[test]
fn ec_p521_every_format() {
    ec_formats("P-521");
}

#[test]
fn ecparam_genkey_output_with_parameters_block() {
    let t = tempfile::tempdir().unwrap();
    ossl(
        t.path(),
        &["ecparam", "-name", "prime256v1", "-genkey", "-out", "k.pem"],
    );
    let bytes = read(t.path(), "k.pem");
    assert!(String::from_utf8_lossy(&bytes).contains("EC PARAMETERS"));
    let k = PrivateKey::from_bytes(&bytes, None, "k.pem").unwrap();
    assert_eq!(k.kind(), KeyKind::Ec(Curve::P256));
}

fn jwk_json(jwk: &josekit::jwk::Jwk) -> Vec<u8> {
    jwk.to_string().into_bytes()
}

#[test]
fn jwks_with_and_without_alg() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    ossl(
        d,
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "rsa.pem",
        ],
    );
    ossl(
        d,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-384",
            "-out",
            "ec.pem",
        ],
    );
    let rsa_ref = PrivateKey::from_file(&d.join("rsa.pem"), None)
        .unwrap()
        .public_key();
    let ec_ref = PrivateKey::from_file(&d.join("ec.pem"), None)
        .unwrap()
        .public_key();

    let rsa = josekit::jwk::alg::rsa::RsaKeyPair::from_pem(read(d, "rsa.pem")).unwrap();
    let ec = josekit::jwk::alg::ec::EcKeyPair::from_pem(read(d, "ec.pem"), None).unwrap();

    // Without alg.
    let k = PrivateKey::from_bytes(&jwk_json(&rsa.to_jwk_private_key()), None, "rsa.jwk").unwrap();
    assert!(k.public_key().same_key(&rsa_ref));
    assert_eq!(k.format(), KeyFormat::Jwk);
    assert_eq!(k.alg(), None);
    let p = PublicKey::from_bytes(&jwk_json(&rsa.to_jwk_public_key()), "rsa.pub.jwk").unwrap();
    assert!(p.same_key(&rsa_ref));
    assert_eq!(p.alg(), None);
    let k = PrivateKey::from_bytes(&jwk_json(&ec.to_jwk_key_pair()), None, "ec.jwk").unwrap();
    assert!(k.public_key().same_key(&ec_ref));
    assert_eq!(k.describe(), "EC P-384");
    // josekit's private-only EC JWK has no x/y: the public point is derived from d.
    let k = PrivateKey::from_bytes(&jwk_json(&ec.to_jwk_private_key()), None, "ec.jwk").unwrap();
    assert!(k.public_key().same_key(&ec_ref));

    // With alg and kid.
    let mut j = rsa.to_jwk_public_key();
    j.set_algorithm("RSA-OAEP-256");
    j.set_key_id("key-1");
    let p = PublicKey::from_bytes(&jwk_json(&j), "rsa.pub.jwk").unwrap();
    assert_eq!(p.alg(), Some("RSA-OAEP-256"));
    assert_eq!(p.kid(), Some("key-1"));
    let mut j = ec.to_jwk_key_pair();
    j.set_algorithm("ECDH-ES+A128KW");
    let k = PrivateKey::from_bytes(&jwk_json(&j), None, "ec.jwk").unwrap();
    assert_eq!(k.alg(), Some("ECDH-ES+A128KW"));
    assert_eq!(k.public_key().alg(), Some("ECDH-ES+A128KW"));

    // Public given as private and vice versa.
    let e = PrivateKey::from_bytes(&jwk_json(&ec.to_jwk_public_key()), None, "ec.pub.jwk").unwrap_err();
    assert!(e.to_string().contains("a public JWK"), "{e}");
    let e = PublicKey::from_bytes(&jwk_json(&rsa.to_jwk_key_pair()), "rsa.jwk").unwrap_err();
    assert!(e.to_string().contains("a private JWK"), "{e}");

    // A point not on the curve, a tampered private member.
    let mut v: serde_json::Value = serde_json::from_slice(&jwk_json(&ec.to_jwk_public_key())).unwrap();
    v["x"] = serde_json::Value::String(jwk::b64url_encode(&[7u8; 48]));
    let e = PublicKey::from_bytes(v.to_string().as_bytes(), "bad.jwk").unwrap_err();
    assert!(matches!(e, KeyError::Malformed { .. }), "{e}");
    let mut v: serde_json::Value = serde_json::from_slice(&jwk_json(&rsa.to_jwk_private_key())).unwrap();
    v["d"] = serde_json::Value::String(jwk::b64url_encode(&[9u8; 256]));
    let e = PrivateKey::from_bytes(v.to_string().as_bytes(), None, "bad.jwk").unwrap_err();
    assert!(matches!(e, KeyError::Malformed { .. }), "{e}");

    // JWK sets, symmetric keys, OKP.
    let e = PublicKey::from_bytes(br#"{"keys":[]}"#, "set.json").unwrap_err();
    assert!(e.to_string().contains("JWK Set"), "{e}");
    let e = PrivateKey::from_bytes(br#"{"kty":"oct","k":"AAAA"}"#, None, "oct.json").unwrap_err();
    assert!(e.to_string().contains("symmetric"), "{e}");
    let e = PublicKey::from_bytes(br#"{"kty":"OKP","crv":"Ed25519","x":"AAAA"}"#, "okp.json").unwrap_err();
    assert!(matches!(e, KeyError::UnsupportedAlgorithm { .. }), "{e}");
}

#[test]
fn wrong_kinds_name_what_was_found() {
    let t = tempfile::tempdir().unwrap();
    let d = rsa_set(t.path(), 2048);
    let cases: &[(&str, &str)] = &[
        ("rsa.pub.pem", "a public key"),
        ("rsa.pub.der", "a public key"),
        ("rsa.p1pub.pem", "a public key"),
        ("cert.pem", "an X.509 certificate"),
        ("cert.der", "an X.509 certificate"),
    ];
    for (name, found) in cases {
        let e = PrivateKey::from_bytes(&read(&d, name), None, name).unwrap_err();
        let m = e.to_string();
        assert!(matches!(e, KeyError::Unsupported { .. }), "{name}: {m}");
        assert!(
            m.contains(name) && m.contains(found) && m.contains("private key"),
            "{name}: {m}"
        );
    }
    for name in [
        "rsa.p8.pem",
        "rsa.p1.pem",
        "rsa.p8.der",
        "rsa.p1.der",
        "rsa.enc8.pem",
        "rsa.enc8.der",
    ] {
        let e = PublicKey::from_bytes(&read(&d, name), name).unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains(name) && m.contains("private key") && m.contains("-pubout"),
            "{name}: {m}"
        );
    }
}

#[test]
fn garbage_and_foreign_formats() {
    let cases: &[(&[u8], &str)] = &[
        (b"", "an empty file"),
        (b"  \n", "an empty file"),
        (b"This is a README\nnot a key\n", "not a key (text)"),
        (b"\x01\x02\x03garbage\xff\xfe", "unrecognised binary data"),
        (b"{\"hello\": 1}", "not a JWK"),
        (b"{not json", "malformed JWK"),
        (
            b"-----BEGIN PGP PRIVATE KEY BLOCK-----\n\nAAAA\n-----END PGP PRIVATE KEY BLOCK-----\n",
            "OpenPGP secret key",
        ),
        (
            b"-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n",
            "ssh-keygen -p -m PKCS8",
        ),
        (
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            "malformed PEM block \"PRIVATE KEY\"",
        ),
        (
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n",
            "has no \"-----END PRIVATE KEY-----\"",
        ),
        (b"ssh-rsa AAAAB3NzaC1yc2E user@host\n", "OpenSSH public key"),
    ];
    for (bytes, want) in cases {
        let e = PrivateKey::from_bytes(bytes, None, "some-file").unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("some-file") && m.contains(want),
            "{:?}: {m}",
            String::from_utf8_lossy(bytes)
        );
        let e = PublicKey::from_bytes(bytes, "some-file").unwrap_err();
        assert!(e.to_string().contains("some-file"), "{e}");
    }
    let vectors = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/vectors/keys");
    let e = PrivateKey::from_file(&vectors.join("pgp-secret.asc"), None).unwrap_err();
    assert!(e.to_string().contains("OpenPGP secret key"), "{e}");
    let e = PublicKey::from_file(&vectors.join("pgp-public.asc")).unwrap_err();
    assert!(e.to_string().contains("OpenPGP public key"), "{e}");
    let e = PrivateKey::from_file(&vectors.join("does-not-exist.pem"), None).unwrap_err();
    assert!(
        e.is_not_found() && e.to_string().contains("does-not-exist.pem"),
        "{e}"
    );
}

#[test]
fn unsupported_key_types() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    ossl(d, &["genpkey", "-algorithm", "ED25519", "-out", "ed.pem"]);
    ossl(
        d,
        &[
            "ecparam",
            "-name",
            "secp256k1",
            "-genkey",
            "-noout",
            "-out",
            "k1.pem",
        ],
    );
    ossl(d, &["pkey", "-in", "k1.pem", "-pubout", "-out", "k1.pub.pem"]);
    for (name, found) in [("ed.pem", "Ed25519"), ("k1.pem", "secp256k1")] {
        let e = PrivateKey::from_bytes(&read(d, name), None, name).unwrap_err();
        assert!(matches!(e, KeyError::UnsupportedAlgorithm { .. }), "{e}");
        assert!(
            e.to_string().contains(found) && e.to_string().contains(name),
            "{e}"
        );
    }
    let e = PublicKey::from_file(&d.join("k1.pub.pem")).unwrap_err();
    assert!(e.to_string().contains("secp256k1"), "{e}");
}

#[test]
fn committed_vectors_parse() {
    let v = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/vectors/keys");
    let rsa = PublicKey::from_file(&v.join("rsa.pub.pem")).unwrap();
    let ec = PublicKey::from_file(&v.join("ec.pub.pem")).unwrap();
    assert_eq!(rsa.describe(), "RSA-2048");
    assert_eq!(ec.describe(), "EC P-256");
    for (f, pw, reference) in [
        ("rsa.pem", None, &rsa),
        ("rsa.enc.pem", Some(&b"1234"[..]), &rsa),
        ("ec.p8.pem", None, &ec),
        ("ec.sec1.pem", None, &ec),
        ("ec.sec1.der", None, &ec),
    ] {
        let k = PrivateKey::from_file(&v.join(f), pw).unwrap();
        assert!(k.public_key().same_key(reference), "{f}");
    }
    // A byte-order mark and CRLF line ends (a key edited on Windows).
    let pem = std::fs::read_to_string(v.join("ec.p8.pem"))
        .unwrap()
        .replace('\n', "\r\n");
    let k = PrivateKey::from_bytes(format!("\u{feff}{pem}").as_bytes(), None, "bom.pem").unwrap();
    assert!(k.public_key().same_key(&ec));
    let pem = std::fs::read_to_string(v.join("rsa.enc.pem"))
        .unwrap()
        .replace('\n', "\r\n");
    let k = PrivateKey::from_bytes(format!("\u{feff}{pem}").as_bytes(), Some(b"1234"), "bom.pem").unwrap();
    assert!(k.public_key().same_key(&rsa));
    let pem = std::fs::read_to_string(v.join("rsa.pub.pem")).unwrap();
    assert!(
        PublicKey::from_bytes(format!("\u{feff}{pem}").as_bytes(), "bom.pem")
            .unwrap()
            .same_key(&rsa)
    );
    let jwk = josekit::jwk::alg::ec::EcKeyPair::from_pem(std::fs::read(v.join("ec.p8.pem")).unwrap(), None)
        .unwrap()
        .to_jwk_key_pair()
        .to_string();
    let k = PrivateKey::from_bytes(format!("\u{feff}{jwk}").as_bytes(), None, "bom.jwk").unwrap();
    assert!(k.public_key().same_key(&ec));
    let cert = PublicKey::from_file(&v.join("cert.pem")).unwrap();
    let cert_key = PrivateKey::from_file(&v.join("cert.key.pem"), None).unwrap();
    assert!(cert.same_key(&cert_key.public_key()));
    assert!(!cert.same_key(&rsa));
}

#[test]
fn debug_never_shows_key_material() {
    let v = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/vectors/keys");
    let k = PrivateKey::from_file(&v.join("ec.sec1.der"), None).unwrap();
    let dbg = format!("{k:?}");
    assert!(dbg.contains("<redacted>") && dbg.contains("ec.sec1.der"), "{dbg}");
    let der =
        openssl::ec::EcKey::private_key_from_der(&std::fs::read(v.join("ec.sec1.der")).unwrap()).unwrap();
    let d_hex = hex::encode(der.private_key().to_vec());
    assert!(!dbg.to_lowercase().contains(&d_hex[..16]));
}

#[test]
fn pkcs8_export_round_trips() {
    let v = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/vectors/keys");
    let k = PrivateKey::from_file(&v.join("ec.sec1.pem"), None).unwrap();
    let pem = k.to_pkcs8_pem().unwrap();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    let back = PrivateKey::from_bytes(pem.as_bytes(), None, "x").unwrap();
    assert_eq!(back.format(), KeyFormat::Pkcs8Pem);
    assert!(back.public_key().same_key(&k.public_key()));
    let fp = k.public_key().fingerprint();
    assert!(fp.starts_with("sha256:") && fp.len() == 71, "{fp}");
    assert_eq!(fp, back.public_key().fingerprint());
}

#[test]
fn generated_keys_parse_and_are_checked_by_openssl() {
    let t = tempfile::tempdir().unwrap();
    for bits in [2048, 3072] {
        let (private, public) = generate_rsa(bits).unwrap();
        assert!(private.starts_with("-----BEGIN PRIVATE KEY-----"));
        let k = PrivateKey::from_bytes(private.as_bytes(), None, "gen").unwrap();
        assert_eq!(k.kind(), KeyKind::Rsa { bits });
        assert!(PublicKey::from_bytes(public.as_bytes(), "gen.pub")
            .unwrap()
            .same_key(&k.public_key()));
        std::fs::write(t.path().join("gen.pem"), private.as_bytes()).unwrap();
        ossl(t.path(), &["pkey", "-in", "gen.pem", "-check", "-noout"]);
    }
    for curve in ["P-256", "P-384", "P-521"] {
        let (private, public) = generate_ec(curve).unwrap();
        let k = PrivateKey::from_bytes(private.as_bytes(), None, "gen").unwrap();
        assert_eq!(k.describe(), format!("EC {curve}"));
        assert!(PublicKey::from_bytes(public.as_bytes(), "gen.pub")
            .unwrap()
            .same_key(&k.public_key()));
        std::fs::write(t.path().join("gen.pem"), private.as_bytes()).unwrap();
        ossl(t.path(), &["pkey", "-in", "gen.pem", "-check", "-noout"]);
    }
    assert!(matches!(generate_rsa(1024), Err(KeyError::InvalidParameter(_))));
    assert!(matches!(
        generate_ec("secp256k1"),
        Err(KeyError::InvalidParameter(_))
    ));
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, bytes).unwrap();
}

#[test]
fn classify_like_sort_decryption_keys() {
    let v = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/vectors/keys");
    let f = |n: &str| std::fs::read(v.join(n)).unwrap();
    assert!(matches!(
        classify_key_file(&f("rsa.pem"), "rsa.pem"),
        KeyFileKind::PrivateKey(_)
    ));
    assert!(matches!(
        classify_key_file(&f("ec.sec1.der"), "x"),
        KeyFileKind::PrivateKey(_)
    ));
    assert!(matches!(
        classify_key_file(&f("rsa.enc.pem"), "x"),
        KeyFileKind::EncryptedPrivateKey
    ));
    assert!(matches!(
        classify_key_file(&f("cert.pem"), "x"),
        KeyFileKind::Certificate
    ));
    assert!(matches!(
        classify_key_file(&f("rsa.pub.pem"), "x"),
        KeyFileKind::Unknown { .. }
    ));
    // Go fails on an armored keyring; we read it (and keysync-agent writes it binary).
    assert!(matches!(
        classify_key_file(&f("pgp-secret.asc"), "x"),
        KeyFileKind::GpgArmoredSecretKeyring
    ));
    let yaml = b"pkcs11:\n  uri: pkcs11:token=t;object=k?module-name=softhsm2\nmodule:\n  env:\n    SOFTHSM2_CONF: /etc/softhsm2.conf\n";
    assert!(matches!(classify_key_file(yaml, "x"), KeyFileKind::Pkcs11Yaml));
    assert!(matches!(
        classify_key_file(b"pkcs11:\n  uri: http://x\n", "x"),
        KeyFileKind::Unknown { .. }
    ));
    match classify_key_file(b"just a README\n", "x") {
        KeyFileKind::Unknown { found } => assert!(found.contains("not a key (text)"), "{found}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn gpg_keyrings_are_recognised_if_gpg_is_installed() {
    let Ok(out) = Command::new("gpg")
        .arg("--dearmor")
        .stdin(std::process::Stdio::piped())
        .output()
    else {
        assert!(
            std::env::var_os("IMGCRYPT_REQUIRE_TOOLS").is_none(),
            "gpg is required (Debian package gpg)"
        );
        return;
    };
    let _ = out;
    let v = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/vectors/keys");
    for (file, secret) in [("pgp-secret.asc", true), ("pgp-public.asc", false)] {
        let out = Command::new("gpg")
            .args(["--dearmor", "--output", "-"])
            .arg(v.join(file))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let kind = classify_key_file(&out.stdout, file);
        if secret {
            assert!(matches!(kind, KeyFileKind::GpgSecretKeyring), "{kind:?}");
        } else {
            assert!(matches!(kind, KeyFileKind::GpgPublicKeyring), "{kind:?}");
        }
        let e = PrivateKey::from_bytes(&out.stdout, None, file).unwrap_err();
        assert!(e.to_string().contains("binary OpenPGP"), "{e}");
    }
    // Armored: a secret key block is a keyring (our readers take it), a public one is not.
    let kind = classify_key_file(&std::fs::read(v.join("pgp-secret.asc")).unwrap(), "s.asc");
    assert!(matches!(kind, KeyFileKind::GpgArmoredSecretKeyring), "{kind:?}");
    let kind = classify_key_file(&std::fs::read(v.join("pgp-public.asc")).unwrap(), "p.asc");
    assert!(matches!(kind, KeyFileKind::Unknown { .. }), "{kind:?}");
}

#[cfg(feature = "pgp")]
#[test]
fn key_dir_collects_gpg_secret_keyrings() {
    let v = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/vectors/keys");
    let armored = std::fs::read(v.join("pgp-secret.asc")).unwrap();
    let binary = crate::pgp::secret_keyring_binary(&armored, "pgp-secret.asc").unwrap();
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("keys");
    write(&d, "secret.asc", &armored);
    write(&d, "sub/secring.gpg", &binary);
    write(&d, "rsa.pem", &std::fs::read(v.join("rsa.pem")).unwrap());
    for kd in [read_key_dir(&d).unwrap(), read_key_dir_lenient(&d).unwrap()] {
        let rings: Vec<_> = kd
            .gpg_keyrings
            .iter()
            .map(|f| f.path.strip_prefix(&d).unwrap().to_owned())
            .collect();
        assert_eq!(rings, vec![Path::new("secret.asc"), Path::new("sub/secring.gpg")]);
        assert_eq!(kd.keys.len(), 1);
        assert!(kd.ignored.is_empty() && kd.skipped.is_empty(), "{kd:?}");
        assert!(!format!("{kd:?}").contains("PGP PRIVATE"), "Debug shows no key");
        for f in &kd.gpg_keyrings {
            assert_eq!(
                crate::pgp::PgpSecretKey::from_bytes_many(&f.bytes, None, "x")
                    .unwrap()
                    .len(),
                1
            );
        }
    }
}

#[test]
fn key_dir_strict_and_lenient() {
    let v = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/vectors/keys");
    let f = |n: &str| std::fs::read(v.join(n)).unwrap();
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("keys");
    write(&d, "a/rsa.pem", &f("rsa.pem"));
    write(&d, "ec.der", &f("ec.sec1.der"));
    write(&d, "cert.pem", &f("cert.pem"));

    let kd = read_key_dir(&d).unwrap();
    let paths: Vec<_> = kd
        .keys
        .iter()
        .map(|e| e.path.strip_prefix(&d).unwrap().to_owned())
        .collect();
    assert_eq!(paths, [PathBuf::from("a/rsa.pem"), PathBuf::from("ec.der")]);
    assert_eq!(kd.ignored.len(), 1);
    assert!(kd.ignored[0].reason.contains("certificate"));
    assert!(kd.skipped.is_empty());

    // Each of these breaks a runtime, so the strict read fails naming the file.
    let breakers: &[(&str, Vec<u8>, &str)] = &[
        ("README", b"notes\n".to_vec(), "unknown decryption key type"),
        ("enc.pem", f("rsa.enc.pem"), "encrypted private key"),
        ("ec.sec1.pem", f("ec.sec1.pem"), "Go ocicrypt cannot read"),
        ("pub.pem", f("rsa.pub.pem"), "a public key"),
    ];
    for (name, bytes, want) in breakers {
        write(&d, name, bytes);
        match read_key_dir(&d) {
            Err(e @ KeyError::UnusableKeyFile { .. }) => {
                let m = e.to_string();
                assert!(m.contains(name) && m.contains(want), "{m}");
            }
            other => panic!("{name}: {other:?}"),
        }
        let lenient = read_key_dir_lenient(&d).unwrap();
        let n_keys = if *name == "ec.sec1.pem" { 3 } else { 2 };
        assert_eq!(lenient.keys.len(), n_keys, "{name}");
        assert_eq!(
            lenient.skipped.len(),
            if *name == "ec.sec1.pem" { 0 } else { 1 },
            "{name}"
        );
        std::fs::remove_file(d.join(name)).unwrap();
    }

    std::os::unix::fs::symlink(d.join("ec.der"), d.join("link.der")).unwrap();
    let e = read_key_dir(&d).unwrap_err();
    assert!(
        matches!(e, KeyError::Symlink { .. }) && e.to_string().contains("link.der"),
        "{e}"
    );
    let lenient = read_key_dir_lenient(&d).unwrap();
    assert_eq!(lenient.keys.len(), 2);
    assert!(lenient.skipped[0].reason.contains("symbolic link"));
    std::fs::remove_file(d.join("link.der")).unwrap();

    std::os::unix::fs::symlink(&d, t.path().join("dirlink")).unwrap();
    assert!(matches!(
        read_key_dir(&t.path().join("dirlink")),
        Err(KeyError::Symlink { .. })
    ));
    let e = read_key_dir(&t.path().join("missing")).unwrap_err();
    assert!(e.is_not_found());
    assert_eq!(read_key_dir(&d).unwrap().into_private_keys().len(), 2);
}

#[test]
fn key_dir_fifo_and_oversized_files_do_not_hang_or_load() {
    let v = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/vectors/keys");
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    write(d, "rsa.pem", &std::fs::read(v.join("rsa.pem")).unwrap());
    let st = Command::new("mkfifo").arg(d.join("pipe")).status().unwrap();
    assert!(st.success());
    // CRI-O would block reading a FIFO; we never open it.
    let e = read_key_dir(d).unwrap_err();
    assert!(
        e.to_string().contains("pipe") && e.to_string().contains("not a regular file"),
        "{e}"
    );
    let lenient = read_key_dir_lenient(d).unwrap();
    assert_eq!(lenient.keys.len(), 1);
    assert_eq!(lenient.skipped[0].reason, "not a regular file");
    std::fs::remove_file(d.join("pipe")).unwrap();

    write(
        d,
        "big.pem",
        &vec![b'A'; usize::try_from(MAX_KEY_FILE_SIZE).unwrap() + 1],
    );
    let e = read_key_dir(d).unwrap_err();
    assert!(
        e.to_string().contains("big.pem") && e.to_string().contains("larger than"),
        "{e}"
    );
    let e = PrivateKey::from_file(&d.join("big.pem"), None).unwrap_err();
    assert!(e.to_string().contains("larger than"), "{e}");
}

mod fuzz {
    use proptest::prelude::*;

    use super::super::*;

    fn seeds() -> Vec<Vec<u8>> {
        let v = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/vectors/keys");
        [
            "rsa.pem",
            "rsa.enc.pem",
            "ec.sec1.der",
            "ec.sec1.pem",
            "cert.pem",
            "rsa.pub.pem",
        ]
        .iter()
        .map(|f| std::fs::read(v.join(f)).unwrap())
        .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Arbitrary bytes never panic any parser.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = PrivateKey::from_bytes(&bytes, None, "x");
            let _ = PrivateKey::from_bytes(&bytes, Some(b"pw"), "x");
            let _ = PublicKey::from_bytes(&bytes, "x");
            let _ = classify_key_file(&bytes, "x");
        }

        /// Damaged real keys either still parse or give an error; never a panic.
        #[test]
        fn damaged_keys_never_panic(seed in 0usize..6, pos in any::<usize>(), byte in any::<u8>(), cut in any::<bool>()) {
            let mut k = seeds()[seed].clone();
            let p = pos % k.len();
            if cut { k.truncate(p) } else { k[p] = byte }
            let _ = PrivateKey::from_bytes(&k, Some(b"1234"), "x");
            let _ = PublicKey::from_bytes(&k, "x");
            let _ = classify_key_file(&k, "x");
        }
    }
}

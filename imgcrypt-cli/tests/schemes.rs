//! The PKCS#7 and OpenPGP schemes through the real binary, both ways with skopeo, with fresh
//! keys made by `openssl` (and `gpg`) on every run.

mod common;

use std::path::Path;

use common::{blob_count, imgcrypt, layer_blobs, oci, vectors};
use testkit::image::{write_image, Compression, LayerSpec};
use testkit::tools::{have_tool, openssl, openssl_cert, skopeo, skopeo_ok};

fn small_image(dir: &Path) {
    write_image(
        dir,
        "v1",
        &[
            LayerSpec::random(20_000, 7, Compression::Gzip),
            LayerSpec::random(5_000, 8, Compression::Gzip),
        ],
    );
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn annotation(layout: &Path, scheme: &str) -> String {
    let m = testkit::image::manifest(layout, "v1");
    m["layers"][0]["annotations"][format!("org.opencontainers.image.enc.keys.{scheme}")]
        .as_str()
        .unwrap_or_else(|| panic!("no {scheme} annotation: {m}"))
        .to_owned()
}

#[test]
fn pkcs7_both_ways_with_skopeo() {
    if !have_tool("skopeo") || !have_tool("openssl") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let (key_a, cert_a) = openssl_cert(d, "alice");
    let (key_b, cert_b) = openssl_cert(d, "bob");
    let (key_c, _) = openssl_cert(d, "carol");
    let src = d.join("src");
    small_image(&src);

    // imgcrypt encrypts for two certificates; skopeo decrypts with each (key + cert, as Go
    // needs), byte-identical to the source.
    let ours = d.join("ours");
    imgcrypt(&[
        "encrypt",
        "--recipient",
        &format!("pkcs7:{}", s(&cert_a)),
        "--recipient",
        &format!("pkcs7:{}", s(&cert_b)),
        &oci(&src, "v1"),
        &oci(&ours, "v1"),
    ])
    .ok()
    .stdout_has(&["2 encrypted"]);
    for (k, c) in [(&key_a, &cert_a), (&key_b, &cert_b)] {
        let dec = d.join(format!("skopeo-dec-{}", k.file_name().unwrap().to_string_lossy()));
        skopeo_ok(&[
            "copy",
            "--decryption-key",
            &s(k),
            "--decryption-key",
            &s(c),
            &oci(&ours, "v1"),
            &oci(&dec, "v1"),
        ]);
        assert_eq!(layer_blobs(&dec, "v1"), layer_blobs(&src, "v1"));
    }
    imgcrypt(&["inspect", &oci(&ours, "v1")])
        .ok()
        .stdout_has(&["encrypted for pkcs7 (2 recipients)"]);

    // skopeo encrypts; imgcrypt decrypts with the private key alone (and with key + cert).
    let theirs = d.join("theirs");
    skopeo_ok(&[
        "copy",
        "--encryption-key",
        &format!("pkcs7:{}", s(&cert_a)),
        &oci(&src, "v1"),
        &oci(&theirs, "v1"),
    ]);
    for (i, keys) in [vec![&key_a], vec![&cert_a, &key_a]].into_iter().enumerate() {
        let dec = d.join(format!("our-dec{i}"));
        let mut args = vec!["decrypt".to_owned()];
        for k in keys {
            args.extend(["--key".to_owned(), s(k)]);
        }
        args.extend([oci(&theirs, "v1"), oci(&dec, "v1")]);
        imgcrypt(&args.iter().map(String::as_str).collect::<Vec<_>>()).ok();
        assert_eq!(layer_blobs(&dec, "v1"), layer_blobs(&src, "v1"));
    }
    imgcrypt(&["check", "--key", &s(&key_a), &oci(&theirs, "v1")]).ok();

    // A key that is no recipient: exit 4, nothing written.
    let out = d.join("nothing");
    imgcrypt(&[
        "decrypt",
        "--key",
        &s(&key_c),
        &oci(&ours, "v1"),
        &oci(&out, "v1"),
    ])
    .expect_code(4)
    .stderr_has(&["wrong key", "carol.key.pem"]);
    assert!(!out.join("index.json").exists() || blob_count(&out) == 0);

    // A tampered blob (one byte of the encrypted content key): exit 4, nothing written.
    let tampered = d.join("tampered");
    copy_dir(&ours, &tampered);
    let a = annotation(&tampered, "pkcs7");
    let mut blob = ocicrypt_core::options::decode_b64(&a).unwrap();
    let n = blob.len();
    blob[n - 40] ^= 1;
    rewrite_annotation(&tampered, "pkcs7", &ocicrypt_core::options::encode_b64(&blob));
    let out = d.join("nothing2");
    imgcrypt(&[
        "decrypt",
        "--key",
        &s(&key_a),
        &oci(&tampered, "v1"),
        &oci(&out, "v1"),
    ])
    .expect_code(4)
    .stderr_has(&["pkcs7"]);
    assert!(!out.join("index.json").exists() || blob_count(&out) == 0);

    // An EC certificate is refused clearly.
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ec.key.pem",
            "-out",
            "ec.cert.pem",
            "-days",
            "1",
            "-subj",
            "/CN=ec",
        ],
    );
    imgcrypt(&[
        "encrypt",
        "--recipient",
        &format!("pkcs7:{}", s(&d.join("ec.cert.pem"))),
        &oci(&src, "v1"),
        &oci(&d.join("ec-out"), "v1"),
    ])
    .expect_code(10)
    .stderr_has(&["ec.cert.pem", "RSA"]);
}

#[test]
fn pkcs7_vector_opens_with_the_key_alone() {
    let v = vectors();
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    imgcrypt(&[
        "decrypt",
        "--key",
        &s(&v.join("keys/cert.key.pem")),
        &oci(&v.join("layouts/enc-p7"), "v1"),
        &oci(&out, "v1"),
    ])
    .ok();
    assert_eq!(layer_blobs(&out, "v1"), layer_blobs(&v.join("layouts/src"), "v1"));
}

/// `--key-dir` as CRI-O reads a key directory: the pkcs7 and pgp vectors open with the key
/// alone and with a gpg secret keyring, binary (what Go reads) or armored.
#[test]
fn pkcs7_and_pgp_vectors_open_with_a_key_dir() {
    let v = vectors();
    let armored = std::fs::read(v.join("keys/pgp-secret.asc")).unwrap();
    let binary = ocicrypt_core::pgp::secret_keyring_binary(&armored, "pgp-secret.asc").unwrap();
    for (layout, file, bytes) in [
        (
            "enc-p7",
            "p7/key.pem",
            std::fs::read(v.join("keys/cert.key.pem")).unwrap(),
        ),
        ("enc-pgp", "secring.gpg", binary.to_vec()),
        ("enc-pgp", "secret.asc", armored.clone()),
    ] {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("keys");
        std::fs::create_dir_all(dir.join("p7")).unwrap();
        std::fs::write(dir.join(file), &bytes).unwrap();
        std::fs::write(
            dir.join("rsa.pem"),
            std::fs::read(v.join("keys/rsa.pem")).unwrap(),
        )
        .unwrap();
        let out = t.path().join("out");
        imgcrypt(&[
            "decrypt",
            "--key-dir",
            &s(&dir),
            &oci(&v.join("layouts").join(layout), "v1"),
            &oci(&out, "v1"),
        ])
        .ok();
        assert_eq!(
            layer_blobs(&out, "v1"),
            layer_blobs(&v.join("layouts/src"), "v1"),
            "{layout} with {file}"
        );
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

/// Replaces the first layer's `keys.<scheme>` annotation and re-digests the manifest (so only
/// the key blob is wrong).
fn rewrite_annotation(layout: &Path, scheme: &str, value: &str) {
    testkit::image::set_layer_annotation(
        layout,
        &format!("org.opencontainers.image.enc.keys.{scheme}"),
        value,
    );
}

#[allow(dead_code)]
fn skopeo_fails(args: &[&str]) -> String {
    let o = skopeo(args);
    assert!(!o.status.success(), "skopeo {} succeeded", args.join(" "));
    String::from_utf8_lossy(&o.stderr).into_owned()
}

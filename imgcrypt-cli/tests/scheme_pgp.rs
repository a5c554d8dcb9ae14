//! The OpenPGP scheme through the real binary, both ways with skopeo and gnupg, with fresh keys
//! made by `gpg` on every run; and an image for jwe + pkcs7 + pgp recipients that each key
//! alone opens in skopeo. One test in its own process: it sets GNUPGHOME for skopeo.

mod common;

use std::path::Path;

use common::{blob_count, imgcrypt, imgcrypt_env, layer_blobs, oci};
use testkit::image::{write_image, Compression, LayerSpec};
use testkit::tools::{gpg, gpg_gen_key as gen_key, gpg_home, have_tool, openssl, openssl_keypair, skopeo_ok};

fn s(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn pgp_both_ways_with_skopeo_and_a_three_scheme_image() {
    if !have_tool("skopeo") || !have_tool("gpg") || !have_tool("openssl") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let agent = gpg_home(d);
    let home = agent.0.clone();
    gen_key(&home, "Alice", "alice@example.com", None);
    gen_key(&home, "Bob", "bob@example.com", Some("s3cret"));
    // skopeo (a child of this process) finds the keyring through GNUPGHOME.
    std::env::set_var("GNUPGHOME", &home);
    let gnupg = [("GNUPGHOME", home.to_str().unwrap())];

    let alice_gpg = d.join("alice.gpg");
    std::fs::write(
        &alice_gpg,
        gpg(&home, &["--export-secret-keys", "alice@example.com"]),
    )
    .unwrap();
    let alice_asc = d.join("alice.asc");
    std::fs::write(
        &alice_asc,
        gpg(&home, &["--armor", "--export-secret-keys", "alice@example.com"]),
    )
    .unwrap();
    let bob_asc = d.join("bob.asc");
    std::fs::write(
        &bob_asc,
        gpg(
            &home,
            &[
                "--passphrase",
                "s3cret",
                "--armor",
                "--export-secret-keys",
                "bob@example.com",
            ],
        ),
    )
    .unwrap();
    let bob_pub = d.join("bob.pub.gpg");
    std::fs::write(&bob_pub, gpg(&home, &["--export", "bob@example.com"])).unwrap();

    let src = d.join("src");
    write_image(
        &src,
        "v1",
        &[
            LayerSpec::random(20_000, 11, Compression::Gzip),
            LayerSpec::random(4_000, 12, Compression::Gzip),
        ],
    );

    // imgcrypt: alice by e-mail from the gpg keyring, bob from a public key file.
    let ours = d.join("ours");
    imgcrypt_env(
        &[
            "encrypt",
            "--recipient",
            "pgp:alice@example.com",
            "--recipient",
            &format!("pgp:{}", s(&bob_pub)),
            &oci(&src, "v1"),
            &oci(&ours, "v1"),
        ],
        &gnupg,
    )
    .ok();
    imgcrypt(&["inspect", &oci(&ours, "v1")])
        .ok()
        .stdout_has(&["encrypted for pgp (2 recipients)"]);
    // skopeo decrypts with alice's binary secret keyring.
    let dec = d.join("skopeo-dec");
    skopeo_ok(&[
        "copy",
        "--decryption-key",
        &s(&alice_gpg),
        &oci(&ours, "v1"),
        &oci(&dec, "v1"),
    ]);
    assert_eq!(layer_blobs(&dec, "v1"), layer_blobs(&src, "v1"));
    // we decrypt with bob's armored, password-protected key.
    let dec = d.join("our-dec-bob");
    imgcrypt(&[
        "decrypt",
        "--key",
        &format!("{}:s3cret", s(&bob_asc)),
        &oci(&ours, "v1"),
        &oci(&dec, "v1"),
    ])
    .ok();
    assert_eq!(layer_blobs(&dec, "v1"), layer_blobs(&src, "v1"));
    // the wrong password: a key-file error, nothing written.
    let none = d.join("none");
    let r = imgcrypt(&[
        "decrypt",
        "--key",
        &format!("{}:wrong", s(&bob_asc)),
        &oci(&ours, "v1"),
        &oci(&none, "v1"),
    ]);
    assert_ne!(r.code, 0, "{r:?}");
    assert!(!r.stderr.contains("wrong\""), "{}", r.stderr);
    assert_eq!(blob_count(&none), 0);

    // skopeo encrypts for alice (from GNUPGHOME); we decrypt with the binary and the armored key.
    let theirs = d.join("theirs");
    skopeo_ok(&[
        "copy",
        "--encryption-key",
        "pgp:alice@example.com",
        &oci(&src, "v1"),
        &oci(&theirs, "v1"),
    ]);
    for (i, k) in [&alice_gpg, &alice_asc].iter().enumerate() {
        let dec = d.join(format!("our-dec{i}"));
        imgcrypt(&["decrypt", "--key", &s(k), &oci(&theirs, "v1"), &oci(&dec, "v1")]).ok();
        assert_eq!(layer_blobs(&dec, "v1"), layer_blobs(&src, "v1"));
    }
    // bob is not a recipient there: wrong key (4), nothing written.
    let none = d.join("none2");
    imgcrypt(&[
        "decrypt",
        "--key",
        &format!("{}:s3cret", s(&bob_asc)),
        &oci(&theirs, "v1"),
        &oci(&none, "v1"),
    ])
    .expect_code(4)
    .stderr_has(&["wrong key"]);
    assert_eq!(blob_count(&none), 0);
    // An unknown name: a clear error.
    imgcrypt_env(
        &[
            "encrypt",
            "--recipient",
            "pgp:nobody@example.com",
            &oci(&src, "v1"),
            &oci(&none, "v1"),
        ],
        &gnupg,
    )
    .expect_code(10)
    .stderr_has(&["nobody@example.com", "gpg"]);

    // One image for jwe + pkcs7 + pgp recipients: each key alone opens it in skopeo.
    let (jwe_key, jwe_pub) = openssl_keypair(d, "jwe", "rsa2048");
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "p7.key.pem",
            "-out",
            "p7.cert.pem",
            "-days",
            "2",
            "-subj",
            "/CN=p7",
        ],
    );
    let three = d.join("three");
    imgcrypt_env(
        &[
            "encrypt",
            "--recipient",
            &format!("jwe:{}", s(&jwe_pub)),
            "--recipient",
            &format!("pkcs7:{}", s(&d.join("p7.cert.pem"))),
            "--recipient",
            "pgp:alice@example.com",
            &oci(&src, "v1"),
            &oci(&three, "v1"),
        ],
        &gnupg,
    )
    .ok();
    imgcrypt(&["inspect", &oci(&three, "v1")]).ok().stdout_has(&[
        "jwe (1 recipient)",
        "pkcs7 (1 recipient)",
        "pgp (1 recipient)",
    ]);
    let p7key = s(&d.join("p7.key.pem"));
    let p7cert = s(&d.join("p7.cert.pem"));
    let jwe_key = s(&jwe_key);
    let alice = s(&alice_gpg);
    for (name, keys) in [
        ("jwe", vec![jwe_key.as_str()]),
        ("pkcs7", vec![p7key.as_str(), p7cert.as_str()]),
        ("pgp", vec![alice.as_str()]),
    ] {
        let dec = d.join(format!("three-{name}"));
        let mut args = vec!["copy"];
        for k in &keys {
            args.extend(["--decryption-key", k]);
        }
        let (a, b) = (oci(&three, "v1"), oci(&dec, "v1"));
        args.extend([a.as_str(), b.as_str()]);
        skopeo_ok(&args);
        assert_eq!(layer_blobs(&dec, "v1"), layer_blobs(&src, "v1"), "{name}");
        // and each alone in imgcrypt too (the pkcs7 key without its certificate)
        let ours = d.join(format!("three-ours-{name}"));
        imgcrypt(&["decrypt", "--key", keys[0], &oci(&three, "v1"), &oci(&ours, "v1")]).ok();
        assert_eq!(layer_blobs(&ours, "v1"), layer_blobs(&src, "v1"), "{name}");
    }
}

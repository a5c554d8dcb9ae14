//! Image operations end to end: the committed skopeo-made vectors, and fresh round trips with
//! skopeo in both directions on keys made by `openssl` at test time.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ocicrypt_core::image::layout::OciLayout;
use ocicrypt_core::image::ops::NoProgress;
use ocicrypt_core::image::{check_authorization, inspect, transform_image, LayerSelection, Operation};
use ocicrypt_core::jwe::{JweUnwrapper, JweWrapper};
use ocicrypt_core::keys::{PrivateKey, PublicKey};
use ocicrypt_core::{AsyncKeyUnwrapper, AsyncKeyWrapper, Error};
use testkit::image::{manifests, read_blob, sha256, write_image, write_multiarch, Compression, LayerSpec};
use testkit::tools::{have_tool, openssl, openssl_keypair, skopeo_ok};

fn vectors() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/vectors")
}

fn wrappers(pubs: &[&Path]) -> Vec<Arc<dyn AsyncKeyWrapper>> {
    let keys = pubs.iter().map(|p| PublicKey::from_file(p).unwrap()).collect();
    vec![Arc::new(JweWrapper::new(keys).unwrap())]
}

fn unwrappers(privs: &[(&Path, Option<&str>)]) -> Vec<Arc<dyn AsyncKeyUnwrapper>> {
    let keys = privs
        .iter()
        .map(|(p, pw)| PrivateKey::from_file(p, pw.map(str::as_bytes)).unwrap())
        .collect();
    vec![Arc::new(JweUnwrapper::new(keys))]
}

async fn run(
    src: &Path,
    src_tag: &str,
    dst: &Path,
    dst_tag: &str,
    op: Operation,
    sel: LayerSelection,
) -> Result<(), Error> {
    let s = Arc::new(OciLayout::open(src, Some(src_tag))?);
    let d = Arc::new(OciLayout::open_or_create(dst, Some(dst_tag))?);
    transform_image(s, d, op, sel, Arc::new(NoProgress), 4)
        .await
        .map(|_| ())
}

/// `skopeo copy --decryption-key KEY oci:SRC:v1 oci:DST:v1`.
fn skopeo_decrypt(key: &Path, src: &Path, dst: &Path) {
    skopeo_ok(&[
        "copy",
        "--decryption-key",
        key.to_str().unwrap(),
        &format!("oci:{}:v1", src.display()),
        &format!("oci:{}:v1", dst.display()),
    ]);
}

fn layer_blobs(layout: &Path, tag: &str) -> Vec<(String, Vec<u8>)> {
    manifests(layout, tag)
        .into_iter()
        .flat_map(|(_, m)| {
            m["layers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| {
                    (
                        l["mediaType"].as_str().unwrap().to_owned(),
                        read_blob(layout, l["digest"].as_str().unwrap()),
                    )
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

fn assert_plain_copy_of(original: &Path, otag: &str, out: &Path, tag: &str) {
    let a = layer_blobs(original, otag);
    let b = layer_blobs(out, tag);
    assert_eq!(a.len(), b.len());
    for ((ma, ba), (mb, bb)) in a.iter().zip(&b) {
        assert_eq!(ma, mb, "media type restored");
        assert!(
            ba == bb,
            "layer bytes identical ({} vs {})",
            sha256(ba),
            sha256(bb)
        );
    }
    for (_, m) in manifests(out, tag) {
        for l in m["layers"].as_array().unwrap() {
            assert!(l.get("annotations").is_none(), "enc annotations stripped: {l}");
        }
    }
}

#[tokio::test]
async fn skopeo_vectors_decrypt_to_the_original() {
    let v = vectors();
    let src = v.join("layouts/src");
    let k = v.join("keys");
    let cases: Vec<(&str, PathBuf)> = vec![
        ("enc-jwe", k.join("rsa.pem")),
        ("enc-jwe", k.join("ec.p8.pem")),
        ("enc-ec", k.join("ec.sec1.pem")),
        ("enc-ec", k.join("ec.sec1.der")),
    ];
    for (layout, key) in cases {
        let out = tempfile::tempdir().unwrap();
        let dst = out.path().join("dec");
        run(
            &v.join("layouts").join(layout),
            "v1",
            &dst,
            "v1",
            Operation::Decrypt {
                unwrappers: unwrappers(&[(&key, None)]),
            },
            LayerSelection::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("{layout} with {key:?}: {e:?}"));
        assert_plain_copy_of(&src, "v1", &dst, "v1");
        // The config never changes.
        assert_eq!(
            manifests(&dst, "v1")[0].1["config"],
            manifests(&src, "v1")[0].1["config"]
        );
    }

    // zstd: skopeo recompressed while encrypting; the private `digest` names the gzip source,
    // which we must not trust.
    let out = tempfile::tempdir().unwrap();
    let dst = out.path().join("dec");
    let enc_key = k.join("rsa.enc.pem");
    run(
        &v.join("layouts/enc-zstd"),
        "v1",
        &dst,
        "v1",
        Operation::Decrypt {
            unwrappers: unwrappers(&[(&enc_key, Some("1234"))]),
        },
        LayerSelection::default(),
    )
    .await
    .unwrap();
    let blobs = layer_blobs(&dst, "v1");
    assert_eq!(blobs[0].0, "application/vnd.oci.image.layer.v1.tar+zstd");
    assert!(
        sha256(&blobs[0].1).starts_with("sha256:483248e7"),
        "{}",
        sha256(&blobs[0].1)
    );
}

#[tokio::test]
async fn tampered_vector_fails_and_writes_nothing() {
    let v = vectors();
    let out = tempfile::tempdir().unwrap();
    let dst = out.path().join("dec");
    let err = run(
        &v.join("layouts/enc-jwe-tampered"),
        "v1",
        &dst,
        "v1",
        Operation::Decrypt {
            unwrappers: unwrappers(&[(&v.join("keys/rsa.pem"), None)]),
        },
        LayerSelection::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err.root_cause(), Error::AuthenticationFailed), "{err:?}");
    assert!(
        matches!(err, Error::Layer { index: 0, .. }),
        "names the layer: {err}"
    );
    assert!(
        !dst.exists(),
        "nothing at the destination: {:?}",
        std::fs::read_dir(&dst).map(|d| d.count())
    );
}

#[tokio::test]
async fn wrong_and_missing_keys_are_reported() {
    let v = vectors();
    let tmp = tempfile::tempdir().unwrap();
    let (other, _) = openssl_keypair(tmp.path(), "other", "rsa2048");
    let err = run(
        &v.join("layouts/enc-ec"),
        "v1",
        &tmp.path().join("x"),
        "v1",
        Operation::Decrypt {
            unwrappers: unwrappers(&[(&other, None)]),
        },
        LayerSelection::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err.root_cause(), Error::Unwrap { .. }), "{err:?}");
    let err = run(
        &v.join("layouts/enc-ec"),
        "v1",
        &tmp.path().join("y"),
        "v1",
        Operation::Decrypt { unwrappers: vec![] },
        LayerSelection::default(),
    )
    .await
    .unwrap_err();
    match err.root_cause() {
        Error::NoKeyForScheme { schemes } => assert_eq!(schemes, &["jwe".to_owned()]),
        other => panic!("{other:?}"),
    }
    assert!(!tmp.path().join("x").exists() && !tmp.path().join("y").exists());
}

fn three_layer_image(dir: &Path) -> PathBuf {
    let src = dir.join("src");
    write_image(
        &src,
        "v1",
        &[
            LayerSpec::random(200_000, 1, Compression::Gzip),
            LayerSpec::random(50_000, 2, Compression::Zstd),
            LayerSpec::random(30_000, 3, Compression::None),
        ],
    );
    src
}

#[tokio::test]
async fn we_encrypt_skopeo_decrypts_byte_identical() {
    if !have_tool("skopeo") || !have_tool("openssl") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let src = three_layer_image(d);
    let (rsa, rsa_pub) = openssl_keypair(d, "rsa2048", "rsa2048");
    let (ec, ec_pub) = openssl_keypair(d, "p256", "p256");
    let (rsa4, rsa4_pub) = openssl_keypair(d, "rsa4096", "rsa4096");
    let (ec3, ec3_pub) = openssl_keypair(d, "p384", "p384");
    let enc = d.join("enc");
    run(
        &src,
        "v1",
        &enc,
        "v1",
        Operation::Encrypt {
            wrappers: wrappers(&[&rsa_pub, &ec_pub, &rsa4_pub, &ec3_pub]),
        },
        LayerSelection::default(),
    )
    .await
    .unwrap();
    for (_, m) in manifests(&enc, "v1") {
        for l in m["layers"].as_array().unwrap() {
            assert!(l["mediaType"].as_str().unwrap().ends_with("+encrypted"));
        }
    }
    for (i, key) in [&rsa, &ec, &rsa4, &ec3].into_iter().enumerate() {
        let out = d.join(format!("skopeo-dec-{i}"));
        skopeo_decrypt(key, &enc, &out);
        assert_plain_copy_of(&src, "v1", &out, "v1");
    }
    // A single recipient gives the flattened serialization; skopeo reads that too.
    let enc1 = d.join("enc1");
    run(
        &src,
        "v1",
        &enc1,
        "v1",
        Operation::Encrypt {
            wrappers: wrappers(&[&ec3_pub]),
        },
        LayerSelection::default(),
    )
    .await
    .unwrap();
    let out = d.join("skopeo-dec-single");
    skopeo_decrypt(&ec3, &enc1, &out);
    assert_plain_copy_of(&src, "v1", &out, "v1");
}

#[tokio::test]
async fn skopeo_encrypts_we_decrypt_byte_identical() {
    if !have_tool("skopeo") || !have_tool("openssl") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let src = three_layer_image(d);
    let (rsa4, rsa4_pub) = openssl_keypair(d, "rsa4096", "rsa4096");
    let (ec3, ec3_pub) = openssl_keypair(d, "p384", "p384");
    let (rsa2, rsa2_pub) = openssl_keypair(d, "rsa2048", "rsa2048");
    // An encrypted PKCS#8 copy of the RSA-4096 key (skopeo 1.9.3 cannot read those; we can).
    openssl(
        d,
        &[
            "pkcs8",
            "-topk8",
            "-in",
            "rsa4096.pem",
            "-out",
            "rsa4096.p8enc.pem",
            "-passout",
            "pass:s3cret",
            "-v2",
            "aes-256-cbc",
        ],
    );
    let enc = d.join("enc");
    skopeo_ok(&[
        "copy",
        "--encryption-key",
        &format!("jwe:{}", rsa4_pub.display()),
        "--encryption-key",
        &format!("jwe:{}", ec3_pub.display()),
        "--encryption-key",
        &format!("jwe:{}", rsa2_pub.display()),
        &format!("oci:{}:v1", src.display()),
        &format!("oci:{}:v1", enc.display()),
    ]);
    // skopeo compresses an uncompressed layer before encrypting it, so the reference for our
    // decrypt is skopeo's own decrypt of the same image.
    let reference = d.join("skopeo-dec");
    skopeo_decrypt(&rsa2, &enc, &reference);
    assert_eq!(
        layer_blobs(&reference, "v1")[..2],
        layer_blobs(&src, "v1")[..2],
        "compressed layers kept as is"
    );
    let p8 = d.join("rsa4096.p8enc.pem");
    for (i, (key, pw)) in [(&rsa4, None), (&ec3, None), (&rsa2, None), (&p8, Some("s3cret"))]
        .into_iter()
        .enumerate()
    {
        let out = d.join(format!("dec-{i}"));
        run(
            &enc,
            "v1",
            &out,
            "v1",
            Operation::Decrypt {
                unwrappers: unwrappers(&[(key, pw)]),
            },
            LayerSelection::default(),
        )
        .await
        .unwrap();
        assert_plain_copy_of(&reference, "v1", &out, "v1");
    }

    // Partial encryption by skopeo: only the last layer.
    let part = d.join("part");
    skopeo_ok(&[
        "copy",
        "--encryption-key",
        &format!("jwe:{}", ec3_pub.display()),
        "--encrypt-layer",
        "-1",
        &format!("oci:{}:v1", src.display()),
        &format!("oci:{}:v1", part.display()),
    ]);
    let info = inspect(&OciLayout::open(&part, Some("v1")).unwrap())
        .await
        .unwrap();
    let enc_flags: Vec<bool> = info.manifests[0].layers.iter().map(|l| l.encrypted).collect();
    assert_eq!(enc_flags, vec![false, false, true]);
    let out = d.join("part-dec");
    run(
        &part,
        "v1",
        &out,
        "v1",
        Operation::Decrypt {
            unwrappers: unwrappers(&[(&ec3, None)]),
        },
        LayerSelection::default(),
    )
    .await
    .unwrap();
    let skopeo_out = d.join("part-skopeo-dec");
    skopeo_decrypt(&ec3, &part, &skopeo_out);
    assert_plain_copy_of(&skopeo_out, "v1", &out, "v1");
}

#[tokio::test]
async fn layer_selection_platforms_recipients_and_check() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (a, a_pub) = openssl_keypair(d, "a", "p256");
    let (b, b_pub) = openssl_keypair(d, "b", "rsa2048");
    let src = d.join("multi");
    let facts = write_multiarch(
        &src,
        "v1",
        &[
            (
                "amd64",
                vec![
                    LayerSpec::random(10_000, 10, Compression::Gzip),
                    LayerSpec::random(10_000, 11, Compression::Gzip),
                ],
            ),
            (
                "arm64",
                vec![
                    LayerSpec::random(10_000, 20, Compression::Gzip),
                    LayerSpec::random(10_000, 21, Compression::Gzip),
                ],
            ),
        ],
    );

    // Encrypt only the top layer of the arm64 image.
    let enc = d.join("enc");
    let sel = LayerSelection {
        layers: vec![-1],
        platforms: vec!["linux/arm64".into()],
        ..LayerSelection::default()
    };
    run(
        &src,
        "v1",
        &enc,
        "v1",
        Operation::Encrypt {
            wrappers: wrappers(&[&a_pub]),
        },
        sel.clone(),
    )
    .await
    .unwrap();
    let ms = manifests(&enc, "v1");
    assert_eq!(ms[0].1, manifests(&src, "v1")[0].1, "amd64 manifest untouched");
    let arm = &ms[1].1["layers"];
    assert_eq!(arm[0]["digest"], facts[1].layers[0].digest.as_str());
    assert!(arm[1]["mediaType"].as_str().unwrap().ends_with("+gzip+encrypted"));

    // Encrypting an encrypted layer again is refused.
    let err = run(
        &enc,
        "v1",
        &d.join("again"),
        "v1",
        Operation::Encrypt {
            wrappers: wrappers(&[&b_pub]),
        },
        sel.clone(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err.root_cause(), Error::AlreadyEncrypted { .. }),
        "{err:?}"
    );

    // Check: A is authorized, B is not.
    let layout = OciLayout::open(&enc, Some("v1")).unwrap();
    let ok = check_authorization(&layout, &unwrappers(&[(&a, None)]), &LayerSelection::default())
        .await
        .unwrap();
    assert_eq!(ok.len(), 1);
    assert!(ok[0].error.is_none());
    let no = check_authorization(&layout, &unwrappers(&[(&b, None)]), &LayerSelection::default())
        .await
        .unwrap();
    assert!(no[0].error.is_some());

    // Add B without touching layer data.
    let added = d.join("added");
    run(
        &enc,
        "v1",
        &added,
        "v1",
        Operation::AddRecipients {
            unwrappers: unwrappers(&[(&a, None)]),
            wrappers: wrappers(&[&b_pub]),
        },
        LayerSelection::default(),
    )
    .await
    .unwrap();
    let before = &manifests(&enc, "v1")[1].1["layers"][1];
    let after = &manifests(&added, "v1")[1].1["layers"][1];
    assert_eq!(before["digest"], after["digest"], "layer data untouched");
    let info = inspect(&OciLayout::open(&added, Some("v1")).unwrap())
        .await
        .unwrap();
    let s = &info.manifests[1].layers[1].schemes[0];
    assert_eq!((s.scheme.as_str(), s.entries, s.recipients), ("jwe", 2, Some(2)));
    let layout = OciLayout::open(&added, Some("v1")).unwrap();
    for k in [&a, &b] {
        let r = check_authorization(&layout, &unwrappers(&[(k, None)]), &LayerSelection::default())
            .await
            .unwrap();
        assert!(r.iter().all(|c| c.error.is_none()), "{r:?}");
    }

    // Replace the recipients with B only: A can no longer unwrap, B still can.
    let set = d.join("set");
    run(
        &added,
        "v1",
        &set,
        "v1",
        Operation::SetRecipients {
            unwrappers: unwrappers(&[(&a, None)]),
            wrappers: wrappers(&[&b_pub]),
        },
        LayerSelection::default(),
    )
    .await
    .unwrap();
    let err = run(
        &set,
        "v1",
        &d.join("dec-a"),
        "v1",
        Operation::Decrypt {
            unwrappers: unwrappers(&[(&a, None)]),
        },
        LayerSelection::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err.root_cause(), Error::Unwrap { .. }), "{err:?}");
    let dec = d.join("dec-b");
    run(
        &set,
        "v1",
        &dec,
        "v1",
        Operation::Decrypt {
            unwrappers: unwrappers(&[(&b, None)]),
        },
        LayerSelection::default(),
    )
    .await
    .unwrap();
    // Decrypting gives back the original index content byte for byte (same manifests).
    assert_eq!(manifests(&dec, "v1"), manifests(&src, "v1"));
}

#[tokio::test]
async fn corrupted_blob_is_caught_by_digest_check() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (_, a_pub) = openssl_keypair(d, "a", "p256");
    let src = d.join("src");
    let facts = write_image(&src, "v1", &[LayerSpec::random(5000, 1, Compression::Gzip)]);
    let blob = src
        .join("blobs/sha256")
        .join(facts.layers[0].digest.trim_start_matches("sha256:"));
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&blob, bytes).unwrap();
    let err = run(
        &src,
        "v1",
        &d.join("enc"),
        "v1",
        Operation::Encrypt {
            wrappers: wrappers(&[&a_pub]),
        },
        LayerSelection::default(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err.root_cause(), Error::DigestMismatch { .. }),
        "{err:?}"
    );
    assert!(!d.join("enc").exists());
}

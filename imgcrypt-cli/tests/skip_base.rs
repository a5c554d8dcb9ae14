//! `encrypt --skip-base IMAGE`: the layers the base image has stay unencrypted and
//! byte-identical, the others are encrypted; skopeo decrypts the result; filters that leave
//! nothing to encrypt or share nothing are usage errors (exit 2).

mod common;

use std::path::Path;

use common::{imgcrypt, layer_types, oci};
use testkit::image::{manifests, read_blob, sha256, write_image, write_multiarch, Compression, LayerSpec};
use testkit::tools::{have_tool, openssl_keypair, skopeo_ok};

const MARK: &str = "org.imgcrypt.base-layer";

fn layer(seed: u64) -> LayerSpec {
    LayerSpec::random(20_000 + seed as usize * 1_000, seed, Compression::Gzip)
}

/// Layer descriptors (JSON) of every manifest of `tag`.
fn layers(layout: &Path, tag: &str) -> Vec<serde_json::Value> {
    manifests(layout, tag)
        .into_iter()
        .flat_map(|(_, m)| m["layers"].as_array().expect("layers").clone())
        .collect()
}

fn recipient(p: &Path) -> String {
    format!("jwe:{}", p.display())
}

#[test]
fn base_layers_stay_plain_and_identical_and_skopeo_decrypts_the_rest() {
    if !have_tool("openssl") || !have_tool("skopeo") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (key, public) = openssl_keypair(t.path(), "k", "rsa2048");
    let base = t.path().join("base");
    let app = t.path().join("app");
    write_image(&base, "v1", &[layer(1), layer(2)]);
    let facts = write_image(&app, "v1", &[layer(1), layer(2), layer(3), layer(4)]);
    let enc = t.path().join("enc");
    let r = imgcrypt(&[
        "--json",
        "encrypt",
        "--recipient",
        &recipient(&public),
        "--skip-base",
        &oci(&base, "v1"),
        &oci(&app, "v1"),
        &oci(&enc, "v1"),
    ]);
    r.ok();
    let actions: Vec<String> = r.json()["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["action"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(actions, ["base", "base", "encrypted", "encrypted"]);
    // Layout to layout on one filesystem: the base layers were copied by the kernel.
    for l in &r.json()["layers"].as_array().unwrap()[..2] {
        assert!(
            l["transfer"] == "kernel-copy" || l["transfer"] == "reflink",
            "{l}"
        );
    }

    // The base layers: same descriptors (plus the mark), same bytes; the others encrypted.
    let out = layers(&enc, "v1");
    for (i, l) in out.iter().enumerate() {
        let src = &facts.layers[i];
        if i < 2 {
            assert_eq!(l["digest"], src.digest.as_str());
            assert_eq!(l["mediaType"], src.media_type.as_str());
            assert_eq!(l["annotations"][MARK], "true", "{l}");
            assert_eq!(
                sha256(&read_blob(&enc, &src.digest)),
                sha256(&read_blob(&base, &src.digest))
            );
        } else {
            assert!(l["mediaType"].as_str().unwrap().ends_with("+encrypted"), "{l}");
            assert!(l["annotations"].get(MARK).is_none(), "{l}");
        }
    }

    // inspect marks them.
    imgcrypt(&["inspect", &oci(&enc, "v1")]).ok().stdout_has(&[
        "4 layer(s), 2 encrypted, 2 base",
        "plain (base layer: left unencrypted by encrypt --skip-base)",
    ]);
    let j = imgcrypt(&["--json", "inspect", &oci(&enc, "v1")]).ok().json();
    let marks: Vec<bool> = j["manifests"][0]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["base"] == true)
        .collect();
    assert_eq!(marks, [true, true, false, false]);

    // skopeo decrypts it: every layer back to the application's.
    let by_skopeo = t.path().join("by-skopeo");
    skopeo_ok(&[
        "copy",
        "--decryption-key",
        key.to_str().unwrap(),
        &oci(&enc, "v1"),
        &oci(&by_skopeo, "v1"),
    ]);
    let got: Vec<String> = layers(&by_skopeo, "v1")
        .iter()
        .map(|l| sha256(&read_blob(&by_skopeo, l["digest"].as_str().unwrap())))
        .collect();
    let want: Vec<String> = facts.layers.iter().map(|l| l.digest.clone()).collect();
    assert_eq!(got, want);

    // imgcrypt decrypts it to the application image itself: the marks go, the digest is back.
    let dec = t.path().join("dec");
    imgcrypt(&[
        "decrypt",
        "--key",
        key.to_str().unwrap(),
        &oci(&enc, "v1"),
        &oci(&dec, "v1"),
    ])
    .ok();
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dec.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["digest"], facts.manifest.digest.as_str());

    // The base as an oci-archive: the same result.
    let tar = t.path().join("base.tar");
    let st = std::process::Command::new("tar")
        .arg("-C")
        .arg(&base)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    let enc2 = t.path().join("enc2");
    imgcrypt(&[
        "encrypt",
        "--recipient",
        &recipient(&public),
        "--skip-base",
        &format!("oci-archive:{}:v1", tar.display()),
        &oci(&app, "v1"),
        &oci(&enc2, "v1"),
    ])
    .ok()
    .stdout_has(&["2 base", "2 encrypted"]);
}

#[test]
fn skip_base_that_selects_nothing_or_everything_is_a_usage_error() {
    if !have_tool("openssl") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (_, public) = openssl_keypair(t.path(), "k", "p256");
    let base = t.path().join("base");
    let app = t.path().join("app");
    write_image(&base, "v1", &[layer(1), layer(2)]);
    write_image(&base, "other", &[layer(9)]);
    write_image(&app, "v1", &[layer(1), layer(2), layer(3)]);
    write_image(&app, "same", &[layer(1), layer(2)]);
    let enc = t.path().join("enc");
    let encrypt = |extra: &[&str], base_tag: &str, app_tag: &str| {
        let rcp = recipient(&public);
        let b = oci(&base, base_tag);
        let a = oci(&app, app_tag);
        let e = oci(&enc, "v1");
        let mut args = vec!["encrypt", "--recipient", &rcp, "--skip-base", &b];
        args.extend_from_slice(extra);
        args.extend([a.as_str(), e.as_str()]);
        imgcrypt(&args)
    };
    // A base that shares no layer.
    encrypt(&[], "other", "v1")
        .expect_code(2)
        .stderr_has(&["shares no layer with", "nothing was written"]);
    // An image made only of base layers: nothing would be encrypted.
    encrypt(&[], "v1", "same")
        .expect_code(2)
        .stderr_has(&["nothing would be encrypted"]);
    // --layer naming a base layer contradicts --skip-base.
    encrypt(&["--layer", "0"], "v1", "v1")
        .expect_code(2)
        .stderr_has(&["--layer selects layer 0", "drop --skip-base"]);
    assert!(!enc.exists(), "a refused run created {}", enc.display());
    // --layer naming an application layer: that one encrypted, the base marked.
    encrypt(&["--layer", "-1"], "v1", "v1")
        .ok()
        .stdout_has(&["2 base", "1 encrypted"]);
    // A base that is not there.
    encrypt(&[], "nope", "v1")
        .expect_code(7)
        .stderr_has(&["--skip-base"]);

    // A single-platform base for another platform.
    let arm = t.path().join("arm");
    write_multiarch(&arm, "v1", &[("arm64", vec![layer(1)])]);
    let arm_single = t.path().join("arm-single");
    std::fs::create_dir_all(&arm_single).unwrap();
    // The arm64 manifest on its own: a single-platform base whose config says arm64.
    let (_, m) = manifests(&arm, "v1").remove(0);
    let mbytes = serde_json::to_vec(&m).unwrap();
    let digest = sha256(&mbytes);
    std::fs::create_dir_all(arm.join("blobs/sha256")).unwrap();
    std::fs::write(
        arm.join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:")),
        &mbytes,
    )
    .unwrap();
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(arm.join("index.json")).unwrap()).unwrap();
    index["manifests"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest, "size": mbytes.len(),
            "annotations": {"org.opencontainers.image.ref.name": "single"},
        }));
    std::fs::write(arm.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    let rcp = recipient(&public);
    imgcrypt(&[
        "encrypt",
        "--recipient",
        &rcp,
        "--skip-base",
        &oci(&arm, "single"),
        &oci(&app, "v1"),
        &oci(&t.path().join("enc3"), "v1"),
    ])
    .expect_code(2)
    .stderr_has(&["is an image for linux/arm64, but", "is for linux/amd64"]);
    // The multi-platform base with only arm64: no manifest for amd64.
    imgcrypt(&[
        "encrypt",
        "--recipient",
        &rcp,
        "--skip-base",
        &oci(&arm, "v1"),
        &oci(&app, "v1"),
        &oci(&t.path().join("enc3"), "v1"),
    ])
    .expect_code(2)
    .stderr_has(&["has no manifest for linux/amd64", "linux/arm64"]);
}

#[test]
fn multi_platform_base_per_platform_and_with_platform_filter() {
    if !have_tool("openssl") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (key, public) = openssl_keypair(t.path(), "k", "p256");
    let base = t.path().join("base");
    let app = t.path().join("app");
    write_multiarch(
        &base,
        "v1",
        &[("amd64", vec![layer(1)]), ("arm64", vec![layer(2)])],
    );
    let facts = write_multiarch(
        &app,
        "v1",
        &[
            ("amd64", vec![layer(1), layer(3)]),
            ("arm64", vec![layer(2), layer(4)]),
        ],
    );
    let rcp = recipient(&public);
    let enc = t.path().join("enc");
    imgcrypt(&[
        "encrypt",
        "--recipient",
        &rcp,
        "--skip-base",
        &oci(&base, "v1"),
        &oci(&app, "v1"),
        &oci(&enc, "v1"),
    ])
    .ok()
    .stdout_has(&["2 base", "2 encrypted"]);
    let types = layer_types(&enc, "v1");
    let enc_flags: Vec<(String, bool)> = types
        .iter()
        .map(|(a, m)| (a.clone(), m.ends_with("+encrypted")))
        .collect();
    assert_eq!(
        enc_flags,
        [
            ("amd64".to_owned(), false),
            ("amd64".to_owned(), true),
            ("arm64".to_owned(), false),
            ("arm64".to_owned(), true)
        ]
    );
    let out = layers(&enc, "v1");
    assert_eq!(out[0]["digest"], facts[0].layers[0].digest.as_str());
    assert_eq!(out[2]["digest"], facts[1].layers[0].digest.as_str());

    // Round trip: the index digest comes back.
    let dec = t.path().join("dec");
    imgcrypt(&[
        "decrypt",
        "--key",
        key.to_str().unwrap(),
        &oci(&enc, "v1"),
        &oci(&dec, "v1"),
    ])
    .ok();
    let digest_of = |p: &Path| -> serde_json::Value {
        let i: serde_json::Value =
            serde_json::from_slice(&std::fs::read(p.join("index.json")).unwrap()).unwrap();
        i["manifests"][0]["digest"].clone()
    };
    assert_eq!(digest_of(&dec), digest_of(&app));

    // --platform: only arm64 is looked up in the base and encrypted; amd64 untouched, unmarked.
    let arm_only = t.path().join("arm-only");
    imgcrypt(&[
        "encrypt",
        "--recipient",
        &rcp,
        "--platform",
        "linux/arm64",
        "--skip-base",
        &oci(&base, "v1"),
        &oci(&app, "v1"),
        &oci(&arm_only, "v1"),
    ])
    .ok()
    .stdout_has(&["1 base", "1 encrypted", "2 kept"]);
    let out = layers(&arm_only, "v1");
    assert!(out[0].get("annotations").is_none() && out[1].get("annotations").is_none());
    assert_eq!(out[2]["annotations"][MARK], "true");

    // A single-platform base (amd64 only, in an index) with an image for two: arm64 has none.
    let amd = t.path().join("amd");
    write_multiarch(&amd, "v1", &[("amd64", vec![layer(1)])]);
    imgcrypt(&[
        "encrypt",
        "--recipient",
        &rcp,
        "--skip-base",
        &oci(&amd, "v1"),
        &oci(&app, "v1"),
        &oci(&t.path().join("x"), "v1"),
    ])
    .expect_code(2)
    .stderr_has(&["has no manifest for linux/arm64"]);
    // ... unless --platform limits the run to amd64.
    imgcrypt(&[
        "encrypt",
        "--recipient",
        &rcp,
        "--platform",
        "linux/amd64",
        "--skip-base",
        &oci(&amd, "v1"),
        &oci(&app, "v1"),
        &oci(&t.path().join("y"), "v1"),
    ])
    .ok();
}

#[test]
fn registry_to_registry_mounts_the_base_layers_and_skopeo_decrypts() {
    if !have_tool("openssl") || !have_tool("skopeo") {
        return;
    }
    let reg = testkit::registry::Registry::start();
    let t = tempfile::tempdir().unwrap();
    let (key, public) = openssl_keypair(t.path(), "k", "p256");
    let base = t.path().join("base");
    let app = t.path().join("app");
    write_image(&base, "v1", &[layer(1), layer(2)]);
    let facts = write_image(&app, "v1", &[layer(1), layer(2), layer(3)]);
    for (layout, r) in [(&base, "library/base:v1"), (&app, "team/app:v1")] {
        skopeo_ok(&[
            "copy",
            "--dest-tls-verify=false",
            &oci(layout, "v1"),
            &reg.image(r),
        ]);
    }
    let r = imgcrypt(&[
        "--tls-verify=false",
        "--json",
        "encrypt",
        "--recipient",
        &recipient(&public),
        "--skip-base",
        &reg.image("library/base:v1"),
        &reg.image("team/app:v1"),
        &reg.image("team/app-enc:v1"),
    ]);
    r.ok();
    let j = r.json();
    let got: Vec<(String, String)> = j["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["action"].as_str().unwrap().to_owned(),
                l["transfer"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    // The registry answered 201 to the mount of each base layer: no upload of their bytes.
    assert_eq!(
        got,
        [
            ("base".to_owned(), "mounted".to_owned()),
            ("base".to_owned(), "mounted".to_owned()),
            ("encrypted".to_owned(), String::new())
        ]
    );
    let dec = t.path().join("dec");
    skopeo_ok(&[
        "copy",
        "--src-tls-verify=false",
        "--decryption-key",
        key.to_str().unwrap(),
        &reg.image("team/app-enc:v1"),
        &oci(&dec, "v1"),
    ]);
    let digests: Vec<String> = layers(&dec, "v1")
        .iter()
        .map(|l| sha256(&read_blob(&dec, l["digest"].as_str().unwrap())))
        .collect();
    let want: Vec<String> = facts.layers.iter().map(|l| l.digest.clone()).collect();
    assert_eq!(digests, want);
}

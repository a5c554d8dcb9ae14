//! Re-keying that cannot hand an image to the wrong party, and filters that cannot pass by
//! matching nothing (issue 14): recipient ids, `recipients remove|add|set`, `--platform` and
//! `--layer` selections, in-place layout writes.

mod common;

use std::path::Path;

use common::{blob_count, imgcrypt, layer_blobs, oci, vectors};
use testkit::image::{write_image, write_multiarch, Compression, LayerSpec};
use testkit::tools::{have_tool, openssl_keypair};

fn small_image(dir: &Path) {
    write_image(
        dir,
        "v1",
        &[
            LayerSpec::random(20_000, 1, Compression::Gzip),
            LayerSpec::random(5_000, 2, Compression::None),
        ],
    );
}

fn jwe(p: &Path) -> String {
    format!("jwe:{}", p.display())
}

fn key_id(file: &Path) -> String {
    let r = imgcrypt(&["key-id", &file.display().to_string()]);
    r.ok();
    let id = r.stdout.trim().to_owned();
    assert_eq!(id.len(), 43, "{id}");
    id
}

/// The JWE recipients' ids of every layer, from `inspect --json`.
fn layer_ids(image: &str) -> Vec<Vec<String>> {
    let j = imgcrypt(&["inspect", "--json", image]).ok().json();
    j["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|m| m["layers"].as_array().unwrap().clone())
        .map(|l| {
            l["recipients"]["jwe"]
                .as_array()
                .map(|a| a.iter().map(|v| v.as_str().unwrap_or("-").to_owned()).collect())
                .unwrap_or_default()
        })
        .collect()
}

/// The decoded JWE (keys.jwe, first entry) of each layer of a single-manifest layout.
fn jwe_texts(layout: &Path, tag: &str) -> Vec<String> {
    use base64::Engine as _;
    let m = testkit::image::manifest(layout, tag);
    m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let v = l["annotations"]["org.opencontainers.image.enc.keys.jwe"]
                .as_str()
                .unwrap();
            let b = base64::engine::general_purpose::STANDARD
                .decode(v.split(',').next().unwrap())
                .unwrap();
            String::from_utf8(b).unwrap()
        })
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    let st = std::process::Command::new("cp")
        .arg("-r")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

fn snapshot(layout: &Path) -> (Vec<u8>, usize) {
    (
        std::fs::read(layout.join("index.json")).unwrap(),
        blob_count(layout),
    )
}

#[test]
fn remove_takes_away_exactly_the_named_recipient() {
    if !have_tool("openssl") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (alice, alice_pub) = openssl_keypair(t.path(), "alice", "rsa2048");
    let (bob, bob_pub) = openssl_keypair(t.path(), "bob", "p256");
    let (mallory, mallory_pub) = openssl_keypair(t.path(), "mallory", "p256");
    let (a, b, m) = (
        alice.display().to_string(),
        bob.display().to_string(),
        mallory.display().to_string(),
    );
    let (ida, idb, idm) = (key_id(&alice_pub), key_id(&bob_pub), key_id(&mallory_pub));
    // The private key has the same id as its public key.
    assert_eq!(key_id(&alice), ida);
    let src = t.path().join("src");
    small_image(&src);
    let img = t.path().join("img");
    let enc = oci(&img, "v1");
    imgcrypt(&[
        "encrypt",
        "--recipient",
        &jwe(&alice_pub),
        "--recipient",
        &jwe(&bob_pub),
        &oci(&src, "v1"),
        &enc,
    ])
    .ok()
    .stdout_has(&["can decrypt", &ida, &idb]);
    // inspect lists the key ids per layer.
    assert_eq!(layer_ids(&enc), vec![vec![ida.clone(), idb.clone()]; 2]);
    imgcrypt(&["inspect", &enc])
        .ok()
        .stdout_has(&[&format!("recipient jwe:{ida}"), &format!("recipient jwe:{idb}")]);
    let data = layer_blobs(&img, "v1");
    let before = jwe_texts(&img, "v1");

    // Removing someone who is not a recipient: a usage error naming who is there; nothing changes.
    let snap = snapshot(&img);
    imgcrypt(&[
        "recipients",
        "remove",
        "--key",
        &a,
        "--recipient",
        &jwe(&mallory_pub),
        &enc,
    ])
    .expect_code(2)
    .stderr_has(&[&idm, "not a recipient", &ida, &idb]);
    assert_eq!(snapshot(&img), snap);
    imgcrypt(&["check", "--key", &m, &enc]).expect_code(4);

    // Removing bob, with no private key at all: alice keeps access, bob loses it.
    imgcrypt(&["recipients", "remove", "--recipient", &jwe(&bob_pub), &enc])
        .ok()
        .stdout_has(&["removed: ", &idb, "can decrypt: jwe:", &ida]);
    assert_eq!(layer_ids(&enc), vec![vec![ida.clone()]; 2]);
    imgcrypt(&["check", "--key", &a, &enc]).ok();
    imgcrypt(&["check", "--key", &b, &enc]).expect_code(4);
    assert_eq!(layer_blobs(&img, "v1"), data, "layer data is untouched");
    // alice's recipient object is byte for byte what it was.
    for (old, new) in before.iter().zip(jwe_texts(&img, "v1")) {
        let old_v: serde_json::Value = serde_json::from_str(old).unwrap();
        let alice_obj = serde_json::to_string(&old_v["recipients"][0]).unwrap();
        assert!(old.contains(&alice_obj), "serde_json kept the member order");
        assert!(new.contains(&alice_obj), "{new}");
        assert!(!new.contains(&idb));
    }

    // Removing the last recipient is refused; nothing changes.
    let snap = snapshot(&img);
    imgcrypt(&["recipients", "remove", "--recipient", &format!("id:{ida}"), &enc])
        .expect_code(2)
        .stderr_has(&["no recipient", "recipients set"]);
    assert_eq!(snapshot(&img), snap);
    imgcrypt(&["check", "--key", &a, &enc]).ok();

    // Adding a recipient who is already there adds nothing.
    imgcrypt(&[
        "recipients",
        "add",
        "--key",
        &a,
        "--recipient",
        &jwe(&alice_pub),
        &enc,
    ])
    .ok()
    .stdout_has(&["already a recipient", &ida]);
    assert_eq!(layer_ids(&enc), vec![vec![ida.clone()]; 2]);
    // Adding alice and bob: only bob is added.
    imgcrypt(&[
        "recipients",
        "add",
        "--key",
        &a,
        "--recipient",
        &jwe(&alice_pub),
        "--recipient",
        &jwe(&bob_pub),
        &enc,
    ])
    .ok()
    .stdout_has(&["already a recipient", "can decrypt"]);
    assert_eq!(layer_ids(&enc), vec![vec![ida.clone(), idb.clone()]; 2]);
    imgcrypt(&["check", "--key", &b, &enc]).ok();

    // set: exactly mallory, and the output says so.
    let out = imgcrypt(&[
        "recipients",
        "set",
        "--key",
        &b,
        "--recipient",
        &jwe(&mallory_pub),
        &enc,
        &oci(&img, "v2"),
    ]);
    out.ok().stdout_has(&[&format!("can decrypt: jwe:{idm}")]);
    assert_eq!(layer_ids(&oci(&img, "v2")), vec![vec![idm.clone()]; 2]);
    imgcrypt(&["check", "--key", &a, &oci(&img, "v2")]).expect_code(4);
    imgcrypt(&["check", "--key", &m, &oci(&img, "v2")]).ok();
}

#[test]
fn remove_refuses_entries_without_ids_and_keeps_holders() {
    // enc-jwe was written by skopeo for rsa.pub.pem and ec.pub.pem: no key ids.
    let t = tempfile::tempdir().unwrap();
    let keys = vectors().join("keys");
    let img = t.path().join("enc");
    copy_dir(&vectors().join("layouts/enc-jwe"), &img);
    let enc = oci(&img, "v1");
    let snap = snapshot(&img);
    imgcrypt(&[
        "recipients",
        "remove",
        "--recipient",
        &jwe(&keys.join("ec.pub.pem")),
        &enc,
    ])
    .expect_code(1)
    .stderr_has(&["no key id", "recipients set"]);
    assert_eq!(snapshot(&img), snap);
    imgcrypt(&[
        "check",
        "--key",
        &keys.join("rsa.pem").display().to_string(),
        &enc,
    ])
    .ok();
    imgcrypt(&[
        "check",
        "--key",
        &keys.join("ec.p8.pem").display().to_string(),
        &enc,
    ])
    .ok();
    // The way out the message names: set, after which remove works.
    imgcrypt(&[
        "recipients",
        "set",
        "--key",
        &keys.join("rsa.pem").display().to_string(),
        "--recipient",
        &jwe(&keys.join("rsa.pub.pem")),
        "--recipient",
        &jwe(&keys.join("ec.pub.pem")),
        &enc,
    ])
    .ok();
    imgcrypt(&[
        "recipients",
        "remove",
        "--recipient",
        &jwe(&keys.join("ec.pub.pem")),
        &enc,
    ])
    .ok();
    imgcrypt(&[
        "check",
        "--key",
        &keys.join("rsa.pem").display().to_string(),
        &enc,
    ])
    .ok();
    imgcrypt(&[
        "check",
        "--key",
        &keys.join("ec.p8.pem").display().to_string(),
        &enc,
    ])
    .expect_code(4);
}

#[test]
fn keygen_prints_the_key_id() {
    let t = tempfile::tempdir().unwrap();
    let k = t.path().join("carol.pem");
    let out = imgcrypt(&["keygen", "-t", "ec-p256", &k.display().to_string()]);
    out.ok();
    let id = key_id(&t.path().join("carol.pub.pem"));
    out.stdout_has(&["key id", &id]);
    let j = imgcrypt(&[
        "keygen",
        "--json",
        "-t",
        "ec-p256",
        &t.path().join("d.pem").display().to_string(),
    ])
    .ok()
    .json();
    assert_eq!(j["key_id"].as_str().unwrap(), key_id(&t.path().join("d.pub.pem")));
    imgcrypt(&["key-id", &t.path().join("nope.pem").display().to_string()]).expect_code(10);
}

#[test]
fn selections_that_match_nothing_are_usage_errors() {
    if !have_tool("openssl") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (bob, bob_pub) = openssl_keypair(t.path(), "bob", "p256");
    let b = bob.display().to_string();
    let src = t.path().join("src");
    small_image(&src);
    let enc = oci(&t.path().join("enc"), "v1");
    imgcrypt(&["encrypt", "--recipient", &jwe(&bob_pub), &oci(&src, "v1"), &enc]).ok();
    let none = oci(&t.path().join("none"), "v1");
    // A single-platform linux/amd64 image.
    imgcrypt(&["check", "--key", &b, "--platform", "linux/arm64", &enc])
        .expect_code(2)
        .stderr_has(&["linux/arm64", "linux/amd64"]);
    imgcrypt(&["check", "--key", &b, "--platform", "linux/amd64", &enc]).ok();
    imgcrypt(&["decrypt", "--key", &b, "--platform", "linux/arm64", &enc, &none])
        .expect_code(2)
        .stderr_has(&["linux/arm64"]);
    imgcrypt(&[
        "encrypt",
        "--recipient",
        &jwe(&bob_pub),
        "--platform",
        "linux/arm64",
        &oci(&src, "v1"),
        &none,
    ])
    .expect_code(2);
    imgcrypt(&[
        "recipients",
        "remove",
        "--recipient",
        &jwe(&bob_pub),
        "--platform",
        "linux/arm64",
        &enc,
    ])
    .expect_code(2);
    assert!(!t.path().join("none").exists());
    // A layer beyond the last.
    imgcrypt(&["decrypt", "--key", &b, "--layer", "2", &enc, &none])
        .expect_code(2)
        .stderr_has(&["2 layers"]);
    imgcrypt(&[
        "encrypt",
        "--recipient",
        &jwe(&bob_pub),
        "--layer",
        "-3",
        &oci(&src, "v1"),
        &none,
    ])
    .expect_code(2);

    // Multi-platform: arm64 encrypted, amd64 plain.
    let multi = t.path().join("multi");
    write_multiarch(
        &multi,
        "v1",
        &[
            ("amd64", vec![LayerSpec::random(3_000, 7, Compression::Gzip)]),
            ("arm64", vec![LayerSpec::random(3_000, 8, Compression::Gzip)]),
        ],
    );
    let menc = oci(&t.path().join("menc"), "v1");
    imgcrypt(&[
        "encrypt",
        "--recipient",
        &jwe(&bob_pub),
        "--platform",
        "linux/arm64",
        &oci(&multi, "v1"),
        &menc,
    ])
    .ok();
    imgcrypt(&["check", "--key", &b, "--platform", "linux/s390x", &menc])
        .expect_code(2)
        .stderr_has(&["linux/s390x", "linux/amd64, linux/arm64"]);
    // amd64 has no encrypted layer: nothing would be checked, so no pass.
    imgcrypt(&["check", "--key", &b, "--platform", "linux/amd64", &menc])
        .expect_code(2)
        .stderr_has(&["nothing would be checked", "linux/arm64"]);
    imgcrypt(&["check", "--key", &b, "--platform", "linux/arm64", &menc]).ok();
    imgcrypt(&["decrypt", "--key", &b, "--platform", "linux/s390x", &menc, &none]).expect_code(2);
    imgcrypt(&[
        "encrypt",
        "--recipient",
        &jwe(&bob_pub),
        "--platform",
        "linux/s390x",
        &oci(&multi, "v1"),
        &none,
    ])
    .expect_code(2);
    assert!(!t.path().join("none").exists());
}

#[test]
fn in_place_encrypt_leaves_no_plaintext_blob() {
    if !have_tool("openssl") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (bob, bob_pub) = openssl_keypair(t.path(), "bob", "p256");
    let img = t.path().join("img");
    small_image(&img);
    let plain = layer_blobs(&img, "v1");
    let blob_dir = img.join("blobs/sha256");
    let present = |d: &str| blob_dir.join(d.trim_start_matches("sha256:")).exists();
    imgcrypt(&[
        "encrypt",
        "--recipient",
        &jwe(&bob_pub),
        &oci(&img, "v1"),
        &oci(&img, "v1"),
    ])
    .ok()
    .stdout_has(&["in place: removed 3 blob(s) (2 layer(s)"]);
    for d in &plain {
        assert!(!present(d), "plaintext layer {d} is still in the layout");
    }
    // Every blob left is used by the image (no orphan), and it decrypts.
    let m = testkit::image::manifest(&img, "v1");
    assert_eq!(blob_count(&img), 2 + m["layers"].as_array().unwrap().len());
    let out = t.path().join("out");
    imgcrypt(&[
        "decrypt",
        "--key",
        &bob.display().to_string(),
        &oci(&img, "v1"),
        &oci(&out, "v1"),
    ])
    .ok();
    assert_eq!(layer_blobs(&out, "v1"), plain);

    // Another tag still uses the plaintext: it stays.
    let two = t.path().join("two");
    small_image(&two);
    write_image(
        &two,
        "v0",
        &[
            LayerSpec::random(20_000, 1, Compression::Gzip),
            LayerSpec::random(5_000, 2, Compression::None),
        ],
    );
    imgcrypt(&[
        "encrypt",
        "--recipient",
        &jwe(&bob_pub),
        &oci(&two, "v1"),
        &oci(&two, "v1"),
    ])
    .ok()
    .stdout_has(&["in place: no blob of the replaced image was removed"]);
    assert_eq!(layer_blobs(&two, "v0"), plain);

    // recipients remove in place drops the old manifest too.
    let before = blob_count(&img);
    let (_, carol_pub) = openssl_keypair(t.path(), "carol", "p256");
    imgcrypt(&[
        "recipients",
        "add",
        "--key",
        &bob.display().to_string(),
        "--recipient",
        &jwe(&carol_pub),
        &oci(&img, "v1"),
    ])
    .ok()
    .stdout_has(&["in place: removed 1 blob(s) (0 layer(s)"]);
    assert_eq!(blob_count(&img), before);
}

/// Builds a one-layer image with buildah (Go's encoding, an annotation with `<>&`); returns
/// its manifest digest.
fn buildah_image(dir: &Path) -> Option<String> {
    let ctx = dir.join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("hello.txt"), b"hello <&>\n").unwrap();
    let root = dir.join("storage");
    let b = |args: &[&str]| -> Option<String> {
        let o = std::process::Command::new("buildah")
            .arg("--root")
            .arg(root.join("root"))
            .arg("--runroot")
            .arg(root.join("run"))
            .args(["--storage-driver", "vfs"])
            .args(args)
            .output()
            .ok()?;
        if !o.status.success() {
            eprintln!("buildah {args:?}: {}", String::from_utf8_lossy(&o.stderr));
            return None;
        }
        Some(String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let c = b(&["from", "scratch"])?;
    let c = c.lines().last()?.to_owned();
    b(&["copy", &c, &ctx.display().to_string(), "/"])?;
    b(&[
        "config",
        "--annotation",
        "org.example=v<1>&",
        "--os",
        "linux",
        "--arch",
        "amd64",
        &c,
    ])?;
    b(&["commit", "--format", "oci", &c, &oci(&dir.join("img"), "v1")])?;
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("img/index.json")).unwrap()).unwrap();
    Some(index["manifests"][0]["digest"].as_str()?.to_owned())
}

fn tag_digest(layout: &Path) -> String {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    index["manifests"][0]["digest"].as_str().unwrap().to_owned()
}

#[test]
fn a_go_written_manifest_digest_survives_the_round_trip() {
    if !have_tool("openssl") || !have_tool("buildah") || !have_tool("skopeo") {
        eprintln!("skipped: needs openssl, buildah, skopeo");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (bob, bob_pub) = openssl_keypair(t.path(), "bob", "p256");
    let b = bob.display().to_string();
    let Some(original) = buildah_image(t.path()) else {
        panic!("buildah could not build the test image");
    };
    let img = oci(&t.path().join("img"), "v1");
    // Through imgcrypt both ways.
    let enc = t.path().join("enc");
    imgcrypt(&["encrypt", "--recipient", &jwe(&bob_pub), &img, &oci(&enc, "v1")]).ok();
    let dec = t.path().join("dec");
    imgcrypt(&["decrypt", "--key", &b, &oci(&enc, "v1"), &oci(&dec, "v1")]).ok();
    assert_eq!(tag_digest(&dec), original);
    // skopeo decrypts ours back to the original too.
    let sdec = t.path().join("sdec");
    let o = testkit::tools::skopeo(&[
        "copy",
        "--decryption-key",
        &b,
        &oci(&enc, "v1"),
        &oci(&sdec, "v1"),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(tag_digest(&sdec), original);
    // skopeo's encryption, decrypted by us.
    let senc = t.path().join("senc");
    let o = testkit::tools::skopeo(&[
        "copy",
        "--encryption-key",
        &jwe(&bob_pub),
        &img,
        &oci(&senc, "v1"),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let dec2 = t.path().join("dec2");
    imgcrypt(&["decrypt", "--key", &b, &oci(&senc, "v1"), &oci(&dec2, "v1")]).ok();
    // skopeo gzips the uncompressed layer while encrypting, so the plaintext image it gives
    // back is not buildah's; ours must be exactly the one skopeo's own decryption gives.
    let sdec2 = t.path().join("sdec2");
    let o = testkit::tools::skopeo(&[
        "copy",
        "--decryption-key",
        &b,
        &oci(&senc, "v1"),
        &oci(&sdec2, "v1"),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(tag_digest(&dec2), tag_digest(&sdec2));
}

/// `check --platform P` on an image with encrypted layers on other platforms too: it says
/// "checked X of Y", names the layers it left out, and does not exit 0 (exit 11); without
/// `--platform`, or when nothing is left out, exit 0 with the same count.
#[test]
fn check_never_passes_with_encrypted_layers_left_unchecked() {
    if !have_tool("openssl") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (bob, bob_pub) = openssl_keypair(t.path(), "bob", "p256");
    let (mallory, _) = openssl_keypair(t.path(), "mallory", "p256");
    let b = bob.display().to_string();
    let multi = t.path().join("multi");
    write_multiarch(
        &multi,
        "v1",
        &[
            ("amd64", vec![LayerSpec::random(2_000, 31, Compression::Gzip)]),
            (
                "arm64",
                vec![
                    LayerSpec::random(2_000, 32, Compression::Gzip),
                    LayerSpec::random(1_000, 33, Compression::None),
                ],
            ),
        ],
    );
    let enc = oci(&t.path().join("enc"), "v1");
    imgcrypt(&["encrypt", "--recipient", &jwe(&bob_pub), &oci(&multi, "v1"), &enc]).ok();

    // Everything: exit 0, "checked 3 of 3".
    imgcrypt(&["check", "--key", &b, &enc])
        .ok()
        .stdout_has(&["checked 3 of 3 encrypted layer(s)"]);
    // amd64 only: its layer opens, but arm64's two were not checked: exit 11, named.
    let r = imgcrypt(&["check", "--key", &b, "--platform", "linux/amd64", &enc]);
    r.expect_code(11).stderr_has(&[
        "checked 1 of 3 encrypted layer(s)",
        "not checked (excluded by --platform): linux/arm64 layer 0",
        "linux/arm64 layer 1",
    ]);
    let j = imgcrypt(&["check", "--json", "--key", &b, "--platform", "linux/amd64", &enc]);
    j.expect_code(11);
    let v = j.json();
    assert_eq!(v["error"]["kind"], "partial-check", "{v}");
    assert_eq!(v["error"]["exit_code"], 11, "{v}");
    // Both platforms named: nothing left out, exit 0.
    imgcrypt(&[
        "check",
        "--key",
        &b,
        "--platform",
        "linux/amd64,linux/arm64",
        &enc,
    ])
    .ok()
    .stdout_has(&["checked 3 of 3"]);
    // A wrong key on the selected platform is still exit 4, and says what was left out.
    imgcrypt(&[
        "check",
        "--key",
        mallory.to_str().unwrap(),
        "--platform",
        "linux/arm64",
        &enc,
    ])
    .expect_code(4)
    .stderr_has(&["checked 2 of 3", "linux/amd64 layer 0"]);
}

//! The real binary on OCI layouts: encrypt, decrypt, recipients, inspect, check, keygen, and
//! every error path with its message and exit code.

mod common;

use std::path::Path;

use common::{blob_count, imgcrypt, imgcrypt_env, layer_blobs, layer_types, oci, vectors};
use testkit::image::{write_image, write_multiarch, Compression, LayerSpec};
use testkit::tools::{have_tool, openssl_keypair};

fn two_layer_image(dir: &Path) {
    write_image(
        dir,
        "v1",
        &[
            LayerSpec::random(300_000, 1, Compression::Gzip),
            LayerSpec::random(50_000, 2, Compression::None),
        ],
    );
}

#[test]
fn encrypt_decrypt_roundtrip_and_partial() {
    if !have_tool("openssl") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (priv_a, pub_a) = openssl_keypair(t.path(), "a", "rsa2048");
    let (priv_b, pub_b) = openssl_keypair(t.path(), "b", "p256");
    let src = t.path().join("src");
    two_layer_image(&src);
    let enc = t.path().join("enc");
    let r = imgcrypt(&[
        "encrypt",
        "--recipient",
        &format!("jwe:{}", pub_a.display()),
        "--encryption-key",
        &format!("jwe:{}", pub_b.display()),
        &oci(&src, "v1"),
        &oci(&enc, "v1"),
    ]);
    r.ok().stdout_has(&["2 encrypted"]);
    let types = layer_types(&enc, "v1");
    assert!(types.iter().all(|(_, t)| t.ends_with("+encrypted")), "{types:?}");
    assert_ne!(layer_blobs(&enc, "v1"), layer_blobs(&src, "v1"));

    // Either recipient decrypts; the result is byte-identical to the source.
    for (i, key) in [&priv_a, &priv_b].iter().enumerate() {
        let dec = t.path().join(format!("dec{i}"));
        imgcrypt(&[
            "decrypt",
            "--decryption-key",
            &key.display().to_string(),
            &oci(&enc, "v1"),
            &oci(&dec, "v1"),
        ])
        .ok();
        assert_eq!(layer_blobs(&dec, "v1"), layer_blobs(&src, "v1"));
        assert_eq!(layer_types(&dec, "v1"), layer_types(&src, "v1"));
    }

    // Only the last layer, JSON report.
    let part = t.path().join("part");
    let r = imgcrypt(&[
        "--json",
        "encrypt",
        "--recipient",
        &format!("jwe:{}", pub_a.display()),
        "--layer",
        "-1",
        &oci(&src, "v1"),
        &oci(&part, "v1"),
    ]);
    r.ok();
    let j = r.json();
    assert_eq!(j["operation"], "encrypt");
    assert_eq!(j["layers"][0]["action"], "kept");
    assert_eq!(j["layers"][1]["action"], "encrypted");
    let types = layer_types(&part, "v1");
    assert!(
        !types[0].1.ends_with("+encrypted") && types[1].1.ends_with("+encrypted"),
        "{types:?}"
    );

    // inspect, text and JSON.
    imgcrypt(&["inspect", &oci(&part, "v1")]).ok().stdout_has(&[
        "1 encrypted",
        "encrypted for jwe (1 recipient)",
        "plain",
    ]);
    let j = imgcrypt(&["inspect", "--json", &oci(&enc, "v1")]).ok().json();
    let layers = j["manifests"][0]["layers"].as_array().unwrap();
    assert!(layers.iter().all(|l| l["encrypted"] == true));
    assert_eq!(layers[0]["schemes"][0]["scheme"], "jwe");
    assert_eq!(layers[0]["schemes"][0]["recipients"], 2);

    // check: right key 0, wrong key 4, no key for the scheme 3.
    let (priv_c, _) = openssl_keypair(t.path(), "c", "rsa2048");
    imgcrypt(&["check", "--key", &priv_a.display().to_string(), &oci(&enc, "v1")])
        .ok()
        .stdout_has(&["can decrypt all 2"]);
    imgcrypt(&["check", "--key", &priv_c.display().to_string(), &oci(&enc, "v1")])
        .expect_code(4)
        .stderr_has(&["wrong key", "c.pem", "cannot decrypt 2 of 2"]);
    let empty = t.path().join("emptykeys");
    std::fs::create_dir(&empty).unwrap();
    imgcrypt(&[
        "check",
        "--key-dir",
        &empty.display().to_string(),
        &oci(&enc, "v1"),
    ])
    .expect_code(3)
    .stderr_has(&["missing key"]);
    let j = imgcrypt(&[
        "--json",
        "check",
        "--key",
        &priv_c.display().to_string(),
        &oci(&enc, "v1"),
    ])
    .expect_code(4)
    .json();
    assert_eq!(j["authorized"], false);
    assert_eq!(j["error"]["kind"], "wrong-key");
}

#[test]
fn key_dir_and_password_forms_on_go_vectors() {
    let v = vectors();
    let t = tempfile::tempdir().unwrap();
    let src = oci(&v.join("layouts/enc-jwe"), "v1");
    let plain = layer_blobs(&v.join("layouts/src"), "v1");
    // Legacy encrypted PEM: FILE:PASSWORD, FILE:pass=, FILE:file=.
    let enc_key = v.join("keys/rsa.enc.pem").display().to_string();
    let pwfile = t.path().join("pw");
    std::fs::write(&pwfile, "1234\n").unwrap();
    for (i, k) in [
        format!("{enc_key}:1234"),
        format!("{enc_key}:pass=1234"),
        format!("{enc_key}:file={}", pwfile.display()),
    ]
    .iter()
    .enumerate()
    {
        let d = t.path().join(format!("d{i}"));
        imgcrypt(&["decrypt", "--key", k, &src, &oci(&d, "v1")]).ok();
        assert_eq!(layer_blobs(&d, "v1"), plain);
    }
    // No password: key-file error, 10.
    imgcrypt(&[
        "decrypt",
        "--key",
        &enc_key,
        &src,
        &oci(&t.path().join("x"), "v1"),
    ])
    .expect_code(10)
    .stderr_has(&["rsa.enc.pem", "encrypted", "PASSWORD"]);
    imgcrypt(&[
        "decrypt",
        "--key",
        &format!("{enc_key}:wrong"),
        &src,
        &oci(&t.path().join("x"), "v1"),
    ])
    .expect_code(10)
    .stderr_has(&["wrong password"]);
    // A key directory as CRI-O reads it: the EC key (SEC1 PEM too) and a stray README.
    let kd = t.path().join("keys");
    std::fs::create_dir(&kd).unwrap();
    std::fs::copy(v.join("keys/ec.sec1.pem"), kd.join("ec.pem")).unwrap();
    std::fs::write(kd.join("README"), "not a key").unwrap();
    let d = t.path().join("kd");
    imgcrypt(&[
        "decrypt",
        "--key-dir",
        &kd.display().to_string(),
        &src,
        &oci(&d, "v1"),
    ])
    .ok()
    .stderr_has(&["skipped", "README"]);
    assert_eq!(layer_blobs(&d, "v1"), plain);
}

#[test]
fn recipients_add_then_remove() {
    if !have_tool("openssl") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (priv_a, pub_a) = openssl_keypair(t.path(), "a", "rsa2048");
    let (priv_b, pub_b) = openssl_keypair(t.path(), "b", "p384");
    let (a, b) = (priv_a.display().to_string(), priv_b.display().to_string());
    let src = t.path().join("src");
    two_layer_image(&src);
    let img = t.path().join("img");
    imgcrypt(&[
        "encrypt",
        "--recipient",
        &format!("jwe:{}", pub_a.display()),
        &oci(&src, "v1"),
        &oci(&img, "v1"),
    ])
    .ok();
    let enc_blobs = layer_blobs(&img, "v1");
    imgcrypt(&["check", "--key", &b, &oci(&img, "v1")]).expect_code(4);

    // In place with a key that cannot decrypt: exit 4, the image is untouched.
    let index_before = std::fs::read(img.join("index.json")).unwrap();
    let blobs_before = blob_count(&img);
    imgcrypt(&[
        "recipients",
        "add",
        "--key",
        &b,
        "--recipient",
        &format!("jwe:{}", pub_b.display()),
        &oci(&img, "v1"),
    ])
    .expect_code(4)
    .stderr_has(&["wrong key", "b.pem"]);
    assert_eq!(std::fs::read(img.join("index.json")).unwrap(), index_before);
    assert_eq!(blob_count(&img), blobs_before);

    // add b in place (IMAGE only), using a's key: layer data untouched.
    imgcrypt(&[
        "recipients",
        "add",
        "--key",
        &a,
        "--recipient",
        &format!("jwe:{}", pub_b.display()),
        &oci(&img, "v1"),
    ])
    .ok()
    .stdout_has(&["2 rewrapped"]);
    assert_eq!(layer_blobs(&img, "v1"), enc_blobs);
    imgcrypt(&["check", "--key", &b, &oci(&img, "v1")]).ok();
    imgcrypt(&["check", "--key", &a, &oci(&img, "v1")]).ok();

    // set: keep only b, to another tag.
    imgcrypt(&[
        "recipients",
        "set",
        "--key",
        &b,
        "--recipient",
        &format!("jwe:{}", pub_b.display()),
        &oci(&img, "v1"),
        &oci(&img, "v2"),
    ])
    .ok();
    assert_eq!(layer_blobs(&img, "v2"), enc_blobs);
    let out = t.path().join("out-a");
    imgcrypt(&["decrypt", "--key", &a, &oci(&img, "v2"), &oci(&out, "v1")])
        .expect_code(4)
        .stderr_has(&["wrong key", "a.pem", "layer 0 (sha256:"]);
    assert!(!out.exists(), "a failed decrypt left {}", out.display());
    let out = t.path().join("out-b");
    imgcrypt(&["decrypt", "--key", &b, &oci(&img, "v2"), &oci(&out, "v1")]).ok();
    assert_eq!(layer_blobs(&out, "v1"), layer_blobs(&src, "v1"));
    // The old tag still has both recipients: removal only changes the new copy.
    imgcrypt(&["check", "--key", &a, &oci(&img, "v1")]).ok();
}

#[test]
fn multiarch_one_platform() {
    if !have_tool("openssl") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (priv_a, pub_a) = openssl_keypair(t.path(), "a", "p256");
    let src = t.path().join("src");
    write_multiarch(
        &src,
        "v1",
        &[
            ("amd64", vec![LayerSpec::random(10_000, 7, Compression::Gzip)]),
            ("arm64", vec![LayerSpec::random(12_000, 8, Compression::Gzip)]),
        ],
    );
    let enc = t.path().join("enc");
    imgcrypt(&[
        "encrypt",
        "--recipient",
        &format!("jwe:{}", pub_a.display()),
        "--platform",
        "linux/arm64",
        &oci(&src, "v1"),
        &oci(&enc, "v1"),
    ])
    .ok();
    let types = layer_types(&enc, "v1");
    assert_eq!(types.len(), 2);
    for (arch, ty) in &types {
        assert_eq!(ty.ends_with("+encrypted"), arch == "arm64", "{types:?}");
    }
    let j = imgcrypt(&["inspect", "--json", &oci(&enc, "v1")]).ok().json();
    assert_eq!(j["manifests"].as_array().unwrap().len(), 2);
    imgcrypt(&[
        "check",
        "--key",
        &priv_a.display().to_string(),
        "--platform",
        "linux/arm64",
        &oci(&enc, "v1"),
    ])
    .ok();
    let dec = t.path().join("dec");
    imgcrypt(&[
        "decrypt",
        "--key",
        &priv_a.display().to_string(),
        &oci(&enc, "v1"),
        &oci(&dec, "v1"),
    ])
    .ok();
    assert_eq!(layer_blobs(&dec, "v1"), layer_blobs(&src, "v1"));
    // No such platform.
    imgcrypt(&[
        "encrypt",
        "--recipient",
        &format!("jwe:{}", pub_a.display()),
        "--platform",
        "linux/s390x",
        &oci(&src, "v1"),
        &oci(&t.path().join("none"), "v1"),
    ])
    .expect_code(2)
    .stderr_has(&["linux/s390x", "linux/amd64"]);
}

#[test]
fn tampered_blob_digest_mismatch_writes_nothing() {
    if !have_tool("openssl") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (priv_a, pub_a) = openssl_keypair(t.path(), "a", "rsa2048");
    let src = t.path().join("src");
    two_layer_image(&src);
    let enc = t.path().join("enc");
    imgcrypt(&[
        "encrypt",
        "--recipient",
        &format!("jwe:{}", pub_a.display()),
        &oci(&src, "v1"),
        &oci(&enc, "v1"),
    ])
    .ok();
    // Flip one byte of the first encrypted layer; fix up nothing else.
    let m = testkit::image::manifest(&enc, "v1");
    let digest = m["layers"][0]["digest"].as_str().unwrap().to_owned();
    let path = enc
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();
    let out = t.path().join("out");
    imgcrypt(&[
        "decrypt",
        "--key",
        &priv_a.display().to_string(),
        &oci(&enc, "v1"),
        &oci(&out, "v1"),
    ])
    .expect_code(5)
    .stderr_has(&["digest mismatch", &digest, "tampered", "nothing was written"]);
    assert!(!out.exists(), "the failed decrypt left {}", out.display());

    // Into an existing layout: no new blob, no new tag.
    let existing = t.path().join("existing");
    two_layer_image(&existing);
    let before = blob_count(&existing);
    let index_before = std::fs::read(existing.join("index.json")).unwrap();
    imgcrypt(&[
        "decrypt",
        "--key",
        &priv_a.display().to_string(),
        &oci(&enc, "v1"),
        &oci(&existing, "v2"),
    ])
    .expect_code(5);
    assert_eq!(blob_count(&existing), before);
    assert_eq!(std::fs::read(existing.join("index.json")).unwrap(), index_before);
}

#[test]
fn tampered_with_recomputed_digests_fails_the_mac() {
    let v = vectors();
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    let r = imgcrypt(&[
        "decrypt",
        "--key",
        &v.join("keys/rsa.pem").display().to_string(),
        &oci(&v.join("layouts/enc-jwe-tampered"), "v1"),
        &oci(&out, "v1"),
    ]);
    r.expect_code(5)
        .stderr_has(&["MAC", "tampered", "layer 0 (sha256:"]);
    assert!(!out.exists());
    // The untampered one decrypts to the Go source blob.
    imgcrypt(&[
        "decrypt",
        "--key",
        &v.join("keys/rsa.pem").display().to_string(),
        &oci(&v.join("layouts/enc-jwe"), "v1"),
        &oci(&out, "v1"),
    ])
    .ok();
    assert_eq!(layer_blobs(&out, "v1"), layer_blobs(&v.join("layouts/src"), "v1"));
}

#[test]
fn error_paths_have_their_own_codes() {
    let v = vectors();
    let t = tempfile::tempdir().unwrap();
    let enc = oci(&v.join("layouts/enc-jwe"), "v1");
    let out = oci(&t.path().join("out"), "v1");
    let pubkey = format!("jwe:{}", v.join("keys/rsa.pub.pem").display());

    // bad usage: 2
    imgcrypt(&[]).expect_code(2);
    imgcrypt(&["decrypt", &enc, &out])
        .expect_code(2)
        .stderr_has(&["needs a private key"]);
    imgcrypt(&["encrypt", "--recipient", "rsa.pub.pem", &enc, &out])
        .expect_code(2)
        .stderr_has(&["jwe:rsa.pub.pem"]);
    // missing key: 3 (a key directory without keys)
    let empty = t.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    imgcrypt(&["decrypt", "--key-dir", &empty.display().to_string(), &enc, &out])
        .expect_code(3)
        .stderr_has(&["missing key", "encrypted for jwe", "--key"]);
    // wrong key: 4 (the pkcs7 cert key is RSA but not a recipient)
    imgcrypt(&[
        "decrypt",
        "--key",
        &v.join("keys/cert.key.pem").display().to_string(),
        &enc,
        &out,
    ])
    .expect_code(4)
    .stderr_has(&["wrong key", "cert.key.pem", "layer 0 (sha256:"]);
    // unknown scheme: 6
    imgcrypt(&["encrypt", "--recipient", "tpm:key.pem", &enc, &out])
        .expect_code(6)
        .stderr_has(&["unknown scheme \"tpm\"", "jwe:"]);
    imgcrypt(&["encrypt", "--recipient", "x509:cert.pem", &enc, &out])
        .expect_code(6)
        .stderr_has(&[
            "unknown scheme \"x509\"",
            "jwe:, pkcs7:, pgp:",
            "provider:",
            "pgp:NAME-OR-EMAIL",
        ]);
    imgcrypt(&["encrypt", "--recipient", "provider:nope", &enc, &out])
        .expect_code(6)
        .stderr_has(&["OCICRYPT_KEYPROVIDER_CONFIG"]);
    // bad reference: 7
    imgcrypt(&["inspect", "dir:/tmp/x"])
        .expect_code(7)
        .stderr_has(&["transport \"dir\" is not supported"]);
    imgcrypt(&["inspect", &oci(&t.path().join("nope"), "v1")])
        .expect_code(7)
        .stderr_has(&["not an OCI image layout"]);
    imgcrypt(&["inspect", &oci(&v.join("layouts/enc-jwe"), "v9")])
        .expect_code(7)
        .stderr_has(&["no image tagged \"v9\""]);
    imgcrypt(&["encrypt", "--recipient", &pubkey, "docker://h.io/Bad:v1", &out]).expect_code(7);
    // key file: 10
    imgcrypt(&[
        "decrypt",
        "--key",
        &t.path().join("missing.pem").display().to_string(),
        &enc,
        &out,
    ])
    .expect_code(10)
    .stderr_has(&["missing.pem does not exist"]);
    imgcrypt(&[
        "encrypt",
        "--recipient",
        &format!("jwe:{}", v.join("keys/rsa.pem").display()),
        &enc,
        &out,
    ])
    .expect_code(10);
    // Already encrypted: a generic failure naming the layer.
    imgcrypt(&["encrypt", "--recipient", &pubkey, &enc, &out])
        .expect_code(1)
        .stderr_has(&["already encrypted", "hint: ", "recipients add"]);
    assert!(!t.path().join("out").exists());
    // Decrypting a plain image copies it, and says so.
    imgcrypt(&[
        "decrypt",
        "--key",
        &v.join("keys/rsa.pem").display().to_string(),
        &oci(&v.join("layouts/src"), "v1"),
        &oci(&t.path().join("plain"), "v1"),
    ])
    .ok()
    .stderr_has(&["no selected layer is encrypted"]);
    // JSON errors.
    let j = imgcrypt(&[
        "--json",
        "decrypt",
        "--key-dir",
        &empty.display().to_string(),
        &enc,
        &out,
    ])
    .expect_code(3)
    .json();
    assert_eq!(j["error"]["kind"], "missing-key");
    assert_eq!(j["error"]["exit_code"], 3);
}

#[test]
fn help_lists_exit_codes_and_aliases() {
    let r = imgcrypt(&["--help"]);
    r.ok().stdout_has(&[
        "EXIT CODES",
        "missing key",
        "wrong key",
        "tampered layer",
        "unknown scheme",
        "bad image reference",
        "registry authentication failed",
        "network failure",
    ]);
    imgcrypt(&["encrypt", "--help"])
        .ok()
        .stdout_has(&["--recipient", "--layer", "EXIT CODES"]);
    imgcrypt(&["recipients", "remove", "--help"])
        .ok()
        .stdout_has(&["decrypt and encrypt again", "EXIT CODES"]);
}

#[test]
fn keygen_files_modes_and_overwrite() {
    use std::os::unix::fs::PermissionsExt;
    let t = tempfile::tempdir().unwrap();
    for (ty, expect) in [("rsa-2048", "RSA"), ("ec-p384", "EC")] {
        let key = t.path().join(format!("k-{ty}.pem"));
        imgcrypt(&["keygen", "--type", ty, &key.display().to_string()]).ok();
        let pubkey = t.path().join(format!("k-{ty}.pub.pem"));
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(std::fs::read_to_string(&key)
            .unwrap()
            .contains("BEGIN PRIVATE KEY"));
        assert!(std::fs::read_to_string(&pubkey)
            .unwrap()
            .contains("BEGIN PUBLIC KEY"));
        if have_tool("openssl") {
            let o = std::process::Command::new("openssl")
                .args(["pkey", "-in", &key.display().to_string(), "-noout", "-text"])
                .output()
                .unwrap();
            assert!(o.status.success());
            assert!(String::from_utf8_lossy(&o.stdout).contains(if expect == "RSA" {
                "2048 bit"
            } else {
                "NIST CURVE: P-384"
            }));
        }
        let before = std::fs::read(&key).unwrap();
        imgcrypt(&["keygen", "--type", ty, &key.display().to_string()])
            .expect_code(2)
            .stderr_has(&["already exists", "--force"]);
        assert_eq!(std::fs::read(&key).unwrap(), before);
        imgcrypt(&["keygen", "--force", "--type", ty, &key.display().to_string()]).ok();
        assert_ne!(std::fs::read(&key).unwrap(), before);
    }
    let link = t.path().join("link.pem");
    std::os::unix::fs::symlink(t.path().join("target.pem"), &link).unwrap();
    imgcrypt(&["keygen", "--force", &link.display().to_string()])
        .expect_code(2)
        .stderr_has(&["symbolic link"]);
    imgcrypt(&[
        "keygen",
        "--type",
        "dsa",
        &t.path().join("d.pem").display().to_string(),
    ])
    .expect_code(2);
    // The generated keys work end to end.
    let src = t.path().join("src");
    two_layer_image(&src);
    let enc = t.path().join("enc");
    let pubkey = t.path().join("k-ec-p384.pub.pem");
    imgcrypt(&[
        "encrypt",
        "--recipient",
        &format!("jwe:{}", pubkey.display()),
        &oci(&src, "v1"),
        &oci(&enc, "v1"),
    ])
    .ok();
    let dec = t.path().join("dec");
    imgcrypt_env(
        &[
            "decrypt",
            "--key",
            &t.path().join("k-ec-p384.pem").display().to_string(),
            &oci(&enc, "v1"),
            &oci(&dec, "v1"),
        ],
        &[],
    )
    .ok();
    assert_eq!(layer_blobs(&dec, "v1"), layer_blobs(&src, "v1"));
}

#[test]
fn demo_runs_and_shows_each_step() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("demo");
    let r = imgcrypt(&["demo", &dir.display().to_string()]);
    r.ok().stdout_has(&[
        "$ imgcrypt keygen --type rsa-3072",
        "$ imgcrypt encrypt --recipient jwe:",
        "$ imgcrypt inspect oci:",
        "$ imgcrypt decrypt --key",
        "error: wrong key",
        "(exit code 4)",
        "nothing was written",
        "$ imgcrypt check --key",
        "identical bytes",
        "/app/secret.txt: The launch code is 0000.",
        "The contents match",
        "skopeo copy --decryption-key",
    ]);
    // The artefacts are real: the encrypted image is encrypted, the decrypted one equals the source.
    assert!(layer_types(&dir.join("encrypted"), "v1")
        .iter()
        .all(|(_, t)| t.ends_with("+gzip+encrypted")));
    assert_eq!(
        layer_blobs(&dir.join("decrypted"), "v1"),
        layer_blobs(&dir.join("image"), "v1")
    );
    // A non-empty directory is refused.
    imgcrypt(&["demo", &dir.display().to_string()])
        .expect_code(2)
        .stderr_has(&["not empty"]);
}

const PY_PROVIDER: &str = r#"#!/usr/bin/env python3
# A key provider speaking the ocicrypt keyprovider protocol over stdin/stdout.
import sys, json, base64
req = json.load(sys.stdin)
if req["op"] == "keywrap":
    opts = base64.b64decode(req["keywrapparams"]["optsdata"])
    param = base64.b64decode(req["keywrapparams"]["ec"]["Parameters"]["pyprov"][0])
    blob = json.dumps({"p": param.decode(), "o": base64.b64encode(bytes(b ^ 0x5a for b in opts)).decode()}).encode()
    print(json.dumps({"keywrapresults": {"annotation": base64.b64encode(blob).decode()}}))
else:
    blob = json.loads(base64.b64decode(req["keyunwrapparams"]["annotation"]))
    if blob["p"] != "team-key":
        sys.exit("unknown key " + blob["p"])
    opts = bytes(b ^ 0x5a for b in base64.b64decode(blob["o"]))
    print(json.dumps({"keyunwrapresults": {"optsdata": base64.b64encode(opts).decode()}}))
"#;

#[test]
fn key_provider_command() {
    use std::os::unix::fs::PermissionsExt;
    if !have_tool("python3") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let script = t.path().join("pyprov.py");
    std::fs::write(&script, PY_PROVIDER).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = t.path().join("keyprovider.json");
    std::fs::write(
        &cfg,
        serde_json::json!({"key-providers": {"pyprov": {"cmd": {"path": script.display().to_string(), "args": []}}}})
            .to_string(),
    )
    .unwrap();
    let cfg_s = cfg.display().to_string();
    let env = [("OCICRYPT_KEYPROVIDER_CONFIG", cfg_s.as_str())];
    let src = t.path().join("src");
    two_layer_image(&src);
    let enc = t.path().join("enc");
    imgcrypt_env(
        &[
            "encrypt",
            "--recipient",
            "provider:pyprov:team-key",
            &oci(&src, "v1"),
            &oci(&enc, "v1"),
        ],
        &env,
    )
    .ok();
    let j = imgcrypt(&["inspect", "--json", &oci(&enc, "v1")]).ok().json();
    assert_eq!(
        j["manifests"][0]["layers"][0]["schemes"][0]["scheme"],
        "provider.pyprov"
    );
    let dec = t.path().join("dec");
    imgcrypt_env(
        &[
            "decrypt",
            "--key",
            "provider:pyprov",
            &oci(&enc, "v1"),
            &oci(&dec, "v1"),
        ],
        &env,
    )
    .ok();
    assert_eq!(layer_blobs(&dec, "v1"), layer_blobs(&src, "v1"));
    // An unconfigured provider name is an unknown scheme; a JWE key alone has no key for the
    // layer's scheme.
    imgcrypt_env(
        &[
            "decrypt",
            "--key",
            "provider:other",
            &oci(&enc, "v1"),
            &oci(&dec, "v2"),
        ],
        &env,
    )
    .expect_code(6)
    .stderr_has(&["no key provider named \"other\"", "pyprov"]);
    imgcrypt(&[
        "decrypt",
        "--key",
        &vectors().join("keys/rsa.pem").display().to_string(),
        &oci(&enc, "v1"),
        &oci(&dec, "v2"),
    ])
    .expect_code(3)
    .stderr_has(&["missing key", "provider.pyprov", "OCICRYPT_KEYPROVIDER_CONFIG"]);
}

#[test]
fn progress_bars_only_on_a_terminal() {
    let v = vectors();
    let t = tempfile::tempdir().unwrap();
    let pubkey = format!("jwe:{}", v.join("keys/rsa.pub.pem").display());
    let src = oci(&v.join("layouts/src"), "v1");
    // Not a terminal: no progress output at all.
    let r = imgcrypt(&[
        "encrypt",
        "--recipient",
        &pubkey,
        &src,
        &oci(&t.path().join("a"), "v1"),
    ]);
    r.ok();
    assert!(
        r.stderr.is_empty(),
        "progress output without a terminal: {:?}",
        r.stderr
    );
    // On a terminal (util-linux `script` gives it a pty): a bar per layer with bytes and rate.
    if !have_tool("script") {
        return;
    }
    let cmd = format!(
        "{} encrypt --recipient {pubkey} {src} {}",
        env!("CARGO_BIN_EXE_imgcrypt"),
        oci(&t.path().join("b"), "v1")
    );
    let out = std::process::Command::new("timeout")
        .args(["120", "script", "-qec", &cmd, "/dev/null"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("encrypt 1c1b98c9551f"), "{text}");
    assert!(text.contains("185 B/185 B") && text.contains("B/s"), "{text}");
    // --quiet silences the bars on a terminal too.
    let out = std::process::Command::new("timeout")
        .args([
            "120",
            "script",
            "-qec",
            &format!("{cmd}-quiet --quiet"),
            "/dev/null",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("B/s"));
}

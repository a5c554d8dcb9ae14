//! `provider:keyprotect` recipients and keys, and `imgcrypt kp wrap/unwrap`, against the Key
//! Protect emulator (the documented HTTP API on loopback).

mod common;

use std::path::Path;

use common::{imgcrypt, imgcrypt_env, layer_blobs, oci};
use keyprotect_emulator::Emulator;
use testkit::image::{write_image, Compression, LayerSpec};
use testkit::tools::{have_tool, openssl_keypair};

/// A Key Protect emulator holding one root key named `name`, and its configuration written to
/// `dir` for `IMGCRYPT_KEYPROTECT_CONFIG`: (emulator, root key id, config path).
fn kp_with_root(dir: &Path, name: &str) -> (Emulator, String, String) {
    let emu = Emulator::start().unwrap();
    let root = emu.handle().create_root_key(name);
    let cfg = dir.join("kp.json");
    std::fs::write(&cfg, emu.config_json()).unwrap();
    (emu, root, cfg.display().to_string())
}

#[test]
fn keyprotect_recipient_and_key() {
    if !have_tool("openssl") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (emu, root, cfg_s) = kp_with_root(t.path(), "imgcrypt-test");
    let env = [("IMGCRYPT_KEYPROTECT_CONFIG", cfg_s.as_str())];
    let (priv_a, pub_a) = openssl_keypair(t.path(), "a", "p256");
    let src = t.path().join("src");
    write_image(&src, "v1", &[LayerSpec::random(40_000, 41, Compression::Gzip)]);
    let enc = t.path().join("enc");
    imgcrypt_env(
        &[
            "encrypt",
            "--recipient",
            &format!("provider:keyprotect:{root}"),
            "--recipient",
            &format!("jwe:{}", pub_a.display()),
            &oci(&src, "v1"),
            &oci(&enc, "v1"),
        ],
        &env,
    )
    .ok();
    let j = imgcrypt(&["inspect", "--json", &oci(&enc, "v1")]).ok().json();
    let schemes: Vec<&str> = j["manifests"][0]["layers"][0]["schemes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["scheme"].as_str().unwrap())
        .collect();
    assert_eq!(schemes, vec!["jwe", "provider.keyprotect"]);

    // Key Protect alone decrypts; so does the JWE key.
    let d1 = t.path().join("d1");
    imgcrypt_env(
        &[
            "decrypt",
            "--key",
            "provider:keyprotect",
            &oci(&enc, "v1"),
            &oci(&d1, "v1"),
        ],
        &env,
    )
    .ok();
    assert_eq!(layer_blobs(&d1, "v1"), layer_blobs(&src, "v1"));
    imgcrypt(&["check", "--key", &priv_a.display().to_string(), &oci(&enc, "v1")]).ok();

    // A disabled root key: the unwrap fails, naming Key Protect's answer; nothing written.
    emu.handle().disable_key(&root);
    let d2 = t.path().join("d2");
    imgcrypt_env(
        &[
            "decrypt",
            "--key",
            "provider:keyprotect",
            &oci(&enc, "v1"),
            &oci(&d2, "v1"),
        ],
        &env,
    )
    .expect_code(4)
    .stderr_has(&["provider.keyprotect", "disabled"]);
    assert!(!d2.exists());

    // Not configured: a usage error that says what to set.
    imgcrypt(&[
        "encrypt",
        "--recipient",
        &format!("provider:keyprotect:{root}"),
        &oci(&src, "v1"),
        &oci(&d2, "v1"),
    ])
    .expect_code(2)
    .stderr_has(&["Key Protect is not configured", "IMGCRYPT_KEYPROTECT_CONFIG"]);
}

#[test]
fn kp_wrap_unwrap_roundtrip() {
    if !have_tool("openssl") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (emu, root, cfg_s) = kp_with_root(t.path(), "kp-key");
    let env = [("IMGCRYPT_KEYPROTECT_CONFIG", cfg_s.as_str())];
    let (priv_a, _) = openssl_keypair(t.path(), "a", "rsa2048");
    let r = imgcrypt_env(
        &["kp", "wrap", "--root-key", &root, &priv_a.display().to_string()],
        &env,
    );
    r.ok();
    let ct = r.stdout.trim().to_owned();
    assert!(!ct.is_empty() && !ct.contains("PRIVATE KEY"));
    let back = imgcrypt_env(&["kp", "unwrap", "--root-key", &root, &ct], &env);
    back.ok();
    assert_eq!(back.stdout.as_bytes(), std::fs::read(&priv_a).unwrap());
    let out = t.path().join("keys/unwrapped.pem");
    imgcrypt_env(
        &[
            "kp",
            "unwrap",
            "--root-key",
            &root,
            "-o",
            &out.display().to_string(),
            &ct,
        ],
        &env,
    )
    .ok();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&priv_a).unwrap());
    // Refuses to overwrite.
    imgcrypt_env(
        &[
            "kp",
            "unwrap",
            "--root-key",
            &root,
            "-o",
            &out.display().to_string(),
            &ct,
        ],
        &env,
    )
    .expect_code(2)
    .stderr_has(&["already exists"]);
    // A wrong root key is refused by Key Protect.
    let other = emu.handle().create_root_key("other");
    imgcrypt_env(&["kp", "unwrap", "--root-key", &other, &ct], &env)
        .expect_code(1)
        .stderr_has(&["Key Protect"]);
}

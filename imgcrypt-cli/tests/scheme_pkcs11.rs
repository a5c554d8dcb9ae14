//! The PKCS#11 scheme through the real binary, against Debian's SoftHSM2 with keys made by
//! OpenSC's `pkcs11-tool` on a fresh token each run: pkcs11-tool decrypts our blobs on the
//! token, and we decrypt with the key it made; plus the failures (wrong PIN, missing token,
//! a module outside the policy, no policy, tampered blobs). skopeo 1.9.3 from Debian has no
//! PKCS#11 support compiled in: the last test pins that down.
#![cfg(feature = "pkcs11")]

mod common;

use std::path::Path;

use common::{blob_count, imgcrypt_env, layer_blobs, oci};
use testkit::image::{layer_annotation, set_layer_annotation, write_image, Compression, LayerSpec};
use testkit::softhsm::{ocicrypt_conf, SoftHsm};

const ANNOTATION: &str = "org.opencontainers.image.enc.keys.pkcs11";

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// The RSA-OAEP ciphertexts of the first layer's pkcs11 annotation, with their `hash`.
fn blobs(layout: &Path) -> Vec<(Vec<u8>, String)> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let ann = layer_annotation(layout, ANNOTATION).expect("a pkcs11 annotation");
    let mut out = Vec::new();
    for entry in ann.split(',') {
        let json: serde_json::Value = serde_json::from_slice(&b64.decode(entry).unwrap()).unwrap();
        assert_eq!(json["version"], 0);
        for r in json["recipients"].as_array().unwrap() {
            assert_eq!(r["version"], 0);
            out.push((
                b64.decode(r["blob"].as_str().unwrap()).unwrap(),
                r["hash"].as_str().unwrap_or_default().to_owned(),
            ));
        }
    }
    out
}

/// The private options JSON of the first layer of `src` (its digest is in them).
fn assert_options(plain: &[u8], src: &Path) {
    let opts: serde_json::Value = serde_json::from_slice(plain).expect("the options JSON");
    assert!(opts["symkey"].as_str().is_some_and(|k| k.len() == 44), "{opts}");
    assert!(opts["cipheroptions"]["nonce"].is_string(), "{opts}");
    assert_eq!(
        opts["digest"].as_str(),
        Some(layer_blobs(src, "v1")[0].as_str()),
        "{opts}"
    );
}

struct Setup {
    _t: tempfile::TempDir,
    d: std::path::PathBuf,
    hsm: SoftHsm,
    conf: String,
    src: std::path::PathBuf,
}

fn setup() -> Option<Setup> {
    if !SoftHsm::available() || !testkit::tools::have_tool("openssl") {
        return None;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path().to_owned();
    let hsm = SoftHsm::new(&d, "imgcrypt-test", "1234");
    hsm.keypair("01", "k1", 2048);
    hsm.export_public_pem("01", &d.join("pub.pem"));
    hsm.key_yaml(
        &d.join("key.yaml"),
        "01",
        "k1",
        "pin-value=1234&module-name=softhsm2",
    );
    let conf = d.join("ocicrypt.conf");
    ocicrypt_conf(&conf);
    let src = d.join("src");
    write_image(
        &src,
        "v1",
        &[
            LayerSpec::random(20_000, 21, Compression::Gzip),
            LayerSpec::random(3_000, 22, Compression::Gzip),
        ],
    );
    Some(Setup {
        conf: s(&conf),
        _t: t,
        d,
        hsm,
        src,
    })
}

#[test]
fn pkcs11_tool_decrypts_our_blobs_and_we_decrypt_with_its_key() {
    let Some(x) = setup() else {
        return;
    };
    let (d, hsm, src) = (&x.d, &x.hsm, &x.src);
    let env = [
        ("OCICRYPT_CONFIG", x.conf.as_str()),
        ("OCICRYPT_OAEP_HASHALG", "sha1"),
    ];

    // (a) software encryption for the public key pkcs11-tool exported; and encryption on the
    // token through the key file: pkcs11-tool decrypts each blob on the token.
    let soft = d.join("soft");
    imgcrypt_env(
        &[
            "encrypt",
            "--recipient",
            &format!("pkcs11:{}", s(&d.join("pub.pem"))),
            &oci(src, "v1"),
            &oci(&soft, "v1"),
        ],
        &env,
    )
    .ok();
    let on_token = d.join("on-token");
    imgcrypt_env(
        &[
            "encrypt",
            "--recipient",
            &format!("pkcs11:{}", s(&d.join("key.yaml"))),
            &oci(src, "v1"),
            &oci(&on_token, "v1"),
        ],
        &env,
    )
    .ok();
    for layout in [&soft, &on_token] {
        let b = blobs(layout);
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].1, "sha1");
        let plain = hsm
            .decrypt_oaep_sha1("01", &b[0].0, d)
            .expect("pkcs11-tool decrypts our blob on the token");
        assert_options(&plain, src);
    }

    // (b) we decrypt both with the private key pkcs11-tool made, on the token.
    for (i, layout) in [&soft, &on_token].iter().enumerate() {
        let dec = d.join(format!("dec{i}"));
        imgcrypt_env(
            &[
                "decrypt",
                "--key",
                &s(&d.join("key.yaml")),
                &oci(layout, "v1"),
                &oci(&dec, "v1"),
            ],
            &env,
        )
        .ok();
        assert_eq!(layer_blobs(&dec, "v1"), layer_blobs(src, "v1"));
    }
    // A key directory holding the key YAML (as a runtime's key directory would).
    let keydir = d.join("keydir");
    std::fs::create_dir(&keydir).unwrap();
    std::fs::copy(d.join("key.yaml"), keydir.join("key.yaml")).unwrap();
    let dec = d.join("dec-keydir");
    imgcrypt_env(
        &[
            "decrypt",
            "--key-dir",
            &s(&keydir),
            &oci(&soft, "v1"),
            &oci(&dec, "v1"),
        ],
        &env,
    )
    .ok();
    assert_eq!(layer_blobs(&dec, "v1"), layer_blobs(src, "v1"));
    // The PIN from --key FILE:PIN (URI without one), and from a pin-source file.
    hsm.key_yaml(&d.join("nopin.yaml"), "01", "k1", "module-name=softhsm2");
    let dec = d.join("dec-pin-arg");
    imgcrypt_env(
        &[
            "decrypt",
            "--key",
            &format!("{}:1234", s(&d.join("nopin.yaml"))),
            &oci(&soft, "v1"),
            &oci(&dec, "v1"),
        ],
        &env,
    )
    .ok();
    assert_eq!(layer_blobs(&dec, "v1"), layer_blobs(src, "v1"));
    std::fs::write(d.join("pin.txt"), "1234\n").unwrap();
    hsm.key_yaml(
        &d.join("pinfile.yaml"),
        "01",
        "k1",
        &format!("pin-source=file:{}&module-name=softhsm2", s(&d.join("pin.txt"))),
    );
    let dec = d.join("dec-pin-file");
    imgcrypt_env(
        &[
            "decrypt",
            "--key",
            &s(&d.join("pinfile.yaml")),
            &oci(&soft, "v1"),
            &oci(&dec, "v1"),
        ],
        &env,
    )
    .ok();
    assert_eq!(layer_blobs(&dec, "v1"), layer_blobs(src, "v1"));
    // No PIN at all: a key-file error that says where a PIN goes.
    let none = d.join("none-nopin");
    imgcrypt_env(
        &[
            "decrypt",
            "--key",
            &s(&d.join("nopin.yaml")),
            &oci(&soft, "v1"),
            &oci(&none, "v1"),
        ],
        &env,
    )
    .expect_code(10)
    .stderr_has(&["no PIN", "pin-value"]);
    assert_eq!(blob_count(&none), 0);

    // Go's default hash (SHA-256) on the token: SoftHSM refuses it, and the message says what
    // to set. Nothing is written.
    let none = d.join("none-sha256");
    imgcrypt_env(
        &[
            "encrypt",
            "--recipient",
            &format!("pkcs11:{}", s(&d.join("key.yaml"))),
            &oci(src, "v1"),
            &oci(&none, "v1"),
        ],
        &[("OCICRYPT_CONFIG", x.conf.as_str())],
    )
    .expect_code(1)
    .stderr_has(&["OCICRYPT_OAEP_HASHALG=sha1"]);
    assert_eq!(blob_count(&none), 0);
}

#[test]
fn pkcs11_failures_are_named_and_write_nothing() {
    let Some(x) = setup() else {
        return;
    };
    let (d, hsm, src) = (&x.d, &x.hsm, &x.src);
    let env = [
        ("OCICRYPT_CONFIG", x.conf.as_str()),
        ("OCICRYPT_OAEP_HASHALG", "sha1"),
    ];
    let enc = d.join("enc");
    imgcrypt_env(
        &[
            "encrypt",
            "--recipient",
            &format!("pkcs11:{}", s(&d.join("pub.pem"))),
            &oci(src, "v1"),
            &oci(&enc, "v1"),
        ],
        &env,
    )
    .ok();
    let key = s(&d.join("key.yaml"));
    let decrypt_fails = |name: &str, key: &str, env: &[(&str, &str)], code: i32, needles: &[&str]| {
        let out = d.join(name);
        let r = imgcrypt_env(
            &["decrypt", "--key", key, &oci(&enc, "v1"), &oci(&out, "v1")],
            env,
        );
        r.expect_code(code).stderr_has(needles);
        assert_eq!(blob_count(&out), 0, "{name}: something was written");
        r.stderr.clone()
    };

    // A wrong PIN: named, not quoted, exit 10 (a key that cannot be used).
    let err = decrypt_fails(
        "wrong-pin",
        &format!("{key}:98765"),
        &env,
        10,
        &["wrong PIN", "key.yaml"],
    );
    assert!(!err.contains("98765"), "{err}");
    hsm.key_yaml(
        &d.join("badpin.yaml"),
        "01",
        "k1",
        "pin-value=55555&module-name=softhsm2",
    );
    let err = decrypt_fails(
        "wrong-pin-uri",
        &s(&d.join("badpin.yaml")),
        &env,
        10,
        &["wrong PIN"],
    );
    assert!(!err.contains("55555"), "{err}");

    // A token that is not there.
    let other = SoftHsm {
        conf: hsm.conf.clone(),
        label: "no-such-token".into(),
        pin: "1234".into(),
    };
    other.key_yaml(
        &d.join("notoken.yaml"),
        "01",
        "k1",
        "pin-value=1234&module-name=softhsm2",
    );
    decrypt_fails(
        "no-token",
        &s(&d.join("notoken.yaml")),
        &env,
        10,
        &["no token no-such-token"],
    );
    // A key that is not on the token.
    hsm.key_yaml(
        &d.join("nokey.yaml"),
        "07",
        "k7",
        "pin-value=1234&module-name=softhsm2",
    );
    decrypt_fails(
        "no-key",
        &s(&d.join("nokey.yaml")),
        &env,
        10,
        &["no private key with"],
    );

    // The module outside the policy: refused, never loaded.
    let elsewhere = d.join("elsewhere.conf");
    std::fs::write(
        &elsewhere,
        "pkcs11:\n  module-directories:\n    - /usr/lib/softhsm/\n  allowed-module-paths:\n    - /opt/hsm/\n",
    )
    .unwrap();
    decrypt_fails(
        "refused-module",
        &key,
        &[("OCICRYPT_CONFIG", &s(&elsewhere))],
        10,
        &["/usr/lib/softhsm/libsofthsm2.so is not allowed", "ocicrypt.conf"],
    );
    // No policy at all (OCICRYPT_CONFIG names a missing file, no user config): no module.
    if !Path::new("/etc/ocicrypt.conf").exists() {
        let empty = d.join("empty-home");
        std::fs::create_dir(&empty).unwrap();
        decrypt_fails(
            "no-config",
            &key,
            &[
                ("OCICRYPT_CONFIG", &s(&d.join("missing.conf"))),
                ("HOME", &s(&empty)),
                ("XDG_CONFIG_HOME", &s(&empty)),
            ],
            10,
            &["no ocicrypt config file was found", "OCICRYPT_CONFIG=internal"],
        );
    }

    // Tampered blobs: a flipped ciphertext byte (the token's OAEP check fails: wrong key, 4)
    // and JSON that is not the blob format (malformed, 4), each only that annotation changed.
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let ann = layer_annotation(&enc, ANNOTATION).unwrap();
    let mut json: serde_json::Value = serde_json::from_slice(&b64.decode(&ann).unwrap()).unwrap();
    let mut ct = b64
        .decode(json["recipients"][0]["blob"].as_str().unwrap())
        .unwrap();
    ct[40] ^= 1;
    json["recipients"][0]["blob"] = b64.encode(&ct).into();
    let flipped = b64.encode(serde_json::to_vec(&json).unwrap());
    let keep = d.join("enc-orig");
    std::fs::rename(&enc, &keep).unwrap();
    for (name, value, needles) in [
        ("flipped", flipped, &["wrong key", "pkcs11"][..]),
        (
            "not-json",
            b64.encode(b"{\"version\":0,\"recipients\":"),
            &["malformed pkcs11 key blob"][..],
        ),
        (
            "version",
            b64.encode(br#"{"version":1,"recipients":[]}"#),
            &["version 1"][..],
        ),
    ] {
        let _ = std::fs::remove_dir_all(&enc);
        testkit::image::copy_layout(&keep, &enc);
        set_layer_annotation(&enc, ANNOTATION, &value);
        decrypt_fails(&format!("tampered-{name}"), &key, &env, 4, needles);
    }
}

/// skopeo 1.9.3 (Debian) is built without PKCS#11: it refuses `pkcs11:` recipients and cannot
/// decrypt with a key YAML. If a newer skopeo starts accepting them, this test fails and the
/// interop matrix (docs/format.md) gets a skopeo row.
#[test]
fn debian_skopeo_has_no_pkcs11() {
    if !testkit::tools::have_tool("skopeo") {
        return;
    }
    let Some(x) = setup() else {
        return;
    };
    let (d, src) = (&x.d, &x.src);
    let o = std::process::Command::new("skopeo")
        .args(["--insecure-policy", "copy", "--encryption-key"])
        .arg(format!("pkcs11:{}", s(&d.join("pub.pem"))))
        .args([oci(src, "v1"), oci(&d.join("sk"), "v1")])
        .env("OCICRYPT_CONFIG", &x.conf)
        .env("OCICRYPT_OAEP_HASHALG", "sha1")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Provided protocol not recognized"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The containerd decoder: a key YAML in `--decryption-keys-path` (with the policy from the
/// `pkcs11-config` parameter, as ctr-enc sends it), or in the `pkcs11-yamls` parameter; the
/// decrypted layer is the source layer. Without a policy no module is loaded.
#[test]
fn decoder_takes_key_yamls_from_the_directory_and_the_payload() {
    use ocicrypt_core::stream_processor::{run, DecoderOptions, Descriptor, OutputMode, Payload};
    let Some(x) = setup() else {
        return;
    };
    let (d, src) = (&x.d, &x.src);
    let enc = d.join("enc");
    imgcrypt_env(
        &[
            "encrypt",
            "--recipient",
            &format!("pkcs11:{}", s(&d.join("pub.pem"))),
            &oci(src, "v1"),
            &oci(&enc, "v1"),
        ],
        &[("OCICRYPT_OAEP_HASHALG", "sha1")],
    )
    .ok();
    let m = testkit::image::manifest(&enc, "v1");
    let layer = &m["layers"][0];
    let blob = testkit::image::read_blob(&enc, layer["digest"].as_str().unwrap());
    let descriptor: Descriptor = serde_json::from_value(layer.clone()).unwrap();
    let want = layer_blobs(src, "v1")[0].clone();
    let yaml = std::fs::read(d.join("key.yaml")).unwrap();
    let policy = std::fs::read(&x.conf).unwrap();
    // The bare policy YAML, as Go marshals Pkcs11Config into pkcs11-config.
    let policy = ocicrypt_core::pkcs11::Pkcs11Config::from_config_file_bytes(&policy, "conf")
        .unwrap()
        .to_yaml()
        .into_bytes();
    let keys = d.join("keys");
    std::fs::create_dir(&keys).unwrap();
    std::fs::write(keys.join("key.yaml"), &yaml).unwrap();
    let decode = |params: Vec<(&str, Vec<u8>)>, keys_path: Option<&Path>| {
        let mut payload = Payload {
            descriptor: descriptor.clone(),
            ..Payload::default()
        };
        for (k, v) in params {
            payload.decrypt_config.parameters.insert(k.into(), vec![v]);
        }
        let opts = DecoderOptions {
            keys_path: keys_path.map(Path::to_owned),
            output: OutputMode::Spool { dir: d.to_owned() },
        };
        let mut out = Vec::new();
        let r = run(
            &opts,
            Some(&descriptor.media_type),
            &payload.to_any_bytes(),
            Vec::new(),
            &blob[..],
            &mut out,
        );
        (out, r)
    };
    let (out, r) = decode(vec![("pkcs11-config", policy.clone())], Some(&keys));
    r.unwrap();
    assert_eq!(testkit::image::sha256(&out), want);
    let (out, r) = decode(vec![("pkcs11-config", policy), ("pkcs11-yamls", yaml)], None);
    r.unwrap();
    assert_eq!(testkit::image::sha256(&out), want);
    // An empty policy: the module is refused, the error says so, nothing is released.
    let (out, r) = decode(
        vec![("pkcs11-config", b"module-directories: []\n".to_vec())],
        Some(&keys),
    );
    let e = r.unwrap_err().one_line();
    assert!(e.contains("not found") || e.contains("not allowed"), "{e}");
    assert!(!e.contains("1234"), "{e}");
    assert!(out.is_empty());
}

//! `provider:NAME` recipients and keys served over gRPC by a key provider we did not write:
//! a Python provider on Google's `grpcio` (testkit::grpc), stubs generated from Go ocicrypt's
//! `keyprovider.proto` by `grpcio-tools`. Round trip through the real binary, then the failure
//! cases: wrong key, provider down, garbage and oversized answers, an error status.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{imgcrypt, imgcrypt_env, layer_blobs, oci};
use testkit::grpc::{python, Mode, PyProvider};
use testkit::image::{write_image, Compression, LayerSpec};

fn config(dir: &Path, file: &str, addr: &str) -> String {
    let p = dir.join(file);
    std::fs::write(
        &p,
        serde_json::json!({"key-providers": {"pyprov": {"grpc": addr}}}).to_string(),
    )
    .unwrap();
    p.display().to_string()
}

#[test]
fn grpc_provider_round_trip_and_failures() {
    let Some(py) = python() else { return };
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    write_image(
        &src,
        "v1",
        &[
            LayerSpec::random(200_000, 7, Compression::Gzip),
            LayerSpec::random(30_000, 8, Compression::None),
        ],
    );
    let mut good = PyProvider::start(&py, "pyprov", "secret-1", Mode::Ok);
    let cfg = config(t.path(), "kp.json", &good.addr());
    let env = [("OCICRYPT_KEYPROVIDER_CONFIG", cfg.as_str())];
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
    for l in j["manifests"][0]["layers"].as_array().unwrap() {
        assert_eq!(l["schemes"][0]["scheme"], "provider.pyprov", "{j}");
    }
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

    // Each failure: a clear message naming the provider and its address, nothing written.
    let fails = |cfg: &str, out: &str, needles: &[&str]| {
        let env = [("OCICRYPT_KEYPROVIDER_CONFIG", cfg)];
        let dst = t.path().join(out);
        let start = Instant::now();
        let r = imgcrypt_env(
            &[
                "decrypt",
                "--key",
                "provider:pyprov",
                &oci(&enc, "v1"),
                &oci(&dst, "v1"),
            ],
            &env,
        );
        assert_ne!(r.code, 0, "{r:?}");
        r.stderr_has(&["\"pyprov\""]).stderr_has(needles);
        assert!(start.elapsed() < Duration::from_secs(60), "{r:?}");
        assert!(
            !dst.join("index.json").exists(),
            "a failed decrypt wrote {}",
            dst.display()
        );
        assert!(!r.stderr.contains("secret-1"), "{r:?}");
        eprintln!("{out}: {}", r.stderr.trim());
        r
    };

    // Wrong key: another provider instance, another secret.
    let other = PyProvider::start(&py, "pyprov", "secret-2", Mode::Ok);
    let c = config(t.path(), "kp-other.json", &other.addr());
    fails(
        &c,
        "d-wrong",
        &[&other.addr(), "PermissionDenied", "did not wrap this layer"],
    );

    // An error status, garbage, an oversized answer.
    let p = PyProvider::start(&py, "pyprov", "secret-1", Mode::Error);
    let c = config(t.path(), "kp-err.json", &p.addr());
    fails(&c, "d-err", &[&p.addr(), "policy says no"]);
    let p = PyProvider::start(&py, "pyprov", "secret-1", Mode::Garbage);
    let c = config(t.path(), "kp-garbage.json", &p.addr());
    fails(
        &c,
        "d-garbage",
        &[&p.addr(), "invalid answer", "not the protocol JSON"],
    );
    let p = PyProvider::start(&py, "pyprov", "secret-1", Mode::Huge);
    let c = config(t.path(), "kp-huge.json", &p.addr());
    fails(&c, "d-huge", &[&p.addr(), "too large"]);

    // Provider down: refused at once, named with its address.
    let addr = good.addr();
    good.stop();
    fails(
        &cfg,
        "d-down",
        &["cannot reach key provider", &addr, "is the provider running"],
    );

    // Encrypting for a provider that is down writes nothing either.
    let r = imgcrypt_env(
        &[
            "encrypt",
            "--recipient",
            "provider:pyprov:k",
            &oci(&src, "v1"),
            &oci(&t.path().join("e2"), "v1"),
        ],
        &env,
    );
    assert_ne!(r.code, 0);
    r.stderr_has(&["cannot reach key provider \"pyprov\"", &addr]);
    assert!(!t.path().join("e2/index.json").exists());
}

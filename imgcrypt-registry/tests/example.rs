//! The `encrypt_registry_to_registry` example against Debian's docker-registry on 127.0.0.1:
//! what it pushes is encrypted, and skopeo decrypts it back to the source's layers.

#[path = "../examples/encrypt_registry_to_registry.rs"]
mod example;

use std::path::Path;

use imgcrypt_registry::RegistryOptions;
use testkit::image::{manifest, write_image, Compression, LayerSpec};
use testkit::registry::Registry;
use testkit::tools::{have_tool, openssl_keypair, skopeo, skopeo_ok};

fn oci(dir: &Path, tag: &str) -> String {
    format!("oci:{}:{tag}", dir.display())
}

fn layer_digests(layout: &Path, tag: &str) -> Vec<String> {
    manifest(layout, tag)["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["digest"].as_str().expect("digest").to_owned())
        .collect()
}

#[test]
fn example_encrypts_registry_to_registry_and_skopeo_decrypts() {
    if !(have_tool("skopeo") && have_tool("openssl") && have_tool("docker-registry")) {
        return;
    }
    let reg = Registry::start();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    // gzip layers: skopeo copies them byte for byte.
    write_image(
        &src,
        "v1",
        &[
            LayerSpec::random(200_000, 21, Compression::Gzip),
            LayerSpec::random(20_000, 22, Compression::Gzip),
        ],
    );
    let plain_ref = reg.image("app:v1");
    let enc_ref = reg.image("team/app:enc");
    skopeo_ok(&["copy", "--dest-tls-verify=false", &oci(&src, "v1"), &plain_ref]);
    let (private, public) = openssl_keypair(t.path(), "k", "p256");

    let rt = tokio::runtime::Runtime::new().unwrap();
    let opts = RegistryOptions::default().tls_verify(false);
    let report = rt
        .block_on(example::encrypt(&plain_ref, &enc_ref, &public, opts))
        .unwrap_or_else(|e| panic!("the example failed: {e}"));
    assert_eq!(report.layers.len(), 2);
    assert!(
        report.layers.iter().all(|l| l.action == "encrypted"),
        "{report:?}"
    );

    // The registry serves encrypted layers under the pushed tag.
    let raw = skopeo(&["inspect", "--raw", "--tls-verify=false", &enc_ref]);
    assert!(raw.status.success(), "{}", String::from_utf8_lossy(&raw.stderr));
    let m: serde_json::Value = serde_json::from_slice(&raw.stdout).unwrap();
    let layers = m["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    for l in layers {
        assert!(l["mediaType"].as_str().unwrap().ends_with("+encrypted"), "{l}");
        assert!(
            l["annotations"]["org.opencontainers.image.enc.keys.jwe"].is_string(),
            "{l}"
        );
    }

    // Without the key skopeo cannot decrypt; with it, the layers are the source's, byte for byte.
    let out = t.path().join("dec");
    let no_key = skopeo(&[
        "copy",
        "--src-tls-verify=false",
        "--decryption-key",
        &openssl_keypair(t.path(), "other", "p256").0.display().to_string(),
        &enc_ref,
        &oci(&t.path().join("nope"), "v1"),
    ]);
    assert!(
        !no_key.status.success(),
        "skopeo decrypted with a key that is no recipient"
    );
    skopeo_ok(&[
        "copy",
        "--src-tls-verify=false",
        "--decryption-key",
        &private.display().to_string(),
        &enc_ref,
        &oci(&out, "v1"),
    ]);
    assert_eq!(layer_digests(&out, "v1"), layer_digests(&src, "v1"));
}

//! HTTPS registries with a CA made in the test (Debian's docker-registry serving TLS): trust
//! through --cert-dir, SSL_CERT_FILE and certs.d; --tls-verify=false; client certificates;
//! skopeo on the other end.

mod common;

use std::path::{Path, PathBuf};

use common::{imgcrypt, imgcrypt_env, layer_blobs, oci};
use testkit::image::{write_image, Compression, LayerSpec};
use testkit::registry::{Registry, Serve};
use testkit::tools::{have_tool, openssl_keypair, skopeo_ok};

fn tools() -> bool {
    have_tool("skopeo") && have_tool("openssl") && have_tool("docker-registry")
}

fn src_image(dir: &Path) {
    write_image(
        dir,
        "v1",
        &[
            LayerSpec::random(200_000, 21, Compression::Gzip),
            LayerSpec::random(10_000, 22, Compression::Gzip),
        ],
    );
}

/// A certificate directory (containers-certs.d(5) layout) holding the test CA, and the client
/// pair when `client` is set.
fn cert_dir(reg: &Registry, at: &Path, client: bool) -> PathBuf {
    let tls = reg.tls.as_ref().expect("an HTTPS registry");
    std::fs::create_dir_all(at).unwrap();
    std::fs::copy(&tls.ca, at.join("ca.crt")).unwrap();
    if client {
        std::fs::copy(&tls.client_cert, at.join("client.cert")).unwrap();
        std::fs::copy(&tls.client_key, at.join("client.key")).unwrap();
    }
    at.to_owned()
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn https_registry_with_a_private_ca() {
    if !tools() {
        return;
    }
    let reg = Registry::start_serving(Serve::Https);
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    src_image(&src);
    let (key, public) = openssl_keypair(t.path(), "k", "p256");
    let recipient = format!("jwe:{}", public.display());
    let enc = reg.image("team/app:enc");
    let certs = cert_dir(&reg, &t.path().join("certs"), false);

    // Unknown CA: refused, saying which host, why, and what to do.
    imgcrypt(&["encrypt", "--recipient", &recipient, &oci(&src, "v1"), &enc])
        .expect_code(9)
        .stderr_has(&[
            &reg.addr,
            "unknown issuer",
            "--cert-dir",
            "certs.d",
            "SSL_CERT_FILE",
        ]);

    // Trusted through --dest-cert-dir: the encrypted push works.
    imgcrypt(&[
        "--dest-cert-dir",
        &s(&certs),
        "encrypt",
        "--recipient",
        &recipient,
        &oci(&src, "v1"),
        &enc,
    ])
    .ok();
    // --cert-dir for both sides, and --src-cert-dir for the source.
    imgcrypt(&["--cert-dir", &s(&certs), "inspect", &enc])
        .ok()
        .stdout_has(&["encrypted"]);
    imgcrypt(&["--src-cert-dir", &s(&certs), "inspect", &enc]).ok();
    // A --dest-cert-dir does not apply to the source.
    imgcrypt(&["--dest-cert-dir", &s(&certs), "inspect", &enc])
        .expect_code(9)
        .stderr_has(&["unknown issuer"]);

    // Trusted through the system store (SSL_CERT_FILE).
    imgcrypt_env(
        &["inspect", &enc],
        &[("SSL_CERT_FILE", &s(&reg.tls.as_ref().unwrap().ca))],
    )
    .ok();

    // Trusted through a per-registry certs.d directory ($HOME/.config/containers/certs.d/HOST:PORT).
    let home = t.path().join("home");
    cert_dir(
        &reg,
        &home.join(".config/containers/certs.d").join(&reg.addr),
        false,
    );
    imgcrypt_env(&["inspect", &enc], &[("HOME", &s(&home))]).ok();

    // --tls-verify=false reaches the HTTPS registry (HTTPS without verification, not plain HTTP).
    imgcrypt(&["--tls-verify=false", "inspect", &enc]).ok();

    // skopeo decrypts what we pushed over HTTPS.
    let out = t.path().join("skopeo");
    skopeo_ok(&[
        "copy",
        "--src-cert-dir",
        &s(&certs),
        "--decryption-key",
        &s(&key),
        &enc,
        &oci(&out, "v1"),
    ]);
    assert_eq!(layer_blobs(&out, "v1"), layer_blobs(&src, "v1"));

    // A malformed certificate directory is named.
    let bad = t.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    std::fs::write(bad.join("me.cert"), "x").unwrap();
    imgcrypt(&["--cert-dir", &s(&bad), "inspect", &enc])
        .expect_code(2)
        .stderr_has(&["missing key me.key", "me.cert"]);
}

#[test]
fn registry_requiring_client_certificates() {
    if !tools() {
        return;
    }
    let reg = Registry::start_serving(Serve::HttpsClientCert);
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    src_image(&src);
    let img = reg.image("team/app:v1");
    let ca_only = cert_dir(&reg, &t.path().join("ca-only"), false);
    let with_client = cert_dir(&reg, &t.path().join("with-client"), true);

    let (key, public) = openssl_keypair(t.path(), "k", "p256");
    skopeo_ok(&[
        "copy",
        "--dest-cert-dir",
        &s(&with_client),
        &oci(&src, "v1"),
        &img,
    ]);
    // Registry to registry, both sides with the client certificate, and back to a layout.
    let enc = reg.image("team/app:enc");
    imgcrypt(&[
        "--cert-dir",
        &s(&with_client),
        "encrypt",
        "--recipient",
        &format!("jwe:{}", public.display()),
        &img,
        &enc,
    ])
    .ok();
    let back = t.path().join("back");
    imgcrypt(&[
        "--cert-dir",
        &s(&with_client),
        "decrypt",
        "--key",
        &s(&key),
        &enc,
        &oci(&back, "v1"),
    ])
    .ok();
    assert_eq!(layer_blobs(&back, "v1"), layer_blobs(&src, "v1"));

    imgcrypt(&["--cert-dir", &s(&ca_only), "inspect", &img])
        .expect_code(9)
        .stderr_has(&[&reg.addr, "client certificate", "NAME.cert"]);
}

#[test]
fn plain_http_registry_named_when_https_is_expected() {
    if !tools() {
        return;
    }
    let reg = Registry::start();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    src_image(&src);
    let img = reg.image("team/app:v1");
    skopeo_ok(&["copy", "--dest-tls-verify=false", &oci(&src, "v1"), &img]);
    // --tls-verify=false: HTTPS fails, the registry speaks HTTP, so HTTP is used.
    imgcrypt(&["--tls-verify=false", "inspect", &img]).ok();
    imgcrypt(&["inspect", &img])
        .expect_code(9)
        .stderr_has(&[&reg.addr, "plain HTTP", "--tls-verify=false"]);
}

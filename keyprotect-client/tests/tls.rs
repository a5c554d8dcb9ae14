//! HTTPS to the emulator with a private CA made by the `openssl` CLI: trusted through the
//! client's CA bundle, refused (and not retried) without it.

use std::path::Path;

use keyprotect_client::{Client, ClientOptions, Error, TransportKind};
use keyprotect_emulator::{Emulator, EmulatorConfig, Op, TlsIdentity};
use testkit::tools::{have_tool, openssl};

fn make_ca_and_server_cert(dir: &Path) {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=imgcrypt test CA",
    ]);
    openssl(dir, &ca);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend(["-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=localhost"]);
    openssl(dir, &csr);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "srv.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "srv.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
}

#[tokio::test]
async fn https_with_a_custom_ca_bundle() {
    if !have_tool("openssl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    make_ca_and_server_cert(dir.path());
    let emu = Emulator::start_with(EmulatorConfig {
        tls: Some(TlsIdentity {
            cert_chain_pem: std::fs::read(dir.path().join("srv.pem")).unwrap(),
            key_pem: zeroize::Zeroizing::new(std::fs::read(dir.path().join("srv.key")).unwrap()),
        }),
        ..EmulatorConfig::default()
    })
    .unwrap();
    assert!(emu.base_url().starts_with("https://127.0.0.1:"));
    let root = emu.create_root_key("tls");

    let opts = ClientOptions::default()
        .with_ca_bundle_file(&dir.path().join("ca.pem"))
        .unwrap();
    let kp = Client::with_options(emu.config(), opts).unwrap();
    let w = kp.wrap(&root, b"over tls", None).await.unwrap();
    assert_eq!(
        &kp.unwrap(&root, &w.ciphertext, None).await.unwrap().plaintext[..],
        b"over tls"
    );

    // Without the CA: a TLS error, permanent, not retried.
    emu.reset_counts();
    let untrusting = Client::with_options(emu.config(), ClientOptions::default()).unwrap();
    let e = untrusting.wrap(&root, b"x", None).await.unwrap_err();
    assert!(
        matches!(
            e,
            Error::Transport {
                kind: TransportKind::Tls,
                attempts: 1,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(!e.is_transient());
    assert!(e.to_string().contains("KP_CA_BUNDLE"), "{e}");
    assert_eq!(emu.count(Op::Token), 0, "no request got through the handshake");
}

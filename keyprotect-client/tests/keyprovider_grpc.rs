//! `keyprotect-keyprovider --grpc`: the real binary serving Key Protect (the emulator on
//! loopback) as `keyprovider.KeyProviderService`, called by Google's Python `grpcio` client
//! (stubs from Go ocicrypt's proto via `grpcio-tools`) and by our own gRPC client through
//! `OCICRYPT_KEYPROVIDER_CONFIG`. Also: loopback-only binding, a unix socket, bounded request
//! size, a wrong root key, graceful SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keyprotect_client::wrapper::KeyProtectBlob;
use keyprotect_emulator::{Emulator, Op};
use ocicrypt_core::keyprovider::grpc::{GrpcProvider, WRAP_KEY_PATH};
use ocicrypt_core::keyprovider::{KeyProviderConfig, ProviderError};
use ocicrypt_core::options::decode_b64;
use testkit::grpc::{py_client, python};

const BIN: &str = env!("CARGO_BIN_EXE_keyprotect-keyprovider");

struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(kp_cfg: &Path, listen: &str) -> Self {
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(kp_cfg)
            .args(["--grpc", listen])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_default()
            .trim()
            .to_owned();
        assert!(
            !addr.is_empty(),
            "keyprotect-keyprovider --grpc printed no address"
        );
        Self { child, addr }
    }

    /// SIGTERM, then the exit status (bounded).
    fn terminate(&mut self) -> std::process::ExitStatus {
        let st = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < end, "no exit within 10 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn grpc_server_with_python_client_and_ours() {
    let emu = Emulator::start().unwrap();
    let root = emu.create_root_key("image-keys");
    let dir = tempfile::tempdir().unwrap();
    let kp_cfg = dir.path().join("kp.json");
    std::fs::write(&kp_cfg, emu.config_json()).unwrap();
    let mut srv = Server::start(&kp_cfg, "127.0.0.1:0");
    assert!(srv.addr.starts_with("127.0.0.1:"), "{}", srv.addr);

    if let Some(py) = python() {
        // (b) Google's grpcio client: WrapKey then UnWrapKey, options come back.
        let out = py_client(&py, &srv.addr, "keyprotect", &root);
        let so = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{so}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let blob = KeyProtectBlob::parse(&decode_b64(so.trim()).unwrap()).unwrap();
        assert_eq!(blob.root_key_id, root);
        assert_eq!(emu.successes(Op::Wrap), 1);
        assert_eq!(emu.successes(Op::Unwrap), 1);
        // A root key Key Protect does not have: the client sees the gRPC status.
        let out = py_client(
            &py,
            &srv.addr,
            "keyprotect",
            "00000000-0000-0000-0000-000000000000",
        );
        assert!(!out.status.success());
        let se = String::from_utf8_lossy(&out.stderr);
        assert!(se.contains("FAILED_PRECONDITION"), "{se}");
    }

    // Our client through OCICRYPT_KEYPROVIDER_CONFIG's format.
    let cfg = KeyProviderConfig::from_json(
        serde_json::json!({"key-providers": {"keyprotect": {"grpc": srv.addr}}})
            .to_string()
            .as_bytes(),
    )
    .unwrap();
    let w = cfg
        .wrapper("keyprotect", vec![root.clone().into_bytes()])
        .unwrap();
    let ann = ocicrypt_core::KeyWrapper::wrap_keys(&w, b"{\"symkey\":\"x\"}").unwrap();
    let u = cfg.unwrapper("keyprotect").unwrap();
    assert_eq!(
        &*ocicrypt_core::KeyUnwrapper::unwrap_key(&u, &ann).unwrap(),
        b"{\"symkey\":\"x\"}"
    );

    // Bounded request size: 2 MiB is refused by the server, which keeps serving.
    let big = GrpcProvider::new("keyprotect", srv.addr.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let e = rt
        .block_on(big.call(WRAP_KEY_PATH, &vec![b' '; 2 << 20]))
        .unwrap_err();
    assert!(matches!(e, ProviderError::Status { .. }), "{e}");
    assert!(e.to_string().contains("too large"), "{e}");
    // A wrong op on the method is refused without reaching Key Protect.
    let e = rt
        .block_on(big.call(
            WRAP_KEY_PATH,
            br#"{"op":"keyunwrap","keywrapparams":{},"keyunwrapparams":{}}"#,
        ))
        .unwrap_err();
    assert!(e.to_string().contains("InvalidArgument"), "{e}");
    assert_eq!(
        &*ocicrypt_core::KeyUnwrapper::unwrap_key(&u, &ann).unwrap(),
        b"{\"symkey\":\"x\"}"
    );

    drop(rt); // its channels' connection tasks end with it

    // Graceful SIGTERM: exit status 0, at once (no connection is left open).
    let t = Instant::now();
    let st = srv.terminate();
    assert!(st.success(), "{st}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

#[test]
fn grpc_server_binds_loopback_or_unix_only() {
    let emu = Emulator::start().unwrap();
    let root = emu.create_root_key("k");
    let dir = tempfile::tempdir().unwrap();
    let kp_cfg = dir.path().join("kp.json");
    std::fs::write(&kp_cfg, emu.config_json()).unwrap();
    let out = testkit::containerd::run_bounded(
        {
            let mut c = Command::new(BIN);
            c.arg("--config").arg(&kp_cfg).args(["--grpc", "0.0.0.0:0"]);
            c
        },
        Duration::from_secs(20),
    );
    assert!(!out.status.success());
    let se = String::from_utf8_lossy(&out.stderr);
    assert!(
        se.contains("not a loopback address") && se.contains("--allow-remote"),
        "{se}"
    );

    // A unix socket, 0600, removed on SIGTERM.
    use std::os::unix::fs::PermissionsExt;
    let sock = dir.path().join("kp.sock");
    let mut srv = Server::start(&kp_cfg, &format!("unix:{}", sock.display()));
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let cfg = KeyProviderConfig::from_json(
        serde_json::json!({"key-providers": {"kp": {"grpc": srv.addr}}})
            .to_string()
            .as_bytes(),
    )
    .unwrap();
    let w = cfg.wrapper("kp", vec![root.into_bytes()]).unwrap();
    let ann = ocicrypt_core::KeyWrapper::wrap_keys(&w, b"{}").unwrap();
    let u = cfg.unwrapper("kp").unwrap();
    assert_eq!(
        &*ocicrypt_core::KeyUnwrapper::unwrap_key(&u, &ann).unwrap(),
        b"{}"
    );
    assert!(srv.terminate().success());
    assert!(!sock.exists(), "the socket is removed on shutdown");
}

//! Google's Python gRPC (`grpcio` from PyPI, installed by `scripts/setup.d/grpc.sh`) as an
//! independent peer for the key-provider gRPC tests: a provider server and a client, both with
//! stubs generated from Go ocicrypt's `keyprovider.proto` by `grpcio-tools` at start-up.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const PROTO: &str = include_str!("../fixtures/grpc/keyprovider.proto");
const PROVIDER_PY: &str = include_str!("../fixtures/grpc/provider.py");
const CLIENT_PY: &str = include_str!("../fixtures/grpc/client.py");

/// The venv python with `grpcio` and `grpcio-tools` (`IMGCRYPT_GRPC_PYTHON`, else
/// `target/py-grpc/bin/python` of the workspace). `None` (with a skip note) when absent; panics
/// instead under `IMGCRYPT_REQUIRE_TOOLS=1`.
pub fn python() -> Option<PathBuf> {
    let p = std::env::var_os("IMGCRYPT_GRPC_PYTHON")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/py-grpc/bin/python"));
    let ok = Command::new(&p)
        .args(["-c", "import grpc, grpc_tools.protoc"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            !crate::tools::tools_required(),
            "Python grpcio is not available at {} but IMGCRYPT_REQUIRE_TOOLS=1 (run scripts/setup.d/grpc.sh)",
            p.display()
        );
        eprintln!("SKIP: Python grpcio is not available (run scripts/setup.d/grpc.sh)");
        return None;
    }
    Some(p)
}

/// Writes the fixtures (proto, provider.py, client.py) into `dir`.
fn write_fixtures(dir: &Path) {
    std::fs::write(dir.join("keyprovider.proto"), PROTO).unwrap();
    std::fs::write(dir.join("provider.py"), PROVIDER_PY).unwrap();
    std::fs::write(dir.join("client.py"), CLIENT_PY).unwrap();
}

/// How the Python provider answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Wraps and unwraps.
    Ok,
    /// Answers bytes that are not JSON.
    Garbage,
    /// Answers 3 MiB.
    Huge,
    /// Sleeps 30 s before answering.
    Slow,
    /// Answers PERMISSION_DENIED "policy says no".
    Error,
}

/// A running Python grpcio key provider on 127.0.0.1 (killed on drop).
pub struct PyProvider {
    child: Child,
    _dir: tempfile::TempDir,
    port: u16,
}

impl PyProvider {
    /// Starts the provider registered as `name`, wrapping under `secret`.
    pub fn start(python: &Path, name: &str, secret: &str, mode: Mode) -> Self {
        let dir = tempfile::tempdir().unwrap();
        write_fixtures(dir.path());
        let mode = format!("{mode:?}").to_lowercase();
        let mut child = Command::new(python)
            .arg(dir.path().join("provider.py"))
            .args(["--secret", secret, "--mode", &mode, "--name", name])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python provider starts");
        let (tx, rx) = std::sync::mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
        let Ok(port) = line.trim().parse::<u16>() else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the Python grpcio provider did not print its port (got {line:?})");
        };
        Self {
            child,
            _dir: dir,
            port,
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops it now.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PyProvider {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs the Python grpcio client against `addr`: a Go-shaped `WrapKey` for `name` with `param`,
/// then `UnWrapKey` of its annotation, checking the options come back. Killed after 60 s.
pub fn py_client(python: &Path, addr: &str, name: &str, param: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    write_fixtures(dir.path());
    let mut cmd = Command::new(python);
    cmd.arg(dir.path().join("client.py")).args([addr, name, param]);
    crate::containerd::run_bounded(cmd, Duration::from_secs(60))
}

/// Waits until something accepts TCP connections on `addr` (bounded).
pub fn wait_listening(addr: &str, limit: Duration) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if std::net::TcpStream::connect(addr).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

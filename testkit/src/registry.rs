//! Debian's `docker-registry` (distribution 2.8) started on 127.0.0.1 for a test.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A registry process on a free loopback port, stopped on drop.
#[derive(Debug)]
pub struct Registry {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    _dir: tempfile::TempDir,
}

/// The registry binary.
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl Registry {
    /// Starts a registry without authentication.
    ///
    /// # Panics
    /// When the binary is missing (install `docker-registry`) or does not come up in 15 s.
    pub fn start() -> Self {
        Self::start_inner(None)
    }

    /// Starts a registry that requires HTTP basic authentication with `user`/`password`.
    ///
    /// # Panics
    /// As [`start`](Self::start).
    pub fn start_with_auth(user: &str, password: &str) -> Self {
        Self::start_inner(Some((user, password)))
    }

    fn start_inner(auth: Option<(&str, &str)>) -> Self {
        assert!(
            std::path::Path::new(REGISTRY_BIN).exists(),
            "{REGISTRY_BIN} is missing: install Debian's docker-registry (scripts/test does)"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let auth_cfg = match auth {
            Some((u, p)) => {
                let hash = bcrypt::hash(p, 4).expect("bcrypt");
                let htpasswd: PathBuf = dir.path().join("htpasswd");
                std::fs::write(&htpasswd, format!("{u}:{hash}\n")).expect("write htpasswd");
                format!(
                    "auth:\n  htpasswd:\n    realm: test-realm\n    path: {}\n",
                    htpasswd.display()
                )
            }
            None => String::new(),
        };
        let config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n{auth_cfg}",
            dir.path().join("data").display()
        );
        let cfg_path = dir.path().join("config.yml");
        std::fs::write(&cfg_path, config).expect("write registry config");
        let log = std::fs::File::create(dir.path().join("registry.log")).expect("log file");
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&cfg_path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        let reg = Self {
            child,
            addr: addr.clone(),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(mut s) = TcpStream::connect(&addr) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = s.write_all(b"GET /v2/ HTTP/1.0\r\nHost: x\r\n\r\n");
                let mut buf = [0u8; 16];
                if s.read(&mut buf).map(|n| n > 0).unwrap_or(false) {
                    return reg;
                }
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not start on {addr}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `docker://127.0.0.1:PORT/<repo>` for skopeo and imgcrypt.
    pub fn image(&self, repo_and_tag: &str) -> String {
        format!("docker://{}/{repo_and_tag}", self.addr)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

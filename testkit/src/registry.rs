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
    /// Certificates, when the registry serves HTTPS.
    pub tls: Option<TlsFiles>,
    _dir: tempfile::TempDir,
}

/// The certificates of an HTTPS registry, made by the `openssl` CLI for one test.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The test CA (PEM), which signed the server and client certificates.
    pub ca: PathBuf,
    /// A client certificate signed by the CA (PEM).
    pub client_cert: PathBuf,
    /// Its key (PEM, PKCS#8).
    pub client_key: PathBuf,
}

/// How the registry serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serve {
    /// Plain HTTP.
    Http,
    /// HTTPS with a certificate for 127.0.0.1 from a CA made for the test.
    Https,
    /// HTTPS that also requires a client certificate signed by that CA.
    HttpsClientCert,
}

fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, in `dir`.
fn make_certs(dir: &std::path::Path) -> (TlsFiles, PathBuf, PathBuf) {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=imgcrypt test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(dir, &ca);
    for (name, usage, san) in [
        ("server", "serverAuth", "subjectAltName=IP:127.0.0.1"),
        ("client", "clientAuth", "subjectAltName=DNS:imgcrypt-test-client"),
    ] {
        let key = format!("{name}.key");
        let csr = format!("{name}.csr");
        let crt = format!("{name}.crt");
        let ext = format!("{name}.ext");
        std::fs::write(
            dir.join(&ext),
            format!("basicConstraints=CA:FALSE\nextendedKeyUsage={usage}\n{san}\n"),
        )
        .expect("write extensions");
        let mut req = vec!["req"];
        req.extend(ec);
        req.extend(["-keyout", &key, "-out", &csr, "-subj", "/CN=imgcrypt test"]);
        openssl(dir, &req);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &crt,
                "-extfile",
                &ext,
            ],
        );
    }
    (
        TlsFiles {
            ca: dir.join("ca.crt"),
            client_cert: dir.join("client.crt"),
            client_key: dir.join("client.key"),
        },
        dir.join("server.crt"),
        dir.join("server.key"),
    )
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
        Self::start_inner(None, Serve::Http)
    }

    /// Starts a registry serving HTTPS (see [`Serve`]); its certificates are in
    /// [`tls`](Self::tls).
    ///
    /// # Panics
    /// As [`start`](Self::start), or when `openssl` is missing.
    pub fn start_serving(serve: Serve) -> Self {
        Self::start_inner(None, serve)
    }

    /// Starts a registry that requires HTTP basic authentication with `user`/`password`.
    ///
    /// # Panics
    /// As [`start`](Self::start).
    pub fn start_with_auth(user: &str, password: &str) -> Self {
        Self::start_inner(Some((user, password)), Serve::Http)
    }

    fn start_inner(auth: Option<(&str, &str)>, serve: Serve) -> Self {
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
        let (tls, tls_cfg) = if serve == Serve::Http {
            (None, String::new())
        } else {
            let (files, crt, key) = make_certs(dir.path());
            let mut cfg = format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                crt.display(),
                key.display()
            );
            if serve == Serve::HttpsClientCert {
                cfg.push_str(&format!("    clientcas:\n      - {}\n", files.ca.display()));
            }
            (Some(files), cfg)
        };
        let config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n{tls_cfg}{auth_cfg}",
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
            tls,
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

    /// The registry's storage root (`docker/registry/v2/repositories/REPO/_uploads/` holds
    /// the open uploads).
    pub fn storage(&self) -> PathBuf {
        self._dir.path().join("data")
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

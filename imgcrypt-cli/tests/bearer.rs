//! The Bearer token flow against Debian's docker-registry configured for token auth, with a
//! token server stand-in on loopback that issues JWTs (RS256, x5c) the registry verifies.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use common::{imgcrypt, layer_blobs, oci};
use testkit::image::{write_image, Compression, LayerSpec};
use testkit::tools::{have_tool, openssl, openssl_keypair};

const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

fn b64u(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Signs a registry token for `scope` (`repository:NAME:ACTIONS`) with the key in `dir`.
fn token(dir: &Path, scope: &str) -> String {
    let cert_pem = std::fs::read_to_string(dir.join("tok.crt")).unwrap();
    let der_b64: String = cert_pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [der_b64]});
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let mut access = Vec::new();
    let parts: Vec<&str> = scope.splitn(3, ':').collect();
    if parts.len() == 3 {
        access.push(serde_json::json!({"type": parts[0], "name": parts[1], "actions": parts[2].split(',').collect::<Vec<_>>()}));
    }
    let claims = serde_json::json!({
        "iss": "imgcrypt-test-issuer", "sub": "alice", "aud": "imgcrypt-test",
        "exp": now + 600, "nbf": now - 10, "iat": now, "jti": format!("{now}-{}", rand_id()),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        b64u(header.to_string().as_bytes()),
        b64u(claims.to_string().as_bytes())
    );
    let input = dir.join(format!("in-{}", rand_id()));
    std::fs::write(&input, &signing_input).unwrap();
    let out = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(dir.join("tok.key"))
        .arg(&input)
        .output()
        .unwrap();
    assert!(out.status.success());
    format!("{signing_input}.{}", b64u(&out.stdout))
}

fn rand_id() -> u64 {
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::SeqCst) as u64
}

/// A token server: GET /token?service=…&scope=… with Basic alice:s3cret → {"token": …}.
fn serve_tokens(listener: TcpListener, dir: std::path::PathBuf, issued: Arc<AtomicUsize>) {
    listener.set_nonblocking(false).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { break };
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut reader = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let mut auth_ok = false;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
                let lower = h.to_ascii_lowercase();
                if lower.starts_with("authorization:") {
                    auth_ok = h.trim().ends_with(&format!(
                        "Basic {}",
                        base64::engine::general_purpose::STANDARD.encode("alice:s3cret")
                    ));
                }
            }
            let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
            let scope = path
                .split(['?', '&'])
                .find_map(|kv| kv.strip_prefix("scope="))
                .map(|v| v.replace("%3A", ":").replace("%2C", ",").replace("%2F", "/"))
                .unwrap_or_default();
            let (status, body) = if auth_ok {
                issued.fetch_add(1, Ordering::SeqCst);
                (
                    "200 OK",
                    serde_json::json!({"token": token(&dir, &scope)}).to_string(),
                )
            } else {
                ("401 Unauthorized", r#"{"details":"bad credentials"}"#.to_owned())
            };
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
}

struct TokenRegistry {
    child: Child,
    addr: String,
}

impl Drop for TokenRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_registry(dir: &Path, realm: &str) -> TokenRegistry {
    let addr = format!("127.0.0.1:{}", free_port());
    let cfg = format!(
        "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\nauth:\n  token:\n    realm: {realm}\n    service: imgcrypt-test\n    issuer: imgcrypt-test-issuer\n    rootcertbundle: {}\n",
        dir.join("data").display(),
        dir.join("tok.crt").display()
    );
    std::fs::write(dir.join("config.yml"), cfg).unwrap();
    let log = std::fs::File::create(dir.join("registry.log")).unwrap();
    let child = Command::new(REGISTRY_BIN)
        .arg("serve")
        .arg(dir.join("config.yml"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("docker-registry starts");
    let reg = TokenRegistry {
        child,
        addr: addr.clone(),
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect(&addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "docker-registry did not start on {addr}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    reg
}

#[test]
fn bearer_token_flow() {
    if !(have_tool("openssl") && have_tool("docker-registry")) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    openssl(
        t.path(),
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=imgcrypt-test-token",
            "-days",
            "1",
            "-keyout",
            "tok.key",
            "-out",
            "tok.crt",
        ],
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let realm = format!("http://{}/token", listener.local_addr().unwrap());
    let issued = Arc::new(AtomicUsize::new(0));
    serve_tokens(listener, t.path().to_owned(), Arc::clone(&issued));
    let reg = start_registry(t.path(), &realm);

    let (priv_a, pub_a) = openssl_keypair(t.path(), "a", "p256");
    let src = t.path().join("src");
    write_image(&src, "v1", &[LayerSpec::random(20_000, 51, Compression::Gzip)]);
    let image = format!("docker://{}/team/app:v1", reg.addr);

    // No credentials: the token server refuses, exit 8.
    imgcrypt(&[
        "--tls-verify=false",
        "encrypt",
        "--recipient",
        &format!("jwe:{}", pub_a.display()),
        &oci(&src, "v1"),
        &image,
    ])
    .expect_code(8)
    .stderr_has(&["authentication failed"]);
    // With credentials: a token, then push, pull and decrypt.
    imgcrypt(&[
        "--tls-verify=false",
        "--creds",
        "alice:s3cret",
        "encrypt",
        "--recipient",
        &format!("jwe:{}", pub_a.display()),
        &oci(&src, "v1"),
        &image,
    ])
    .ok();
    assert!(issued.load(Ordering::SeqCst) >= 1, "no token was issued");
    let out = t.path().join("out");
    imgcrypt(&[
        "--tls-verify=false",
        "--creds",
        "alice:s3cret",
        "decrypt",
        "--key",
        &priv_a.display().to_string(),
        &image,
        &oci(&out, "v1"),
    ])
    .ok();
    assert_eq!(layer_blobs(&out, "v1"), layer_blobs(&src, "v1"));
}

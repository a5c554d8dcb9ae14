//! The real binary against hostile registries: small HTTP servers on loopback that send
//! credentials elsewhere, endless bodies, and bytes one at a time (issue 15, items 4-6).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{imgcrypt, oci};
use testkit::image::{write_image, Compression, LayerSpec};
use testkit::tools::{have_tool, openssl_keypair};

/// One request as a server saw it.
#[derive(Debug, Clone)]
pub struct Req {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body_len: usize,
}

impl Req {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

type Handler = dyn Fn(&Req, &mut TcpStream) + Send + Sync;

/// A tiny HTTP/1.1 server: every connection serves one request, then closes. Records requests.
pub struct Server {
    pub port: u16,
    pub seen: Arc<Mutex<Vec<Req>>>,
}

impl Server {
    pub fn start(handler: impl Fn(&Req, &mut TcpStream) + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        let s2 = Arc::clone(&seen);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut stream) = conn else { break };
                let handler = Arc::clone(&handler);
                let seen = Arc::clone(&s2);
                std::thread::spawn(move || {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                    let Some(req) = read_request(&mut stream) else {
                        return;
                    };
                    seen.lock().unwrap().push(req.clone());
                    handler(&req, &mut stream);
                    let _ = stream.flush();
                });
            }
        });
        Self { port, seen }
    }

    pub fn requests(&self) -> Vec<Req> {
        self.seen.lock().unwrap().clone()
    }
}

fn read_request(stream: &mut TcpStream) -> Option<Req> {
    let mut r = BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let path = parts.next()?.to_owned();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    let mut req = Req {
        method,
        path,
        headers,
        body_len: 0,
    };
    if let Some(n) = req.header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        let mut b = vec![0u8; n];
        r.read_exact(&mut b).ok()?;
        req.body_len = n;
    } else if req
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).ok()?;
            let n = usize::from_str_radix(size.trim().split(';').next()?, 16).ok()?;
            let mut b = vec![0u8; n + 2];
            r.read_exact(&mut b).ok()?;
            req.body_len += n;
            if n == 0 {
                break;
            }
        }
    }
    Some(req)
}

fn respond(s: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]) {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let _ = s.write_all(out.as_bytes());
    let _ = s.write_all(body);
}

/// Sends `status` with a chunked body that never ends (until the client goes away or 60 s).
fn endless(s: &mut TcpStream, status: &str, headers: &[(&str, String)]) {
    let mut out = format!("HTTP/1.1 {status}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n");
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    if s.write_all(out.as_bytes()).is_err() {
        return;
    }
    let chunk = vec![b'a'; 1 << 16];
    let head = format!("{:x}\r\n", chunk.len());
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if s.write_all(head.as_bytes()).is_err()
            || s.write_all(&chunk).is_err()
            || s.write_all(b"\r\n").is_err()
        {
            return;
        }
    }
}

/// A run of the binary with its own deadline; `None` when it had to be killed.
fn run_limited(args: &[&str], limit: Duration) -> Option<common::Run> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_imgcrypt"));
    cmd.args(args);
    common::run_limited(cmd, &[], limit)
}

fn small_image(dir: &Path) {
    write_image(dir, "v1", &[LayerSpec::random(20_000, 3, Compression::Gzip)]);
}

/// Item 4: an upload `Location` on another port gets no credentials, and a relative `Location`
/// in that second server's answer is resolved against the second server.
#[test]
fn credentials_go_only_to_the_registry_and_locations_resolve_where_they_came_from() {
    if !have_tool("openssl") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    small_image(&src);
    let (_, public) = openssl_keypair(t.path(), "k", "p256");
    let basic = "Basic dTpzM2NyZXQ="; // u:s3cret

    // The second server: takes the upload wherever it is sent, answers PATCH with a relative
    // Location, commits on PUT.
    let other = Server::start(|req, s| match req.method.as_str() {
        "PATCH" => respond(s, "202 Accepted", &[("Location", "/elsewhere/next".into())], b""),
        "PUT" if req.path.starts_with("/elsewhere/next?digest=") => respond(s, "201 Created", &[], b""),
        _ => respond(s, "404 Not Found", &[], b""),
    });
    let other_port = other.port;
    let registry = Server::start(move |req, s| {
        if req.header("authorization") != Some(basic) {
            return respond(
                s,
                "401 Unauthorized",
                &[("WWW-Authenticate", "Basic realm=\"test\"".into())],
                b"",
            );
        }
        match (req.method.as_str(), req.path.as_str()) {
            ("HEAD", _) => respond(s, "404 Not Found", &[], b""),
            ("POST", "/v2/team/app/blobs/uploads/") => respond(
                s,
                "202 Accepted",
                &[(
                    "Location",
                    format!("http://127.0.0.1:{other_port}/elsewhere/upload"),
                )],
                b"",
            ),
            ("PUT", p) if p.starts_with("/v2/team/app/manifests/") => respond(s, "201 Created", &[], b""),
            _ => respond(s, "500 Internal Server Error", &[], b"wrong place"),
        }
    });

    let r = imgcrypt(&[
        "--tls-verify=false",
        "--dest-creds",
        "u:s3cret",
        "encrypt",
        "--recipient",
        &format!("jwe:{}", public.display()),
        &oci(&src, "v1"),
        &format!("docker://127.0.0.1:{}/team/app:enc", registry.port),
    ]);
    let seen_other = other.requests();
    let seen_reg = registry.requests();
    assert!(
        !seen_other.is_empty(),
        "the upload went to the second server: {r:?}"
    );
    for q in &seen_other {
        assert_eq!(
            q.header("authorization"),
            None,
            "{} {} on the second server carried credentials",
            q.method,
            q.path
        );
    }
    assert!(
        seen_other
            .iter()
            .any(|q| q.method == "PUT" && q.path.starts_with("/elsewhere/next?digest=")),
        "the relative Location was resolved against the second server: {seen_other:?}"
    );
    assert!(
        seen_reg.iter().all(|q| !q.path.starts_with("/elsewhere")),
        "nothing of the upload went back to the registry: {seen_reg:?}"
    );
    r.ok();
}

/// Item 5: an error body and a token body that never end are cut off; the message is short.
#[test]
fn endless_error_and_token_bodies_are_bounded() {
    let errors = Server::start(|_, s| endless(s, "400 Bad Request", &[]));
    let started = Instant::now();
    let r = run_limited(
        &[
            "--tls-verify=false",
            "inspect",
            &format!("docker://127.0.0.1:{}/a/b:t", errors.port),
        ],
        Duration::from_secs(30),
    )
    .expect("inspect against an endless error body finishes");
    assert_ne!(r.code, 0);
    assert!(r.stderr.len() < 2000, "short message: {}", r.stderr);
    assert!(r.stderr.contains("400"), "{}", r.stderr);
    assert!(started.elapsed() < Duration::from_secs(20));

    let tokens = Arc::new(Mutex::new(0u16));
    let tokens2 = Arc::clone(&tokens);
    let reg = Server::start(move |req, s| {
        if req.path.starts_with("/token") {
            return endless(s, "200 OK", &[("Content-Type", "application/json".into())]);
        }
        let port = *tokens2.lock().unwrap();
        respond(
            s,
            "401 Unauthorized",
            &[(
                "WWW-Authenticate",
                format!("Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"x\""),
            )],
            b"",
        );
    });
    *tokens.lock().unwrap() = reg.port;
    let r = run_limited(
        &[
            "--tls-verify=false",
            "inspect",
            &format!("docker://127.0.0.1:{}/a/b:t", reg.port),
        ],
        Duration::from_secs(30),
    )
    .expect("inspect against an endless token body finishes");
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("larger than"), "{}", r.stderr);
}

/// Item 6: a registry sending one byte at a time fails at the stall timeout.
#[test]
fn a_trickling_registry_fails_at_the_stall_timeout() {
    let reg = Server::start(|_, s| {
        let _ = s.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nContent-Length: 100000\r\nConnection: close\r\n\r\n",
        );
        for _ in 0..600 {
            if s.write_all(b" ").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let started = Instant::now();
    let r = run_limited(
        &[
            "--tls-verify=false",
            "--stall-timeout",
            "1.5",
            "inspect",
            &format!("docker://127.0.0.1:{}/a/b:t", reg.port),
        ],
        Duration::from_secs(40),
    )
    .expect("inspect against a trickling registry finishes");
    r.expect_code(9)
        .stderr_has(&["made no progress", "--stall-timeout"]);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
}

/// A registry serving the image `r:v1` of `layout` (its layer blobs slowly, 32 KiB every 50 ms)
/// and accepting pushes to any other repository (uploads numbered; nothing stored).
fn slow_source_and_sink(layout: &Path) -> Server {
    let m = testkit::image::manifest(layout, "v1");
    let mbytes = serde_json::to_vec(&m).unwrap();
    let config = m["config"]["digest"].as_str().unwrap().to_owned();
    let layers: Vec<String> = m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_owned())
        .collect();
    let layout = layout.to_path_buf();
    let next = Arc::new(Mutex::new(0u32));
    Server::start(move |req, s| {
        let p = req.path.as_str();
        match req.method.as_str() {
            "GET" if p == "/v2/r/manifests/v1" => respond(
                s,
                "200 OK",
                &[(
                    "Content-Type",
                    "application/vnd.oci.image.manifest.v1+json".into(),
                )],
                &mbytes,
            ),
            "GET" if p.starts_with("/v2/r/blobs/") => {
                let d = p.trim_start_matches("/v2/r/blobs/");
                let bytes = testkit::image::read_blob(&layout, d);
                if d == config || !layers.iter().any(|l| l == d) {
                    return respond(s, "200 OK", &[], &bytes);
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    bytes.len()
                );
                let _ = s.write_all(head.as_bytes());
                for c in bytes.chunks(32 << 10) {
                    if s.write_all(c).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            "HEAD" => respond(s, "404 Not Found", &[], b""),
            "POST" => {
                let mut n = next.lock().unwrap();
                *n += 1;
                respond(s, "202 Accepted", &[("Location", format!("/up/{n}"))], b"");
            }
            "PATCH" => respond(s, "202 Accepted", &[("Location", p.to_owned())], b""),
            "PUT" | "DELETE" => respond(s, "201 Created", &[], b""),
            _ => respond(s, "404 Not Found", &[], b""),
        }
    })
}

fn spawn(args: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_imgcrypt"))
        .args(args)
        .env("HOME", std::env::temp_dir())
        .env_remove("REGISTRY_AUTH_FILE")
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("DOCKER_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn signal(child: &std::process::Child, sig: &str) {
    assert!(Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success());
}

fn wait_bounded(mut child: std::process::Child) -> (i32, String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            return (st.code().unwrap_or(-1), err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("imgcrypt did not exit within 30 s of the signal");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Item 7: SIGTERM mid-encrypt into a new layout removes the temporary file and the directory
/// the run created, and exits 143; SIGINT mid-push deletes the open upload and exits 130.
#[test]
fn signals_abort_like_an_error() {
    if !have_tool("openssl") || !have_tool("kill") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    // 4 MiB, served at ~640 KiB/s: the run is mid-layer for seconds.
    write_image(&src, "v1", &[LayerSpec::random(4 << 20, 9, Compression::None)]);
    let (_, public) = openssl_keypair(t.path(), "k", "p256");
    let recipient = format!("jwe:{}", public.display());
    let reg = slow_source_and_sink(&src);
    let source = format!("docker://127.0.0.1:{}/r:v1", reg.port);

    let dst = t.path().join("new-layout");
    let child = spawn(&[
        "--tls-verify=false",
        "encrypt",
        "--recipient",
        &recipient,
        &source,
        &oci(&dst, "v1"),
    ]);
    wait_for("a temporary blob file in the new layout", || {
        std::fs::read_dir(dst.join("blobs/sha256"))
            .map(|d| {
                d.filter_map(Result::ok).any(|e| {
                    e.file_name().to_string_lossy().starts_with(".tmp-")
                        && e.metadata().is_ok_and(|m| m.len() > 0)
                })
            })
            .unwrap_or(false)
    });
    signal(&child, "-TERM");
    let (code, err) = wait_bounded(child);
    assert_eq!(code, 143, "{err}");
    assert!(err.contains("SIGTERM"), "{err}");
    assert!(!dst.exists(), "the layout directory the run created is removed");

    let before = reg.requests().len();
    let child = spawn(&[
        "--tls-verify=false",
        "encrypt",
        "--recipient",
        &recipient,
        &source,
        &format!("docker://127.0.0.1:{}/out:enc", reg.port),
    ]);
    // The layer upload is open once the slow layer is being read.
    wait_for("the layer blob being read", || {
        reg.requests()[before..]
            .iter()
            .filter(|q| q.method == "POST")
            .count()
            >= 2
    });
    std::thread::sleep(Duration::from_millis(300));
    signal(&child, "-INT");
    let (code, err) = wait_bounded(child);
    assert_eq!(code, 130, "{err}");
    let after = reg.requests()[before..].to_vec();
    assert!(
        after
            .iter()
            .any(|q| q.method == "DELETE" && q.path.starts_with("/up/")),
        "the open upload was deleted: {after:?}"
    );
    assert!(
        !after
            .iter()
            .any(|q| q.method == "PUT" && q.path.starts_with("/v2/out/manifests/")),
        "nothing was tagged"
    );
}

/// Open uploads of `repo` in a docker-registry's storage, with the bytes each received (a
/// deleted upload loses its `data`; docker-registry leaves an empty `hashstates` directory).
fn open_uploads(reg: &testkit::registry::Registry, repo: &str) -> Vec<u64> {
    let dir = reg
        .storage()
        .join("docker/registry/v2/repositories")
        .join(repo)
        .join("_uploads");
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| std::fs::metadata(e.path().join("data")).map(|m| m.len()).ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Item 7 against Debian's docker-registry: SIGTERM mid-push deletes the open upload (nothing
/// left in the registry's `_uploads`) and pushes no tag.
#[test]
fn sigterm_mid_push_to_docker_registry_deletes_the_upload() {
    if !have_tool("openssl") || !have_tool("kill") || !have_tool("docker-registry") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    write_image(&src, "v1", &[LayerSpec::random(4 << 20, 10, Compression::None)]);
    let (_, public) = openssl_keypair(t.path(), "k", "p256");
    let slow = slow_source_and_sink(&src);
    let reg = testkit::registry::Registry::start();
    let dest = reg.image("out:enc");
    let child = spawn(&[
        "--tls-verify=false",
        "encrypt",
        "--recipient",
        &format!("jwe:{}", public.display()),
        &format!("docker://127.0.0.1:{}/r:v1", slow.port),
        &dest,
    ]);
    wait_for("an open layer upload in the registry", || {
        open_uploads(&reg, "out").iter().any(|&n| n > 64 << 10)
    });
    signal(&child, "-TERM");
    let (code, err) = wait_bounded(child);
    assert_eq!(code, 143, "{err}");
    assert_eq!(
        open_uploads(&reg, "out"),
        Vec::<u64>::new(),
        "the upload was deleted: {err}"
    );
    imgcrypt(&["--tls-verify=false", "inspect", &dest]).expect_code(7);
}

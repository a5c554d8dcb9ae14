//! The Key Protect client against a hostile Key Protect / IAM server on a real loopback socket:
//! answers that stream forever, an absurd token lifetime, a server (or proxy) that echoes the
//! request into its error text, unusable wrap/unwrap results, and failures after a create.
//! Nothing may exhaust memory or time, panic, be accepted, or print a secret.

use std::convert::Infallible;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use keyprotect_client::wrapper::KeyProtectBlob;
use keyprotect_client::{Client, ClientOptions, Error, KeyProtectConfig, KeyProtectUnwrapper};
use ocicrypt_core::keywrap::error_chain;
use ocicrypt_core::AsyncKeyUnwrapper;

/// `+` and `/` make its form encoding differ from it, so both forms must be scrubbed.
const APIKEY: &str = "hostile+apikey/0123456789abcdefSECRET";
const BEARER: &str = "bearer-SECRET-token-abcdefghijklmnop";
const PLAINTEXT: &[u8] = b"-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQCsecret\n-----END PRIVATE KEY-----\n";
const INSTANCE: &str = "5f0c4b2e-1a2b-4c3d-9e8f-0123456789ab";
const ROOT: &str = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";

/// What the hostile server saw of one request.
struct Seen {
    iam: bool,
    path: String,
    /// The body, then every header (`name: value` per line): what an echoing server sends back.
    raw: String,
}

type Handler = dyn Fn(&Seen, &Arc<AtomicU64>) -> Response + Send + Sync;

#[derive(Clone)]
struct Hostile {
    handler: Arc<Handler>,
    /// Bytes of endless bodies handed to the socket.
    streamed: Arc<AtomicU64>,
    /// Paths requested, in order.
    hits: Arc<Mutex<Vec<String>>>,
}

impl Hostile {
    fn kp_hits(&self, part: &str) -> usize {
        self.hits
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.contains(part))
            .count()
    }
}

async fn handle(State(h): State<Hostile>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    let mut headers = String::new();
    for (k, v) in req.headers() {
        headers.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
    }
    let body = axum::body::to_bytes(req.into_body(), 1 << 20)
        .await
        .unwrap_or_default();
    // The body first, then the headers: both are within what an error shows.
    let raw = format!("{} {headers}", String::from_utf8_lossy(&body));
    h.hits.lock().unwrap().push(path.clone());
    let seen = Seen {
        iam: path.ends_with("/identity/token"),
        path,
        raw,
    };
    (h.handler)(&seen, &h.streamed)
}

/// Serves `handler` on 127.0.0.1 (port 0) until the test's runtime ends.
async fn serve(
    handler: impl Fn(&Seen, &Arc<AtomicU64>) -> Response + Send + Sync + 'static,
) -> (String, Hostile) {
    let h = Hostile {
        handler: Arc::new(handler),
        streamed: Arc::default(),
        hits: Arc::default(),
    };
    let app = axum::Router::new().fallback(handle).with_state(h.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, h)
}

fn json(status: StatusCode, v: serde_json::Value) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(v.to_string()))
        .unwrap()
}

fn token_ok(expires_in: u64) -> Response {
    json(
        StatusCode::OK,
        serde_json::json!({"access_token": BEARER, "token_type": "Bearer", "expires_in": expires_in}),
    )
}

/// The server stops by itself after this much (every loop is bounded); a client without a cap
/// reads all of it.
const ENDLESS_LIMIT: u64 = 256 << 20;

/// A body that never ends (until [`ENDLESS_LIMIT`]), counting what it hands out.
fn endless(status: StatusCode, prefix: &'static str, counter: &Arc<AtomicU64>) -> Response {
    let chunk = Bytes::from(vec![b'A'; 64 << 10]);
    let counter = counter.clone();
    let head =
        futures::stream::once(async move { Ok::<_, Infallible>(Bytes::from_static(prefix.as_bytes())) });
    let tail = futures::stream::unfold(0u64, move |n| {
        let chunk = chunk.clone();
        let counter = counter.clone();
        async move {
            if n >= ENDLESS_LIMIT {
                return None;
            }
            counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            Some((Ok::<_, Infallible>(chunk.clone()), n + chunk.len() as u64))
        }
    });
    use futures::StreamExt;
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from_stream(head.chain(tail)))
        .unwrap()
}

fn config(url: &str) -> KeyProtectConfig {
    KeyProtectConfig::new(url, INSTANCE, APIKEY, Some(url.to_owned()))
}

fn opts() -> ClientOptions {
    ClientOptions {
        // Long enough that only a cap on the body, not the timeout, can end an endless read.
        request_timeout: Duration::from_secs(60),
        connect_timeout: Duration::from_secs(5),
        max_attempts: 2,
        backoff_base: Duration::from_millis(5),
        backoff_cap: Duration::from_millis(20),
        max_retry_after: Duration::from_secs(2),
        retry_deadline: Duration::from_secs(60),
        proxy_from_env: false,
        ..ClientOptions::default()
    }
}

fn client(url: &str) -> Client {
    Client::with_options(config(url), opts()).unwrap()
}

fn wrap_ok() -> Response {
    json(
        StatusCode::OK,
        serde_json::json!({"ciphertext": "eyJjaXBoZXJ0ZXh0IjoiYSJ9", "keyVersion": {"id": ROOT}}),
    )
}

/// Item 14: a 200, an error status and an IAM answer that stream forever cost a bounded
/// number of bytes and end at once, well before the request timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_bodies_are_cut_at_a_cap() {
    // (which endpoint streams, its status)
    let cases: [(&str, bool, StatusCode); 4] = [
        ("KP 200", false, StatusCode::OK),
        ("KP 503", false, StatusCode::SERVICE_UNAVAILABLE),
        ("IAM 200", true, StatusCode::OK),
        ("IAM 400", true, StatusCode::BAD_REQUEST),
    ];
    for (name, iam_streams, status) in cases {
        let (url, h) = serve(move |seen, counter| match (seen.iam, iam_streams) {
            (true, true) => endless(status, "{\"errorMessage\":\"", counter),
            (true, false) => token_ok(3600),
            (false, _) => endless(status, "{\"resources\":[{\"errorMsg\":\"", counter),
        })
        .await;
        let kp = client(&url);
        let t = Instant::now();
        let e = kp
            .unwrap(ROOT, "eyJjaXBoZXJ0ZXh0IjoiYSJ9", None)
            .await
            .expect_err(name);
        let took = t.elapsed();
        let streamed = h.streamed.load(Ordering::Relaxed);
        eprintln!(
            "{name}: {} MiB streamed before the client stopped, {took:?}: {e}",
            streamed >> 20
        );
        // The cap is 8 MiB for a 200, 64 KiB otherwise; the rest is socket buffers.
        assert!(
            streamed < 48 << 20,
            "{name}: the client read {} MiB",
            streamed >> 20
        );
        assert!(took < Duration::from_secs(20), "{name}: took {took:?}");
        assert!(
            e.to_string().len() < 2048,
            "{name}: {} bytes of error",
            e.to_string().len()
        );
    }
}

/// Item 15: `expires_in` of 2^63-1 (and 2^64-1) is used, capped, without a panic; the token is
/// cached and reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_token_lifetimes_do_not_panic() {
    for expires_in in [i64::MAX as u64, u64::MAX, 0] {
        let (url, h) = serve(move |seen, _| if seen.iam { token_ok(expires_in) } else { wrap_ok() }).await;
        let kp = client(&url);
        for _ in 0..2 {
            let w = kp.wrap(ROOT, b"dek", None).await.unwrap();
            assert_eq!(w.ciphertext, "eyJjaXBoZXJ0ZXh0IjoiYSJ9");
        }
        let iam = h.kp_hits("/identity/token");
        assert!(
            (1..=2).contains(&iam),
            "expires_in {expires_in}: {iam} token exchanges"
        );
    }
}

/// A tracing writer that keeps everything written (the log of the client under test).
#[derive(Clone, Default)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);

impl Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn form_encoded(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn assert_no_secret(what: &str, text: &str) {
    let b64 = keyprotect_client::b64::encode(PLAINTEXT);
    let body = std::str::from_utf8(PLAINTEXT).unwrap();
    for (name, s) in [
        ("API key", APIKEY.to_owned()),
        ("form-encoded API key", form_encoded(APIKEY)),
        ("bearer token", BEARER.to_owned()),
        ("plaintext (base64)", b64.clone()),
        ("plaintext (first 16 base64 characters)", b64[..16].to_owned()),
        ("plaintext", body.to_owned()),
        ("plaintext key body", "MIIEvQIBADANBgkq".to_owned()),
    ] {
        assert!(!text.contains(&s), "{what} holds the {name}: {text}");
    }
    assert!(
        !text.contains('\u{1b}'),
        "{what} holds an escape sequence: {text:?}"
    );
}

/// Item 16: a server that echoes the request (headers and body) into `errorMsg`, `reasons`,
/// a non-JSON body and IAM's `errorMessage`, with escape sequences and forged log lines: no
/// API key, bearer token or plaintext reaches an error or the log, every text is short and on
/// one line.
#[tokio::test(flavor = "current_thread")]
async fn echoing_servers_print_no_secret() {
    let logs = LogBuf::default();
    let w = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || w.clone())
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let iam_fails = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let fail = iam_fails.clone();
    let (url, _h) = serve(move |seen, _| {
        let echo = format!("\u{1b}[2J{}\n2026-01-01T00:00:00Z  INFO forged line\n", seen.raw);
        if seen.iam {
            if fail.load(Ordering::SeqCst) {
                return json(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({"errorCode": echo, "errorMessage": echo, "context": {"requestId": echo}}),
                );
            }
            return token_ok(2);
        }
        if seen.path.ends_with("/unwrap") {
            return Response::builder()
                .status(StatusCode::INTERNAL_SERVER_ERROR)
                .body(Body::from(echo.repeat(200)))
                .unwrap();
        }
        json(
            StatusCode::BAD_REQUEST,
            serde_json::json!({"resources": [{"errorMsg": echo, "reasons": vec![serde_json::json!({
                "code": echo, "message": echo, "moreInfo": echo, "target": {"type": echo, "name": echo}
            }); 12]}]}),
        )
    })
    .await;
    let kp = Client::with_options(
        config(&url),
        ClientOptions {
            token_refresh_fraction: 0.05,
            token_expiry_margin: Duration::ZERO,
            ..opts()
        },
    )
    .unwrap();

    let mut texts = Vec::new();
    // Key Protect's error JSON echoing the wrap request (bearer token and plaintext).
    let e = kp.wrap(ROOT, PLAINTEXT, None).await.unwrap_err();
    assert_eq!(e.status(), Some(400));
    let reasons_kept = e.reasons().len();
    texts.push(("wrap error", e.to_string(), format!("{e:?}")));
    // A non-JSON 500 body echoing the request, retried once.
    let e = kp
        .unwrap(ROOT, "eyJjaXBoZXJ0ZXh0IjoiYSJ9", None)
        .await
        .unwrap_err();
    texts.push(("unwrap error", e.to_string(), format!("{e:?}")));
    // The cached token is due for refresh; IAM now echoes the API key: the refresh WARN log
    // and, once the token has expired, the error.
    iam_fails.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = kp.wrap(ROOT, PLAINTEXT, None).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let e = kp.check_credentials().await.unwrap_err();
    assert!(matches!(e, Error::Iam { status: 400, .. }), "{e}");
    texts.push(("IAM error", e.to_string(), format!("{e:?}")));

    for (what, display, debug) in &texts {
        eprintln!("{what}: {display}");
        assert_no_secret(what, display);
        assert_no_secret(what, debug);
        assert!(!display.contains('\n'), "{what} spans lines: {display}");
        assert!(display.len() < 4096, "{what} is {} bytes", display.len());
    }
    let log = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        log.contains("IAM token refresh failed"),
        "no refresh warning logged: {log}"
    );
    assert_no_secret("the log", &log);
    assert!(
        !log.contains("\nforged line") && !log.contains("  INFO forged line"),
        "{log}"
    );
    assert_eq!(reasons_kept, 8, "reasons kept");
}

/// Item 17: a wrap answer with an empty, blank or non-base64 ciphertext, and an unwrap answer
/// with an empty plaintext, are errors, not results.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_results_are_refused() {
    let answer = Arc::new(Mutex::new(serde_json::Value::Null));
    let a = answer.clone();
    let (url, _h) = serve(move |seen, _| {
        if seen.iam {
            token_ok(3600)
        } else {
            json(StatusCode::OK, a.lock().unwrap().clone())
        }
    })
    .await;
    let kp = client(&url);
    for ct in ["", "   ", "not base64 at all!", "===="] {
        *answer.lock().unwrap() = serde_json::json!({"ciphertext": ct});
        let e = kp.wrap(ROOT, b"dek", None).await.expect_err(ct);
        assert!(matches!(e, Error::BadResponse { .. }), "{ct:?}: {e}");
        assert!(!e.is_transient());
        let e = kp
            .rewrap(ROOT, "eyJjaXBoZXJ0ZXh0IjoiYSJ9", None)
            .await
            .expect_err(ct);
        assert!(matches!(e, Error::BadResponse { .. }), "rewrap {ct:?}: {e}");
    }
    for pt in ["", "  "] {
        *answer.lock().unwrap() = serde_json::json!({"plaintext": pt});
        let e = kp
            .unwrap(ROOT, "eyJjaXBoZXJ0ZXh0IjoiYSJ9", None)
            .await
            .expect_err("empty plaintext");
        assert!(e.to_string().contains("plaintext in the answer is empty"), "{e}");
    }
    // The `kp unwrap` helper (which writes a key file) gets the same error.
    let e = keyprotect_client::wrapper::unwrap_for_secret(&kp, ROOT, "eyJjaXBoZXJ0ZXh0IjoiYSJ9")
        .await
        .unwrap_err();
    assert!(matches!(e, Error::BadResponse { .. }), "{e}");
    // And a good answer still works.
    *answer.lock().unwrap() = serde_json::json!({"plaintext": "ZGVr"});
    let u = kp.unwrap(ROOT, "eyJjaXBoZXJ0ZXh0IjoiYSJ9", None).await.unwrap();
    assert_eq!(&u.plaintext[..], b"dek");
}

/// Item 17: a create is sent once, whatever comes back: after a 429, a 401, a 503 or a dropped
/// connection the key may exist already, and a second request would make a second key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_is_never_repeated() {
    for status in [
        StatusCode::TOO_MANY_REQUESTS,
        StatusCode::UNAUTHORIZED,
        StatusCode::SERVICE_UNAVAILABLE,
        StatusCode::GATEWAY_TIMEOUT,
    ] {
        let (url, h) = serve(move |seen, _| {
            if seen.iam {
                token_ok(3600)
            } else {
                let mut r = json(
                    status,
                    serde_json::json!({"resources": [{"errorMsg": "try again"}]}),
                );
                r.headers_mut().insert("retry-after", "0".parse().unwrap());
                r
            }
        })
        .await;
        let kp = client(&url);
        let e = kp.create_root_key("once").await.unwrap_err();
        assert_eq!(e.status(), Some(status.as_u16()), "{e}");
        assert_eq!(h.kp_hits("/api/v2/keys"), 1, "{status}: the create was repeated");
    }
}

/// Item 16: fields of an image's annotation (instance id, URL, root key id) are quoted only as
/// short sanitized tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn annotation_fields_are_quoted_as_tokens() {
    let (url, _h) = serve(|seen, _| {
        if seen.iam {
            token_ok(3600)
        } else {
            json(
                StatusCode::NOT_FOUND,
                serde_json::json!({"resources": [{"errorMsg": "Not Found"}]}),
            )
        }
    })
    .await;
    let u = KeyProtectUnwrapper::new(client(&url));
    let hostile = "\u{1b}[31mEVIL\n2026 INFO forged MIIEvQIBADANBgkqhkiG9w0BAQEFAASC";
    let mut blob = KeyProtectBlob {
        kp_url: format!("https://kms.example/{hostile}"),
        instance_id: hostile.to_owned(),
        root_key_id: ROOT.to_owned(),
        ciphertext: "eyJjaXBoZXJ0ZXh0IjoiYSJ9".into(),
        aad: vec![],
    };
    let e = u
        .unwrap_key(&serde_json::to_vec(&blob).unwrap())
        .await
        .unwrap_err();
    let s = error_chain(&e);
    assert!(s.contains("instance"), "{s}");
    blob.instance_id = INSTANCE.into();
    blob.root_key_id = format!("alias-{hostile}").replace(['\u{1b}', '\n'], " ");
    let e = u
        .unwrap_key(&serde_json::to_vec(&blob).unwrap())
        .await
        .unwrap_err();
    let s2 = error_chain(&e);
    assert!(s2.contains("404"), "{s2}");
    for s in [s, s2] {
        assert!(!s.contains('\u{1b}') && !s.contains('\n'), "{s:?}");
        assert!(!s.contains("forged") && !s.contains("MIIEvQIBADANBgkq"), "{s}");
    }
    // A UUID is quoted as it is.
    blob.root_key_id = ROOT.into();
    let e = u
        .unwrap_key(&serde_json::to_vec(&blob).unwrap())
        .await
        .unwrap_err();
    assert!(error_chain(&e).contains(ROOT), "{}", error_chain(&e));
}

const BIN: &str = env!("CARGO_BIN_EXE_keyprotect-keyprovider");

/// Runs the keyprovider binary on `request` against `url`; returns (exit ok, stdout, stderr).
async fn keyprovider(url: &str, request: &[u8]) -> (bool, Vec<u8>, String) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("kp.json");
    std::fs::write(
        &cfg,
        serde_json::json!({"keyprotect-url": url, "instance-id": INSTANCE, "apikey": APIKEY, "iam-url": url})
            .to_string(),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(BIN)
        .arg("--config")
        .arg(&cfg)
        .env_remove("KP_CA_BUNDLE")
        .env("RUST_LOG", "debug")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    use tokio::io::AsyncWriteExt;
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(request).await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the keyprovider finished")
        .unwrap();
    (
        out.status.success(),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Items 16 and 17 through the `keyprotect-keyprovider` binary: parameters of the wrong JSON type
/// are not echoed, an echoing server's text carries no secret to stderr, an empty ciphertext
/// fails the wrap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyprovider_binary_prints_no_secret() {
    let ciphertext = Arc::new(Mutex::new(None::<String>));
    let c = ciphertext.clone();
    let (url, _h) = serve(move |seen, _| {
        if seen.iam {
            return token_ok(3600);
        }
        match c.lock().unwrap().clone() {
            Some(ct) => json(StatusCode::OK, serde_json::json!({"ciphertext": ct})),
            None => json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"resources": [{"errorMsg": format!("\u{1b}]0;{}", seen.raw)}]}),
            ),
        }
    })
    .await;
    let b64 = keyprotect_client::b64::encode(PLAINTEXT);
    // Wrong JSON types: the values must not be echoed.
    for req in [
        serde_json::json!({"op": "keywrap", "keywrapparams": {"ec": {"Parameters": {"keyprotect": b64}}, "optsdata": b64}}),
        serde_json::json!({"op": "keywrap", "keywrapparams": {"ec": {"Parameters": {"keyprotect": [b64]}}, "optsdata": {"k": b64}}}),
        serde_json::json!({"op": b64, "keyunwrapparams": {"annotation": 5}}),
        serde_json::json!({"op": "keyunwrap", "keyunwrapparams": {"annotation": String::from_utf8_lossy(PLAINTEXT)}}),
    ] {
        let (ok, _, stderr) = keyprovider(&url, req.to_string().as_bytes()).await;
        assert!(!ok, "{req}");
        assert!(!stderr.trim().is_empty());
        assert_no_secret("keyprovider stderr (wrong types)", &stderr);
    }
    // An echoing server: the optsdata (a layer key) and the credentials stay out of stderr.
    let opts = keyprotect_client::b64::encode(PLAINTEXT);
    let root = keyprotect_client::b64::encode(ROOT.as_bytes());
    let req = format!(
        r#"{{"op":"keywrap","keywrapparams":{{"ec":{{"Parameters":{{"keyprotect":["{root}"]}},"DecryptConfig":{{"Parameters":{{}}}}}},"optsdata":"{opts}"}},"keyunwrapparams":{{"dc":null,"annotation":null}}}}"#
    );
    let (ok, _, stderr) = keyprovider(&url, req.as_bytes()).await;
    assert!(!ok);
    assert!(stderr.contains("400"), "{stderr}");
    assert_no_secret("keyprovider stderr (echo)", &stderr);
    // An empty ciphertext is not a wrapped key.
    *ciphertext.lock().unwrap() = Some(String::new());
    let (ok, stdout, stderr) = keyprovider(&url, req.as_bytes()).await;
    assert!(
        !ok,
        "an empty ciphertext was accepted: {}",
        String::from_utf8_lossy(&stdout)
    );
    assert!(stderr.contains("ciphertext in the answer is empty"), "{stderr}");
}

/// Peak resident memory of a running process (`VmHWM`), in KiB.
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Item 14 as a whole process: the keyprovider binary wrapping against a Key Protect whose 200
/// answer never ends exits with an error, its peak RSS bounded (the old client read the whole
/// 256 MiB the server offered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyprovider_peak_memory_is_bounded_by_an_endless_answer() {
    let (url, h) = serve(|seen, counter| {
        if seen.iam {
            token_ok(3600)
        } else {
            endless(StatusCode::OK, "{\"ciphertext\":\"", counter)
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("kp.json");
    std::fs::write(
        &cfg,
        serde_json::json!({"keyprotect-url": url, "instance-id": INSTANCE, "apikey": APIKEY, "iam-url": url})
            .to_string(),
    )
    .unwrap();
    let opts = keyprotect_client::b64::encode(b"{\"symkey\":\"x\"}");
    let root = keyprotect_client::b64::encode(ROOT.as_bytes());
    let req = format!(
        r#"{{"op":"keywrap","keywrapparams":{{"ec":{{"Parameters":{{"keyprotect":["{root}"]}}}},"optsdata":"{opts}"}}}}"#
    );
    let mut child = tokio::process::Command::new(BIN)
        .arg("--config")
        .arg(&cfg)
        .env_remove("KP_CA_BUNDLE")
        // anyhow would capture a backtrace and resolve it from the debug info (~120 MiB).
        .env("RUST_BACKTRACE", "0")
        .env("RUST_LIB_BACKTRACE", "0")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    use tokio::io::AsyncWriteExt;
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(req.as_bytes()).await.unwrap();
    drop(stdin);
    let t = Instant::now();
    let mut peak = 0;
    let status = loop {
        if let Some(kib) = vm_hwm_kib(pid) {
            peak = peak.max(kib);
        }
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the keyprovider still runs"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let streamed = h.streamed.load(Ordering::Relaxed);
    eprintln!(
        "keyprovider vs an endless 200: exit {status}, peak RSS {} MiB, {} MiB streamed, {:?}",
        peak >> 10,
        streamed >> 20,
        t.elapsed()
    );
    assert!(!status.success());
    assert!(peak > 0, "VmHWM was never read");
    assert!(peak < 64 << 10, "peak RSS {} MiB", peak >> 10);
    assert!(streamed < 48 << 20, "{} MiB read", streamed >> 20);
}

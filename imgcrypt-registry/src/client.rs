//! A registry client over the OCI distribution API, as an [`ImageSource`] and [`ImageDest`].
//!
//! * Pulls stream blob bodies through a digest-verifying reader; manifests and configs are read
//!   whole (bounded) and verified.
//! * Pushes stream: `POST /v2/<repo>/blobs/uploads/`, one `PATCH` whose chunked body is fed as
//!   the (encrypted or decrypted) stream is produced, and the final `PUT ?digest=` only after
//!   the stream reached end-of-file cleanly. A failed stream aborts the `PATCH` and the upload
//!   is `DELETE`d: nothing is committed, and nothing is tagged (the tag is pushed last).
//! * Authentication: HTTP Basic and the Bearer token challenge flow (`WWW-Authenticate`), with
//!   credentials given, from auth files and credential helpers ([`crate::auth`]), or none. Credentials (Basic or bearer) are sent only
//!   to the registry's own scheme, host and port, and Basic credentials to the token realm the
//!   registry names; an upload `Location` on another host gets none. A relative `Location` is
//!   resolved against the URL of the answer that carried it.
//! * Every body is bounded ([`MAX_SMALL`] for manifests, [`MAX_ERROR_BODY`] for error answers,
//!   [`MAX_TOKEN_BODY`] for token answers; blobs stop at their declared size), and every
//!   transfer must move at least [`MIN_PROGRESS`] bytes per stall timeout
//!   ([`RegistryOptions::stall_timeout`]) or it fails.
//! * TLS as containers/image sets it up ([`crate::tls`]): web roots, the system
//!   store, `certs.d` and `--cert-dir`, client certificates. `--tls-verify=false` means HTTPS
//!   without verification, and plain HTTP only when the registry does not speak TLS.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use oci_spec::image::Descriptor;
use ocicrypt_core::image::digest::{format_sha256, verify_bytes, VerifyReader};
use ocicrypt_core::image::layout::descriptor;
use ocicrypt_core::image::{BlobReader, ImageDest, ImageSource, Transfer};
use ocicrypt_core::keywrap::BoxFuture;
use ocicrypt_core::mediatype as mt;
use ocicrypt_core::Error as CoreError;
use reqwest::header::{
    HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION, WWW_AUTHENTICATE,
};
use reqwest::{Client, Method, RequestBuilder, Response, StatusCode};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt};
use zeroize::Zeroizing;

use crate::auth::{find_creds, Creds};
use crate::error::Error as RegistryError;
use crate::reference::{Reference, RegistryRef};
use crate::tls::{self, RegistryTls, TlsOptions};

/// Largest manifest, index or config read into memory.
pub const MAX_SMALL: u64 = 32 << 20;
/// Size of the chunks a pushed stream is cut into.
const CHUNK: usize = 256 << 10;
/// Chunks buffered between the producer and the HTTP body.
const CHUNKS_IN_FLIGHT: usize = 4;
/// Attempts per request when the registry is unreachable or answers 429/502/503/504.
const ATTEMPTS: u32 = 3;
/// Largest error answer body read (the message is cut much shorter).
pub const MAX_ERROR_BODY: u64 = 64 << 10;
/// Largest token server answer read.
pub const MAX_TOKEN_BODY: u64 = 1 << 20;
/// A transfer that moves fewer bytes than this within the stall timeout fails.
pub const MIN_PROGRESS: u64 = 1024;
/// The default stall timeout (`--stall-timeout`).
pub const DEFAULT_STALL: Duration = Duration::from_secs(60);

const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

fn core(e: RegistryError) -> CoreError {
    e.into()
}

/// How to reach a registry: credentials, TLS, timeouts. [`Default`] is what skopeo does
/// without flags: verify TLS, look credentials up in the auth files, certs.d per registry.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// Credentials given explicitly (`--creds`); when `None`, the auth files are consulted
    /// (see [`find_creds`]).
    pub creds: Option<Creds>,
    /// The auth file to read instead of `REGISTRY_AUTH_FILE` and the default locations
    /// (`--authfile`).
    pub authfile: Option<PathBuf>,
    /// TLS: verification, certificate directory.
    pub tls: TlsOptions,
    /// A request whose answer does not start, or a transfer that moves fewer than
    /// [`MIN_PROGRESS`] bytes, within this time fails.
    pub stall_timeout: Duration,
    /// When set, uploads stop feeding their bodies, end them cleanly and delete themselves:
    /// set it from a signal handler to wind a push down (see [`ImageDest::abort`]).
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        Self {
            creds: None,
            authfile: None,
            tls: TlsOptions::default(),
            stall_timeout: DEFAULT_STALL,
            cancel: None,
        }
    }
}

impl RegistryOptions {
    /// Uses these credentials instead of the auth files.
    #[must_use]
    pub fn creds(mut self, creds: Creds) -> Self {
        self.creds = Some(creds);
        self
    }

    /// Reads credentials from this auth file instead of the default ones.
    #[must_use]
    pub fn authfile(mut self, path: impl Into<PathBuf>) -> Self {
        self.authfile = Some(path.into());
        self
    }

    /// `false`: HTTPS without verifying the certificate, or plain HTTP when the registry does
    /// not speak TLS (skopeo's `--tls-verify=false`).
    #[must_use]
    pub fn tls_verify(mut self, verify: bool) -> Self {
        self.tls.skip_verify = !verify;
        self
    }

    /// A certificate directory used instead of the per-registry certs.d lookup (`--cert-dir`).
    #[must_use]
    pub fn cert_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.tls.cert_dir = Some(dir.into());
        self
    }

    /// See [`RegistryOptions::stall_timeout`](#structfield.stall_timeout).
    #[must_use]
    pub fn stall_timeout(mut self, t: Duration) -> Self {
        self.stall_timeout = t;
        self
    }

    /// See [`RegistryOptions::cancel`](#structfield.cancel).
    #[must_use]
    pub fn cancel(mut self, flag: Arc<AtomicBool>) -> Self {
        self.cancel = Some(flag);
        self
    }
}

/// An image in a registry, readable and writable.
pub struct RegistryImage {
    r: RegistryRef,
    base: String,
    /// `base` parsed: the only origin credentials go to.
    origin: reqwest::Url,
    client: Client,
    /// Without a read timeout: an upload's answer comes only after the whole body was sent;
    /// stalls are detected by the stall timeout instead.
    upload_client: Client,
    stall: Duration,
    creds: Option<Creds>,
    push: bool,
    skip_verify: bool,
    cancel: Option<Arc<AtomicBool>>,
    auth: Mutex<Option<Zeroizing<String>>>,
    root: Mutex<Option<(Descriptor, Vec<u8>)>>,
    uploads: Mutex<Vec<String>>,
}

impl fmt::Debug for RegistryImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryImage")
            .field("image", &self.r.to_string())
            .field("base", &self.base)
            .field("creds", &self.creds)
            .finish_non_exhaustive()
    }
}

/// One `WWW-Authenticate` challenge.
#[derive(Debug, PartialEq, Eq)]
pub struct Challenge {
    /// `basic` or `bearer` (lowercase).
    pub scheme: String,
    /// Parameters (`realm`, `service`, `scope`).
    pub params: Vec<(String, String)>,
}

impl Challenge {
    fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Parses `Bearer realm="https://auth",service="reg",scope="repository:a:pull"`.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(char::is_whitespace).unwrap_or((header, ""));
    if scheme.is_empty() {
        return None;
    }
    let mut params = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        while matches!(chars.peek(), Some(c) if c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ',' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.trim().is_empty() {
            break;
        }
        if chars.next() != Some('=') {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            value.push(n);
                        }
                    }
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        params.push((key.trim().to_owned(), value.trim().to_owned()));
    }
    Some(Challenge {
        scheme: scheme.to_ascii_lowercase(),
        params,
    })
}

fn is_transient(s: StatusCode) -> bool {
    matches!(
        s,
        StatusCode::TOO_MANY_REQUESTS
            | StatusCode::BAD_GATEWAY
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT
    )
}

/// `Retry-After` in seconds, if given.
fn retry_after(r: &Response) -> Option<Duration> {
    r.headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// 250 ms, 500 ms, … or what the registry asked for; never more than 5 s.
fn backoff(attempt: u32, asked: Option<Duration>) -> Duration {
    let d = asked.unwrap_or(Duration::from_millis(250 << (attempt - 1).min(4)));
    d.min(Duration::from_secs(5))
}

fn is_manifest_type(media: &str) -> bool {
    matches!(
        media,
        mt::OCI_MANIFEST | mt::OCI_INDEX | mt::DOCKER_MANIFEST | mt::DOCKER_MANIFEST_LIST
    )
}

async fn fill(r: &mut (dyn AsyncRead + Send + Unpin), buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = r.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

enum SendFailure {
    Http(reqwest::Error),
    /// No answer within the stall timeout; names the request.
    Stalled(String),
}

enum PumpError {
    /// SIGINT/SIGTERM: stop feeding the body.
    Cancelled,
    /// The source stream failed (tampered data, a source read error…).
    Source(io::Error),
    /// The request stopped taking the body.
    Closed,
}

impl RegistryImage {
    /// A handle on `r`; `push` asks for push access when authenticating. Credentials are
    /// `opts.creds`, else what [`find_creds`] finds in the auth files.
    ///
    /// # Errors
    /// The errors of [`find_creds`]; [`RegistryError::CertDir`] for a certificate directory
    /// that cannot be used; [`RegistryError::Client`] if the HTTP client cannot be built.
    pub fn new(r: RegistryRef, opts: RegistryOptions, push: bool) -> Result<Self, RegistryError> {
        let creds = find_creds(&r.host, opts.creds, opts.authfile.as_deref())?;
        let base = format!("https://{}", r.api_host());
        let tls = RegistryTls::new(&r.host, &opts.tls).map_err(|e| RegistryError::CertDir {
            registry: r.host.clone(),
            source: Box::new(e),
        })?;
        let builder = || {
            tls.apply(
                Client::builder()
                    .user_agent(concat!("imgcrypt/", env!("CARGO_PKG_VERSION")))
                    .connect_timeout(Duration::from_secs(15)),
            )
        };
        let err = |e: reqwest::Error| RegistryError::Client(e.to_string());
        let stall = opts.stall_timeout.max(Duration::from_millis(100));
        let client = builder().read_timeout(stall).build().map_err(err)?;
        let upload_client = builder().build().map_err(err)?;
        let origin = reqwest::Url::parse(&base).map_err(|e| RegistryError::BadUrl {
            url: base.clone(),
            detail: e.to_string(),
        })?;
        Ok(Self {
            r,
            base,
            origin,
            client,
            upload_client,
            stall,
            creds,
            push,
            skip_verify: opts.tls.skip_verify,
            cancel: opts.cancel,
            auth: Mutex::new(None),
            root: Mutex::new(None),
            uploads: Mutex::new(Vec::new()),
        })
    }

    /// As [`new`](Self::new); with verification off, also finds out whether the registry speaks
    /// HTTPS or only plain HTTP (as containers/image: `GET /v2/` over HTTPS, then over HTTP if
    /// that failed; HTTP is used only if the registry answers it).
    ///
    /// # Errors
    /// As [`new`](Self::new).
    pub async fn connect(r: RegistryRef, opts: RegistryOptions, push: bool) -> Result<Self, RegistryError> {
        let mut img = Self::new(r, opts, push)?;
        if img.skip_verify {
            img.pick_scheme().await;
        }
        Ok(img)
    }

    async fn pick_scheme(&mut self) {
        let https = format!("{}/v2/", self.base);
        // Bounded: a plain-HTTP server may wait for a request line that a ClientHello never ends.
        let ping = Duration::from_secs(10).min(self.stall);
        if self.client.get(&https).timeout(ping).send().await.is_ok() {
            return;
        }
        // Any HTTP answer (even an error status) means the registry speaks plain HTTP.
        let http_base = format!("http://{}", self.r.api_host());
        if self
            .client
            .get(format!("{http_base}/v2/"))
            .timeout(ping)
            .send()
            .await
            .is_ok()
        {
            if let Ok(origin) = reqwest::Url::parse(&http_base) {
                tracing::debug!("registry {}: plain HTTP", self.r.host);
                self.base = http_base;
                self.origin = origin;
            }
        }
    }

    fn host(&self) -> String {
        self.r.host.clone()
    }

    fn url(&self, tail: &str) -> String {
        format!("{}/v2/{}/{tail}", self.base, self.r.repo)
    }

    fn net(&self, e: &reqwest::Error) -> RegistryError {
        if let Some(failure) = tls::classify(e) {
            return RegistryError::Tls {
                registry: self.host(),
                failure,
            };
        }
        let mut detail = e.to_string();
        let mut src = std::error::Error::source(e);
        while let Some(s) = src {
            let t = s.to_string();
            if !detail.contains(&t) {
                detail.push_str(": ");
                detail.push_str(&t);
            }
            src = s.source();
        }
        let what = if e.is_timeout() {
            "timed out"
        } else if e.is_connect() {
            "cannot connect"
        } else {
            "request failed"
        };
        RegistryError::Network {
            registry: self.host(),
            detail: format!("{what} ({}): {detail}", self.base),
        }
    }

    /// True when `url` has the registry's own scheme, host and port: the only place the
    /// registry's credentials go.
    fn same_origin(&self, url: &reqwest::Url) -> bool {
        url.scheme() == self.origin.scheme()
            && url.host_str() == self.origin.host_str()
            && url.port_or_known_default() == self.origin.port_or_known_default()
    }

    /// Sends `rb`, with the registry's credentials only if it goes to the registry's origin,
    /// waiting at most the stall timeout for the answer to start.
    async fn try_execute(&self, rb: RequestBuilder) -> Result<Response, SendFailure> {
        let (client, req) = rb.build_split();
        let mut req = req.map_err(SendFailure::Http)?;
        self.authorize(&mut req);
        let what = format!("{} {}", req.method(), req.url().path());
        match tokio::time::timeout(self.stall, client.execute(req)).await {
            Ok(r) => r.map_err(SendFailure::Http),
            Err(_) => Err(SendFailure::Stalled(what)),
        }
    }

    fn send_failure(&self, f: &SendFailure) -> RegistryError {
        match f {
            SendFailure::Http(e) => self.net(e),
            SendFailure::Stalled(what) => self.stalled(&format!("waiting for the answer to {what}")),
        }
    }

    async fn execute(&self, rb: RequestBuilder) -> Result<Response, RegistryError> {
        self.try_execute(rb).await.map_err(|f| self.send_failure(&f))
    }

    /// As [`execute`](Self::execute) without the wait limit: an upload's answer comes only
    /// after its body was sent, and the upload watches its own progress.
    async fn execute_upload(&self, rb: RequestBuilder) -> Result<Response, RegistryError> {
        let (client, req) = rb.build_split();
        let mut req = req.map_err(|e| self.net(&e))?;
        self.authorize(&mut req);
        client.execute(req).await.map_err(|e| self.net(&e))
    }

    fn authorize(&self, req: &mut reqwest::Request) {
        if !self.same_origin(req.url()) {
            req.headers_mut().remove(AUTHORIZATION);
            return;
        }
        if let Some(h) = self.auth.lock().expect("auth lock").as_ref() {
            if let Ok(mut v) = HeaderValue::from_str(h.as_str()) {
                v.set_sensitive(true);
                req.headers_mut().insert(AUTHORIZATION, v);
            }
        }
    }

    /// Secrets a server could echo back, for [`ocicrypt_core::redact::server_text`].
    fn secrets(&self) -> Vec<Zeroizing<String>> {
        let mut v = Vec::new();
        if let Some(c) = &self.creds {
            v.push(c.password.clone());
            v.push(c.basic_header());
        }
        if let Some(h) = self.auth.lock().expect("auth lock").as_ref() {
            v.push(h.clone());
            if let Some(t) = h.strip_prefix("Bearer ") {
                v.push(Zeroizing::new(t.to_owned()));
            }
        }
        v
    }

    /// Text from the server, made safe to show.
    fn server_text(&self, text: &str) -> String {
        let secrets = self.secrets();
        let refs: Vec<&str> = secrets.iter().map(|s| s.as_str()).collect();
        ocicrypt_core::redact::server_text(text, &refs)
    }

    fn stalled(&self, what: &str) -> RegistryError {
        RegistryError::Network {
            registry: self.host(),
            detail: format!(
                "{what} made no progress (less than {MIN_PROGRESS} bytes in {} s); pass --stall-timeout SECONDS to wait longer",
                self.stall.as_secs_f64()
            ),
        }
    }

    /// A body stream that fails when fewer than [`MIN_PROGRESS`] bytes arrive within the stall
    /// timeout (a server trickling one byte every few seconds).
    fn guarded(
        &self,
        resp: Response,
        what: &str,
    ) -> impl futures::Stream<Item = Result<bytes::Bytes, RegistryError>> + Send + 'static {
        struct State<S> {
            inner: std::pin::Pin<Box<S>>,
            window: Instant,
            moved: u64,
            done: bool,
        }
        let stall = self.stall;
        let stalled = self.stalled(what);
        let host = self.host();
        let what = what.to_owned();
        let state = State {
            inner: Box::pin(resp.bytes_stream()),
            window: Instant::now(),
            moved: 0,
            done: false,
        };
        let stalled = Arc::new(Mutex::new(Some(stalled)));
        futures::stream::unfold(state, move |mut st| {
            let stalled = Arc::clone(&stalled);
            let host = host.clone();
            let what = what.clone();
            async move {
                if st.done {
                    return None;
                }
                let deadline = tokio::time::Instant::from_std(st.window + stall);
                let fail = |st: &mut State<_>| {
                    st.done = true;
                    let e = stalled.lock().expect("stall lock").take();
                    e.map(Err)
                };
                match tokio::time::timeout_at(deadline, futures::StreamExt::next(&mut st.inner)).await {
                    Err(_) => fail(&mut st).map(|e| (e, st)),
                    Ok(None) => None,
                    Ok(Some(Err(e))) => {
                        st.done = true;
                        Some((
                            Err(RegistryError::Network {
                                registry: host,
                                detail: format!("reading {what} failed: {e}"),
                            }),
                            st,
                        ))
                    }
                    Ok(Some(Ok(b))) => {
                        st.moved += b.len() as u64;
                        if st.moved >= MIN_PROGRESS {
                            st.window = Instant::now();
                            st.moved = 0;
                        } else if st.window.elapsed() >= stall {
                            return fail(&mut st).map(|e| (e, st));
                        }
                        Some((Ok(b), st))
                    }
                }
            }
        })
    }

    /// Sends a request built by `build`, answering one authentication challenge.
    /// Sends a request built by `build`, answering one authentication challenge, and retrying
    /// (at most [`ATTEMPTS`] times in all, with a short backoff) when the connection cannot be
    /// made or the registry answers 429, 502, 503 or 504.
    async fn send(&self, build: impl Fn(&Client) -> RequestBuilder) -> Result<Response, RegistryError> {
        let resp = self.send_retrying(&build).await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let challenge = resp
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        self.authenticate(challenge.as_deref()).await?;
        let resp = self.send_retrying(&build).await?;
        if matches!(resp.status(), StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            return Err(self.refused(resp.status()));
        }
        Ok(resp)
    }

    async fn send_retrying(
        &self,
        build: &impl Fn(&Client) -> RequestBuilder,
    ) -> Result<Response, RegistryError> {
        let mut attempt = 1;
        loop {
            let result = self.try_execute(build(&self.client)).await;
            let delay = match &result {
                Err(SendFailure::Http(e)) if e.is_connect() => Some(backoff(attempt, None)),
                Ok(r) if is_transient(r.status()) => Some(backoff(attempt, retry_after(r))),
                _ => None,
            };
            match delay {
                Some(d) if attempt < ATTEMPTS => {
                    tracing::debug!("registry {}: transient failure, retrying in {d:?}", self.host());
                    tokio::time::sleep(d).await;
                    attempt += 1;
                }
                _ => return result.map_err(|f| self.send_failure(&f)),
            }
        }
    }

    fn refused(&self, status: StatusCode) -> RegistryError {
        let detail = match &self.creds {
            Some(c) => format!(
                "the credentials for user {:?} (from {}) were refused ({status})",
                c.user, c.origin
            ),
            None => format!("the registry requires credentials and none were given ({status})"),
        };
        RegistryError::Auth {
            registry: self.host(),
            detail,
        }
    }

    async fn authenticate(&self, challenge: Option<&str>) -> Result<(), RegistryError> {
        let Some(ch) = challenge.and_then(parse_challenge) else {
            return Err(RegistryError::Auth {
                registry: self.host(),
                detail: "401 Unauthorized without a usable WWW-Authenticate challenge".into(),
            });
        };
        match ch.scheme.as_str() {
            "basic" => {
                let Some(c) = &self.creds else {
                    return Err(self.refused(StatusCode::UNAUTHORIZED));
                };
                *self.auth.lock().expect("auth lock") = Some(c.basic_header());
                Ok(())
            }
            "bearer" => {
                let token = self.fetch_token(&ch).await?;
                *self.auth.lock().expect("auth lock") = Some(Zeroizing::new(format!("Bearer {}", &*token)));
                Ok(())
            }
            other => Err(RegistryError::Auth {
                registry: self.host(),
                detail: format!("unsupported authentication scheme {other:?}"),
            }),
        }
    }

    async fn fetch_token(&self, ch: &Challenge) -> Result<Zeroizing<String>, RegistryError> {
        let realm = ch.param("realm").ok_or_else(|| RegistryError::Auth {
            registry: self.host(),
            detail: "Bearer challenge without a realm".into(),
        })?;
        let actions = if self.push { "pull,push" } else { "pull" };
        let scope = format!("repository:{}:{actions}", self.r.repo);
        let mut query: Vec<(&str, &str)> = vec![("scope", &scope)];
        if let Some(s) = ch.param("service") {
            query.push(("service", s));
        }
        // The token realm is the one other place the registry's credentials go, as the token
        // protocol requires; it is named by the registry's own challenge.
        let realm_url = reqwest::Url::parse(realm).map_err(|e| RegistryError::Auth {
            registry: self.host(),
            detail: format!(
                "the Bearer challenge names realm {:?}, which is not a URL: {e}",
                ocicrypt_core::redact::token(realm)
            ),
        })?;
        let mut rb = self.client.get(realm_url).query(&query);
        if let Some(c) = &self.creds {
            let mut v =
                HeaderValue::from_str(c.basic_header().as_str()).map_err(|_| RegistryError::Auth {
                    registry: self.host(),
                    detail: format!("the credentials from {} cannot be sent in a header", c.origin),
                })?;
            v.set_sensitive(true);
            rb = rb.header(AUTHORIZATION, v);
        }
        let resp = tokio::time::timeout(self.stall, rb.send())
            .await
            .map_err(|_| self.stalled(&format!("the token request to {realm}")))?
            .map_err(|e| self.net(&e))?;
        let status = resp.status();
        if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            return Err(self.refused(status));
        }
        if !status.is_success() {
            return Err(self
                .status_error(resp, &format!("token request to {realm}"))
                .await);
        }
        let bytes = Zeroizing::new(
            self.read_body(
                resp,
                MAX_TOKEN_BODY,
                &format!("the answer of token server {realm}"),
            )
            .await?,
        );
        let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| RegistryError::Auth {
            registry: self.host(),
            detail: format!("the token server {realm} answered something that is not JSON: {e}"),
        })?;
        let tok = v
            .get("token")
            .or_else(|| v.get("access_token"))
            .and_then(|t| t.as_str())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| RegistryError::Auth {
                registry: self.host(),
                detail: format!("the token server {realm} returned no token"),
            })?;
        Ok(Zeroizing::new(tok.to_owned()))
    }

    async fn status_error(&self, resp: Response, what: &str) -> RegistryError {
        let status = resp.status();
        // The body only explains the status: read a bounded prefix, and stop at the first
        // error (too long, too slow) without making that the error reported.
        let mut body = Vec::new();
        let mut stream = std::pin::pin!(self.guarded(resp, "an error answer"));
        while let Some(Ok(chunk)) = futures::StreamExt::next(&mut stream).await {
            let room = (MAX_ERROR_BODY as usize).saturating_sub(body.len());
            body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if body.len() as u64 >= MAX_ERROR_BODY {
                break;
            }
        }
        let body = String::from_utf8_lossy(&body);
        let msg = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                v.get("errors")?.as_array()?.first().map(|e| {
                    format!(
                        "{}: {}",
                        e.get("code").and_then(|c| c.as_str()).unwrap_or(""),
                        e.get("message").and_then(|c| c.as_str()).unwrap_or("")
                    )
                })
            })
            .unwrap_or_else(|| body.into_owned());
        let msg = self.server_text(&msg);
        let detail = format!("{what}: {status} {msg}");
        if status.is_server_error() {
            RegistryError::Network {
                registry: self.host(),
                detail,
            }
        } else if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            RegistryError::Auth {
                registry: self.host(),
                detail,
            }
        } else {
            RegistryError::Protocol {
                registry: self.host(),
                detail,
            }
        }
    }

    async fn read_body(&self, resp: Response, limit: u64, what: &str) -> Result<Vec<u8>, RegistryError> {
        if resp.content_length().is_some_and(|l| l > limit) {
            return Err(RegistryError::Protocol {
                registry: self.host(),
                detail: format!("{what} is larger than {limit} bytes"),
            });
        }
        let mut out = Vec::new();
        let mut stream = std::pin::pin!(self.guarded(resp, what));
        while let Some(chunk) = stream.try_next().await? {
            out.extend_from_slice(&chunk);
            if out.len() as u64 > limit {
                return Err(RegistryError::Protocol {
                    registry: self.host(),
                    detail: format!("{what} is larger than {limit} bytes"),
                });
            }
        }
        Ok(out)
    }

    async fn fetch_root(&self) -> Result<(Descriptor, Vec<u8>), CoreError> {
        let url = self.url(&format!("manifests/{}", self.r.reference.as_str()));
        let resp = self
            .send(|c| c.get(&url).header(ACCEPT, MANIFEST_ACCEPT))
            .await
            .map_err(core)?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Err(core(RegistryError::NotFound {
                registry: self.host(),
                what: format!("image {}", self.r),
            }));
        }
        if !resp.status().is_success() {
            return Err(core(
                self.status_error(resp, &format!("GET manifest of {}", self.r))
                    .await,
            ));
        }
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").trim().to_owned())
            .unwrap_or_default();
        let bytes = self
            .read_body(resp, MAX_SMALL, "the manifest")
            .await
            .map_err(core)?;
        let media = if is_manifest_type(&content_type) {
            content_type
        } else {
            let v: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| CoreError::Image(format!("the manifest of {} is not JSON: {e}", self.r)))?;
            match v.get("mediaType").and_then(|m| m.as_str()) {
                Some(m) => m.to_owned(),
                None if v.get("manifests").is_some() => mt::OCI_INDEX.to_owned(),
                None => mt::OCI_MANIFEST.to_owned(),
            }
        };
        let digest = ocicrypt_core::image::digest::sha256_digest(&bytes);
        if let Reference::Digest(d) = &self.r.reference {
            verify_bytes(&format!("manifest of {}", self.r), &bytes, d, bytes.len() as u64)?;
        }
        let desc = descriptor(&media, &digest, bytes.len() as u64)?;
        Ok((desc, bytes))
    }

    fn pending_upload(&self, url: &str, add: bool) {
        let mut u = self.uploads.lock().expect("uploads lock");
        if add {
            u.push(url.to_owned());
        } else {
            u.retain(|x| x != url);
        }
    }

    /// The `Location` of an answer, resolved against the URL that answered.
    fn location(&self, resp: &Response) -> Result<String, RegistryError> {
        let raw = resp
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| RegistryError::Protocol {
                registry: self.host(),
                detail: "blob upload answer without a Location header".into(),
            })?;
        let url = resp.url().join(raw).map_err(|e| RegistryError::Protocol {
            registry: self.host(),
            detail: format!("bad upload location {:?}: {e}", ocicrypt_core::redact::token(raw)),
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(RegistryError::Protocol {
                registry: self.host(),
                detail: format!("upload location with scheme {:?}", url.scheme()),
            });
        }
        if !self.same_origin(&url) {
            tracing::debug!(
                "registry {}: the upload continues at another origin, which gets no credentials",
                self.host()
            );
        }
        Ok(url.to_string())
    }

    async fn delete_upload(&self, url: &str) {
        let _ = self.execute(self.client.delete(url)).await;
        self.pending_upload(url, false);
    }

    /// Mounts blob `digest` from repository `from_repo` of this same registry into this
    /// image's repository (`POST /v2/<repo>/blobs/uploads/?mount=<digest>&from=<from_repo>`), so
    /// that its bytes do not travel through this process: what skopeo does for layers that
    /// stay as they are. `Ok(true)`: the registry mounted it (`201 Created`). `Ok(false)`: it
    /// did not (the blob is not in `from_repo`, or the registry does not mount and opened a
    /// normal upload instead, `202 Accepted`; that upload is deleted): push the blob with
    /// [`ImageDest::write_blob`] as usual.
    ///
    /// # Errors
    /// As any request: unreachable registry, refused credentials, another status.
    pub async fn mount_blob(&self, digest: &str, from_repo: &str) -> Result<bool, CoreError> {
        let mut url = reqwest::Url::parse(&self.url("blobs/uploads/")).map_err(|e| {
            core(RegistryError::Protocol {
                registry: self.host(),
                detail: format!("bad upload URL: {e}"),
            })
        })?;
        url.query_pairs_mut()
            .append_pair("mount", digest)
            .append_pair("from", from_repo);
        let resp = self
            .send(|c| c.post(url.clone()).header(CONTENT_LENGTH, "0"))
            .await
            .map_err(core)?;
        match resp.status() {
            StatusCode::CREATED => {
                tracing::debug!(
                    "registry {}: mounted {digest} from {from_repo} into {}",
                    self.host(),
                    self.r.repo
                );
                Ok(true)
            }
            StatusCode::ACCEPTED => {
                // A plain upload was started instead: nothing is committed without a PUT, but
                // remove it now rather than leave it to the registry's garbage collection.
                if let Ok(loc) = self.location(&resp) {
                    self.delete_upload(&loc).await;
                }
                Ok(false)
            }
            _ => Err(core(
                self.status_error(resp, &format!("mounting blob {digest} from {from_repo}"))
                    .await,
            )),
        }
    }

    /// The repository this image is in (`library/busybox`), and its registry as named
    /// (`host[:port]`): a blob can be mounted between two images with the same registry.
    pub fn repository(&self) -> (&str, &str) {
        (&self.r.host, &self.r.repo)
    }

    async fn upload(&self, data: &mut (dyn AsyncRead + Send + Unpin)) -> Result<(String, u64), CoreError> {
        let start = self.url("blobs/uploads/");
        let resp = self
            .send(|c| c.post(&start).header(CONTENT_LENGTH, "0"))
            .await
            .map_err(core)?;
        if resp.status() != StatusCode::ACCEPTED {
            return Err(core(self.status_error(resp, "starting a blob upload").await));
        }
        let loc = self.location(&resp).map_err(core)?;
        self.pending_upload(&loc, true);
        let mut current = loc;
        match self.upload_to(&mut current, data).await {
            Ok(r) => {
                self.pending_upload(&current, false);
                Ok(r)
            }
            Err(e) => {
                self.delete_upload(&current).await;
                Err(e)
            }
        }
    }

    /// The upload continues at `next` (a registry's `Location` carries its state: the
    /// docker-registry refuses to delete an upload under a stale one).
    fn moved_upload(&self, current: &mut String, next: String) {
        let mut u = self.uploads.lock().expect("uploads lock");
        for x in u.iter_mut().filter(|x| **x == *current) {
            x.clone_from(&next);
        }
        *current = next;
    }

    /// Streams `data` to the upload at `current` and commits it; `current` follows the
    /// registry's `Location`s. When the source fails or the run is interrupted, the body is
    /// ended cleanly (nothing is committed without the final `PUT`) so that the registry answers
    /// with the upload's current location, which the caller then deletes.
    async fn upload_to(
        &self,
        current: &mut String,
        data: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<(String, u64), CoreError> {
        let loc = current.clone();
        let loc = loc.as_str();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, io::Error>>(CHUNKS_IN_FLIGHT);
        // When the body last moved (or the stream ended): the upload fails if that is too long ago.
        let activity = Arc::new(Mutex::new(Instant::now()));
        let touch = |a: &Mutex<Instant>| *a.lock().expect("activity lock") = Instant::now();
        let act = Arc::clone(&activity);
        let body_stream = futures::stream::unfold(rx, move |mut rx| {
            let act = Arc::clone(&act);
            async move {
                let item = rx.recv().await;
                touch(&act);
                item.map(|i| (i, rx))
            }
        });
        let body = reqwest::Body::wrap_stream(body_stream);
        let pump_activity = Arc::clone(&activity);
        let cancel = self.cancel.clone();
        let cancelled = move || cancel.as_ref().is_some_and(|c| c.load(Ordering::SeqCst));
        let pump = async move {
            let mut hasher = Sha256::new();
            let mut len = 0u64;
            loop {
                if cancelled() {
                    return Err(PumpError::Cancelled);
                }
                let mut buf = vec![0u8; CHUNK];
                let n = match fill(data, &mut buf).await {
                    Ok(n) => n,
                    Err(e) => return Err(PumpError::Source(e)),
                };
                if n == 0 {
                    break;
                }
                buf.truncate(n);
                hasher.update(&buf);
                len += n as u64;
                if tx.send(Ok(buf)).await.is_err() {
                    return Err(PumpError::Closed);
                }
            }
            drop(tx);
            touch(&pump_activity);
            Ok((format_sha256(hasher), len))
        };
        let request = async {
            let mut headers = HeaderMap::new();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
            let send = self.execute_upload(self.upload_client.patch(loc).headers(headers).body(body));
            tokio::pin!(send);
            loop {
                tokio::select! {
                    r = &mut send => return r,
                    () = tokio::time::sleep(Duration::from_secs(2)) => {
                        let idle = activity.lock().expect("activity lock").elapsed();
                        if idle > self.stall {
                            return Err(self.stalled("the blob upload"));
                        }
                    }
                }
            }
        };
        let (pumped, sent) = tokio::join!(pump, request);
        if matches!(pumped, Err(PumpError::Source(_) | PumpError::Cancelled)) {
            if let Ok(resp) = &sent {
                if resp.status().is_success() {
                    if let Ok(next) = self.location(resp) {
                        self.moved_upload(current, next);
                    }
                }
            }
        }
        let (digest, len) = match pumped {
            Ok(x) => x,
            Err(PumpError::Source(e)) => return Err(CoreError::from_stream(e)),
            Err(PumpError::Cancelled) => {
                return Err(CoreError::Io(io::Error::new(
                    io::ErrorKind::Interrupted,
                    "the blob upload was interrupted",
                )))
            }
            Err(PumpError::Closed) => {
                return Err(match sent {
                    Ok(resp) => core(self.status_error(resp, "uploading a blob").await),
                    Err(e) => core(e),
                })
            }
        };
        let resp = sent.map_err(core)?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            return Err(core(self.refused(resp.status())));
        }
        if !resp.status().is_success() {
            return Err(core(self.status_error(resp, "uploading a blob").await));
        }
        let next = self.location(&resp).unwrap_or_else(|_| loc.to_owned());
        self.moved_upload(current, next.clone());
        let mut url = reqwest::Url::parse(&next).map_err(|e| {
            core(RegistryError::Protocol {
                registry: self.host(),
                detail: format!("bad upload location {next:?}: {e}"),
            })
        })?;
        url.query_pairs_mut().append_pair("digest", &digest);
        let resp = self
            .execute(self.client.put(url).header(CONTENT_LENGTH, "0"))
            .await
            .map_err(core)?;
        if resp.status() != StatusCode::CREATED {
            return Err(core(
                self.status_error(resp, &format!("committing blob {digest}"))
                    .await,
            ));
        }
        Ok((digest, len))
    }

    async fn put_manifest(&self, reference: &str, bytes: &[u8], media_type: &str) -> Result<(), CoreError> {
        let url = self.url(&format!("manifests/{reference}"));
        let resp = self
            .send(|c| c.put(&url).header(CONTENT_TYPE, media_type).body(bytes.to_vec()))
            .await
            .map_err(core)?;
        if !resp.status().is_success() {
            return Err(core(
                self.status_error(resp, &format!("pushing manifest {reference}"))
                    .await,
            ));
        }
        Ok(())
    }
}

impl ImageSource for RegistryImage {
    fn describe(&self) -> String {
        self.r.to_string()
    }

    fn registry_repository(&self) -> Option<(String, String)> {
        Some((self.r.host.clone(), self.r.repo.clone()))
    }

    fn root(&self) -> BoxFuture<'_, Result<Descriptor, CoreError>> {
        Box::pin(async move {
            if let Some((d, _)) = self.root.lock().expect("root lock").as_ref() {
                return Ok(d.clone());
            }
            let (d, b) = self.fetch_root().await?;
            *self.root.lock().expect("root lock") = Some((d.clone(), b));
            Ok(d)
        })
    }

    fn read_small<'a>(&'a self, desc: &'a Descriptor) -> BoxFuture<'a, Result<Vec<u8>, CoreError>> {
        Box::pin(async move {
            let digest = desc.digest().to_string();
            if let Some((d, b)) = self.root.lock().expect("root lock").as_ref() {
                if d.digest().to_string() == digest {
                    return Ok(b.clone());
                }
            }
            if desc.size() > MAX_SMALL {
                return Err(CoreError::Image(format!(
                    "{digest} in {} is {} bytes, more than the {MAX_SMALL} read into memory for a manifest or config",
                    self.r,
                    desc.size()
                )));
            }
            let media = desc.media_type().to_string();
            let (url, accept) = if is_manifest_type(&media) {
                (self.url(&format!("manifests/{digest}")), MANIFEST_ACCEPT)
            } else {
                (self.url(&format!("blobs/{digest}")), "*/*")
            };
            let resp = self
                .send(|c| c.get(&url).header(ACCEPT, accept))
                .await
                .map_err(core)?;
            if resp.status() == StatusCode::NOT_FOUND {
                return Err(core(RegistryError::NotFound {
                    registry: self.host(),
                    what: format!("{digest} (of {})", self.r),
                }));
            }
            if !resp.status().is_success() {
                return Err(core(self.status_error(resp, &format!("GET {digest}")).await));
            }
            let bytes = self
                .read_body(resp, desc.size(), &digest)
                .await
                .map_err(|e| match e {
                    RegistryError::Protocol { .. } => CoreError::DigestMismatch {
                        what: format!("{digest} from {}", self.r),
                        expected: format!("{digest} ({} bytes)", desc.size()),
                        actual: format!("more than {} bytes", desc.size()),
                    },
                    other => core(other),
                })?;
            verify_bytes(&format!("{digest} from {}", self.r), &bytes, &digest, desc.size())?;
            Ok(bytes)
        })
    }

    fn open_blob<'a>(&'a self, desc: &'a Descriptor) -> BoxFuture<'a, Result<BlobReader, CoreError>> {
        Box::pin(async move {
            let digest = desc.digest().to_string();
            let url = self.url(&format!("blobs/{digest}"));
            let resp = self.send(|c| c.get(&url)).await.map_err(core)?;
            if resp.status() == StatusCode::NOT_FOUND {
                return Err(core(RegistryError::NotFound {
                    registry: self.host(),
                    what: format!("blob {digest} (of {})", self.r),
                }));
            }
            if !resp.status().is_success() {
                return Err(core(self.status_error(resp, &format!("GET blob {digest}")).await));
            }
            let stream = Box::pin(
                self.guarded(resp, &format!("blob {digest}"))
                    .map_err(io::Error::other),
            );
            let reader = tokio_util::io::StreamReader::new(stream);
            let r = VerifyReader::new(
                reader,
                &digest,
                desc.size(),
                format!("blob {digest} from {}", self.r),
            )?;
            Ok(Box::pin(r) as BlobReader)
        })
    }
}

impl ImageDest for RegistryImage {
    fn describe(&self) -> String {
        self.r.to_string()
    }

    /// An unchanged blob of another repository of this registry is mounted
    /// ([`mount_blob`](Self::mount_blob)), as skopeo does; a registry that will not mount it
    /// (`202`, or an error such as a token without pull access to the other repository) gets
    /// it uploaded as usual.
    fn copy_unchanged<'a>(
        &'a self,
        src: &'a dyn ImageSource,
        desc: &'a Descriptor,
    ) -> BoxFuture<'a, Result<Option<Transfer>, CoreError>> {
        Box::pin(async move {
            let Some((host, repo)) = src.registry_repository() else {
                return Ok(None);
            };
            if host != self.r.host || repo == self.r.repo {
                return Ok(None);
            }
            match self.mount_blob(desc.digest().as_ref(), &repo).await {
                Ok(true) => Ok(Some(Transfer::Mounted)),
                Ok(false) => Ok(None),
                Err(e) => {
                    tracing::debug!(
                        "registry {host}: mounting {} from {repo} failed ({e}); uploading it",
                        desc.digest()
                    );
                    Ok(None)
                }
            }
        })
    }

    fn has_blob<'a>(&'a self, desc: &'a Descriptor) -> BoxFuture<'a, Result<bool, CoreError>> {
        Box::pin(async move {
            let url = self.url(&format!("blobs/{}", desc.digest()));
            let resp = self.send(|c| c.request(Method::HEAD, &url)).await.map_err(core)?;
            match resp.status() {
                s if s.is_success() => Ok(true),
                StatusCode::NOT_FOUND => Ok(false),
                _ => Err(core(
                    self.status_error(resp, &format!("HEAD blob {}", desc.digest()))
                        .await,
                )),
            }
        })
    }

    fn write_blob<'a>(
        &'a self,
        _media_type: &'a str,
        _size_hint: Option<u64>,
        data: &'a mut (dyn AsyncRead + Send + Unpin),
    ) -> BoxFuture<'a, Result<(String, u64), CoreError>> {
        Box::pin(self.upload(data))
    }

    fn write_manifest<'a>(
        &'a self,
        bytes: &'a [u8],
        media_type: &'a str,
    ) -> BoxFuture<'a, Result<(), CoreError>> {
        Box::pin(async move {
            let digest = ocicrypt_core::image::digest::sha256_digest(bytes);
            self.put_manifest(&digest, bytes, media_type).await
        })
    }

    fn set_root<'a>(&'a self, desc: &'a Descriptor, bytes: &'a [u8]) -> BoxFuture<'a, Result<(), CoreError>> {
        Box::pin(async move {
            let media = desc.media_type().to_string();
            match &self.r.reference {
                Reference::Tag(t) => self.put_manifest(t, bytes, &media).await,
                Reference::Digest(d) => {
                    let got = desc.digest().to_string();
                    if &got != d {
                        return Err(CoreError::Image(format!(
                            "the result has digest {got}, not {d}: push it to a tag instead of {}",
                            self.r
                        )));
                    }
                    self.put_manifest(d, bytes, &media).await
                }
            }
        })
    }

    fn abort(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let pending = std::mem::take(&mut *self.uploads.lock().expect("uploads lock"));
            for u in pending {
                let _ = self.execute(self.client.delete(&u)).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        let c = parse_challenge(r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#)
            .unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.param("realm"), Some("https://auth.example/token"));
        assert_eq!(c.param("service"), Some("registry.example"));
        assert_eq!(c.param("scope"), Some("repository:a/b:pull,push"));
        let c = parse_challenge(r#"Basic realm="test-realm""#).unwrap();
        assert_eq!(
            (c.scheme.as_str(), c.param("realm")),
            ("basic", Some("test-realm"))
        );
        let c = parse_challenge("Bearer realm=https://x/t, service=reg").unwrap();
        assert_eq!(c.param("service"), Some("reg"));
        assert!(parse_challenge("").is_none());
    }
}

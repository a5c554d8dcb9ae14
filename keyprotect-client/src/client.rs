//! The async Key Protect client.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ocicrypt_core::redact::server_text;
use rand::Rng;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{Method, StatusCode, Url};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::Mutex;
use zeroize::Zeroizing;

use crate::error::{is_transient_status, Operation, Reason, TransportKind};
use crate::types::{
    Collection, CreateKey, Key, KeyVersion, ListKeysOptions, RewrapOutput, RewrapResponse, Rewrapped,
    UnwrapOutput, UnwrapResponse, WrapOutput, WrapResponse,
};
use crate::{b64, Error, KeyProtectConfig};

/// Header carrying the instance GUID.
pub const HEADER_INSTANCE: &str = "bluemix-instance";
/// Header carrying the correlation id.
pub const HEADER_CORRELATION: &str = "correlation-id";

/// Environment variable naming a PEM CA bundle to trust in addition to the built-in roots.
pub const ENV_CA_BUNDLE: &str = "KP_CA_BUNDLE";

/// Largest successful Key Protect answer read, in bytes (a `list keys` page of 5000 keys is
/// about 4 MiB). A longer answer is an error; reading stops at the limit.
pub const MAX_RESPONSE_BODY: usize = 8 << 20;

/// Largest error answer (Key Protect or IAM) and IAM token answer read, in bytes; the rest of an
/// error answer is not read.
pub const MAX_ERROR_BODY: usize = 64 << 10;

/// Longest IAM token lifetime believed (IAM issues 1-hour tokens); a longer `expires_in` is
/// cut to this.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// At most this many of an error's `reasons` are kept.
const MAX_REASONS: usize = 8;

/// Transport and retry settings.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Per-request timeout (default 30 s).
    pub request_timeout: Duration,
    /// Connect timeout (default 10 s).
    pub connect_timeout: Duration,
    /// Maximum attempts per call, first one included (default 5).
    pub max_attempts: u32,
    /// First backoff step (default 1 s); the n-th retry waits a random time in
    /// `0..=min(backoff_cap, backoff_base * 2^(n-1))` (full jitter).
    pub backoff_base: Duration,
    /// Backoff cap (default 30 s).
    pub backoff_cap: Duration,
    /// Longest `Retry-After` honoured (default 60 s); longer ones end the retries.
    pub max_retry_after: Duration,
    /// Overall bound on the time spent retrying one call (default 120 s).
    pub retry_deadline: Duration,
    /// Extra PEM CA certificates to trust (a bundle).
    pub ca_bundle_pem: Option<Vec<u8>>,
    /// Proxies from `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` (default true; ignored for loopback).
    pub proxy_from_env: bool,
    /// User agent.
    pub user_agent: String,
    /// Refresh the IAM token once this fraction of its lifetime has passed (default 0.8).
    pub token_refresh_fraction: f64,
    /// Treat the token as expired this long before its end (default 60 s, at most a quarter
    /// of its lifetime).
    pub token_expiry_margin: Duration,
    /// At most this many Key Protect requests of this client (and its clones) in flight at
    /// once; `None` for no limit (default). Backoff sleeps do not hold a slot.
    pub max_concurrent_requests: Option<usize>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            max_attempts: 5,
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(60),
            retry_deadline: Duration::from_secs(120),
            ca_bundle_pem: None,
            proxy_from_env: true,
            user_agent: concat!("imgcrypt-keyprotect-client/", env!("CARGO_PKG_VERSION")).to_owned(),
            max_concurrent_requests: None,
            token_refresh_fraction: 0.8,
            token_expiry_margin: Duration::from_secs(60),
        }
    }
}

impl ClientOptions {
    /// Defaults, plus the CA bundle named by `KP_CA_BUNDLE` when set.
    ///
    /// # Errors
    /// [`Error::Config`] when the bundle cannot be read.
    pub fn from_env() -> Result<Self, Error> {
        let mut o = Self::default();
        if let Some(p) = std::env::var_os(ENV_CA_BUNDLE).filter(|p| !p.is_empty()) {
            o = o.with_ca_bundle_file(Path::new(&p))?;
        }
        Ok(o)
    }

    /// Trusts the PEM certificates in `path` too.
    ///
    /// # Errors
    /// [`Error::Config`] when the file cannot be read.
    pub fn with_ca_bundle_file(mut self, path: &Path) -> Result<Self, Error> {
        let pem = std::fs::read(path)
            .map_err(|e| Error::Config(format!("cannot read CA bundle {}: {e}", path.display())))?;
        self.ca_bundle_pem = Some(pem);
        Ok(self)
    }
}

struct CachedToken {
    value: SecretString,
    refresh_at: Instant,
    expires_at: Instant,
}

struct Inner {
    http: reqwest::Client,
    api_base: Url,
    token_url: Url,
    instance_id: String,
    apikey: SecretString,
    opts: ClientOptions,
    token: Mutex<Option<CachedToken>>,
    kp_url: String,
    limit: Option<tokio::sync::Semaphore>,
}

/// An IBM Key Protect client for one instance. Cheap to clone (shares one connection pool and
/// one token cache).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("api_base", &self.inner.api_base.as_str())
            .field("token_url", &self.inner.token_url.as_str())
            .field("instance_id", &self.inner.instance_id)
            .finish_non_exhaustive()
    }
}

enum Body {
    None,
    Json(&'static str, Zeroizing<Vec<u8>>),
}

/// What a request carries that must never come back in an error or a log (a server or proxy
/// may echo the request): the API key (also form-encoded), the bearer token, plaintexts.
#[derive(Default)]
struct Secrets(Vec<Zeroizing<String>>);

impl Secrets {
    fn with(mut self, s: &str) -> Self {
        // Short strings would scrub ordinary words; no secret we send is that short.
        if s.len() >= 8 {
            self.0.push(Zeroizing::new(s.to_owned()));
        }
        self
    }

    /// A plaintext, in the base64 form sent and, when it is text, as itself.
    fn with_plaintext(self, plaintext: &[u8], b64: &str) -> Self {
        let s = self.with(b64);
        match std::str::from_utf8(plaintext) {
            Ok(t) => s.with(t).with(t.trim()),
            Err(_) => s,
        }
    }

    /// These secrets plus the bearer token and the API key (raw and form-encoded).
    fn clone_with(&self, token: &str, apikey: &str) -> Self {
        let mut s = Self(self.0.clone()).with(token).with(apikey);
        let form = Zeroizing::new(form_encode(apikey));
        if *form != apikey {
            s = s.with(&form);
        }
        s
    }

    fn scrub(&self, text: &str) -> String {
        let v: Vec<&str> = self.0.iter().map(|s| s.as_str()).collect();
        server_text(text, &v)
    }
}

fn json_body(v: &Value) -> Zeroizing<Vec<u8>> {
    Zeroizing::new(serde_json::to_vec(v).expect("json"))
}

struct Answer {
    status: StatusCode,
    body: Zeroizing<Vec<u8>>,
    correlation_id: String,
}

/// Reads at most `cap` bytes of a response body, chunk by chunk (a server that streams forever
/// costs `cap` bytes, not the request timeout's worth). Returns the bytes and whether the body
/// was longer; the rest is never read (the connection is dropped, not reused).
async fn read_capped(
    mut resp: reqwest::Response,
    cap: usize,
) -> Result<(Zeroizing<Vec<u8>>, bool), reqwest::Error> {
    let hint = resp
        .content_length()
        .map_or(0, |n| usize::try_from(n).unwrap_or(usize::MAX).min(cap));
    // Reserved once so that a plaintext is not left behind in a reallocated buffer.
    let mut buf = Zeroizing::new(Vec::with_capacity(hint.max(8 << 10).min(cap)));
    while let Some(chunk) = resp.chunk().await? {
        let room = cap - buf.len();
        if chunk.len() > room {
            buf.extend_from_slice(&chunk[..room]);
            return Ok((buf, true));
        }
        if buf.capacity() - buf.len() < chunk.len() {
            let mut bigger = Zeroizing::new(Vec::with_capacity(
                (buf.len() + chunk.len()).max(buf.len() * 2).min(cap),
            ));
            bigger.extend_from_slice(&buf);
            buf = bigger;
        }
        buf.extend_from_slice(&chunk);
    }
    Ok((buf, false))
}

impl Client {
    /// A client with default options (and `KP_CA_BUNDLE` if set).
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid config.
    pub fn new(config: KeyProtectConfig) -> Result<Self, Error> {
        Self::with_options(config, ClientOptions::from_env()?)
    }

    /// A client with explicit options.
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid config or CA bundle.
    pub fn with_options(config: KeyProtectConfig, opts: ClientOptions) -> Result<Self, Error> {
        config.validate()?;
        let api_base = config.api_base()?;
        let token_url = config.iam_token_url()?;
        let mut b = reqwest::Client::builder()
            .timeout(opts.request_timeout)
            .connect_timeout(opts.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .user_agent(opts.user_agent.clone())
            .redirect(reqwest::redirect::Policy::none())
            .https_only(false);
        if let Some(pem) = &opts.ca_bundle_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| Error::Config(format!("CA bundle is not valid PEM: {e}")))?;
            if certs.is_empty() {
                return Err(Error::Config("CA bundle holds no certificate".into()));
            }
            for c in certs {
                b = b.add_root_certificate(c);
            }
        }
        let loopback = |u: &Url| u.scheme() == "http" || is_loopback_host(u);
        if !opts.proxy_from_env || (loopback(&api_base) && loopback(&token_url)) {
            b = b.no_proxy();
        }
        let limit = opts
            .max_concurrent_requests
            .map(|n| tokio::sync::Semaphore::new(n.max(1)));
        let http = b
            .build()
            .map_err(|e| Error::Config(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                api_base,
                token_url,
                instance_id: config.instance_id.trim().to_owned(),
                apikey: config.apikey.clone(),
                opts,
                token: Mutex::new(None),
                kp_url: config.url.clone(),
                limit,
            }),
        })
    }

    /// A client from the environment ([`KeyProtectConfig::from_env`]); `Ok(None)` when no
    /// Key Protect variable is set.
    ///
    /// # Errors
    /// [`Error::Config`].
    pub fn from_env() -> Result<Option<Self>, Error> {
        KeyProtectConfig::from_env()?.map(Self::new).transpose()
    }

    /// The instance GUID this client talks to.
    pub fn instance_id(&self) -> &str {
        &self.inner.instance_id
    }

    /// The Key Protect URL as configured.
    pub fn url(&self) -> &str {
        &self.inner.kp_url
    }

    /// The IAM token URL in use.
    pub fn token_url(&self) -> &Url {
        &self.inner.token_url
    }

    // ---------------------------------------------------------------- key actions

    /// Wraps `plaintext` (raw bytes; sent base64) with root key `key_id` (id or alias).
    ///
    /// # Errors
    /// [`Error`]; 409 when the key is not active, 410 when deleted.
    pub async fn wrap(
        &self,
        key_id: &str,
        plaintext: &[u8],
        aad: Option<&[String]>,
    ) -> Result<WrapOutput, Error> {
        if plaintext.is_empty() {
            return Err(Error::InvalidInput("wrap: the plaintext is empty".into()));
        }
        #[derive(serde::Serialize)]
        struct WrapRequest<'a> {
            plaintext: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            aad: Option<&'a [String]>,
        }
        check_aad(aad)?;
        let b64 = Zeroizing::new(b64::encode(plaintext));
        let body = Zeroizing::new(
            serde_json::to_vec(&WrapRequest {
                plaintext: &b64,
                aad: aad.filter(|a| !a.is_empty()),
            })
            .expect("json"),
        );
        let url = self.key_url(key_id, &["actions", "wrap"])?;
        let secrets = Secrets::default().with_plaintext(plaintext, &b64);
        let a = self
            .call(
                Operation::Wrap,
                Method::POST,
                url,
                Body::Json("application/vnd.ibm.kms.key_action_wrap+json", body),
                &secrets,
            )
            .await?;
        let w: WrapResponse = parse(Operation::Wrap, &a)?;
        check_answer_ciphertext(Operation::Wrap, &w.ciphertext, &a)?;
        Ok(WrapOutput {
            ciphertext: w.ciphertext,
            key_version: w.key_version,
            plaintext: None,
        })
    }

    /// Asks Key Protect to generate a 32-byte data key and wrap it; returns both.
    ///
    /// # Errors
    /// As [`wrap`](Self::wrap).
    pub async fn wrap_generate(&self, key_id: &str, aad: Option<&[String]>) -> Result<WrapOutput, Error> {
        let mut body = json!({});
        add_aad(&mut body, aad)?;
        let a = self
            .key_action(Operation::Wrap, key_id, "wrap", body, &Secrets::default())
            .await?;
        let w: WrapResponse = parse(Operation::Wrap, &a)?;
        check_answer_ciphertext(Operation::Wrap, &w.ciphertext, &a)?;
        let p = w.plaintext.as_deref().ok_or_else(|| Error::BadResponse {
            op: Operation::Wrap,
            reason: "no plaintext in the answer to a wrap without plaintext".into(),
            correlation_id: Some(a.correlation_id.clone()),
        })?;
        let plaintext = decode_plaintext(Operation::Wrap, p, &a.correlation_id)?;
        Ok(WrapOutput {
            ciphertext: w.ciphertext,
            key_version: w.key_version,
            plaintext: Some(plaintext),
        })
    }

    /// Unwraps `ciphertext` (the exact string from wrap) with root key `key_id`. When the key was
    /// rotated since, the answer also carries the ciphertext re-wrapped under the latest version.
    ///
    /// # Errors
    /// [`Error`]: 409 suspended key, 410 deleted key, 422 wrong key or AAD.
    pub async fn unwrap(
        &self,
        key_id: &str,
        ciphertext: &str,
        aad: Option<&[String]>,
    ) -> Result<UnwrapOutput, Error> {
        let ct = check_ciphertext(ciphertext)?;
        let mut body = json!({ "ciphertext": ct });
        add_aad(&mut body, aad)?;
        let a = self
            .key_action(Operation::Unwrap, key_id, "unwrap", body, &Secrets::default())
            .await?;
        let u: UnwrapResponse = parse(Operation::Unwrap, &a)?;
        let plaintext_b64 = Zeroizing::new(u.plaintext);
        let plaintext = decode_plaintext(Operation::Unwrap, &plaintext_b64, &a.correlation_id)?;
        // A re-wrapped ciphertext that is not one is dropped: the plaintext is still good.
        let rewrapped = u
            .ciphertext
            .filter(|c| !c.trim().is_empty() && c != ct && b64::decode_lenient(c).is_ok())
            .map(|c| Rewrapped {
                ciphertext: c,
                key_version: u.rewrapped_key_version,
            });
        Ok(UnwrapOutput {
            plaintext,
            key_version: u.key_version,
            rewrapped,
        })
    }

    /// Re-wraps `ciphertext` under the latest version of `key_id` without exposing the plaintext.
    ///
    /// # Errors
    /// As [`unwrap`](Self::unwrap).
    pub async fn rewrap(
        &self,
        key_id: &str,
        ciphertext: &str,
        aad: Option<&[String]>,
    ) -> Result<RewrapOutput, Error> {
        let ct = check_ciphertext(ciphertext)?;
        let mut body = json!({ "ciphertext": ct });
        add_aad(&mut body, aad)?;
        let a = self
            .key_action(Operation::Rewrap, key_id, "rewrap", body, &Secrets::default())
            .await?;
        let r: RewrapResponse = parse(Operation::Rewrap, &a)?;
        check_answer_ciphertext(Operation::Rewrap, &r.ciphertext, &a)?;
        Ok(RewrapOutput {
            ciphertext: r.ciphertext,
            key_version: r.key_version,
            rewrapped_key_version: r.rewrapped_key_version,
        })
    }

    /// Rotates root key `key_id` (a new version; old ciphertexts keep working).
    ///
    /// # Errors
    /// [`Error`].
    pub async fn rotate_key(&self, key_id: &str) -> Result<(), Error> {
        self.key_action(
            Operation::RotateKey,
            key_id,
            "rotate",
            json!({}),
            &Secrets::default(),
        )
        .await
        .map(drop)
    }

    /// Disables (suspends) key `key_id`.
    ///
    /// # Errors
    /// [`Error`].
    pub async fn disable_key(&self, key_id: &str) -> Result<(), Error> {
        self.key_action(
            Operation::DisableKey,
            key_id,
            "disable",
            Value::Null,
            &Secrets::default(),
        )
        .await
        .map(drop)
    }

    /// Enables a suspended key.
    ///
    /// # Errors
    /// [`Error`].
    pub async fn enable_key(&self, key_id: &str) -> Result<(), Error> {
        self.key_action(
            Operation::EnableKey,
            key_id,
            "enable",
            Value::Null,
            &Secrets::default(),
        )
        .await
        .map(drop)
    }

    /// Deletes (destroys) key `key_id`.
    ///
    /// # Errors
    /// [`Error`].
    pub async fn delete_key(&self, key_id: &str) -> Result<(), Error> {
        let url = self.key_url(key_id, &[])?;
        self.call(
            Operation::DeleteKey,
            Method::DELETE,
            url,
            Body::None,
            &Secrets::default(),
        )
        .await
        .map(drop)
    }

    /// Key metadata (never the payload); works in every state.
    ///
    /// # Errors
    /// [`Error`] (404 when unknown).
    pub async fn get_key_metadata(&self, key_id: &str) -> Result<Key, Error> {
        let url = self.key_url(key_id, &["metadata"])?;
        let a = self
            .call(
                Operation::GetKeyMetadata,
                Method::GET,
                url,
                Body::None,
                &Secrets::default(),
            )
            .await?;
        first_key(Operation::GetKeyMetadata, &a)
    }

    /// The versions of a key, newest first (`all_key_states`: also for keys that are not
    /// active, which otherwise give 409).
    ///
    /// # Errors
    /// [`Error`].
    pub async fn list_key_versions(
        &self,
        key_id: &str,
        all_key_states: bool,
    ) -> Result<Vec<KeyVersion>, Error> {
        let mut url = self.key_url(key_id, &["versions"])?;
        if all_key_states {
            url.set_query(Some("allKeyStates=true"));
        }
        let a = self
            .call(
                Operation::ListKeyVersions,
                Method::GET,
                url,
                Body::None,
                &Secrets::default(),
            )
            .await?;
        let c: Collection<KeyVersion> = parse(Operation::ListKeyVersions, &a)?;
        Ok(c.resources)
    }

    /// The key, with its payload for standard keys.
    ///
    /// # Errors
    /// [`Error`].
    pub async fn get_key(&self, key_id: &str) -> Result<Key, Error> {
        let url = self.key_url(key_id, &[])?;
        let a = self
            .call(
                Operation::GetKey,
                Method::GET,
                url,
                Body::None,
                &Secrets::default(),
            )
            .await?;
        first_key(Operation::GetKey, &a)
    }

    /// Lists keys.
    ///
    /// # Errors
    /// [`Error`].
    pub async fn list_keys(&self, o: &ListKeysOptions) -> Result<Vec<Key>, Error> {
        let mut url = self.inner.api_base.join("keys").expect("static path");
        {
            let mut q = url.query_pairs_mut();
            if let Some(l) = o.limit {
                q.append_pair("limit", &l.to_string());
            }
            if let Some(off) = o.offset {
                q.append_pair("offset", &off.to_string());
            }
            if !o.states.is_empty() {
                let s: Vec<String> = o.states.iter().map(|s| s.as_i64().to_string()).collect();
                q.append_pair("state", &s.join(","));
            }
            if let Some(e) = o.extractable {
                q.append_pair("extractable", if e { "true" } else { "false" });
            }
        }
        if url.query() == Some("") {
            url.set_query(None);
        }
        let a = self
            .call(
                Operation::ListKeys,
                Method::GET,
                url,
                Body::None,
                &Secrets::default(),
            )
            .await?;
        let c: Collection<Key> = parse(Operation::ListKeys, &a)?;
        Ok(c.resources)
    }

    /// Creates a root key named `name`.
    ///
    /// # Errors
    /// [`Error`].
    pub async fn create_root_key(&self, name: &str) -> Result<Key, Error> {
        self.create_key(&CreateKey {
            name: name.to_owned(),
            ..CreateKey::default()
        })
        .await
    }

    /// Creates a key.
    ///
    /// # Errors
    /// [`Error`].
    pub async fn create_key(&self, k: &CreateKey) -> Result<Key, Error> {
        if k.name.trim().is_empty() {
            return Err(Error::InvalidInput("create key: the name is empty".into()));
        }
        let mut res = json!({
            "type": "application/vnd.ibm.kms.key+json",
            "name": k.name,
            "extractable": k.extractable,
        });
        if let Some(d) = &k.description {
            res["description"] = json!(d);
        }
        if !k.aliases.is_empty() {
            res["aliases"] = json!(k.aliases);
        }
        let mut secrets = Secrets::default();
        if let Some(p) = &k.payload {
            let enc = Zeroizing::new(b64::encode(p));
            secrets = secrets.with_plaintext(p, &enc);
            res["payload"] = json!(*enc);
        }
        let body = json!({
            "metadata": { "collectionType": "application/vnd.ibm.kms.key+json", "collectionTotal": 1 },
            "resources": [res],
        });
        let url = self.inner.api_base.join("keys").expect("static path");
        let a = self
            .call(
                Operation::CreateKey,
                Method::POST,
                url,
                Body::Json("application/vnd.ibm.kms.key+json", json_body(&body)),
                &secrets,
            )
            .await?;
        first_key(Operation::CreateKey, &a)
    }

    /// Fetches (or reuses) an IAM token; exposed for diagnostics (`imgcrypt kp check`).
    ///
    /// # Errors
    /// [`Error::Iam`] or [`Error::Transport`].
    pub async fn check_credentials(&self) -> Result<(), Error> {
        self.token().await.map(drop)
    }

    // ---------------------------------------------------------------- plumbing

    fn key_url(&self, key_id: &str, tail: &[&str]) -> Result<Url, Error> {
        let id = key_id.trim();
        if id.is_empty() {
            return Err(Error::InvalidInput("the Key Protect key id is empty".into()));
        }
        if id.chars().any(char::is_control) {
            return Err(Error::InvalidInput(
                "the Key Protect key id contains control characters".into(),
            ));
        }
        let mut u = self.inner.api_base.clone();
        u.path_segments_mut()
            .expect("http(s) URL")
            .pop_if_empty()
            .push("keys")
            .push(id)
            .extend(tail);
        Ok(u)
    }

    async fn key_action(
        &self,
        op: Operation,
        key_id: &str,
        action: &str,
        body: Value,
        secrets: &Secrets,
    ) -> Result<Answer, Error> {
        let url = self.key_url(key_id, &["actions", action])?;
        let ct = match action {
            "wrap" => "application/vnd.ibm.kms.key_action_wrap+json",
            "unwrap" => "application/vnd.ibm.kms.key_action_unwrap+json",
            "rewrap" => "application/vnd.ibm.kms.key_action_rewrap+json",
            "rotate" => "application/vnd.ibm.kms.key_action_rotate+json",
            _ => "application/vnd.ibm.kms.key_action+json",
        };
        let body = if body.is_null() {
            Body::None
        } else {
            Body::Json(ct, json_body(&body))
        };
        self.call(op, Method::POST, url, body, secrets).await
    }

    /// Sends one Key Protect request with retries. A create is sent once: any failure may have
    /// happened after the key was made (a 429 or 401 from a proxy, a timeout), and repeating it
    /// would make a second key.
    async fn call(
        &self,
        op: Operation,
        method: Method,
        url: Url,
        body: Body,
        secrets: &Secrets,
    ) -> Result<Answer, Error> {
        let correlation_id = uuid::Uuid::new_v4().to_string();
        let started = Instant::now();
        let host = url.host_str().unwrap_or("?").to_owned();
        let body_bytes = match body {
            Body::None => None,
            Body::Json(ct, v) => Some((ct, v)),
        };
        let once = op == Operation::CreateKey;
        let mut attempts = 0u32;
        let mut reauthed = false;
        loop {
            attempts += 1;
            let token = self.token().await?;
            let mut headers = HeaderMap::new();
            let mut auth =
                HeaderValue::from_str(&format!("Bearer {}", token.expose_secret())).map_err(|_| {
                    Error::BadResponse {
                        op: Operation::Token,
                        reason: "IAM returned an access token that is not a valid header value".into(),
                        correlation_id: None,
                    }
                })?;
            auth.set_sensitive(true);
            headers.insert(AUTHORIZATION, auth);
            headers.insert(
                HEADER_INSTANCE,
                HeaderValue::from_str(&self.inner.instance_id)
                    .map_err(|_| Error::Config("instance-id is not a valid header value".into()))?,
            );
            headers.insert(
                HEADER_CORRELATION,
                HeaderValue::from_str(&correlation_id).expect("uuid"),
            );
            headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
            let mut rb = self
                .inner
                .http
                .request(method.clone(), url.clone())
                .headers(headers);
            if let Some((ct, bytes)) = &body_bytes {
                rb = rb.header(CONTENT_TYPE, *ct).body(bytes.to_vec());
            }
            tracing::debug!(%op, attempt = attempts, %correlation_id, "key protect request");
            let permit = match &self.inner.limit {
                Some(sem) => Some(sem.acquire().await.expect("the semaphore is never closed")),
                None => None,
            };
            let result = match rb.send().await {
                Ok(resp) => {
                    let status = resp.status();
                    let retry_after = resp.headers().get(RETRY_AFTER).and_then(parse_retry_after);
                    let cap = if status.is_success() {
                        MAX_RESPONSE_BODY
                    } else {
                        MAX_ERROR_BODY
                    };
                    Ok((status, retry_after, read_capped(resp, cap).await))
                }
                Err(e) => Err(e),
            };
            drop(permit);
            let secrets = secrets.clone_with(token.expose_secret(), self.inner.apikey.expose_secret());
            let retry_in = match result {
                Ok((status, retry_after, body)) => {
                    let (bytes, cut) = match body {
                        Ok(b) => b,
                        Err(e) => {
                            let kind = transport_kind(&e);
                            match self.backoff(attempts, started, None, !once) {
                                Some(d) => {
                                    tracing::warn!(%op, attempt = attempts, %correlation_id, "reading the response failed ({kind}); retrying");
                                    tokio::time::sleep(d).await;
                                    continue;
                                }
                                None => {
                                    return Err(Error::Transport {
                                        op,
                                        kind,
                                        host,
                                        correlation_id: Some(correlation_id),
                                        attempts,
                                        source: e.without_url(),
                                    })
                                }
                            }
                        }
                    };
                    if status.is_success() {
                        if cut {
                            return Err(Error::BadResponse {
                                op,
                                reason: format!(
                                    "HTTP {} with a body longer than {MAX_RESPONSE_BODY} bytes",
                                    status.as_u16()
                                ),
                                correlation_id: Some(correlation_id),
                            });
                        }
                        return Ok(Answer {
                            status,
                            body: bytes,
                            correlation_id,
                        });
                    }
                    if status == StatusCode::UNAUTHORIZED && !reauthed {
                        reauthed = true;
                        self.invalidate(&token).await;
                        if !once {
                            tracing::info!(%op, %correlation_id, "key protect answered 401; fetching a new IAM token and retrying once");
                            attempts -= 1;
                            continue;
                        }
                    }
                    let err = api_error(
                        op,
                        status.as_u16(),
                        &bytes,
                        correlation_id.clone(),
                        attempts,
                        &secrets,
                    );
                    if !is_transient_status(status.as_u16()) || once {
                        return Err(err);
                    }
                    match self.backoff(attempts, started, retry_after, true) {
                        Some(d) => {
                            tracing::warn!(%op, attempt = attempts, %correlation_id, status = status.as_u16(), delay_ms = d.as_millis() as u64, "key protect busy or failing; retrying");
                            d
                        }
                        None => return Err(err),
                    }
                }
                Err(e) => {
                    let kind = transport_kind(&e);
                    match self.backoff(
                        attempts,
                        started,
                        None,
                        !once && matches!(kind, TransportKind::Timeout | TransportKind::Connection),
                    ) {
                        Some(d) => {
                            tracing::warn!(%op, attempt = attempts, %correlation_id, "key protect {kind}; retrying");
                            d
                        }
                        None => {
                            return Err(Error::Transport {
                                op,
                                kind,
                                host,
                                correlation_id: Some(correlation_id),
                                attempts,
                                source: e.without_url(),
                            })
                        }
                    }
                }
            };
            tokio::time::sleep(retry_in).await;
        }
    }

    /// The delay before the next attempt, or `None` to stop.
    fn backoff(
        &self,
        attempts: u32,
        started: Instant,
        retry_after: Option<Duration>,
        retryable: bool,
    ) -> Option<Duration> {
        let o = &self.inner.opts;
        if !retryable || attempts >= o.max_attempts {
            return None;
        }
        let delay = match retry_after {
            Some(ra) if ra > o.max_retry_after => return None,
            Some(ra) => ra,
            None => jitter(o.backoff_base, o.backoff_cap, attempts),
        };
        if started.elapsed() + delay > o.retry_deadline {
            return None;
        }
        Some(delay)
    }

    async fn invalidate(&self, used: &SecretString) {
        let mut g = self.inner.token.lock().await;
        if g.as_ref()
            .is_some_and(|t| t.value.expose_secret() == used.expose_secret())
        {
            *g = None;
        }
    }

    /// A valid token: cached, refreshed at 80 % of its lifetime (serving the old one if the
    /// refresh fails while it is still valid), single-flight under the mutex.
    async fn token(&self) -> Result<SecretString, Error> {
        let mut g = self.inner.token.lock().await;
        let now = Instant::now();
        let still_valid = match g.as_ref() {
            Some(t) if now < t.refresh_at => return Ok(t.value.clone()),
            Some(t) => now < t.expires_at,
            None => false,
        };
        // A proactive refresh (the cached token is still valid) makes one attempt only, so a
        // failing IAM never delays calls that can still use the old token.
        match self.fetch_token(still_valid).await {
            Ok(t) => {
                let v = t.value.clone();
                *g = Some(t);
                Ok(v)
            }
            Err(e) => match g.as_mut() {
                Some(t) if Instant::now() < t.expires_at => {
                    tracing::warn!("IAM token refresh failed, using the still valid token: {e}");
                    let left = t.expires_at.saturating_duration_since(Instant::now());
                    t.refresh_at = Instant::now() + (left / 2).min(Duration::from_secs(30));
                    Ok(t.value.clone())
                }
                _ => {
                    *g = None;
                    Err(e)
                }
            },
        }
    }

    async fn fetch_token(&self, single_attempt: bool) -> Result<CachedToken, Error> {
        #[derive(Deserialize)]
        struct TokenResponse {
            access_token: SecretString,
            #[serde(default)]
            expires_in: Option<u64>,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct IamError {
            #[serde(default)]
            error_code: Option<String>,
            #[serde(default)]
            error_message: Option<String>,
            #[serde(default)]
            context: Option<IamContext>,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct IamContext {
            #[serde(default)]
            request_id: Option<String>,
        }
        let started = Instant::now();
        let host = self.inner.token_url.host_str().unwrap_or("?").to_owned();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let form = Zeroizing::new(format!(
                "grant_type=urn%3Aibm%3Aparams%3Aoauth%3Agrant-type%3Aapikey&apikey={}",
                form_encode(self.inner.apikey.expose_secret())
            ));
            let sent = Instant::now();
            let res = self
                .inner
                .http
                .post(self.inner.token_url.clone())
                .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                .header(ACCEPT, "application/json")
                .body(form.as_bytes().to_vec())
                .send()
                .await;
            let delay = match res {
                Ok(resp) => {
                    let status = resp.status();
                    let retry_after = resp.headers().get(RETRY_AFTER).and_then(parse_retry_after);
                    let (bytes, cut) = read_capped(resp, MAX_ERROR_BODY).await.unwrap_or_default();
                    let secrets = Secrets::default().clone_with("", self.inner.apikey.expose_secret());
                    if status.is_success() {
                        if cut {
                            return Err(Error::BadResponse {
                                op: Operation::Token,
                                reason: format!("IAM answer is longer than {MAX_ERROR_BODY} bytes"),
                                correlation_id: None,
                            });
                        }
                        let t: TokenResponse =
                            serde_json::from_slice(&bytes).map_err(|e| Error::BadResponse {
                                op: Operation::Token,
                                reason: format!("IAM answer is not a token response ({})", e.classify_str()),
                                correlation_id: None,
                            })?;
                        if t.access_token.expose_secret().is_empty() {
                            return Err(Error::BadResponse {
                                op: Operation::Token,
                                reason: "IAM returned an empty access token".into(),
                                correlation_id: None,
                            });
                        }
                        let life = token_lifetime(t.expires_in);
                        let o = &self.inner.opts;
                        let margin = o.token_expiry_margin.min(life / 4);
                        let fraction = o.token_refresh_fraction.clamp(0.05, 1.0);
                        let at = |d: Duration| sent.checked_add(d).unwrap_or(sent);
                        return Ok(CachedToken {
                            value: t.access_token,
                            refresh_at: at(life.mul_f64(fraction).min(life.saturating_sub(margin))),
                            expires_at: at(life.saturating_sub(margin)),
                        });
                    }
                    let parsed: Option<IamError> = serde_json::from_slice(&bytes).ok();
                    let err = Error::Iam {
                        status: status.as_u16(),
                        code: parsed
                            .as_ref()
                            .and_then(|p| p.error_code.as_deref())
                            .map(|c| secrets.scrub(c)),
                        message: parsed
                            .as_ref()
                            .and_then(|p| p.error_message.as_deref())
                            .map_or_else(|| snippet(&bytes, &secrets), |m| secrets.scrub(m)),
                        request_id: parsed
                            .and_then(|p| p.context)
                            .and_then(|c| c.request_id)
                            .map(|r| secrets.scrub(&r)),
                        attempts,
                    };
                    if !is_transient_status(status.as_u16()) || single_attempt {
                        return Err(err);
                    }
                    match self.backoff(attempts, started, retry_after, true) {
                        Some(d) => d,
                        None => return Err(err),
                    }
                }
                Err(e) => {
                    let kind = transport_kind(&e);
                    let retryable =
                        !single_attempt && matches!(kind, TransportKind::Timeout | TransportKind::Connection);
                    match self.backoff(attempts, started, None, retryable) {
                        Some(d) => d,
                        None => {
                            return Err(Error::Transport {
                                op: Operation::Token,
                                kind,
                                host,
                                correlation_id: None,
                                attempts,
                                source: e.without_url(),
                            })
                        }
                    }
                }
            };
            tracing::warn!(
                attempt = attempts,
                "IAM token exchange failed transiently; retrying"
            );
            tokio::time::sleep(delay).await;
        }
    }
}

trait ClassifyStr {
    fn classify_str(&self) -> &'static str;
}
impl ClassifyStr for serde_json::Error {
    fn classify_str(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "I/O",
            serde_json::error::Category::Syntax => "syntax error",
            serde_json::error::Category::Data => "missing or mistyped field",
            serde_json::error::Category::Eof => "truncated",
        }
    }
}

fn is_loopback_host(u: &Url) -> bool {
    match u.host() {
        Some(url::Host::Ipv4(a)) => a.is_loopback(),
        Some(url::Host::Ipv6(a)) => a.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

fn jitter(base: Duration, cap: Duration, attempt: u32) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    let ceil = exp.min(cap);
    let ms = u64::try_from(ceil.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::thread_rng().gen_range(0..=ms))
}

/// Parses `Retry-After`: delta seconds or an HTTP date.
pub fn parse_retry_after(v: &HeaderValue) -> Option<Duration> {
    let s = v.to_str().ok()?.trim();
    if let Ok(n) = s.parse::<u64>() {
        return Some(Duration::from_secs(n));
    }
    let at = httpdate::parse_http_date(s).ok()?;
    Some(at.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO))
}

fn transport_kind(e: &reqwest::Error) -> TransportKind {
    let mut src: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = src {
        let t = s.to_string().to_ascii_lowercase();
        if t.contains("certificate") || t.contains("invalid peer") || t.contains("handshake") {
            return TransportKind::Tls;
        }
        src = s.source();
    }
    if e.is_timeout() {
        TransportKind::Timeout
    } else if e.is_connect() || e.is_request() || e.is_body() || e.is_decode() {
        // is_request covers "connection closed before message completed" and resets.
        TransportKind::Connection
    } else {
        TransportKind::Other
    }
}

fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn add_aad(body: &mut Value, aad: Option<&[String]>) -> Result<(), Error> {
    check_aad(aad)?;
    if let Some(aad) = aad.filter(|a| !a.is_empty()) {
        body["aad"] = json!(aad);
    }
    Ok(())
}

fn check_aad(aad: Option<&[String]>) -> Result<(), Error> {
    if let Some(aad) = aad.filter(|a| !a.is_empty()) {
        if aad.len() > 126 {
            return Err(Error::InvalidInput(format!(
                "at most 126 AAD strings are allowed, got {}",
                aad.len()
            )));
        }
        if let Some(a) = aad.iter().find(|a| a.chars().count() > 255) {
            return Err(Error::InvalidInput(format!(
                "AAD strings are limited to 255 characters; one has {}",
                a.chars().count()
            )));
        }
    }
    Ok(())
}

fn check_ciphertext(c: &str) -> Result<&str, Error> {
    let c = c.trim();
    if c.is_empty() {
        return Err(Error::InvalidInput("the ciphertext is empty".into()));
    }
    if b64::decode_lenient(c).is_err() {
        return Err(Error::InvalidInput(
            "the ciphertext is not base64; pass the exact string printed by the wrap".into(),
        ));
    }
    Ok(c)
}

/// IAM's `expires_in` as a lifetime: 1 hour when absent, at least 1 s, at most
/// [`MAX_TOKEN_LIFETIME`] (so that no instant arithmetic can overflow).
fn token_lifetime(expires_in: Option<u64>) -> Duration {
    Duration::from_secs(expires_in.unwrap_or(3600).max(1)).min(MAX_TOKEN_LIFETIME)
}

fn decode_plaintext(op: Operation, p: &str, corr: &str) -> Result<Zeroizing<Vec<u8>>, Error> {
    let bad = |reason: &str| Error::BadResponse {
        op,
        reason: reason.into(),
        correlation_id: Some(corr.to_owned()),
    };
    let plaintext = b64::decode_lenient(p)
        .map(Zeroizing::new)
        .map_err(|_| bad("the plaintext in the answer is not base64"))?;
    if plaintext.is_empty() {
        return Err(bad("the plaintext in the answer is empty"));
    }
    Ok(plaintext)
}

/// A ciphertext that Key Protect returned must be one that can be unwrapped later: non-empty
/// base64. Storing anything else (in an image or a `kp-key` Secret) would lose the key.
fn check_answer_ciphertext(op: Operation, c: &str, a: &Answer) -> Result<(), Error> {
    let reason = if c.trim().is_empty() {
        "the ciphertext in the answer is empty"
    } else if !b64::decode_lenient(c).is_ok_and(|b| !b.is_empty()) {
        "the ciphertext in the answer is not base64"
    } else {
        return Ok(());
    };
    Err(Error::BadResponse {
        op,
        reason: reason.into(),
        correlation_id: Some(a.correlation_id.clone()),
    })
}

fn parse<T: for<'de> Deserialize<'de>>(op: Operation, a: &Answer) -> Result<T, Error> {
    serde_json::from_slice(&a.body).map_err(|e| Error::BadResponse {
        op,
        reason: format!(
            "HTTP {} with a body that does not parse ({})",
            a.status.as_u16(),
            e.classify_str()
        ),
        correlation_id: Some(a.correlation_id.clone()),
    })
}

fn first_key(op: Operation, a: &Answer) -> Result<Key, Error> {
    let c: Collection<Key> = parse(op, a)?;
    c.resources.into_iter().next().ok_or_else(|| Error::BadResponse {
        op,
        reason: "empty resources array".into(),
        correlation_id: Some(a.correlation_id.clone()),
    })
}

/// A non-JSON error body, as [`server_text`] renders it.
fn snippet(bytes: &[u8], secrets: &Secrets) -> String {
    let s = String::from_utf8_lossy(&bytes[..bytes.len().min(8 << 10)]);
    let s = secrets.scrub(&s);
    if s.trim().is_empty() {
        "(empty body)".into()
    } else {
        s.trim().to_owned()
    }
}

fn scrub_reason(r: Reason, secrets: &Secrets) -> Reason {
    let opt = |o: Option<String>| o.map(|s| secrets.scrub(&s));
    Reason {
        code: secrets.scrub(&r.code),
        message: secrets.scrub(&r.message),
        status: r.status,
        more_info: opt(r.more_info),
        target: r.target.map(|t| crate::ReasonTarget {
            kind: secrets.scrub(&t.kind),
            name: secrets.scrub(&t.name),
        }),
    }
}

fn api_error(
    op: Operation,
    status: u16,
    body: &[u8],
    correlation_id: String,
    attempts: u32,
    secrets: &Secrets,
) -> Error {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct ErrRes {
        #[serde(default)]
        error_msg: Option<String>,
        #[serde(default)]
        reasons: Option<Vec<Reason>>,
    }
    let parsed: Option<Collection<ErrRes>> = serde_json::from_slice(body).ok();
    let first = parsed.and_then(|c| c.resources.into_iter().next());
    let (message, reasons) = match first {
        Some(r) => (
            r.error_msg
                .map_or_else(|| snippet(body, secrets), |m| secrets.scrub(&m)),
            r.reasons
                .unwrap_or_default()
                .into_iter()
                .take(MAX_REASONS)
                .map(|r| scrub_reason(r, secrets))
                .collect(),
        ),
        None => (snippet(body, secrets), Vec::new()),
    };
    Error::Api {
        op,
        status,
        message,
        reasons,
        correlation_id: Some(correlation_id),
        attempts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_is_bounded() {
        for a in 1..40 {
            let d = jitter(Duration::from_millis(100), Duration::from_secs(2), a);
            assert!(d <= Duration::from_secs(2));
            if a == 1 {
                assert!(d <= Duration::from_millis(100));
            }
        }
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(
            parse_retry_after(&HeaderValue::from_static("3")),
            Some(Duration::from_secs(3))
        );
        let future = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(100));
        let d = parse_retry_after(&HeaderValue::from_str(&future).unwrap()).unwrap();
        assert!(d <= Duration::from_secs(100) && d >= Duration::from_secs(90));
        assert_eq!(
            parse_retry_after(&HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT")),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after(&HeaderValue::from_static("soon")), None);
    }

    #[test]
    fn token_lifetimes_saturate() {
        assert_eq!(token_lifetime(None), Duration::from_secs(3600));
        assert_eq!(token_lifetime(Some(0)), Duration::from_secs(1));
        assert_eq!(token_lifetime(Some(i64::MAX as u64)), MAX_TOKEN_LIFETIME);
        assert_eq!(token_lifetime(Some(u64::MAX)), MAX_TOKEN_LIFETIME);
    }

    #[test]
    fn form_encoding() {
        assert_eq!(form_encode("a b+c/="), "a%20b%2Bc%2F%3D");
    }

    #[test]
    fn error_json_parsing() {
        let body = br#"{"metadata":{"collectionType":"application/vnd.ibm.kms.error+json","collectionTotal":1},
          "resources":[{"errorMsg":"Conflict: Key is not in active state","reasons":[{"code":"KEY_ACTION_INVALID_STATE_ERR","message":"Key is not in a valid state","status":409,"moreInfo":"https://cloud.ibm.com/apidocs/key-protect","target":{"type":"field","name":"id"}}]}]}"#;
        let e = api_error(Operation::Unwrap, 409, body, "c1".into(), 1, &Secrets::default());
        assert!(e.is_key_unusable() && !e.is_transient());
        assert_eq!(e.reasons()[0].code, "KEY_ACTION_INVALID_STATE_ERR");
        let s = e.to_string();
        assert!(
            s.contains("409") && s.contains("KEY_ACTION_INVALID_STATE_ERR") && s.contains("c1"),
            "{s}"
        );
        let e = api_error(
            Operation::Unwrap,
            422,
            b"Unprocessable Entity: Invalid ciphertext",
            "c2".into(),
            1,
            &Secrets::default(),
        );
        assert!(e.to_string().contains("Invalid ciphertext"));
        assert!(api_error(Operation::Wrap, 503, b"", "c".into(), 5, &Secrets::default()).is_transient());
        assert!(!api_error(Operation::Wrap, 501, b"", "c".into(), 1, &Secrets::default()).is_transient());
    }
}

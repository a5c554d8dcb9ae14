//! A local IBM Key Protect + IAM emulator, for tests and CI.
//!
//! It speaks the documented HTTP dialect over a real socket on loopback (plain HTTP):
//!
//! * IAM: `POST /identity/token` and `POST /oidc/token` (API-key grant; JWT-shaped tokens with
//!   `iat`/`exp`, as IBM's SDKs decode them);
//! * keys: `POST /api/v2/keys` (create), `GET|HEAD /api/v2/keys` (list, `Key-Total`),
//!   `GET /api/v2/keys/{id}`, `GET /api/v2/keys/{id}/metadata`, `DELETE /api/v2/keys/{id}`,
//!   `POST /api/v2/keys/{id}/restore`;
//! * actions: `POST /api/v2/keys/{id}/actions/{wrap,unwrap,rewrap,rotate,disable,enable}` and
//!   the legacy `POST /api/v2/keys/{id}?action=...`;
//! * the ciphertext envelope `base64({"ciphertext","iv","version":"4.0.0","handle"})` with real
//!   AES-256-GCM under per-version root key material, AAD bound into the GCM tag;
//! * key states 1/2/3/5 and the statuses they produce (409 suspended, 410 deleted, 422 wrong key
//!   or AAD), the error JSON of the service, header checks (`Authorization: Bearer`,
//!   `bluemix-instance`), `correlation-id` echoed on every answer;
//! * fault injection ([`Fault`]) per operation, and request counters per operation.
//!
//! The server runs on its own thread with its own tokio runtime, so it can be used from
//! synchronous and asynchronous tests alike; dropping the [`Emulator`] stops it.
//!
//! ```
//! use keyprotect_emulator::{Emulator, Fault, Op};
//! let emu = Emulator::start().unwrap();
//! let root = emu.create_root_key("image-keys");
//! emu.inject(Some(Op::Unwrap), Fault::TooManyRequests { retry_after: Some("0".into()) }, 1);
//! let _config = emu.config(); // a KeyProtectConfig pointing at the emulator
//! assert_eq!(emu.count(Op::Unwrap), 0);
//! # let _ = root;
//! ```

mod server;
mod time;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::RngCore;
use zeroize::Zeroizing;

use keyprotect_client::KeyProtectConfig;
use keyprotect_client::KeyState;

/// An emulated operation (what the request counters and fault filters are keyed by).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Op {
    /// IAM token exchange.
    Token,
    /// Create key.
    CreateKey,
    /// List keys (GET or HEAD).
    ListKeys,
    /// Get key.
    GetKey,
    /// Get key metadata.
    GetKeyMetadata,
    /// List key versions.
    ListKeyVersions,
    /// Wrap.
    Wrap,
    /// Unwrap.
    Unwrap,
    /// Rewrap.
    Rewrap,
    /// Rotate.
    Rotate,
    /// Disable.
    Disable,
    /// Enable.
    Enable,
    /// Delete.
    Delete,
    /// Restore.
    Restore,
    /// Anything else (answered 404/405).
    Other,
}

const OP_NAMES: &[(Op, &str)] = &[
    (Op::Token, "token"),
    (Op::CreateKey, "create_key"),
    (Op::ListKeys, "list_keys"),
    (Op::GetKey, "get_key"),
    (Op::GetKeyMetadata, "get_key_metadata"),
    (Op::ListKeyVersions, "list_key_versions"),
    (Op::Wrap, "wrap"),
    (Op::Unwrap, "unwrap"),
    (Op::Rewrap, "rewrap"),
    (Op::Rotate, "rotate"),
    (Op::Disable, "disable"),
    (Op::Enable, "enable"),
    (Op::Delete, "delete"),
    (Op::Restore, "restore"),
    (Op::Other, "other"),
];

impl Op {
    /// The snake_case name used by the admin API (`unwrap`, `get_key_metadata`, ...).
    pub fn name(self) -> &'static str {
        OP_NAMES
            .iter()
            .find(|(o, _)| *o == self)
            .map_or("other", |(_, n)| n)
    }

    /// The operation of a snake_case name.
    pub fn from_name(name: &str) -> Option<Self> {
        OP_NAMES.iter().find(|(_, n)| *n == name).map(|(o, _)| *o)
    }
}

/// A fault the emulator injects instead of (or before) serving a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer 429 with the error JSON, and `Retry-After: <value>` when given (seconds or an
    /// HTTP date).
    TooManyRequests {
        /// The `Retry-After` header value.
        retry_after: Option<String>,
    },
    /// Answer this 5xx status with the error JSON.
    ServerError(u16),
    /// Wait this long, then serve the request normally.
    Slow(Duration),
    /// Close the connection without answering.
    Drop,
    /// Answer 401 (as for an expired token), once per injected count.
    Unauthorized,
}

#[derive(Debug)]
pub(crate) struct FaultRule {
    op: Option<Op>,
    fault: Fault,
    remaining: u32,
}

/// One request as the emulator saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    /// The operation.
    pub op: Op,
    /// HTTP method.
    pub method: String,
    /// Request path (and query).
    pub path: String,
    /// Key id or alias from the path.
    pub key: Option<String>,
    /// The answer's status (0 for a dropped connection).
    pub status: u16,
    /// The `correlation-id` request header.
    pub correlation_id: Option<String>,
    /// The `content-type` request header.
    pub content_type: Option<String>,
}

/// Emulator settings.
#[derive(Clone)]
pub struct EmulatorConfig {
    /// The only instance GUID accepted in `bluemix-instance`.
    pub instance_id: String,
    /// API keys IAM accepts.
    pub api_keys: Vec<String>,
    /// Lifetime of issued tokens (`expires_in`).
    pub token_ttl: Duration,
    /// Reject wrap plaintexts whose base64 is longer than this many characters (the 2019
    /// spec's 4096; unverified against the live service). `None`: no limit.
    pub max_plaintext_b64: Option<usize>,
    /// Address to listen on (must be loopback); port 0 picks a free one.
    pub listen: SocketAddr,
    /// Serve HTTPS with this identity instead of plain HTTP.
    pub tls: Option<TlsIdentity>,
}

/// A server certificate chain and key (PEM) for HTTPS.
#[derive(Clone)]
pub struct TlsIdentity {
    /// The certificate chain, leaf first (PEM).
    pub cert_chain_pem: Vec<u8>,
    /// The private key (PEM: PKCS#8, SEC1 or PKCS#1).
    pub key_pem: Zeroizing<Vec<u8>>,
}

impl TlsIdentity {
    fn acceptor(&self) -> std::io::Result<tokio_rustls::TlsAcceptor> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let bad = |what: &str, e: &dyn fmt::Display| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("emulator TLS {what}: {e}"),
            )
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&self.cert_chain_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| bad("certificate", &e))?;
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem).map_err(|e| bad("key", &e))?;
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let cfg = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("protocol versions", &e))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| bad("identity", &e))?;
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
    }
}

impl fmt::Debug for EmulatorConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmulatorConfig")
            .field("instance_id", &self.instance_id)
            .field("api_keys", &format!("[{} keys]", self.api_keys.len()))
            .field("token_ttl", &self.token_ttl)
            .field("max_plaintext_b64", &self.max_plaintext_b64)
            .field("listen", &self.listen)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        let mut r = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut r);
        Self {
            instance_id: uuid::Uuid::new_v4().to_string(),
            api_keys: vec![format!("kp-emulator-{}", hex_lower(&r))],
            token_ttl: Duration::from_secs(3600),
            max_plaintext_b64: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls: None,
        }
    }
}

pub(crate) struct Version {
    pub id: String,
    pub material: Zeroizing<Vec<u8>>,
    pub created: String,
}

pub(crate) struct KeyRec {
    pub id: String,
    pub name: String,
    pub description: Option<String>,
    pub aliases: Vec<String>,
    pub extractable: bool,
    pub imported: bool,
    pub state: i64,
    pub versions: Vec<Version>,
    pub payload: Option<Zeroizing<Vec<u8>>>,
    pub created: String,
    pub updated: String,
    pub rotated: Option<String>,
    pub deleted: Option<String>,
    pub seq: u64,
}

pub(crate) struct State {
    pub keys: HashMap<String, KeyRec>,
    pub tokens: HashMap<String, Instant>,
    pub faults: Vec<FaultRule>,
    pub counts: BTreeMap<Op, u64>,
    pub log: Vec<RequestRecord>,
    pub seq: u64,
    pub token_ttl: Duration,
    pub in_flight: u64,
    pub max_in_flight: u64,
    pub connections: u64,
    pub unwraps_by_ciphertext: HashMap<String, u64>,
}

pub(crate) struct Shared {
    pub config: EmulatorConfig,
    pub state: Mutex<State>,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking handler must not take the whole emulator down.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

const LOG_CAP: usize = 100_000;

/// A running emulator. Dropping it stops the server.
pub struct Emulator {
    base_url: String,
    addr: SocketAddr,
    handle: EmulatorHandle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for Emulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Emulator")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl Emulator {
    /// Starts an emulator on `127.0.0.1:<free port>` with a random instance id and API key.
    ///
    /// # Errors
    /// The socket cannot be bound.
    pub fn start() -> std::io::Result<Self> {
        Self::start_with(EmulatorConfig::default())
    }

    /// Starts an emulator with `config`.
    ///
    /// # Errors
    /// The socket cannot be bound, or the address is not loopback.
    pub fn start_with(config: EmulatorConfig) -> std::io::Result<Self> {
        if !config.listen.ip().is_loopback() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "the Key Protect emulator listens on loopback only, not {}",
                    config.listen
                ),
            ));
        }
        let tls = config.tls.as_ref().map(TlsIdentity::acceptor).transpose()?;
        let listener = TcpListener::bind(config.listen)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let base_url = base_url_for(addr, tls.is_some());
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                keys: HashMap::new(),
                tokens: HashMap::new(),
                faults: Vec::new(),
                counts: BTreeMap::new(),
                log: Vec::new(),
                seq: 0,
                token_ttl: config.token_ttl,
                in_flight: 0,
                max_in_flight: 0,
                connections: 0,
                unwraps_by_ciphertext: HashMap::new(),
            }),
            config,
        });
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let s2 = shared.clone();
        let thread = std::thread::Builder::new()
            .name("kp-emulator".into())
            .spawn(move || {
                rt.block_on(async move {
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => server::serve(l, s2, tls, stop_rx).await,
                        Err(e) => tracing::error!("kp-emulator: cannot use the listener: {e}"),
                    }
                });
            })?;
        Ok(Self {
            base_url,
            addr,
            handle: EmulatorHandle { shared },
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// Runs until `stop` resolves, on the caller's runtime (for the `kp-emulator` binary).
    ///
    /// # Errors
    /// The socket cannot be bound.
    pub async fn run(
        config: EmulatorConfig,
        on_ready: impl FnOnce(&str, &EmulatorHandle),
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        if !config.listen.ip().is_loopback() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "the Key Protect emulator listens on loopback only, not {}",
                    config.listen
                ),
            ));
        }
        let tls = config.tls.as_ref().map(TlsIdentity::acceptor).transpose()?;
        let l = tokio::net::TcpListener::bind(config.listen).await?;
        let addr = l.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                keys: HashMap::new(),
                tokens: HashMap::new(),
                faults: Vec::new(),
                counts: BTreeMap::new(),
                log: Vec::new(),
                seq: 0,
                token_ttl: config.token_ttl,
                in_flight: 0,
                max_in_flight: 0,
                connections: 0,
                unwraps_by_ciphertext: HashMap::new(),
            }),
            config,
        });
        let base = base_url_for(addr, tls.is_some());
        let handle = EmulatorHandle {
            shared: shared.clone(),
        };
        on_ready(&base, &handle);
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            stop.await;
            let _ = tx.send(());
        });
        server::serve(l, shared, tls, rx).await;
        Ok(())
    }

    /// `http://127.0.0.1:PORT` (`https://` with TLS; no trailing slash); both the Key Protect
    /// and the IAM base URL.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The socket address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The instance GUID the emulator accepts.
    pub fn instance_id(&self) -> &str {
        &self.handle.shared.config.instance_id
    }

    /// The (first) API key IAM accepts.
    pub fn api_key(&self) -> &str {
        &self.handle.shared.config.api_keys[0]
    }

    /// A client config for this emulator (`iam-url` set to the emulator too).
    pub fn config(&self) -> KeyProtectConfig {
        KeyProtectConfig::new(
            &self.base_url,
            self.instance_id(),
            self.api_key(),
            Some(self.base_url.clone()),
        )
    }

    /// The add-on's `config.json` for this emulator (with `iam-url`).
    pub fn config_json(&self) -> String {
        serde_json::json!({
            "keyprotect-url": self.base_url,
            "instance-id": self.instance_id(),
            "apikey": self.api_key(),
            "iam-url": self.base_url,
        })
        .to_string()
    }

    /// A handle on the state (shareable, `Clone`).
    pub fn handle(&self) -> EmulatorHandle {
        self.handle.clone()
    }
}

impl std::ops::Deref for Emulator {
    type Target = EmulatorHandle;
    fn deref(&self) -> &EmulatorHandle {
        &self.handle
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Controls and observes an emulator: keys, faults, counters. [`Emulator`] derefs to it.
#[derive(Clone)]
pub struct EmulatorHandle {
    shared: Arc<Shared>,
}

impl fmt::Debug for EmulatorHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmulatorHandle").finish_non_exhaustive()
    }
}

impl EmulatorHandle {
    /// Creates an active root key (random 256-bit material) and returns its id.
    pub fn create_root_key(&self, name: &str) -> String {
        server::create_key_direct(&self.shared, name, false, None, Vec::new())
    }

    /// Creates a root key with the given aliases and returns its id.
    pub fn create_root_key_with_aliases(&self, name: &str, aliases: &[&str]) -> String {
        server::create_key_direct(
            &self.shared,
            name,
            false,
            None,
            aliases.iter().map(|s| (*s).to_owned()).collect(),
        )
    }

    /// Creates a standard (extractable) key holding `payload` and returns its id.
    pub fn create_standard_key(&self, name: &str, payload: &[u8]) -> String {
        server::create_key_direct(&self.shared, name, true, Some(payload.to_vec()), Vec::new())
    }

    /// Rotates a root key (adds a version). Returns the new version id.
    ///
    /// # Panics
    /// The key does not exist.
    pub fn rotate_key(&self, id: &str) -> String {
        server::rotate_direct(&self.shared, id).expect("emulator: rotate of an unknown key")
    }

    /// Sets a key's state (disable = [`KeyState::Suspended`], delete = [`KeyState::Destroyed`],
    /// expire = [`KeyState::Deactivated`]).
    ///
    /// # Panics
    /// The key does not exist.
    pub fn set_key_state(&self, id: &str, state: KeyState) {
        let mut s = self.shared.lock();
        let k = s.keys.get_mut(id).expect("emulator: unknown key");
        k.state = state.as_i64();
        k.updated = time::now_rfc3339();
        if state == KeyState::Destroyed {
            k.deleted = Some(k.updated.clone());
        }
    }

    /// Disables (suspends) a key.
    pub fn disable_key(&self, id: &str) {
        self.set_key_state(id, KeyState::Suspended);
    }

    /// Re-enables a key.
    pub fn enable_key(&self, id: &str) {
        self.set_key_state(id, KeyState::Active);
    }

    /// Deletes (destroys) a key.
    pub fn delete_key(&self, id: &str) {
        self.set_key_state(id, KeyState::Destroyed);
    }

    /// A key's state, `None` when unknown.
    pub fn key_state(&self, id: &str) -> Option<KeyState> {
        self.shared
            .lock()
            .keys
            .get(id)
            .map(|k| KeyState::from_i64(k.state))
    }

    /// A key's version ids, oldest first.
    pub fn key_versions(&self, id: &str) -> Vec<String> {
        self.shared
            .lock()
            .keys
            .get(id)
            .map(|k| k.versions.iter().map(|v| v.id.clone()).collect())
            .unwrap_or_default()
    }

    /// Ids of all keys (any state).
    pub fn key_ids(&self) -> Vec<String> {
        let s = self.shared.lock();
        let mut v: Vec<(u64, String)> = s.keys.values().map(|k| (k.seq, k.id.clone())).collect();
        v.sort();
        v.into_iter().map(|(_, id)| id).collect()
    }

    /// Injects `fault` for the next `times` requests of `op` (`None`: any operation,
    /// including the IAM token endpoint). Rules apply in the order they were added.
    pub fn inject(&self, op: Option<Op>, fault: Fault, times: u32) {
        if times > 0 {
            self.shared.lock().faults.push(FaultRule {
                op,
                fault,
                remaining: times,
            });
        }
    }

    /// Removes all pending faults.
    pub fn clear_faults(&self) {
        self.shared.lock().faults.clear();
    }

    /// Faults still pending (injected but not yet used).
    pub fn pending_faults(&self) -> u32 {
        self.shared.lock().faults.iter().map(|f| f.remaining).sum()
    }

    /// Invalidates every issued token (the next Key Protect call gets 401).
    pub fn revoke_tokens(&self) {
        self.shared.lock().tokens.clear();
    }

    /// Changes the lifetime of tokens issued from now on.
    pub fn set_token_ttl(&self, ttl: Duration) {
        self.shared.lock().token_ttl = ttl;
    }

    /// Requests received for `op` (faulted ones included).
    pub fn count(&self, op: Op) -> u64 {
        self.shared.lock().counts.get(&op).copied().unwrap_or(0)
    }

    /// All counters.
    pub fn counts(&self) -> BTreeMap<Op, u64> {
        self.shared.lock().counts.clone()
    }

    /// Requests for `op` that were answered with 2xx.
    pub fn successes(&self, op: Op) -> u64 {
        self.shared
            .lock()
            .log
            .iter()
            .filter(|r| r.op == op && (200..300).contains(&r.status))
            .count() as u64
    }

    /// Every request seen (capped at 100 000 entries).
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.lock().log.clone()
    }

    /// Unwrap requests (any answer; injected faults excluded) that carried exactly this
    /// ciphertext, since the last reset: "exactly one unwrap per ciphertext" checks.
    pub fn unwraps_of(&self, ciphertext: &str) -> u64 {
        self.shared
            .lock()
            .unwraps_by_ciphertext
            .get(ciphertext.trim())
            .copied()
            .unwrap_or(0)
    }

    /// TCP connections accepted since the start (a client that pools connections opens few).
    pub fn connections(&self) -> u64 {
        self.shared.lock().connections
    }

    /// The most requests that were being served at the same time (since the last reset).
    pub fn max_in_flight(&self) -> u64 {
        self.shared.lock().max_in_flight
    }

    /// Resets the counters, the request log and the in-flight maximum.
    pub fn reset_counts(&self) {
        let mut s = self.shared.lock();
        s.counts.clear();
        s.log.clear();
        s.unwraps_by_ciphertext.clear();
        s.max_in_flight = s.in_flight;
    }
}

fn base_url_for(addr: SocketAddr, tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    match addr {
        SocketAddr::V4(a) => format!("{scheme}://{a}"),
        SocketAddr::V6(a) => format!("{scheme}://[{}]:{}", a.ip(), a.port()),
    }
}

pub(crate) fn hex_lower(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(crate) fn record(s: &mut State, r: RequestRecord) {
    if s.log.len() < LOG_CAP {
        s.log.push(r);
    }
}

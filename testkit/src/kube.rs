//! A Kubernetes API server stand-in for Secrets and Events, over real HTTP on loopback.
//!
//! No kube-apiserver can be installed offline, so the agent's tests drive the real kube-runtime watcher
//! against this server instead. It speaks the documented wire protocol for the parts the agent uses:
//!
//! - `GET /api/v1/namespaces/{ns}/secrets` list, with `metadata.resourceVersion`, `limit`/`continue`
//!   pages that are consistent at the list's resource version (`410 Gone` with reason `Expired` once the
//!   continue token is older than the compacted history), `resourceVersion` + `resourceVersionMatch`,
//!   `fieldSelector` (`metadata.name`, `metadata.namespace`, `type`; `=`, `==`, `!=`, comma = AND) and
//!   equality/existence `labelSelector`s;
//! - the same path with `?watch=true`: a chunked stream of newline-delimited JSON events
//!   `ADDED`/`MODIFIED`/`DELETED`/`BOOKMARK`, replayed from the history after the given `resourceVersion`
//!   (or synthetic `ADDED` events for the current state when it is empty or `0`), with selector
//!   transitions (an object that stops matching is sent as `DELETED`), `allowWatchBookmarks`,
//!   `timeoutSeconds`, `sendInitialEvents` (streaming lists, ending with the `k8s.io/initial-events-end`
//!   bookmark) and, for a resource version older than the compacted history, the `ERROR` event with a
//!   `410 Expired` `Status` that makes a watcher relist (this is what a real API server sends);
//! - `GET`/`PUT`/`DELETE /api/v1/namespaces/{ns}/secrets/{name}` and `POST .../secrets`, with the API
//!   server's validation (DNS subdomain names, data keys matching `[-._a-zA-Z0-9]+`, 1 MiB total),
//!   `stringData` folded into `data`, optimistic concurrency (`409 Conflict`) and `Status` error bodies;
//! - `POST /api/v1/namespaces/{ns}/events` and `POST`/`PATCH /apis/events.k8s.io/v1/namespaces/{ns}/events`,
//!   recorded so tests can assert them ([`KubeStandin::events`]).
//!
//! Test controls ([`KubeStandin::restart`], [`KubeStandin::compact`], [`KubeStandin::set_stalled`],
//! [`KubeStandin::force_put_secret`], ...) are methods here and, for scripts, `POST /_standin/{restart,
//! compact,stall,unstall}` and `GET /_standin/events`.
//!
//! Not covered (the agent does not use them): other resource kinds, cluster-scoped lists, authentication
//! and authorization (every request is allowed), admission, discovery and OpenAPI (so `kubectl` does not
//! work against it), protobuf, strategic-merge/apply patches on Secrets, finalizers and graceful deletion,
//! `resourceVersionMatch=Exact` semantics beyond the retained history, and TLS (plain HTTP on 127.0.0.1).

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State as AxState};
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::ByteString;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

/// Largest total size of a Secret's data that the API server accepts (1 MiB).
pub const MAX_SECRET_SIZE: usize = 1024 * 1024;
/// How many history entries are kept before the oldest are compacted away.
const HISTORY_LIMIT: usize = 10_000;

/// Errors of the stand-in's own controls (the HTTP side answers with `Status` bodies instead).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StandinError {
    /// Binding or re-binding the loopback socket failed.
    #[error("kube stand-in: cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The API server refused the request (the same check the HTTP side makes).
    #[error("kube stand-in: {code} {reason}: {message}")]
    Api {
        /// HTTP status code.
        code: u16,
        /// Kubernetes reason (`NotFound`, `AlreadyExists`, `Invalid`, `Conflict`, ...).
        reason: String,
        /// Human message.
        message: String,
    },
}

impl StandinError {
    fn api(code: u16, reason: &str, message: impl Into<String>) -> Self {
        StandinError::Api {
            code,
            reason: reason.to_string(),
            message: message.into(),
        }
    }
}

/// One request the server received (method and path with query), for assertions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// HTTP method.
    pub method: String,
    /// Path and query string.
    pub uri: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Added,
    Modified,
    Deleted,
}

#[derive(Debug, Clone)]
struct HistEntry {
    rv: u64,
    kind: Kind,
    /// The object after the change (for `Deleted`: the last state, carrying the deletion's RV).
    obj: Secret,
    /// The object before the change.
    prev: Option<Secret>,
}

struct WatchSub {
    ns: String,
    selector: Selector,
    tx: mpsc::UnboundedSender<(u64, Bytes)>,
}

struct State {
    rv: u64,
    objects: BTreeMap<(String, String), Secret>,
    history: VecDeque<HistEntry>,
    /// Watches from a resource version below this are answered with `410 Expired`.
    compacted_rv: u64,
    watchers: Vec<WatchSub>,
    next_uid: u64,
    events: Vec<Value>,
    requests: Vec<RequestRecord>,
    bookmark_interval: Duration,
}

struct Inner {
    addr: SocketAddr,
    state: Mutex<State>,
    stalled: tokio::sync::watch::Sender<bool>,
    server: Mutex<Option<JoinHandle<()>>>,
}

/// A running stand-in. Dropping it stops the server and closes every connection.
pub struct KubeStandin {
    inner: Arc<Inner>,
}

impl KubeStandin {
    /// Starts a server on `127.0.0.1` with an ephemeral port.
    pub async fn start() -> Result<Self, StandinError> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Starts a server on the given loopback address (port 0 picks one).
    pub async fn start_on(addr: SocketAddr) -> Result<Self, StandinError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StandinError::Listen { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| StandinError::Listen { addr, source })?;
        let (stalled, _) = tokio::sync::watch::channel(false);
        let inner = Arc::new(Inner {
            addr,
            state: Mutex::new(State {
                rv: 1,
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                compacted_rv: 1,
                watchers: Vec::new(),
                next_uid: 1,
                events: Vec::new(),
                requests: Vec::new(),
                bookmark_interval: Duration::from_secs(5),
            }),
            stalled,
            server: Mutex::new(None),
        });
        let handle = spawn_server(listener, inner.clone());
        *lock(&inner.server) = Some(handle);
        Ok(KubeStandin { inner })
    }

    /// The socket address.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// The base URL, e.g. `http://127.0.0.1:41234`, for `kube::Config::new`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    /// A kubeconfig document pointing at this server with the given default namespace.
    pub fn kubeconfig_yaml(&self, namespace: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: standin\n  cluster:\n    server: {}\n\
             users:\n- name: standin\n  user: {{}}\ncontexts:\n- name: standin\n  context:\n    cluster: standin\n\
             \x20   user: standin\n    namespace: {namespace}\ncurrent-context: standin\n",
            self.base_url()
        )
    }

    /// Sets how often watches with `allowWatchBookmarks=true` receive a `BOOKMARK` (default 5 s).
    pub fn set_bookmark_interval(&self, every: Duration) {
        self.state().bookmark_interval = every.max(Duration::from_millis(10));
    }

    /// Simulates an API server restart: closes the listener and every connection (watches end without
    /// a final event), forgets the event history (so watchers that resume from an older resource version
    /// get `410 Gone` and must relist), then listens again on the same port.
    ///
    /// `while_down` runs while nothing is listening: changes made there are never sent to any watch.
    pub async fn restart_with(&self, while_down: impl FnOnce(&KubeStandin)) -> Result<(), StandinError> {
        restart_inner(&self.inner, || while_down(self)).await
    }

    /// [`restart_with`](Self::restart_with) with nothing changed while down.
    pub async fn restart(&self) -> Result<(), StandinError> {
        self.restart_with(|_| {}).await
    }

    /// Forgets the event history up to now: watches from an older resource version get `410 Expired`,
    /// continue tokens from older lists get `410 Gone`. Open watches are not affected.
    pub fn compact(&self) {
        let mut st = self.state();
        st.compacted_rv = st.rv;
        st.history.clear();
    }

    /// Holds every watch open without sending anything (events are dropped, no bookmarks) and makes list
    /// requests hang, like a wedged API server or a half-open connection. `false` resumes.
    pub fn set_stalled(&self, stalled: bool) {
        self.inner.stalled.send_replace(stalled);
    }

    /// The current resource version of the store.
    pub fn resource_version(&self) -> u64 {
        self.state().rv
    }

    /// Number of watch streams currently open.
    pub fn open_watches(&self) -> usize {
        let mut st = self.state();
        st.watchers.retain(|w| !w.tx.is_closed());
        st.watchers.len()
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.state().requests.clone()
    }

    /// Every Event object posted so far (core/v1 and events.k8s.io/v1 alike), as JSON.
    pub fn events(&self) -> Vec<Value> {
        self.state().events.clone()
    }

    /// All Secrets in a namespace.
    pub fn secrets(&self, ns: &str) -> Vec<Secret> {
        self.state()
            .objects
            .iter()
            .filter(|((n, _), _)| n == ns)
            .map(|(_, s)| s.clone())
            .collect()
    }

    /// One Secret.
    pub fn get_secret(&self, ns: &str, name: &str) -> Option<Secret> {
        self.state()
            .objects
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
    }

    /// Creates a Secret (validated like the API server does). The namespace comes from the object.
    pub fn create_secret(&self, secret: Secret) -> Result<Secret, StandinError> {
        let ns = secret
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        self.state().create(&ns, secret, true)
    }

    /// Creates or replaces a Secret (validated), ignoring the resource version the caller sent.
    pub fn apply_secret(&self, mut secret: Secret) -> Result<Secret, StandinError> {
        let ns = secret
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = secret.metadata.name.clone().unwrap_or_default();
        let mut st = self.state();
        if st.objects.contains_key(&(ns.clone(), name.clone())) {
            secret.metadata.resource_version = None;
            st.update(&ns, &name, secret, true)
        } else {
            st.create(&ns, secret, true)
        }
    }

    /// Creates or replaces a Secret **without** the API server's validation, to simulate a hostile or
    /// broken server (unsafe data keys, oversized values, names a real server would refuse).
    pub fn force_put_secret(&self, mut secret: Secret) -> Secret {
        let ns = secret
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = secret.metadata.name.clone().unwrap_or_default();
        let mut st = self.state();
        secret.metadata.resource_version = None;
        let res = if st.objects.contains_key(&(ns.clone(), name.clone())) {
            st.update(&ns, &name, secret, false)
        } else {
            st.create(&ns, secret, false)
        };
        res.expect("unvalidated put cannot fail")
    }

    /// Deletes a Secret; returns whether it existed.
    pub fn delete_secret(&self, ns: &str, name: &str) -> bool {
        self.state().delete(ns, name).is_ok()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.inner.state)
    }
}

impl Drop for KubeStandin {
    fn drop(&mut self) {
        if let Some(h) = lock(&self.inner.server).take() {
            h.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn restart_inner(inner: &Shared, while_down: impl FnOnce()) -> Result<(), StandinError> {
    let old = lock(&inner.server).take();
    if let Some(handle) = old {
        handle.abort();
        let _ = handle.await;
    }
    lock(&inner.state).watchers.clear();
    while_down();
    {
        let mut st = lock(&inner.state);
        st.compacted_rv = st.rv;
        st.history.clear();
    }
    let addr = inner.addr;
    let mut attempts = 0;
    let listener = loop {
        match TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(source) if attempts < 50 => {
                attempts += 1;
                tracing::debug!(%source, "re-binding kube stand-in");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(source) => return Err(StandinError::Listen { addr, source }),
        }
    };
    *lock(&inner.server) = Some(spawn_server(listener, inner.clone()));
    Ok(())
}

fn spawn_server(listener: TcpListener, inner: Arc<Inner>) -> JoinHandle<()> {
    let router = router(inner);
    tokio::spawn(async move {
        // Connection tasks live in this JoinSet: aborting the accept task drops it, which aborts every
        // connection, which is what a restarting API server looks like to clients.
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    let svc = hyper_util::service::TowerToHyperService::new(router.clone());
                    conns.spawn(async move {
                        let io = hyper_util::rt::TokioIo::new(stream);
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, svc)
                            .await;
                    });
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
    })
}

type Shared = Arc<Inner>;

fn router(inner: Shared) -> Router {
    Router::new()
        .route("/version", get(version))
        .route(
            "/api/v1/namespaces/{ns}/secrets",
            get(list_or_watch).post(create_secret),
        )
        .route(
            "/api/v1/namespaces/{ns}/secrets/{name}",
            get(get_secret).put(replace_secret).delete(delete_secret),
        )
        .route("/api/v1/namespaces/{ns}/events", post(post_event))
        .route("/apis/events.k8s.io/v1/namespaces/{ns}/events", post(post_event))
        .route(
            "/apis/events.k8s.io/v1/namespaces/{ns}/events/{name}",
            axum::routing::patch(patch_event),
        )
        .route("/_standin/restart", post(ctl_restart))
        .route("/_standin/compact", post(ctl_compact))
        .route("/_standin/stall", post(ctl_stall))
        .route("/_standin/unstall", post(ctl_unstall))
        .route("/_standin/events", get(ctl_events))
        .fallback(fallback)
        .layer(axum::middleware::from_fn_with_state(inner.clone(), log_request))
        .with_state(inner)
}

async fn log_request(
    AxState(inner): AxState<Shared>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let uri = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    lock(&inner.state).requests.push(RequestRecord {
        method: req.method().to_string(),
        uri,
    });
    next.run(req).await
}

// ---------------------------------------------------------------------------------------------------
// Status bodies

fn status(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    });
    let sc = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (sc, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

fn json_response(code: StatusCode, v: &impl serde::Serialize) -> Response {
    match serde_json::to_string(v) {
        Ok(s) => (code, [(header::CONTENT_TYPE, "application/json")], s).into_response(),
        Err(e) => status(500, "InternalError", &e.to_string()),
    }
}

impl IntoResponse for StandinError {
    fn into_response(self) -> Response {
        match self {
            StandinError::Api {
                code,
                reason,
                message,
            } => status(code, &reason, &message),
            other => status(500, "InternalError", &other.to_string()),
        }
    }
}

async fn fallback(method: Method, uri: Uri) -> Response {
    status(
        404,
        "NotFound",
        &format!("the server could not find the requested resource ({method} {uri})"),
    )
}

async fn version() -> Response {
    json_response(
        StatusCode::OK,
        &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-standin", "platform": "linux/amd64"}),
    )
}

// ---------------------------------------------------------------------------------------------------
// Selectors

#[derive(Debug, Clone, Default)]
struct Selector {
    fields: Vec<(String, bool, String)>,
    labels: Vec<LabelReq>,
}

#[derive(Debug, Clone)]
enum LabelReq {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    NotExists(String),
}

impl Selector {
    fn parse(fields: Option<&str>, labels: Option<&str>) -> Result<Self, String> {
        let mut sel = Selector::default();
        for term in fields
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
        {
            let (key, neg, val) = if let Some((k, v)) = term.split_once("!=") {
                (k, true, v)
            } else if let Some((k, v)) = term.split_once("==") {
                (k, false, v)
            } else if let Some((k, v)) = term.split_once('=') {
                (k, false, v)
            } else {
                return Err(format!("invalid selector: '{term}'; can't understand '{term}'"));
            };
            let key = key.trim();
            if !matches!(key, "metadata.name" | "metadata.namespace" | "type") {
                return Err(format!("field label not supported: {key}"));
            }
            sel.fields.push((key.to_string(), neg, val.trim().to_string()));
        }
        for term in labels
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
        {
            let req = if let Some((k, v)) = term.split_once("!=") {
                LabelReq::Ne(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = term.split_once("==") {
                LabelReq::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = term.split_once('=') {
                LabelReq::Eq(k.trim().into(), v.trim().into())
            } else if let Some(k) = term.strip_prefix('!') {
                LabelReq::NotExists(k.trim().into())
            } else if term.contains(' ') || term.contains('(') {
                return Err(format!(
                    "unable to parse requirement: set-based selectors are not supported: {term}"
                ));
            } else {
                LabelReq::Exists(term.into())
            };
            sel.labels.push(req);
        }
        Ok(sel)
    }

    fn matches(&self, s: &Secret) -> bool {
        let fields_ok = self.fields.iter().all(|(k, neg, v)| {
            let actual = match k.as_str() {
                "metadata.name" => s.metadata.name.clone().unwrap_or_default(),
                "metadata.namespace" => s.metadata.namespace.clone().unwrap_or_default(),
                _ => s.type_.clone().unwrap_or_else(|| "Opaque".into()),
            };
            (actual == *v) != *neg
        });
        let empty = BTreeMap::new();
        let labels = s.metadata.labels.as_ref().unwrap_or(&empty);
        fields_ok
            && self.labels.iter().all(|r| match r {
                LabelReq::Eq(k, v) => labels.get(k) == Some(v),
                LabelReq::Ne(k, v) => labels.get(k) != Some(v),
                LabelReq::Exists(k) => labels.contains_key(k),
                LabelReq::NotExists(k) => !labels.contains_key(k),
            })
    }
}

// ---------------------------------------------------------------------------------------------------
// Store

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn is_config_map_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 253
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && k != "."
        && k != ".."
        && !k.starts_with("..")
}

fn validate(secret: &Secret) -> Result<(), StandinError> {
    let name = secret.metadata.name.as_deref().unwrap_or("");
    let invalid =
        |msg: String| StandinError::api(422, "Invalid", format!("Secret \"{name}\" is invalid: {msg}"));
    if !is_dns_subdomain(name) {
        return Err(invalid(format!(
            "metadata.name: Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case \
             alphanumeric characters, '-' or '.'"
        )));
    }
    let mut total = 0usize;
    for (k, v) in secret.data.iter().flatten() {
        if !is_config_map_key(k) {
            return Err(invalid(format!(
                "data[{k}]: Invalid value: \"{k}\": a valid config key must consist of alphanumeric characters, \
                 '-', '_' or '.'"
            )));
        }
        total += v.0.len();
    }
    if total > MAX_SECRET_SIZE {
        return Err(invalid(format!(
            "data: Too long: must have at most {MAX_SECRET_SIZE} bytes"
        )));
    }
    Ok(())
}

fn fold_string_data(secret: &mut Secret) {
    if let Some(sd) = secret.string_data.take() {
        let data = secret.data.get_or_insert_with(BTreeMap::new);
        for (k, v) in sd {
            data.insert(k, ByteString(v.into_bytes()));
        }
    }
}

impl State {
    fn bump(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn record(&mut self, kind: Kind, obj: Secret, prev: Option<Secret>) {
        let entry = HistEntry {
            rv: self.rv,
            kind,
            obj,
            prev,
        };
        self.watchers.retain(|w| !w.tx.is_closed());
        for w in &self.watchers {
            if let Some(line) = event_for(&entry, &w.ns, &w.selector) {
                let _ = w.tx.send((entry.rv, line));
            }
        }
        self.history.push_back(entry);
        while self.history.len() > HISTORY_LIMIT {
            if let Some(old) = self.history.pop_front() {
                self.compacted_rv = old.rv;
            }
        }
    }

    fn create(&mut self, ns: &str, mut secret: Secret, check: bool) -> Result<Secret, StandinError> {
        fold_string_data(&mut secret);
        let name = secret.metadata.name.clone().unwrap_or_default();
        if let Some(obj_ns) = &secret.metadata.namespace {
            if obj_ns != ns {
                return Err(StandinError::api(
                    400,
                    "BadRequest",
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
        }
        if check {
            validate(&secret)?;
        }
        if self.objects.contains_key(&(ns.to_string(), name.clone())) {
            return Err(StandinError::api(
                409,
                "AlreadyExists",
                format!("secrets \"{name}\" already exists"),
            ));
        }
        let rv = self.bump();
        let uid = self.next_uid;
        self.next_uid += 1;
        secret.metadata.namespace = Some(ns.to_string());
        secret.metadata.resource_version = Some(rv.to_string());
        secret.metadata.uid = Some(format!("00000000-0000-4000-8000-{uid:012x}"));
        secret.metadata.creation_timestamp = Some(now());
        if secret.type_.is_none() {
            secret.type_ = Some("Opaque".into());
        }
        self.objects.insert((ns.to_string(), name), secret.clone());
        self.record(Kind::Added, secret.clone(), None);
        Ok(secret)
    }

    fn update(
        &mut self,
        ns: &str,
        name: &str,
        mut secret: Secret,
        check: bool,
    ) -> Result<Secret, StandinError> {
        fold_string_data(&mut secret);
        if secret.metadata.name.as_deref() != Some(name) {
            return Err(StandinError::api(
                400,
                "BadRequest",
                "the name of the object does not match the URL",
            ));
        }
        if check {
            validate(&secret)?;
        }
        let key = (ns.to_string(), name.to_string());
        let Some(prev) = self.objects.get(&key).cloned() else {
            return Err(StandinError::api(
                404,
                "NotFound",
                format!("secrets \"{name}\" not found"),
            ));
        };
        if let Some(rv) = secret
            .metadata
            .resource_version
            .as_deref()
            .filter(|s| !s.is_empty())
        {
            if Some(rv) != prev.metadata.resource_version.as_deref() {
                return Err(StandinError::api(
                    409,
                    "Conflict",
                    format!(
                        "Operation cannot be fulfilled on secrets \"{name}\": the object has been modified; please \
                         apply your changes to the latest version and try again"
                    ),
                ));
            }
        }
        if check && prev.type_ != secret.type_.clone().or_else(|| Some("Opaque".into())) {
            return Err(StandinError::api(
                422,
                "Invalid",
                format!("Secret \"{name}\" is invalid: type: field is immutable"),
            ));
        }
        let rv = self.bump();
        secret.metadata.namespace = Some(ns.to_string());
        secret.metadata.resource_version = Some(rv.to_string());
        secret.metadata.uid = prev.metadata.uid.clone();
        secret.metadata.creation_timestamp = prev.metadata.creation_timestamp.clone();
        if secret.type_.is_none() {
            secret.type_ = prev.type_.clone();
        }
        self.objects.insert(key, secret.clone());
        self.record(Kind::Modified, secret.clone(), Some(prev));
        Ok(secret)
    }

    fn delete(&mut self, ns: &str, name: &str) -> Result<Secret, StandinError> {
        let Some(prev) = self.objects.remove(&(ns.to_string(), name.to_string())) else {
            return Err(StandinError::api(
                404,
                "NotFound",
                format!("secrets \"{name}\" not found"),
            ));
        };
        let rv = self.bump();
        let mut gone = prev.clone();
        gone.metadata.resource_version = Some(rv.to_string());
        self.record(Kind::Deleted, gone.clone(), Some(prev));
        Ok(gone)
    }

    /// The namespace's objects as they were at `rv` (which must not be older than the history).
    fn objects_at(&self, rv: u64) -> BTreeMap<(String, String), Secret> {
        let mut objs = self.objects.clone();
        for e in self.history.iter().rev().take_while(|e| e.rv > rv) {
            let key = (
                e.obj.metadata.namespace.clone().unwrap_or_default(),
                e.obj.metadata.name.clone().unwrap_or_default(),
            );
            match &e.prev {
                Some(p) => {
                    objs.insert(key, p.clone());
                }
                None => {
                    objs.remove(&key);
                }
            }
        }
        objs
    }
}

fn now() -> Time {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Time(
        k8s_openapi::chrono::DateTime::from_timestamp(i64::try_from(secs).unwrap_or(0), 0)
            .unwrap_or_default(),
    )
}

fn watch_line(kind: &str, obj: &impl serde::Serialize) -> Bytes {
    let mut v = serde_json::to_vec(&json!({"type": kind, "object": obj})).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

fn secret_json(s: &Secret) -> Value {
    let mut v = serde_json::to_value(s).unwrap_or(Value::Null);
    if let Some(o) = v.as_object_mut() {
        o.insert("apiVersion".into(), "v1".into());
        o.insert("kind".into(), "Secret".into());
    }
    v
}

/// The watch event a subscriber with this namespace and selector sees for a history entry.
fn event_for(e: &HistEntry, ns: &str, sel: &Selector) -> Option<Bytes> {
    if e.obj.metadata.namespace.as_deref() != Some(ns) {
        return None;
    }
    let now = e.kind != Kind::Deleted && sel.matches(&e.obj);
    let before = e.prev.as_ref().is_some_and(|p| sel.matches(p));
    let kind = match (e.kind, before, now) {
        (Kind::Deleted, true, _) => "DELETED",
        (Kind::Added, _, true) => "ADDED",
        (Kind::Modified, true, true) => "MODIFIED",
        (Kind::Modified, false, true) => "ADDED",
        (Kind::Modified, true, false) => "DELETED",
        _ => return None,
    };
    Some(watch_line(kind, &secret_json(&e.obj)))
}

// ---------------------------------------------------------------------------------------------------
// Handlers

type Q = Query<BTreeMap<String, String>>;

fn flag(q: &BTreeMap<String, String>, k: &str) -> bool {
    q.get(k).is_some_and(|v| v == "true" || v == "1")
}

async fn wait_unstalled(inner: &Inner) {
    let mut rx = inner.stalled.subscribe();
    let _ = rx.wait_for(|s| !*s).await;
}

async fn list_or_watch(AxState(inner): AxState<Shared>, Path(ns): Path<String>, Query(q): Q) -> Response {
    let selector = match Selector::parse(
        q.get("fieldSelector").map(String::as_str),
        q.get("labelSelector").map(String::as_str),
    ) {
        Ok(s) => s,
        Err(msg) => return status(400, "BadRequest", &msg),
    };
    if flag(&q, "watch") {
        return watch(inner, ns, selector, &q);
    }
    wait_unstalled(&inner).await;
    let st = lock(&inner.state);
    // Pages: `continue` carries the list's resource version and the last name returned.
    let (list_rv, after) = if let Some(tok) = q.get("continue").filter(|t| !t.is_empty()) {
        let Some((rv, last)) = tok
            .split_once('/')
            .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b)))
        else {
            return status(400, "BadRequest", "invalid continue token");
        };
        if rv < st.compacted_rv {
            return status(
                410,
                "Expired",
                "The provided continue parameter is too old to display a consistent list result. You can start a \
                 new list without the continue parameter.",
            );
        }
        (rv, Some(last.to_string()))
    } else {
        let requested = q.get("resourceVersion").filter(|v| !v.is_empty() && *v != "0");
        let exact = q.get("resourceVersionMatch").is_some_and(|m| m == "Exact");
        match requested.map(|v| v.parse::<u64>()) {
            None => (st.rv, None),
            Some(Err(_)) => return status(400, "BadRequest", "invalid resourceVersion"),
            Some(Ok(v)) if v > st.rv => {
                return status(
                    504,
                    "Timeout",
                    &format!("Too large resource version: {v}, current: {}", st.rv),
                )
            }
            Some(Ok(v)) if exact && v < st.compacted_rv => {
                return status(
                    410,
                    "Expired",
                    &format!("too old resource version: {v} ({})", st.compacted_rv),
                )
            }
            Some(Ok(v)) if exact => (v, None),
            Some(Ok(_)) => (st.rv, None),
        }
    };
    let limit = q
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0);
    let objs = if list_rv == st.rv {
        st.objects.clone()
    } else {
        st.objects_at(list_rv)
    };
    drop(st);
    let mut items: Vec<Value> = Vec::new();
    let mut next = None;
    for ((o_ns, name), s) in objs.iter() {
        if *o_ns != ns || after.as_ref().is_some_and(|a| name.as_str() <= a.as_str()) || !selector.matches(s)
        {
            continue;
        }
        if limit.is_some_and(|l| items.len() == l) {
            next = items
                .last()
                .and_then(|v| v["metadata"]["name"].as_str().map(|n| format!("{list_rv}/{n}")));
            break;
        }
        items.push(secret_json(s));
    }
    let mut meta = json!({"resourceVersion": list_rv.to_string()});
    if let Some(c) = next {
        meta["continue"] = c.into();
    }
    json_response(
        StatusCode::OK,
        &json!({"kind": "SecretList", "apiVersion": "v1", "metadata": meta, "items": items}),
    )
}

fn watch(inner: Shared, ns: String, selector: Selector, q: &BTreeMap<String, String>) -> Response {
    let bookmarks = flag(q, "allowWatchBookmarks");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .filter(|t| *t > 0)
        .unwrap_or(1800);
    let streaming = flag(q, "sendInitialEvents");
    let (tx, rx) = mpsc::unbounded_channel();
    let mut initial: VecDeque<(u64, Bytes)> = VecDeque::new();
    let bookmark_every;
    {
        let mut st = lock(&inner.state);
        bookmark_every = st.bookmark_interval;
        let from = q.get("resourceVersion").filter(|v| !v.is_empty() && *v != "0");
        if streaming || from.is_none() {
            for ((o_ns, _), s) in &st.objects {
                if *o_ns == ns && selector.matches(s) {
                    initial.push_back((st.rv, watch_line("ADDED", &secret_json(s))));
                }
            }
            if streaming {
                let bm = json!({"kind": "Secret", "apiVersion": "v1", "metadata": {
                    "resourceVersion": st.rv.to_string(),
                    "annotations": {"k8s.io/initial-events-end": "true"}}});
                initial.push_back((st.rv, watch_line("BOOKMARK", &bm)));
            }
        } else if let Some(from) = from {
            let Ok(from) = from.parse::<u64>() else {
                return status(400, "BadRequest", "invalid resourceVersion");
            };
            if from < st.compacted_rv {
                let err = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": format!("too old resource version: {from} ({})", st.compacted_rv),
                    "reason": "Expired", "code": 410});
                let body = Body::from(watch_line("ERROR", &err));
                return (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body).into_response();
            }
            for e in st.history.iter().filter(|e| e.rv > from) {
                if let Some(line) = event_for(e, &ns, &selector) {
                    initial.push_back((e.rv, line));
                }
            }
        }
        st.watchers.push(WatchSub { ns, selector, tx });
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
    let stalled = inner.stalled.subscribe();
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + bookmark_every, bookmark_every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ws = WatchStream {
        inner,
        rx,
        initial,
        ticker,
        deadline,
        bookmarks,
        stalled,
        last_rv: 0,
    };
    let stream = futures::stream::unfold(ws, |mut ws| async move {
        let line = ws.next_line().await?;
        Some((Ok::<_, Infallible>(line), ws))
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(stream.boxed()),
    )
        .into_response()
}

struct WatchStream {
    inner: Shared,
    rx: mpsc::UnboundedReceiver<(u64, Bytes)>,
    initial: VecDeque<(u64, Bytes)>,
    ticker: tokio::time::Interval,
    deadline: tokio::time::Instant,
    bookmarks: bool,
    stalled: tokio::sync::watch::Receiver<bool>,
    last_rv: u64,
}

impl WatchStream {
    async fn next_line(&mut self) -> Option<Bytes> {
        loop {
            if *self.stalled.borrow() {
                // A wedged server: nothing flows until the stall is lifted or the watch times out.
                tokio::select! {
                    _ = self.stalled.wait_for(|s| !*s) => {}
                    _ = tokio::time::sleep_until(self.deadline) => return None,
                }
                // Whatever happened meanwhile was lost for this watch.
                while self.rx.try_recv().is_ok() {}
                self.initial.clear();
                continue;
            }
            if let Some((rv, line)) = self.initial.pop_front() {
                self.last_rv = self.last_rv.max(rv);
                return Some(line);
            }
            tokio::select! {
                biased;
                ev = self.rx.recv() => {
                    let (rv, line) = ev?;
                    if *self.stalled.borrow() { continue; }
                    self.last_rv = self.last_rv.max(rv);
                    return Some(line);
                }
                _ = tokio::time::sleep_until(self.deadline) => return None,
                _ = self.ticker.tick(), if self.bookmarks => {
                    let rv = lock(&self.inner.state).rv;
                    // Every event up to `rv` is already queued (events are queued under the lock):
                    // deliver them before the bookmark so a resumed watch cannot skip one.
                    while let Ok(item) = self.rx.try_recv() {
                        self.initial.push_back(item);
                    }
                    let rv = rv.max(self.last_rv);
                    let bm = json!({"kind": "Secret", "apiVersion": "v1",
                        "metadata": {"resourceVersion": rv.to_string()}});
                    self.initial.push_back((rv, watch_line("BOOKMARK", &bm)));
                }
            }
        }
    }
}

async fn create_secret(AxState(inner): AxState<Shared>, Path(ns): Path<String>, body: Bytes) -> Response {
    let secret: Secret = match serde_json::from_slice(&body) {
        Ok(s) => s,
        Err(e) => return status(400, "BadRequest", &format!("decoding Secret: {e}")),
    };
    match lock(&inner.state).create(&ns, secret, true) {
        Ok(s) => json_response(StatusCode::CREATED, &secret_json(&s)),
        Err(e) => e.into_response(),
    }
}

async fn get_secret(AxState(inner): AxState<Shared>, Path((ns, name)): Path<(String, String)>) -> Response {
    match lock(&inner.state).objects.get(&(ns, name.clone())) {
        Some(s) => json_response(StatusCode::OK, &secret_json(s)),
        None => status(404, "NotFound", &format!("secrets \"{name}\" not found")),
    }
}

async fn replace_secret(
    AxState(inner): AxState<Shared>,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let secret: Secret = match serde_json::from_slice(&body) {
        Ok(s) => s,
        Err(e) => return status(400, "BadRequest", &format!("decoding Secret: {e}")),
    };
    match lock(&inner.state).update(&ns, &name, secret, true) {
        Ok(s) => json_response(StatusCode::OK, &secret_json(&s)),
        Err(e) => e.into_response(),
    }
}

async fn delete_secret(
    AxState(inner): AxState<Shared>,
    Path((ns, name)): Path<(String, String)>,
) -> Response {
    match lock(&inner.state).delete(&ns, &name) {
        Ok(s) => json_response(StatusCode::OK, &secret_json(&s)),
        Err(e) => e.into_response(),
    }
}

async fn post_event(
    AxState(inner): AxState<Shared>,
    Path(ns): Path<String>,
    uri: Uri,
    body: Bytes,
) -> Response {
    let mut ev: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return status(400, "BadRequest", "an Event must be a JSON object"),
        Err(e) => return status(400, "BadRequest", &format!("decoding Event: {e}")),
    };
    let (api_version, kind) = if uri.path().starts_with("/apis/events.k8s.io/") {
        ("events.k8s.io/v1", "Event")
    } else {
        ("v1", "Event")
    };
    let mut st = lock(&inner.state);
    let rv = st.bump();
    let name = ev["metadata"]["name"].as_str().map(str::to_string);
    let name = match name.filter(|n| !n.is_empty()) {
        Some(n) => n,
        None => match ev["metadata"]["generateName"].as_str() {
            Some(g) => format!("{g}{rv:x}"),
            None => return status(422, "Invalid", "Event is invalid: metadata.name: Required value"),
        },
    };
    if !is_dns_subdomain(&name) {
        return status(
            422,
            "Invalid",
            &format!("Event \"{name}\" is invalid: metadata.name: must be a lowercase RFC 1123 subdomain"),
        );
    }
    if st
        .events
        .iter()
        .any(|e| e["metadata"]["namespace"] == ns.as_str() && e["metadata"]["name"] == name.as_str())
    {
        return status(409, "AlreadyExists", &format!("events \"{name}\" already exists"));
    }
    ev["apiVersion"] = api_version.into();
    ev["kind"] = kind.into();
    ev["metadata"]["name"] = name.into();
    ev["metadata"]["namespace"] = ns.into();
    ev["metadata"]["resourceVersion"] = rv.to_string().into();
    st.events.push(ev.clone());
    json_response(StatusCode::CREATED, &ev)
}

fn merge_patch(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

async fn patch_event(
    AxState(inner): AxState<Shared>,
    Path((ns, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let patch: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return status(400, "BadRequest", &format!("decoding patch: {e}")),
    };
    let mut st = lock(&inner.state);
    let rv = st.bump();
    let Some(ev) = st
        .events
        .iter_mut()
        .find(|e| e["metadata"]["namespace"] == ns.as_str() && e["metadata"]["name"] == name.as_str())
    else {
        return status(
            404,
            "NotFound",
            &format!("events.events.k8s.io \"{name}\" not found"),
        );
    };
    merge_patch(ev, &patch);
    ev["metadata"]["resourceVersion"] = rv.to_string().into();
    let out = ev.clone();
    json_response(StatusCode::OK, &out)
}

async fn ctl_restart(AxState(inner): AxState<Shared>) -> Response {
    // Restart from outside the connection that asked (that connection is about to be closed).
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Err(e) = restart_inner(&inner, || {}).await {
            tracing::error!(error = %e, "kube stand-in restart failed");
        }
    });
    json_response(StatusCode::ACCEPTED, &json!({"restarting": true}))
}

async fn ctl_compact(AxState(inner): AxState<Shared>) -> Response {
    let mut st = lock(&inner.state);
    st.compacted_rv = st.rv;
    st.history.clear();
    json_response(
        StatusCode::OK,
        &json!({"compactedResourceVersion": st.rv.to_string()}),
    )
}

async fn ctl_stall(AxState(inner): AxState<Shared>) -> Response {
    inner.stalled.send_replace(true);
    json_response(StatusCode::OK, &json!({"stalled": true}))
}

async fn ctl_unstall(AxState(inner): AxState<Shared>) -> Response {
    inner.stalled.send_replace(false);
    json_response(StatusCode::OK, &json!({"stalled": false}))
}

async fn ctl_events(AxState(inner): AxState<Shared>) -> Response {
    let events = lock(&inner.state).events.clone();
    json_response(StatusCode::OK, &json!({"items": events}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(name: &str, ty: &str) -> Secret {
        let mut s = Secret::default();
        s.metadata.name = Some(name.into());
        s.metadata.namespace = Some("ns".into());
        s.type_ = Some(ty.into());
        s
    }

    #[test]
    fn field_selectors_parse_and_match() {
        let sel = Selector::parse(Some("type!=kubernetes.io/dockercfg,metadata.name==a"), None).unwrap();
        assert!(sel.matches(&secret("a", "key")));
        assert!(!sel.matches(&secret("b", "key")));
        assert!(!sel.matches(&secret("a", "kubernetes.io/dockercfg")));
        assert!(Selector::parse(Some("data.x=1"), None)
            .unwrap_err()
            .contains("not supported"));
        assert!(Selector::parse(Some("type"), None).is_err());
    }

    #[test]
    fn validation_mirrors_the_api_server() {
        let mut s = secret("Bad_Name", "key");
        assert!(matches!(validate(&s), Err(StandinError::Api { code: 422, .. })));
        s.metadata.name = Some("ok.name".into());
        s.data = Some(BTreeMap::from([("../x".to_string(), ByteString(vec![1]))]));
        assert!(matches!(validate(&s), Err(StandinError::Api { code: 422, .. })));
        s.data = Some(BTreeMap::from([(
            "x.pem".to_string(),
            ByteString(vec![0; MAX_SECRET_SIZE + 1]),
        )]));
        assert!(validate(&s).is_err());
        s.data = Some(BTreeMap::from([("x.pem".to_string(), ByteString(vec![0; 10]))]));
        assert!(validate(&s).is_ok());
    }

    #[test]
    fn selector_transitions_become_added_and_deleted() {
        let sel = Selector::parse(Some("type=key"), None).unwrap();
        let entry = |kind, obj, prev| HistEntry {
            rv: 5,
            kind,
            obj,
            prev,
        };
        let ev = |e: &HistEntry| {
            event_for(e, "ns", &sel).map(|b| serde_json::from_slice::<Value>(&b).unwrap()["type"].clone())
        };
        let e = entry(Kind::Modified, secret("a", "Opaque"), Some(secret("a", "key")));
        assert_eq!(ev(&e), Some(json!("DELETED")));
        let e = entry(Kind::Modified, secret("a", "key"), Some(secret("a", "Opaque")));
        assert_eq!(ev(&e), Some(json!("ADDED")));
        let e = entry(Kind::Modified, secret("a", "Opaque"), Some(secret("a", "Opaque")));
        assert_eq!(ev(&e), None);
    }

    #[tokio::test]
    async fn list_pages_are_consistent_and_expire_after_compaction() {
        let k = KubeStandin::start().await.unwrap();
        for n in ["a", "b", "c"] {
            k.create_secret(secret(n, "key")).unwrap();
        }
        let st = k.state();
        let rv = st.rv;
        drop(st);
        k.delete_secret("ns", "b");
        // The objects as of `rv` still include "b".
        let at = k.state().objects_at(rv);
        assert!(at.contains_key(&("ns".to_string(), "b".to_string())));
        assert!(!k
            .state()
            .objects
            .contains_key(&("ns".to_string(), "b".to_string())));
        k.compact();
        assert!(k.state().compacted_rv > rv);
    }
}

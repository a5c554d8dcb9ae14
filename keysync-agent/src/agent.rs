//! The agent: watches the namespace's Secrets and keeps the target directories in sync.
//!
//! One task owns all state. It applies watch events to an in-memory copy of the namespace's
//! Secrets (a relist replaces the copy whole, so deletes the watch missed are noticed), and after
//! every change it plans the whole desired state ([`crate::secrets::plan`]) and applies it to every
//! target directory ([`crate::keydir::KeyDir::apply`]). Nothing is written or deleted before the
//! first complete list, and nothing is deleted on shutdown. The watch is restarted (a full relist)
//! every resync interval, which also repairs drift on disk without calling Key Protect again.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::watcher;
use kube::runtime::WatchStreamExt;
use kube::Api;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::events::EventSink;
use crate::keydir::{ApplyReport, KeyDir, KeyDirError};
use crate::kms::{self, KmsConfig, KmsOptions, UnwrapDone};
use crate::metrics::{Health, Metrics};
use crate::secrets::{
    plan, Problem, ProblemReason, SecretRecord, UnwrapState, ValidationCache, CONFIG_SECRET,
};

/// The Secrets the agent watches, one list/watch each, selected on the server: the only data the
/// API server ever sends the agent is that of Secrets it acts on (`type: key`, `type: kp-key`, and
/// the Key Protect config Secret by name). Unrelated Secrets in the namespace, however many and
/// however large, cost the agent nothing.
pub const WATCHED: [&str; 3] = ["type=key", "type=kp-key", "metadata.name=keyprotect-config"];

/// The default extra field selector (none): [`WATCHED`] already selects by type and name.
pub const DEFAULT_FIELD_SELECTOR: &str = "";

/// Objects per list page: with `type: key` Secrets of up to ~1.5 MiB each (the API server's
/// limit), a page costs the agent at most ~6 MiB of JSON while it is decoded (measured: peak RSS
/// 47 MiB with 40 refused 1 MiB key Secrets and 100 unrelated 1 MiB Secrets, debug build).
pub const LIST_PAGE_SIZE: u32 = 4;

/// Default [`AgentOptions::removal_grace`].
pub const DEFAULT_REMOVAL_GRACE: Duration = Duration::from_secs(2);

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Namespace watched.
    pub namespace: String,
    /// Directories written (each gets the same files).
    pub target_dirs: Vec<PathBuf>,
    /// Take over target directories that hold files but no ownership marker.
    pub adopt_target_dirs: bool,
    /// Full relist (and disk repair) period.
    pub resync_interval: Duration,
    /// `/healthz` fails when the watch made no progress for this long.
    pub stall_timeout: Duration,
    /// Server-side timeout of each watch request (kube-runtime's default is 290 s).
    pub watch_timeout: Duration,
    /// An extra field selector, ANDed with each of the [`WATCHED`] selectors (`None`: none).
    pub field_selector: Option<String>,
    /// The API server's URL, named in connection errors.
    pub api_server: String,
    /// Key Protect settings.
    pub kms: KmsOptions,
    /// Post Kubernetes Events about problems.
    pub events: bool,
    /// The Events' `reportingInstance` (the node name).
    pub instance: String,
    /// The agent's own Pod (in `namespace`): Events about a target directory regard it.
    pub pod_name: Option<String>,
    /// How long a Secret's files stay after the Secret disappears, so that deleting and
    /// re-creating it (`kubectl replace --force`, a Helm upgrade) does not leave the runtime
    /// without the key in between. Revocation is delayed by at most this much.
    pub removal_grace: Duration,
    /// Sync once and return instead of watching.
    pub once: bool,
    /// In `once` mode: attempts per unwrap before giving up on a transient failure.
    pub once_max_attempts: u32,
    /// In `once` mode: give up after this long (the API server may be unreachable).
    pub once_timeout: Duration,
}

impl AgentOptions {
    /// Defaults for a namespace and target directories.
    pub fn new(namespace: impl Into<String>, target_dirs: Vec<PathBuf>) -> Self {
        AgentOptions {
            namespace: namespace.into(),
            target_dirs,
            adopt_target_dirs: false,
            resync_interval: Duration::from_secs(600),
            stall_timeout: Duration::from_secs(1800),
            watch_timeout: Duration::from_secs(290),
            field_selector: None,
            api_server: String::new(),
            kms: KmsOptions::default(),
            events: true,
            instance: "keysync-agent".into(),
            pod_name: None,
            removal_grace: DEFAULT_REMOVAL_GRACE,
            once: false,
            once_max_attempts: 3,
            once_timeout: Duration::from_secs(300),
        }
    }
}

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// A target directory is unusable.
    #[error(transparent)]
    KeyDir(#[from] KeyDirError),
    /// The options are inconsistent.
    #[error("invalid options: {0}")]
    Options(String),
    /// A background task panicked.
    #[error("internal error: {0}")]
    Internal(String),
}

/// What a run ended with.
#[derive(Debug, Default, Clone)]
pub struct RunSummary {
    /// Problems at the end (Secrets or entries not synced).
    pub problems: Vec<Problem>,
    /// Key files present in the first target directory.
    pub files: usize,
    /// File operations that failed in the last pass.
    pub write_failures: usize,
    /// Whether a complete list of the Secrets was ever received.
    pub synced: bool,
}

/// A configured agent.
pub struct Agent {
    opts: AgentOptions,
    client: kube::Client,
    dirs: Arc<Vec<KeyDir>>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// Removes the agent's subtree from every target directory (the `--cleanup` mode). Directories
/// not owned by the agent are refused and left alone, unless `adopt` (`--adopt-target-dir`) says
/// to take them over, in which case everything in them goes.
pub fn cleanup(target_dirs: &[PathBuf], adopt: bool) -> Result<usize, AgentError> {
    check_dirs(target_dirs)?;
    let mut n = 0;
    for d in target_dirs {
        let removed = KeyDir::cleanup(d, adopt)?;
        tracing::info!(target_dir = %d.display(), secrets_removed = removed, "cleaned up");
        n += removed;
    }
    Ok(n)
}

fn check_dirs(dirs: &[PathBuf]) -> Result<(), AgentError> {
    if dirs.is_empty() {
        return Err(AgentError::Options("at least one --target-dir is needed".into()));
    }
    for (i, a) in dirs.iter().enumerate() {
        if !a.is_absolute() {
            return Err(AgentError::Options(format!(
                "--target-dir {} must be an absolute path",
                a.display()
            )));
        }
        for b in dirs.iter().skip(i + 1) {
            if a.starts_with(b) || b.starts_with(a) {
                return Err(AgentError::Options(format!(
                    "--target-dir {} and {} overlap; give separate directories",
                    a.display(),
                    b.display()
                )));
            }
        }
    }
    Ok(())
}

impl Agent {
    /// Opens (and claims) the target directories.
    pub fn new(opts: AgentOptions, client: kube::Client) -> Result<Self, AgentError> {
        check_dirs(&opts.target_dirs)?;
        if opts.kms.concurrency == 0 {
            return Err(AgentError::Options(
                "the Key Protect concurrency must be at least 1".into(),
            ));
        }
        let dirs = opts
            .target_dirs
            .iter()
            .map(|d| KeyDir::open(d, opts.adopt_target_dirs))
            .collect::<Result<Vec<_>, _>>()?;
        let health = Arc::new(Health::new(opts.stall_timeout));
        Ok(Agent {
            opts,
            client,
            dirs: Arc::new(dirs),
            metrics: Arc::new(Metrics::default()),
            health,
        })
    }

    /// The agent's metrics.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The agent's health state.
    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// Runs until `shutdown` completes (or, with `once`, until the first sync is complete).
    /// Files are never removed because of shutdown.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<RunSummary, AgentError> {
        let events = self.opts.events.then(|| {
            EventSink::new(
                self.client.clone(),
                &self.opts.namespace,
                &self.opts.instance,
                self.opts.pod_name.as_deref(),
                self.metrics.clone(),
            )
        });
        let runner = Runner {
            permits: Arc::new(Semaphore::new(self.opts.kms.concurrency)),
            kms: KmsConfig::load(None, &self.opts.kms),
            opts: self.opts,
            client: self.client,
            dirs: self.dirs,
            metrics: self.metrics,
            health: self.health,
            secrets: BTreeMap::new(),
            parts: vec![Part::default(); WATCHED.len()],
            initialized: false,
            last_watch_error: None,
            last_desired: BTreeMap::new(),
            vanished: HashMap::new(),
            reconciled: false,
            unwraps: HashMap::new(),
            attempts: HashMap::new(),
            validation: ValidationCache::default(),
            tasks: JoinSet::new(),
            reported: BTreeSet::new(),
            events,
            summary: RunSummary::default(),
        };
        runner.run(shutdown).await
    }
}

struct Runner {
    opts: AgentOptions,
    client: kube::Client,
    dirs: Arc<Vec<KeyDir>>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// The union of `parts`, what planning sees.
    secrets: BTreeMap<String, SecretRecord>,
    /// One per [`WATCHED`] selector: the Secrets that watch has, and its relist in progress.
    parts: Vec<Part>,
    initialized: bool,
    /// The last watch error, for the `--once` timeout message.
    last_watch_error: Option<String>,
    /// The file names of each Secret directory of the last pass.
    last_desired: BTreeMap<String, Vec<String>>,
    /// Secrets gone from the desired state whose files are kept for the removal grace period,
    /// and since when.
    vanished: HashMap<String, Instant>,
    reconciled: bool,
    kms: KmsConfig,
    unwraps: HashMap<String, UnwrapState>,
    attempts: HashMap<String, u32>,
    validation: ValidationCache,
    tasks: JoinSet<UnwrapDone>,
    permits: Arc<Semaphore>,
    /// Problems already reported: (Secret, entry, reason, Secret version). The message is left
    /// out, since Key Protect errors carry a new correlation id on every attempt.
    reported: BTreeSet<(String, Option<String>, ProblemReason, Option<String>)>,
    events: Option<EventSink>,
    summary: RunSummary,
}

type WatchStream = BoxStream<'static, (usize, Result<watcher::Event<Secret>, watcher::Error>)>;

/// The state of one of the [`WATCHED`] list/watches.
#[derive(Default, Clone)]
struct Part {
    secrets: BTreeMap<String, SecretRecord>,
    init_buf: Option<BTreeMap<String, SecretRecord>>,
    initialized: bool,
}

impl Runner {
    fn watch_stream(&self) -> WatchStream {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.opts.namespace);
        let secs = u32::try_from(self.opts.watch_timeout.as_secs())
            .unwrap_or(290)
            .clamp(1, 295);
        let extra = self.opts.field_selector.as_deref().filter(|f| !f.is_empty());
        let streams = WATCHED.iter().enumerate().map(|(i, sel)| {
            let fields = match extra {
                Some(x) => format!("{sel},{x}"),
                None => (*sel).to_string(),
            };
            let cfg = watcher::Config::default()
                .timeout(secs)
                .fields(&fields)
                .page_size(LIST_PAGE_SIZE);
            watcher(api.clone(), cfg)
                .default_backoff()
                .map(move |ev| (i, ev))
                .boxed()
        });
        futures::stream::select_all(streams).boxed()
    }

    fn watch_error(&mut self, e: &watcher::Error) {
        self.metrics.add(&self.metrics.watch_errors, 1);
        let msg = format!("{}: {e}", self.opts.api_server);
        tracing::warn!(
            api_server = %self.opts.api_server,
            error = %e,
            "Secret watch error (retrying with backoff)"
        );
        self.last_watch_error = Some(msg);
    }

    async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<RunSummary, AgentError> {
        tracing::info!(
            namespace = %self.opts.namespace,
            target_dirs = ?self.opts.target_dirs,
            once = self.opts.once,
            "keysync-agent starting"
        );
        let mut stream = self.watch_stream();
        let resync_every = self.opts.resync_interval.max(Duration::from_millis(100));
        let mut resync = tokio::time::interval_at(tokio::time::Instant::now() + resync_every, resync_every);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let shutdown = shutdown.fuse();
        tokio::pin!(shutdown);
        let once_deadline = tokio::time::Instant::now() + self.opts.once_timeout;
        let once = self.opts.once;
        let once_timer = async move {
            if once {
                tokio::time::sleep_until(once_deadline).await;
            } else {
                futures::future::pending::<()>().await;
            }
        };
        tokio::pin!(once_timer);
        let mut dirty = false;
        loop {
            let next_retry = self.next_retry();
            tokio::select! {
                biased;
                () = &mut shutdown => {
                    tracing::info!("shutting down; files stay in place");
                    break;
                }
                () = &mut once_timer => {
                    tracing::error!(
                        timeout_s = self.opts.once_timeout.as_secs(),
                        api_server = %self.opts.api_server,
                        listed = self.initialized,
                        last_error = self.last_watch_error.as_deref().unwrap_or(""),
                        "--once did not finish in time; files stay as they are"
                    );
                    break;
                }
                ev = stream.next() => match ev {
                    Some((i, Ok(ev))) => dirty |= self.on_event(i, ev),
                    Some((_, Err(e))) => self.watch_error(&e),
                    None => stream = self.watch_stream(),
                },
                Some(done) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    match done {
                        Ok(done) => dirty |= self.on_unwrap(done),
                        Err(e) => return Err(AgentError::Internal(format!("unwrap task: {e}"))),
                    }
                }
                () = sleep_until_opt(next_retry), if next_retry.is_some() => dirty = true,
                _ = resync.tick() => {
                    // A relist still in progress (a large namespace, a slow server) is not
                    // restarted: it would never finish.
                    if self.parts.iter().all(|p| p.init_buf.is_none()) {
                        tracing::debug!("periodic resync: relisting");
                        stream = self.watch_stream();
                    }
                }
            }
            // Apply every event that is already there before reconciling once.
            while let Some(Some((i, item))) = stream.next().now_or_never() {
                match item {
                    Ok(ev) => dirty |= self.on_event(i, ev),
                    Err(e) => {
                        self.watch_error(&e);
                        break;
                    }
                }
            }
            if dirty && self.initialized {
                self.reconcile().await?;
                dirty = false;
            }
            if self.reconciled && self.tasks.is_empty() && !self.health.first_sync_done() {
                self.health.set_ready();
                tracing::info!(secrets = self.secrets.len(), "first sync complete");
            }
            if self.opts.once && self.settled() {
                break;
            }
        }
        self.tasks.abort_all();
        if let Some(ev) = self.events.as_mut() {
            ev.flush(Duration::from_secs(3)).await;
        }
        self.summary.synced = self.initialized;
        Ok(self.summary)
    }

    /// In `once` mode: everything attempted and nothing left to retry soon.
    fn settled(&self) -> bool {
        self.reconciled
            && self.tasks.is_empty()
            && !self.unwraps.iter().any(|(k, s)| {
                matches!(s, UnwrapState::Failed { transient: true, .. })
                    && self.attempts.get(k).copied().unwrap_or(0) < self.opts.once_max_attempts
            })
    }

    /// The next time a pass is due without an event: an unwrap retry, or the end of a removal
    /// grace period.
    fn next_retry(&self) -> Option<Instant> {
        let grace = self.removal_grace();
        self.unwraps
            .values()
            .filter_map(|s| match s {
                UnwrapState::Failed { retry_at, .. } => Some(*retry_at),
                _ => None,
            })
            .chain(self.vanished.values().map(|since| *since + grace))
            .min()
    }

    fn removal_grace(&self) -> Duration {
        if self.opts.once {
            Duration::ZERO
        } else {
            self.opts.removal_grace
        }
    }

    /// Keeps the files of Secrets that disappeared less than the removal grace period ago (a
    /// delete followed by a re-create is not a revocation), and remembers this pass's files.
    fn hold_vanished(&mut self, desired: &mut crate::keydir::Desired, now: Instant) {
        let grace = self.removal_grace();
        let mut held = HashMap::new();
        for (secret, files) in &self.last_desired {
            if desired.contains_key(secret) {
                continue;
            }
            let since = self.vanished.get(secret).copied().unwrap_or(now);
            if now < since + grace {
                tracing::debug!(secret = %secret, "Secret gone: its files stay for the removal grace period");
                desired.insert(
                    secret.clone(),
                    files
                        .iter()
                        .map(|f| (f.clone(), crate::keydir::FileDesired::Keep))
                        .collect(),
                );
                held.insert(secret.clone(), since);
            }
        }
        self.vanished = held;
        self.last_desired = desired
            .iter()
            .map(|(s, f)| (s.clone(), f.keys().cloned().collect()))
            .collect();
    }

    /// Keeps what the agent needs of a Secret: unrelated Secrets (only with a user's selector
    /// that lets them through) keep no data, and entries that are refused (too large, not a usable
    /// key) keep only why.
    fn record(&mut self, s: Secret) -> SecretRecord {
        let mut rec = SecretRecord::from_secret(s);
        rec.drop_refused(&mut self.validation);
        rec
    }

    fn on_event(&mut self, part: usize, ev: watcher::Event<Secret>) -> bool {
        // `Init` comes from the watcher itself, before any request: not progress.
        if !matches!(ev, watcher::Event::Init) {
            self.health.progress();
        }
        let changed = match ev {
            watcher::Event::Init => {
                self.parts[part].init_buf = Some(BTreeMap::new());
                false
            }
            watcher::Event::InitApply(s) => {
                self.metrics.add(&self.metrics.secrets_seen, 1);
                let rec = self.record(s);
                let p = &mut self.parts[part];
                match p.init_buf.as_mut() {
                    Some(buf) => {
                        buf.insert(rec.name.clone(), rec);
                    }
                    None => {
                        p.secrets.insert(rec.name.clone(), rec);
                    }
                }
                false
            }
            watcher::Event::InitDone => {
                let p = &mut self.parts[part];
                if let Some(buf) = p.init_buf.take() {
                    p.secrets = buf;
                }
                p.initialized = true;
                if self.parts.iter().all(|p| p.initialized) {
                    self.metrics.add(&self.metrics.relists, 1);
                    if !self.initialized {
                        tracing::info!(
                            secrets = self.parts.iter().map(|p| p.secrets.len()).sum::<usize>(),
                            "initial list complete"
                        );
                    }
                    self.initialized = true;
                }
                true
            }
            watcher::Event::Apply(s) => {
                self.metrics.add(&self.metrics.secrets_seen, 1);
                let rec = self.record(s);
                tracing::debug!(secret = %rec.name, kind = rec.kind().label(), "Secret changed");
                self.parts[part].secrets.insert(rec.name.clone(), rec);
                true
            }
            watcher::Event::Delete(s) => {
                let name = s.metadata.name.unwrap_or_default();
                tracing::debug!(secret = %name, "Secret deleted");
                self.parts[part].secrets.remove(&name).is_some()
            }
        };
        if changed {
            self.merge_parts();
        }
        changed
    }

    /// `secrets` = the union of the parts (a Secret whose type just changed can be in two for a
    /// moment: the newer version wins).
    fn merge_parts(&mut self) {
        let mut all: BTreeMap<String, SecretRecord> = BTreeMap::new();
        for p in &self.parts {
            for (name, rec) in &p.secrets {
                let newer = all
                    .get(name)
                    .is_none_or(|old| rv_number(&rec.resource_version) > rv_number(&old.resource_version));
                if newer {
                    all.insert(name.clone(), rec.clone());
                }
            }
        }
        self.secrets = all;
    }

    fn on_unwrap(&mut self, done: UnwrapDone) -> bool {
        let UnwrapDone {
            request,
            outcome,
            status_label,
            rewrap_recommended,
        } = done;
        self.metrics.unwrap_call(&status_label, outcome.is_err());
        match outcome {
            Ok(bytes) => {
                tracing::info!(secret = %request.secret, file = %request.file, "unwrapped with Key Protect");
                if rewrap_recommended {
                    self.metrics.add(&self.metrics.rewrap_recommended, 1);
                    tracing::warn!(
                        secret = %request.secret,
                        root_key_id = %request.root_key_id,
                        "the root key was rotated since this ciphertext was made; rewrap it \
                         (ibmcloud kp key rewrap) and update the Secret"
                    );
                }
                self.attempts.remove(&request.key);
                self.unwraps.insert(request.key, UnwrapState::Done(bytes));
            }
            Err(failure) => {
                let attempts = {
                    let a = self.attempts.entry(request.key.clone()).or_default();
                    *a += 1;
                    *a
                };
                let mut delay = self.opts.kms.backoff(attempts, failure.transient);
                if self.opts.once && attempts >= self.opts.once_max_attempts {
                    delay = Duration::from_secs(86_400 * 365);
                }
                tracing::warn!(
                    secret = %request.secret,
                    file = %request.file,
                    status = %status_label,
                    transient = failure.transient,
                    attempts,
                    retry_in_s = delay.as_secs_f64(),
                    error = %failure.message,
                    "Key Protect unwrap failed; the installed key (if any) stays"
                );
                self.unwraps.insert(
                    request.key,
                    UnwrapState::Failed {
                        message: failure.message,
                        transient: failure.transient,
                        attempts,
                        retry_at: Instant::now() + delay,
                    },
                );
            }
        }
        true
    }

    async fn reconcile(&mut self) -> Result<(), AgentError> {
        let cfg_rec = self.secrets.get(CONFIG_SECRET);
        let cfg_version = cfg_rec.map(|r| r.resource_version.clone());
        let loaded_version = match self.kms.status {
            crate::secrets::ConfigStatus::Missing => None,
            _ => Some(self.kms.source_version.clone()),
        };
        if cfg_version != loaded_version {
            self.kms = KmsConfig::load(cfg_rec, &self.opts.kms);
            match &self.kms.status {
                crate::secrets::ConfigStatus::Valid { .. } => tracing::info!("Key Protect config loaded"),
                crate::secrets::ConfigStatus::Missing => tracing::info!("no Key Protect config Secret"),
                crate::secrets::ConfigStatus::Invalid(m) => {
                    tracing::warn!(error = %m, "Key Protect config invalid")
                }
            }
        }
        let now = Instant::now();
        let plan = plan(
            &self.secrets,
            &self.kms.status,
            &self.unwraps,
            &mut self.validation,
            now,
        );
        self.validation.retain_recent(4096);
        if let Some(client) = self.kms.client.clone() {
            for req in &plan.unwraps {
                let retry = matches!(self.unwraps.get(&req.key), Some(UnwrapState::Failed { .. }));
                let delay = if retry || self.opts.kms.jitter.is_zero() {
                    Duration::ZERO
                } else {
                    self.opts.kms.jitter.mul_f64(rand::random::<f64>())
                };
                tracing::debug!(secret = %req.secret, file = %req.file, delay_ms = delay.as_millis() as u64, "unwrap scheduled");
                self.unwraps.insert(req.key.clone(), UnwrapState::InFlight);
                self.tasks.spawn(kms::unwrap(
                    client.clone(),
                    req.clone(),
                    delay,
                    self.permits.clone(),
                ));
            }
        }
        let live: HashSet<&String> = plan.live_unwraps.iter().collect();
        self.unwraps
            .retain(|k, s| matches!(s, UnwrapState::InFlight) || live.contains(k));
        self.attempts.retain(|k, _| live.contains(k));

        let mut desired = plan.desired;
        self.hold_vanished(&mut desired, now);
        let dirs = self.dirs.clone();
        let reports: Vec<(PathBuf, ApplyReport)> = tokio::task::spawn_blocking(move || {
            dirs.iter()
                .map(|d| (d.path().to_path_buf(), d.apply(&desired)))
                .collect()
        })
        .await
        .map_err(|e| AgentError::Internal(format!("writer task: {e}")))?;

        let mut problems = plan.problems;
        let mut failures = 0;
        for (i, (dir, r)) in reports.iter().enumerate() {
            for f in &r.written {
                tracing::info!(target_dir = %dir.display(), file = %f, "key file written");
            }
            for f in &r.removed {
                tracing::info!(target_dir = %dir.display(), entry = %f, "removed");
            }
            for f in &r.foreign_removed {
                tracing::warn!(
                    target_dir = %dir.display(),
                    entry = %f,
                    "removed a symlink or other non-regular entry from the agent's directory (never followed)"
                );
            }
            for (f, e) in &r.failures {
                tracing::error!(target_dir = %dir.display(), entry = %f, error = %e, "file operation failed");
                // An empty `f` is the target directory itself: the Event is then about the node.
                let secret = f.split('/').next().unwrap_or_default().to_string();
                let message = if f.is_empty() {
                    format!("target directory {}: {e}", dir.display())
                } else {
                    format!("{}: {f}: {e}", dir.display())
                };
                problems.push(Problem {
                    secret,
                    entry: f.split_once('/').map(|(_, e)| e.to_string()),
                    reason: ProblemReason::WriteFailed,
                    message,
                });
            }
            let m = &self.metrics;
            m.add(&m.files_written, r.written.len() as u64);
            m.add(&m.files_removed, r.removed.len() as u64);
            m.add(&m.foreign_removed, r.foreign_removed.len() as u64);
            m.add(&m.write_errors, r.failures.len() as u64);
            failures += r.failures.len();
            if i == 0 {
                m.managed_files.store(r.files as u64, Ordering::Relaxed);
                self.summary.files = r.files;
            }
        }
        self.metrics.add(&self.metrics.reconciles, 1);
        if failures == 0 {
            self.metrics.synced_now();
        }
        self.summary.write_failures = failures;
        self.health.set_write_failures(failures as u64);
        self.metrics
            .set_secrets(plan.kinds.iter().map(|(k, n)| (k.label().to_string(), *n as u64)));
        let mut by_reason: BTreeMap<String, u64> = BTreeMap::new();
        for p in &problems {
            *by_reason.entry(p.reason.as_str().to_string()).or_default() += 1;
        }
        self.metrics.set_problems(by_reason);
        self.report(&problems);
        self.summary.problems = problems;
        self.reconciled = true;
        Ok(())
    }

    /// Logs and posts Events for problems not reported before for this Secret version (a problem
    /// that went away and comes back is reported again).
    fn report(&mut self, problems: &[Problem]) {
        let mut current = BTreeSet::new();
        for p in problems {
            let rec = self.secrets.get(&p.secret);
            let key = (
                p.secret.clone(),
                p.entry.clone(),
                p.reason,
                rec.and_then(|r| r.resource_version.clone()),
            );
            if !self.reported.contains(&key) {
                tracing::warn!(
                    secret = %p.secret,
                    entry = p.entry.as_deref().unwrap_or(""),
                    reason = p.reason.as_str(),
                    error = %p.message,
                    "not synced"
                );
                if let Some(ev) = self.events.as_mut() {
                    ev.warn(p, rec);
                }
            }
            current.insert(key);
        }
        self.reported = current;
    }
}

fn rv_number(rv: &Option<String>) -> u64 {
    rv.as_deref().and_then(|v| v.parse().ok()).unwrap_or(0)
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => futures::future::pending().await,
    }
}

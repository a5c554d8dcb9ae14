//! Health state and Prometheus metrics, and the small HTTP server exposing them.
//!
//! * `/healthz`: 200 while the watch made progress (an event or a relist) within the stall
//!   timeout, 503 otherwise, so a silently stalled watch fails the liveness probe.
//! * `/readyz`: 200 once the first full sync finished (every Secret attempted once), and 503 again
//!   while the last pass could not write or remove files (a read-only or full target filesystem:
//!   a revoked key may still be on disk).
//! * `/metrics`: Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

/// Liveness and readiness.
#[derive(Debug)]
pub struct Health {
    start: Instant,
    last_progress_ms: AtomicU64,
    ready: AtomicBool,
    write_failures: AtomicU64,
    stall_timeout: Duration,
}

impl Health {
    /// A new health state; the clock for the stall timeout starts now.
    pub fn new(stall_timeout: Duration) -> Self {
        Health {
            start: Instant::now(),
            last_progress_ms: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            write_failures: AtomicU64::new(0),
            stall_timeout,
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Records watch progress.
    pub fn progress(&self) {
        self.last_progress_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Marks the first full sync done.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// Whether the first full sync is done.
    pub fn first_sync_done(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Records how many file operations failed in the last pass.
    pub fn set_write_failures(&self, n: u64) {
        self.write_failures.store(n, Ordering::Relaxed);
    }

    /// File operations that failed in the last pass.
    pub fn write_failures(&self) -> u64 {
        self.write_failures.load(Ordering::Relaxed)
    }

    /// Ready: the first full sync is done and the last pass wrote and removed everything it had
    /// to.
    pub fn is_ready(&self) -> bool {
        self.first_sync_done() && self.write_failures() == 0
    }

    /// Time since the last progress.
    pub fn since_progress(&self) -> Duration {
        Duration::from_millis(
            self.now_ms()
                .saturating_sub(self.last_progress_ms.load(Ordering::Relaxed)),
        )
    }

    /// Whether the watch progressed recently enough.
    pub fn is_live(&self) -> bool {
        self.since_progress() <= self.stall_timeout
    }
}

/// Counters and gauges.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Watch events applied (Secrets seen).
    pub secrets_seen: AtomicU64,
    /// Watch stream errors.
    pub watch_errors: AtomicU64,
    /// Full relists completed.
    pub relists: AtomicU64,
    /// Files written.
    pub files_written: AtomicU64,
    /// Files and directories removed.
    pub files_removed: AtomicU64,
    /// Foreign entries (symlinks, ...) removed from the subtree.
    pub foreign_removed: AtomicU64,
    /// Write failures.
    pub write_errors: AtomicU64,
    /// Key files present (last pass, first target).
    pub managed_files: AtomicU64,
    /// Reconcile passes.
    pub reconciles: AtomicU64,
    /// Unix time of the last pass without write failures.
    pub last_sync_seconds: AtomicU64,
    /// Events that could not be posted.
    pub event_errors: AtomicU64,
    /// Unwraps that returned a rewrapped ciphertext (the root key was rotated since the wrap).
    pub rewrap_recommended: AtomicU64,
    labelled: Mutex<Labelled>,
}

#[derive(Debug, Default)]
struct Labelled {
    secrets: BTreeMap<String, u64>,
    problems: BTreeMap<String, u64>,
    unwrap_calls: BTreeMap<String, u64>,
    unwrap_errors: BTreeMap<String, u64>,
}

fn inc(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Metrics {
    /// Adds to a counter.
    pub fn add(&self, c: &AtomicU64, n: u64) {
        inc(c, n);
    }

    fn labelled(&self) -> std::sync::MutexGuard<'_, Labelled> {
        self.labelled.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the Secrets-per-kind gauge.
    pub fn set_secrets(&self, by_kind: impl IntoIterator<Item = (String, u64)>) {
        let mut l = self.labelled();
        l.secrets.clear();
        l.secrets.extend(by_kind);
    }

    /// Sets the problems-per-reason gauge.
    pub fn set_problems(&self, by_reason: impl IntoIterator<Item = (String, u64)>) {
        let mut l = self.labelled();
        l.problems.clear();
        l.problems.extend(by_reason);
    }

    /// Counts one unwrap call with its outcome (`200`, `429`, `timeout`, ...).
    pub fn unwrap_call(&self, status: &str, error: bool) {
        let mut l = self.labelled();
        *l.unwrap_calls.entry(status.to_string()).or_default() += 1;
        if error {
            *l.unwrap_errors.entry(status.to_string()).or_default() += 1;
        }
    }

    /// Total unwrap calls so far.
    pub fn unwrap_calls_total(&self) -> u64 {
        self.labelled().unwrap_calls.values().sum()
    }

    /// Records a successful sync now.
    pub fn synced_now(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.last_sync_seconds.store(now, Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self, health: &Health) -> String {
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, kind: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        counter(
            "keysync_secrets_seen_total",
            "Secret watch events applied.",
            "counter",
            g(&self.secrets_seen),
        );
        counter(
            "keysync_watch_errors_total",
            "Errors from the Secret watch.",
            "counter",
            g(&self.watch_errors),
        );
        counter(
            "keysync_relists_total",
            "Full lists of the Secrets completed.",
            "counter",
            g(&self.relists),
        );
        counter(
            "keysync_files_written_total",
            "Key files written.",
            "counter",
            g(&self.files_written),
        );
        counter(
            "keysync_files_removed_total",
            "Key files and directories removed.",
            "counter",
            g(&self.files_removed),
        );
        counter(
            "keysync_foreign_entries_removed_total",
            "Symlinks and other non-regular entries removed from the agent's subtree.",
            "counter",
            g(&self.foreign_removed),
        );
        counter(
            "keysync_write_errors_total",
            "Failed file operations.",
            "counter",
            g(&self.write_errors),
        );
        counter(
            "keysync_event_errors_total",
            "Kubernetes Events that could not be posted.",
            "counter",
            g(&self.event_errors),
        );
        counter(
            "keysync_reconciles_total",
            "Reconcile passes.",
            "counter",
            g(&self.reconciles),
        );
        counter(
            "keysync_managed_files",
            "Key files present in the target directory.",
            "gauge",
            g(&self.managed_files),
        );
        counter(
            "keysync_last_sync_timestamp_seconds",
            "Unix time of the last reconcile pass without write failures.",
            "gauge",
            g(&self.last_sync_seconds),
        );
        counter(
            "keysync_ready",
            "1 once the first full sync is done.",
            "gauge",
            u64::from(health.is_ready()),
        );
        counter(
            "keysync_write_failures_last_pass",
            "File operations (writes, removals of revoked keys) that failed in the last pass; /readyz fails while \
             this is not 0.",
            "gauge",
            health.write_failures(),
        );
        counter(
            "keysync_seconds_since_watch_progress",
            "Seconds since the Secret watch last made progress.",
            "gauge",
            health.since_progress().as_secs(),
        );
        let l = self.labelled();
        let mut family = |name: &str, help: &str, kind: &str, label: &str, m: &BTreeMap<String, u64>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (k, v) in m {
                let k = k.replace('\\', "\\\\").replace('"', "\\\"");
                let _ = writeln!(out, "{name}{{{label}=\"{k}\"}} {v}");
            }
        };
        family(
            "keysync_secrets",
            "Secrets in the watched namespace, by kind.",
            "gauge",
            "kind",
            &l.secrets,
        );
        family(
            "keysync_problems",
            "Current problems, by reason.",
            "gauge",
            "reason",
            &l.problems,
        );
        family(
            "keysync_unwrap_requests_total",
            "Key Protect unwrap calls, by HTTP status (or transport error).",
            "counter",
            "status",
            &l.unwrap_calls,
        );
        family(
            "keysync_unwrap_errors_total",
            "Failed Key Protect unwrap calls, by HTTP status (or transport error).",
            "counter",
            "status",
            &l.unwrap_errors,
        );
        out
    }
}

#[derive(Clone)]
struct Shared {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// The probe and metrics routes.
pub fn router(metrics: Arc<Metrics>, health: Arc<Health>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(Shared { metrics, health })
}

async fn healthz(State(s): State<Shared>) -> impl IntoResponse {
    let since = s.health.since_progress().as_secs();
    if s.health.is_live() {
        (StatusCode::OK, format!("ok: watch progressed {since}s ago\n"))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("stalled: no watch progress for {since}s\n"),
        )
    }
}

async fn readyz(State(s): State<Shared>) -> impl IntoResponse {
    if !s.health.first_sync_done() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "first sync not finished\n".to_string(),
        )
    } else if s.health.write_failures() > 0 {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "{} file operations failed in the last pass (read-only or full target filesystem?): keys may be \
                 missing or revoked keys still present\n",
                s.health.write_failures()
            ),
        )
    } else {
        (StatusCode::OK, "ready\n".to_string())
    }
}

async fn metrics_text(State(s): State<Shared>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(&s.health),
    )
}

/// Serves the routes on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(metrics, health))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Binds the listen address (a clear error when it is taken).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen on {addr} for /healthz and /metrics: {e}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_format() {
        let m = Metrics::default();
        let h = Health::new(Duration::from_secs(60));
        m.add(&m.files_written, 3);
        m.unwrap_call("200", false);
        m.unwrap_call("429", true);
        m.unwrap_call("429", true);
        m.set_secrets([("key".to_string(), 2), ("kp-key".to_string(), 1)]);
        m.set_problems([("Invalid\"Key".to_string(), 1)]);
        let text = m.render(&h);
        assert!(text.contains("# TYPE keysync_files_written_total counter\nkeysync_files_written_total 3\n"));
        assert!(text.contains("keysync_unwrap_requests_total{status=\"429\"} 2\n"));
        assert!(text.contains("keysync_unwrap_errors_total{status=\"429\"} 2\n"));
        assert!(!text.contains("keysync_unwrap_errors_total{status=\"200\"}"));
        assert!(text.contains("keysync_secrets{kind=\"kp-key\"} 1\n"));
        assert!(
            text.contains("keysync_problems{reason=\"Invalid\\\"Key\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("keysync_ready 0\n"));
        assert_eq!(m.unwrap_calls_total(), 3);
        // Every sample line belongs to a declared family.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(text.contains(&format!("# TYPE {name} ")), "{line}");
        }
    }

    #[test]
    fn liveness_follows_progress() {
        let h = Health::new(Duration::from_millis(500));
        assert!(h.is_live());
        std::thread::sleep(Duration::from_millis(600));
        assert!(!h.is_live());
        h.progress();
        assert!(h.is_live());
        assert!(!h.is_ready());
        h.set_ready();
        assert!(h.is_ready());
    }
}

//! Shared helpers: the API stand-in, the agent running in-process, bounded waits, vectors.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use keysync_agent::metrics::{Health, Metrics};
use keysync_agent::{Agent, AgentOptions, RunSummary};
use testkit::kube::KubeStandin;

pub const NS: &str = "image-key-synchronizer";

/// The committed interop vectors (skopeo-made layouts and keys).
pub fn vectors() -> PathBuf {
    let committed = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../ocicrypt-core/tests/data/vectors"
    ));
    assert!(
        committed.join("keys/rsa.pem").is_file(),
        "vectors missing at {}",
        committed.display()
    );
    committed
}

pub fn key(name: &str) -> Vec<u8> {
    std::fs::read(vectors().join("keys").join(name)).unwrap()
}

pub fn kube_client(standin: &KubeStandin) -> kube::Client {
    let mut cfg = kube::Config::new(standin.base_url().parse().unwrap());
    cfg.default_namespace = NS.into();
    cfg.read_timeout = Some(Duration::from_secs(30));
    kube::Client::try_from(cfg).unwrap()
}

pub fn secret(name: &str, ty: &str, data: &[(&str, &[u8])]) -> Secret {
    let mut s = Secret::default();
    s.metadata.name = Some(name.into());
    s.metadata.namespace = Some(NS.into());
    s.type_ = Some(ty.into());
    s.data = Some(
        data.iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
            .collect::<BTreeMap<_, _>>(),
    );
    s
}

/// Agent options for tests: short timers, no jitter.
pub fn options(dirs: Vec<PathBuf>) -> AgentOptions {
    let mut o = AgentOptions::new(NS, dirs);
    o.resync_interval = Duration::from_secs(600);
    o.stall_timeout = Duration::from_secs(600);
    o.watch_timeout = Duration::from_secs(30);
    o.kms.jitter = Duration::ZERO;
    o.kms.request_timeout = Duration::from_secs(2);
    o.kms.client_attempts = 1;
    o.kms.retry_base = Duration::from_millis(200);
    o.kms.retry_cap = Duration::from_secs(1);
    o.kms.permanent_retry = Duration::from_secs(2);
    o.instance = "test-node".into();
    o
}

/// The agent running in-process until dropped or stopped.
pub struct Running {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<Result<RunSummary, keysync_agent::AgentError>>>,
}

impl Running {
    pub async fn stop(mut self) -> RunSummary {
        let _ = self.stop.take().unwrap().send(());
        let h = self.handle.take().unwrap();
        tokio::time::timeout(Duration::from_secs(20), h)
            .await
            .expect("agent stops")
            .unwrap()
            .unwrap()
    }

    pub fn is_running(&self) -> bool {
        self.handle.as_ref().is_some_and(|h| !h.is_finished())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}

pub fn start(standin: &KubeStandin, opts: AgentOptions) -> Running {
    let agent = Agent::new(opts, kube_client(standin)).unwrap();
    let (metrics, health) = (agent.metrics(), agent.health());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(agent.run(async move {
        let _ = rx.await;
    }));
    Running {
        metrics,
        health,
        stop: Some(tx),
        handle: Some(handle),
    }
}

/// Polls `cond` every 20 ms until it holds; panics with `what` after `timeout`.
pub async fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// As [`wait_for`] with an async condition.
pub async fn wait_for_async<F: Future<Output = bool>>(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> F,
) {
    let deadline = Instant::now() + timeout;
    while !cond().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn read(p: &Path) -> Option<Vec<u8>> {
    std::fs::read(p).ok()
}

/// Names of the entries of a directory (sorted), empty when missing.
pub fn entries(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(p)
        .map(|it| {
            it.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Every regular file under `root`, relative, excluding the ownership marker directory.
pub fn all_files(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            let ft = std::fs::symlink_metadata(&p).unwrap().file_type();
            if ft.is_dir() {
                walk(base, &p, out);
            } else {
                out.push(p.strip_prefix(base).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    walk(root, root, &mut out);
    out.sort();
    out
}

/// Reasons of the Events posted about `secret`.
pub fn event_reasons(standin: &KubeStandin, secret: &str) -> Vec<String> {
    standin
        .events()
        .iter()
        .filter(|e| e["regarding"]["name"] == secret)
        .map(|e| e["reason"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// A plain HTTP/1.1 GET on loopback: (status, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .expect("HTTP GET answered")
}

/// Serves the agent's /healthz, /readyz, /metrics on an ephemeral loopback port.
pub async fn serve_probes(r: &Running) -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (m, h) = (r.metrics.clone(), r.health.clone());
    tokio::spawn(keysync_agent::metrics::serve(l, m, h, futures::future::pending()));
    addr
}

/// The value of one metric line (`name{labels}`) in the Prometheus text, 0 when absent.
pub fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

//! The node agent benchmark behind the `agent-bench` binary: the real `keysync-agent` process
//! against the Kubernetes API stand-in ([`testkit::kube::KubeStandin`]) and the Key Protect
//! emulator ([`keyprotect_emulator::Emulator`]), both on 127.0.0.1.
//!
//! Measures the time from a Secret's creation to its file on disk (one Secret at a time, p50/p99),
//! a burst of N new Secrets until all files are on disk, N deletions until all files are gone,
//! the agent's peak RSS (`VmHWM`) with N Secrets, and the number of Key Protect unwrap calls for
//! `kp-key` Secrets sharing ciphertexts, also after an API server restart (relist).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use keyprotect_emulator::{Emulator, Op};
use testkit::kube::KubeStandin;

/// The namespace the agent watches.
pub const NS: &str = "image-key-synchronizer";

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum AgentBenchError {
    /// Bad command line.
    #[error("{0}\nusage: agent-bench --agent PATH [--secrets N] [--latency-samples N] [--kp-distinct N] [--kp-copies N]")]
    Usage(String),
    /// A step failed.
    #[error("{0}")]
    Failed(String),
}

fn fail(msg: impl Into<String>) -> AgentBenchError {
    AgentBenchError::Failed(msg.into())
}

/// Benchmark parameters.
#[derive(Debug, Clone)]
pub struct Params {
    /// The `keysync-agent` binary.
    pub agent: PathBuf,
    /// Secrets in the burst (and deletions).
    pub secrets: usize,
    /// Secrets created one at a time for the latency figures.
    pub latency_samples: usize,
    /// Distinct Key Protect ciphertexts.
    pub kp_distinct: usize,
    /// `kp-key` Secrets per ciphertext.
    pub kp_copies: usize,
    /// Upper bound of every wait.
    pub timeout: Duration,
}

/// The figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Results {
    /// Secret-to-file latency, milliseconds: p50.
    pub latency_p50_ms: f64,
    /// p99.
    pub latency_p99_ms: f64,
    /// Maximum.
    pub latency_max_ms: f64,
    /// Samples.
    pub latency_samples: usize,
    /// Burst size.
    pub burst_secrets: usize,
    /// Seconds from the first create of the burst to the last file on disk.
    pub burst_all_on_disk_s: f64,
    /// Seconds from the first delete to the last file gone.
    pub deletions_all_gone_s: f64,
    /// Agent peak RSS (VmHWM) after the burst, MiB.
    pub peak_rss_with_burst_mib: f64,
    /// Agent peak RSS at the end of the run, MiB.
    pub peak_rss_end_mib: f64,
    /// Distinct kp-key ciphertexts.
    pub kp_distinct_ciphertexts: usize,
    /// kp-key Secrets.
    pub kp_secrets: usize,
    /// Unwrap calls once all kp-key files were on disk.
    pub kp_unwraps: u64,
    /// Unwrap calls after an API server restart (the agent relists).
    pub kp_unwraps_after_relist: u64,
}

pub(crate) fn key_secret(name: &str, entries: &[(&str, &[u8])], ty: &str) -> Secret {
    let mut s = Secret::default();
    s.metadata.name = Some(name.into());
    s.metadata.namespace = Some(NS.into());
    s.type_ = Some(ty.into());
    s.data = Some(
        entries
            .iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
            .collect::<BTreeMap<_, _>>(),
    );
    s
}

/// Waits until `cond` holds, polling every `every`; fails naming `what` after `timeout`.
pub(crate) fn wait_until(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut cond: impl FnMut() -> bool,
) -> Result<Instant, AgentBenchError> {
    let start = Instant::now();
    loop {
        if cond() {
            return Ok(Instant::now());
        }
        if start.elapsed() > timeout {
            return Err(fail(format!("timed out after {timeout:?} waiting for {what}")));
        }
        std::thread::sleep(every);
    }
}

pub(crate) fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub(crate) struct AgentProcess {
    pub(crate) child: Child,
}

impl AgentProcess {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
    pub(crate) fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        // SIGTERM first (the agent stops cleanly), then SIGKILL if it lingers.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the benchmark.
///
/// # Errors
/// [`AgentBenchError::Failed`] when a step fails or a wait times out.
pub fn run(p: &Params) -> Result<Results, AgentBenchError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| fail(format!("tokio runtime: {e}")))?;
    let standin = rt
        .block_on(KubeStandin::start())
        .map_err(|e| fail(format!("starting the Kubernetes API stand-in: {e}")))?;
    let emu = Emulator::start().map_err(|e| fail(format!("starting the Key Protect emulator: {e}")))?;
    let root = emu.create_root_key("bench-root");
    let (pem, _) = ocicrypt_core::keys::generate_rsa(2048).map_err(|e| fail(e.to_string()))?;
    let pem = pem.as_bytes().to_vec();

    let tmp = tempfile::tempdir().map_err(|e| fail(format!("tempdir: {e}")))?;
    let dir = tmp.path().join("synced");
    let log_path = tmp.path().join("agent.log");
    let log = std::fs::File::create(&log_path).map_err(|e| fail(e.to_string()))?;
    standin
        .create_secret(key_secret(
            "keyprotect-config",
            &[("config.json", emu.config_json().as_bytes())],
            "Opaque",
        ))
        .map_err(|e| fail(e.to_string()))?;

    let child = Command::new(&p.agent)
        .args(["--server", &standin.base_url()])
        .args(["--namespace", NS])
        .arg("--target-dir")
        .arg(&dir)
        .args(["--listen", "off", "--kms-jitter", "0s", "--log-format", "text"])
        .args(["--node-name", "bench-node"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| fail(format!("starting {}: {e}", p.agent.display())))?;
    let mut agent = AgentProcess { child };
    let t = p.timeout;
    let file = |d: &Path, secret: &str, entry: &str| d.join(secret).join(entry);

    // Ready: a first Secret reaches the disk.
    standin
        .create_secret(key_secret("canary", &[("k.pem", &pem)], "key"))
        .map_err(|e| fail(e.to_string()))?;
    wait_until("the agent's first file", t, Duration::from_millis(10), || {
        file(&dir, "canary", "k.pem").exists()
    })
    .map_err(|e| {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        fail(format!("{e}; agent log:\n{log}"))
    })?;
    standin.delete_secret(NS, "canary");
    wait_until("the canary's removal", t, Duration::from_millis(5), || {
        !file(&dir, "canary", "k.pem").exists()
    })?;

    // 1. Secret to file, one at a time.
    let mut lat = Vec::with_capacity(p.latency_samples);
    for i in 0..p.latency_samples {
        let name = format!("lat-{i}");
        let path = file(&dir, &name, "k.pem");
        let t0 = Instant::now();
        standin
            .create_secret(key_secret(&name, &[("k.pem", &pem)], "key"))
            .map_err(|e| fail(e.to_string()))?;
        let t1 = wait_until(
            &format!("{}", path.display()),
            t,
            Duration::from_micros(200),
            || path.exists(),
        )?;
        lat.push((t1 - t0).as_secs_f64() * 1000.0);
    }
    for i in 0..p.latency_samples {
        standin.delete_secret(NS, &format!("lat-{i}"));
    }
    wait_until(
        "the latency Secrets' removal",
        t,
        Duration::from_millis(5),
        || (0..p.latency_samples).all(|i| !file(&dir, &format!("lat-{i}"), "k.pem").exists()),
    )?;
    lat.sort_by(f64::total_cmp);

    // 2. A burst of new Secrets.
    let names: Vec<String> = (0..p.secrets).map(|i| format!("burst-{i}")).collect();
    let t0 = Instant::now();
    for n in &names {
        standin
            .create_secret(key_secret(n, &[("k.pem", &pem)], "key"))
            .map_err(|e| fail(e.to_string()))?;
    }
    let mut pending: Vec<PathBuf> = names.iter().map(|n| file(&dir, n, "k.pem")).collect();
    let t1 = wait_until("every burst file", t, Duration::from_millis(2), || {
        pending.retain(|p| !p.exists());
        pending.is_empty()
    })?;
    let burst = (t1 - t0).as_secs_f64();
    if !agent.alive() {
        return Err(fail("the agent exited during the burst"));
    }
    let rss_burst = vm_hwm_kib(agent.pid()).unwrap_or(0) as f64 / 1024.0;

    // 3. Deletions.
    let t0 = Instant::now();
    for n in &names {
        standin.delete_secret(NS, n);
    }
    let mut present: Vec<PathBuf> = names.iter().map(|n| file(&dir, n, "k.pem")).collect();
    let t1 = wait_until("every burst file to go", t, Duration::from_millis(2), || {
        present.retain(|p| p.exists());
        present.is_empty()
    })?;
    let deletions = (t1 - t0).as_secs_f64();

    // 4. kp-key Secrets: `kp_copies` Secrets per distinct ciphertext.
    let kp = keyprotect_client::Client::new(emu.config()).map_err(|e| fail(e.to_string()))?;
    let mut ciphertexts = Vec::with_capacity(p.kp_distinct);
    for _ in 0..p.kp_distinct {
        let w = rt
            .block_on(kp.wrap(&root, &pem, None))
            .map_err(|e| fail(format!("wrapping with the emulator: {e}")))?;
        ciphertexts.push(w.ciphertext);
    }
    let before = emu.count(Op::Unwrap);
    let mut kp_files = Vec::new();
    for (j, c) in ciphertexts.iter().enumerate() {
        for d in 0..p.kp_copies {
            let name = format!("kp-{j}-{d}");
            standin
                .create_secret(key_secret(
                    &name,
                    &[("rootkeyid", root.as_bytes()), ("ciphertext", c.as_bytes())],
                    "kp-key",
                ))
                .map_err(|e| fail(e.to_string()))?;
            kp_files.push(file(&dir, &name, &format!("{name}.pem")));
        }
    }
    wait_until("every kp-key file", t, Duration::from_millis(5), || {
        kp_files.iter().all(|f| f.exists())
    })?;
    let unwraps = emu.count(Op::Unwrap) - before;
    // An API server restart with a change made while it was down (never sent on any watch): the
    // agent must relist everything to see it. Nothing may be unwrapped again.
    let marker = key_secret("relist-marker", &[("k.pem", &pem)], "key");
    rt.block_on(standin.restart_with(move |s| {
        let _ = s.create_secret(marker);
    }))
    .map_err(|e| fail(format!("restarting the stand-in: {e}")))?;
    wait_until("the agent's relist", t, Duration::from_millis(20), || {
        file(&dir, "relist-marker", "k.pem").exists()
    })?;
    std::thread::sleep(Duration::from_secs(2));
    let unwraps_after = emu.count(Op::Unwrap) - before;
    if !agent.alive() {
        return Err(fail("the agent exited during the run"));
    }
    let rss_end = vm_hwm_kib(agent.pid()).unwrap_or(0) as f64 / 1024.0;
    drop(agent);

    Ok(Results {
        latency_p50_ms: percentile(&lat, 50.0),
        latency_p99_ms: percentile(&lat, 99.0),
        latency_max_ms: lat.last().copied().unwrap_or(f64::NAN),
        latency_samples: lat.len(),
        burst_secrets: p.secrets,
        burst_all_on_disk_s: burst,
        deletions_all_gone_s: deletions,
        peak_rss_with_burst_mib: rss_burst,
        peak_rss_end_mib: rss_end,
        kp_distinct_ciphertexts: p.kp_distinct,
        kp_secrets: p.kp_distinct * p.kp_copies,
        kp_unwraps: unwraps,
        kp_unwraps_after_relist: unwraps_after,
    })
}

/// The figures as a table, with the targets.
pub fn table(r: &Results) -> String {
    let ok = |b: bool| if b { "ok" } else { "MISSED" };
    format!(
        "Secret -> file latency ({} Secrets, one at a time): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms   [p99 < 100 ms: {}]\n\
         {} new Secrets, all files on disk after {:.2} s   [< 10 s: {}]\n\
         {} deletions, all files gone after {:.2} s   [< 10 s: {}]\n\
         agent peak RSS with {} Secrets: {:.1} MiB; at the end: {:.1} MiB   [< 64 MiB: {}]\n\
         Key Protect unwraps: {} for {} kp-key Secrets sharing {} distinct ciphertexts; {} after an API server restart (relist)   [one per ciphertext: {}]",
        r.latency_samples,
        r.latency_p50_ms,
        r.latency_p99_ms,
        r.latency_max_ms,
        ok(r.latency_p99_ms < 100.0),
        r.burst_secrets,
        r.burst_all_on_disk_s,
        ok(r.burst_all_on_disk_s < 10.0),
        r.burst_secrets,
        r.deletions_all_gone_s,
        ok(r.deletions_all_gone_s < 10.0),
        r.burst_secrets,
        r.peak_rss_with_burst_mib,
        r.peak_rss_end_mib,
        ok(r.peak_rss_with_burst_mib < 64.0 && r.peak_rss_end_mib < 64.0),
        r.kp_unwraps,
        r.kp_secrets,
        r.kp_distinct_ciphertexts,
        r.kp_unwraps_after_relist,
        ok(r.kp_unwraps == r.kp_distinct_ciphertexts as u64 && r.kp_unwraps_after_relist == r.kp_unwraps),
    )
}

/// The command line of `agent-bench`.
///
/// # Errors
/// [`AgentBenchError`].
pub fn main_with_args(args: Vec<String>) -> Result<Results, AgentBenchError> {
    let mut p = Params {
        agent: PathBuf::new(),
        secrets: 1000,
        latency_samples: 200,
        kp_distinct: 50,
        kp_copies: 2,
        timeout: Duration::from_secs(60),
    };
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str| {
            it.next()
                .ok_or_else(|| AgentBenchError::Usage(format!("{name} needs a value")))
        };
        let num = |s: String, name: &str| {
            s.parse::<usize>()
                .map_err(|_| AgentBenchError::Usage(format!("{name} takes a number")))
        };
        match a.as_str() {
            "--agent" => p.agent = PathBuf::from(val("--agent")?),
            "--secrets" => p.secrets = num(val("--secrets")?, "--secrets")?,
            "--latency-samples" => p.latency_samples = num(val("--latency-samples")?, "--latency-samples")?,
            "--kp-distinct" => p.kp_distinct = num(val("--kp-distinct")?, "--kp-distinct")?,
            "--kp-copies" => p.kp_copies = num(val("--kp-copies")?, "--kp-copies")?,
            other => return Err(AgentBenchError::Usage(format!("unknown argument {other}"))),
        }
    }
    if p.agent.as_os_str().is_empty() {
        return Err(AgentBenchError::Usage("--agent is required".into()));
    }
    run(&p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn usage_errors_name_the_problem() {
        let e = main_with_args(vec![]).unwrap_err().to_string();
        assert!(e.contains("--agent is required"), "{e}");
        let e = main_with_args(vec![
            "--agent".into(),
            "x".into(),
            "--secrets".into(),
            "many".into(),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("--secrets takes a number"), "{e}");
    }
}

//! A cluster in one machine, behind the `cluster-bench` binary: N real `keysync-agent`
//! processes (one per simulated node, each with its own target directory and node name) against
//! one Kubernetes API stand-in ([`testkit::kube::KubeStandin`]) and one Key Protect emulator, on
//! 127.0.0.1.
//!
//! The Secrets exist before the agents start, as on a rollout: every agent lists them at the same
//! moment and unwraps the same ciphertexts. Measured, and printed:
//! 1. time until every node holds every key (`keys` `key` Secrets + `kp_keys` `kp-key` Secrets);
//! 2. Key Protect unwraps per ciphertext (must be exactly one per node);
//! 3. a new `kp-key` reaching every node while the emulator answers 429 with `Retry-After` to the
//!    first unwrap of every node;
//! 4. a deleted Secret's file gone from every node;
//! 5. an API server restart, with a change made while it is down and the history compacted:
//!    time until every node has seen the change (the agents must relist), and no new unwraps;
//! 6. API requests per node (lists, watches, Event posts) and peak RSS per agent.
//!
//! Every check that fails makes the run fail (the CI smoke run uses a small N).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keyprotect_emulator::{Emulator, Fault, Op};
use testkit::kube::KubeStandin;

use crate::agent::{key_secret, vm_hwm_kib, wait_until, AgentBenchError, AgentProcess, NS};

fn fail(msg: impl Into<String>) -> AgentBenchError {
    AgentBenchError::Failed(msg.into())
}

/// Parameters.
#[derive(Debug, Clone)]
pub struct Params {
    /// The `keysync-agent` binary.
    pub agent: PathBuf,
    /// Simulated nodes (agents).
    pub nodes: usize,
    /// `key` Secrets.
    pub keys: usize,
    /// `kp-key` Secrets, each with its own ciphertext.
    pub kp_keys: usize,
    /// The agents' `--kms-jitter` (None: the agent's default).
    pub kms_jitter: Option<String>,
    /// Upper bound of every wait.
    pub timeout: Duration,
}

/// The figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Results {
    /// Nodes.
    pub nodes: usize,
    /// `key` Secrets.
    pub keys: usize,
    /// `kp-key` Secrets.
    pub kp_keys: usize,
    /// Seconds from starting the agents until every node holds every key.
    pub converge_s: f64,
    /// Seconds until the first node holds every key.
    pub first_node_s: f64,
    /// Successful unwraps per ciphertext divided by nodes: min.
    pub unwraps_per_node_per_ciphertext_min: f64,
    /// max.
    pub unwraps_per_node_per_ciphertext_max: f64,
    /// Seconds for a new kp-key to reach every node while Key Protect answers 429 once per node.
    pub throttled_kp_key_s: f64,
    /// 429 answers given during that phase.
    pub throttled_429s: u64,
    /// Unwrap requests during that phase (the 429s included).
    pub throttled_unwrap_requests: u64,
    /// Seconds for a delete to reach every node.
    pub delete_s: f64,
    /// Seconds from the API server's restart (with compaction) until every node saw the change.
    pub restart_converge_s: f64,
    /// Unwraps after the restart (must be 0).
    pub unwraps_after_restart: u64,
    /// API requests per node over the run: Secret lists.
    pub lists_per_node: f64,
    /// Secret watches.
    pub watches_per_node: f64,
    /// Event posts.
    pub events_per_node: f64,
    /// All requests.
    pub requests_per_node: f64,
    /// Peak RSS (VmHWM) per agent, MiB: max.
    pub peak_rss_max_mib: f64,
    /// mean.
    pub peak_rss_mean_mib: f64,
}

struct Node {
    dir: PathBuf,
    proc_: AgentProcess,
    log: PathBuf,
}

/// Waits until `path_of(node)` satisfies `want` on every node; returns (first node, all nodes).
fn wait_all(
    nodes: &[Node],
    what: &str,
    timeout: Duration,
    t0: Instant,
    mut done: impl FnMut(&Path) -> bool,
) -> Result<(Duration, Duration), AgentBenchError> {
    let mut pending: Vec<usize> = (0..nodes.len()).collect();
    let mut first = None;
    wait_until(what, timeout, Duration::from_millis(20), || {
        pending.retain(|&i| !done(&nodes[i].dir));
        if first.is_none() && pending.len() < nodes.len() {
            first = Some(t0.elapsed());
        }
        pending.is_empty()
    })
    .map_err(|e| {
        let log = nodes
            .first()
            .and_then(|n| std::fs::read_to_string(&n.log).ok())
            .unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        fail(format!(
            "{e} ({} of {} nodes pending); node-0 log tail:\n{}",
            pending.len(),
            nodes.len(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ))
    })?;
    let all = t0.elapsed();
    Ok((first.unwrap_or(all), all))
}

/// Runs the benchmark.
///
/// # Errors
/// [`AgentBenchError::Failed`] when a step fails, a wait times out or a check does not hold.
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
    let root = emu.create_root_key("cluster-root");
    let (pem, _) = ocicrypt_core::keys::generate_rsa(2048).map_err(|e| fail(e.to_string()))?;
    let pem = pem.as_bytes().to_vec();
    let create = |s| {
        standin
            .create_secret(s)
            .map(drop)
            .map_err(|e| fail(e.to_string()))
    };

    create(key_secret(
        "keyprotect-config",
        &[("config.json", emu.config_json().as_bytes())],
        "Opaque",
    ))?;
    for i in 0..p.keys {
        create(key_secret(&format!("key-{i}"), &[("k.pem", &pem)], "key"))?;
    }
    let kp = keyprotect_client::Client::new(emu.config()).map_err(|e| fail(e.to_string()))?;
    let wrap = |_| {
        rt.block_on(kp.wrap(&root, &pem, None))
            .map(|w| w.ciphertext)
            .map_err(|e| fail(format!("wrapping with the emulator: {e}")))
    };
    let ciphertexts = (0..p.kp_keys).map(wrap).collect::<Result<Vec<_>, _>>()?;
    let kp_secret = |name: &str, c: &str| {
        key_secret(
            name,
            &[("rootkeyid", root.as_bytes()), ("ciphertext", c.as_bytes())],
            "kp-key",
        )
    };
    for (i, c) in ciphertexts.iter().enumerate() {
        create(kp_secret(&format!("kp-{i}"), c))?;
    }
    let expected: Vec<PathBuf> = (0..p.keys)
        .map(|i| PathBuf::from(format!("key-{i}/k.pem")))
        .chain((0..p.kp_keys).map(|i| PathBuf::from(format!("kp-{i}/kp-{i}.pem"))))
        .collect();

    // 1. Rollout: every agent starts at once.
    let tmp = tempfile::tempdir().map_err(|e| fail(format!("tempdir: {e}")))?;
    let t0 = Instant::now();
    let mut nodes = Vec::with_capacity(p.nodes);
    for n in 0..p.nodes {
        let dir = tmp.path().join(format!("node-{n}/synced"));
        let log = tmp.path().join(format!("node-{n}.log"));
        let logf = std::fs::File::create(&log).map_err(|e| fail(e.to_string()))?;
        let mut cmd = Command::new(&p.agent);
        cmd.args(["--server", &standin.base_url(), "--namespace", NS])
            .arg("--target-dir")
            .arg(&dir)
            .args(["--listen", "off", "--log-format", "text"])
            .args(["--node-name", &format!("node-{n}")])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf);
        if let Some(j) = &p.kms_jitter {
            cmd.args(["--kms-jitter", j]);
        }
        let child = cmd
            .spawn()
            .map_err(|e| fail(format!("starting {}: {e}", p.agent.display())))?;
        nodes.push(Node {
            dir,
            proc_: AgentProcess { child },
            log,
        });
    }
    let (first, all) = wait_all(&nodes, "every key on every node", p.timeout, t0, |d| {
        expected.iter().all(|f| d.join(f).exists())
    })?;

    // 2. One unwrap per node per ciphertext.
    let per_ct: Vec<f64> = ciphertexts
        .iter()
        .map(|c| emu.unwraps_of(c) as f64 / p.nodes as f64)
        .collect();
    let (ct_min, ct_max) = per_ct
        .iter()
        .fold((f64::INFINITY, 0f64), |(lo, hi), &v| (lo.min(v), hi.max(v)));

    // 3. A new kp-key while Key Protect throttles: the first unwrap of each node gets 429.
    let c_new = wrap(0)?;
    let unwraps_before = emu.count(Op::Unwrap);
    emu.inject(
        Some(Op::Unwrap),
        Fault::TooManyRequests {
            retry_after: Some("1".into()),
        },
        u32::try_from(p.nodes).unwrap_or(u32::MAX),
    );
    let t = Instant::now();
    create(kp_secret("kp-new", &c_new))?;
    let (_, throttled) = wait_all(&nodes, "the new kp-key on every node", p.timeout, t, |d| {
        d.join("kp-new/kp-new.pem").exists()
    })?;
    let left = emu.pending_faults();
    emu.clear_faults();
    let throttled_requests = emu.count(Op::Unwrap) - unwraps_before;
    let throttled_429s = u64::try_from(p.nodes).unwrap_or(0) - u64::from(left);
    let new_per_node = emu.unwraps_of(&c_new) as f64 / p.nodes as f64;

    // 4. A delete.
    let t = Instant::now();
    standin.delete_secret(NS, "key-0");
    let (_, deleted) = wait_all(&nodes, "key-0 gone from every node", p.timeout, t, |d| {
        !d.join("key-0/k.pem").exists()
    })?;

    // 5. API server restart; while it is down a Secret is added and one deleted (never sent on
    //    any watch), and the history is compacted: every agent must relist.
    let unwraps_before = emu.count(Op::Unwrap);
    let marker = key_secret("while-down", &[("k.pem", &pem)], "key");
    let t = Instant::now();
    rt.block_on(standin.restart_with(move |s| {
        let _ = s.create_secret(marker);
        s.delete_secret(NS, "key-1");
        s.compact();
    }))
    .map_err(|e| fail(format!("restarting the stand-in: {e}")))?;
    let (_, restarted) = wait_all(&nodes, "the restart's changes on every node", p.timeout, t, |d| {
        d.join("while-down/k.pem").exists() && !d.join("key-1/k.pem").exists()
    })?;
    std::thread::sleep(Duration::from_secs(1));
    let unwraps_after_restart = emu.count(Op::Unwrap) - unwraps_before;

    // 6. Requests and memory.
    let reqs = standin.requests();
    let is_secrets = |u: &str| u.contains("/secrets");
    let watches = reqs
        .iter()
        .filter(|r| r.method == "GET" && is_secrets(&r.uri) && r.uri.contains("watch=true"))
        .count();
    let lists = reqs
        .iter()
        .filter(|r| r.method == "GET" && is_secrets(&r.uri) && !r.uri.contains("watch=true"))
        .count();
    let events = reqs
        .iter()
        .filter(|r| r.method == "POST" && r.uri.contains("/events"))
        .count();
    let mut rss = Vec::with_capacity(nodes.len());
    for (i, n) in nodes.iter_mut().enumerate() {
        if !n.proc_.alive() {
            return Err(fail(format!("the agent of node-{i} exited during the run")));
        }
        rss.push(vm_hwm_kib(n.proc_.pid()).unwrap_or(0) as f64 / 1024.0);
    }
    drop(nodes);
    let per_node = |c: usize| c as f64 / p.nodes as f64;
    let r = Results {
        nodes: p.nodes,
        keys: p.keys,
        kp_keys: p.kp_keys,
        converge_s: all.as_secs_f64(),
        first_node_s: first.as_secs_f64(),
        unwraps_per_node_per_ciphertext_min: ct_min.min(new_per_node),
        unwraps_per_node_per_ciphertext_max: ct_max.max(new_per_node),
        throttled_kp_key_s: throttled.as_secs_f64(),
        throttled_429s,
        throttled_unwrap_requests: throttled_requests,
        delete_s: deleted.as_secs_f64(),
        restart_converge_s: restarted.as_secs_f64(),
        unwraps_after_restart,
        lists_per_node: per_node(lists),
        watches_per_node: per_node(watches),
        events_per_node: per_node(events),
        requests_per_node: per_node(reqs.len()),
        peak_rss_max_mib: rss.iter().copied().fold(0.0, f64::max),
        peak_rss_mean_mib: rss.iter().sum::<f64>() / rss.len().max(1) as f64,
    };
    if r.unwraps_per_node_per_ciphertext_min != 1.0 || r.unwraps_per_node_per_ciphertext_max != 1.0 {
        return Err(fail(format!(
            "Key Protect unwraps per node per ciphertext: {} to {}, not exactly 1\n{}",
            r.unwraps_per_node_per_ciphertext_min,
            r.unwraps_per_node_per_ciphertext_max,
            table(&r)
        )));
    }
    if r.unwraps_after_restart != 0 {
        return Err(fail(format!(
            "{} unwraps after the API server restart (keys already on disk must not be unwrapped again)\n{}",
            r.unwraps_after_restart,
            table(&r)
        )));
    }
    Ok(r)
}

/// The figures as a table.
pub fn table(r: &Results) -> String {
    format!(
        "{} nodes, {} key + {} kp-key Secrets\n\
         rollout: first node holds every key after {:.2} s, every node after {:.2} s\n\
         Key Protect unwraps per node per ciphertext: {}..{}   [exactly 1]\n\
         new kp-key with 429 + Retry-After: 1 on each node's first unwrap: every node after {:.2} s ({} unwrap requests, {} answered 429)\n\
         delete: gone from every node after {:.2} s\n\
         API server restart with a change while down and compaction: every node caught up after {:.2} s; {} unwraps after it   [0]\n\
         API requests per node over the run: {:.1} Secret lists, {:.1} watches, {:.1} Event posts, {:.1} in all\n\
         peak RSS per agent: max {:.1} MiB, mean {:.1} MiB",
        r.nodes,
        r.keys,
        r.kp_keys,
        r.first_node_s,
        r.converge_s,
        r.unwraps_per_node_per_ciphertext_min,
        r.unwraps_per_node_per_ciphertext_max,
        r.throttled_kp_key_s,
        r.throttled_unwrap_requests,
        r.throttled_429s,
        r.delete_s,
        r.restart_converge_s,
        r.unwraps_after_restart,
        r.lists_per_node,
        r.watches_per_node,
        r.events_per_node,
        r.requests_per_node,
        r.peak_rss_max_mib,
        r.peak_rss_mean_mib,
    )
}

/// The command line of `cluster-bench`.
///
/// # Errors
/// [`AgentBenchError`].
pub fn main_with_args(args: Vec<String>) -> Result<Results, AgentBenchError> {
    let usage = |m: String| {
        AgentBenchError::Failed(format!(
            "{m}\nusage: cluster-bench --agent PATH [--nodes 40] [--keys 200] [--kp-keys 10] [--kms-jitter DURATION] [--timeout-secs 300]"
        ))
    };
    let mut p = Params {
        agent: PathBuf::new(),
        nodes: 40,
        keys: 200,
        kp_keys: 10,
        kms_jitter: None,
        timeout: Duration::from_secs(300),
    };
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str| it.next().ok_or_else(|| usage(format!("{name} needs a value")));
        let num = |s: String, name: &str| {
            s.parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| usage(format!("{name} takes a positive number")))
        };
        match a.as_str() {
            "--agent" => p.agent = PathBuf::from(val("--agent")?),
            "--nodes" => p.nodes = num(val("--nodes")?, "--nodes")?,
            "--keys" => p.keys = num(val("--keys")?, "--keys")?,
            "--kp-keys" => p.kp_keys = num(val("--kp-keys")?, "--kp-keys")?,
            "--kms-jitter" => p.kms_jitter = Some(val("--kms-jitter")?),
            "--timeout-secs" => {
                p.timeout = Duration::from_secs(num(val("--timeout-secs")?, "--timeout-secs")? as u64)
            }
            other => return Err(usage(format!("unknown argument {other}"))),
        }
    }
    if p.agent.as_os_str().is_empty() {
        return Err(usage("--agent is required".into()));
    }
    if p.keys < 2 {
        return Err(usage(
            "--keys must be at least 2 (one is deleted, one deleted while the API server is down)".into(),
        ));
    }
    run(&p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_errors_name_the_problem() {
        let e = main_with_args(vec![]).unwrap_err().to_string();
        assert!(e.contains("--agent is required"), "{e}");
        let e = main_with_args(vec!["--agent".into(), "x".into(), "--nodes".into(), "0".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--nodes takes a positive number"), "{e}");
    }
}

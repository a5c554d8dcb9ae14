//! Hostile Secrets and a hostile node (issue 15 items 1-3, issue 14 item 6), through the real
//! binary and the Kubernetes API stand-in over loopback HTTP: no key material in Events, logs or
//! stderr; memory bounded by what the agent keeps; a foreign target directory left unchanged;
//! errors reported once, without colour codes in pipes, naming the API server; the recreate gap;
//! Events about the target directory; a read-only target filesystem.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use testkit::kube::KubeStandin;

const BIN: &str = env!("CARGO_BIN_EXE_keysync-agent");
const WAIT: Duration = Duration::from_secs(30);

fn once(standin: &KubeStandin, dir: &Path, extra: &[&str]) -> (i32, String) {
    let out = Command::new(BIN)
        .args([
            "--server",
            &standin.base_url(),
            "--namespace",
            NS,
            "--listen",
            "off",
        ])
        .args([
            "--target-dir",
            dir.to_str().unwrap(),
            "--kms-jitter",
            "0s",
            "--node-name",
            "n1",
        ])
        .args(extra)
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The base64 body of a PEM file, on one line.
fn pem_body(pem: &[u8]) -> String {
    String::from_utf8_lossy(pem)
        .lines()
        .filter(|l| !l.starts_with("-----") && !l.contains(':'))
        .collect::<Vec<_>>()
        .concat()
}

/// Panics when any 40 characters of `secret` appear in `text`.
fn assert_no_run(what: &str, secret: &str, text: &str) {
    let chars: Vec<char> = secret.chars().collect();
    for w in chars.windows(40) {
        let w: String = w.iter().collect();
        assert!(!text.contains(&w), "{what} holds 40 characters of a key: {w}");
    }
}

/// Issue 15 item 1: malformed keys (the review's run-on BEGIN line, JWK members holding the key,
/// a label that is the body, broken base64...) produce Events and log lines that say what is
/// wrong without any 40-character run of the key, in JSON and in text logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_material_in_events_logs_or_stderr() {
    let standin = KubeStandin::start().await.unwrap();
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("synced");
    let mut secrets_used = Vec::new();
    let mut n = 0;
    for file in ["rsa.pem", "ec.p8.pem", "cert.key.pem"] {
        let body = pem_body(&key(file));
        let lines: Vec<String> = body
            .as_bytes()
            .chunks(64)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect();
        let wrapped = lines.join("\n");
        let shapes = [
            format!("-----BEGIN PRIVATE KEY {body} -----END PRIVATE KEY-----\n"),
            format!("-----BEGIN PRIVATE KEY {body}\n-----END PRIVATE KEY-----\n"),
            format!("-----BEGIN {body}-----\n{wrapped}\n-----END {body}-----\n"),
            format!("-----BEGIN PRIVATE KEY-----\n{wrapped}\n-----END {body}-----\n"),
            format!(
                "-----BEGIN PRIVATE KEY-----\n{}!\n-----END PRIVATE KEY-----\n",
                &body[..body.len() / 2]
            ),
            format!(
                "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
                &body[..body.len() / 2]
            ),
            format!(r#"{{"kty":"{body}","d":"{body}"}}"#),
            format!(r#"{{"kty":"EC","crv":"{body}","x":"AAAA","y":"AAAA","d":"{body}"}}"#),
            format!(r#"{{"kty":"OKP","crv":"{body}","d":"{body}"}}"#),
            format!(r#"{{"kty":"RSA","n":"{body}","e":"AQAB","d":"{body}!"}}"#),
            format!(r#"{{"kty":"EC","d":"{body}" "x"}}"#),
        ];
        for shape in shapes {
            n += 1;
            let name = format!("bad-{n}");
            standin
                .create_secret(secret(&name, "key", &[("k.pem", shape.as_bytes())]))
                .unwrap();
        }
        secrets_used.push(body);
    }
    standin
        .create_secret(secret("good", "key", &[("k.pem", &key("rsa.pem"))]))
        .unwrap();
    let (code, json_logs) = once(&standin, &dir, &["--once"]);
    assert_eq!(code, 2, "{json_logs}");
    assert_eq!(all_files(&dir), vec!["good/k.pem"]);
    let (code, text_logs) = once(&standin, &dir, &["--once", "--log-format", "text"]);
    assert_eq!(code, 2, "{text_logs}");
    let events = serde_json::to_string(&standin.events()).unwrap();
    for i in 1..=n {
        assert!(
            event_reasons(&standin, &format!("bad-{i}")).contains(&"InvalidKey".to_string()),
            "bad-{i}: {events}"
        );
    }
    assert!(
        events.contains("invalid label"),
        "the run-on BEGIN line is named: {events}"
    );
    for body in &secrets_used {
        assert_no_run("an Event", body, &events);
        assert_no_run("the JSON log", body, &json_logs);
        assert_no_run("the text log", body, &text_logs);
    }
}

fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

/// Spawns the agent (watch mode) with JSON logs collected on a thread; returns the child, the
/// probe address and the log receiver.
fn spawn_agent(
    program: &str,
    pre: &[&str],
    standin: &KubeStandin,
    dir: &Path,
    extra: &[&str],
) -> (Child, std::net::SocketAddr, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new(program)
        .args(pre)
        .args(["--server", &standin.base_url(), "--namespace", NS])
        .args(["--listen", "127.0.0.1:0", "--target-dir", dir.to_str().unwrap()])
        .args(["--kms-jitter", "0s", "--node-name", "n1"])
        .args(extra)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let addr = loop {
        let line = rx.recv_timeout(WAIT).expect("the agent logs its listen address");
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
            if let Some(a) = v["listen"].as_str() {
                break a.parse().unwrap();
            }
        }
    };
    (child, addr, rx)
}

fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Issue 15 item 2: 100 unrelated 1 MiB Secrets and 40 oversized `type: key` Secrets in the
/// namespace; the agent's peak RSS (VmHWM of the real binary) stays under 64 MiB, after the
/// initial list and after a relist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_is_bounded_by_what_the_agent_keeps() {
    let standin = KubeStandin::start().await.unwrap();
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("synced");
    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    for i in 0..100 {
        standin
            .create_secret(secret(&format!("unrelated-{i}"), "Opaque", &[("blob", &big)]))
            .unwrap();
    }
    for i in 0..40 {
        standin
            .create_secret(secret(&format!("huge-key-{i}"), "key", &[("k.pem", &big)]))
            .unwrap();
    }
    standin
        .create_secret(secret("good", "key", &[("k.pem", &key("ec.p8.pem"))]))
        .unwrap();
    let (child, addr, logs) = spawn_agent(BIN, &[], &standin, &dir, &["--resync-interval", "1s"]);
    let started = Instant::now();
    while read(&dir.join("good/k.pem")).is_none() {
        if started.elapsed() > Duration::from_secs(60) {
            let logs: Vec<String> = logs.try_iter().collect();
            let reqs: Vec<String> = standin.requests().iter().map(|r| format!("{r:?}")).collect();
            panic!(
                "no key after 60 s; logs:\n{}\nrequests:\n{}",
                logs.join("\n"),
                reqs.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("first key after {:?}", started.elapsed());
    wait_for("40 refusals", WAIT, || {
        (0..40).all(|i| !event_reasons(&standin, &format!("huge-key-{i}")).is_empty())
    })
    .await;
    wait_for_async("two relists", WAIT, || async {
        metric(&http_get(addr, "/metrics").await.1, "keysync_relists_total") >= 2
    })
    .await;
    let hwm = vm_hwm_kib(child.id());
    stop(child);
    eprintln!("keysync-agent peak RSS (VmHWM) with 100 unrelated 1 MB Secrets and 40 refused 1 MB key Secrets: {} KiB", hwm);
    assert!(hwm < 64 * 1024, "peak RSS {hwm} KiB, limit 64 MiB");
    assert_eq!(event_reasons(&standin, "unrelated-0"), Vec::<String>::new());
}

/// Issue 14 item 6: a foreign directory is refused without being changed (also by --cleanup);
/// --cleanup --adopt-target-dir works; the error is reported once; text logs in a pipe carry no
/// colour codes; a connection error names the API server; the --once summary agrees with the
/// exit status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_errors_and_summaries_tell_the_truth() {
    let standin = KubeStandin::start().await.unwrap();
    let t = tempfile::tempdir().unwrap();
    let foreign = t.path().join("keys");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::set_permissions(&foreign, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(foreign.join("admin.pem"), b"hand placed").unwrap();
    let mode = || std::fs::metadata(&foreign).unwrap().permissions().mode() & 0o7777;
    for extra in [&["--once"][..], &["--cleanup"][..]] {
        for format in ["json", "text"] {
            let mut args = extra.to_vec();
            args.extend(["--log-format", format]);
            let (code, logs) = once(&standin, &foreign, &args);
            assert_eq!(code, 1, "{logs}");
            assert_eq!(
                mode(),
                0o755,
                "{extra:?} changed the mode of a directory it refused"
            );
            assert_eq!(entries(&foreign), vec!["admin.pem"]);
            assert_eq!(
                logs.matches("--adopt-target-dir").count(),
                1,
                "the error is reported once: {logs}"
            );
            assert!(!logs.contains('\u{1b}'), "colour codes in a pipe: {logs:?}");
        }
    }
    let (code, logs) = once(&standin, &foreign, &["--cleanup", "--adopt-target-dir"]);
    assert_eq!(code, 0, "{logs}");
    assert!(!foreign.exists());

    // An API server that is not there: the message names it.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let dir = t.path().join("synced");
    let out = Command::new(BIN)
        .args(["--server", &url, "--namespace", NS, "--listen", "off", "--once"])
        .args(["--once-timeout", "2s", "--target-dir", dir.to_str().unwrap()])
        .output()
        .unwrap();
    let logs = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{logs}");
    assert!(logs.contains(&url), "the API server URL is named: {logs}");

    // --once: the summary line and the exit status agree.
    standin
        .create_secret(secret("bad", "key", &[("k.pem", &key("rsa.pub.pem"))]))
        .unwrap();
    let (code, logs) = once(&standin, &dir, &["--once"]);
    assert_eq!(code, 2, "{logs}");
    let last: serde_json::Value = serde_json::from_str(logs.lines().last().unwrap()).unwrap();
    assert_eq!(last["synced"], false, "{logs}");
    assert!(!logs.contains("\"synced\":true"), "{logs}");
    standin.delete_secret(NS, "bad");
    let (code, logs) = once(&standin, &dir, &["--once"]);
    assert_eq!(code, 0, "{logs}");
    let last: serde_json::Value = serde_json::from_str(logs.lines().last().unwrap()).unwrap();
    assert_eq!(last["synced"], true, "{logs}");
}

/// Issue 15 item 3: deleting and re-creating a Secret does not remove its files in between; a
/// deleted Secret's files go within the removal grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recreating_a_secret_leaves_no_gap_and_deletion_is_bounded() {
    let standin = KubeStandin::start().await.unwrap();
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("synced");
    let s = secret("k", "key", &[("k.pem", &key("ec.p8.pem"))]);
    standin.create_secret(s.clone()).unwrap();
    let mut o = options(vec![dir.clone()]);
    o.removal_grace = Duration::from_secs(1);
    let agent = start(&standin, o);
    let file = dir.join("k/k.pem");
    wait_for("the key", WAIT, || read(&file).is_some()).await;
    let reconciles = || {
        agent
            .metrics
            .reconciles
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let before = reconciles();
    assert!(standin.delete_secret(NS, "k"));
    wait_for("the deletion is seen", WAIT, || reconciles() > before).await;
    assert!(read(&file).is_some(), "the file went at once");
    standin.create_secret(s).unwrap();
    let deadline = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < deadline {
        assert!(
            read(&file).is_some(),
            "the key was missing while the Secret was re-created"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let gone = Instant::now();
    assert!(standin.delete_secret(NS, "k"));
    wait_for("removal after the grace period", Duration::from_secs(10), || {
        read(&file).is_none()
    })
    .await;
    let took = gone.elapsed();
    assert!(took >= Duration::from_millis(900), "removed after {took:?}");
    assert!(took < Duration::from_secs(4), "removed after {took:?}");
    agent.stop().await;
}

/// Issue 15 item 3: an Event about the target directory regards the agent's Pod by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_directory_events_name_what_they_regard() {
    let standin = KubeStandin::start().await.unwrap();
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("synced");
    standin
        .create_secret(secret("a", "key", &[("k.pem", &key("ec.p8.pem"))]))
        .unwrap();
    let mut o = options(vec![dir.clone()]);
    o.pod_name = Some("keysync-agent-x7k2p".into());
    let agent = start(&standin, o);
    wait_for("the key", WAIT, || read(&dir.join("a/k.pem")).is_some()).await;
    // The target replaced by a symlink: the agent refuses it and says so.
    let elsewhere = t.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &dir).unwrap();
    standin
        .create_secret(secret("b", "key", &[("k.pem", &key("rsa.pem"))]))
        .unwrap();
    wait_for("a WriteFailed Event", WAIT, || {
        standin.events().iter().any(|e| e["reason"] == "WriteFailed")
    })
    .await;
    let events = standin.events();
    for e in events.iter().filter(|e| e["reason"] == "WriteFailed") {
        assert_eq!(e["regarding"]["name"], "keysync-agent-x7k2p", "{e}");
        assert_eq!(e["regarding"]["kind"], "Pod", "{e}");
        assert!(e["note"].as_str().unwrap().contains("symbolic link"), "{e}");
    }
    assert!(events.iter().all(|e| e["regarding"]["name"] != ""), "{events:?}");
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    agent.stop().await;
}

/// Issue 15 item 3: on a read-only target filesystem a revoked key cannot be removed: /readyz
/// fails and a metric says how many operations failed. The real binary runs in a private mount
/// namespace (`unshare -rm`) where the target is a read-only bind mount.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_target_is_not_ready() {
    let probe = Command::new("unshare").args(["-rm", "true"]).status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED: unshare -rm is not available here (needs user namespaces)");
        return;
    }
    let standin = KubeStandin::start().await.unwrap();
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("synced");
    // A directory the agent wrote before, holding the key of a Secret since deleted (revoked).
    std::fs::create_dir_all(dir.join(".keysync-agent")).unwrap();
    std::fs::create_dir_all(dir.join("revoked")).unwrap();
    std::fs::write(dir.join("revoked/k.pem"), key("ec.p8.pem")).unwrap();
    for d in [&dir, &dir.join(".keysync-agent"), &dir.join("revoked")] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    let d = dir.to_str().unwrap();
    let script = format!("mount --bind {d} {d} && mount -o remount,bind,ro {d} && exec \"$@\"");
    let (child, addr, _logs) = spawn_agent(
        "unshare",
        &["-rm", "sh", "-c", &script, "sh", BIN],
        &standin,
        &dir,
        &[],
    );
    wait_for_async("a pass with failures", WAIT, || async {
        metric(&http_get(addr, "/metrics").await.1, "keysync_reconciles_total") >= 1
    })
    .await;
    let (code, body) = http_get(addr, "/readyz").await;
    let (_, metrics) = http_get(addr, "/metrics").await;
    stop(child);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("failed"), "{body}");
    assert!(
        metric(&metrics, "keysync_write_failures_last_pass") >= 1,
        "{metrics}"
    );
    assert!(dir.join("revoked/k.pem").exists());
}

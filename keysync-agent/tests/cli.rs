//! The `keysync-agent` binary: `--once`, `--cleanup`, the probe server, SIGTERM, JSON logs without
//! key material.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use testkit::kube::KubeStandin;

const BIN: &str = env!("CARGO_BIN_EXE_keysync-agent");

fn run_once(standin: &KubeStandin, dir: &Path) -> (i32, String) {
    let out = Command::new(BIN)
        .args([
            "--server",
            &standin.base_url(),
            "--namespace",
            NS,
            "--listen",
            "off",
            "--once",
        ])
        .args([
            "--target-dir",
            dir.to_str().unwrap(),
            "--kms-jitter",
            "0s",
            "--node-name",
            "n1",
        ])
        .env("RUST_LOG", "debug")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_no_key_material(logs: &str) {
    let rsa = String::from_utf8(key("rsa.pem")).unwrap();
    let body = rsa.lines().nth(1).unwrap();
    assert!(
        !logs.contains("BEGIN RSA PRIVATE KEY") && !logs.contains(&body[..24]),
        "key material in logs"
    );
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_syncs_and_reports_through_the_exit_status() {
    let standin = KubeStandin::start().await.unwrap();
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("synced");
    standin
        .create_secret(secret("good", "key", &[("k.pem", &key("rsa.pem"))]))
        .unwrap();
    // (The test body blocks its own thread; the stand-in runs on the runtime's workers.)
    let (code, logs) = run_once(&standin, &dir);
    assert_eq!(code, 0, "{logs}");
    assert_eq!(read(&dir.join("good/k.pem")).unwrap(), key("rsa.pem"));
    assert_no_key_material(&logs);

    // A Secret that cannot be synced: exit status 2, an Event, the good key still there.
    standin
        .create_secret(secret("bad", "key", &[("k.pem", &key("rsa.pub.pem"))]))
        .unwrap();
    let (code, logs) = run_once(&standin, &dir);
    assert_eq!(code, 2, "{logs}");
    assert!(logs.contains("InvalidKey"), "{logs}");
    assert_eq!(all_files(&dir), vec!["good/k.pem"]);
    assert_eq!(event_reasons(&standin, "bad"), vec!["InvalidKey"]);
    assert_no_key_material(&logs);

    // An API server that never answers: --once gives up in time, files untouched.
    standin.set_stalled(true);
    let started = std::time::Instant::now();
    let out = Command::new(BIN)
        .args([
            "--server",
            &standin.base_url(),
            "--namespace",
            NS,
            "--listen",
            "off",
            "--once",
        ])
        .args(["--target-dir", dir.to_str().unwrap(), "--once-timeout", "1s"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(String::from_utf8_lossy(&out.stderr).contains("did not finish in time"));
    assert_eq!(all_files(&dir), vec!["good/k.pem"]);
    standin.set_stalled(false);

    // --cleanup removes the subtree; a foreign directory is refused.
    let out = Command::new(BIN)
        .args(["--cleanup", "--target-dir", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!dir.exists());
    let foreign = t.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("mine.pem"), b"x").unwrap();
    let out = Command::new(BIN)
        .args(["--cleanup", "--target-dir", foreign.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--adopt-target-dir"));
    assert!(foreign.join("mine.pem").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_probes_and_keeps_files_on_sigterm() {
    let standin = KubeStandin::start().await.unwrap();
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("synced");
    let mut child = Command::new(BIN)
        .args([
            "--server",
            &standin.base_url(),
            "--namespace",
            NS,
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--target-dir", dir.to_str().unwrap(), "--kms-jitter", "0s"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let logger = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // The bound address is logged.
    let mut logs = Vec::new();
    let addr: std::net::SocketAddr = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the agent logs its listen address");
        logs.push(line.clone());
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if let Some(a) = v["listen"].as_str() {
            break a.parse().unwrap();
        }
    };
    standin
        .create_secret(secret("s", "key", &[("k.pem", &key("ec.p8.pem"))]))
        .unwrap();
    wait_for("the key", Duration::from_secs(30), || {
        read(&dir.join("s/k.pem")).is_some()
    })
    .await;
    wait_for_async("ready", Duration::from_secs(30), || async {
        http_get(addr, "/readyz").await.0 == 200
    })
    .await;
    assert_eq!(http_get(addr, "/healthz").await.0, 200);
    let (_, metrics) = http_get(addr, "/metrics").await;
    assert_eq!(metric(&metrics, "keysync_files_written_total"), 1, "{metrics}");
    assert_eq!(metric(&metrics, "keysync_managed_files"), 1);
    assert_eq!(metric(&metrics, "keysync_secrets{kind=\"key\"}"), 1);
    assert!(metric(&metrics, "keysync_last_sync_timestamp_seconds") > 1_700_000_000);

    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "the agent stops on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}");
    logger.join().unwrap();
    logs.extend(rx.try_iter());
    assert_eq!(
        read(&dir.join("s/k.pem")).unwrap(),
        key("ec.p8.pem"),
        "files stay after shutdown"
    );
    assert_no_key_material(&logs.join("\n"));
}

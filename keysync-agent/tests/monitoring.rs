//! `deploy/monitoring/`: the PrometheusRule's rules pass `promtool check rules` and the unit tests
//! of `deploy/monitoring/tests/alerts.test.yaml` (`promtool test rules`: each alert fires and does
//! not fire); every alert links to a runbook section that exists in
//! `docs/operating-the-agent.md`; the live `/metrics` of the real agent binary passes
//! `promtool check metrics`, and every metric the rules use is one the agent serves.
//!
//! Needs Debian's `prometheus` package (promtool); scripts/deps.sh installs it. Missing, the
//! tests skip, or fail under `IMGCRYPT_REQUIRE_TOOLS=1`.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{http_get, key, secret, wait_for, wait_for_async, NS};
use testkit::kube::KubeStandin;

const BIN: &str = env!("CARGO_BIN_EXE_keysync-agent");
const JOB: &str = "image-key-synchronizer/keysync-agent";

fn monitoring() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/monitoring"))
}

fn yaml(path: &Path) -> serde_yaml::Value {
    serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// `spec` of the PrometheusRule: a plain Prometheus rules file.
fn rules() -> serde_yaml::Value {
    let rule = yaml(&monitoring().join("prometheusrule.yaml"));
    assert_eq!(rule["apiVersion"].as_str(), Some("monitoring.coreos.com/v1"));
    assert_eq!(rule["kind"].as_str(), Some("PrometheusRule"));
    assert_eq!(rule["metadata"]["namespace"].as_str(), Some(NS));
    rule["spec"].clone()
}

fn alerts() -> Vec<serde_yaml::Value> {
    rules()["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap().clone())
        .collect()
}

/// Runs promtool; panics with its output unless it succeeds.
fn promtool(dir: &Path, args: &[&str], stdin: Option<&[u8]>) -> String {
    let mut child = Command::new("promtool")
        .current_dir(dir)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {}: {text}", args.join(" "));
    text
}

/// The `keysync_*` metric names an expression uses.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("keysync_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        out.insert(name);
    }
    out
}

#[test]
fn alerting_rules_pass_promtool_and_their_unit_tests() {
    if !testkit::tools::have_tool("promtool") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    std::fs::write(
        t.path().join("rules.yaml"),
        serde_yaml::to_string(&rules()).unwrap(),
    )
    .unwrap();
    std::fs::copy(
        monitoring().join("tests/alerts.test.yaml"),
        t.path().join("alerts.test.yaml"),
    )
    .unwrap();
    let checked = promtool(t.path(), &["check", "rules", "rules.yaml"], None);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(t.path(), &["test", "rules", "alerts.test.yaml"], None);
    assert!(tested.contains("SUCCESS"), "{tested}");

    // Every alert is unit-tested, selects our job, and has a runbook that exists.
    let tests = std::fs::read_to_string(monitoring().join("tests/alerts.test.yaml")).unwrap();
    let docs = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/operating-the-agent.md"
    ))
    .unwrap();
    let alerts = alerts();
    let names: BTreeSet<&str> = alerts.iter().map(|a| a["alert"].as_str().unwrap()).collect();
    for required in [
        "KeysyncAgentNotReady",
        "KeysyncSyncStale",
        "KeysyncUnwrapFailures",
        "KeysyncWriteErrors",
        "KeysyncEventPostingFailures",
    ] {
        assert!(names.contains(required), "no alert {required}");
    }
    for a in &alerts {
        let name = a["alert"].as_str().unwrap();
        assert!(
            tests.contains(&format!("alertname: {name}\n        exp_alerts: []"))
                && tests.contains(&format!("alertname: {name}\n        exp_alerts:\n")),
            "{name} is not tested both firing and not firing"
        );
        assert!(
            a["expr"].as_str().unwrap().contains(&format!("job=\"{JOB}\"")),
            "{name} does not select job {JOB}"
        );
        let url = a["annotations"]["runbook_url"].as_str().unwrap();
        let anchor = url
            .split_once("docs/operating-the-agent.md#")
            .unwrap_or_else(|| panic!("{name}: runbook {url} is not in docs/operating-the-agent.md"))
            .1;
        assert_eq!(anchor, name.to_lowercase());
        assert!(
            docs.contains(&format!("\n### {name}\n")),
            "docs/operating-the-agent.md has no section `### {name}` (runbook of the alert)"
        );
    }
}

/// The manifests are what the rules expect: the PodMonitor selects the DaemonSet's pods and
/// port, and its `job` label is the one the rules select.
#[test]
fn pod_monitor_scrapes_the_daemonset_pods() {
    let pm = yaml(&monitoring().join("podmonitor.yaml"));
    assert_eq!(pm["kind"].as_str(), Some("PodMonitor"));
    let job = format!(
        "{}/{}",
        pm["metadata"]["namespace"].as_str().unwrap(),
        pm["metadata"]["name"].as_str().unwrap()
    );
    assert_eq!(job, JOB, "the Prometheus Operator's job label is namespace/name");
    let ds: k8s_openapi::api::apps::v1::DaemonSet =
        serde_yaml::from_str(&std::fs::read_to_string(monitoring().join("../daemonset.yaml")).unwrap())
            .unwrap();
    let pod_labels = ds
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap();
    let sel = pm["spec"]["selector"]["matchLabels"].as_mapping().unwrap();
    for (k, v) in sel {
        assert_eq!(
            pod_labels.get(k.as_str().unwrap()).map(String::as_str),
            v.as_str(),
            "PodMonitor selector {k:?}"
        );
    }
    let port = pm["spec"]["podMetricsEndpoints"][0]["port"].as_str().unwrap();
    let c = &ds.spec.unwrap().template.spec.unwrap().containers[0];
    assert!(c
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .any(|p| p.name.as_deref() == Some(port)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_metrics_pass_promtool_and_cover_the_rules() {
    if !testkit::tools::have_tool("promtool") {
        return;
    }
    let standin = KubeStandin::start().await.unwrap();
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("synced");
    let mut child = Command::new(BIN)
        .args(["--server", &standin.base_url(), "--namespace", NS])
        .args(["--listen", "127.0.0.1:0", "--kms-jitter", "0s"])
        .arg("--target-dir")
        .arg(&dir)
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
    let addr: std::net::SocketAddr = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the agent logs its listen address");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if let Some(a) = v["listen"].as_str() {
            break a.parse().unwrap();
        }
    };
    // A key that syncs, and a kp-key without Key Protect config (a problem, by reason).
    standin
        .create_secret(secret("s", "key", &[("k.pem", &key("ec.p8.pem"))]))
        .unwrap();
    standin
        .create_secret(secret(
            "w",
            "kp-key",
            &[
                ("rootkeyid", b"12345678-1234-1234-1234-123456789012"),
                ("ciphertext", b"eyJ0"),
            ],
        ))
        .unwrap();
    wait_for("the key", Duration::from_secs(30), || {
        dir.join("s/k.pem").is_file()
    })
    .await;
    wait_for_async("ready", Duration::from_secs(30), || async {
        http_get(addr, "/readyz").await.0 == 200
    })
    .await;
    let (status, text) = http_get(addr, "/metrics").await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status, 200);
    assert!(text.contains("keysync_problems{reason="), "{text}");

    let checked = promtool(t.path(), &["check", "metrics"], Some(text.as_bytes()));
    assert!(checked.trim().is_empty(), "promtool check metrics: {checked}");
    let served: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    for a in alerts() {
        for m in metric_names(a["expr"].as_str().unwrap()) {
            assert!(
                served.contains(m.as_str()),
                "alert {} uses {m}, which the agent does not serve",
                a["alert"].as_str().unwrap()
            );
        }
    }
}

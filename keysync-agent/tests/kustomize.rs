//! `kubectl kustomize` renders `deploy/` and each overlay (`containerd`, `openshift`,
//! `monitoring`), and every rendered object parses as its type: the Kubernetes types of
//! k8s-openapi, checked by a round trip (a misspelt or misplaced field is dropped by the typed
//! parse and so fails the comparison), and strict (`deny_unknown_fields`) types for the custom
//! resources (OpenShift's SecurityContextConstraints, the Prometheus Operator's PodMonitor and
//! PrometheusRule). In every rendering of the agent, `--target-dir`, the mount path and the
//! hostPath agree.
//!
//! Needs `kubectl` (Debian: kubernetes-client; scripts/deps.sh installs it when missing). Missing,
//! the test skips, or fails under `IMGCRYPT_REQUIRE_TOOLS=1`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, Role, RoleBinding};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

fn deploy() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy"))
}

fn render(dir: &str) -> Vec<serde_json::Value> {
    let out = Command::new("kubectl")
        .args(["kustomize", "--load-restrictor=LoadRestrictionsNone"])
        .arg(deploy().join(dir))
        .output()
        .expect("kubectl runs");
    assert!(
        out.status.success(),
        "kubectl kustomize deploy/{dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_json::Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

/// Parses `v` as `T` and checks nothing was lost on the way (unknown or misplaced fields).
fn typed<T: DeserializeOwned + Serialize>(v: &serde_json::Value, ctx: &str) -> T {
    let t: T = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{ctx}: {e}"));
    let back = serde_json::to_value(&t).unwrap();
    assert_eq!(&back, v, "{ctx}: fields lost in the typed round trip");
    t
}

// Custom resources: the fields these manifests use, nothing else accepted.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Meta {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PodMonitor {
    api_version: String,
    kind: String,
    metadata: Meta,
    spec: PodMonitorSpec,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PodMonitorSpec {
    selector: k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    namespace_selector: NamespaceSelector,
    pod_metrics_endpoints: Vec<PodMetricsEndpoint>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NamespaceSelector {
    match_names: Vec<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PodMetricsEndpoint {
    port: String,
    path: String,
    interval: String,
    scrape_timeout: String,
    relabelings: Vec<Relabeling>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Relabeling {
    source_labels: Vec<String>,
    target_label: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PrometheusRule {
    api_version: String,
    kind: String,
    metadata: Meta,
    spec: RuleSpec,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    groups: Vec<RuleGroup>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleGroup {
    name: String,
    rules: Vec<Rule>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    alert: String,
    expr: String,
    #[serde(rename = "for")]
    for_: String,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SecurityContextConstraints {
    api_version: String,
    kind: String,
    metadata: Meta,
    allow_host_dir_volume_plugin: bool,
    #[serde(rename = "allowHostIPC")]
    allow_host_ipc: bool,
    allow_host_network: bool,
    #[serde(rename = "allowHostPID")]
    allow_host_pid: bool,
    allow_host_ports: bool,
    allow_privilege_escalation: bool,
    allow_privileged_container: bool,
    allowed_capabilities: Vec<String>,
    default_add_capabilities: Vec<String>,
    required_drop_capabilities: Vec<String>,
    read_only_root_filesystem: bool,
    run_as_user: serde_json::Value,
    se_linux_context: serde_json::Value,
    fs_group: serde_json::Value,
    supplemental_groups: serde_json::Value,
    seccomp_profiles: Vec<String>,
    volumes: Vec<String>,
    users: Vec<String>,
    groups: Vec<String>,
    priority: Option<i32>,
}

/// Parses every rendered object as its type; returns the count by kind and the DaemonSets.
fn check(dir: &str) -> (BTreeMap<String, usize>, Vec<DaemonSet>) {
    let mut kinds = BTreeMap::new();
    let mut daemon_sets = Vec::new();
    for v in render(dir) {
        let api = v["apiVersion"].as_str().unwrap_or_default().to_owned();
        let kind = v["kind"].as_str().unwrap_or_default().to_owned();
        let ctx = format!("deploy/{dir}: {kind} {}", v["metadata"]["name"]);
        match (api.as_str(), kind.as_str()) {
            ("v1", "Namespace") => drop(typed::<Namespace>(&v, &ctx)),
            ("v1", "ServiceAccount") => drop(typed::<ServiceAccount>(&v, &ctx)),
            ("rbac.authorization.k8s.io/v1", "Role") => drop(typed::<Role>(&v, &ctx)),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => drop(typed::<ClusterRole>(&v, &ctx)),
            ("rbac.authorization.k8s.io/v1", "RoleBinding") => drop(typed::<RoleBinding>(&v, &ctx)),
            ("apps/v1", "DaemonSet") => daemon_sets.push(typed::<DaemonSet>(&v, &ctx)),
            ("security.openshift.io/v1", "SecurityContextConstraints") => {
                drop(typed::<SecurityContextConstraints>(&v, &ctx))
            }
            ("monitoring.coreos.com/v1", "PodMonitor") => drop(typed::<PodMonitor>(&v, &ctx)),
            ("monitoring.coreos.com/v1", "PrometheusRule") => drop(typed::<PrometheusRule>(&v, &ctx)),
            other => panic!("{ctx}: unexpected object {other:?}"),
        }
        *kinds.entry(kind).or_default() += 1;
    }
    (kinds, daemon_sets)
}

/// The agent's key directory: `--target-dir`, the mount path and the hostPath.
fn key_dir(ds: &DaemonSet) -> String {
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let c = &pod.containers[0];
    let arg = c
        .args
        .as_ref()
        .unwrap()
        .iter()
        .find_map(|a| a.strip_prefix("--target-dir="))
        .expect("--target-dir")
        .to_owned();
    let mounts = c.volume_mounts.as_ref().unwrap();
    assert_eq!(mounts.len(), 1);
    assert_eq!(mounts[0].mount_path, arg);
    let vol = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == mounts[0].name)
        .unwrap();
    assert_eq!(vol.host_path.as_ref().unwrap().path, arg);
    arg
}

#[test]
fn kustomize_renders_deploy_and_every_overlay_into_typed_objects() {
    if !testkit::tools::have_tool("kubectl") {
        return;
    }
    let base = BTreeMap::from([
        ("DaemonSet".to_owned(), 1),
        ("Namespace".to_owned(), 1),
        ("Role".to_owned(), 1),
        ("RoleBinding".to_owned(), 1),
        ("ServiceAccount".to_owned(), 1),
    ]);

    let (kinds, ds) = check("");
    assert_eq!(kinds, base);
    assert_eq!(key_dir(&ds[0]), "/etc/crio/keys/synced");

    let (kinds, ds) = check("containerd");
    assert_eq!(kinds, base);
    assert_eq!(key_dir(&ds[0]), "/etc/containerd/ocicrypt/keys/synced");

    let (kinds, ds) = check("openshift");
    assert_eq!(kinds["SecurityContextConstraints"], 1);
    assert_eq!(kinds["DaemonSet"], 1);
    assert_eq!(key_dir(&ds[0]), "/etc/crio/keys/synced");
    let pod = ds[0].spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let se = pod.security_context.as_ref().unwrap().se_linux_options.as_ref();
    assert_eq!(se.and_then(|o| o.type_.as_deref()), Some("spc_t"));

    let (kinds, ds) = check("monitoring");
    assert!(ds.is_empty());
    assert_eq!(
        kinds,
        BTreeMap::from([("PodMonitor".to_owned(), 1), ("PrometheusRule".to_owned(), 1)])
    );
}

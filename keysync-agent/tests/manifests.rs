//! `deploy/`: every manifest parses into its k8s-openapi type, the RBAC grants nothing beyond
//! get/list/watch on Secrets and create on Events in the one namespace, and the DaemonSet matches
//! what the agent needs (and nothing more).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use clap::Parser;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use serde::Deserialize;

const NS: &str = "image-key-synchronizer";

fn deploy() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy"))
}

#[derive(Default)]
struct Objects {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    roles: Vec<Role>,
    role_bindings: Vec<RoleBinding>,
    daemon_sets: Vec<DaemonSet>,
}

fn load() -> Objects {
    let mut o = Objects::default();
    let mut files: Vec<_> = std::fs::read_dir(deploy())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml") && !p.ends_with("kustomization.yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "{files:?}");
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = serde_yaml::Value::deserialize(doc).unwrap();
            if v.is_null() {
                continue;
            }
            let kind = v["kind"]
                .as_str()
                .unwrap_or_else(|| panic!("{}: a document without kind", f.display()));
            let api = v["apiVersion"].as_str().unwrap().to_string();
            let ctx = format!("{}: {kind}", f.display());
            match (api.as_str(), kind) {
                ("v1", "Namespace") => o.namespaces.push(serde_yaml::from_value(v).expect(&ctx)),
                ("v1", "ServiceAccount") => o.service_accounts.push(serde_yaml::from_value(v).expect(&ctx)),
                ("rbac.authorization.k8s.io/v1", "Role") => {
                    o.roles.push(serde_yaml::from_value(v).expect(&ctx))
                }
                ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
                    o.role_bindings.push(serde_yaml::from_value(v).expect(&ctx))
                }
                ("apps/v1", "DaemonSet") => o.daemon_sets.push(serde_yaml::from_value(v).expect(&ctx)),
                other => panic!(
                    "{}: unexpected object {other:?} (a ClusterRole or binding is not allowed)",
                    f.display()
                ),
            }
        }
    }
    o
}

#[test]
fn rbac_grants_only_secret_reads_and_event_creation_in_one_namespace() {
    let o = load();
    assert_eq!(o.namespaces.len(), 1);
    assert_eq!(o.namespaces[0].metadata.name.as_deref(), Some(NS));
    assert_eq!(o.service_accounts.len(), 1);
    let sa = o.service_accounts[0].metadata.name.clone().unwrap();
    assert_eq!(o.service_accounts[0].metadata.namespace.as_deref(), Some(NS));

    assert_eq!(o.roles.len(), 1, "exactly one Role");
    let role = &o.roles[0];
    assert_eq!(role.metadata.namespace.as_deref(), Some(NS));
    let allowed: BTreeMap<(&str, &str), BTreeSet<&str>> = [
        (("", "secrets"), ["get", "list", "watch"].into()),
        (("events.k8s.io", "events"), ["create"].into()),
        (("", "events"), ["create"].into()),
    ]
    .into();
    let mut granted = BTreeSet::new();
    for rule in role.rules.as_ref().unwrap() {
        assert!(rule.non_resource_urls.is_none(), "no non-resource URLs");
        assert!(rule.resource_names.is_none(), "no resourceNames needed");
        for g in rule.api_groups.as_ref().unwrap() {
            for r in rule.resources.as_ref().unwrap() {
                let ok = allowed.get(&(g.as_str(), r.as_str())).unwrap_or_else(|| {
                    panic!(
                        "the Role grants access to {r:?} in API group {g:?}, which the agent does not need"
                    )
                });
                for v in &rule.verbs {
                    assert!(ok.contains(v.as_str()), "verb {v:?} on {g:?}/{r:?} is not needed");
                    granted.insert((g.clone(), r.clone(), v.clone()));
                }
            }
        }
    }
    // What the agent does use is granted.
    for v in ["list", "watch"] {
        assert!(
            granted.contains(&(String::new(), "secrets".into(), v.into())),
            "{v} secrets"
        );
    }
    assert!(granted.contains(&("events.k8s.io".into(), "events".into(), "create".into())));

    assert_eq!(o.role_bindings.len(), 1);
    let rb = &o.role_bindings[0];
    assert_eq!(rb.metadata.namespace.as_deref(), Some(NS));
    assert_eq!(rb.role_ref.kind, "Role", "bound to the Role, never a ClusterRole");
    assert_eq!(rb.role_ref.name, role.metadata.name.clone().unwrap());
    let subjects = rb.subjects.as_ref().unwrap();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(subjects[0].name, sa);
    assert_eq!(subjects[0].namespace.as_deref(), Some(NS));
}

#[test]
fn daemonset_mounts_only_the_key_directory_and_runs_locked_down() {
    let o = load();
    assert_eq!(o.daemon_sets.len(), 1);
    let ds = &o.daemon_sets[0];
    assert_eq!(ds.metadata.namespace.as_deref(), Some(NS));
    let spec = ds.spec.as_ref().unwrap();
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(
        pod.service_account_name.as_deref(),
        o.service_accounts[0].metadata.name.as_deref()
    );
    assert_ne!(pod.host_network, Some(true));
    assert_ne!(pod.host_pid, Some(true));
    // Tolerates every taint (an entry with operator Exists and no key).
    let tol = pod.tolerations.as_ref().unwrap();
    assert!(tol
        .iter()
        .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()));
    assert!(pod.priority_class_name.is_some());

    // Exactly one hostPath volume: the key directory.
    let vols = pod.volumes.as_ref().unwrap();
    let host_paths: Vec<_> = vols
        .iter()
        .filter_map(|v| v.host_path.as_ref().map(|h| (v.name.clone(), h)))
        .collect();
    assert_eq!(
        host_paths.len(),
        1,
        "only the key directory is mounted from the host"
    );
    let (vol_name, hp) = &host_paths[0];
    assert_eq!(hp.path, "/etc/crio/keys/synced");
    assert_eq!(hp.type_.as_deref(), Some("DirectoryOrCreate"));

    assert_eq!(pod.containers.len(), 1);
    let c = &pod.containers[0];
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_ne!(sc.privileged, Some(true));
    assert_eq!(
        sc.capabilities.as_ref().unwrap().drop.as_ref().unwrap(),
        &vec!["ALL".to_string()]
    );
    assert!(sc.capabilities.as_ref().unwrap().add.is_none());
    let mounts = c.volume_mounts.as_ref().unwrap();
    assert_eq!(mounts.len(), 1);
    assert_eq!(&mounts[0].name, vol_name);
    assert_ne!(mounts[0].read_only, Some(true));

    // Probes on the agent's endpoints, resources bounded.
    let live = c.liveness_probe.as_ref().unwrap().http_get.as_ref().unwrap();
    assert_eq!(live.path.as_deref(), Some("/healthz"));
    let ready = c.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap();
    assert_eq!(ready.path.as_deref(), Some("/readyz"));
    let res = c.resources.as_ref().unwrap();
    for k in ["cpu", "memory"] {
        assert!(res.requests.as_ref().unwrap().contains_key(k), "request {k}");
        assert!(res.limits.as_ref().unwrap().contains_key(k), "limit {k}");
    }

    // The arguments are flags the binary accepts, and its target is the mounted directory.
    let env: BTreeMap<String, String> = [("POD_NAMESPACE".to_string(), NS.to_string())].into();
    let mut argv = vec!["keysync-agent".to_string()];
    for a in c.args.as_ref().unwrap() {
        let mut a = a.clone();
        for (k, v) in &env {
            a = a.replace(&format!("$({k})"), v);
        }
        argv.push(a);
    }
    let args = keysync_agent::cli::Args::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    assert_eq!(args.namespace, NS);
    assert_eq!(args.target_dirs, vec![PathBuf::from(&mounts[0].mount_path)]);
    let port = c.ports.as_ref().unwrap()[0].container_port;
    assert!(
        args.listen.ends_with(&format!(":{port}")),
        "{} vs {port}",
        args.listen
    );
    assert!(c.env.as_ref().unwrap().iter().any(|e| e.name == "NODE_NAME"));
}

#[test]
fn dockerfile_builds_the_agent() {
    let d = std::fs::read_to_string(deploy().join("Dockerfile")).unwrap();
    assert!(d.contains("-p keysync-agent"));
    assert!(d.contains("ENTRYPOINT [\"/usr/local/bin/keysync-agent\"]"));
    // The runtime content is what scripts/agent-image assembles (the binary, the libraries it
    // links, the CA bundle), in an image with nothing else.
    assert!(d.contains("scripts/agent-image --rootfs /rootfs"));
    assert!(d.contains("FROM scratch\nCOPY --from=build /rootfs/ /\n"));
    let script = std::fs::read_to_string(deploy().join("../scripts/agent-image")).unwrap();
    assert!(script.contains(r#"\"Entrypoint\":[\"/usr/local/bin/keysync-agent\"]"#));
    let k = std::fs::read_to_string(deploy().join("kustomization.yaml")).unwrap();
    for f in ["namespace.yaml", "rbac.yaml", "daemonset.yaml"] {
        assert!(k.contains(f), "kustomization lists {f}");
    }
}

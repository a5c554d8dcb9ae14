//! The agent as it is deployed, on a real runtime: `scripts/agent-image` builds the
//! keysync-agent image, `imgcrypt` encrypts it for the node's key and pushes it to Debian's
//! docker-registry on loopback, containerd pulls it through the CRI image service with
//! `imgcrypt-decoder` as stream processor, and runc runs it the way `deploy/daemonset.yaml` does:
//! read-only root filesystem, every capability dropped, the default seccomp profile, only the
//! host key directory bind-mounted at `/etc/crio/keys/synced`, the API server (the Kubernetes API
//! stand-in) reached through a mounted kubeconfig. The agent inside syncs a `key` Secret to the
//! host directory (0600), and the pull of a workload image encrypted for that key then succeeds.
//!
//! Needs root, containerd, runc, busybox-static, docker-registry (scripts/deps.sh), binutils
//! and ca-certificates (for scripts/agent-image), and the workspace binary `keysync-agent`
//! (`cargo build --workspace --bins`; scripts/test does it). Missing pieces make the test skip,
//! or fail under `IMGCRYPT_REQUIRE_TOOLS=1`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use testkit::containerd::{prerequisites, run_bounded, secret, workspace_bin, Containerd};
use testkit::image::{write_image, Compression, LayerSpec};
use testkit::kube::KubeStandin;
use testkit::registry::Registry;
use testkit::tools::{openssl_keypair, tools_required};

const NS: &str = "image-key-synchronizer";
const DECODER: &str = env!("CARGO_BIN_EXE_imgcrypt-decoder");
const IMGCRYPT: &str = env!("CARGO_BIN_EXE_imgcrypt");
/// The key directory of deploy/daemonset.yaml, inside the container.
const MOUNT: &str = "/etc/crio/keys/synced";
/// containerd's default capability set (what `drop: [ALL]` removes).
const DEFAULT_CAPS: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

fn skip_or_fail(why: &str) {
    assert!(!tools_required(), "{why} (IMGCRYPT_REQUIRE_TOOLS=1)");
    eprintln!("SKIP: {why}");
}

fn workspace_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn encrypt_and_push(src: &str, public_key: &Path, dest: &str) {
    let out = run_bounded(
        {
            let mut c = Command::new(IMGCRYPT);
            c.args(["encrypt", "-q", "--tls-verify=false", "--recipient"])
                .arg(format!("jwe:{}", public_key.display()))
                .arg(src)
                .arg(dest);
            c
        },
        Duration::from_secs(300),
    );
    assert!(
        out.status.success(),
        "imgcrypt encrypt {src} -> {dest}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ctr_ok(ctrd: &Containerd, args: &[&str]) -> String {
    let out = ctrd.ctr(args);
    assert!(
        out.status.success(),
        "ctr {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The agent's container, killed and removed on drop (before containerd stops).
struct AgentContainer<'a> {
    ctrd: &'a Containerd,
    id: &'static str,
    log: PathBuf,
}

impl AgentContainer<'_> {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The agent's pid on the host (`ctr task ls`).
    fn pid(&self) -> Option<u32> {
        let out = self.ctrd.ctr(&["task", "ls"]);
        String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some(self.id) && f.clone().nth(1) == Some("RUNNING"))
                .then(|| f.next().and_then(|p| p.parse().ok()))
                .flatten()
        })
    }

    fn wait_for(&self, what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !cond() {
            assert!(
                self.pid().is_some(),
                "the agent container is not running:\n{}",
                self.log_text()
            );
            assert!(
                Instant::now() < deadline,
                "keysync-agent (in its container): {what} did not happen within 60 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for AgentContainer<'_> {
    fn drop(&mut self) {
        let _ = self.ctrd.ctr(&["task", "kill", "-s", "SIGKILL", self.id]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.pid().is_some() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.ctrd.ctr(&["task", "delete", "-f", self.id]);
        let _ = self.ctrd.ctr(&["containers", "delete", self.id]);
    }
}

/// `/proc/PID/status` field (`CapEff`, `NoNewPrivs`, `Seccomp`).
fn proc_status(pid: u32, field: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

/// `config.Entrypoint` (one element) of `layout:tag`.
fn image_entrypoint(layout: &Path, tag: &str) -> String {
    let json = |digest: &str| -> serde_json::Value {
        let p = layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"));
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let m = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .expect("the tag in index.json");
    let manifest = json(m["digest"].as_str().unwrap());
    let config = json(manifest["config"]["digest"].as_str().unwrap());
    let ep = config["config"]["Entrypoint"].as_array().expect("an Entrypoint");
    assert_eq!(ep.len(), 1, "{ep:?}");
    ep[0].as_str().unwrap().to_owned()
}

#[test]
fn encrypted_agent_image_runs_under_containerd_like_the_daemonset_and_syncs_a_key() {
    if let Err(why) = prerequisites() {
        return skip_or_fail(&why);
    }
    let agent_bin = match workspace_bin("keysync-agent") {
        Ok(a) => a,
        Err(why) => return skip_or_fail(&why),
    };
    let work = tempfile::tempdir().unwrap();
    let w = work.path();

    // 1. The image, as an operator builds it.
    let layout = w.join("agent-layout");
    let out = run_bounded(
        {
            let mut c = Command::new(workspace_root().join("scripts/agent-image"));
            c.arg(&layout).env("KEYSYNC_AGENT", &agent_bin);
            c
        },
        Duration::from_secs(300),
    );
    assert!(
        out.status.success(),
        "scripts/agent-image: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let version = env!("CARGO_PKG_VERSION");
    let entrypoint = image_entrypoint(&layout, version);
    assert_eq!(entrypoint, "/usr/local/bin/keysync-agent");

    // The node's key (provisioned with the node) decrypts the agent image; the workload's key
    // reaches the node only through the agent.
    let (node_priv, node_pub) = openssl_keypair(w, "node", "rsa2048");
    let (image_priv, image_pub) = openssl_keypair(w, "image", "rsa2048");
    let registry = Registry::start();
    let agent_image = format!("{}/imgcrypt/keysync-agent:{version}", registry.addr);
    encrypt_and_push(
        &format!("oci:{}:{version}", layout.display()),
        &node_pub,
        &format!("docker://{agent_image}"),
    );
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (busybox-static)");
    let app_layout = w.join("app-layout");
    write_image(
        &app_layout,
        "v1",
        &[LayerSpec {
            files: vec![
                ("bin/busybox".to_owned(), busybox, 0o755),
                (
                    "etc/message".to_owned(),
                    b"hello from the workload\n".to_vec(),
                    0o644,
                ),
            ],
            compression: Compression::Gzip,
        }],
    );
    let app_image = format!("{}/e2e/app:v1", registry.addr);
    encrypt_and_push(
        &format!("oci:{}:v1", app_layout.display()),
        &image_pub,
        &format!("docker://{app_image}"),
    );

    // The node: the decoder's key directory holds the node key; `synced` is the agent's.
    let keys = w.join("keys");
    std::fs::create_dir(&keys).unwrap();
    std::fs::set_permissions(&keys, PermissionsExt::from_mode(0o700)).unwrap();
    std::fs::copy(&node_priv, keys.join("node.pem")).unwrap();
    std::fs::set_permissions(keys.join("node.pem"), PermissionsExt::from_mode(0o600)).unwrap();
    let synced = keys.join("synced");
    std::fs::create_dir(&synced).unwrap();
    std::fs::set_permissions(&synced, PermissionsExt::from_mode(0o700)).unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let standin = rt.block_on(KubeStandin::start()).unwrap();
    let kube_dir = w.join("kube");
    std::fs::create_dir(&kube_dir).unwrap();
    std::fs::write(kube_dir.join("config"), standin.kubeconfig_yaml(NS)).unwrap();

    let ctrd = Containerd::start(Path::new(DECODER), &keys, &registry.addr);

    // 2. The encrypted agent image pulls through CRI (decrypted by imgcrypt-decoder with the
    //    node key); the workload does not (its key is not on the node yet).
    ctrd.pull_image(&agent_image)
        .unwrap_or_else(|e| panic!("pull {agent_image}: {e}\n{}", ctrd.log_text()));
    let err = ctrd
        .pull_image(&app_image)
        .expect_err("the workload pull must fail without its key");
    eprintln!("workload pull without the key fails: {err}");

    // 3. The agent runs as the DaemonSet runs it.
    let log = w.join("agent.log");
    let mount_keys = format!("type=bind,src={},dst={MOUNT},options=rbind:rw", synced.display());
    let mount_kube = format!(
        "type=bind,src={},dst=/var/run/keysync,options=rbind:ro",
        kube_dir.display()
    );
    let log_uri = format!("file://{}", log.display());
    // `capabilities: drop: [ALL]`: ctr 1.6 takes no `ALL`, so every capability of containerd's
    // default set is dropped by name (CapEff/CapPrm are checked below).
    assert_eq!(NS, "image-key-synchronizer");
    assert_eq!(MOUNT, "/etc/crio/keys/synced");
    let mut args = vec!["run", "-d", "--read-only", "--net-host", "--seccomp"];
    for cap in DEFAULT_CAPS {
        args.extend(["--cap-drop", cap]);
    }
    args.extend([
        "--log-uri",
        &log_uri,
        "--mount",
        &mount_keys,
        "--mount",
        &mount_kube,
        "--env",
        "NODE_NAME=e2e-node",
        "--env",
        "RUST_LOG=info",
        &agent_image,
        "keysync-agent",
        // ctr replaces the whole argv when given a command; the kubelet keeps the image's
        // Entrypoint and appends `args`: so the Entrypoint comes first, as in the pod.
        &entrypoint,
        // The DaemonSet's arguments (deploy/daemonset.yaml), with the kubeconfig instead of
        // the in-cluster service account.
        "--namespace=image-key-synchronizer",
        "--target-dir=/etc/crio/keys/synced",
        "--listen=off",
        "--kubeconfig=/var/run/keysync/config",
        "--kms-jitter=0s",
        "--log-format=text",
    ]);
    ctr_ok(&ctrd, &args);
    let agent = AgentContainer {
        ctrd: &ctrd,
        id: "keysync-agent",
        log,
    };
    // The agent starts (its marker appears in the empty directory) ...
    agent.wait_for("its start", || synced.join(".keysync-agent").exists());
    // ... with no capabilities, no new privileges, seccomp filtering, a read-only root.
    let pid = agent.pid().expect("the agent runs");
    assert_eq!(
        proc_status(pid, "CapEff"),
        "0000000000000000",
        "effective capabilities"
    );
    assert_eq!(
        proc_status(pid, "CapPrm"),
        "0000000000000000",
        "permitted capabilities"
    );
    assert_eq!(proc_status(pid, "NoNewPrivs"), "1");
    assert_eq!(proc_status(pid, "Seccomp"), "2", "seccomp filter mode");
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mounts")).unwrap();
    let root = mounts
        .lines()
        .find(|l| l.split(' ').nth(1) == Some("/"))
        .expect("a root mount");
    assert!(
        root.split(' ').nth(3).unwrap().split(',').any(|o| o == "ro"),
        "{root}"
    );
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert!(exe.ends_with("usr/local/bin/keysync-agent"), "{}", exe.display());

    // 4. A `key` Secret reaches the host directory, 0600 in a 0700 directory.
    let pem = std::fs::read(&image_priv).unwrap();
    standin
        .create_secret(secret(NS, "image-key", "key", &[("image.pem", &pem)]))
        .unwrap();
    let file = synced.join("image-key/image.pem");
    agent.wait_for("the key file on the host", || file.exists());
    assert_eq!(std::fs::read(&file).unwrap(), pem);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&file), 0o600, "key file mode");
    assert_eq!(mode(&synced.join("image-key")), 0o700, "key directory mode");

    // 5. The workload now pulls (decrypted with the synced key) and runs.
    ctrd.pull_image(&app_image)
        .unwrap_or_else(|e| panic!("pull {app_image} with the synced key: {e}\n{}", ctrd.log_text()));
    let printed = ctr_ok(
        &ctrd,
        &[
            "run",
            "--rm",
            &app_image,
            "e2e-app",
            "/bin/busybox",
            "cat",
            "/etc/message",
        ],
    );
    assert_eq!(printed.trim(), "hello from the workload");
    assert!(
        !agent.log_text().contains("BEGIN"),
        "the agent's log quotes no key material"
    );
    drop(agent);
    drop(ctrd);
    drop(standin);
}

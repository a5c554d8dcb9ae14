//! Command line of the `keysync-agent` binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use crate::agent::{cleanup, Agent, AgentError, AgentOptions, DEFAULT_FIELD_SELECTOR};
use crate::kms::KmsOptions;
use crate::metrics;

/// Syncs image decryption keys from Kubernetes Secrets into the container runtime's key directory.
///
/// Secrets of `type: key` are installed as they are; `type: kp-key` Secrets are unwrapped with
/// IBM Key Protect (configured by the Secret `keyprotect-config`, entry `config.json`). Only
/// private keys the runtime can load are written; everything else is reported as a Kubernetes
/// Event on the Secret.
#[derive(Debug, Parser)]
#[command(name = "keysync-agent", version)]
pub struct Args {
    /// Namespace whose Secrets are synced.
    #[arg(long, env = "KEYSYNC_NAMESPACE", default_value = "image-key-synchronizer")]
    pub namespace: String,
    /// Directory to write keys into, one subdirectory per Secret (repeatable). containerd users add
    /// /etc/containerd/ocicrypt/keys/synced.
    #[arg(long = "target-dir", default_value = "/etc/crio/keys/synced")]
    pub target_dirs: Vec<PathBuf>,
    /// Take over a target directory that already holds files but was not created by the agent
    /// (its other files will be removed).
    #[arg(long = "adopt-target-dir")]
    pub adopt_target_dir: bool,
    /// Address of /healthz, /readyz and /metrics ("off" to disable).
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub listen: String,
    /// Sync once and exit (exit status 2 when some Secrets could not be synced).
    #[arg(long, conflicts_with = "cleanup")]
    pub once: bool,
    /// With --once: give up after this long (exit status 2).
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub once_timeout: Duration,
    /// Remove everything the agent wrote (its subtree of every target directory) and exit.
    #[arg(long)]
    pub cleanup: bool,
    /// Full relist and disk repair period (e.g. 10m).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub resync_interval: Duration,
    /// /healthz fails when the watch made no progress for this long.
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    pub stall_timeout: Duration,
    /// Server-side timeout of each watch request (at most 295s).
    #[arg(long, default_value = "290s", value_parser = parse_duration)]
    pub watch_timeout: Duration,
    /// Extra field selector, ANDed with the agent's own (it watches `type=key`, `type=kp-key` and
    /// the Secret `keyprotect-config` only); "" for none.
    #[arg(long, default_value = DEFAULT_FIELD_SELECTOR)]
    pub field_selector: String,
    /// Key Protect unwraps in flight at most.
    #[arg(long, default_value_t = 4)]
    pub kms_concurrency: usize,
    /// Upper bound of the random delay before an unwrap (spreads load across nodes).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub kms_jitter: Duration,
    /// Key Protect request timeout.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub kms_timeout: Duration,
    /// First retry delay after a transient Key Protect failure (doubles up to --kms-retry-cap).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub kms_retry_base: Duration,
    /// Longest retry delay after transient Key Protect failures.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub kms_retry_cap: Duration,
    /// Retry delay after a permanent Key Protect failure (revoked key, bad credentials).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub kms_permanent_retry: Duration,
    /// Extra CA certificates (PEM bundle) to trust for Key Protect and IAM.
    #[arg(long, env = "KP_CA_BUNDLE")]
    pub kms_ca_bundle: Option<PathBuf>,
    /// Do not post Kubernetes Events.
    #[arg(long)]
    pub no_events: bool,
    /// Node name, reported in Events (set from the downward API).
    #[arg(long, env = "NODE_NAME", default_value = "keysync-agent")]
    pub node_name: String,
    /// The agent's Pod name (from the downward API): Events about the target directory regard
    /// this Pod (else the Node).
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// How long a deleted Secret's files stay before they are removed, so that deleting and
    /// re-creating a Secret does not leave the node without the key; revocation is delayed by at
    /// most this much.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub removal_grace: Duration,
    /// Kubeconfig file (default: in-cluster config, else KUBECONFIG, else ~/.kube/config).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// API server URL without credentials, for tests against a local stand-in (loopback only).
    #[arg(long, conflicts_with = "kubeconfig")]
    pub server: Option<String>,
    /// Log format.
    #[arg(long, default_value = "json", value_parser = ["json", "text"])]
    pub log_format: String,
}

/// Parses `250ms`, `30s`, `5m`, `1h` or a number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 500ms, 30s, 5m, 1h"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("invalid duration unit in {s:?}: use ms, s, m or h")),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("invalid duration {s:?}"))
}

/// Errors of the command line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    /// The agent failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The Kubernetes client could not be configured.
    #[error("Kubernetes client configuration: {0}")]
    Kube(String),
    /// A bad flag value.
    #[error("{0}")]
    Usage(String),
    /// I/O (listening, reading the CA bundle).
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl Args {
    /// The agent options these flags describe.
    pub fn agent_options(&self) -> Result<AgentOptions, CliError> {
        let ca_bundle_pem =
            match &self.kms_ca_bundle {
                Some(p) => Some(std::fs::read(p).map_err(|e| {
                    CliError::Usage(format!("cannot read --kms-ca-bundle {}: {e}", p.display()))
                })?),
                None => None,
            };
        let mut o = AgentOptions::new(self.namespace.clone(), self.target_dirs.clone());
        o.adopt_target_dirs = self.adopt_target_dir;
        o.resync_interval = self.resync_interval;
        o.stall_timeout = self.stall_timeout;
        o.watch_timeout = self.watch_timeout;
        o.field_selector = Some(self.field_selector.clone()).filter(|f| !f.is_empty());
        o.kms = KmsOptions {
            concurrency: self.kms_concurrency,
            jitter: self.kms_jitter,
            request_timeout: self.kms_timeout,
            retry_base: self.kms_retry_base,
            retry_cap: self.kms_retry_cap,
            permanent_retry: self.kms_permanent_retry,
            ca_bundle_pem,
            ..KmsOptions::default()
        };
        o.events = !self.no_events;
        o.instance = self.node_name.clone();
        o.pod_name = self.pod_name.clone().filter(|p| !p.is_empty());
        if self.removal_grace > Duration::from_secs(60) {
            return Err(CliError::Usage(
                "--removal-grace is at most 60s (it delays revocation)".into(),
            ));
        }
        o.removal_grace = self.removal_grace;
        o.once = self.once;
        o.once_timeout = self.once_timeout;
        Ok(o)
    }

    /// The Kubernetes client: `--server`, `--kubeconfig`, or the standard inference (in-cluster,
    /// `KUBECONFIG`, `~/.kube/config`), and the API server's URL (for messages).
    pub async fn kube_client(&self) -> Result<(kube::Client, String), CliError> {
        let kerr = |e: &dyn std::fmt::Display| CliError::Kube(e.to_string());
        let mut config = if let Some(server) = &self.server {
            check_loopback_url(server)?;
            kube::Config::new(server.parse().map_err(|e| kerr(&e))?)
        } else if let Some(path) = &self.kubeconfig {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| kerr(&e))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| kerr(&e))?
        } else {
            kube::Config::infer().await.map_err(|e| kerr(&e))?
        };
        config.default_namespace = self.namespace.clone();
        let url = config.cluster_url.to_string();
        let client = kube::Client::try_from(config).map_err(|e| kerr(&e))?;
        Ok((client, url))
    }
}

fn check_loopback_url(server: &str) -> Result<(), CliError> {
    let rest = server
        .strip_prefix("http://")
        .or_else(|| server.strip_prefix("https://"))
        .ok_or_else(|| CliError::Usage(format!("--server {server:?} must start with http:// or https://")))?;
    let host_port = rest.split('/').next().unwrap_or_default();
    let host = match host_port.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host_port.rsplit_once(':').map_or(host_port, |(h, _)| h),
    };
    let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        return Err(CliError::Usage(format!(
            "--server is for a local test API server (loopback only, no credentials); got {host:?}; \
             use --kubeconfig or the in-cluster config for a real cluster"
        )));
    }
    Ok(())
}

/// Logs go to stderr, JSON or text; colour codes only when stderr is a terminal.
pub fn init_logging(format: &str) {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(format != "json" && std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = if format == "json" {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init()
    } else {
        builder.try_init()
    };
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => futures::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

/// Runs the binary with parsed arguments (logging must be set up: [`init_logging`]). Exit
/// status: 0 done, 1 error, 2 `--once` finished with Secrets that could not be synced.
pub async fn run(args: Args) -> Result<ExitCode, CliError> {
    if args.cleanup {
        let n = cleanup(&args.target_dirs, args.adopt_target_dir)?;
        tracing::info!(secrets_removed = n, "cleanup done");
        return Ok(ExitCode::SUCCESS);
    }
    let mut opts = args.agent_options()?;
    let (client, url) = args.kube_client().await?;
    opts.api_server = url;
    let agent = Agent::new(opts, client)?;
    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    if args.listen != "off" {
        let addr: SocketAddr = args
            .listen
            .parse()
            .map_err(|e| CliError::Usage(format!("--listen {:?}: {e}", args.listen)))?;
        let listener = metrics::bind(addr).await?;
        tracing::info!(listen = %listener.local_addr()?, "serving /healthz, /readyz, /metrics");
        let (m, h) = (agent.metrics(), agent.health());
        tokio::spawn(async move {
            let stop = async {
                let _ = http_stopped.await;
            };
            if let Err(e) = metrics::serve(listener, m, h, stop).await {
                tracing::error!(error = %e, "health server failed");
            }
        });
    }
    let summary = agent.run(shutdown_signal()).await?;
    let _ = stop_http.send(());
    if args.once {
        // One condition decides both the summary and the exit status.
        let complete = summary.synced && summary.write_failures == 0 && summary.problems.is_empty();
        if complete {
            tracing::info!(files = summary.files, synced = true, "sync done");
        } else {
            tracing::warn!(
                files = summary.files,
                problems = summary.problems.len(),
                write_failures = summary.write_failures,
                listed = summary.synced,
                synced = false,
                exit_status = 2,
                "sync incomplete"
            );
            return Ok(ExitCode::from(2));
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("x").is_err());
    }

    #[test]
    fn server_must_be_loopback() {
        assert!(check_loopback_url("http://127.0.0.1:8080").is_ok());
        assert!(check_loopback_url("http://localhost:1").is_ok());
        assert!(check_loopback_url("http://[::1]:1/").is_ok());
        assert!(check_loopback_url("https://10.0.0.1:6443").is_err());
        assert!(check_loopback_url("127.0.0.1:80").is_err());
    }

    #[test]
    fn defaults() {
        let a = Args::parse_from(["keysync-agent"]);
        let o = a.agent_options().unwrap();
        assert_eq!(o.namespace, "image-key-synchronizer");
        assert_eq!(o.target_dirs, vec![PathBuf::from("/etc/crio/keys/synced")]);
        assert!(o.field_selector.is_none());
        let a = Args::parse_from([
            "keysync-agent",
            "--target-dir",
            "/a",
            "--target-dir",
            "/b",
            "--field-selector",
            "metadata.name!=x",
        ]);
        let o = a.agent_options().unwrap();
        assert_eq!(o.target_dirs.len(), 2);
        assert_eq!(o.field_selector.as_deref(), Some("metadata.name!=x"));
    }
}

//! `kp-emulator --listen 127.0.0.1:0`: a local IBM Key Protect + IAM emulator for tests and CI.
//! Prints its base URL on the first line of stdout, then `instance-id <GUID>`, `apikey <KEY>`,
//! and `root-key <name> <id>` for every `--root-key`, then `ready`. Runs until killed.
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use keyprotect_emulator::{Emulator, EmulatorConfig, TlsIdentity};

#[derive(Parser)]
#[command(
    version,
    about = "Local IBM Key Protect + IAM emulator (plain HTTP on loopback)"
)]
struct Args {
    /// Loopback address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
    /// Instance GUID to accept (random by default).
    #[arg(long)]
    instance_id: Option<String>,
    /// API key IAM accepts (random by default).
    #[arg(long, env = "KP_EMULATOR_APIKEY")]
    api_key: Option<String>,
    /// Lifetime of issued IAM tokens, in seconds.
    #[arg(long, default_value_t = 3600)]
    token_ttl: u64,
    /// Create a root key with this name at start (repeatable).
    #[arg(long)]
    root_key: Vec<String>,
    /// Serve HTTPS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Write a config.json for this emulator (keyprotect-url, instance-id, apikey, iam-url), mode 0600.
    #[arg(long)]
    write_config: Option<PathBuf>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let a = Args::parse();
    let mut cfg = EmulatorConfig {
        listen: a.listen,
        token_ttl: Duration::from_secs(a.token_ttl.max(1)),
        ..EmulatorConfig::default()
    };
    if let (Some(c), Some(k)) = (&a.tls_cert, &a.tls_key) {
        cfg.tls = Some(TlsIdentity {
            cert_chain_pem: std::fs::read(c).with_context(|| format!("reading {}", c.display()))?,
            key_pem: zeroize::Zeroizing::new(
                std::fs::read(k).with_context(|| format!("reading {}", k.display()))?,
            ),
        });
    }
    if let Some(i) = a.instance_id {
        cfg.instance_id = i;
    }
    if let Some(k) = a.api_key {
        cfg.api_keys = vec![k];
    }
    let instance = cfg.instance_id.clone();
    let apikey = cfg.api_keys[0].clone();
    let write_config = a.write_config.clone();
    let mut setup_err = None;
    Emulator::run(
        cfg,
        |base, handle| {
            let mut out = format!("{base}\ninstance-id {instance}\napikey {apikey}\n");
            for name in &a.root_key {
                let id = handle.create_root_key(name);
                out.push_str(&format!("root-key {name} {id}\n"));
            }
            if let Some(p) = &write_config {
                let json = serde_json::json!({"keyprotect-url": base, "instance-id": instance, "apikey": apikey, "iam-url": base}).to_string();
                if let Err(e) = ocicrypt_core::fsutil::write_bytes_atomic(p, json.as_bytes()) {
                    setup_err = Some(anyhow::anyhow!("writing {}: {e}", p.display()));
                }
            }
            out.push_str("ready\n");
            use std::io::Write;
            let mut so = std::io::stdout().lock();
            let _ = so.write_all(out.as_bytes());
            let _ = so.flush();
        },
        async {
            let _ = tokio::signal::ctrl_c().await;
        },
    )
    .await
    .context("kp-emulator")?;
    if let Some(e) = setup_err {
        return Err(e);
    }
    Ok(())
}

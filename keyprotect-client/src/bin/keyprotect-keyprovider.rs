//! An ocicrypt keyprovider backed by IBM Key Protect: the `cmd` protocol (JSON on stdin, JSON
//! on stdout) by default, or a gRPC server with `--grpc HOST:PORT|unix:PATH` (loopback or a
//! unix socket only, unless `--allow-remote`: it has no authentication). Key Protect config: `--config FILE`, else `IMGCRYPT_KEYPROTECT_CONFIG`, else
//! `KP_URL`/`KP_INSTANCE_ID`/`KP_APIKEY`[/`KP_IAM_URL`].
use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use keyprotect_client::provider::{serve_grpc, serve_request, ProviderOptions};
use keyprotect_client::{Client, KeyProtectConfig};
use ocicrypt_core::keyprovider::grpc_server::Listener;

#[derive(Parser)]
#[command(
    version,
    about = "ocicrypt keyprovider backed by IBM Key Protect (cmd protocol on stdin/stdout)"
)]
struct Args {
    /// Key Protect config.json (`keyprotect-url`, `instance-id`, `apikey`, optional `iam-url`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The name this provider is registered under in OCICRYPT_KEYPROVIDER_CONFIG.
    #[arg(long, default_value = "keyprotect")]
    name: String,
    /// Root key for recipients given without a parameter.
    #[arg(long)]
    root_key: Option<String>,
    /// Serve keyprovider.KeyProviderService over gRPC on HOST:PORT or unix:PATH instead of
    /// answering one request on stdin (prints the bound address on stdout; SIGTERM stops it).
    #[arg(long, value_name = "HOST:PORT|unix:PATH")]
    grpc: Option<String>,
    /// With --grpc: allow a non-loopback address (the service has no authentication).
    #[arg(long, requires = "grpc")]
    allow_remote: bool,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let cfg = match &args.config {
        Some(p) => KeyProtectConfig::from_file(p)?,
        None => match KeyProtectConfig::from_env()? {
            Some(c) => c,
            None => bail!("no Key Protect config: pass --config FILE, or set IMGCRYPT_KEYPROTECT_CONFIG, or KP_URL, KP_INSTANCE_ID and KP_APIKEY"),
        },
    };
    let client = Client::new(cfg)?;
    let opts = ProviderOptions {
        name: args.name,
        default_root_key: args.root_key,
    };
    if let Some(addr) = &args.grpc {
        let l = Listener::bind(addr, args.allow_remote).await?;
        println!("{}", l.local_addr());
        eprintln!(
            "keyprotect-keyprovider: serving gRPC on {} (no authentication)",
            l.local_addr()
        );
        return serve_grpc(client, opts, l).await.map_err(|e| anyhow::anyhow!(e));
    }
    let mut input = zeroize::Zeroizing::new(Vec::new());
    std::io::stdin()
        .take(16 << 20)
        .read_to_end(&mut input)
        .context("reading the request from stdin")?;
    let out = serve_request(&client, &opts, &input).await?;
    let mut so = std::io::stdout().lock();
    so.write_all(&out)?;
    so.flush()?;
    Ok(())
}

//! Runs the Kubernetes API stand-in (`testkit::kube`) for benchmarks and end-to-end scripts.
//!
//! ```text
//! kube-standin [--listen 127.0.0.1:0] [--bookmark-interval-ms N] [--exit-on-stdin-eof]
//! ```
//!
//! The first line on stdout is the base URL (`http://127.0.0.1:PORT`). The server runs until
//! SIGTERM or Ctrl-C (or, with `--exit-on-stdin-eof`, until stdin is closed, so a parent holding a
//! pipe stops it by closing the pipe).

use std::io::{Read, Write};

use anyhow::{bail, Context};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut addr = "127.0.0.1:0".to_string();
    let mut bookmark_ms = None;
    let mut stdin_eof = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => addr = args.next().context("--listen needs an address")?,
            "--bookmark-interval-ms" => {
                bookmark_ms = Some(
                    args.next()
                        .context("--bookmark-interval-ms needs a number")?
                        .parse::<u64>()?,
                )
            }
            "--exit-on-stdin-eof" => stdin_eof = true,
            "-h" | "--help" => {
                println!("usage: kube-standin [--listen 127.0.0.1:0] [--bookmark-interval-ms N] [--exit-on-stdin-eof]");
                return Ok(());
            }
            other => bail!("kube-standin: unknown argument {other:?} (see --help)"),
        }
    }
    let addr: std::net::SocketAddr = addr
        .parse()
        .with_context(|| format!("kube-standin: bad listen address {addr:?}"))?;
    anyhow::ensure!(
        addr.ip().is_loopback(),
        "kube-standin: listen address must be on 127.0.0.0/8, got {addr}"
    );
    let standin = testkit::kube::KubeStandin::start_on(addr).await?;
    if let Some(ms) = bookmark_ms {
        standin.set_bookmark_interval(std::time::Duration::from_millis(ms));
    }
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", standin.base_url())?;
        out.flush()?;
    }
    let (eof_tx, eof_rx) = tokio::sync::oneshot::channel::<()>();
    if stdin_eof {
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            let mut stdin = std::io::stdin();
            while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
            let _ = eof_tx.send(());
        });
    } else {
        std::mem::forget(eof_tx);
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        _ = eof_rx => {}
    }
    drop(standin);
    Ok(())
}

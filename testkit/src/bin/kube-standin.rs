//! Runs the Kubernetes API stand-in (`testkit::kube`) for benchmarks and end-to-end scripts.
//!
//! The first line on stdout is the base URL (`http://127.0.0.1:PORT`). The server runs until SIGTERM,
//! Ctrl-C, or stdin reaching end of file (so a script that spawns it through a pipe stops it by
//! closing the pipe). Optional argument: the address to listen on (default `127.0.0.1:0`).

use std::io::{Read, Write};

use anyhow::Context;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:0".into());
    let addr: std::net::SocketAddr = addr
        .parse()
        .with_context(|| format!("kube-standin: bad listen address {addr:?}"))?;
    anyhow::ensure!(
        addr.ip().is_loopback(),
        "kube-standin: listen address must be on 127.0.0.0/8, got {addr}"
    );
    let standin = testkit::kube::KubeStandin::start_on(addr).await?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", standin.base_url())?;
        out.flush()?;
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let (eof_tx, eof_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
        let _ = eof_tx.send(());
    });
    let stdin_closed = eof_rx;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        _ = stdin_closed => {}
    }
    drop(standin);
    Ok(())
}

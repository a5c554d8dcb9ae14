//! `keysync-agent`: see `keysync_agent::cli::Args` (or `--help`).

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let args = keysync_agent::cli::Args::parse();
    match keysync_agent::cli::run(args).await {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = %e, "keysync-agent failed");
            eprintln!("keysync-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

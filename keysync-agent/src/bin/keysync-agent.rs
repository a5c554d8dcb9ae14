//! `keysync-agent`: see `keysync_agent::cli::Args` (or `--help`).

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let args = keysync_agent::cli::Args::parse();
    keysync_agent::cli::init_logging(&args.log_format);
    match keysync_agent::cli::run(args).await {
        Ok(code) => code,
        Err(e) => {
            // Reported once, as a log line in the chosen format.
            tracing::error!(error = %e, "keysync-agent failed");
            ExitCode::FAILURE
        }
    }
}

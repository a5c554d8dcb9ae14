//! # imgcrypt-cli
//!
//! The `imgcrypt` command line: encrypt, decrypt, inspect and re-key OCI images in OCI image
//! layouts (`oci:PATH[:TAG]`) and registries (`docker://HOST/REPO[:TAG]`), interoperable with
//! skopeo and containerd's imgcrypt. The logic is in `ocicrypt-core`; this crate parses
//! arguments ([`cli`]) into a validated [`config::Config`], runs it ([`commands`]) and maps
//! errors to messages and exit codes ([`error`]), including those of the registry client, which
//! is the `imgcrypt-registry` crate. It also holds the process side of the containerd decoder
//! `imgcrypt-decoder` ([`decoder`]).
#![warn(missing_docs)]

use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;

pub mod cli;
pub mod commands;
pub mod config;
pub mod decoder;
pub mod demo;
pub mod error;
pub mod interrupt;
pub mod keyspec;
pub mod progress;
pub mod schemes;

pub use error::{CliError, ErrorKind};

/// Runs the command line with the process arguments; returns the exit code.
pub fn run() -> ExitCode {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    run_with(std::env::args_os(), &mut out, std::io::stderr().is_terminal())
}

/// Runs the command line with `args` (the first is the program name), writing results to
/// `out`; errors go to stderr (or to `out` as JSON with `--json`).
pub fn run_with<I, T>(args: I, out: &mut dyn Write, tty: bool) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match cli::parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(ErrorKind::Usage.exit_code())
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let json = cli.json;
    let result = config::Config::from_cli(cli).and_then(|(cfg, output)| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(|e| CliError::new(ErrorKind::Failure, format!("cannot start the async runtime: {e}")))?;
        let mut ctx = commands::Ctx { out, output, tty };
        let r = rt.block_on(async {
            let signalled = interrupt::listen()?;
            let exec = commands::execute(cfg, &mut ctx);
            tokio::pin!(exec);
            tokio::select! {
                r = &mut exec => r,
                (kind, name) = signalled => {
                    // A registry upload winds down by itself (so that it can be deleted);
                    // anything else is dropped at once and aborted.
                    if interrupt::pending_is_registry() {
                        if let Ok(Ok(())) = tokio::time::timeout(interrupt::WIND_DOWN, &mut exec).await {
                            // It had finished: the result is complete, say so.
                            return Ok(());
                        }
                    }
                    Err(interrupt::finish(kind, name).await)
                }
            }
        });
        // Blocking threads of an interrupted run are not waited for: what they wrote was
        // removed, and they end with the process.
        rt.shutdown_background();
        r
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if json {
                let _ = writeln!(
                    out,
                    "{}",
                    serde_json::to_string_pretty(&e.to_json()).unwrap_or_default()
                );
            } else {
                eprintln!("{e}");
            }
            e.exit_code()
        }
    }
}

/// Runs one command given as arguments (without the program name) inside a running command:
/// what `imgcrypt demo` does for each step, so the printed command is exactly what runs.
///
/// # Errors
/// The step's [`CliError`].
pub async fn run_step(args: &[String], ctx: &mut commands::Ctx<'_>) -> Result<(), CliError> {
    let argv = std::iter::once("imgcrypt".to_owned()).chain(args.iter().cloned());
    let cli = cli::parse_from(argv).map_err(|e| CliError::usage(e.to_string()))?;
    let (cfg, output) = config::Config::from_cli(cli)?;
    let saved = ctx.output;
    ctx.output = config::Output {
        json: output.json,
        quiet: output.quiet,
    };
    let r = Box::pin(commands::execute(cfg, ctx)).await;
    ctx.output = saved;
    r
}

//! SIGINT and SIGTERM abort a run the way an error does: the destination being written is told
//! to [`abort`](ImageDest::abort) (temporary files and blobs of this run removed, a layout
//! directory the run created removed, open registry uploads deleted), and the process exits
//! with 130 (SIGINT) or 143 (SIGTERM), as a shell reports a process killed by those signals.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use ocicrypt_core::image::ImageDest;

use crate::error::{CliError, ErrorKind};

/// The destination being written, if any.
static PENDING: Mutex<Option<Arc<dyn ImageDest>>> = Mutex::new(None);

/// Set by a signal: registry uploads stop feeding their bodies, end them cleanly and delete
/// themselves under the location the registry then gives (a registry may refuse to delete an
/// upload under the location it gave before the data was sent).
static CANCELLED: LazyLock<Arc<AtomicBool>> = LazyLock::new(Arc::default);

/// How long a run that writes to a registry is given to wind down after a signal.
pub const WIND_DOWN: Duration = Duration::from_secs(5);

/// True once SIGINT or SIGTERM arrived.
pub fn cancelled() -> bool {
    CANCELLED.load(Ordering::SeqCst)
}

/// The flag set by a signal, for the registry client
/// ([`RegistryOptions::cancel`](imgcrypt_registry::RegistryOptions::cancel)).
pub fn cancel_flag() -> Arc<AtomicBool> {
    Arc::clone(&CANCELLED)
}

/// True when a registry destination is being written (it winds down by itself, see
/// [`cancelled`]).
pub fn pending_is_registry() -> bool {
    PENDING
        .lock()
        .expect("interrupt lock")
        .as_ref()
        .is_some_and(|d| d.describe().starts_with("docker://"))
}

/// How long cleaning up after a signal may take (deleting uploads needs the registry).
const CLEANUP: Duration = Duration::from_secs(10);

/// Marks `dest` as being written: a signal from now on aborts it.
pub fn arm(dest: Arc<dyn ImageDest>) {
    *PENDING.lock().expect("interrupt lock") = Some(dest);
}

/// The write finished (or failed and aborted itself): a signal no longer touches it.
pub fn disarm() {
    *PENDING.lock().expect("interrupt lock") = None;
}

/// Installs the SIGINT and SIGTERM handlers and returns a future that completes with the
/// signal's kind and name when the first of them arrives (and marks the run [`cancelled`]).
///
/// # Errors
/// [`ErrorKind::Failure`] when the handlers cannot be installed.
pub fn listen() -> Result<impl std::future::Future<Output = (ErrorKind, &'static str)>, CliError> {
    use tokio::signal::unix::{signal, SignalKind};
    let err =
        |e: std::io::Error| CliError::new(ErrorKind::Failure, format!("cannot install signal handlers: {e}"));
    let mut int = signal(SignalKind::interrupt()).map_err(err)?;
    let mut term = signal(SignalKind::terminate()).map_err(err)?;
    Ok(async move {
        let signal = tokio::select! {
            _ = int.recv() => (ErrorKind::Interrupted, "SIGINT"),
            _ = term.recv() => (ErrorKind::Terminated, "SIGTERM"),
        };
        CANCELLED.store(true, Ordering::SeqCst);
        signal
    })
}

/// Aborts the destination still being written, if any, and returns the error to report.
pub async fn finish(kind: ErrorKind, name: &str) -> CliError {
    let pending = PENDING.lock().expect("interrupt lock").take();
    let what = match pending {
        Some(dest) => {
            let describe = dest.describe();
            let done = tokio::time::timeout(CLEANUP, dest.abort()).await.is_ok();
            if done {
                format!("; what this run wrote to {describe} was removed")
            } else {
                format!(
                    "; cleaning up {describe} did not finish within {} s",
                    CLEANUP.as_secs()
                )
            }
        }
        None => String::new(),
    };
    CliError::new(kind, format!("interrupted by {name}{what}"))
}

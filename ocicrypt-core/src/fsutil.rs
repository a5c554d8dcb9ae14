//! Small filesystem helpers: atomic, synced writes.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use crate::Error;

/// Writes a file atomically: `fill` writes into a temporary file in `dest`'s directory, which is
/// then synced and renamed over `dest`, and the directory is synced. If `fill` fails the
/// temporary file is removed and `dest` is untouched.
///
/// # Errors
/// The error of `fill`, or [`Error::Io`] from creating, syncing or renaming.
pub fn write_atomic<T, F>(dest: &Path, fill: F) -> Result<T, Error>
where
    F: FnOnce(&mut File) -> Result<T, Error>,
{
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)?;
    let out = fill(tmp.as_file_mut())?;
    tmp.as_file_mut().flush()?;
    tmp.as_file().sync_all()?;
    tmp.persist(dest).map_err(|e| Error::Io(e.error))?;
    sync_dir(dir);
    Ok(out)
}

/// Writes `bytes` to `dest` atomically (see [`write_atomic`]).
///
/// # Errors
/// [`Error::Io`].
pub fn write_bytes_atomic(dest: &Path, bytes: &[u8]) -> Result<(), Error> {
    write_atomic(dest, |f| f.write_all(bytes).map_err(Error::Io))
}

/// Syncs a directory so a rename in it is durable. Best effort: some filesystems refuse.
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Creates `dir` and its parents if missing.
///
/// # Errors
/// [`Error::Io`].
pub fn ensure_dir(dir: &Path) -> Result<(), Error> {
    fs::create_dir_all(dir)?;
    Ok(())
}

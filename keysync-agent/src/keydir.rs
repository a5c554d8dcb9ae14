//! The agent's own subtree of the runtime's key directory, written safely.
//!
//! Layout: `<target>/<secret>/<file>`, files `0600`, directories `0700`, plus the empty directory
//! `<target>/.keysync-agent` that marks the target as the agent's (an empty directory cannot break
//! a runtime's key loading). Rules:
//!
//! * Every path is resolved relative to an open directory descriptor with `O_NOFOLLOW`: a symlink
//!   anywhere below the target is never followed. A symlink (or any other non-regular entry) found
//!   inside the subtree is removed, since CRI-O refuses a key tree with a symlink in it, and its
//!   target is never touched. The target directory itself must not be a symlink.
//! * Nothing outside the target is ever created, changed or deleted, and a target directory that
//!   holds files but no marker is refused (unless adopted explicitly).
//! * A file is replaced atomically: its content is written to an unnamed `O_TMPFILE` in the same
//!   directory, `fsync`ed, linked under a hidden `.keysync-tmp-*` name (already complete), renamed
//!   over the final name, then the directory is `fsync`ed. A reader walking the tree sees either
//!   the old or the new complete file, never a partial one. Identical content is not rewritten.
//!   (Where `O_TMPFILE` is not supported, the hidden name is created directly, so a partial file
//!   can exist under that name while it is written; this is logged.)

use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, CWD};
use rustix::io::Errno;
use zeroize::Zeroizing;

use crate::names::{OWNER_MARKER, TMP_PREFIX};

const DIR_MODE: u32 = 0o700;
const FILE_MODE: u32 = 0o600;
/// Deepest directory level removed (the agent itself only creates two).
const MAX_REMOVE_DEPTH: usize = 16;

/// What one file of the desired state should be.
#[derive(Clone)]
pub enum FileDesired {
    /// Exactly these bytes (already validated).
    Write(Arc<Zeroizing<Vec<u8>>>),
    /// Leave whatever regular file is there (the Secret entry exists but could not be resolved
    /// now: Key Protect or the config failed, or the new value was rejected).
    Keep,
}

impl std::fmt::Debug for FileDesired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FileDesired::Write(b) => write!(f, "Write({} bytes)", b.len()),
            FileDesired::Keep => f.write_str("Keep"),
        }
    }
}

/// The whole desired state: per Secret (directory) name, per file name.
pub type Desired = BTreeMap<String, BTreeMap<String, FileDesired>>;

/// Errors opening or cleaning a target directory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyDirError {
    /// The target is a symlink.
    #[error(
        "target directory {path} is a symbolic link; CRI-O and containerd refuse symlinks in key directories: \
         point --target-dir at the real directory"
    )]
    Symlink {
        /// The target.
        path: PathBuf,
    },
    /// A directory above the target is (now) a symlink or not a directory: re-opening a replaced
    /// target never follows it.
    #[error(
        "{component} (above target directory {path}) is a symbolic link or not a directory; the agent does not \
         follow symlinks on the way to its directory: restore the directory, or restart the agent to accept the \
         new path"
    )]
    SymlinkInPath {
        /// The target.
        path: PathBuf,
        /// The component that is a symlink.
        component: PathBuf,
    },
    /// The target exists and is not a directory.
    #[error("target directory {path} exists and is not a directory")]
    NotADirectory {
        /// The target.
        path: PathBuf,
    },
    /// The target holds files but was not created by this agent.
    #[error(
        "target directory {path} is not empty ({sample}) and has no {OWNER_MARKER} marker, so it was not created by \
         keysync-agent and the agent will not delete files in it; use a dedicated directory (such as \
         /etc/crio/keys/synced), empty it, or pass --adopt-target-dir to take it over"
    )]
    NotOwned {
        /// The target.
        path: PathBuf,
        /// Some of the names found.
        sample: String,
    },
    /// A system call failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

fn io_err(op: &'static str, path: impl Into<PathBuf>, e: impl Into<std::io::Error>) -> KeyDirError {
    KeyDirError::Io {
        op,
        path: path.into(),
        source: e.into(),
    }
}

/// What one [`KeyDir::apply`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    /// Files (re)written, as `secret/file`.
    pub written: Vec<String>,
    /// Entries removed, as `secret` or `secret/file`.
    pub removed: Vec<String>,
    /// Files already up to date.
    pub unchanged: usize,
    /// Non-regular entries (symlinks, directories, devices) found where a key file or a Secret
    /// directory belongs, and removed.
    pub foreign_removed: Vec<String>,
    /// Failures, as (`secret/file`, message).
    pub failures: Vec<(String, String)>,
    /// Regular key files present after the pass.
    pub files: usize,
}

/// One target directory, opened.
#[derive(Debug)]
pub struct KeyDir {
    path: PathBuf,
    /// The parent directory, resolved (symlinks included) once when the agent starts; every later
    /// re-open walks it component by component with `O_NOFOLLOW`.
    parent: PathBuf,
    /// The target's own name in `parent`.
    name: CString,
    /// The open target; re-opened when the path no longer leads to it (deleted or replaced).
    root: std::sync::Mutex<OwnedFd>,
    tmpfile_unsupported: AtomicBool,
}

/// Opens an absolute directory path without following a symlink in any component.
fn walk_nofollow(target: &Path, dir: &Path) -> Result<OwnedFd, KeyDirError> {
    let flags = OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC;
    let mut fd = rustix::fs::open("/", flags, Mode::empty()).map_err(|e| io_err("open", "/", e))?;
    let mut at = PathBuf::from("/");
    for c in dir.components() {
        match c {
            std::path::Component::RootDir => {}
            std::path::Component::Normal(n) => {
                at.push(n);
                let name = CString::new(n.as_encoded_bytes()).map_err(|_| {
                    io_err(
                        "open",
                        &at,
                        std::io::Error::from(std::io::ErrorKind::InvalidInput),
                    )
                })?;
                fd = match rustix::fs::openat(&fd, &name, flags, Mode::empty()) {
                    Ok(next) => next,
                    Err(Errno::LOOP) | Err(Errno::NOTDIR) => {
                        return Err(KeyDirError::SymlinkInPath {
                            path: target.to_path_buf(),
                            component: at,
                        })
                    }
                    Err(e) => return Err(io_err("open", &at, e)),
                };
            }
            _ => {
                return Err(io_err(
                    "open",
                    dir,
                    std::io::Error::other("not a normalized absolute path"),
                ))
            }
        }
    }
    Ok(fd)
}

/// The resolved parent and the final name of a target path. With `create`, missing parents are
/// created first (only when the agent starts).
fn split_target(path: &Path, create: bool) -> Result<(PathBuf, CString), KeyDirError> {
    let invalid = || {
        io_err(
            "open",
            path,
            std::io::Error::other("a target directory must be an absolute path with a final component"),
        )
    };
    let name = path.file_name().ok_or_else(invalid)?;
    let parent = path.parent().filter(|p| p.is_absolute()).ok_or_else(invalid)?;
    if create {
        std::fs::create_dir_all(parent).map_err(|e| io_err("create", parent, e))?;
    }
    let parent = std::fs::canonicalize(parent).map_err(|e| io_err("resolve", parent, e))?;
    let name = CString::new(name.as_encoded_bytes()).map_err(|_| invalid())?;
    Ok((parent, name))
}

fn open_dir_nofollow(dirfd: impl AsFd, name: &CStr) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(
        dirfd,
        name,
        OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

fn cstring(name: &str) -> CString {
    // Names are checked path components (no NUL); a NUL would make this fail safely.
    CString::new(name).unwrap_or_default()
}

/// Entries of an open directory (without `.` and `..`).
fn list(dirfd: &OwnedFd) -> rustix::io::Result<Vec<(CString, FileType)>> {
    let mut out = Vec::new();
    for entry in Dir::read_from(dirfd)? {
        let entry = entry?;
        let name = entry.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        out.push((name.to_owned(), entry.file_type()));
    }
    Ok(out)
}

/// The type of `name` in `dirfd`, without following a symlink; `None` when absent.
fn lstat_type(dirfd: &OwnedFd, name: &CStr) -> rustix::io::Result<Option<FileType>> {
    match rustix::fs::statat(dirfd, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(FileType::from_raw_mode(st.st_mode))),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Removes `name` from `dirfd` (recursively for a directory), never following symlinks.
fn remove_entry(dirfd: &OwnedFd, name: &CStr, depth: usize) -> rustix::io::Result<()> {
    match lstat_type(dirfd, name)? {
        None => Ok(()),
        Some(FileType::Directory) => {
            if depth >= MAX_REMOVE_DEPTH {
                return Err(Errno::LOOP);
            }
            match open_dir_nofollow(dirfd, name) {
                Ok(sub) => {
                    for (child, _) in list(&sub)? {
                        remove_entry(&sub, &child, depth + 1)?;
                    }
                }
                Err(Errno::NOENT) => return Ok(()),
                Err(e) => return Err(e),
            }
            match rustix::fs::unlinkat(dirfd, name, AtFlags::REMOVEDIR) {
                Ok(()) | Err(Errno::NOENT) => Ok(()),
                Err(e) => Err(e),
            }
        }
        Some(_) => match rustix::fs::unlinkat(dirfd, name, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(e),
        },
    }
}

fn shown(name: &CStr) -> String {
    name.to_string_lossy()
        .chars()
        .flat_map(char::escape_default)
        .collect()
}

enum WriteOutcome {
    Written,
    Unchanged,
}

impl KeyDir {
    /// Opens (creating it `0700` when missing) a target directory and checks that the agent owns
    /// it: it carries the marker, or it is empty (the marker is then created), or `adopt` is set.
    /// A directory that is refused is left exactly as it was (mode and entries).
    pub fn open(path: &Path, adopt: bool) -> Result<Self, KeyDirError> {
        let (parent, name) = split_target(path, true)?;
        let root = Self::open_root(path, &parent, &name, adopt)?;
        Ok(KeyDir {
            path: path.to_path_buf(),
            parent,
            name,
            root: std::sync::Mutex::new(root),
            tmpfile_unsupported: AtomicBool::new(false),
        })
    }

    fn open_root(path: &Path, parent: &Path, name: &CStr, adopt: bool) -> Result<OwnedFd, KeyDirError> {
        let parent_fd = walk_nofollow(path, parent)?;
        let root = match open_dir_nofollow(&parent_fd, name) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => {
                match rustix::fs::mkdirat(&parent_fd, name, Mode::from_raw_mode(DIR_MODE)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(io_err("create", path, e)),
                }
                open_dir_nofollow(&parent_fd, name).map_err(|e| io_err("open", path, e))?
            }
            Err(Errno::LOOP) | Err(Errno::NOTDIR) => {
                let symlink = lstat_type(&parent_fd, name).map_err(|e| io_err("inspect", path, e))?
                    == Some(FileType::Symlink);
                return Err(if symlink {
                    KeyDirError::Symlink {
                        path: path.to_path_buf(),
                    }
                } else {
                    KeyDirError::NotADirectory {
                        path: path.to_path_buf(),
                    }
                });
            }
            Err(e) => return Err(io_err("open", path, e)),
        };
        // Decide first; change nothing in a directory the agent does not take.
        let entries = list(&root).map_err(|e| io_err("list", path, e))?;
        let marker = cstring(OWNER_MARKER);
        let has_marker = entries.iter().any(|(n, _)| *n == marker);
        if has_marker {
            if lstat_type(&root, &marker).map_err(|e| io_err("inspect", path.join(OWNER_MARKER), e))?
                != Some(FileType::Directory)
            {
                return Err(KeyDirError::NotOwned {
                    path: path.to_path_buf(),
                    sample: format!("{OWNER_MARKER} is not a directory"),
                });
            }
        } else if !(entries.is_empty() || adopt) {
            let sample = entries
                .iter()
                .take(3)
                .map(|(n, _)| shown(n))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(KeyDirError::NotOwned {
                path: path.to_path_buf(),
                sample,
            });
        }
        let st = rustix::fs::fstat(&root).map_err(|e| io_err("inspect", path, e))?;
        if st.st_mode & 0o7777 != DIR_MODE {
            rustix::fs::fchmod(&root, Mode::from_raw_mode(DIR_MODE)).map_err(|e| io_err("chmod", path, e))?;
        }
        if !has_marker {
            match rustix::fs::mkdirat(&root, &marker, Mode::from_raw_mode(DIR_MODE)) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => return Err(io_err("create", path.join(OWNER_MARKER), e)),
            }
            let _ = rustix::fs::fsync(&root);
        }
        Ok(root)
    }

    /// The open target, re-opened first when `path` no longer leads to it (someone deleted or
    /// replaced the directory: writing through the old descriptor would be invisible). The way
    /// there is walked without following symlinks.
    fn current_root(&self) -> Result<std::sync::MutexGuard<'_, OwnedFd>, KeyDirError> {
        let mut root = self.root.lock().unwrap_or_else(|p| p.into_inner());
        let parent_fd = walk_nofollow(&self.path, &self.parent)?;
        let same = match (
            rustix::fs::statat(&parent_fd, &self.name, AtFlags::SYMLINK_NOFOLLOW),
            rustix::fs::fstat(&*root),
        ) {
            (Ok(a), Ok(b)) => {
                FileType::from_raw_mode(a.st_mode) == FileType::Directory
                    && a.st_dev == b.st_dev
                    && a.st_ino == b.st_ino
            }
            _ => false,
        };
        if !same {
            tracing::warn!(target_dir = %self.path.display(), "the target directory was replaced or removed: re-opening it");
            *root = Self::open_root(&self.path, &self.parent, &self.name, false)?;
        }
        Ok(root)
    }

    /// The target's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes the subtree match `desired`: writes what changed, removes Secret directories and
    /// files that are not desired (and stray temporary or non-regular entries), leaves `Keep`
    /// files alone. Never fails as a whole: problems are listed in the report.
    pub fn apply(&self, desired: &Desired) -> ApplyReport {
        let mut report = ApplyReport::default();
        let root = match self.current_root() {
            Ok(r) => r,
            Err(e) => {
                report.failures.push((String::new(), e.to_string()));
                return report;
            }
        };
        let root: &OwnedFd = &root;
        let marker = cstring(OWNER_MARKER);
        match list(root) {
            Ok(entries) => {
                for (name, _) in entries {
                    if name == marker {
                        continue;
                    }
                    let wanted = name.to_str().ok().is_some_and(|n| desired.contains_key(n));
                    if !wanted {
                        match remove_entry(root, &name, 0) {
                            Ok(()) => report.removed.push(shown(&name)),
                            Err(e) => report.failures.push((shown(&name), format!("remove: {e}"))),
                        }
                    }
                }
            }
            Err(e) => report
                .failures
                .push((String::new(), format!("list {}: {e}", self.path.display()))),
        }
        for (secret, files) in desired {
            self.apply_secret(root, secret, files, &mut report);
        }
        if !report.removed.is_empty() || !report.written.is_empty() || !report.foreign_removed.is_empty() {
            let _ = rustix::fs::fsync(root);
        }
        report
    }

    fn apply_secret(
        &self,
        root: &OwnedFd,
        secret: &str,
        files: &BTreeMap<String, FileDesired>,
        report: &mut ApplyReport,
    ) {
        let name = cstring(secret);
        let create = files.values().any(|f| matches!(f, FileDesired::Write(_)));
        let dir = match Self::open_secret_dir(root, &name, create, report) {
            Ok(Some(d)) => d,
            Ok(None) => return,
            Err(e) => {
                report.failures.push((secret.to_string(), e));
                return;
            }
        };
        let mut changed = false;
        match list(&dir) {
            Ok(entries) => {
                for (fname, ftype) in entries {
                    let wanted = fname.to_str().ok().and_then(|n| files.get(n));
                    let regular = ftype == FileType::RegularFile
                        || (ftype == FileType::Unknown
                            && matches!(lstat_type(&dir, &fname), Ok(Some(FileType::RegularFile))));
                    if wanted.is_some() && regular {
                        continue;
                    }
                    let rel = format!("{secret}/{}", shown(&fname));
                    match remove_entry(&dir, &fname, 0) {
                        Ok(()) if wanted.is_some() => report.foreign_removed.push(rel),
                        Ok(()) => report.removed.push(rel),
                        Err(e) => report.failures.push((rel, format!("remove: {e}"))),
                    }
                    changed = true;
                }
            }
            Err(e) => report.failures.push((secret.to_string(), format!("list: {e}"))),
        }
        for (fname, want) in files {
            let FileDesired::Write(bytes) = want else { continue };
            let rel = format!("{secret}/{fname}");
            match self.write_file(&dir, fname, bytes) {
                Ok(WriteOutcome::Written) => {
                    report.written.push(rel);
                    changed = true;
                }
                Ok(WriteOutcome::Unchanged) => report.unchanged += 1,
                Err(e) => report.failures.push((rel, e)),
            }
        }
        if changed {
            let _ = rustix::fs::fsync(&dir);
        }
        let remaining = list(&dir).map(|e| e.len()).unwrap_or(1);
        if remaining == 0 {
            drop(dir);
            let _ = rustix::fs::unlinkat(root, &name, AtFlags::REMOVEDIR);
        } else {
            report.files += remaining;
        }
    }

    /// Opens `<target>/<secret>`, replacing a non-directory there; creates it when `create`.
    fn open_secret_dir(
        root: &OwnedFd,
        name: &CStr,
        create: bool,
        report: &mut ApplyReport,
    ) -> Result<Option<OwnedFd>, String> {
        match open_dir_nofollow(root, name) {
            Ok(fd) => {
                let st = rustix::fs::fstat(&fd).map_err(|e| format!("inspect: {e}"))?;
                if st.st_mode & 0o7777 != DIR_MODE {
                    rustix::fs::fchmod(&fd, Mode::from_raw_mode(DIR_MODE))
                        .map_err(|e| format!("chmod: {e}"))?;
                }
                return Ok(Some(fd));
            }
            Err(Errno::NOENT) => {}
            Err(Errno::LOOP) | Err(Errno::NOTDIR) => {
                // A symlink or a file where the Secret's directory belongs: not ours to follow.
                remove_entry(root, name, 0).map_err(|e| format!("remove non-directory: {e}"))?;
                report.foreign_removed.push(shown(name));
            }
            Err(e) => return Err(format!("open: {e}")),
        }
        if !create {
            return Ok(None);
        }
        match rustix::fs::mkdirat(root, name, Mode::from_raw_mode(DIR_MODE)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(format!("create directory: {e}")),
        }
        let fd = open_dir_nofollow(root, name).map_err(|e| format!("open: {e}"))?;
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(DIR_MODE)).map_err(|e| format!("chmod: {e}"))?;
        Ok(Some(fd))
    }

    fn same_content(dir: &OwnedFd, name: &CStr, bytes: &[u8]) -> bool {
        let Ok(fd) = rustix::fs::openat(
            dir,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        ) else {
            return false;
        };
        let Ok(st) = rustix::fs::fstat(&fd) else {
            return false;
        };
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile
            || st.st_mode & 0o7777 != FILE_MODE
            || usize::try_from(st.st_size).ok() != Some(bytes.len())
        {
            return false;
        }
        let mut current = Zeroizing::new(Vec::with_capacity(bytes.len()));
        let f = File::from(fd);
        if f.take(bytes.len() as u64 + 1).read_to_end(&mut current).is_err() {
            return false;
        }
        current.as_slice() == bytes
    }

    fn write_file(&self, dir: &OwnedFd, fname: &str, bytes: &[u8]) -> Result<WriteOutcome, String> {
        let name = cstring(fname);
        if Self::same_content(dir, &name, bytes) {
            return Ok(WriteOutcome::Unchanged);
        }
        let tmp = cstring(&format!("{TMP_PREFIX}{:016x}", rand::random::<u64>()));
        self.stage(dir, &tmp, bytes)?;
        if let Err(e) = rustix::fs::renameat(dir, &tmp, dir, &name) {
            let _ = rustix::fs::unlinkat(dir, &tmp, AtFlags::empty());
            return Err(format!("rename into place: {e}"));
        }
        Ok(WriteOutcome::Written)
    }

    /// Writes `bytes` to a complete, synced file named `tmp` in `dir`.
    fn stage(&self, dir: &OwnedFd, tmp: &CStr, bytes: &[u8]) -> Result<(), String> {
        let mode = Mode::from_raw_mode(FILE_MODE);
        if !self.tmpfile_unsupported.load(Ordering::Relaxed) {
            match rustix::fs::openat(
                dir,
                c".",
                OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC,
                mode,
            ) {
                Ok(fd) => {
                    let mut f = File::from(fd);
                    f.write_all(bytes)
                        .and_then(|()| f.sync_all())
                        .map_err(|e| format!("write: {e}"))?;
                    return link_anonymous(&f, dir, tmp).map_err(|e| format!("link staged file: {e}"));
                }
                Err(Errno::OPNOTSUPP) | Err(Errno::ISDIR) | Err(Errno::INVAL) => {
                    self.tmpfile_unsupported.store(true, Ordering::Relaxed);
                    tracing::warn!(
                        target_dir = %self.path.display(),
                        "the filesystem does not support O_TMPFILE: staging under a hidden name instead"
                    );
                }
                Err(e) => return Err(format!("create staging file: {e}")),
            }
        }
        let fd = rustix::fs::openat(
            dir,
            tmp,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            mode,
        )
        .map_err(|e| format!("create staging file: {e}"))?;
        let mut f = File::from(fd);
        if let Err(e) = f.write_all(bytes).and_then(|()| f.sync_all()) {
            drop(f);
            let _ = rustix::fs::unlinkat(dir, tmp, AtFlags::empty());
            return Err(format!("write: {e}"));
        }
        Ok(())
    }

    /// Removes the whole subtree (Secret directories, files and the marker) and then the target
    /// directory itself when possible (a mount point stays). Refuses a directory the agent does
    /// not own (leaving it unchanged) unless `adopt`, which takes it over first: then everything in
    /// it is removed. Returns how many top-level entries were removed.
    pub fn cleanup(path: &Path, adopt: bool) -> Result<usize, KeyDirError> {
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io_err("inspect", path, e)),
            Ok(_) => {}
        }
        let (parent, name) = split_target(path, false)?;
        let root = Self::open_root(path, &parent, &name, adopt)?;
        let entries = list(&root).map_err(|e| io_err("list", path, e))?;
        let marker = cstring(OWNER_MARKER);
        let mut n = 0;
        for (name, _) in entries.iter().filter(|(n, _)| *n != marker) {
            remove_entry(&root, name, 0).map_err(|e| io_err("remove", path.join(shown(name)), e))?;
            n += 1;
        }
        remove_entry(&root, &marker, 0).map_err(|e| io_err("remove", path.join(OWNER_MARKER), e))?;
        let _ = rustix::fs::fsync(&root);
        drop(root);
        let removed = walk_nofollow(path, &parent)
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|p| rustix::fs::unlinkat(&p, &name, AtFlags::REMOVEDIR).map_err(Into::into));
        if let Err(e) = removed {
            tracing::info!(target_dir = %path.display(), error = %e, "target directory left in place (emptied)");
        }
        Ok(n)
    }
}

/// Gives an `O_TMPFILE` file a name: `linkat(AT_EMPTY_PATH)` (needs `CAP_DAC_READ_SEARCH` on older
/// kernels), else through `/proc/self/fd`.
fn link_anonymous(f: &File, dir: &OwnedFd, name: &CStr) -> rustix::io::Result<()> {
    match rustix::fs::linkat(f, c"", dir, name, AtFlags::EMPTY_PATH) {
        Ok(()) => Ok(()),
        Err(Errno::EXIST) => Err(Errno::EXIST),
        Err(_) => {
            let proc_path = format!("/proc/self/fd/{}", f.as_raw_fd());
            rustix::fs::linkat(CWD, proc_path.as_str(), dir, name, AtFlags::SYMLINK_FOLLOW)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

    fn w(bytes: &[u8]) -> FileDesired {
        FileDesired::Write(Arc::new(Zeroizing::new(bytes.to_vec())))
    }

    fn desired(entries: &[(&str, &str, FileDesired)]) -> Desired {
        let mut d = Desired::new();
        for (s, f, v) in entries {
            d.entry(s.to_string())
                .or_default()
                .insert(f.to_string(), v.clone());
        }
        d
    }

    #[test]
    fn writes_with_modes_and_replaces_atomically() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("synced");
        let kd = KeyDir::open(&root, false).unwrap();
        assert_eq!(
            std::fs::metadata(&root).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let r = kd.apply(&desired(&[("s1", "a.pem", w(b"one"))]));
        assert_eq!(r.written, vec!["s1/a.pem"]);
        // Staged as an unnamed O_TMPFILE (never a partial file under any name) on this filesystem.
        assert!(!kd.tmpfile_unsupported.load(Ordering::Relaxed));
        let f = root.join("s1/a.pem");
        assert_eq!(std::fs::read(&f).unwrap(), b"one");
        assert_eq!(std::fs::metadata(&f).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(
            std::fs::metadata(root.join("s1")).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let ino = std::fs::metadata(&f).unwrap().ino();
        // Same content: not rewritten (same inode).
        let r = kd.apply(&desired(&[("s1", "a.pem", w(b"one"))]));
        assert!(r.written.is_empty());
        assert_eq!(r.unchanged, 1);
        assert_eq!(std::fs::metadata(&f).unwrap().ino(), ino);
        // New content: replaced by rename (new inode), no temporary left behind.
        let r = kd.apply(&desired(&[("s1", "a.pem", w(b"two"))]));
        assert_eq!(r.written, vec!["s1/a.pem"]);
        assert_eq!(std::fs::read(&f).unwrap(), b"two");
        assert_ne!(std::fs::metadata(&f).unwrap().ino(), ino);
        let names: Vec<_> = std::fs::read_dir(root.join("s1"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.pem")]);
    }

    #[test]
    fn removes_undesired_and_keeps_keep() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("synced");
        let kd = KeyDir::open(&root, false).unwrap();
        kd.apply(&desired(&[
            ("s1", "a", w(b"1")),
            ("s1", "b", w(b"2")),
            ("s2", "c", w(b"3")),
        ]));
        std::fs::write(root.join("s1/.keysync-tmp-dead"), b"partial").unwrap();
        let r = kd.apply(&desired(&[("s1", "a", FileDesired::Keep)]));
        assert!(r.removed.contains(&"s2".to_string()), "{r:?}");
        assert!(r.removed.contains(&"s1/b".to_string()), "{r:?}");
        assert!(r.removed.contains(&"s1/.keysync-tmp-dead".to_string()), "{r:?}");
        assert_eq!(std::fs::read(root.join("s1/a")).unwrap(), b"1");
        assert!(!root.join("s2").exists());
        assert_eq!(r.files, 1);
        // Keep for a file that does not exist creates nothing (and no empty directory).
        kd.apply(&desired(&[("s3", "x", FileDesired::Keep)]));
        assert!(!root.join("s3").exists());
        // Nothing desired: everything but the marker goes.
        kd.apply(&Desired::new());
        let names: Vec<_> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(OWNER_MARKER)]);
    }

    #[test]
    fn symlinks_are_never_followed() {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("victim"), b"precious").unwrap();
        let root = t.path().join("synced");
        let kd = KeyDir::open(&root, false).unwrap();
        // A symlinked Secret directory and a symlinked key file.
        symlink(&outside, root.join("s1")).unwrap();
        kd.apply(&desired(&[("s2", "k", w(b"x"))]));
        std::fs::remove_file(root.join("s2/k")).unwrap();
        symlink(outside.join("victim"), root.join("s2/k")).unwrap();
        let r = kd.apply(&desired(&[("s1", "victim", w(b"evil")), ("s2", "k", w(b"new"))]));
        assert!(r.failures.is_empty(), "{r:?}");
        assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"precious");
        assert!(!std::fs::symlink_metadata(root.join("s1"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(std::fs::symlink_metadata(root.join("s2/k"))
            .unwrap()
            .file_type()
            .is_file());
        assert_eq!(std::fs::read(root.join("s2/k")).unwrap(), b"new");
        // A symlink in place of a Keep file is removed too (it would break the runtime).
        symlink(outside.join("victim"), root.join("s2/k2")).unwrap();
        kd.apply(&desired(&[
            ("s2", "k", w(b"new")),
            ("s2", "k2", FileDesired::Keep),
        ]));
        assert!(std::fs::symlink_metadata(root.join("s2/k2")).is_err());
        assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"precious");
        // A target that is itself a symlink is refused.
        let link = t.path().join("link");
        symlink(&outside, &link).unwrap();
        assert!(matches!(
            KeyDir::open(&link, false),
            Err(KeyDirError::Symlink { .. })
        ));
    }

    #[test]
    fn a_removed_or_replaced_target_is_reopened() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("synced");
        let kd = KeyDir::open(&root, false).unwrap();
        kd.apply(&desired(&[("s1", "a", w(b"1"))]));
        std::fs::remove_dir_all(&root).unwrap();
        let r = kd.apply(&desired(&[("s1", "a", w(b"1"))]));
        assert!(r.failures.is_empty(), "{r:?}");
        assert_eq!(std::fs::read(root.join("s1/a")).unwrap(), b"1");
        assert!(root.join(OWNER_MARKER).is_dir());
        // Replaced by a symlink: refused, nothing written through it.
        let elsewhere = t.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::fs::remove_dir_all(&root).unwrap();
        symlink(&elsewhere, &root).unwrap();
        let r = kd.apply(&desired(&[("s1", "a", w(b"1"))]));
        assert_eq!(r.failures.len(), 1, "{r:?}");
        assert!(r.failures[0].1.contains("symbolic link"), "{r:?}");
        assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    }

    #[test]
    fn foreign_directories_are_refused_and_cleanup_is_scoped() {
        let t = tempfile::tempdir().unwrap();
        let foreign = t.path().join("keys");
        std::fs::create_dir(&foreign).unwrap();
        std::fs::write(foreign.join("admin.pem"), b"hand placed").unwrap();
        let err = KeyDir::open(&foreign, false).unwrap_err();
        assert!(matches!(err, KeyDirError::NotOwned { .. }), "{err}");
        assert!(err.to_string().contains("admin.pem"));
        assert!(matches!(
            KeyDir::cleanup(&foreign, false),
            Err(KeyDirError::NotOwned { .. })
        ));
        assert!(foreign.join("admin.pem").exists());
        // Adopted explicitly, it becomes the agent's.
        KeyDir::open(&foreign, true).unwrap();
        assert!(foreign.join(OWNER_MARKER).is_dir());

        let root = t.path().join("synced");
        let kd = KeyDir::open(&root, false).unwrap();
        kd.apply(&desired(&[("s1", "a", w(b"1"))]));
        drop(kd);
        assert_eq!(KeyDir::cleanup(&root, false).unwrap(), 1);
        assert!(!root.exists());
        assert_eq!(KeyDir::cleanup(&root, false).unwrap(), 0);
    }

    /// Issue 14 item 6: a directory the agent refuses is left exactly as it was (mode and files),
    /// also by `--cleanup`; `--cleanup --adopt-target-dir` takes it over and empties it.
    #[test]
    fn a_refused_directory_is_not_changed_and_cleanup_can_adopt() {
        let t = tempfile::tempdir().unwrap();
        let foreign = t.path().join("keys");
        std::fs::create_dir(&foreign).unwrap();
        std::fs::set_permissions(&foreign, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(foreign.join("admin.pem"), b"hand placed").unwrap();
        let mode = || std::fs::metadata(&foreign).unwrap().permissions().mode() & 0o7777;
        assert!(matches!(
            KeyDir::open(&foreign, false),
            Err(KeyDirError::NotOwned { .. })
        ));
        assert_eq!(mode(), 0o755);
        assert!(matches!(
            KeyDir::cleanup(&foreign, false),
            Err(KeyDirError::NotOwned { .. })
        ));
        assert_eq!(mode(), 0o755);
        let names: Vec<_> = std::fs::read_dir(&foreign)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("admin.pem")]);
        assert_eq!(KeyDir::cleanup(&foreign, true).unwrap(), 1);
        assert!(!foreign.exists());
    }

    /// Issue 15 item 3: when the target is replaced, the way to it is walked without following
    /// symlinks: a parent turned into a symlink is refused, nothing is written through it.
    #[test]
    fn reopening_never_follows_a_symlink_in_a_parent() {
        let t = tempfile::tempdir().unwrap();
        let parent = t.path().join("crio");
        let root = parent.join("synced");
        let kd = KeyDir::open(&root, false).unwrap();
        kd.apply(&desired(&[("s1", "a", w(b"1"))]));
        let elsewhere = t.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::fs::rename(&parent, t.path().join("crio-old")).unwrap();
        symlink(&elsewhere, &parent).unwrap();
        let r = kd.apply(&desired(&[("s1", "a", w(b"2"))]));
        assert_eq!(r.failures.len(), 1, "{r:?}");
        assert!(r.failures[0].1.contains("symbolic link"), "{r:?}");
        assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
        // The directory restored: re-opened and written again.
        std::fs::remove_file(&parent).unwrap();
        std::fs::rename(t.path().join("crio-old"), &parent).unwrap();
        std::fs::remove_dir_all(&root).unwrap();
        let r = kd.apply(&desired(&[("s1", "a", w(b"2"))]));
        assert!(r.failures.is_empty(), "{r:?}");
        assert_eq!(std::fs::read(root.join("s1/a")).unwrap(), b"2");
    }
}

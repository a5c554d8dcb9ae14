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
    write_atomic_mode(dest, 0o600, fill)
}

/// As [`write_atomic`], creating the file with `mode` less the process umask (0o666 gives what
/// `cp` and skopeo give: 0644 under umask 022). [`write_atomic`] uses 0600.
///
/// # Errors
/// As [`write_atomic`].
pub fn write_atomic_mode<T, F>(dest: &Path, mode: u32, fill: F) -> Result<T, Error>
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
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))
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

/// Writes `bytes` to `dest` atomically, readable by others as the umask allows (0644 under
/// umask 022): for image layouts, which other users and tools read.
///
/// # Errors
/// [`Error::Io`].
pub fn write_bytes_shared(dest: &Path, bytes: &[u8]) -> Result<(), Error> {
    write_atomic_mode(dest, 0o666, |f| f.write_all(bytes).map_err(Error::Io))
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

/// What kind of file `ft` is, for messages ("a FIFO", "a directory"…).
pub fn file_kind(ft: fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_file() {
        "a regular file"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

fn flags(nofollow: bool) -> rustix::fs::OFlags {
    use rustix::fs::OFlags;
    // NONBLOCK: opening a FIFO returns at once instead of waiting for a writer; it changes
    // nothing for the regular files that are then accepted.
    let f = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY;
    if nofollow {
        f | OFlags::NOFOLLOW
    } else {
        f
    }
}

fn regular_only(file: File) -> std::io::Result<File> {
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{}, not a regular file", file_kind(meta.file_type())),
        ));
    }
    Ok(file)
}

fn symlink_error(e: rustix::io::Errno) -> std::io::Error {
    if e == rustix::io::Errno::LOOP {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "a symbolic link (refused: nothing in it is followed)",
        )
    } else {
        e.into()
    }
}

/// Opens `path` for reading without ever blocking: a FIFO, a device or a directory is refused
/// (checked on the opened descriptor, so it cannot be swapped in between), as is anything that
/// is not a regular file. Symbolic links in `path` are followed (the user named the file).
///
/// # Errors
/// The open error, or `InvalidInput` naming what the file is ("a FIFO, not a regular file").
pub fn open_regular(path: &Path) -> std::io::Result<File> {
    let fd = rustix::fs::open(path, flags(false), rustix::fs::Mode::empty())?;
    regular_only(File::from(fd))
}

/// Reads at most `limit` bytes of `file` (one more to notice that it is longer), into a buffer
/// allocated once so no partial copy of a secret is left behind by a reallocation.
///
/// # Errors
/// The read error, or `InvalidData` when the file is longer than `limit`.
pub fn read_bounded(file: File, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let cap = len.min(limit).saturating_add(1);
    let mut buf = Vec::with_capacity(usize::try_from(cap).unwrap_or(usize::MAX));
    file.take(limit.saturating_add(1)).read_to_end(&mut buf)?;
    if buf.len() as u64 > limit {
        zeroize::Zeroize::zeroize(&mut buf);
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than the {limit} bytes read at most"),
        ));
    }
    Ok(buf)
}

/// [`open_regular`] then [`read_bounded`]: a password, auth or key file, read without hanging
/// on a FIFO and without reading forever from a device.
///
/// # Errors
/// As those two.
pub fn read_regular(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    read_bounded(open_regular(path)?, limit)
}

/// Opens `root/rel[0]/rel[1]/…` for reading, following no symbolic link below `root` (each
/// component is opened relative to its parent's descriptor with `O_NOFOLLOW`) and accepting
/// only a regular file at the end, opened without blocking. `root` itself may be a link.
///
/// # Errors
/// The open error; `InvalidInput` for a symbolic link ("a symbolic link (refused…)") or a
/// file that is not regular.
pub fn open_beneath(root: &Path, rel: &[&str]) -> std::io::Result<File> {
    use rustix::fs::{Mode, OFlags};
    let Some((last, dirs)) = rel.split_last() else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "empty path",
        ));
    };
    let mut dir = rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    for d in dirs {
        dir = rustix::fs::openat(
            &dir,
            *d,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| {
            let link = matches!(e, rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR)
                && rustix::fs::statat(&dir, *d, rustix::fs::AtFlags::SYMLINK_NOFOLLOW).is_ok_and(|st| {
                    rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Symlink
                });
            if link {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("{d} is a symbolic link (refused: nothing in a layout is followed)"),
                )
            } else {
                e.into()
            }
        })?;
    }
    let fd = rustix::fs::openat(&dir, *last, flags(true), Mode::empty()).map_err(symlink_error)?;
    regular_only(File::from(fd))
}

/// Checks that `root/rel[0]/…` are real directories, not symbolic links (creating the missing
/// ones when `create`), so that nothing is written through a link planted in a layout.
///
/// # Errors
/// `InvalidInput` naming the component that is a link or not a directory, or the I/O error.
pub fn real_dirs_beneath(root: &Path, rel: &[&str], create: bool) -> std::io::Result<std::path::PathBuf> {
    let mut p = root.to_path_buf();
    for d in rel {
        p.push(d);
        match fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => {}
            Ok(m) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "{} is {}, not a directory (refused: nothing is written through it)",
                        p.display(),
                        file_kind(m.file_type())
                    ),
                ))
            }
            Err(e) if create && e.kind() == std::io::ErrorKind::NotFound => fs::create_dir(&p)?,
            Err(e) => return Err(e),
        }
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifos_devices_and_long_files_are_refused_without_blocking() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let e = read_regular(&fifo, 10).unwrap_err();
        assert!(e.to_string().contains("a FIFO"), "{e}");
        let e = read_regular(Path::new("/dev/zero"), 10).unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
        let f = d.path().join("f");
        fs::write(&f, b"0123456789ab").unwrap();
        assert!(read_regular(&f, 11).is_err());
        assert_eq!(read_regular(&f, 12).unwrap(), b"0123456789ab");
    }

    #[test]
    fn nothing_beneath_a_root_is_followed() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("real/sub")).unwrap();
        fs::write(d.path().join("real/sub/f"), b"x").unwrap();
        std::os::unix::fs::symlink(d.path().join("real/sub"), d.path().join("real/link")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", d.path().join("real/sub/z")).unwrap();
        let root = d.path().join("real");
        assert!(open_beneath(&root, &["sub", "f"]).is_ok());
        let e = open_beneath(&root, &["link", "f"]).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        let e = open_beneath(&root, &["sub", "z"]).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert!(real_dirs_beneath(&root, &["sub"], false).is_ok());
        assert!(real_dirs_beneath(&root, &["link"], true).is_err());
        assert!(real_dirs_beneath(&root, &["new", "deeper"], true)
            .unwrap()
            .is_dir());
    }
}

//! Key directories, as container runtimes read them.
//!
//! CRI-O (`[crio.runtime] decryption_keys_path`, default `/etc/crio/keys/`) and containerd's
//! `ctd-decoder --decryption-keys-path` walk the directory recursively, refuse symbolic links,
//! read every file and hand them all to Go `ocicrypt/utils.SortDecryptionKeys`, which accepts
//! per file: a GPG keyring (binary), a private key (no password possible), an X.509
//! certificate, or a PKCS#11 key YAML — and fails the whole decryption, for every image, on
//! anything else ("Unknown decryption key type"), including an encrypted private key or a SEC1
//! PEM EC key (Go cannot parse those).
//!
//! * [`read_key_dir`] is that strict behaviour: use it to check a directory a runtime reads
//!   (the key sync agent, `imgcrypt keys check`). A file that would break the runtime makes
//!   it fail with [`KeyError::UnusableKeyFile`] or [`KeyError::Symlink`] naming the file.
//! * [`read_key_dir_lenient`] is for our own decryption (`imgcrypt decrypt --key-dir`): it
//!   takes every private key we can use (SEC1 PEM included), and lists every other file in
//!   [`KeyDir::skipped`] with the reason instead of failing.
//!
//! Both collect GPG secret keyrings in [`KeyDir::gpg_keyrings`] for the pgp scheme: binary ones
//! (what Go reads) and, beyond Go, armored ones (`-----BEGIN PGP PRIVATE KEY BLOCK-----`, which
//! CRI-O fails on and Go's helpers ignore; keysync-agent writes such keys binary).
//!
//! Both read without races against a writer such as keysync-agent, which replaces a key by
//! renaming a complete file over it: every entry is opened exactly once, relative to its open
//! parent directory, with `O_NOFOLLOW | O_NONBLOCK` (a symbolic link is refused by the open
//! itself, a FIFO swapped in cannot block it), and what was opened is checked with `fstat`
//! (regular files only, read up to [`MAX_KEY_FILE_SIZE`]). An entry that vanishes between the
//! listing and the open is absent, as if the listing had come a moment later; it never makes
//! the whole directory look missing.

use std::ffi::{CStr, CString};
use std::io::Read as _;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

use rustix::fs::{Dir, FileType, Mode, OFlags};
use rustix::io::Errno;

use super::parse::{is_encrypted_pkcs8_der, openpgp_tag, sniff_non_key, MAX_KEY_FILE_SIZE};
use super::{KeyError, PrivateKey};
use crate::keys::pem;

/// Directory levels walked at most (the runtimes have no limit; this only bounds the walk).
const MAX_DEPTH: usize = 32;
/// Files read at most.
const MAX_FILES: usize = 10_000;

/// What a file in a key directory is, as `SortDecryptionKeys` sees it.
#[derive(Debug)]
#[non_exhaustive]
pub enum KeyFileKind {
    /// An unencrypted private key (RSA or EC).
    PrivateKey(PrivateKey),
    /// A password-protected private key: a runtime cannot use it (it has no way to get the
    /// password) and fails on it.
    EncryptedPrivateKey,
    /// An X.509 certificate (Go collects it for the pkcs7 scheme).
    Certificate,
    /// A binary OpenPGP secret keyring (for the pgp scheme).
    GpgSecretKeyring,
    /// An armored OpenPGP secret keyring (`gpg --armor --export-secret-keys`): our decoder and
    /// `imgcrypt --key-dir` read it; Go runtimes do not (CRI-O fails on it, Go helpers ignore
    /// it), so keysync-agent writes it dearmored.
    GpgArmoredSecretKeyring,
    /// A binary OpenPGP public keyring: Go's check accepts any keyring, so the runtime takes
    /// it without complaint, but it cannot decrypt anything.
    GpgPublicKeyring,
    /// A PKCS#11 key YAML (`pkcs11: {uri: pkcs11:…}`).
    Pkcs11Yaml,
    /// Anything else: a runtime fails on it.
    Unknown {
        /// What was found, and what to do.
        found: String,
    },
}

impl KeyFileKind {
    /// A short description for reports.
    pub fn describe(&self) -> String {
        match self {
            KeyFileKind::PrivateKey(k) => format!("{} private key ({})", k.describe(), k.format()),
            KeyFileKind::EncryptedPrivateKey => "an encrypted private key".into(),
            KeyFileKind::Certificate => "an X.509 certificate".into(),
            KeyFileKind::GpgSecretKeyring => "a GPG secret keyring".into(),
            KeyFileKind::GpgArmoredSecretKeyring => "an armored GPG secret keyring".into(),
            KeyFileKind::GpgPublicKeyring => "a GPG public keyring".into(),
            KeyFileKind::Pkcs11Yaml => "a PKCS#11 key YAML".into(),
            KeyFileKind::Unknown { found } => found.clone(),
        }
    }
}

/// Classifies the contents of one key-directory file, in the order Go checks: GPG keyring,
/// private key, certificate, PKCS#11 YAML.
pub fn classify_key_file(bytes: &[u8], source_name: &str) -> KeyFileKind {
    match openpgp_tag(bytes) {
        Some(5) if openpgp_packet_plausible(bytes) => return KeyFileKind::GpgSecretKeyring,
        Some(6) if openpgp_packet_plausible(bytes) => return KeyFileKind::GpgPublicKeyring,
        _ => {}
    }
    if is_armored_secret_keyring(bytes) {
        return KeyFileKind::GpgArmoredSecretKeyring;
    }
    match PrivateKey::from_bytes(bytes, None, source_name) {
        Ok(k) => return KeyFileKind::PrivateKey(k),
        Err(KeyError::NeedsPassword { .. }) => return KeyFileKind::EncryptedPrivateKey,
        Err(_) => {}
    }
    if is_certificate(bytes) {
        return KeyFileKind::Certificate;
    }
    if is_pkcs11_yaml(bytes) {
        return KeyFileKind::Pkcs11Yaml;
    }
    if is_encrypted_pkcs8_der(bytes) {
        return KeyFileKind::EncryptedPrivateKey;
    }
    // Say why the private key parse failed when it looked like a key.
    let found = match PrivateKey::from_bytes(bytes, None, source_name) {
        Err(KeyError::Unsupported { found, .. }) => found,
        Err(KeyError::UnsupportedAlgorithm { found, .. }) => format!("a key of an unsupported type: {found}"),
        Err(KeyError::Malformed { what, reason, .. }) => format!("a malformed {what}: {reason}"),
        Err(e) => e.to_string(),
        Ok(_) => sniff_non_key(bytes),
    };
    KeyFileKind::Unknown { found }
}

/// An ASCII-armored OpenPGP secret key block: the armor line first (after blank lines), as gpg
/// writes it.
fn is_armored_secret_keyring(bytes: &[u8]) -> bool {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    bytes[start..].starts_with(b"-----BEGIN PGP PRIVATE KEY BLOCK-----")
}

fn is_certificate(bytes: &[u8]) -> bool {
    if pem::contains_pem(bytes) {
        pem::parse_blocks(bytes).is_ok_and(|bs| {
            bs.iter().any(|b| {
                matches!(b.label.as_str(), "CERTIFICATE" | "X509 CERTIFICATE")
                    && openssl::x509::X509::from_der(&b.der).is_ok()
            })
        })
    } else {
        openssl::x509::X509::from_der(bytes).is_ok()
    }
}

/// An ocicrypt PKCS#11 key file, as Go checks it: YAML with a `pkcs11: uri:` that parses as
/// a `pkcs11:` URI.
fn is_pkcs11_yaml(bytes: &[u8]) -> bool {
    crate::pkcs11::Pkcs11KeyFile::is_key_file(bytes)
}

/// A minimal check that the first OpenPGP packet has a sane length and a known key version.
fn openpgp_packet_plausible(bytes: &[u8]) -> bool {
    let first = bytes[0];
    let (header, len) = if first & 0x40 != 0 {
        // New format.
        match bytes.get(1) {
            Some(&l) if l < 192 => (2, usize::from(l)),
            Some(&l) if l < 224 => match bytes.get(2) {
                Some(&l2) => (3, ((usize::from(l) - 192) << 8) + usize::from(l2) + 192),
                None => return false,
            },
            Some(255) if bytes.len() >= 6 => (
                6,
                u32::from_be_bytes([bytes[2], bytes[3], bytes[4], bytes[5]]) as usize,
            ),
            _ => return false,
        }
    } else {
        match first & 0x03 {
            0 if bytes.len() >= 2 => (2, usize::from(bytes[1])),
            1 if bytes.len() >= 3 => (3, usize::from(u16::from_be_bytes([bytes[1], bytes[2]]))),
            2 if bytes.len() >= 5 => (
                5,
                u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize,
            ),
            _ => return false,
        }
    };
    len >= 6 && header + len <= bytes.len() && matches!(bytes.get(header), Some(3..=6))
}

/// The usable contents of a key directory.
#[derive(Debug, Default)]
pub struct KeyDir {
    /// Private keys, sorted by path.
    pub keys: Vec<KeyDirEntry>,
    /// GPG secret keyrings (binary or armored), sorted by path, as read: parse them with
    /// `ocicrypt_core::pgp::PgpSecretKey::from_bytes_many` for the pgp scheme.
    pub gpg_keyrings: Vec<KeyDirFile>,
    /// Files a runtime accepts that hold no private key or secret keyring (certificates, GPG
    /// public keyrings, PKCS#11 YAML), with what they are.
    pub ignored: Vec<SkippedKeyFile>,
    /// [`read_key_dir_lenient`] only: files a runtime would fail on, with the reason. Always
    /// empty after [`read_key_dir`] (it fails instead).
    pub skipped: Vec<SkippedKeyFile>,
}

impl KeyDir {
    /// The private keys, dropping the paths.
    pub fn into_private_keys(self) -> Vec<PrivateKey> {
        self.keys.into_iter().map(|e| e.key).collect()
    }
}

/// One private key of a key directory.
#[derive(Debug)]
pub struct KeyDirEntry {
    /// Its file.
    pub path: PathBuf,
    /// The key.
    pub key: PrivateKey,
}

/// A key file of a key directory kept as read (zeroized on drop; `Debug` shows only the path).
pub struct KeyDirFile {
    /// Its file.
    pub path: PathBuf,
    /// Its contents.
    pub bytes: zeroize::Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for KeyDirFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyDirFile")
            .field("path", &self.path)
            .field("bytes", &format_args!("<{} bytes>", self.bytes.len()))
            .finish()
    }
}

/// A file of a key directory that gives no usable key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedKeyFile {
    /// The file.
    pub path: PathBuf,
    /// What it is or why it was skipped.
    pub reason: String,
}

/// Reads a key directory strictly, as CRI-O and containerd's `ctd-decoder` do: every file must
/// be something Go `SortDecryptionKeys` accepts. A symbolic link anywhere, a file that is not
/// a regular file, an encrypted private key, a key Go cannot parse (SEC1 PEM, encrypted
/// PKCS#8) or any other file makes the whole read fail with an error naming the file.
///
/// A missing directory is an [`KeyError::Io`] error with `NotFound` (CRI-O treats it as
/// empty; check [`KeyError::is_not_found`] to do the same). Only the directory itself gives
/// that error: an entry that vanishes during the walk is simply absent.
///
/// # Errors
/// [`KeyError::Io`], [`KeyError::Symlink`], [`KeyError::UnusableKeyFile`].
pub fn read_key_dir(dir: &Path) -> Result<KeyDir, KeyError> {
    read(dir, true)
}

/// Reads a key directory leniently, for our own decryption: takes every private key this
/// crate can use (SEC1 PEM included) and lists every other file in [`KeyDir::ignored`] or
/// [`KeyDir::skipped`] with the reason. Fails only if the directory itself cannot be read or
/// is a symbolic link.
///
/// # Errors
/// [`KeyError::Io`], [`KeyError::Symlink`] (for `dir` itself).
pub fn read_key_dir_lenient(dir: &Path) -> Result<KeyDir, KeyError> {
    read(dir, false)
}

fn read(dir: &Path, strict: bool) -> Result<KeyDir, KeyError> {
    let io = |source: std::io::Error| KeyError::Io {
        path: dir.to_owned(),
        source,
    };
    let fd = match rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        // With O_DIRECTORY, Linux refuses a symbolic link with ENOTDIR rather than ELOOP.
        Err(Errno::LOOP | Errno::NOTDIR) => {
            if std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink()) {
                return Err(KeyError::Symlink { path: dir.to_owned() });
            }
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a directory",
            )));
        }
        Err(e) => return Err(io(e.into())),
    };
    let mut out = KeyDir::default();
    let mut count = 0;
    walk(&fd, dir, 0, strict, &mut out, &mut count)?;
    Ok(out)
}

/// How an entry of a key directory opened.
enum Opened {
    /// It vanished between the listing and the open (a key rotated by rename): absent.
    Gone,
    /// A symbolic link (`O_NOFOLLOW` refused it).
    Symlink,
    /// Neither a regular file nor a directory.
    Other,
    /// A directory, open.
    Dir(OwnedFd),
    /// A regular file, open.
    File(std::fs::File),
}

/// Opens `name` once, without following a symbolic link and without blocking (a FIFO swapped
/// in would otherwise hang the open), then checks what was opened with `fstat`: whatever the
/// name pointed to before, only the object actually opened is read.
fn open_entry(dirfd: &OwnedFd, name: &CStr, hint: FileType) -> Result<Opened, std::io::Error> {
    // Devices, sockets and FIFOs listed as such are not even opened.
    if !matches!(
        hint,
        FileType::RegularFile | FileType::Directory | FileType::Symlink | FileType::Unknown
    ) {
        return Ok(Opened::Other);
    }
    let fd = match rustix::fs::openat(
        dirfd,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(Opened::Gone),
        Err(Errno::LOOP) => return Ok(Opened::Symlink),
        // A socket, or a FIFO opened for writing elsewhere: not a key file either way.
        Err(Errno::NXIO) => return Ok(Opened::Other),
        Err(e) => return Err(e.into()),
    };
    let st = rustix::fs::fstat(&fd)?;
    Ok(match FileType::from_raw_mode(st.st_mode) {
        FileType::Directory => Opened::Dir(fd),
        FileType::RegularFile => Opened::File(std::fs::File::from(fd)),
        _ => Opened::Other,
    })
}

/// Names in an open directory (without `.` and `..`), sorted, with the type the listing gives.
fn list(dirfd: &OwnedFd) -> Result<Vec<(CString, FileType)>, std::io::Error> {
    let mut out = Vec::new();
    for entry in Dir::read_from(dirfd)? {
        let entry = entry?;
        let name = entry.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        out.push((name.to_owned(), entry.file_type()));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn walk(
    dirfd: &OwnedFd,
    dir: &Path,
    depth: usize,
    strict: bool,
    out: &mut KeyDir,
    count: &mut usize,
) -> Result<(), KeyError> {
    let io = |path: &Path, source| KeyError::Io {
        path: path.to_owned(),
        source,
    };
    if depth > MAX_DEPTH {
        return Err(io(
            dir,
            std::io::Error::other(format!("key directory nested deeper than {MAX_DEPTH} levels")),
        ));
    }
    let entries = list(dirfd).map_err(|e| io(dir, e))?;
    for (name, hint) in entries {
        let path = dir.join(std::ffi::OsStr::from_bytes(name.to_bytes()));
        let skip = |out: &mut KeyDir, reason: String| -> Result<(), KeyError> {
            if strict {
                Err(KeyError::UnusableKeyFile {
                    path: path.clone(),
                    reason,
                })
            } else {
                out.skipped.push(SkippedKeyFile {
                    path: path.clone(),
                    reason,
                });
                Ok(())
            }
        };
        let file = match open_entry(dirfd, &name, hint).map_err(|e| io(&path, e))? {
            Opened::Gone => continue,
            Opened::Symlink => {
                if strict {
                    return Err(KeyError::Symlink { path });
                }
                skip(out, "a symbolic link (not followed in key directories)".into())?;
                continue;
            }
            Opened::Other => {
                skip(out, "not a regular file".into())?;
                continue;
            }
            Opened::Dir(sub) => {
                walk(&sub, &path, depth + 1, strict, out, count)?;
                continue;
            }
            Opened::File(f) => f,
        };
        *count += 1;
        if *count > MAX_FILES {
            return Err(io(
                dir,
                std::io::Error::other(format!("key directory holds more than {MAX_FILES} files")),
            ));
        }
        let bytes = match read_bounded(file, &path) {
            Ok(b) => b,
            Err(KeyError::Unsupported { found, .. }) => {
                skip(out, found)?;
                continue;
            }
            Err(e) => return Err(e),
        };
        let name = path.display().to_string();
        match classify_key_file(&bytes, &name) {
            KeyFileKind::PrivateKey(key) => {
                if strict && !key.format().go_ocicrypt_reads() {
                    skip(
                        out,
                        format!(
                            "a {} private key, which Go ocicrypt cannot read; convert it with: openssl pkcs8 -topk8 -nocrypt -in {name} -out {name}.p8.pem (and remove the original)",
                            key.format()
                        ),
                    )?;
                    continue;
                }
                out.keys.push(KeyDirEntry { path, key });
            }
            KeyFileKind::EncryptedPrivateKey => skip(
                out,
                format!(
                    "an encrypted private key: a runtime cannot ask for its password; store it decrypted (openssl pkey -in {name} -out PLAIN.pem) or remove it"
                ),
            )?,
            KeyFileKind::Unknown { found } => skip(out, format!("unknown decryption key type: {found}"))?,
            KeyFileKind::GpgSecretKeyring | KeyFileKind::GpgArmoredSecretKeyring => {
                out.gpg_keyrings.push(KeyDirFile { path, bytes })
            }
            other => out.ignored.push(SkippedKeyFile {
                path,
                reason: other.describe(),
            }),
        }
    }
    Ok(())
}

/// Reads an opened key file, at most [`MAX_KEY_FILE_SIZE`] bytes.
fn read_bounded(f: std::fs::File, path: &Path) -> Result<zeroize::Zeroizing<Vec<u8>>, KeyError> {
    let mut buf = zeroize::Zeroizing::new(Vec::new());
    f.take(MAX_KEY_FILE_SIZE + 1)
        .read_to_end(&mut buf)
        .map_err(|source| KeyError::Io {
            path: path.to_owned(),
            source,
        })?;
    if buf.len() as u64 > MAX_KEY_FILE_SIZE {
        return Err(KeyError::Unsupported {
            source_name: path.display().to_string(),
            found: format!("a file larger than {MAX_KEY_FILE_SIZE} bytes (no key is that big)"),
        });
    }
    Ok(buf)
}

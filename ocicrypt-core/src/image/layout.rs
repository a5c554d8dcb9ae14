//! The OCI image layout store (`oci:PATH[:TAG]` in skopeo's words).
//!
//! Blobs live in `blobs/sha256/<hex>`; `index.json` lists the images, named by the
//! `org.opencontainers.image.ref.name` annotation. Every blob is written to a temporary file in
//! the blob directory, synced and renamed into place once complete and verified; `index.json` is
//! replaced atomically. Every read is verified against the digest that names it.
//!
//! A layout is hostile input: nothing below the layout directory is followed if it is a
//! symbolic link (reading refuses it, writing never goes through it), only regular files are
//! read (a FIFO or device is refused without blocking), a blob must have exactly the size its
//! descriptor declares before it is read, manifests, indexes and configs are read only up to that
//! size (and at most [`MAX_SMALL`]), and a blob already present in a destination is reused only
//! when its digest verifies (it is rewritten otherwise).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use std::io::{self, Read, Write};

use oci_spec::image::{Descriptor, ImageIndex, MediaType};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncRead;

use super::digest::{format_sha256, verify_bytes};
use super::pipeline::{self, ChunkPool, ChunkReceiver, ChunkSender};
use super::{canonical_json, BlobReader, ImageDest, ImageSource, Transfer};
use crate::cipher::io::to_io;
use crate::keywrap::BoxFuture;
use crate::Error;

/// The annotation that names an image in `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
const OCI_LAYOUT_CONTENT: &str = r#"{"imageLayoutVersion":"1.0.0"}"#;
/// Largest `index.json`, manifest, index or config read into memory.
pub const MAX_SMALL: u64 = 32 << 20;

/// Prefix of the temporary files blobs are written to (`.tmp-PID-RANDOM`).
const TMP_PREFIX: &str = ".tmp-";

/// An OCI image layout directory, optionally with the tag an operation reads or writes.
#[derive(Debug)]
pub struct OciLayout {
    root: PathBuf,
    tag: Option<String>,
    created: Mutex<Vec<PathBuf>>,
    /// Temporary files being written, removed by `abort` even while a writer thread still
    /// holds them (an interrupted run does not wait for its threads).
    temps: Mutex<Vec<PathBuf>>,
    index_lock: Mutex<()>,
    /// What `open_or_create` made (the layout skeleton, and whether the directory itself),
    /// removed again by `abort` so a failed operation leaves nothing behind.
    skeleton: Mutex<Option<bool>>,
    /// Set by `abort` (under the `temps` and `created` locks): a writer that outlived the
    /// aborted run (a layer task still finishing) neither starts a temporary file nor moves a
    /// blob into place afterwards, so what `abort` removed stays removed.
    aborted: AtomicBool,
}

impl OciLayout {
    /// Opens an existing layout.
    ///
    /// # Errors
    /// [`Error::Image`] when `root` is not an OCI layout (no `oci-layout` or `index.json`).
    pub fn open(root: impl Into<PathBuf>, tag: Option<&str>) -> Result<Self, Error> {
        let root = root.into();
        for name in ["oci-layout", "index.json"] {
            match crate::fsutil::open_beneath(&root, &[name]) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(Error::Image(format!(
                        "{} is not an OCI image layout (no oci-layout or index.json file); check the path",
                        root.display()
                    )))
                }
                Err(e) => {
                    return Err(Error::Image(format!(
                        "{} is not a usable OCI image layout: {name} is {e}",
                        root.display()
                    )))
                }
            }
        }
        Ok(Self::new(root, tag))
    }

    /// Opens a layout, creating an empty one if the directory does not exist or is empty.
    ///
    /// # Errors
    /// [`Error::Io`] when the directory cannot be created, [`Error::Image`] when it exists, is not
    /// empty and is not a layout.
    pub fn open_or_create(root: impl Into<PathBuf>, tag: Option<&str>) -> Result<Self, Error> {
        let root = root.into();
        let existed = root.exists();
        let empty = !existed || fs::read_dir(&root)?.next().is_none();
        if empty {
            fs::create_dir_all(&root)?;
            crate::fsutil::real_dirs_beneath(&root, &["blobs", "sha256"], true)?;
            crate::fsutil::write_bytes_shared(&root.join("oci-layout"), OCI_LAYOUT_CONTENT.as_bytes())?;
            crate::fsutil::write_bytes_shared(
                &root.join("index.json"),
                br#"{"schemaVersion":2,"manifests":[]}"#,
            )?;
        }
        let layout = Self::open(root, tag)?;
        if !empty {
            layout.remove_stale_temporaries();
        }
        if empty {
            *layout.skeleton.lock().expect("lock") = Some(!existed);
        }
        Ok(layout)
    }

    /// Removes `blobs/sha256/.tmp-PID-*` files whose writer (PID) is no longer running: what a
    /// run killed with SIGKILL leaves. Best effort; a running writer's files are kept.
    pub fn remove_stale_temporaries(&self) {
        let dir = self.root.join("blobs").join("sha256");
        let Ok(entries) = fs::read_dir(&dir) else {
            return;
        };
        for e in entries.filter_map(Result::ok) {
            let name = e.file_name();
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(TMP_PREFIX)) else {
                continue;
            };
            let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            let alive = pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists();
            if !alive && e.file_type().is_ok_and(|t| t.is_file()) {
                match fs::remove_file(e.path()) {
                    Ok(()) => tracing::debug!("removed stale temporary {}", e.path().display()),
                    Err(err) => {
                        tracing::debug!("cannot remove stale temporary {}: {err}", e.path().display())
                    }
                }
            }
        }
    }

    fn new(root: PathBuf, tag: Option<&str>) -> Self {
        Self {
            root,
            tag: tag.map(str::to_owned),
            created: Mutex::new(Vec::new()),
            temps: Mutex::new(Vec::new()),
            index_lock: Mutex::new(()),
            skeleton: Mutex::new(None),
            aborted: AtomicBool::new(false),
        }
    }

    /// The layout directory.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The tag this handle reads or writes.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// Path of a blob by digest.
    ///
    /// # Errors
    /// [`Error::Image`] for a malformed digest (it would escape the blob directory).
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, Error> {
        let (alg, hex) = Self::blob_name(digest)?;
        Ok(self.root.join("blobs").join(alg).join(hex))
    }

    /// `(algorithm, hex)` of a digest, checked to be safe as path components.
    fn blob_name(digest: &str) -> Result<(&str, &str), Error> {
        let (alg, hex) = digest
            .split_once(':')
            .ok_or_else(|| Error::Image(format!("malformed digest {digest:?}")))?;
        let ok = !alg.is_empty()
            && alg.chars().all(|c| c.is_ascii_alphanumeric())
            && !hex.is_empty()
            && hex.chars().all(|c| c.is_ascii_hexdigit());
        if !ok {
            return Err(Error::Image(format!("malformed digest {digest:?}")));
        }
        Ok((alg, hex))
    }

    /// Opens a blob for reading: no symbolic link below the layout is followed, and only a
    /// regular file is accepted (without blocking on a FIFO).
    fn open_blob_file(&self, digest: &str) -> Result<fs::File, Error> {
        let (alg, hex) = Self::blob_name(digest)?;
        crate::fsutil::open_beneath(&self.root, &["blobs", alg, hex]).map_err(|e| {
            let hint = if e.kind() == io::ErrorKind::InvalidInput {
                " (replace it with the file itself, e.g. with cp -L)"
            } else {
                ""
            };
            Error::Image(format!(
                "cannot open blob {digest} in {}: {e}{hint}",
                self.root.display()
            ))
        })
    }

    /// Opens a blob whose size must be exactly `size` (checked before anything is read).
    fn open_sized(&self, digest: &str, size: u64) -> Result<fs::File, Error> {
        let file = self.open_blob_file(digest)?;
        let actual = file.metadata()?.len();
        if actual != size {
            return Err(Error::DigestMismatch {
                what: format!("blob {digest} in {}", self.root.display()),
                expected: format!("{digest} ({size} bytes)"),
                actual: format!("a file of {actual} bytes"),
            });
        }
        Ok(file)
    }

    /// True when the blob `digest` is present as a regular file of `size` bytes (if given)
    /// whose content hashes to `digest`. Reads the whole blob.
    fn blob_verifies(&self, digest: &str, size: Option<u64>) -> bool {
        let Ok(mut file) = self.open_blob_file(digest) else {
            return false;
        };
        if let Some(size) = size {
            if file.metadata().map(|m| m.len()).ok() != Some(size) {
                return false;
            }
        }
        let mut hasher = Sha256::new();
        if io::copy(&mut file, &mut hasher).is_err() {
            return false;
        }
        format_sha256(hasher) == digest
    }

    /// The blob directory for `alg`, created if missing; refused if it or `blobs` is a symbolic
    /// link (nothing is written through one).
    fn blob_dir(&self, alg: &str) -> Result<PathBuf, Error> {
        crate::fsutil::real_dirs_beneath(&self.root, &["blobs", alg], true).map_err(|e| {
            Error::Image(format!(
                "cannot write blobs into OCI layout {}: {e}",
                self.root.display()
            ))
        })
    }

    /// Reads and parses `index.json`.
    ///
    /// # Errors
    /// [`Error::Io`], or [`Error::Image`] when it does not parse.
    pub fn index(&self) -> Result<ImageIndex, Error> {
        let what = || format!("{}/index.json", self.root.display());
        let bytes = crate::fsutil::open_beneath(&self.root, &["index.json"])
            .and_then(|f| crate::fsutil::read_bounded(f, MAX_SMALL))
            .map_err(|e| Error::Image(format!("cannot read {}: {e}", what())))?;
        ImageIndex::from_reader(&bytes[..])
            .map_err(|e| Error::Image(format!("{}/index.json does not parse: {e}", self.root.display())))
    }

    /// Names of the images in `index.json`.
    ///
    /// # Errors
    /// As [`index`](Self::index).
    pub fn tags(&self) -> Result<Vec<String>, Error> {
        Ok(self
            .index()?
            .manifests()
            .iter()
            .filter_map(|d| d.annotations().as_ref().and_then(|a| a.get(REF_NAME)).cloned())
            .collect())
    }

    /// The descriptor named `tag` in `index.json`; without a tag, the only image in it.
    ///
    /// # Errors
    /// [`Error::Image`] when the tag is unknown or, without a tag, the layout holds not exactly
    /// one image.
    pub fn resolve(&self, tag: Option<&str>) -> Result<Descriptor, Error> {
        let index = self.index()?;
        let m = index.manifests();
        match tag {
            Some(t) => m
                .iter()
                .find(|d| {
                    d.annotations()
                        .as_ref()
                        .and_then(|a| a.get(REF_NAME))
                        .map(String::as_str)
                        == Some(t)
                })
                .cloned()
                .ok_or_else(|| {
                    Error::Image(format!(
                        "no image tagged {t:?} in OCI layout {} (tags: {})",
                        self.root.display(),
                        self.tags().unwrap_or_default().join(", ")
                    ))
                }),
            None if m.len() == 1 => Ok(m[0].clone()),
            None => Err(Error::Image(format!(
                "OCI layout {} holds {} images; name one as oci:{}:TAG (tags: {})",
                self.root.display(),
                m.len(),
                self.root.display(),
                self.tags().unwrap_or_default().join(", ")
            ))),
        }
    }

    /// Points `tag` at `desc` in `index.json` (replacing an entry with the same name), atomically.
    ///
    /// # Errors
    /// [`Error::Io`] or [`Error::Image`].
    pub fn set_ref(&self, tag: Option<&str>, desc: &Descriptor) -> Result<(), Error> {
        let _guard = self.index_lock.lock().expect("index lock");
        let mut index = self.index()?;
        let mut entry = desc.clone();
        let mut ann: HashMap<String, String> = entry.annotations().clone().unwrap_or_default();
        ann.remove(REF_NAME);
        if let Some(t) = tag {
            ann.insert(REF_NAME.to_owned(), t.to_owned());
        }
        entry.set_annotations(if ann.is_empty() { None } else { Some(ann) });
        let mut manifests: Vec<Descriptor> = index
            .manifests()
            .iter()
            .filter(|d| {
                let name = d.annotations().as_ref().and_then(|a| a.get(REF_NAME));
                match tag {
                    Some(t) => name.map(String::as_str) != Some(t),
                    // Untagged: replace the previous untagged entries.
                    None => name.is_some(),
                }
            })
            .cloned()
            .collect();
        manifests.push(entry);
        index.set_manifests(manifests);
        let bytes = canonical_json(&index)?;
        crate::fsutil::write_bytes_shared(&self.root.join("index.json"), &bytes)
    }

    /// Writes a small blob (manifest, config) from memory.
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<String, Error> {
        let digest = super::digest::sha256_digest(bytes);
        let path = self.blob_path(&digest)?;
        if !self.blob_verifies(&digest, Some(bytes.len() as u64)) {
            let existed = fs::symlink_metadata(&path).is_ok();
            self.blob_dir("sha256")?;
            crate::fsutil::write_bytes_shared(&path, bytes)?;
            if !existed {
                self.created.lock().expect("lock").push(path);
            }
        }
        Ok(digest)
    }

    /// Reads a small blob whole, verified.
    ///
    /// # Errors
    /// [`Error::Io`] (with the path) or [`Error::DigestMismatch`].
    pub fn get_bytes(&self, desc: &Descriptor) -> Result<Vec<u8>, Error> {
        let digest = desc.digest().to_string();
        if desc.size() > MAX_SMALL {
            return Err(Error::Image(format!(
                "blob {digest} in {} is declared as {} bytes, more than the {MAX_SMALL} read into memory for a manifest, index or config",
                self.root.display(),
                desc.size()
            )));
        }
        let file = self.open_sized(&digest, desc.size())?;
        let bytes = crate::fsutil::read_bounded(file, desc.size()).map_err(|e| Error::DigestMismatch {
            what: format!("blob {digest} in {}", self.root.display()),
            expected: format!("{digest} ({} bytes)", desc.size()),
            actual: e.to_string(),
        })?;
        verify_bytes(
            &format!("blob {digest} in {}", self.root.display()),
            &bytes,
            &digest,
            desc.size(),
        )?;
        Ok(bytes)
    }
}

impl ImageSource for OciLayout {
    fn describe(&self) -> String {
        match &self.tag {
            Some(t) => format!("oci:{}:{t}", self.root.display()),
            None => format!("oci:{}", self.root.display()),
        }
    }

    fn root(&self) -> BoxFuture<'_, Result<Descriptor, Error>> {
        Box::pin(async move { self.resolve(self.tag.as_deref()) })
    }

    fn read_small<'a>(&'a self, desc: &'a Descriptor) -> BoxFuture<'a, Result<Vec<u8>, Error>> {
        Box::pin(async move { self.get_bytes(desc) })
    }

    fn open_blob<'a>(&'a self, desc: &'a Descriptor) -> BoxFuture<'a, Result<BlobReader, Error>> {
        Box::pin(async move {
            let chunks = self.open_blob_chunks(desc, ChunkPool::standard()).await?;
            Ok(Box::pin(chunks.into_reader()) as BlobReader)
        })
    }

    fn open_blob_chunks<'a>(
        &'a self,
        desc: &'a Descriptor,
        pool: ChunkPool,
    ) -> BoxFuture<'a, Result<ChunkReceiver, Error>> {
        Box::pin(async move {
            let digest = desc.digest().to_string();
            let what = format!("blob {digest} in {}", self.root.display());
            if !digest.starts_with("sha256:") {
                return Err(Error::Image(format!(
                    "{what}: unsupported digest algorithm in {digest}; only sha256 is supported"
                )));
            }
            let file = self.open_sized(&digest, desc.size())?;
            let (tx, rx) = pipeline::chunk_channel(pipeline::DEPTH, pool);
            let size = desc.size();
            tokio::task::spawn_blocking(move || read_verified(file, tx, &digest, size, &what));
            Ok(rx)
        })
    }

    fn blob_file<'a>(&'a self, desc: &'a Descriptor) -> BoxFuture<'a, Result<Option<fs::File>, Error>> {
        Box::pin(async move {
            let digest = desc.digest().to_string();
            if !digest.starts_with("sha256:") {
                return Ok(None);
            }
            self.open_sized(&digest, desc.size()).map(Some)
        })
    }
}

/// Reads `file` into chunks on a blocking thread, hashing as it goes; ends the stream with a
/// [`Error::DigestMismatch`] instead of its clean end when digest or size are wrong.
fn read_verified(mut file: fs::File, tx: ChunkSender, expected: &str, size: u64, what: &str) {
    let mismatch = |actual: String| {
        to_io(Error::DigestMismatch {
            what: what.to_owned(),
            expected: format!("{expected} ({size} bytes)"),
            actual,
        })
    };
    let mut hasher = Sha256::new();
    let mut seen = 0u64;
    loop {
        let mut buf = tx.pool().get();
        let mut filled = 0;
        let mut eof = false;
        while filled < buf.len() {
            match file.read(&mut buf[filled..]) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tx.blocking_fail(io::Error::new(e.kind(), format!("reading {what}: {e}")));
                    return;
                }
            }
        }
        buf.truncate(filled);
        seen += filled as u64;
        if seen > size {
            tx.blocking_fail(mismatch(format!("more than {size} bytes")));
            return;
        }
        hasher.update(&buf);
        if tx.blocking_send(buf).is_err() {
            return;
        }
        if eof {
            let actual = format_sha256(hasher);
            if actual == expected && seen == size {
                tx.blocking_finish();
            } else {
                tx.blocking_fail(mismatch(format!("{actual} ({seen} bytes)")));
            }
            return;
        }
    }
}

impl ImageDest for OciLayout {
    fn describe(&self) -> String {
        ImageSource::describe(self)
    }

    fn has_blob<'a>(&'a self, desc: &'a Descriptor) -> BoxFuture<'a, Result<bool, Error>> {
        Box::pin(async move {
            // Reused only if it verifies: a wrong blob planted under the digest is rewritten.
            let digest = desc.digest().to_string();
            Self::blob_name(&digest)?;
            let size = desc.size();
            let me = OciLayout::new(self.root.clone(), None);
            tokio::task::spawn_blocking(move || me.blob_verifies(&digest, Some(size)))
                .await
                .map_err(|e| Error::Image(format!("blob check thread failed: {e}")))
        })
    }

    fn write_blob<'a>(
        &'a self,
        media_type: &'a str,
        size_hint: Option<u64>,
        data: &'a mut (dyn AsyncRead + Send + Unpin),
    ) -> BoxFuture<'a, Result<(String, u64), Error>> {
        Box::pin(async move {
            let (tx, rx) = pipeline::chunk_channel(pipeline::DEPTH, ChunkPool::standard());
            let pump = pipeline::pump(data, tx);
            let ((), res) = tokio::join!(pump, self.write_blob_chunks(media_type, size_hint, rx));
            res
        })
    }

    fn write_blob_chunks<'a>(
        &'a self,
        _media_type: &'a str,
        _size_hint: Option<u64>,
        mut data: ChunkReceiver,
    ) -> BoxFuture<'a, Result<(String, u64), Error>> {
        Box::pin(async move {
            let dir = self.blob_dir("sha256")?;
            let tmp = self.new_temp(&dir)?;
            let tmp_path = tmp.path().to_owned();
            let forget_tmp = || self.temps.lock().expect("lock").retain(|p| p != &tmp_path);
            // Hash and write on a blocking thread, straight from the chunks.
            let written = tokio::task::spawn_blocking(move || -> Result<_, Error> {
                let mut tmp = tmp;
                let mut hasher = Sha256::new();
                let mut len = 0u64;
                while let Some(chunk) = data.blocking_recv() {
                    // An error (or a truncated stream) drops `tmp`, which removes the file.
                    let chunk = chunk.map_err(Error::from_stream)?;
                    tmp.as_file_mut().write_all(&chunk)?;
                    hasher.update(&chunk);
                    len += chunk.len() as u64;
                    data.recycle(chunk);
                }
                tmp.as_file().sync_all()?;
                Ok((tmp, format_sha256(hasher), len))
            })
            .await
            .map_err(|e| Error::Image(format!("blob writer thread failed: {e}")));
            forget_tmp();
            let (tmp, digest, len) = written??;
            self.publish(tmp, &dir, &digest, len).await?;
            Ok((digest, len))
        })
    }

    fn copy_unchanged<'a>(
        &'a self,
        src: &'a dyn ImageSource,
        desc: &'a Descriptor,
    ) -> BoxFuture<'a, Result<Option<Transfer>, Error>> {
        Box::pin(async move {
            let Some(file) = src.blob_file(desc).await? else {
                return Ok(None);
            };
            let dir = self.blob_dir("sha256")?;
            let tmp = self.new_temp(&dir)?;
            let tmp_path = tmp.path().to_owned();
            let digest = desc.digest().to_string();
            let size = desc.size();
            let what = format!("blob {digest} copied from {}", src.describe());
            let d = digest.clone();
            let copied = tokio::task::spawn_blocking(move || kernel_copy(&file, tmp, size, &d, &what))
                .await
                .map_err(|e| Error::Image(format!("blob copy thread failed: {e}")));
            self.temps.lock().expect("lock").retain(|p| p != &tmp_path);
            let Some((tmp, how)) = copied?? else {
                return Ok(None);
            };
            self.publish(tmp, &dir, &digest, size).await?;
            Ok(Some(how))
        })
    }

    fn write_manifest<'a>(
        &'a self,
        bytes: &'a [u8],
        _media_type: &'a str,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move { self.put_bytes(bytes).map(|_| ()) })
    }

    fn set_root<'a>(&'a self, desc: &'a Descriptor, bytes: &'a [u8]) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            self.put_bytes(bytes)?;
            self.set_ref(self.tag.as_deref(), desc)?;
            self.created.lock().expect("lock").clear();
            *self.skeleton.lock().expect("lock") = None;
            Ok(())
        })
    }

    fn abort(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let (temps, created) = {
                let mut temps = self.temps.lock().expect("lock");
                let mut created = self.created.lock().expect("lock");
                self.aborted.store(true, Ordering::SeqCst);
                (std::mem::take(&mut *temps), std::mem::take(&mut *created))
            };
            for p in temps.into_iter().chain(created) {
                let _ = fs::remove_file(p);
            }
            if let Some(made_root) = self.skeleton.lock().expect("lock").take() {
                let untouched = self.index().map(|i| i.manifests().is_empty()).unwrap_or(false);
                if untouched {
                    let _ = fs::remove_file(self.root.join("index.json"));
                    let _ = fs::remove_file(self.root.join("oci-layout"));
                    let _ = fs::remove_dir(self.root.join("blobs").join("sha256"));
                    let _ = fs::remove_dir(self.root.join("blobs"));
                    if made_root {
                        let _ = fs::remove_dir(&self.root);
                    }
                }
            }
        })
    }
}

/// Copies `size` bytes of `src` into `tmp` inside the kernel: a reflink (`FICLONE`: the
/// filesystem shares the extents, copy-on-write, so a later write to either file leaves the
/// other as it was) where the filesystem supports it, else `copy_file_range` (no copy through
/// user space). Then reads the copy once to verify it against `digest`: the source layout is
/// hostile input, and what is published is what was verified. `None` when the kernel cannot
/// copy between these files (another filesystem, an old kernel): the caller streams the blob.
fn kernel_copy(
    src: &fs::File,
    tmp: tempfile::NamedTempFile,
    size: u64,
    digest: &str,
    what: &str,
) -> Result<Option<(tempfile::NamedTempFile, Transfer)>, Error> {
    use rustix::io::Errno;
    let how = if rustix::fs::ioctl_ficlone(tmp.as_file(), src).is_ok() {
        Transfer::Reflink
    } else {
        let (mut off_in, mut off_out) = (0u64, 0u64);
        while off_out < size {
            let want = usize::try_from((size - off_out).min(1 << 30)).unwrap_or(1 << 30);
            match rustix::fs::copy_file_range(src, Some(&mut off_in), tmp.as_file(), Some(&mut off_out), want)
            {
                Ok(0) => break, // the source is shorter than declared: caught below
                Ok(_) => {}
                Err(Errno::INTR) => {}
                Err(
                    Errno::XDEV | Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP | Errno::BADF | Errno::PERM,
                ) if off_out == 0 => {
                    return Ok(None);
                }
                Err(e) => return Err(Error::Io(io::Error::from(e))),
            }
        }
        Transfer::KernelCopy
    };
    let mismatch = |actual: String| Error::DigestMismatch {
        what: what.to_owned(),
        expected: format!("{digest} ({size} bytes)"),
        actual,
    };
    let mut copy = tmp.reopen()?;
    let len = copy.metadata()?.len();
    if len != size {
        return Err(mismatch(format!("a file of {len} bytes")));
    }
    let mut hasher = Sha256::new();
    io::copy(&mut (&mut copy).take(size), &mut hasher)?;
    let actual = format_sha256(hasher);
    if actual != digest {
        return Err(mismatch(actual));
    }
    tmp.as_file().sync_all()?;
    Ok(Some((tmp, how)))
}

impl OciLayout {
    /// A new temporary file in the blob directory `dir`, registered for `abort`. Named with our
    /// pid, so a later write can tell a temporary left by a killed run from one a running writer
    /// owns; created 0666 less the umask, as skopeo's blobs are.
    fn new_temp(&self, dir: &Path) -> Result<tempfile::NamedTempFile, Error> {
        let mut temps = self.temps.lock().expect("lock");
        if self.aborted.load(Ordering::SeqCst) {
            return Err(aborted());
        }
        let tmp = tempfile::Builder::new()
            .prefix(&format!("{TMP_PREFIX}{}-", std::process::id()))
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
            .tempfile_in(dir)?;
        temps.push(tmp.path().to_owned());
        Ok(tmp)
    }

    /// Moves a complete, verified, synced temporary file into place as blob `digest`, unless an
    /// identical blob is there already.
    async fn publish(
        &self,
        tmp: tempfile::NamedTempFile,
        dir: &Path,
        digest: &str,
        len: u64,
    ) -> Result<(), Error> {
        let dest = self.blob_path(digest)?;
        let existed = fs::symlink_metadata(&dest).is_ok();
        let keep = existed && {
            let me = OciLayout::new(self.root.clone(), None);
            let d = digest.to_owned();
            tokio::task::spawn_blocking(move || me.blob_verifies(&d, Some(len)))
                .await
                .unwrap_or(false)
        };
        if keep {
            drop(tmp);
        } else {
            // Absent, or present with the wrong bytes (or as a link, which the rename
            // replaces rather than writes through).
            let mut created = self.created.lock().expect("lock");
            if self.aborted.load(Ordering::SeqCst) {
                return Err(aborted());
            }
            tmp.persist(&dest).map_err(|e| Error::Io(e.error))?;
            crate::fsutil::sync_dir(dir);
            if !existed {
                created.push(dest);
            }
        }
        Ok(())
    }
}

/// The error of a write that arrives after [`ImageDest::abort`].
fn aborted() -> Error {
    Error::Image("the destination was aborted; nothing more is written to it".into())
}

/// Builds a descriptor.
pub fn descriptor(media_type: &str, digest: &str, size: u64) -> Result<Descriptor, Error> {
    let d: oci_spec::image::Digest = digest
        .parse()
        .map_err(|e| Error::Image(format!("malformed digest {digest:?}: {e}")))?;
    Ok(Descriptor::new(MediaType::from(media_type), size, d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::digest::sha256_digest;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn hostile_layouts_are_refused_and_wrong_blobs_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let l = OciLayout::open_or_create(dir.path().join("l"), Some("t")).unwrap();
        let data = b"{\"config\":1}".to_vec();
        let digest = sha256_digest(&data);
        let desc = descriptor("application/json", &digest, data.len() as u64).unwrap();
        let path = l.blob_path(&digest).unwrap();

        // A wrong blob under the digest is not reused: has_blob says no, put_bytes rewrites it.
        fs::write(&path, b"{\"config\":2}").unwrap();
        assert!(!l.has_blob(&desc).await.unwrap());
        l.put_bytes(&data).unwrap();
        assert!(l.has_blob(&desc).await.unwrap());
        assert_eq!(l.get_bytes(&desc).unwrap(), data);

        // A sparse file far larger than its descriptor is refused before it is read.
        fs::File::create(&path).unwrap().set_len(8 << 30).unwrap();
        let e = l.get_bytes(&desc).unwrap_err();
        assert!(e.to_string().contains("a file of 8589934592 bytes"), "{e}");

        // A symbolic link (to /dev/zero) and a FIFO are refused, not read.
        fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &path).unwrap();
        let e = l
            .open_blob(&desc)
            .await
            .err()
            .expect("a symlinked blob is refused");
        assert!(e.to_string().contains("symbolic link"), "{e}");
        fs::remove_file(&path).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &path,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let e = l.get_bytes(&desc).unwrap_err();
        assert!(e.to_string().contains("FIFO"), "{e}");
        fs::remove_file(&path).unwrap();

        // A destination whose blob directory is a link is not written through.
        let elsewhere = dir.path().join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        fs::remove_dir_all(dir.path().join("l/blobs")).unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.path().join("l/blobs")).unwrap();
        let e = l.put_bytes(&data).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        let mut r = &data[..];
        assert!(l.write_blob("x", None, &mut r).await.is_err());
        assert_eq!(
            fs::read_dir(&elsewhere).unwrap().count(),
            0,
            "nothing written through the link"
        );
    }

    fn blob_files(l: &OciLayout) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(l.path().join("blobs/sha256"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn chunked_blobs_round_trip_verified() {
        let dir = tempfile::tempdir().unwrap();
        let l = OciLayout::open_or_create(dir.path().join("l"), Some("t")).unwrap();
        let data: Vec<u8> = (0..(3 * pipeline::CHUNK + 17) as u32)
            .map(|i| (i * 7 % 256) as u8)
            .collect();
        let mut r = &data[..];
        let (digest, len) = l
            .write_blob("application/octet-stream", None, &mut r)
            .await
            .unwrap();
        assert_eq!(digest, sha256_digest(&data));
        assert_eq!(len, data.len() as u64);
        let desc = descriptor("application/octet-stream", &digest, len).unwrap();
        let mut back = Vec::new();
        l.open_blob(&desc)
            .await
            .unwrap()
            .read_to_end(&mut back)
            .await
            .unwrap();
        assert_eq!(back, data);
    }

    #[tokio::test]
    async fn a_tampered_blob_fails_at_the_end_and_a_failed_write_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let l = OciLayout::open_or_create(dir.path().join("l"), Some("t")).unwrap();
        let data = vec![5u8; pipeline::CHUNK + 3];
        let digest = l.put_bytes(&data).unwrap();
        let desc = descriptor("application/octet-stream", &digest, data.len() as u64).unwrap();
        let mut tampered = data.clone();
        tampered[pipeline::CHUNK] ^= 1;
        fs::write(l.blob_path(&digest).unwrap(), &tampered).unwrap();
        let before = blob_files(&l);

        // Copying the tampered blob through the chunked path publishes nothing.
        let chunks = l.open_blob_chunks(&desc, ChunkPool::standard()).await.unwrap();
        let e = l.write_blob_chunks("x", None, chunks).await.unwrap_err();
        assert!(matches!(e, Error::DigestMismatch { .. }), "{e:?}");
        assert_eq!(blob_files(&l), before, "no blob and no temporary file left");

        // A wrong size is caught too, also when the blob is longer than declared.
        fs::write(l.blob_path(&digest).unwrap(), &data).unwrap();
        let short = descriptor("application/octet-stream", &digest, data.len() as u64 - 1).unwrap();
        // (refused when opened: the file's size is not the declared one)
        let Err(e) = l.open_blob(&short).await else {
            panic!("a blob of the wrong size opens")
        };
        assert!(matches!(e, Error::DigestMismatch { .. }), "{e:?}");

        // A stream whose producer vanishes without its end marker is not published.
        let (tx, rx) = pipeline::chunk_channel(2, ChunkPool::standard());
        tx.send(vec![1; 100]).await.unwrap();
        drop(tx);
        assert!(l.write_blob_chunks("x", None, rx).await.is_err());
        assert_eq!(blob_files(&l), before);
    }

    #[tokio::test]
    async fn unchanged_blobs_are_copied_in_the_kernel_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let src = OciLayout::open_or_create(dir.path().join("src"), Some("t")).unwrap();
        let dst = OciLayout::open_or_create(dir.path().join("dst"), Some("t")).unwrap();
        let data: Vec<u8> = (0..3 * pipeline::CHUNK + 7).map(|i| (i % 251) as u8).collect();
        let digest = src.put_bytes(&data).unwrap();
        let desc = descriptor("application/octet-stream", &digest, data.len() as u64).unwrap();

        // A tampered source (same size, one bit flipped) is copied, found wrong, not published.
        let mut tampered = data.clone();
        tampered[pipeline::CHUNK + 1] ^= 1;
        fs::write(src.blob_path(&digest).unwrap(), &tampered).unwrap();
        let e = dst.copy_unchanged(&src, &desc).await.unwrap_err();
        assert!(matches!(e, Error::DigestMismatch { .. }), "{e:?}");
        assert!(blob_files(&dst).is_empty(), "{:?}", blob_files(&dst));

        // The right bytes: copied by the kernel (a reflink or copy_file_range), identical.
        fs::write(src.blob_path(&digest).unwrap(), &data).unwrap();
        let how = dst.copy_unchanged(&src, &desc).await.unwrap();
        assert!(
            matches!(how, Some(Transfer::Reflink | Transfer::KernelCopy)),
            "{how:?}"
        );
        assert_eq!(fs::read(dst.blob_path(&digest).unwrap()).unwrap(), data);
        assert_eq!(
            blob_files(&dst),
            vec![digest.trim_start_matches("sha256:").to_owned()]
        );

        // The copy is a file of its own: rewriting the source in place leaves it as it was.
        fs::write(src.blob_path(&digest).unwrap(), &tampered).unwrap();
        assert_eq!(fs::read(dst.blob_path(&digest).unwrap()).unwrap(), data);
    }
}

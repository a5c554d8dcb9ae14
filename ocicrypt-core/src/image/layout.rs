//! The OCI image layout store (`oci:PATH[:TAG]` in skopeo's words).
//!
//! Blobs live in `blobs/sha256/<hex>`; `index.json` lists the images, named by the
//! `org.opencontainers.image.ref.name` annotation. Every blob is written to a temporary file in
//! the blob directory, synced and renamed into place once complete and verified; `index.json` is
//! replaced atomically. Every read is verified against the digest that names it.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use oci_spec::image::{Descriptor, ImageIndex, MediaType};
use tokio::io::{AsyncRead, AsyncWriteExt};

use super::digest::{verify_bytes, HashingReader, VerifyReader};
use super::{canonical_json, BlobReader, ImageDest, ImageSource};
use crate::keywrap::BoxFuture;
use crate::Error;

/// The annotation that names an image in `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
const OCI_LAYOUT_CONTENT: &str = r#"{"imageLayoutVersion":"1.0.0"}"#;

/// An OCI image layout directory, optionally with the tag an operation reads or writes.
#[derive(Debug)]
pub struct OciLayout {
    root: PathBuf,
    tag: Option<String>,
    created: Mutex<Vec<PathBuf>>,
    index_lock: Mutex<()>,
    /// What `open_or_create` made (the layout skeleton, and whether the directory itself),
    /// removed again by `abort` so a failed operation leaves nothing behind.
    skeleton: Mutex<Option<bool>>,
}

impl OciLayout {
    /// Opens an existing layout.
    ///
    /// # Errors
    /// [`Error::Image`] when `root` is not an OCI layout (no `oci-layout` or `index.json`).
    pub fn open(root: impl Into<PathBuf>, tag: Option<&str>) -> Result<Self, Error> {
        let root = root.into();
        if !root.join("oci-layout").is_file() || !root.join("index.json").is_file() {
            return Err(Error::Image(format!(
                "{} is not an OCI image layout (no oci-layout or index.json file); check the path",
                root.display()
            )));
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
            fs::create_dir_all(root.join("blobs").join("sha256"))?;
            crate::fsutil::write_bytes_atomic(&root.join("oci-layout"), OCI_LAYOUT_CONTENT.as_bytes())?;
            crate::fsutil::write_bytes_atomic(&root.join("index.json"), br#"{"schemaVersion":2,"manifests":[]}"#)?;
        }
        let layout = Self::open(root, tag)?;
        if empty {
            *layout.skeleton.lock().expect("lock") = Some(!existed);
        }
        Ok(layout)
    }

    fn new(root: PathBuf, tag: Option<&str>) -> Self {
        Self {
            root,
            tag: tag.map(str::to_owned),
            created: Mutex::new(Vec::new()),
            index_lock: Mutex::new(()),
            skeleton: Mutex::new(None),
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
        Ok(self.root.join("blobs").join(alg).join(hex))
    }

    /// Reads and parses `index.json`.
    ///
    /// # Errors
    /// [`Error::Io`], or [`Error::Image`] when it does not parse.
    pub fn index(&self) -> Result<ImageIndex, Error> {
        let bytes = fs::read(self.root.join("index.json"))?;
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
                .find(|d| d.annotations().as_ref().and_then(|a| a.get(REF_NAME)).map(String::as_str) == Some(t))
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
        crate::fsutil::write_bytes_atomic(&self.root.join("index.json"), &bytes)
    }

    /// Writes a small blob (manifest, config) from memory.
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<String, Error> {
        let digest = super::digest::sha256_digest(bytes);
        let path = self.blob_path(&digest)?;
        if !path.exists() {
            fs::create_dir_all(path.parent().expect("blob dir"))?;
            crate::fsutil::write_bytes_atomic(&path, bytes)?;
            self.created.lock().expect("lock").push(path);
        }
        Ok(digest)
    }

    /// Reads a small blob whole, verified.
    ///
    /// # Errors
    /// [`Error::Io`] (with the path) or [`Error::DigestMismatch`].
    pub fn get_bytes(&self, desc: &Descriptor) -> Result<Vec<u8>, Error> {
        let digest = desc.digest().to_string();
        let path = self.blob_path(&digest)?;
        let bytes = fs::read(&path).map_err(|e| {
            Error::Image(format!("cannot read blob {digest} at {}: {e}", path.display()))
        })?;
        verify_bytes(&format!("blob {digest} in {}", self.root.display()), &bytes, &digest, desc.size())?;
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
            let digest = desc.digest().to_string();
            let path = self.blob_path(&digest)?;
            let file = tokio::fs::File::open(&path).await.map_err(|e| {
                Error::Image(format!("cannot open blob {digest} at {}: {e}", path.display()))
            })?;
            let file = tokio::io::BufReader::with_capacity(1 << 20, file);
            let r = VerifyReader::new(file, &digest, desc.size(), format!("blob {digest} in {}", self.root.display()))?;
            Ok(Box::pin(r) as BlobReader)
        })
    }
}

impl ImageDest for OciLayout {
    fn describe(&self) -> String {
        ImageSource::describe(self)
    }

    fn has_blob<'a>(&'a self, desc: &'a Descriptor) -> BoxFuture<'a, Result<bool, Error>> {
        Box::pin(async move { Ok(self.blob_path(desc.digest().as_ref())?.is_file()) })
    }

    fn write_blob<'a>(
        &'a self,
        _media_type: &'a str,
        _size_hint: Option<u64>,
        data: &'a mut (dyn AsyncRead + Send + Unpin),
    ) -> BoxFuture<'a, Result<(String, u64), Error>> {
        Box::pin(async move {
            let dir = self.root.join("blobs").join("sha256");
            tokio::fs::create_dir_all(&dir).await?;
            let tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(&dir)?;
            let (std_file, tmp_path) = tmp.into_parts();
            let mut file = tokio::io::BufWriter::with_capacity(1 << 20, tokio::fs::File::from_std(std_file));
            let mut hashing = HashingReader::new(data);
            let copied = tokio::io::copy(&mut hashing, &mut file).await;
            if let Err(e) = copied {
                drop(file);
                drop(tmp_path); // removes the temporary file
                return Err(Error::from_stream(e));
            }
            file.flush().await?;
            let file = file.into_inner();
            file.sync_all().await?;
            drop(file);
            let (digest, len) = hashing.finish();
            let dest = self.blob_path(&digest)?;
            if dest.exists() {
                drop(tmp_path);
            } else {
                tmp_path.persist(&dest).map_err(|e| Error::Io(e.error))?;
                crate::fsutil::sync_dir(&dir);
                self.created.lock().expect("lock").push(dest);
            }
            Ok((digest, len))
        })
    }

    fn write_manifest<'a>(&'a self, bytes: &'a [u8], _media_type: &'a str) -> BoxFuture<'a, Result<(), Error>> {
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
            let created = std::mem::take(&mut *self.created.lock().expect("lock"));
            for p in created {
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

/// Builds a descriptor.
pub fn descriptor(media_type: &str, digest: &str, size: u64) -> Result<Descriptor, Error> {
    let d: oci_spec::image::Digest = digest
        .parse()
        .map_err(|e| Error::Image(format!("malformed digest {digest:?}: {e}")))?;
    Ok(Descriptor::new(MediaType::from(media_type), size, d))
}

//! Image archives: `oci-archive:` (a tar of an OCI image layout) and `docker-archive:` (the
//! `docker save` format, legacy `manifest.json` and the OCI-style layout newer Docker writes).
//!
//! * **Reading** does not unpack: the tar's headers are read once (the data skipped), each
//!   member's offset and size recorded, and blobs are then streamed straight from the archive
//!   file through a digest-verifying reader. Members are untrusted: a path that is absolute or
//!   climbs out with `..`, a link (symbolic or hard), a device or a duplicate name is refused;
//!   sizes and digests are checked against the descriptors on every read. A legacy
//!   `docker save` archive has no digests for its layers: they are hashed once when the archive
//!   is opened and an OCI manifest is made from them (media types from the data's magic bytes).
//! * **Writing** goes into an OCI layout in a temporary directory next to the destination
//!   (encrypted layer sizes are known only after encryption, and a tar header needs them first),
//!   then the tar is written to a temporary file, synced and renamed over the destination.
//!   Files take the process umask (0644 under umask 022), as skopeo's do.
//! * `docker-archive:` as a destination holds one unencrypted image for `docker load`: an
//!   encrypted layer is refused (Docker cannot decrypt it; use `oci-archive:`), as is a
//!   multi-platform index (pick one with `--platform`).

use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use oci_spec::image::Descriptor;
use ocicrypt_core::image::digest::{sha256_digest, verify_bytes, VerifyReader};
use ocicrypt_core::image::layout::{descriptor, OciLayout};
use ocicrypt_core::image::{BlobReader, ImageDest, ImageSource};
use ocicrypt_core::keywrap::BoxFuture;
use ocicrypt_core::mediatype as mt;
use ocicrypt_core::Error;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt};

/// Largest manifest, index or config read into memory.
const MAX_SMALL: u64 = 32 << 20;
/// Most members an archive may have.
const MAX_MEMBERS: usize = 1_000_000;
/// The annotation naming an image in `index.json`.
const REF_NAME: &str = "org.opencontainers.image.ref.name";

fn bad(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::Image(format!("archive {}: {what}", path.display()))
}

/// `docker.io/library/x:t`, `docker.io/x:t`, `library/x:t` and `x:t` name the same image.
fn same_name(a: &str, b: &str) -> bool {
    fn norm(s: &str) -> &str {
        let s = s.strip_prefix("docker.io/").unwrap_or(s);
        s.strip_prefix("library/").unwrap_or(s)
    }
    norm(a) == norm(b)
}

/// A member's place in the archive file.
#[derive(Debug, Clone, Copy)]
struct Member {
    offset: u64,
    size: u64,
}

/// Normalizes a member name (`./blobs/sha256/x` → `blobs/sha256/x`); refuses absolute paths
/// and `..`.
fn member_name(raw: &Path) -> Option<String> {
    let mut parts = Vec::new();
    for c in raw.components() {
        match c {
            Component::Normal(p) => parts.push(p.to_str()?.to_owned()),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(parts.join("/"))
}

/// An archive's regular files and the names of its links (never followed).
type Toc = (HashMap<String, Member>, HashSet<String>);

/// Reads the archive's table of contents: regular files, names checked; links are only noted
/// (skopeo's docker-archives carry `ID/layer.tar` symlinks nobody needs to follow).
fn scan(path: &Path) -> Result<Toc, Error> {
    let file = std::fs::File::open(path).map_err(|e| bad(path, format!("cannot open: {e}")))?;
    let mut archive = tar::Archive::new(file);
    let mut members = HashMap::new();
    let mut links = HashSet::new();
    let entries = archive
        .entries_with_seek()
        .map_err(|e| bad(path, format!("not a tar archive: {e}")))?;
    for entry in entries {
        let entry = entry.map_err(|e| bad(path, format!("not a valid tar archive: {e}")))?;
        let raw = entry
            .path()
            .map_err(|e| bad(path, format!("a member name is not valid: {e}")))?
            .into_owned();
        let shown = ocicrypt_core::redact::token(&raw.to_string_lossy()).into_owned();
        let name = member_name(&raw).ok_or_else(|| {
            bad(
                path,
                format!("member {shown:?} is absolute or climbs out with '..': refused"),
            )
        })?;
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            continue;
        }
        if kind.is_symlink() || kind.is_hard_link() {
            links.insert(name);
            continue;
        }
        if !kind.is_file() {
            // PAX and GNU long-name headers are consumed by the tar crate; anything else
            // (devices, fifos) has no place in an image archive.
            return Err(bad(
                path,
                format!("member {shown:?} is not a regular file ({kind:?}): refused"),
            ));
        }
        let m = Member {
            offset: entry.raw_file_position(),
            size: entry.size(),
        };
        if members.insert(name, m).is_some() {
            return Err(bad(path, format!("member {shown:?} appears twice: refused")));
        }
        if members.len() > MAX_MEMBERS {
            return Err(bad(path, format!("more than {MAX_MEMBERS} members")));
        }
    }
    Ok((members, links))
}

/// Reads an image from an `oci-archive:` or `docker-archive:` file without unpacking it.
#[derive(Debug)]
pub struct ArchiveSource {
    path: PathBuf,
    describe: String,
    members: HashMap<String, Member>,
    links: HashSet<String>,
    /// Blobs made up in memory (the manifest of a legacy `docker save` archive).
    synthetic: HashMap<String, Vec<u8>>,
    /// Legacy layers: digest → member name.
    by_digest: HashMap<String, String>,
    root: Descriptor,
}

impl ArchiveSource {
    /// Opens `oci-archive:PATH[:TAG]`.
    ///
    /// # Errors
    /// [`Error::Image`] for a file that is not a valid archive or has no such image.
    pub fn open_oci(path: &Path, tag: Option<&str>) -> Result<Self, Error> {
        let (members, links) = scan(path)?;
        let describe = match tag {
            Some(t) => format!("oci-archive:{}:{t}", path.display()),
            None => format!("oci-archive:{}", path.display()),
        };
        let mut s = Self {
            path: path.to_owned(),
            describe,
            members,
            links,
            synthetic: HashMap::new(),
            by_digest: HashMap::new(),
            root: descriptor(mt::OCI_INDEX, &sha256_digest(b""), 0)?,
        };
        if !s.members.contains_key("index.json") && !s.links.contains("index.json") {
            return Err(bad(path, "no index.json: not an OCI image layout archive"));
        }
        s.root = s.resolve_index(tag)?;
        Ok(s)
    }

    /// Opens `docker-archive:PATH[:NAME:TAG]` (legacy or OCI-style `docker save` output).
    ///
    /// # Errors
    /// [`Error::Image`] for a file that is not a valid archive or has no such image.
    pub fn open_docker(path: &Path, name: Option<&str>) -> Result<Self, Error> {
        let (members, links) = scan(path)?;
        let describe = match name {
            Some(n) => format!("docker-archive:{}:{n}", path.display()),
            None => format!("docker-archive:{}", path.display()),
        };
        let mut s = Self {
            path: path.to_owned(),
            describe,
            members,
            links,
            synthetic: HashMap::new(),
            by_digest: HashMap::new(),
            root: descriptor(mt::OCI_INDEX, &sha256_digest(b""), 0)?,
        };
        let manifest = s.read_member("manifest.json", MAX_SMALL)?;
        let entries: Vec<serde_json::Value> = serde_json::from_slice(&manifest)
            .map_err(|e| bad(path, format!("manifest.json is not a docker save manifest: {e}")))?;
        let entry = match name {
            Some(n) => entries.iter().find(|e| {
                e.get("RepoTags")
                    .and_then(|t| t.as_array())
                    .is_some_and(|t| t.iter().filter_map(|x| x.as_str()).any(|x| same_name(x, n)))
            }),
            None if entries.len() == 1 => entries.first(),
            None => {
                return Err(bad(
                    path,
                    format!(
                        "holds {} images: name one as docker-archive:PATH:NAME:TAG",
                        entries.len()
                    ),
                ))
            }
        }
        .ok_or_else(|| bad(path, "no image with that NAME:TAG in manifest.json"))?;
        let str_field = |k: &str| entry.get(k).and_then(|v| v.as_str()).map(str::to_owned);
        let config = str_field("Config").ok_or_else(|| bad(path, "manifest.json has no Config"))?;
        let layers: Vec<String> = entry
            .get("Layers")
            .and_then(|l| l.as_array())
            .ok_or_else(|| bad(path, "manifest.json has no Layers"))?
            .iter()
            .map(|l| {
                l.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| bad(path, "a layer entry is not a string"))
            })
            .collect::<Result<_, _>>()?;
        let config_bytes = s.read_member(&config, MAX_SMALL)?;
        let config_digest = sha256_digest(&config_bytes);
        s.synthetic.insert(config_digest.clone(), config_bytes.clone());
        let mut layer_descs = Vec::new();
        for l in &layers {
            let (digest, size, media) = s.hash_member(l)?;
            s.by_digest.insert(digest.clone(), l.clone());
            layer_descs.push(serde_json::json!({"mediaType": media, "digest": digest, "size": size}));
        }
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": mt::OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_bytes.len()},
            "layers": layer_descs,
        });
        let bytes = ocicrypt_core::image::canonical_json(&manifest)?;
        let digest = sha256_digest(&bytes);
        s.root = descriptor(mt::OCI_MANIFEST, &digest, bytes.len() as u64)?;
        s.synthetic.insert(digest, bytes);
        Ok(s)
    }

    fn member(&self, name: &str) -> Result<Member, Error> {
        let n =
            member_name(Path::new(name)).ok_or_else(|| bad(&self.path, "a member reference climbs out"))?;
        if self.links.contains(&n) {
            return Err(bad(
                &self.path,
                format!(
                    "member {:?} is a link: links in archives are not followed (refused)",
                    ocicrypt_core::redact::token(name)
                ),
            ));
        }
        self.members.get(&n).copied().ok_or_else(|| {
            bad(
                &self.path,
                format!("has no member {:?}", ocicrypt_core::redact::token(name)),
            )
        })
    }

    fn read_member(&self, name: &str, max: u64) -> Result<Vec<u8>, Error> {
        let m = self.member(name)?;
        if m.size > max {
            return Err(bad(
                &self.path,
                format!("member {name} is larger than {max} bytes"),
            ));
        }
        let mut f = std::fs::File::open(&self.path)?;
        f.seek(SeekFrom::Start(m.offset))?;
        let mut buf = Vec::with_capacity(m.size as usize);
        f.take(m.size).read_to_end(&mut buf)?;
        if buf.len() as u64 != m.size {
            return Err(bad(&self.path, format!("member {name} is truncated")));
        }
        Ok(buf)
    }

    /// sha256, size and OCI media type (from the magic bytes) of a legacy layer member.
    fn hash_member(&self, name: &str) -> Result<(String, u64, &'static str), Error> {
        let m = self.member(name)?;
        let mut f = std::fs::File::open(&self.path)?;
        f.seek(SeekFrom::Start(m.offset))?;
        let mut r = f.take(m.size);
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut head = Vec::new();
        let mut total = 0u64;
        loop {
            let n = r.read(&mut buf)?;
            if n == 0 {
                break;
            }
            if head.len() < 4 {
                head.extend_from_slice(&buf[..n.min(4 - head.len())]);
            }
            h.update(&buf[..n]);
            total += n as u64;
        }
        if total != m.size {
            return Err(bad(&self.path, format!("member {name} is truncated")));
        }
        let media = if head.starts_with(&[0x1f, 0x8b]) {
            mt::OCI_LAYER_TAR_GZIP
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            mt::OCI_LAYER_TAR_ZSTD
        } else {
            mt::OCI_LAYER_TAR
        };
        Ok((ocicrypt_core::image::digest::format_sha256(h), total, media))
    }

    fn resolve_index(&self, tag: Option<&str>) -> Result<Descriptor, Error> {
        let bytes = self.read_member("index.json", MAX_SMALL)?;
        let index: oci_spec::image::ImageIndex = serde_json::from_slice(&bytes)
            .map_err(|e| bad(&self.path, format!("index.json is not an OCI index: {e}")))?;
        let m = index.manifests();
        let named = |d: &&Descriptor| {
            d.annotations()
                .as_ref()
                .and_then(|a| a.get(REF_NAME))
                .map(String::as_str)
                == tag
        };
        match tag {
            Some(t) => m
                .iter()
                .find(named)
                .cloned()
                .ok_or_else(|| bad(&self.path, format!("no image tagged {t:?} in index.json"))),
            None if m.len() == 1 => Ok(m[0].clone()),
            None => Err(bad(
                &self.path,
                format!("holds {} images: name one as oci-archive:PATH:TAG", m.len()),
            )),
        }
    }

    fn blob_member(&self, digest: &str) -> Result<Member, Error> {
        if let Some(name) = self.by_digest.get(digest) {
            return self.member(name);
        }
        let hex = digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()))
            .ok_or_else(|| bad(&self.path, "only sha256 digests are supported"))?;
        self.member(&format!("blobs/sha256/{hex}"))
    }
}

impl ImageSource for ArchiveSource {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn root(&self) -> BoxFuture<'_, Result<Descriptor, Error>> {
        Box::pin(async move { Ok(self.root.clone()) })
    }

    fn read_small<'a>(&'a self, desc: &'a Descriptor) -> BoxFuture<'a, Result<Vec<u8>, Error>> {
        Box::pin(async move {
            let digest = desc.digest().to_string();
            let what = format!("{digest} in {}", self.describe);
            if let Some(b) = self.synthetic.get(&digest) {
                verify_bytes(&what, b, &digest, desc.size())?;
                return Ok(b.clone());
            }
            if desc.size() > MAX_SMALL {
                return Err(bad(
                    &self.path,
                    format!("{digest} is larger than {MAX_SMALL} bytes"),
                ));
            }
            let m = self.blob_member(&digest)?;
            if m.size != desc.size() {
                return Err(Error::DigestMismatch {
                    what,
                    expected: format!("{} bytes", desc.size()),
                    actual: format!("{} bytes", m.size),
                });
            }
            let mut f = tokio::fs::File::open(&self.path).await?;
            f.seek(SeekFrom::Start(m.offset)).await?;
            let mut buf = Vec::with_capacity(m.size as usize);
            f.take(m.size).read_to_end(&mut buf).await?;
            verify_bytes(&what, &buf, &digest, desc.size())?;
            Ok(buf)
        })
    }

    fn open_blob<'a>(&'a self, desc: &'a Descriptor) -> BoxFuture<'a, Result<BlobReader, Error>> {
        Box::pin(async move {
            let digest = desc.digest().to_string();
            if let Some(b) = self.synthetic.get(&digest) {
                let r = std::io::Cursor::new(b.clone());
                let r = VerifyReader::new(
                    r,
                    &digest,
                    desc.size(),
                    format!("blob {digest} in {}", self.describe),
                )?;
                return Ok(Box::pin(r) as BlobReader);
            }
            let m = self.blob_member(&digest)?;
            let mut f = tokio::fs::File::open(&self.path).await?;
            f.seek(SeekFrom::Start(m.offset)).await?;
            // At most the member's bytes; the verifier fails on a size or digest mismatch.
            let r = f.take(m.size);
            let r = VerifyReader::new(
                r,
                &digest,
                desc.size(),
                format!("blob {digest} in {}", self.describe),
            )?;
            Ok(Box::pin(r) as BlobReader)
        })
    }
}

/// Which archive a writer makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArchiveKind {
    /// `oci-archive:PATH[:TAG]`.
    Oci {
        /// The tag in `index.json`.
        tag: Option<String>,
    },
    /// `docker-archive:PATH[:NAME:TAG]`.
    Docker {
        /// `NAME:TAG` for `RepoTags`.
        name: Option<String>,
    },
}

/// Writes an image to an archive file: into a temporary OCI layout, then tarred, synced and
/// renamed over the destination when the image is complete.
#[derive(Debug)]
pub struct ArchiveDest {
    path: PathBuf,
    kind: ArchiveKind,
    describe: String,
    staging: tempfile::TempDir,
    layout: OciLayout,
}

impl ArchiveDest {
    /// Prepares to write `path`.
    ///
    /// # Errors
    /// [`Error::Io`] when the staging directory cannot be made next to `path`.
    pub fn create(path: &Path, kind: ArchiveKind) -> Result<Self, Error> {
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        let staging = tempfile::Builder::new()
            .prefix(".tmp-imgcrypt-archive-")
            .tempdir_in(&parent)
            .map_err(|e| {
                bad(
                    path,
                    format!("cannot make a staging directory in {}: {e}", parent.display()),
                )
            })?;
        let tag = match &kind {
            ArchiveKind::Oci { tag } => tag.clone(),
            ArchiveKind::Docker { .. } => None,
        };
        let layout = OciLayout::open_or_create(staging.path().join("layout"), tag.as_deref())?;
        let describe = match &kind {
            ArchiveKind::Oci { tag: Some(t) } => format!("oci-archive:{}:{t}", path.display()),
            ArchiveKind::Oci { tag: None } => format!("oci-archive:{}", path.display()),
            ArchiveKind::Docker { name: Some(n) } => format!("docker-archive:{}:{n}", path.display()),
            ArchiveKind::Docker { name: None } => format!("docker-archive:{}", path.display()),
        };
        Ok(Self {
            path: path.to_owned(),
            kind,
            describe,
            staging,
            layout,
        })
    }
}

/// Tars the staged layout `layout` into `path` (temporary file, synced, renamed).
fn finish(
    path: &Path,
    kind: &ArchiveKind,
    layout: &Path,
    root: &Descriptor,
    root_bytes: &[u8],
) -> Result<(), Error> {
    let blob_path = |d: &Descriptor| -> Result<PathBuf, Error> {
        let digest = d.digest().to_string();
        let hex = digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()))
            .ok_or_else(|| {
                bad(
                    path,
                    format!("unsupported digest {}", ocicrypt_core::redact::token(&digest)),
                )
            })?
            .to_owned();
        Ok(layout.join("blobs/sha256").join(hex))
    };
    let parent = layout
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("."))
        .to_owned();
    // Created 0666 less the umask (0644 under umask 022), as skopeo's archives are.
    let tmp = tempfile::Builder::new()
        .prefix(".tmp-imgcrypt-")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
        .tempfile_in(&parent)
        .map_err(|e| bad(path, format!("cannot make a temporary file: {e}")))?;
    let file = tmp.as_file().try_clone()?;
    let mut b = tar::Builder::new(std::io::BufWriter::new(file));
    b.mode(tar::HeaderMode::Deterministic);
    match kind {
        ArchiveKind::Oci { .. } => {
            append_file(&mut b, &layout.join("oci-layout"), "oci-layout")?;
            append_file(&mut b, &layout.join("index.json"), "index.json")?;
            let mut blobs: Vec<_> = std::fs::read_dir(layout.join("blobs/sha256"))?
                .filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| !n.starts_with('.'))
                .collect();
            blobs.sort();
            for n in blobs {
                append_file(
                    &mut b,
                    &layout.join("blobs/sha256").join(&n),
                    &format!("blobs/sha256/{n}"),
                )?;
            }
        }
        ArchiveKind::Docker { name } => {
            if root.media_type().to_string() != mt::OCI_MANIFEST
                && root.media_type().to_string() != mt::DOCKER_MANIFEST
            {
                return Err(bad(
                    path,
                    "docker-archive holds one image, not a multi-platform index: pick one with --platform",
                ));
            }
            let m: oci_spec::image::ImageManifest = serde_json::from_slice(root_bytes)
                .map_err(|e| bad(path, format!("the manifest does not parse: {e}")))?;
            let hex = |d: &Descriptor| d.digest().to_string().trim_start_matches("sha256:").to_owned();
            let config = format!("{}.json", hex(m.config()));
            append_file(&mut b, &blob_path(m.config())?, &config)?;
            let mut layers = Vec::new();
            for l in m.layers() {
                if l.media_type().to_string().ends_with(mt::ENCRYPTED_SUFFIX) {
                    return Err(bad(
                            path,
                            "docker-archive cannot hold encrypted layers (docker load cannot decrypt them): write oci-archive:PATH instead, or decrypt first",
                        ));
                }
                let n = format!("{}.tar", hex(l));
                if !layers.contains(&n) {
                    append_file(&mut b, &blob_path(l)?, &n)?;
                }
                layers.push(n);
            }
            let tags: Vec<String> = name.iter().cloned().collect();
            let manifest = serde_json::json!([{"Config": config, "RepoTags": tags, "Layers": layers}]);
            append_bytes(
                &mut b,
                &serde_json::to_vec(&manifest).map_err(|e| Error::Image(e.to_string()))?,
                "manifest.json",
            )?;
        }
    }
    let w = b.into_inner()?;
    let file = w.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    tmp.persist(path)
        .map_err(|e| bad(path, format!("cannot rename the archive into place: {}", e.error)))?;
    Ok(())
}

fn append_file<W: std::io::Write>(b: &mut tar::Builder<W>, src: &Path, name: &str) -> Result<(), Error> {
    let mut f = std::fs::File::open(src)?;
    let len = f.metadata()?.len();
    let mut h = tar::Header::new_ustar();
    h.set_size(len);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mtime(0);
    b.append_data(&mut h, name, &mut f)?;
    Ok(())
}

fn append_bytes<W: std::io::Write>(b: &mut tar::Builder<W>, data: &[u8], name: &str) -> Result<(), Error> {
    let mut h = tar::Header::new_ustar();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mtime(0);
    b.append_data(&mut h, name, data)?;
    Ok(())
}

impl ImageDest for ArchiveDest {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn has_blob<'a>(&'a self, desc: &'a Descriptor) -> BoxFuture<'a, Result<bool, Error>> {
        self.layout.has_blob(desc)
    }

    fn write_blob<'a>(
        &'a self,
        media_type: &'a str,
        size_hint: Option<u64>,
        data: &'a mut (dyn AsyncRead + Send + Unpin),
    ) -> BoxFuture<'a, Result<(String, u64), Error>> {
        self.layout.write_blob(media_type, size_hint, data)
    }

    fn write_blob_chunks<'a>(
        &'a self,
        media_type: &'a str,
        size_hint: Option<u64>,
        data: ocicrypt_core::image::pipeline::ChunkReceiver,
    ) -> BoxFuture<'a, Result<(String, u64), Error>> {
        self.layout.write_blob_chunks(media_type, size_hint, data)
    }

    fn write_manifest<'a>(
        &'a self,
        bytes: &'a [u8],
        media_type: &'a str,
    ) -> BoxFuture<'a, Result<(), Error>> {
        self.layout.write_manifest(bytes, media_type)
    }

    fn set_root<'a>(&'a self, desc: &'a Descriptor, bytes: &'a [u8]) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            self.layout.set_root(desc, bytes).await?;
            let desc = desc.clone();
            let bytes = bytes.to_vec();
            let (path, kind) = (self.path.clone(), self.kind.clone());
            let layout = self.staging.path().join("layout");
            // Blocking file I/O; this runs once, at the end.
            tokio::task::spawn_blocking(move || finish(&path, &kind, &layout, &desc, &bytes))
                .await
                .map_err(|e| Error::Image(format!("writing the archive failed: {e}")))?
        })
    }

    fn abort(&self) -> BoxFuture<'_, ()> {
        // Also called from a signal handler before exit, when no destructor runs.
        let staging = self.staging.path().to_owned();
        Box::pin(async move {
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(staging)).await;
        })
    }
}

/// Shared handle, for callers that keep the destination behind an `Arc`.
pub type SharedArchiveDest = Arc<ArchiveDest>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_names() {
        assert_eq!(
            member_name(Path::new("./blobs/sha256/ab")).as_deref(),
            Some("blobs/sha256/ab")
        );
        assert_eq!(
            member_name(Path::new("index.json")).as_deref(),
            Some("index.json")
        );
        assert_eq!(member_name(Path::new("../x")), None);
        assert_eq!(member_name(Path::new("/etc/passwd")), None);
        assert_eq!(member_name(Path::new("a/../../x")), None);
    }

    fn tar_with(f: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> tempfile::NamedTempFile {
        let mut b = tar::Builder::new(Vec::new());
        f(&mut b);
        let bytes = b.into_inner().unwrap();
        let t = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(t.path(), bytes).unwrap();
        t
    }

    #[test]
    fn hostile_members_are_refused() {
        let link = tar_with(|b| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            b.append_link(&mut h, "index.json", "/etc/passwd").unwrap();
        });
        let (files, links) = scan(link.path()).unwrap();
        assert!(files.is_empty() && links.contains("index.json"));
        let dup = tar_with(|b| {
            for _ in 0..2 {
                let mut h = tar::Header::new_gnu();
                h.set_size(1);
                b.append_data(&mut h, "index.json", &b"x"[..]).unwrap();
            }
        });
        assert!(scan(dup.path()).unwrap_err().to_string().contains("twice"));
        // The tar crate refuses to write '..' names; write the header by hand.
        let mut raw = Vec::new();
        let mut h = tar::Header::new_gnu();
        h.as_gnu_mut().unwrap().name[..7].copy_from_slice(b"../evil");
        h.set_size(0);
        h.set_cksum();
        raw.extend_from_slice(h.as_bytes());
        raw.extend_from_slice(&[0u8; 1024]);
        let t = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(t.path(), raw).unwrap();
        assert!(scan(t.path()).unwrap_err().to_string().contains("climbs out"));
    }
}

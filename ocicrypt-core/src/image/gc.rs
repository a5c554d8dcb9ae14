//! In-place writes to an OCI layout: after the tag moved to the new image, the blobs only the
//! replaced image used (its plaintext layers, after an in-place encrypt) are removed, unless
//! another image in `index.json` still uses them.

use std::collections::BTreeMap;
use std::fs;

use oci_spec::image::Descriptor;

use super::layout::OciLayout;
use crate::mediatype as mt;
use crate::Error;

/// What a blob is to the image that refers to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum BlobRole {
    /// An index or manifest.
    Manifest,
    /// An image config.
    Config,
    /// A layer.
    Layer,
}

/// Every blob an image refers to (the root included), by digest.
///
/// # Errors
/// [`Error`] when a manifest or index of the image cannot be read or does not parse.
pub fn reachable(layout: &OciLayout, root: &Descriptor) -> Result<BTreeMap<String, BlobRole>, Error> {
    let mut out = BTreeMap::new();
    walk(layout, root, &mut out, 0)?;
    Ok(out)
}

fn walk(
    layout: &OciLayout,
    desc: &Descriptor,
    out: &mut BTreeMap<String, BlobRole>,
    depth: usize,
) -> Result<(), Error> {
    if depth > 8 {
        return Err(Error::Image("indexes nested more than 8 deep".into()));
    }
    let digest = desc.digest().to_string();
    if out.insert(digest, BlobRole::Manifest).is_some() {
        return Ok(());
    }
    let media = desc.media_type().to_string();
    let known = [
        mt::OCI_INDEX,
        mt::DOCKER_MANIFEST_LIST,
        mt::OCI_MANIFEST,
        mt::DOCKER_MANIFEST,
    ];
    if !known.contains(&media.as_str()) {
        return Ok(());
    }
    let bytes = layout.get_bytes(desc)?;
    let v: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| Error::Image(format!("{} does not parse: {e}", desc.digest())))?;
    let descs = |key: &str| -> Result<Vec<Descriptor>, Error> {
        match v.get(key) {
            None => Ok(Vec::new()),
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .map(|d| {
                    serde_json::from_value(d.clone()).map_err(|e| {
                        Error::Image(format!("a descriptor in {} does not parse: {e}", desc.digest()))
                    })
                })
                .collect(),
            Some(d) => Ok(vec![serde_json::from_value(d.clone()).map_err(|e| {
                Error::Image(format!("a descriptor in {} does not parse: {e}", desc.digest()))
            })?]),
        }
    };
    for child in descs("manifests")? {
        walk(layout, &child, out, depth + 1)?;
    }
    for c in descs("config")? {
        out.entry(c.digest().to_string()).or_insert(BlobRole::Config);
    }
    for l in descs("layers")? {
        out.entry(l.digest().to_string()).or_insert(BlobRole::Layer);
    }
    Ok(())
}

/// What [`prune_replaced`] removed.
#[derive(Debug, Clone, Default)]
pub struct Pruned {
    /// The removed blobs, with what they were.
    pub removed: Vec<(String, BlobRole)>,
    /// Their total size in bytes.
    pub bytes: u64,
}

impl Pruned {
    /// How many of the removed blobs were layers.
    pub fn layers(&self) -> usize {
        self.removed.iter().filter(|(_, r)| *r == BlobRole::Layer).count()
    }
}

/// After an image was replaced in `layout` (its tag now names another image): removes the
/// blobs of `old` (from [`reachable`], computed before the write) that no image listed in
/// `index.json` uses any more. Call it only after the new tag is committed.
///
/// # Errors
/// [`Error`] when an image in the layout cannot be read (then nothing is removed), or a blob
/// cannot be removed.
pub fn prune_replaced(layout: &OciLayout, old: &BTreeMap<String, BlobRole>) -> Result<Pruned, Error> {
    let mut keep = BTreeMap::new();
    for d in layout.index()?.manifests() {
        keep.extend(reachable(layout, d)?);
    }
    let mut pruned = Pruned::default();
    for (digest, role) in old {
        if keep.contains_key(digest) {
            continue;
        }
        let path = layout.blob_path(digest)?;
        match fs::symlink_metadata(&path) {
            Ok(m) => {
                fs::remove_file(&path)?;
                pruned.bytes += m.len();
                pruned.removed.push((digest.clone(), *role));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
    }
    if let Some(dir) = layout.blob_path("sha256:00")?.parent() {
        crate::fsutil::sync_dir(dir);
    }
    Ok(pruned)
}

//! Image operations over OCI image layouts and other blob stores.
//!
//! The operations ([`ops`]) work on any [`ImageSource`] / [`ImageDest`] pair: the OCI image
//! layout store ([`layout::OciLayout`]) here, a registry client in the CLI. Layers stream
//! through the cipher; several layers are in flight at once; nothing holds a whole layer in
//! memory. Digests are verified on every read ([`digest::VerifyReader`]).
//!
//! * encrypt selected layers (all, by index with negative indices, by platform) for a set of
//!   recipients;
//! * decrypt (the result is byte-identical to the original blob, its descriptor without
//!   `+encrypted` and `org.opencontainers.image.enc.*` annotations);
//! * add recipients without re-encrypting layer data, remove recipients;
//! * inspect, and check authorization (do these keys unwrap every encrypted layer?) without
//!   decrypting data.

use std::fmt;
use std::pin::Pin;

use oci_spec::image::Descriptor;
use tokio::io::AsyncRead;

use crate::keywrap::BoxFuture;
use crate::Error;

pub mod base;
pub mod digest;
pub mod gc;
pub mod gojson;
pub mod layout;
pub mod ops;
pub mod pipeline;

pub use ops::{
    check_authorization, check_report, inspect, transform_image, ImageInfo, LayerInfo, LayerSelection,
    ManifestInfo, Operation, Progress, TransformReport,
};

/// A streaming blob, verified against its descriptor at end-of-file.
pub type BlobReader = Pin<Box<dyn AsyncRead + Send>>;

/// Where an image comes from.
pub trait ImageSource: Send + Sync + fmt::Debug {
    /// A human name for messages, e.g. `oci:/path:tag` or `docker://host/repo:tag`.
    fn describe(&self) -> String;
    /// The top-level manifest or index of the image.
    fn root(&self) -> BoxFuture<'_, Result<Descriptor, Error>>;
    /// Reads a small blob (manifest, index, config) whole, verified against `desc`.
    fn read_small<'a>(&'a self, desc: &'a Descriptor) -> BoxFuture<'a, Result<Vec<u8>, Error>>;
    /// Opens a blob as a stream that fails at end-of-file if its digest or size is wrong.
    fn open_blob<'a>(&'a self, desc: &'a Descriptor) -> BoxFuture<'a, Result<BlobReader, Error>>;

    /// Opens a blob as a [`ChunkReceiver`](pipeline::ChunkReceiver) of buffers from `pool`, read
    /// ahead by its own task or thread, ending with an error instead of its clean end if its
    /// digest or size is wrong. The default reads [`open_blob`](Self::open_blob) in a spawned
    /// task; stores that can read faster (the OCI layout: a blocking thread reading and hashing
    /// straight into the chunks) override it.
    fn open_blob_chunks<'a>(
        &'a self,
        desc: &'a Descriptor,
        pool: pipeline::ChunkPool,
    ) -> BoxFuture<'a, Result<pipeline::ChunkReceiver, Error>> {
        Box::pin(async move {
            let r = self.open_blob(desc).await?;
            Ok(pipeline::spawn_chunks(r, pipeline::DEPTH, pool))
        })
    }

    /// The blob as a local regular file of exactly `desc`'s size (opened without following
    /// links), for a destination that copies it in the kernel and then verifies the copy.
    /// `None` (the default): this store keeps no blob files.
    fn blob_file<'a>(&'a self, _desc: &'a Descriptor) -> BoxFuture<'a, Result<Option<std::fs::File>, Error>> {
        Box::pin(async { Ok(None) })
    }

    /// `(registry, repository)` of a registry source (`registry` as `HOST[:PORT]`), for a
    /// destination in the same registry to mount unchanged blobs from. `None` (the default):
    /// not a registry.
    fn registry_repository(&self) -> Option<(String, String)> {
        None
    }
}

/// How an unchanged blob reached the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transfer {
    /// The destination already had it (verified).
    Present,
    /// Read and written through this process.
    Streamed,
    /// Shared by the filesystem (a reflink: `FICLONE`), then verified.
    Reflink,
    /// Copied inside the kernel (`copy_file_range`), then verified.
    KernelCopy,
    /// Mounted from another repository of the same registry.
    Mounted,
}

/// Where an image goes.
pub trait ImageDest: Send + Sync + fmt::Debug {
    /// A human name for messages.
    fn describe(&self) -> String;
    /// Whether the destination already has this blob.
    fn has_blob<'a>(&'a self, desc: &'a Descriptor) -> BoxFuture<'a, Result<bool, Error>>;
    /// Stores a blob streamed from `data`; returns its sha256 digest and size. The blob becomes
    /// visible only after `data` reached end-of-file cleanly: a stream that fails (a MAC
    /// mismatch, a digest mismatch) leaves nothing behind.
    fn write_blob<'a>(
        &'a self,
        media_type: &'a str,
        size_hint: Option<u64>,
        data: &'a mut (dyn AsyncRead + Send + Unpin),
    ) -> BoxFuture<'a, Result<(String, u64), Error>>;
    /// As [`write_blob`](Self::write_blob), from a chunk stream: the blob becomes visible only if
    /// the stream ends cleanly, never after an error or a truncated stream. The default reads the
    /// chunks through [`ChunkReceiver::into_reader`](pipeline::ChunkReceiver::into_reader);
    /// stores that can write owned chunks directly (the OCI layout) override it.
    fn write_blob_chunks<'a>(
        &'a self,
        media_type: &'a str,
        size_hint: Option<u64>,
        data: pipeline::ChunkReceiver,
    ) -> BoxFuture<'a, Result<(String, u64), Error>> {
        Box::pin(async move {
            let mut r = data.into_reader();
            self.write_blob(media_type, size_hint, &mut r).await
        })
    }
    /// Stores the unchanged blob `desc` of `src` without streaming its bytes through this
    /// process, where the two stores allow it: a kernel copy between OCI layouts, a
    /// cross-repository mount within a registry. Returns `None` when it did not (the caller
    /// then streams the blob); the blob is verified against `desc` either way. The default
    /// never does.
    fn copy_unchanged<'a>(
        &'a self,
        _src: &'a dyn ImageSource,
        _desc: &'a Descriptor,
    ) -> BoxFuture<'a, Result<Option<Transfer>, Error>> {
        Box::pin(async { Ok(None) })
    }
    /// Stores a manifest or index that children of the root refer to by digest.
    fn write_manifest<'a>(&'a self, bytes: &'a [u8], media_type: &'a str)
        -> BoxFuture<'a, Result<(), Error>>;
    /// Stores the top-level manifest or index and names it (tag, index.json entry).
    fn set_root<'a>(&'a self, desc: &'a Descriptor, bytes: &'a [u8]) -> BoxFuture<'a, Result<(), Error>>;
    /// Called when an operation fails: removes what this destination created during it, so
    /// nothing partial is left behind.
    fn abort(&self) -> BoxFuture<'_, ()>;
}

/// Serializes JSON deterministically: object keys sorted at every level (Go sorts map keys;
/// oci-spec keeps annotations in a `HashMap`), no whitespace.
///
/// # Errors
/// [`Error::Image`] if the value does not serialize.
pub fn canonical_json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, Error> {
    fn sort(v: serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(m) => {
                let mut entries: Vec<_> = m.into_iter().collect();
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                serde_json::Value::Object(entries.into_iter().map(|(k, v)| (k, sort(v))).collect())
            }
            serde_json::Value::Array(a) => serde_json::Value::Array(a.into_iter().map(sort).collect()),
            other => other,
        }
    }
    let v = serde_json::to_value(value).map_err(|e| Error::Image(format!("cannot serialize: {e}")))?;
    serde_json::to_vec(&sort(v)).map_err(|e| Error::Image(format!("cannot serialize: {e}")))
}

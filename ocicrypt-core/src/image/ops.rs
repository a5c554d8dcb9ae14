//! Whole-image operations: encrypt, decrypt, add or replace recipients, inspect, check.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use oci_spec::image::{Descriptor, ImageIndex, ImageManifest, MediaType};
use serde::Serialize;

use super::base::{BaseImage, BASE_LAYER_ANNOTATION};
use super::pipeline::{self, ChunkPool, ChunkReceiver, ChunkSender};
use super::{ImageDest, ImageSource, Transfer};
use crate::cipher::io::to_io;
use crate::cipher::{self, LayerKey, Nonce};
use crate::keywrap::{
    self, schemes_present, unwrap_options, wrap_options, AsyncKeyUnwrapper, AsyncKeyWrapper,
};
use crate::mediatype::{self as mt, ANNOTATION_PREFIX};
use crate::options::{PrivateLayerOptions, PublicLayerOptions};
use crate::recipients::{self, LayerRecipients, RemoveError};
use crate::Error;

/// What to do to the selected layers.
#[derive(Debug, Clone)]
pub enum Operation {
    /// Copy the image unchanged.
    Copy,
    /// Encrypt selected plain layers for these recipients.
    Encrypt {
        /// The recipients.
        wrappers: Vec<Arc<dyn AsyncKeyWrapper>>,
    },
    /// Decrypt selected encrypted layers with these keys.
    Decrypt {
        /// The keys.
        unwrappers: Vec<Arc<dyn AsyncKeyUnwrapper>>,
    },
    /// Add recipients to encrypted layers without touching layer data: unwrap with a held
    /// key, wrap for the new recipients, append to the annotations.
    AddRecipients {
        /// Keys that can already decrypt.
        unwrappers: Vec<Arc<dyn AsyncKeyUnwrapper>>,
        /// The new recipients.
        wrappers: Vec<Arc<dyn AsyncKeyWrapper>>,
    },
    /// Replace all recipients of encrypted layers with exactly these, without touching layer
    /// data. Recipients left out can no longer unwrap the layer key from this image (a former
    /// recipient who kept the key itself still can: re-encrypt to revoke for real).
    SetRecipients {
        /// Keys that can already decrypt.
        unwrappers: Vec<Arc<dyn AsyncKeyUnwrapper>>,
        /// The recipients to keep or set.
        wrappers: Vec<Arc<dyn AsyncKeyWrapper>>,
    },
    /// Remove the recipients with these key ids (RFC 7638 thumbprints, see
    /// [`crate::recipients`]) from encrypted layers: no private key needed, layer data and the
    /// other recipients' entries untouched. An id on no selected layer is an error
    /// ([`Error::RecipientNotFound`]), as is removing a layer's last recipient or removing from
    /// a layer whose entries carry no ids ([`Error::Recipients`]).
    RemoveRecipients {
        /// The ids.
        ids: Vec<String>,
    },
}

/// Which layers and platforms an operation applies to. Empty lists mean "all".
#[derive(Debug, Clone, Default)]
pub struct LayerSelection {
    /// Layer indices per manifest; negative counts from the top (`-1` = last).
    pub layers: Vec<i64>,
    /// Platforms of a multi-arch index, `os/arch[/variant]`.
    pub platforms: Vec<String>,
    /// Encrypt only: leave unencrypted (and mark with
    /// [`BASE_LAYER_ANNOTATION`](super::base::BASE_LAYER_ANNOTATION)) every layer this base
    /// image has for the same platform. A selected manifest that shares no layer with the base,
    /// or whose every encryptable layer is in it, is an [`Error::Selection`], as is a `layers`
    /// index naming a base layer.
    pub skip_base: Option<Arc<BaseImage>>,
}

impl LayerSelection {
    fn layer_selected(&self, index: usize, count: usize) -> Result<bool, Error> {
        if self.layers.is_empty() {
            return Ok(true);
        }
        for &l in &self.layers {
            let resolved = if l < 0 { count as i64 + l } else { l };
            if resolved < 0 || resolved >= count as i64 {
                return Err(Error::Selection(format!(
                    "layer index {l} is out of range: the image has {count} layers (0..{}, or -1..-{count})",
                    count.saturating_sub(1)
                )));
            }
            if resolved as usize == index {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn platform_selected(&self, platform: Option<&oci_spec::image::Platform>) -> bool {
        if self.platforms.is_empty() {
            return true;
        }
        let Some(p) = platform else { return false };
        self.name_selected(&platform_name(p))
    }

    fn name_selected(&self, name: &str) -> bool {
        self.platforms.iter().any(|want| {
            let want = want.trim_end_matches('/');
            name == want || name.starts_with(&format!("{want}/"))
        })
    }

    /// A `--platform` that matches no manifest of an index is an error, not a no-op.
    fn check_index(&self, image: &str, manifests: &[Descriptor]) -> Result<(), Error> {
        if self.platforms.is_empty()
            || manifests
                .iter()
                .any(|d| self.platform_selected(d.platform().as_ref()))
        {
            return Ok(());
        }
        Err(Error::Selection(format!(
            "--platform {} matches no manifest of {image}; its platforms are: {}",
            self.platforms.join(","),
            manifests
                .iter()
                .map(|d| d
                    .platform()
                    .as_ref()
                    .map_or_else(|| "(none)".to_owned(), platform_name))
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }

    /// A `--platform` on a single-manifest image must match the platform in its config.
    async fn check_single(&self, src: &dyn ImageSource, image: &str, manifest: &[u8]) -> Result<(), Error> {
        if self.platforms.is_empty() {
            return Ok(());
        }
        let m = ImageManifest::from_reader(manifest)
            .map_err(|e| Error::Image(format!("the manifest of {image} does not parse: {e}")))?;
        let name = config_platform(src, m.config()).await?;
        match name {
            Some(n) if self.name_selected(&n) => Ok(()),
            other => Err(Error::Selection(format!(
                "--platform {} does not match {image}, a single-platform image for {}",
                self.platforms.join(","),
                other.as_deref().unwrap_or("no platform (its config names none)")
            ))),
        }
    }
}

/// The `os/arch[/variant]` an image config names, if it names one.
pub(crate) async fn config_platform(
    src: &dyn ImageSource,
    config: &Descriptor,
) -> Result<Option<String>, Error> {
    let bytes = src.read_small(config).await?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let field = |k: &str| {
        v.get(k)
            .and_then(serde_json::Value::as_str)
            .filter(|s| !s.is_empty())
    };
    Ok(match (field("os"), field("architecture")) {
        (Some(os), Some(arch)) => Some(match field("variant") {
            Some(var) => format!("{os}/{arch}/{var}"),
            None => format!("{os}/{arch}"),
        }),
        _ => None,
    })
}

/// `os/arch[/variant]` of a platform.
pub fn platform_name(p: &oci_spec::image::Platform) -> String {
    let mut s = format!("{}/{}", p.os(), p.architecture());
    if let Some(v) = p.variant() {
        s.push('/');
        s.push_str(v);
    }
    s
}

/// Progress callbacks, per layer. All methods have empty defaults.
pub trait Progress: Send + Sync {
    /// A layer starts: `id` is unique per layer, `action` is `encrypt`, `decrypt`, `copy`.
    fn start(&self, _id: &str, _size: u64, _action: &str) {}
    /// `n` more bytes of layer `id` went through.
    fn advance(&self, _id: &str, _n: u64) {}
    /// Layer `id` is done.
    fn finish(&self, _id: &str) {}
}

/// A [`Progress`] that reports nothing.
#[derive(Debug, Default)]
pub struct NoProgress;
impl Progress for NoProgress {}

/// What happened to one layer.
#[derive(Debug, Clone, Serialize)]
pub struct LayerReport {
    /// Manifest digest (source).
    pub manifest: String,
    /// Platform of the manifest, if from an index.
    pub platform: Option<String>,
    /// Layer index.
    pub index: usize,
    /// `encrypted`, `decrypted`, `rewrapped`, `kept`.
    pub action: &'static str,
    /// Source digest.
    pub from: String,
    /// Destination digest.
    pub to: String,
    /// Size in bytes.
    pub size: u64,
    /// Who can decrypt the layer afterwards (encrypted layers only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recipients: Option<LayerRecipients>,
    /// Recipients asked for that the layer already had (`recipients add`: not added again).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
    /// Recipients removed from the layer (`recipients remove`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<String>,
    /// How an unchanged layer's blob reached the destination (`kept` and `base` layers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transfer: Option<Transfer>,
}

/// What an operation did.
#[derive(Debug, Clone, Serialize)]
pub struct TransformReport {
    /// Digest of the new top-level manifest or index.
    pub digest: String,
    /// Its media type.
    pub media_type: String,
    /// Per layer.
    pub layers: Vec<LayerReport>,
}

struct Ctx {
    src: Arc<dyn ImageSource>,
    dst: Arc<dyn ImageDest>,
    op: Operation,
    sel: LayerSelection,
    progress: Arc<dyn Progress>,
    concurrency: usize,
    /// Ids removed so far ([`Operation::RemoveRecipients`]).
    found: Mutex<BTreeSet<String>>,
    /// Ids seen on the layers looked at ([`Operation::RemoveRecipients`]).
    present: Mutex<BTreeSet<String>>,
}

/// What happened to a layer's recipients.
#[derive(Default)]
struct LayerNote {
    skipped: Vec<String>,
    removed: Vec<String>,
    /// How an unchanged layer's blob got there.
    transfer: Option<Transfer>,
}

/// Runs `op` on the image of `src`, writing the result to `dst`. Layers stream; up to
/// `concurrency` layers are in flight at once. On failure the destination is told to
/// [`abort`](ImageDest::abort), so nothing partial is left there.
///
/// # Errors
/// [`Error::Layer`] naming the layer for per-layer failures (wrong key, tampered data…), other
/// variants for image-level failures.
pub async fn transform_image(
    src: Arc<dyn ImageSource>,
    dst: Arc<dyn ImageDest>,
    op: Operation,
    sel: LayerSelection,
    progress: Arc<dyn Progress>,
    concurrency: usize,
) -> Result<TransformReport, Error> {
    let ctx = Arc::new(Ctx {
        src,
        dst,
        op,
        sel,
        progress,
        concurrency: concurrency.max(1),
        found: Mutex::default(),
        present: Mutex::default(),
    });
    match run(&ctx).await {
        Ok(r) => Ok(r),
        Err(e) => {
            ctx.dst.abort().await;
            Err(e)
        }
    }
}

pub(crate) fn is_index(media_type: &str, bytes: &[u8]) -> bool {
    if media_type == mt::OCI_INDEX || media_type == mt::DOCKER_MANIFEST_LIST {
        return true;
    }
    if media_type == mt::OCI_MANIFEST || media_type == mt::DOCKER_MANIFEST {
        return false;
    }
    serde_json::from_slice::<serde_json::Value>(bytes)
        .map(|v| v.get("manifests").is_some())
        .unwrap_or(false)
}

async fn run(ctx: &Arc<Ctx>) -> Result<TransformReport, Error> {
    let root = ctx.src.root().await?;
    let bytes = ctx.src.read_small(&root).await?;
    let mut layers = Vec::new();
    let (new_desc, new_bytes) = if is_index(root.media_type().as_ref(), &bytes) {
        let index = ImageIndex::from_reader(&bytes[..])
            .map_err(|e| Error::Image(format!("index {} does not parse: {e}", root.digest())))?;
        let mut changed = false;
        let mut children = Vec::new();
        ctx.sel.check_index(&ctx.src.describe(), index.manifests())?;
        for child in index.manifests() {
            let selected = ctx.sel.platform_selected(child.platform().as_ref());
            let (desc, bytes, reps) = process_manifest(ctx, child, selected).await?;
            ctx.dst.write_manifest(&bytes, desc.media_type().as_ref()).await?;
            changed |= desc.digest() != child.digest();
            layers.extend(reps);
            children.push(desc);
        }
        if changed {
            // A Docker manifest list whose children became OCI manifests becomes an OCI index.
            let list = index.media_type().as_ref().map(ToString::to_string).as_deref()
                == Some(mt::DOCKER_MANIFEST_LIST);
            let b = super::gojson::edit_index(&bytes, &children, list.then_some(mt::OCI_INDEX))?;
            let d =
                super::layout::descriptor(mt::OCI_INDEX, &super::digest::sha256_digest(&b), b.len() as u64)?;
            (d, b)
        } else {
            (root.clone(), bytes)
        }
    } else {
        ctx.sel
            .check_single(ctx.src.as_ref(), &ctx.src.describe(), &bytes)
            .await?;
        let (d, b, reps) = process_manifest(ctx, &root, true).await?;
        layers.extend(reps);
        (d, b)
    };
    if let Operation::RemoveRecipients { ids } = &ctx.op {
        let found = ctx
            .found
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let missing: Vec<String> = ids.iter().filter(|i| !found.contains(*i)).cloned().collect();
        if !missing.is_empty() {
            return Err(Error::RecipientNotFound {
                image: ctx.src.describe(),
                missing,
                present: ctx
                    .present
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .iter()
                    .cloned()
                    .collect(),
            });
        }
    }
    let mut out_desc = new_desc.clone();
    out_desc.set_annotations(None);
    out_desc.set_platform(None);
    ctx.dst.set_root(&out_desc, &new_bytes).await?;
    Ok(TransformReport {
        digest: out_desc.digest().to_string(),
        media_type: out_desc.media_type().to_string(),
        layers,
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Action {
    Keep,
    /// Kept unencrypted because the `--skip-base` image has it; marked.
    Base,
    Encrypt,
    Decrypt,
    Rewrap,
}

async fn process_manifest(
    ctx: &Arc<Ctx>,
    desc: &Descriptor,
    selected: bool,
) -> Result<(Descriptor, Vec<u8>, Vec<LayerReport>), Error> {
    let bytes = ctx.src.read_small(desc).await?;
    let manifest = ImageManifest::from_reader(&bytes[..])
        .map_err(|e| Error::Image(format!("manifest {} does not parse: {e}", desc.digest())))?;
    let image_name = match desc.platform() {
        Some(p) => format!("{} ({})", ctx.src.describe(), platform_name(p)),
        None => ctx.src.describe(),
    };
    let count = manifest.layers().len();
    // `--skip-base`: the base's layers for this manifest's platform.
    let base = match (&ctx.op, &ctx.sel.skip_base) {
        (Operation::Encrypt { .. }, Some(b)) if selected => {
            let platform = match desc.platform() {
                Some(p) => Some(platform_name(p)),
                None => config_platform(ctx.src.as_ref(), manifest.config()).await?,
            };
            Some((b, b.layers_for(platform.as_deref(), &image_name)?))
        }
        _ => None,
    };
    let mut actions = Vec::with_capacity(count);
    for (i, layer) in manifest.layers().iter().enumerate() {
        let chosen = selected && ctx.sel.layer_selected(i, count)?;
        let media = layer.media_type().to_string();
        let encrypted = mt::is_encrypted(&media);
        if let Some((b, digests)) = base {
            if !encrypted && digests.contains(&layer.digest().to_string()) {
                if chosen && !ctx.sel.layers.is_empty() {
                    return Err(Error::Selection(format!(
                        "--layer selects layer {i} of {image_name}, which --skip-base {} has: leave it out of --layer, or drop --skip-base to encrypt it",
                        b.name()
                    )));
                }
                actions.push(Action::Base);
                continue;
            }
        }
        let action = match (&ctx.op, chosen) {
            (_, false) | (Operation::Copy, _) => Action::Keep,
            (Operation::Encrypt { .. }, true) => {
                if encrypted {
                    return Err(Error::Layer {
                        image: image_name.clone(),
                        index: i,
                        digest: layer.digest().to_string(),
                        source: Box::new(Error::AlreadyEncrypted { media_type: media }),
                    });
                }
                if !mt::is_encryptable_layer(&media) {
                    if ctx.sel.layers.is_empty() {
                        Action::Keep // foreign layers, attestations: passed through
                    } else {
                        return Err(Error::Layer {
                            image: image_name.clone(),
                            index: i,
                            digest: layer.digest().to_string(),
                            source: Box::new(Error::UnsupportedMediaType { media_type: media }),
                        });
                    }
                } else {
                    Action::Encrypt
                }
            }
            (Operation::Decrypt { .. }, true) if encrypted => Action::Decrypt,
            (
                Operation::AddRecipients { .. }
                | Operation::SetRecipients { .. }
                | Operation::RemoveRecipients { .. },
                true,
            ) if encrypted => Action::Rewrap,
            _ => Action::Keep,
        };
        actions.push(action);
    }
    if let Some((b, _)) = base {
        if !actions.contains(&Action::Base) {
            return Err(Error::Selection(format!(
                "--skip-base {} shares no layer with {image_name}, so every layer would be encrypted: check that it is the image this one was built on (layers are compared by the digests the manifests name)",
                b.name()
            )));
        }
        if !actions.contains(&Action::Encrypt) {
            return Err(Error::Selection(format!(
                "every layer of {image_name} that would be encrypted is in --skip-base {}, so nothing would be encrypted",
                b.name()
            )));
        }
    }

    // Config: copied as is.
    copy_blob(ctx, manifest.config()).await?;

    let platform = desc.platform().as_ref().map(platform_name);
    let manifest_digest = desc.digest().to_string();
    let jobs = manifest
        .layers()
        .iter()
        .cloned()
        .enumerate()
        .zip(actions.iter().copied())
        .map(|((i, layer), action)| {
            let ctx = Arc::clone(ctx);
            let image_name = image_name.clone();
            async move {
                let digest = layer.digest().to_string();
                // Aborted when this future is dropped (an interrupted or failed run), so a
                // layer task does not go on writing after the destination was aborted.
                let mut handle =
                    AbortOnDrop(tokio::spawn(
                        async move { process_layer(&ctx, &layer, action).await },
                    ));
                let res = match (&mut handle.0).await {
                    Ok(r) => r,
                    Err(e) => Err(Error::Image(format!("layer task failed: {e}"))),
                };
                res.map_err(|e| match e {
                    e @ Error::Layer { .. } => e,
                    e => Error::Layer {
                        image: image_name,
                        index: i,
                        digest,
                        source: Box::new(e),
                    },
                })
            }
        });
    let results: Vec<Result<(Descriptor, LayerNote), Error>> = futures::stream::iter(jobs)
        .buffered(ctx.concurrency)
        .collect()
        .await;
    let decrypted_still_encrypted = results.iter().zip(&actions).any(|(r, a)| match r {
        Ok((d, _)) => *a != Action::Decrypt && mt::is_encrypted(d.media_type().as_ref()),
        Err(_) => false,
    });
    let mut new_layers = Vec::with_capacity(count);
    let mut reports = Vec::new();
    for ((res, old), action) in results.into_iter().zip(manifest.layers()).zip(&actions) {
        let (mut d, note) = res?;
        if matches!(ctx.op, Operation::Decrypt { .. }) && !decrypted_still_encrypted {
            // Back to all-plain layers: the base-layer marks `--skip-base` added go too.
            strip_base_mark(&mut d);
        }
        let recipients = if mt::is_encrypted(d.media_type().as_ref()) {
            LayerRecipients::from_annotations(&annotations_of(&d)).ok()
        } else {
            None
        };
        let rewrap_changed = *action == Action::Rewrap && d.annotations() != old.annotations();
        reports.push(LayerReport {
            manifest: manifest_digest.clone(),
            platform: platform.clone(),
            index: new_layers.len(),
            action: match action {
                Action::Keep => "kept",
                Action::Base => "base",
                Action::Encrypt => "encrypted",
                Action::Decrypt => "decrypted",
                Action::Rewrap if rewrap_changed => "rewrapped",
                Action::Rewrap => "unchanged",
            },
            from: old.digest().to_string(),
            to: d.digest().to_string(),
            size: d.size(),
            recipients,
            skipped: note.skipped,
            removed: note.removed,
            transfer: note.transfer,
        });
        new_layers.push(d);
    }
    if actions.iter().all(|a| *a == Action::Keep) {
        return Ok((desc.clone(), bytes, reports));
    }
    let encrypting = actions.contains(&Action::Encrypt);
    let mut media_type = None;
    let mut config_media_type = None;
    if encrypting {
        // Encrypted layers need an OCI manifest (as containers/image and imgcrypt require).
        if manifest.media_type().as_ref().map(ToString::to_string).as_deref() != Some(mt::OCI_MANIFEST) {
            media_type = Some(mt::OCI_MANIFEST);
        }
        if manifest.config().media_type().to_string() == "application/vnd.docker.container.image.v1+json" {
            config_media_type = Some("application/vnd.oci.image.config.v1+json");
        }
        for l in &mut new_layers {
            let s = l.media_type().to_string();
            let oci = match s.as_str() {
                mt::DOCKER_LAYER_TAR => Some(mt::OCI_LAYER_TAR),
                mt::DOCKER_LAYER_TAR_GZIP => Some(mt::OCI_LAYER_TAR_GZIP),
                _ => None,
            };
            if let Some(o) = oci {
                l.set_media_type(MediaType::from(o));
            }
        }
    }
    // Edited in place, in Go's encoding: a round trip gives back the source's bytes.
    let out = super::gojson::edit_manifest(&bytes, &new_layers, media_type, config_media_type)?;
    let media = media_type
        .map(str::to_owned)
        .or_else(|| manifest.media_type().as_ref().map(ToString::to_string))
        .unwrap_or_else(|| desc.media_type().to_string());
    let mut d = super::layout::descriptor(&media, &super::digest::sha256_digest(&out), out.len() as u64)?;
    d.set_platform(desc.platform().clone());
    d.set_annotations(desc.annotations().clone());
    Ok((d, out, reports))
}

/// Copies an unchanged blob: not at all if the destination has it, without moving its bytes
/// through this process where the stores allow it, else streamed; verified in every case.
async fn copy_blob(ctx: &Ctx, desc: &Descriptor) -> Result<Transfer, Error> {
    if ctx.dst.has_blob(desc).await? {
        return Ok(Transfer::Present);
    }
    if let Some(how) = ctx.dst.copy_unchanged(ctx.src.as_ref(), desc).await? {
        return Ok(how);
    }
    let chunks = ctx.src.open_blob_chunks(desc, ChunkPool::standard()).await?;
    let (digest, _) = ctx
        .dst
        .write_blob_chunks(desc.media_type().as_ref(), Some(desc.size()), chunks)
        .await?;
    if digest != desc.digest().to_string() {
        return Err(Error::DigestMismatch {
            what: format!("copy of {}", desc.digest()),
            expected: desc.digest().to_string(),
            actual: digest,
        });
    }
    Ok(Transfer::Streamed)
}

/// Removes the [`BASE_LAYER_ANNOTATION`] from a layer descriptor (and an annotation map left
/// empty by that, as the descriptor had none before).
fn strip_base_mark(d: &mut Descriptor) {
    let Some(mut ann) = d.annotations().clone() else {
        return;
    };
    if ann.remove(BASE_LAYER_ANNOTATION).is_some() {
        d.set_annotations(if ann.is_empty() { None } else { Some(ann) });
    }
}

fn annotations_of(desc: &Descriptor) -> BTreeMap<String, String> {
    desc.annotations()
        .as_ref()
        .map(|a| a.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default()
}

fn without_enc(desc: &Descriptor) -> HashMap<String, String> {
    desc.annotations()
        .as_ref()
        .map(|a| {
            a.iter()
                .filter(|(k, _)| !k.starts_with(ANNOTATION_PREFIX))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default()
}

async fn process_layer(
    ctx: &Arc<Ctx>,
    layer: &Descriptor,
    action: Action,
) -> Result<(Descriptor, LayerNote), Error> {
    if action == Action::Rewrap {
        return rewrap_layer(ctx, layer).await;
    }
    let mut note = LayerNote::default();
    let d = process_data(ctx, layer, action, &mut note).await?;
    Ok((d, note))
}

async fn process_data(
    ctx: &Arc<Ctx>,
    layer: &Descriptor,
    action: Action,
    note: &mut LayerNote,
) -> Result<Descriptor, Error> {
    let id = format!("{}", layer.digest());
    let short = id
        .trim_start_matches("sha256:")
        .chars()
        .take(12)
        .collect::<String>();
    match action {
        Action::Keep | Action::Base => {
            ctx.progress.start(&short, layer.size(), "copy");
            note.transfer = Some(copy_blob(ctx, layer).await?);
            ctx.progress.finish(&short);
            let mut d = layer.clone();
            if action == Action::Base {
                let mut ann = d.annotations().clone().unwrap_or_default();
                ann.insert(BASE_LAYER_ANNOTATION.to_owned(), "true".to_owned());
                d.set_annotations(Some(ann));
            }
            Ok(d)
        }
        Action::Encrypt => {
            let Operation::Encrypt { wrappers } = &ctx.op else {
                unreachable!("encrypt action only for encrypt op")
            };
            let media = mt::encrypted_media_type(layer.media_type().as_ref())?;
            ctx.progress.start(&short, layer.size(), "encrypt");
            let key = LayerKey::generate();
            let nonce = Nonce::generate();
            // Four stages on their own threads, handing owned chunks along: source read +
            // digest check | CTR in place | HMAC | destination digest + write.
            let pool = ChunkPool::standard();
            let plain = ctx.src.open_blob_chunks(layer, pool.clone()).await?;
            let (ctr_tx, ctr_out) = pipeline::chunk_channel(pipeline::DEPTH, pool.clone());
            let (mac_tx, cipher_stream) = pipeline::chunk_channel(pipeline::DEPTH, pool);
            let mut ks = cipher::Keystream::new(&key, &nonce);
            let mut mac = cipher::LayerMac::new(&key);
            let progress = Arc::clone(&ctx.progress);
            let id = short.clone();
            let ctr_task = tokio::task::spawn_blocking(move || {
                if let Some(tx) = cipher_stage(plain, ctr_tx, &*progress, &id, |c| ks.apply(c)) {
                    tx.blocking_finish();
                }
            });
            let mac_task = tokio::task::spawn_blocking(move || {
                let tx = cipher_stage(ctr_out, mac_tx, &NoProgress, "", |c| mac.update(c))?;
                tx.blocking_finish();
                Some(mac.finish())
            });
            let written = ctx
                .dst
                .write_blob_chunks(&media, Some(layer.size()), cipher_stream)
                .await;
            let ctr_done = ctr_task.await;
            let mac = mac_task.await;
            ctr_done.map_err(|e| Error::Image(format!("encrypt thread failed: {e}")))?;
            let mac = mac.map_err(|e| Error::Image(format!("MAC thread failed: {e}")))?;
            let (digest, size) = written?;
            let mac = mac.ok_or(Error::StreamNotFinished)?;
            // The source reader verified the plaintext against this digest at end-of-file, so it
            // is the digest of the bytes actually encrypted.
            let private = PrivateLayerOptions::new(&key, &nonce, layer.digest().to_string());
            let public = PublicLayerOptions::new(&mac);
            let enc_ann = wrap_options(&private, &public, wrappers).await?;
            let mut ann = without_enc(layer);
            ann.extend(enc_ann);
            let mut d = super::layout::descriptor(&media, &digest, size)?;
            d.set_annotations(Some(ann));
            d.set_urls(layer.urls().clone());
            ctx.progress.finish(&short);
            Ok(d)
        }
        Action::Decrypt => {
            let Operation::Decrypt { unwrappers } = &ctx.op else {
                unreachable!("decrypt action only for decrypt op")
            };
            let media = mt::decrypted_media_type(layer.media_type().as_ref())?;
            let (private, public) = unwrap_options(&annotations_of(layer), unwrappers).await?;
            let key = private.key()?;
            let nonce = public.nonce(&private)?;
            ctx.progress.start(&short, layer.size(), "decrypt");
            let expected = cipher::ExpectedMac::from_slice(&public.hmac)?;
            let mut mac = cipher::LayerMac::new(&key);
            let mut ks = cipher::Keystream::new(&key, &nonce);
            // Four stages: source read + digest check | HMAC | CTR in place | destination digest
            // + write. The MAC stage sees the ciphertext before the CTR stage overwrites it.
            let pool = ChunkPool::standard();
            let cipher_stream = ctx.src.open_blob_chunks(layer, pool.clone()).await?;
            let (mac_tx, mac_out) = pipeline::chunk_channel(pipeline::DEPTH, pool.clone());
            let (ctr_tx, plain) = pipeline::chunk_channel(pipeline::DEPTH, pool);
            let progress = Arc::clone(&ctx.progress);
            let id = short.clone();
            let mac_task = tokio::task::spawn_blocking(move || {
                let Some(tx) = cipher_stage(cipher_stream, mac_tx, &*progress, &id, |c| mac.update(c)) else {
                    return false;
                };
                // The destination publishes only after the end marker, which the CTR stage
                // passes on: a MAC mismatch ends the stream with an error instead, and the
                // destination discards what it wrote.
                match mac.verify(&expected) {
                    Ok(()) => {
                        tx.blocking_finish();
                        true
                    }
                    Err(e) => {
                        tx.blocking_fail(to_io(e));
                        false
                    }
                }
            });
            let ctr_task = tokio::task::spawn_blocking(move || {
                if let Some(tx) = cipher_stage(mac_out, ctr_tx, &NoProgress, "", |c| ks.apply(c)) {
                    tx.blocking_finish();
                }
            });
            let written = ctx.dst.write_blob_chunks(&media, Some(layer.size()), plain).await;
            let verified = mac_task.await;
            let ctr_done = ctr_task.await;
            let verified = verified.map_err(|e| Error::Image(format!("MAC thread failed: {e}")))?;
            ctr_done.map_err(|e| Error::Image(format!("decrypt thread failed: {e}")))?;
            let (digest, size) = written?;
            if !verified {
                return Err(Error::AuthenticationFailed);
            }
            let mut d = super::layout::descriptor(&media, &digest, size)?;
            let ann = without_enc(layer);
            d.set_annotations(if ann.is_empty() { None } else { Some(ann) });
            d.set_urls(layer.urls().clone());
            ctx.progress.finish(&short);
            Ok(d)
        }
        Action::Rewrap => unreachable!("rewrap is handled by rewrap_layer"),
    }
}

/// Changes a layer's recipients (add, set, remove) without touching its data.
async fn rewrap_layer(ctx: &Arc<Ctx>, layer: &Descriptor) -> Result<(Descriptor, LayerNote), Error> {
    let old = annotations_of(layer);
    let mut note = LayerNote::default();
    let present =
        LayerRecipients::from_annotations(&old).map_err(|e| Error::Recipients(RemoveError::Malformed(e)));
    let (unwrappers, wrappers, replace) = match &ctx.op {
        Operation::RemoveRecipients { ids } => {
            let present = present?;
            ctx.present
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .extend(present.ids());
            let want: BTreeSet<String> = ids.iter().cloned().collect();
            let r = recipients::remove_from_annotations(&old, &want)?;
            ctx.found
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .extend(r.removed.iter().cloned());
            copy_blob(ctx, layer).await?;
            let mut d = layer.clone();
            d.set_annotations(Some(r.annotations.into_iter().collect()));
            note.removed = r.removed.into_iter().collect();
            return Ok((d, note));
        }
        Operation::AddRecipients { unwrappers, wrappers } => {
            // Recipients the layer already has are not added again.
            let present = present.map(|p| p.ids()).unwrap_or_default();
            let mut chosen: Vec<Arc<dyn AsyncKeyWrapper>> = Vec::new();
            for w in wrappers {
                let ids = w.recipient_ids();
                let (have, missing): (Vec<String>, Vec<String>) =
                    ids.into_iter().partition(|i| present.contains(i));
                if have.is_empty() {
                    chosen.push(Arc::clone(w));
                } else if !missing.is_empty() {
                    chosen.push(w.subset(&missing).unwrap_or_else(|| Arc::clone(w)));
                }
                note.skipped.extend(have);
            }
            if chosen.is_empty() {
                copy_blob(ctx, layer).await?;
                return Ok((layer.clone(), note));
            }
            (unwrappers, chosen, false)
        }
        Operation::SetRecipients { unwrappers, wrappers } => (unwrappers, wrappers.clone(), true),
        _ => unreachable!("rewrap action only for recipient ops"),
    };
    let (private, public) = unwrap_options(&old, unwrappers).await?;
    let new = wrap_options(&private, &public, &wrappers).await?;
    let mut ann: HashMap<String, String> = if replace {
        without_enc(layer)
    } else {
        layer.annotations().clone().unwrap_or_default()
    };
    for (k, v) in new {
        if k == mt::PUBOPTS_ANNOTATION {
            ann.insert(k, v);
            continue;
        }
        match ann.get_mut(&k) {
            Some(existing) if !existing.is_empty() => {
                existing.push(',');
                existing.push_str(&v);
            }
            _ => {
                ann.insert(k, v);
            }
        }
    }
    copy_blob(ctx, layer).await?;
    let mut d = layer.clone();
    d.set_annotations(Some(ann));
    Ok((d, note))
}

/// A cipher stage of a layer (CTR or HMAC), on a blocking thread: applies `f` to each chunk of
/// `input` in place and passes it on to `output`, reporting progress. Returns `output` when `input` ended
/// cleanly, for the caller to end it; on an error in `input` it forwards the error to `output`
/// and returns `None`, as it does when `output`'s receiver is gone.
fn cipher_stage(
    mut input: ChunkReceiver,
    output: ChunkSender,
    progress: &dyn Progress,
    id: &str,
    mut f: impl FnMut(&mut [u8]),
) -> Option<ChunkSender> {
    while let Some(chunk) = input.blocking_recv() {
        match chunk {
            Ok(mut c) => {
                f(&mut c);
                progress.advance(id, c.len() as u64);
                output.blocking_send(c).ok()?;
            }
            Err(e) => {
                output.blocking_fail(e);
                return None;
            }
        }
    }
    Some(output)
}

/// One wrapped-key scheme on a layer.
#[derive(Debug, Clone, Serialize)]
pub struct SchemeInfo {
    /// `jwe`, `pkcs7`, `pgp`, `provider.<name>`…
    pub scheme: String,
    /// Comma entries (one per wrap operation).
    pub entries: usize,
    /// Recipients, where the scheme shows them (JWE: recipients per entry, summed).
    pub recipients: Option<usize>,
}

/// One layer, as seen by [`inspect`].
#[derive(Debug, Clone, Serialize)]
pub struct LayerInfo {
    /// Index in its manifest.
    pub index: usize,
    /// Digest.
    pub digest: String,
    /// Size.
    pub size: u64,
    /// Media type.
    pub media_type: String,
    /// Whether encrypted.
    pub encrypted: bool,
    /// Schemes it is encrypted for.
    pub schemes: Vec<SchemeInfo>,
    /// Who can decrypt it: JWE key ids (RFC 7638 thumbprints) and other schemes' entries.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recipients: Option<LayerRecipients>,
    /// Left unencrypted by `encrypt --skip-base` because the base image has it (the
    /// [`BASE_LAYER_ANNOTATION`] mark).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub base: bool,
}

/// One manifest, as seen by [`inspect`].
#[derive(Debug, Clone, Serialize)]
pub struct ManifestInfo {
    /// Digest.
    pub digest: String,
    /// Platform (multi-arch images).
    pub platform: Option<String>,
    /// Layers.
    pub layers: Vec<LayerInfo>,
}

/// An image, as seen by [`inspect`].
#[derive(Debug, Clone, Serialize)]
pub struct ImageInfo {
    /// The image reference.
    pub image: String,
    /// Digest of the top-level manifest or index.
    pub digest: String,
    /// Media type of the top-level manifest or index.
    pub media_type: String,
    /// Manifests (one unless multi-arch).
    pub manifests: Vec<ManifestInfo>,
}

async fn manifests_of(
    src: &dyn ImageSource,
) -> Result<(Descriptor, Vec<(Descriptor, ImageManifest)>), Error> {
    let root = src.root().await?;
    let bytes = src.read_small(&root).await?;
    let mut out = Vec::new();
    if is_index(root.media_type().as_ref(), &bytes) {
        let index = ImageIndex::from_reader(&bytes[..])
            .map_err(|e| Error::Image(format!("index {} does not parse: {e}", root.digest())))?;
        for child in index.manifests() {
            let b = src.read_small(child).await?;
            let m = ImageManifest::from_reader(&b[..])
                .map_err(|e| Error::Image(format!("manifest {} does not parse: {e}", child.digest())))?;
            out.push((child.clone(), m));
        }
    } else {
        let m = ImageManifest::from_reader(&bytes[..])
            .map_err(|e| Error::Image(format!("manifest {} does not parse: {e}", root.digest())))?;
        out.push((root.clone(), m));
    }
    Ok((root, out))
}

/// Describes an image: which layers are encrypted, for which schemes and how many recipients.
///
/// # Errors
/// Image-level errors (unreadable or malformed manifests).
pub async fn inspect(src: &dyn ImageSource) -> Result<ImageInfo, Error> {
    let (root, manifests) = manifests_of(src).await?;
    let manifests = manifests
        .into_iter()
        .map(|(d, m)| ManifestInfo {
            digest: d.digest().to_string(),
            platform: d.platform().as_ref().map(platform_name),
            layers: m
                .layers()
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    let ann = annotations_of(l);
                    let who = LayerRecipients::from_annotations(&ann).ok();
                    let schemes = schemes_present(&ann)
                        .into_iter()
                        .map(|(scheme, entries)| {
                            let recipients = match recipients::id_scheme(&scheme) {
                                Some(_) => who.as_ref().map(|w| w.of(&scheme).len()),
                                None => None,
                            };
                            SchemeInfo {
                                scheme,
                                entries,
                                recipients,
                            }
                        })
                        .collect();
                    LayerInfo {
                        index: i,
                        digest: l.digest().to_string(),
                        size: l.size(),
                        media_type: l.media_type().to_string(),
                        encrypted: mt::is_encrypted(l.media_type().as_ref()),
                        schemes,
                        recipients: who.filter(|w| w.count() > 0),
                        base: ann.get(BASE_LAYER_ANNOTATION).map(String::as_str) == Some("true"),
                    }
                })
                .collect(),
        })
        .collect();
    Ok(ImageInfo {
        image: src.describe(),
        digest: root.digest().to_string(),
        media_type: root.media_type().to_string(),
        manifests,
    })
}

/// The outcome of [`check_authorization`] for one encrypted layer.
#[derive(Debug, Clone, Serialize)]
pub struct LayerCheck {
    /// Platform, for multi-arch images.
    pub platform: Option<String>,
    /// Layer index.
    pub index: usize,
    /// Layer digest.
    pub digest: String,
    /// `None` when the keys unwrap it, else why not.
    pub error: Option<String>,
}

/// An encrypted layer that a selection left out of [`check_report`].
#[derive(Debug, Clone, Serialize)]
pub struct UncheckedLayer {
    /// Platform of its manifest (or the manifest digest when it names none).
    pub platform: String,
    /// Layer index.
    pub index: usize,
    /// Layer digest.
    pub digest: String,
}

/// What [`check_report`] found.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    /// One entry per encrypted layer checked.
    pub checked: Vec<LayerCheck>,
    /// The encrypted layers of the image the selection excluded (not checked).
    pub unchecked: Vec<UncheckedLayer>,
}

/// Checks whether `unwrappers` can unwrap the key of every encrypted layer of every selected
/// platform, without reading layer data. Returns one entry per encrypted layer checked; see
/// [`check_report`] for the encrypted layers the selection left out too.
///
/// # Errors
/// As [`check_report`].
pub async fn check_authorization(
    src: &dyn ImageSource,
    unwrappers: &[Arc<dyn AsyncKeyUnwrapper>],
    sel: &LayerSelection,
) -> Result<Vec<LayerCheck>, Error> {
    check_report(src, unwrappers, sel).await.map(|r| r.checked)
}

/// As [`check_authorization`], and lists the encrypted layers the selection excluded: the image
/// is authorized for everything only when no entry of `checked` has an error **and**
/// `unchecked` is empty.
///
/// # Errors
/// Image-level errors; [`Error::Selection`] when `sel` names a platform the image does not
/// have, or selects no encrypted layer of an image that has some (nothing would be checked:
/// never a silent pass). Per-layer failures are in the result.
pub async fn check_report(
    src: &dyn ImageSource,
    unwrappers: &[Arc<dyn AsyncKeyUnwrapper>],
    sel: &LayerSelection,
) -> Result<CheckReport, Error> {
    let (root, manifests) = manifests_of(src).await?;
    let image = src.describe();
    let single = manifests.len() == 1 && root.digest() == manifests[0].0.digest();
    if single {
        // Its platform is in its config: checked here, so the manifest is selected below.
        let bytes = src.read_small(&root).await?;
        sel.check_single(src, &image, &bytes).await?;
    } else {
        let descs: Vec<Descriptor> = manifests.iter().map(|(d, _)| d.clone()).collect();
        sel.check_index(&image, &descs)?;
    }
    let mut out = Vec::new();
    let mut unchecked = BTreeSet::new();
    let mut unchecked_layers = Vec::new();
    for (d, m) in manifests {
        if !single && !sel.platform_selected(d.platform().as_ref()) {
            let name = d
                .platform()
                .as_ref()
                .map_or_else(|| d.digest().to_string(), platform_name);
            for (i, l) in m.layers().iter().enumerate() {
                if mt::is_encrypted(l.media_type().as_ref()) {
                    unchecked.insert(name.clone());
                    unchecked_layers.push(UncheckedLayer {
                        platform: name.clone(),
                        index: i,
                        digest: l.digest().to_string(),
                    });
                }
            }
            continue;
        }
        for (i, l) in m.layers().iter().enumerate() {
            if !mt::is_encrypted(l.media_type().as_ref()) {
                continue;
            }
            let r = unwrap_options(&annotations_of(l), unwrappers).await;
            // Everything decrypt checks before reading layer data, failing the same way: the
            // unwrapped key, the nonce, the recorded MAC and the media type it would produce.
            if let Ok((private, public)) = &r {
                let valid = (|| -> Result<(), Error> {
                    mt::decrypted_media_type(l.media_type().as_ref())?;
                    private.key()?;
                    public.nonce(private)?;
                    cipher::ExpectedMac::from_slice(&public.hmac)?;
                    Ok(())
                })();
                if let Err(e) = valid {
                    let image = match d.platform() {
                        Some(p) => format!("{} ({})", src.describe(), platform_name(p)),
                        None => src.describe(),
                    };
                    return Err(Error::Layer {
                        image,
                        index: i,
                        digest: l.digest().to_string(),
                        source: Box::new(e),
                    });
                }
            }
            out.push(LayerCheck {
                platform: d.platform().as_ref().map(platform_name),
                index: i,
                digest: l.digest().to_string(),
                error: r.err().map(|e| keywrap::error_chain(&e)),
            });
        }
    }
    if out.is_empty() && !unchecked.is_empty() {
        return Err(Error::Selection(format!(
            "--platform {} selects no encrypted layer of {image}, so nothing would be checked; encrypted layers are on: {}",
            sel.platforms.join(","),
            unchecked.into_iter().collect::<Vec<_>>().join(", ")
        )));
    }
    Ok(CheckReport {
        checked: out,
        unchecked: unchecked_layers,
    })
}

/// A spawned task that is aborted when its handle is dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

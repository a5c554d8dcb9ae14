//! Running a validated [`Config`].

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use ocicrypt_core::image::layout::OciLayout;
use ocicrypt_core::image::ops::{self, ImageInfo, LayerCheck, Operation};
use ocicrypt_core::image::{ImageDest, ImageSource, LayerSelection};
use ocicrypt_core::{keys, AsyncKeyUnwrapper};
use serde_json::json;

use crate::config::{Access, Config, KeyType, Keys, OpSpec, Output, Transform};
use crate::error::{from_core, CliError, ErrorKind, KeyContext};
use crate::{progress, schemes};
use imgcrypt_registry::archive::{ArchiveDest, ArchiveKind, ArchiveSource};
use imgcrypt_registry::{ImageRef, RegistryImage};

/// Where a command writes its results.
pub struct Ctx<'a> {
    /// stdout (results).
    pub out: &'a mut dyn Write,
    /// Output settings.
    pub output: Output,
    /// Whether stderr is a terminal (progress bars).
    pub tty: bool,
}

impl Ctx<'_> {
    fn print(&mut self, s: &str) {
        let _ = writeln!(self.out, "{s}");
    }

    fn json(&mut self, v: &serde_json::Value) {
        let _ = writeln!(
            self.out,
            "{}",
            serde_json::to_string_pretty(v).unwrap_or_default()
        );
    }
}

/// Runs a command.
///
/// # Errors
/// A [`CliError`] for the user.
pub async fn execute(cfg: Config, ctx: &mut Ctx<'_>) -> Result<(), CliError> {
    match cfg {
        Config::Transform(t) => transform(*t, ctx).await,
        Config::Inspect { image, access } => inspect(&image, &access, ctx).await,
        Config::Check {
            image,
            access,
            keys,
            platforms,
        } => check(&image, &access, keys, platforms, ctx).await,
        Config::KeyId { files } => key_id(&files, ctx),
        Config::Keygen {
            kind,
            private,
            public,
            force,
        } => keygen(kind, &private, &public, force, ctx),
        Config::KpWrap { root_key, file } => kp_wrap(&root_key, &file, ctx).await,
        Config::KpUnwrap {
            root_key,
            out,
            force,
            ciphertext,
        } => kp_unwrap(&root_key, out.as_deref(), force, ciphertext, ctx).await,
        Config::Demo { dir } => crate::demo::run(dir, ctx).await,
    }
}

/// Opens an image to read from; checks that the image exists in a layout.
///
/// # Errors
/// [`ErrorKind::BadReference`].
pub async fn open_source(r: &ImageRef, access: &Access) -> Result<Arc<dyn ImageSource>, CliError> {
    match r {
        ImageRef::Layout { path, tag } => {
            let layout = OciLayout::open(path, tag.as_deref())
                .map_err(|e| CliError::new(ErrorKind::BadReference, format!("{r}: {e}")))?;
            layout
                .resolve(tag.as_deref())
                .map_err(|e| CliError::new(ErrorKind::BadReference, format!("{r}: {e}")))?;
            Ok(Arc::new(layout))
        }
        ImageRef::Registry(reg) => Ok(Arc::new(
            RegistryImage::connect(reg.clone(), access.clone(), false).await?,
        )),
        ImageRef::OciArchive { path, tag } => {
            let (p, t) = (path.clone(), tag.clone());
            blocking(r, move || ArchiveSource::open_oci(&p, t.as_deref())).await
        }
        ImageRef::DockerArchive { path, name } => {
            let (p, n) = (path.clone(), name.clone());
            blocking(r, move || ArchiveSource::open_docker(&p, n.as_deref())).await
        }
    }
}

/// Opens an archive (a blocking scan of its members) off the async threads.
async fn blocking(
    r: &ImageRef,
    f: impl FnOnce() -> Result<ArchiveSource, ocicrypt_core::Error> + Send + 'static,
) -> Result<Arc<dyn ImageSource>, CliError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(s)) => Ok(Arc::new(s)),
        Ok(Err(e)) => Err(CliError::new(ErrorKind::BadReference, format!("{r}: {e}"))),
        Err(e) => Err(CliError::new(ErrorKind::Failure, format!("{r}: {e}"))),
    }
}

/// Checks, before anything is created, that a destination path can be written: its parent
/// directory exists (as skopeo, missing parents are not created) and the directory that will be
/// written to accepts writes. The error is an I/O failure (exit 1) naming the path and the reason.
fn writable_destination(r: &ImageRef, path: &Path) -> Result<(), CliError> {
    let fail = |msg: String| {
        CliError::new(
            ErrorKind::Failure,
            format!("cannot write the destination {r}: {msg}; nothing was written"),
        )
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let target = match std::fs::symlink_metadata(path) {
        Ok(_) => path.to_path_buf(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match std::fs::metadata(&parent) {
            Ok(m) if m.is_dir() => parent,
            Ok(_) => {
                return Err(fail(format!("{} is not a directory", parent.display()))
                    .hint("the parent of a destination must be an existing directory"))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(20) => {
                return Err(fail(format!(
                    "its parent directory {} does not exist",
                    parent.display()
                ))
                .hint(format!(
                    "create it first (mkdir -p {}), or write somewhere else",
                    parent.display()
                )))
            }
            Err(e) => return Err(fail(format!("{}: {e}", parent.display()))),
        },
        Err(e) if e.raw_os_error() == Some(20) => {
            return Err(fail(format!(
                "a component of {} is not a directory",
                path.display()
            )))
        }
        Err(e) => return Err(fail(format!("{}: {e}", path.display()))),
    };
    if let Err(e) = rustix::fs::access(&target, rustix::fs::Access::WRITE_OK) {
        let why = std::io::Error::from(e);
        return Err(fail(format!("{} is not writable ({why})", target.display()))
            .hint("choose a destination on a writable file system, in a directory you may write to"));
    }
    Ok(())
}

async fn open_dest(r: &ImageRef, access: &Access) -> Result<Arc<dyn ImageDest>, CliError> {
    match r {
        ImageRef::Layout { path, tag } => {
            writable_destination(r, path)?;
            let layout = OciLayout::open_or_create(path, tag.as_deref()).map_err(|e| match e {
                ocicrypt_core::Error::Io(e) => CliError::new(
                    ErrorKind::Failure,
                    format!(
                        "cannot write the destination {r}: creating the layout in {} failed: {e}; nothing was written",
                        path.display()
                    ),
                ),
                e => CliError::new(ErrorKind::BadReference, format!("destination {r}: {e}"))
                    .hint("the destination must be an OCI layout, or a missing or empty directory"),
            })?;
            Ok(Arc::new(layout))
        }
        ImageRef::Registry(reg) => Ok(Arc::new(
            RegistryImage::connect(reg.clone(), access.clone(), true).await?,
        )),
        ImageRef::OciArchive { path, tag } => archive_dest(r, path, ArchiveKind::Oci { tag: tag.clone() }),
        ImageRef::DockerArchive { path, name } => {
            archive_dest(r, path, ArchiveKind::Docker { name: name.clone() })
        }
    }
}

fn archive_dest(r: &ImageRef, path: &Path, kind: ArchiveKind) -> Result<Arc<dyn ImageDest>, CliError> {
    writable_destination(r, path)?;
    ArchiveDest::create(path, kind)
        .map(|d| Arc::new(d) as Arc<dyn ImageDest>)
        .map_err(|e| CliError::new(ErrorKind::BadReference, format!("destination {r}: {e}")))
}

/// Whether two paths name the same directory (the second may not exist yet).
fn same_dir(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

fn human_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn short(d: &str) -> String {
    let hex = d.trim_start_matches("sha256:");
    format!("sha256:{}", &hex[..hex.len().min(12)])
}

/// The key id (RFC 7638 thumbprint) of a key file: a public key, or an unencrypted private key.
///
/// # Errors
/// [`ErrorKind::KeyFile`] when the file holds neither.
pub fn key_file_id(path: &Path) -> Result<String, CliError> {
    match keys::PublicKey::from_file(path) {
        Ok(k) => Ok(k.thumbprint()),
        Err(public_err) => match keys::PrivateKey::from_file(path, None) {
            Ok(k) => Ok(k.thumbprint()),
            Err(keys::KeyError::NeedsPassword { .. }) => Err(CliError::new(
                ErrorKind::KeyFile,
                format!("{}: an encrypted private key", path.display()),
            )
            .hint("use its public key file instead (its id is the same)")),
            Err(_) => Err(CliError::from(public_err)),
        },
    }
}

fn key_id(files: &[std::path::PathBuf], ctx: &mut Ctx<'_>) -> Result<(), CliError> {
    let mut out = Vec::new();
    for f in files {
        out.push((f.display().to_string(), key_file_id(f)?));
    }
    if ctx.output.json {
        ctx.json(&json!(out
            .iter()
            .map(|(f, id)| json!({"file": f, "key_id": id}))
            .collect::<Vec<_>>()));
    } else {
        for (f, id) in &out {
            if files.len() == 1 {
                ctx.print(id);
            } else {
                ctx.print(&format!("{id}  {f}"));
            }
        }
    }
    Ok(())
}

/// Names for key ids: `jwe:FILE`, `pkcs7:FILE`, `pgp:FILE` for the recipients given on the
/// command line (gpg names are not looked up a second time).
fn recipient_labels(
    recipients: &[crate::keyspec::RecipientSpec],
) -> std::collections::BTreeMap<String, String> {
    use crate::keyspec::RecipientSpec;
    let mut out = std::collections::BTreeMap::new();
    for r in recipients {
        match r {
            RecipientSpec::Jwe(p) => {
                if let Ok(id) = key_file_id(p) {
                    out.insert(id, format!("jwe:{}", p.display()));
                }
            }
            RecipientSpec::Pkcs7(p) => {
                if let Ok(c) = ocicrypt_core::pkcs7::Certificate::from_file(p) {
                    out.insert(c.recipient_id(), format!("pkcs7:{}", p.display()));
                }
            }
            RecipientSpec::Pgp(v) if Path::new(v).is_file() => {
                for k in ocicrypt_core::pgp::PgpPublicKey::from_file(Path::new(v)).unwrap_or_default() {
                    if let Some(id) = k.encryption_key_id() {
                        out.insert(id, format!("pgp:{v}"));
                    }
                }
            }
            _ => {}
        }
    }
    out
}

fn label(labels: &std::collections::BTreeMap<String, String>, id: &str) -> String {
    match labels.get(id) {
        Some(l) => format!("{id} ({l})"),
        None => id.to_owned(),
    }
}

async fn transform(t: Transform, ctx: &mut Ctx<'_>) -> Result<(), CliError> {
    let op_name = t.op.name();
    let labels = match &t.op {
        OpSpec::Encrypt { recipients }
        | OpSpec::AddRecipients { recipients, .. }
        | OpSpec::SetRecipients { recipients, .. } => recipient_labels(recipients),
        OpSpec::RemoveRecipients { ids } => ids.iter().cloned().collect(),
        OpSpec::Decrypt { .. } => Default::default(),
    };
    let (op, keyctx) = match t.op {
        OpSpec::Encrypt { recipients } => (
            Operation::Encrypt {
                wrappers: schemes::wrappers(&recipients)?,
            },
            KeyContext::default(),
        ),
        OpSpec::Decrypt { keys } => {
            let (unwrappers, kc) = schemes::unwrappers(keys)?;
            (Operation::Decrypt { unwrappers }, kc)
        }
        OpSpec::AddRecipients { keys, recipients } => {
            let wrappers = schemes::wrappers(&recipients)?;
            let (unwrappers, kc) = schemes::unwrappers(keys)?;
            (Operation::AddRecipients { unwrappers, wrappers }, kc)
        }
        OpSpec::SetRecipients { keys, recipients } => {
            let wrappers = schemes::wrappers(&recipients)?;
            let (unwrappers, kc) = schemes::unwrappers(keys)?;
            (Operation::SetRecipients { unwrappers, wrappers }, kc)
        }
        OpSpec::RemoveRecipients { ids } => (
            Operation::RemoveRecipients {
                ids: ids.into_iter().map(|(id, _)| id).collect(),
            },
            KeyContext::default(),
        ),
    };
    let src = open_source(&t.src, &t.src_access).await?;
    // Surface a missing image or an unreachable source before creating anything.
    let src_root = src.root().await.map_err(|e| from_core(&e, &keyctx))?;
    let mut selection = t.selection;
    if let Some(base) = &t.skip_base {
        let b = open_source(base, &t.src_access).await.map_err(|mut e| {
            e.message = format!("--skip-base: {}", e.message);
            e
        })?;
        let layers = ocicrypt_core::image::base::BaseImage::read(b.as_ref())
            .await
            .map_err(|e| {
                let mut c = from_core(&e, &keyctx);
                c.message = format!("--skip-base {base}: {}", c.message);
                c
            })?;
        selection.skip_base = Some(Arc::new(layers));
    }
    // Writing a layout onto itself: what the replaced image alone used is removed afterwards.
    let in_place_layout = match (&t.src, &t.dst) {
        (ImageRef::Layout { path: a, tag }, ImageRef::Layout { path: b, .. }) if same_dir(a, b) => {
            let layout = OciLayout::open(a, tag.as_deref())
                .map_err(|e| CliError::new(ErrorKind::BadReference, format!("{}: {e}", t.src)))?;
            let old = ocicrypt_core::image::gc::reachable(&layout, &src_root)
                .map_err(|e| from_core(&e, &keyctx))?;
            Some((layout, old))
        }
        _ => None,
    };
    let dst = open_dest(&t.dst, &t.dst_access).await?;
    let show = ctx.tty && !ctx.output.json && !ctx.output.quiet;
    crate::interrupt::arm(Arc::clone(&dst));
    let report = ops::transform_image(src, dst, op, selection, progress::reporter(show), t.concurrency).await;
    crate::interrupt::disarm();
    let report = report.map_err(|e| {
        let mut c = from_core(&e, &keyctx);
        let left = match &t.dst {
            ImageRef::Layout { .. } => format!("nothing was written to {}", t.dst),
            ImageRef::Registry(_) => format!("no tag was pushed to {}", t.dst),
            ImageRef::OciArchive { .. } | ImageRef::DockerArchive { .. } => {
                format!("nothing was written to {}", t.dst)
            }
        };
        c.message.push_str(&format!("; {left}"));
        c
    })?;
    let pruned = match &in_place_layout {
        Some((layout, old)) => Some(
            ocicrypt_core::image::gc::prune_replaced(layout, old).map_err(|e| {
                let mut c = from_core(&e, &keyctx);
                c.message = format!(
                    "{} was written, but removing the blobs only the replaced image used failed: {}",
                    t.dst, c.message
                );
                c
            })?,
        ),
        None => None,
    };
    if let (ImageRef::Registry(a), ImageRef::Registry(b)) = (&t.src, &t.dst) {
        if a.host == b.host && a.repo == b.repo && !ctx.output.quiet && !ctx.output.json {
            eprintln!(
                "note: {} now names the new manifest; the replaced manifest {} and the blobs only it used (e.g. plaintext layers, or a removed recipient's wrapped keys) stay in the registry, fetchable by digest, until they are deleted and the registry is garbage-collected",
                t.dst, src_root.digest()
            );
        }
    }
    let changed = report
        .layers
        .iter()
        .filter(|l| !matches!(l.action, "kept" | "unchanged" | "base"))
        .count();
    let encrypted_seen = report.layers.iter().any(|l| l.recipients.is_some());
    if changed == 0 && !ctx.output.json && !ctx.output.quiet {
        let what = match op_name {
            "encrypt" => "no selected layer could be encrypted",
            "decrypt" => "no selected layer is encrypted",
            "recipients add" if encrypted_seen => {
                "every recipient given already has access to every selected layer, so nothing changed"
            }
            _ => "no selected layer is encrypted, so no recipients changed",
        };
        eprintln!("note: {what}; {} is a copy of {}", t.dst, t.src);
    }
    if ctx.output.json {
        ctx.json(&json!({
            "operation": op_name,
            "source": t.src.to_string(),
            "destination": t.dst.to_string(),
            "digest": report.digest,
            "media_type": report.media_type,
            "layers": report.layers,
            "removed_blobs": pruned.as_ref().map(|p| p.removed.iter().map(|(d, _)| d.clone()).collect::<Vec<_>>()),
        }));
    } else if !ctx.output.quiet {
        let mut counts = std::collections::BTreeMap::<&str, usize>::new();
        for l in &report.layers {
            *counts.entry(l.action).or_default() += 1;
        }
        let summary = counts
            .iter()
            .map(|(a, n)| format!("{n} {a}"))
            .collect::<Vec<_>>()
            .join(", ");
        ctx.print(&format!("{op_name}: {} -> {} ({summary})", t.src, t.dst));
        for l in &report.layers {
            let plat = l.platform.as_deref().map(|p| format!("{p} ")).unwrap_or_default();
            let change = if l.from == l.to {
                short(&l.from)
            } else {
                format!("{} -> {}", short(&l.from), short(&l.to))
            };
            let via = match l.transfer {
                Some(ocicrypt_core::image::Transfer::Reflink) => ", reflinked",
                Some(ocicrypt_core::image::Transfer::KernelCopy) => ", copied in the kernel",
                Some(ocicrypt_core::image::Transfer::Mounted) => ", mounted from the source repository",
                _ => "",
            };
            ctx.print(&format!(
                "  {plat}layer {}: {:<9} {change} ({}{via})",
                l.index,
                l.action,
                human_size(l.size)
            ));
            if !l.removed.is_empty() {
                let v: Vec<String> = l.removed.iter().map(|id| label(&labels, id)).collect();
                ctx.print(&format!("    removed: {}", v.join(", ")));
            }
            if !l.skipped.is_empty() {
                let v: Vec<String> = l.skipped.iter().map(|id| label(&labels, id)).collect();
                ctx.print(&format!(
                    "    already a recipient, not added again: {}",
                    v.join(", ")
                ));
            }
            if let Some(r) = &l.recipients {
                let who: Vec<String> = r
                    .describe()
                    .iter()
                    .map(|d| match d.split_once(':') {
                        Some((scheme, id)) if labels.contains_key(id) => {
                            format!("{scheme}:{}", label(&labels, id))
                        }
                        _ => d.clone(),
                    })
                    .collect();
                ctx.print(&format!("    can decrypt: {}", who.join(", ")));
            }
        }
        ctx.print(&format!("  result: {} {}", report.media_type, report.digest));
        if let Some(p) = &pruned {
            if p.removed.is_empty() {
                if t.src.to_string() == t.dst.to_string() {
                    ctx.print("  in place: no blob of the replaced image was removed (the new image or another tag still uses them)");
                }
            } else {
                ctx.print(&format!(
                    "  in place: removed {} blob(s) ({} layer(s), {}) that only the replaced image used and no other tag uses",
                    p.removed.len(),
                    p.layers(),
                    human_size(p.bytes)
                ));
            }
        }
    }
    Ok(())
}

fn scheme_text(l: &ops::LayerInfo) -> String {
    l.schemes
        .iter()
        .map(|s| match s.recipients {
            Some(r) => format!("{} ({} recipient{})", s.scheme, r, if r == 1 { "" } else { "s" }),
            None => format!(
                "{} ({} entr{})",
                s.scheme,
                s.entries,
                if s.entries == 1 { "y" } else { "ies" }
            ),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Reads what [`ops::inspect`] reports.
///
/// # Errors
/// Classified errors.
pub async fn inspect_info(image: &ImageRef, access: &Access) -> Result<ImageInfo, CliError> {
    let src = open_source(image, access).await?;
    ops::inspect(src.as_ref())
        .await
        .map_err(|e| from_core(&e, &KeyContext::default()))
}

async fn inspect(image: &ImageRef, access: &Access, ctx: &mut Ctx<'_>) -> Result<(), CliError> {
    let info = inspect_info(image, access).await?;
    if ctx.output.json {
        ctx.json(&serde_json::to_value(&info).unwrap_or_default());
        return Ok(());
    }
    ctx.print(&format!("image:  {}", info.image));
    ctx.print(&format!("digest: {} ({})", info.digest, info.media_type));
    for m in &info.manifests {
        let enc = m.layers.iter().filter(|l| l.encrypted).count();
        let plat = m
            .platform
            .as_deref()
            .map(|p| format!("platform {p}, "))
            .unwrap_or_default();
        let base = m.layers.iter().filter(|l| l.base).count();
        let base = if base > 0 {
            format!(", {base} base")
        } else {
            String::new()
        };
        ctx.print(&format!(
            "{plat}manifest {}: {} layer(s), {enc} encrypted{base}",
            m.digest,
            m.layers.len()
        ));
        for l in &m.layers {
            let state = if l.encrypted {
                format!("encrypted for {}", scheme_text(l))
            } else if l.base {
                "plain (base layer: left unencrypted by encrypt --skip-base)".to_owned()
            } else {
                "plain".to_owned()
            };
            ctx.print(&format!(
                "  layer {}: {} {:>10}  {}  {state}",
                l.index,
                l.digest,
                human_size(l.size),
                l.media_type
            ));
            if let Some(r) = &l.recipients {
                for who in r.describe() {
                    ctx.print(&format!("    recipient {who}"));
                }
            }
        }
    }
    Ok(())
}

async fn check(
    image: &ImageRef,
    access: &Access,
    keys: Keys,
    platforms: Vec<String>,
    ctx: &mut Ctx<'_>,
) -> Result<(), CliError> {
    let (unwrappers, keyctx) = schemes::unwrappers(keys)?;
    let src = open_source(image, access).await?;
    let sel = LayerSelection {
        platforms,
        ..LayerSelection::default()
    };
    let report = ops::check_report(src.as_ref(), &unwrappers, &sel)
        .await
        .map_err(|e| from_core(&e, &keyctx))?;
    let checks: Vec<LayerCheck> = report.checked;
    let unchecked = report.unchecked;
    let failed: Vec<&LayerCheck> = checks.iter().filter(|c| c.error.is_some()).collect();
    let total = checks.len() + unchecked.len();
    let details = json!({
        "image": image.to_string(),
        "authorized": failed.is_empty() && unchecked.is_empty(),
        "encrypted_layers": total,
        "checked_layers": checks.len(),
        "layers": checks,
        "unchecked_layers": unchecked,
    });
    // "checked X of Y encrypted layers", and the layers a --platform left out.
    let coverage = format!("checked {} of {total} encrypted layer(s)", checks.len());
    let left_out = if unchecked.is_empty() {
        String::new()
    } else {
        let v: Vec<String> = unchecked
            .iter()
            .map(|u| format!("{} layer {} ({})", u.platform, u.index, short(&u.digest)))
            .collect();
        format!("; not checked (excluded by --platform): {}", v.join(", "))
    };
    if failed.is_empty() && unchecked.is_empty() {
        if ctx.output.json {
            ctx.json(&details);
        } else if !ctx.output.quiet {
            if checks.is_empty() {
                ctx.print(&format!("{image}: no encrypted layers (nothing to check)"));
            } else {
                ctx.print(&format!(
                    "{image}: the keys ({}) can decrypt all {} encrypted layer(s) ({coverage})",
                    keyctx.key_sources.join(", "),
                    checks.len()
                ));
            }
        }
        return Ok(());
    }
    if failed.is_empty() {
        // Never exit 0 for an image with encrypted layers that were not checked.
        let mut e = CliError::new(
            ErrorKind::PartialCheck,
            format!(
                "{image}: the keys ({}) can decrypt the {} encrypted layer(s) of --platform {}, but the image has encrypted layers that were not checked: {coverage}{left_out}",
                keyctx.key_sources.join(", "),
                checks.len(),
                sel.platforms.join(",")
            ),
        )
        .hint("run check without --platform to check every layer; exit 11 means exactly this: what was selected opens, the rest was not looked at");
        e.details = Some(Box::new(details));
        return Err(e);
    }
    // Missing key (no key for the layer's schemes) or wrong key (keys tried, none worked)?
    let info = ops::inspect(src.as_ref())
        .await
        .map_err(|e| from_core(&e, &keyctx))?;
    let have: BTreeSet<&str> = unwrappers
        .iter()
        .map(|u| AsyncKeyUnwrapper::scheme(u.as_ref()))
        .collect();
    let mut wrong = false;
    let mut lines = Vec::new();
    for f in &failed {
        let schemes: Vec<String> = info
            .manifests
            .iter()
            .flat_map(|m| m.layers.iter())
            .find(|l| l.digest == f.digest)
            .map(|l| l.schemes.iter().map(|s| s.scheme.clone()).collect())
            .unwrap_or_default();
        if schemes.iter().any(|s| have.contains(s.as_str())) {
            wrong = true;
        }
        let plat = f
            .platform
            .as_deref()
            .map(|p| format!(" ({p})"))
            .unwrap_or_default();
        lines.push(format!(
            "layer {} ({}){plat}: {}",
            f.index,
            f.digest,
            f.error.as_deref().unwrap_or("")
        ));
    }
    let kind = if wrong {
        ErrorKind::WrongKey
    } else {
        ErrorKind::MissingKey
    };
    let what = if wrong { "wrong key" } else { "missing key" };
    let mut e = CliError::new(
        kind,
        format!(
            "{what}: the keys ({}) cannot decrypt {} of {} encrypted layer(s) of {image} ({coverage}{left_out}):\n  {}",
            if keyctx.key_sources.is_empty() {
                "none".to_owned()
            } else {
                keyctx.key_sources.join(", ")
            },
            failed.len(),
            checks.len(),
            lines.join("\n  ")
        ),
    )
    .hint(crate::error::WRONG_KEY_HINT);
    e.details = Some(Box::new(details));
    Err(e)
}

fn refuse_existing(path: &Path, force: bool) -> Result<(), CliError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(CliError::usage(format!(
            "{} is a symbolic link: refusing to write a key through it",
            path.display()
        ))),
        Ok(m) if m.is_dir() => Err(CliError::usage(format!("{} is a directory", path.display()))),
        Ok(_) if !force => Err(CliError::usage(format!("{} already exists", path.display()))
            .hint("pass --force to overwrite it, or choose another path")),
        _ => Ok(()),
    }
}

fn write_key_file(path: &Path, bytes: &[u8], mode: u32, force: bool) -> Result<(), CliError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |e: std::io::Error| {
        CliError::new(
            ErrorKind::Failure,
            format!("cannot write {}: {e}", path.display()),
        )
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => std::path::PathBuf::from("."),
    };
    if !dir.exists() {
        std::fs::create_dir_all(&dir).map_err(io)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    let mut tmp = tempfile::Builder::new()
        .prefix(".imgcrypt-key.")
        .tempfile_in(&dir)
        .map_err(io)?;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(mode)).map_err(io)?;
    tmp.write_all(bytes).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    if force {
        tmp.persist(path).map_err(|e| io(e.error))?;
    } else {
        tmp.persist_noclobber(path).map_err(|e| io(e.error))?;
    }
    ocicrypt_core::fsutil::sync_dir(&dir);
    Ok(())
}

/// Generates a key pair into `private` (0600) and `public` (0644), atomically.
///
/// # Errors
/// Existing files without `force`, symbolic links, I/O.
pub fn keygen_files(kind: KeyType, private: &Path, public: &Path, force: bool) -> Result<(), CliError> {
    keygen_pair(kind, private, Some(public), force).map(|_| ())
}

/// As [`keygen_files`]; with `public` `None` the public key PEM is returned and not written.
fn keygen_pair(
    kind: KeyType,
    private: &Path,
    public: Option<&Path>,
    force: bool,
) -> Result<String, CliError> {
    refuse_existing(private, force)?;
    if let Some(p) = public {
        refuse_existing(p, force)?;
    }
    let (priv_pem, pub_pem) = match kind {
        KeyType::Rsa(bits) => keys::generate_rsa(bits),
        KeyType::Ec(curve) => keys::generate_ec(curve),
    }
    .map_err(|e| CliError::new(ErrorKind::Failure, e.to_string()))?;
    write_key_file(private, priv_pem.as_bytes(), 0o600, force)?;
    if let Some(p) = public {
        write_key_file(p, pub_pem.as_bytes(), 0o644, force)?;
    }
    Ok(pub_pem.to_string())
}

fn keygen(
    kind: KeyType,
    private: &Path,
    public: &Path,
    force: bool,
    ctx: &mut Ctx<'_>,
) -> Result<(), CliError> {
    // `--public -`: the public key goes to stdout, the summary to stderr.
    let to_stdout = public.as_os_str() == "-";
    let pub_pem = keygen_pair(kind, private, (!to_stdout).then_some(public), force)?;
    let id = keys::PublicKey::from_bytes(pub_pem.as_bytes(), "the new public key")
        .map_err(CliError::from)?
        .thumbprint();
    let public_name = if to_stdout {
        "(stdout)".to_owned()
    } else {
        public.display().to_string()
    };
    if ctx.output.json {
        let mut v = json!({
            "key_id": id,
            "type": kind.to_string(),
            "private_key": private.display().to_string(),
            "public_key": if to_stdout { "-".to_owned() } else { public_name.clone() },
        });
        if to_stdout {
            v["public_key_pem"] = json!(pub_pem);
        } else {
            v["recipient"] = json!(format!("jwe:{}", public.display()));
        }
        ctx.json(&v);
        return Ok(());
    }
    if to_stdout {
        ctx.out.write_all(pub_pem.as_bytes()).map_err(|e| {
            CliError::new(
                ErrorKind::Failure,
                format!("cannot write the public key to stdout: {e}"),
            )
        })?;
    }
    if !ctx.output.quiet {
        let lines = [
            format!("{kind} key pair:"),
            format!(
                "  private key {} (mode 0600): decrypt with --key {}",
                private.display(),
                private.display()
            ),
            if to_stdout {
                "  public key  written to stdout: save it to a file, then encrypt with --recipient jwe:FILE"
                    .to_owned()
            } else {
                format!("  public key  {public_name}: encrypt with --recipient jwe:{public_name}")
            },
            format!("  key id      {id} (how `imgcrypt inspect` names this recipient)"),
        ];
        for l in lines {
            if to_stdout {
                eprintln!("{l}");
            } else {
                ctx.print(&l);
            }
        }
    }
    Ok(())
}

fn kp_error(e: &keyprotect_client::Error) -> CliError {
    let kind = match e {
        keyprotect_client::Error::InvalidInput(_) => ErrorKind::Usage,
        keyprotect_client::Error::Iam { .. } => ErrorKind::RegistryAuth,
        keyprotect_client::Error::Transport { .. } => ErrorKind::Network,
        _ => ErrorKind::Failure,
    };
    CliError::new(kind, format!("Key Protect: {e}"))
}

async fn kp_wrap(root_key: &str, file: &Path, ctx: &mut Ctx<'_>) -> Result<(), CliError> {
    let client = schemes::keyprotect_client()?;
    let ct = keyprotect_client::wrapper::wrap_file_for_secret(&client, root_key, file)
        .await
        .map_err(|e| kp_error(&e))?;
    if ctx.output.json {
        ctx.json(&json!({"rootkeyid": root_key, "ciphertext": ct}));
    } else {
        ctx.print(&ct);
    }
    Ok(())
}

async fn kp_unwrap(
    root_key: &str,
    out: Option<&Path>,
    force: bool,
    ciphertext: Option<String>,
    ctx: &mut Ctx<'_>,
) -> Result<(), CliError> {
    let ct = match ciphertext {
        Some(c) => c,
        None => {
            // On a blocking thread, so SIGINT/SIGTERM are still handled while waiting.
            let read = tokio::task::spawn_blocking(|| {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).map(|_| s)
            })
            .await
            .map_err(|e| CliError::new(ErrorKind::Failure, format!("stdin reader failed: {e}")))?;
            read.map_err(|e| CliError::usage(format!("cannot read the ciphertext from stdin: {e}")))?
        }
    };
    let client = schemes::keyprotect_client()?;
    let plain = keyprotect_client::wrapper::unwrap_for_secret(&client, root_key, &ct)
        .await
        .map_err(|e| kp_error(&e))?;
    match out {
        Some(path) => {
            refuse_existing(path, force)?;
            write_key_file(path, &plain, 0o600, force)?;
            if !ctx.output.quiet {
                let _ = writeln!(
                    std::io::stderr(),
                    "wrote {} ({} bytes, mode 0600)",
                    path.display(),
                    plain.len()
                );
            }
        }
        None => {
            ctx.out
                .write_all(&plain)
                .map_err(|e| CliError::new(ErrorKind::Failure, format!("cannot write to stdout: {e}")))?;
        }
    }
    Ok(())
}

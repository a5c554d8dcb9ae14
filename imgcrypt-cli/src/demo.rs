//! `imgcrypt demo`: the whole job on a built-in example, each step printed with the command
//! that does it (and run through the same code path as that command).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use oci_spec::image::{Descriptor, ImageManifest};
use ocicrypt_core::image::digest::sha256_digest;
use ocicrypt_core::image::layout::{descriptor, OciLayout};
use ocicrypt_core::mediatype as mt;

use crate::commands::Ctx;
use crate::error::{CliError, ErrorKind};
use crate::run_step;

/// The files of the example image: (layer, path, content).
const FILES: &[(usize, &str, &str)] = &[
    (0, "etc/motd", "Welcome to the imgcrypt demo image.\n"),
    (0, "app/config.toml", "port = 8080\n"),
    (
        1,
        "app/secret.txt",
        "The launch code is 0000. Only key holders can read this layer.\n",
    ),
];

fn fail(msg: impl Into<String>) -> CliError {
    CliError::new(ErrorKind::Failure, msg)
}

fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-:=+@,".contains(c))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn tar_gz(files: &[(&str, &str)]) -> Result<(Vec<u8>, Vec<u8>), CliError> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, content) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(content.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        b.append_data(&mut h, path, content.as_bytes())
            .map_err(|e| fail(format!("building the demo layer: {e}")))?;
    }
    let tar = b
        .into_inner()
        .map_err(|e| fail(format!("building the demo layer: {e}")))?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar)
        .map_err(|e| fail(format!("compressing the demo layer: {e}")))?;
    let blob = gz
        .finish()
        .map_err(|e| fail(format!("compressing the demo layer: {e}")))?;
    Ok((tar, blob))
}

/// Builds the example image (two tar+gzip layers, config, manifest) as `oci:DIR:v1`.
///
/// # Errors
/// I/O.
pub fn build_image(dir: &Path) -> Result<(), CliError> {
    let e = |err: ocicrypt_core::Error| fail(format!("writing the demo image to {}: {err}", dir.display()));
    let layout = OciLayout::open_or_create(dir, Some("v1")).map_err(e)?;
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for idx in 0..2 {
        let files: Vec<(&str, &str)> = FILES.iter().filter(|f| f.0 == idx).map(|f| (f.1, f.2)).collect();
        let (tar, blob) = tar_gz(&files)?;
        diff_ids.push(sha256_digest(&tar));
        let d = layout.put_bytes(&blob).map_err(e)?;
        layers
            .push(serde_json::json!({"mediaType": mt::OCI_LAYER_TAR_GZIP, "digest": d, "size": blob.len()}));
    }
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/sh", "-c", "cat /app/secret.txt"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let config = serde_json::to_vec(&config).map_err(|err| fail(err.to_string()))?;
    let cd = layout.put_bytes(&config).map_err(e)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": mt::OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
        "layers": layers,
    });
    let mbytes = serde_json::to_vec(&manifest).map_err(|err| fail(err.to_string()))?;
    let md = layout.put_bytes(&mbytes).map_err(e)?;
    let desc = descriptor(mt::OCI_MANIFEST, &md, mbytes.len() as u64).map_err(e)?;
    layout.set_ref(Some("v1"), &desc).map_err(e)?;
    Ok(())
}

fn layers_of(dir: &Path) -> Result<(OciLayout, Vec<Descriptor>), CliError> {
    let e = |err: ocicrypt_core::Error| fail(format!("reading {}: {err}", dir.display()));
    let layout = OciLayout::open(dir, Some("v1")).map_err(e)?;
    let root = layout.resolve(Some("v1")).map_err(e)?;
    let bytes = layout.get_bytes(&root).map_err(e)?;
    let m = ImageManifest::from_reader(&bytes[..])
        .map_err(|err| fail(format!("manifest of {}: {err}", dir.display())))?;
    Ok((layout, m.layers().clone()))
}

fn untar_gz(blob: &[u8]) -> Result<BTreeMap<String, String>, CliError> {
    let mut out = BTreeMap::new();
    let mut a = tar::Archive::new(flate2::read::GzDecoder::new(blob));
    for entry in a.entries().map_err(|e| fail(format!("reading the layer: {e}")))? {
        let mut entry = entry.map_err(|e| fail(format!("reading the layer: {e}")))?;
        let path = entry
            .path()
            .map_err(|e| fail(e.to_string()))?
            .display()
            .to_string();
        let mut s = String::new();
        entry
            .read_to_string(&mut s)
            .map_err(|e| fail(format!("reading {path}: {e}")))?;
        out.insert(path, s);
    }
    Ok(out)
}

async fn step(ctx: &mut Ctx<'_>, args: &[String]) -> Result<(), CliError> {
    let shown: Vec<String> = args.iter().map(|a| quote(a)).collect();
    ctx_print(ctx, &format!("$ imgcrypt {}", shown.join(" ")));
    run_step(args, ctx).await
}

fn ctx_print(ctx: &mut Ctx<'_>, s: &str) {
    let _ = writeln!(ctx.out, "{s}");
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn prepare_dir(dir: Option<PathBuf>) -> Result<PathBuf, CliError> {
    match dir {
        Some(d) => {
            if d.exists() {
                let empty = std::fs::read_dir(&d)
                    .map_err(|e| CliError::usage(format!("demo directory {}: {e}", d.display())))?
                    .next()
                    .is_none();
                if !empty {
                    return Err(CliError::usage(format!(
                        "demo directory {} is not empty: give a new or empty directory",
                        d.display()
                    )));
                }
            }
            std::fs::create_dir_all(&d).map_err(|e| fail(format!("creating {}: {e}", d.display())))?;
            Ok(d)
        }
        None => tempfile::Builder::new()
            .prefix("imgcrypt-demo-")
            .tempdir()
            .map(tempfile::TempDir::keep)
            .map_err(|e| fail(format!("creating a temporary directory: {e}"))),
    }
}

/// Runs the demo in `dir` (or a new temporary directory, kept).
///
/// # Errors
/// When a step that must succeed fails, or the one that must fail succeeds.
pub async fn run(dir: Option<PathBuf>, ctx: &mut Ctx<'_>) -> Result<(), CliError> {
    let dir = prepare_dir(dir)?;
    let keys = dir.join("keys");
    let alice = keys.join("alice.pem");
    let alice_pub = keys.join("alice.pub.pem");
    let mallory = keys.join("mallory.pem");
    let image = dir.join("image");
    let encrypted = dir.join("encrypted");
    let decrypted = dir.join("decrypted");
    let oci = |p: &Path| format!("oci:{}:v1", p.display());
    ctx.output.quiet = false;

    ctx_print(
        ctx,
        "imgcrypt demo: encrypt a container image for a recipient, then decrypt it",
    );
    ctx_print(ctx, &format!("working directory: {}\n", dir.display()));

    ctx_print(
        ctx,
        "== 1. Key pairs: alice (the recipient) and mallory (someone else)",
    );
    step(
        ctx,
        &["keygen".into(), "--type".into(), "rsa-3072".into(), s(&alice)],
    )
    .await?;
    step(
        ctx,
        &["keygen".into(), "--type".into(), "ec-p256".into(), s(&mallory)],
    )
    .await?;

    ctx_print(
        ctx,
        "\n== 2. A small image: two tar+gzip layers, built in code as an OCI layout",
    );
    build_image(&image)?;
    ctx_print(ctx, &format!("built {}", oci(&image)));
    for (layer, path, content) in FILES {
        ctx_print(ctx, &format!("  layer {layer}: /{path}: {}", content.trim_end()));
    }

    ctx_print(ctx, "\n== 3. Encrypt every layer for alice's public key");
    step(
        ctx,
        &[
            "encrypt".into(),
            "--recipient".into(),
            format!("jwe:{}", s(&alice_pub)),
            oci(&image),
            oci(&encrypted),
        ],
    )
    .await?;

    ctx_print(ctx, "\n== 4. Look at the encrypted image (no key needed)");
    step(ctx, &["inspect".into(), oci(&encrypted)]).await?;

    ctx_print(
        ctx,
        "\n== 5. Decrypting without alice's key fails (this error is expected)",
    );
    match step(
        ctx,
        &[
            "decrypt".into(),
            "--key".into(),
            s(&mallory),
            oci(&encrypted),
            oci(&decrypted),
        ],
    )
    .await
    {
        Ok(()) => {
            return Err(fail(
                "decrypting with mallory's key succeeded: the demo image was not encrypted",
            ))
        }
        Err(e) => {
            ctx_print(ctx, &e.to_string());
            ctx_print(ctx, &format!("(exit code {})", e.kind.exit_code()));
        }
    }
    if decrypted.exists() {
        return Err(fail(format!(
            "the failed decryption left {} behind",
            decrypted.display()
        )));
    }
    ctx_print(
        ctx,
        &format!("nothing was written: {} does not exist", decrypted.display()),
    );

    ctx_print(ctx, "\n== 6. Check alice's key, then decrypt with it");
    step(ctx, &["check".into(), "--key".into(), s(&alice), oci(&encrypted)]).await?;
    step(
        ctx,
        &[
            "decrypt".into(),
            "--key".into(),
            s(&alice),
            oci(&encrypted),
            oci(&decrypted),
        ],
    )
    .await?;

    ctx_print(ctx, "\n== 7. Compare");
    let (orig_l, orig) = layers_of(&image)?;
    let (enc_l, enc) = layers_of(&encrypted)?;
    let (dec_l, dec) = layers_of(&decrypted)?;
    if orig.len() != dec.len() || orig.len() != enc.len() {
        return Err(fail("the images have different numbers of layers"));
    }
    for i in 0..orig.len() {
        let read = |l: &OciLayout, d: &Descriptor| {
            l.get_bytes(d)
                .map_err(|e| fail(format!("reading layer {i}: {e}")))
        };
        let (a, b, c) = (
            read(&orig_l, &orig[i])?,
            read(&enc_l, &enc[i])?,
            read(&dec_l, &dec[i])?,
        );
        if a != c || orig[i].digest() != dec[i].digest() {
            return Err(fail(format!(
                "layer {i}: the decrypted layer differs from the original"
            )));
        }
        if a == b || untar_gz(&b).is_ok() {
            return Err(fail(format!(
                "layer {i}: the encrypted layer is readable without the key"
            )));
        }
        ctx_print(
            ctx,
            &format!(
                "layer {i}: original {} = decrypted {} (identical bytes); encrypted {} is unreadable without the key",
                orig[i].digest(),
                dec[i].digest(),
                enc[i].digest()
            ),
        );
        for (path, content) in untar_gz(&c)? {
            ctx_print(ctx, &format!("  /{path}: {}", content.trim_end()));
        }
    }
    ctx_print(ctx, "\nThe contents match. skopeo reads the same format:");
    ctx_print(
        ctx,
        &format!(
            "  skopeo copy --decryption-key {} {} oci:{}:v1",
            quote(&s(&alice)),
            quote(&oci(&encrypted)),
            quote(&s(&dir.join("skopeo-decrypted")))
        ),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_a_valid_image() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        build_image(&p).unwrap();
        let (l, layers) = layers_of(&p).unwrap();
        assert_eq!(layers.len(), 2);
        let files = untar_gz(&l.get_bytes(&layers[1]).unwrap()).unwrap();
        assert!(files["app/secret.txt"].contains("launch code"));
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("/x/y.pem"), "/x/y.pem");
    }
}

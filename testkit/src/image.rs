//! Builds small OCI image layouts for tests, independently of the library under test.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};

/// Layer compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain tar (`…tar`).
    None,
    /// gzip (`…tar+gzip`).
    Gzip,
    /// zstd (`…tar+zstd`), made with the `zstd` CLI.
    Zstd,
}

/// One layer: files (path, content, mode) packed into a tar.
#[derive(Debug, Clone)]
pub struct LayerSpec {
    /// Files in the layer.
    pub files: Vec<(String, Vec<u8>, u32)>,
    /// Compression.
    pub compression: Compression,
}

impl LayerSpec {
    /// A layer holding one file of `size` pseudo-random bytes made from `seed`.
    pub fn random(size: usize, seed: u64, compression: Compression) -> Self {
        let mut data = vec![0u8; size];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
        Self {
            files: vec![(format!("data-{seed}.bin"), data, 0o644)],
            compression,
        }
    }
}

/// A blob written into a layout.
#[derive(Debug, Clone)]
pub struct BlobFacts {
    /// `sha256:<hex>`.
    pub digest: String,
    /// Size.
    pub size: u64,
    /// Media type.
    pub media_type: String,
}

/// What [`write_image`] wrote.
#[derive(Debug, Clone)]
pub struct ImageFacts {
    /// The manifest.
    pub manifest: BlobFacts,
    /// The layers, in order.
    pub layers: Vec<BlobFacts>,
}

/// `sha256:<hex>`.
pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn tar_bytes(files: &[(String, Vec<u8>, u32)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data, mode) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(*mode);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        b.append_data(&mut h, path, &data[..]).expect("tar append");
    }
    b.into_inner().expect("tar finish")
}

fn compress(tar: &[u8], c: Compression) -> (Vec<u8>, &'static str) {
    match c {
        Compression::None => (tar.to_vec(), "application/vnd.oci.image.layer.v1.tar"),
        Compression::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(tar).expect("gzip");
            (
                e.finish().expect("gzip"),
                "application/vnd.oci.image.layer.v1.tar+gzip",
            )
        }
        Compression::Zstd => {
            let mut child = Command::new("zstd")
                .args(["-q", "-c", "-3"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("zstd CLI (install the zstd package)");
            let mut stdin = child.stdin.take().expect("stdin");
            let data = tar.to_vec();
            let writer = std::thread::spawn(move || stdin.write_all(&data));
            let out = child.wait_with_output().expect("zstd output");
            writer.join().expect("writer").expect("write to zstd");
            assert!(out.status.success(), "zstd failed");
            (out.stdout, "application/vnd.oci.image.layer.v1.tar+zstd")
        }
    }
}

fn put_blob(layout: &Path, bytes: &[u8]) -> String {
    let digest = sha256(bytes);
    let dir = layout.join("blobs").join("sha256");
    std::fs::create_dir_all(&dir).expect("blob dir");
    std::fs::write(dir.join(digest.trim_start_matches("sha256:")), bytes).expect("write blob");
    digest
}

fn add_to_index(layout: &Path, desc: serde_json::Value) {
    std::fs::create_dir_all(layout).expect("layout dir");
    std::fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).expect("oci-layout");
    let index_path = layout.join("index.json");
    let mut index: serde_json::Value = std::fs::read(&index_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| serde_json::json!({"schemaVersion": 2, "manifests": []}));
    let name = desc["annotations"]["org.opencontainers.image.ref.name"].clone();
    let list = index["manifests"].as_array_mut().expect("manifests");
    list.retain(|d| d["annotations"]["org.opencontainers.image.ref.name"] != name);
    list.push(desc);
    std::fs::write(index_path, serde_json::to_vec(&index).expect("json")).expect("index.json");
}

/// Writes the blobs and manifest of a single-platform image; returns the manifest descriptor
/// JSON (without a ref name) and the facts.
fn write_manifest(layout: &Path, arch: &str, layers: &[LayerSpec]) -> ImageFacts {
    let mut layer_descs = Vec::new();
    let mut diff_ids = Vec::new();
    let mut facts = Vec::new();
    for l in layers {
        let tar = tar_bytes(&l.files);
        diff_ids.push(sha256(&tar));
        let (blob, media) = compress(&tar, l.compression);
        let digest = put_blob(layout, &blob);
        layer_descs.push(serde_json::json!({"mediaType": media, "digest": digest, "size": blob.len()}));
        facts.push(BlobFacts {
            digest,
            size: blob.len() as u64,
            media_type: media.to_owned(),
        });
    }
    let config = serde_json::json!({
        "architecture": arch, "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let config_bytes = serde_json::to_vec(&config).expect("json");
    let config_digest = put_blob(layout, &config_bytes);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_bytes.len()},
        "layers": layer_descs,
    });
    let mbytes = serde_json::to_vec(&manifest).expect("json");
    let mdigest = put_blob(layout, &mbytes);
    ImageFacts {
        manifest: BlobFacts {
            digest: mdigest,
            size: mbytes.len() as u64,
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        },
        layers: facts,
    }
}

/// Writes a single-platform image tagged `tag` into the OCI layout at `layout` (created if
/// needed).
pub fn write_image(layout: &Path, tag: &str, layers: &[LayerSpec]) -> ImageFacts {
    let facts = write_manifest(layout, "amd64", layers);
    add_to_index(
        layout,
        serde_json::json!({
            "mediaType": facts.manifest.media_type, "digest": facts.manifest.digest, "size": facts.manifest.size,
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }),
    );
    facts
}

/// Writes a multi-arch image (an OCI index) tagged `tag`: one manifest per `(arch, layers)`,
/// all `linux`. Returns the facts per platform, in order.
pub fn write_multiarch(layout: &Path, tag: &str, platforms: &[(&str, Vec<LayerSpec>)]) -> Vec<ImageFacts> {
    let mut all = Vec::new();
    let mut children = Vec::new();
    for (arch, layers) in platforms {
        let f = write_manifest(layout, arch, layers);
        children.push(serde_json::json!({
            "mediaType": f.manifest.media_type, "digest": f.manifest.digest, "size": f.manifest.size,
            "platform": {"architecture": arch, "os": "linux"},
        }));
        all.push(f);
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": children,
    });
    let bytes = serde_json::to_vec(&index).expect("json");
    let digest = put_blob(layout, &bytes);
    add_to_index(
        layout,
        serde_json::json!({
            "mediaType": "application/vnd.oci.image.index.v1+json", "digest": digest, "size": bytes.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }),
    );
    all
}

/// Reads a blob of a layout by digest.
pub fn read_blob(layout: &Path, digest: &str) -> Vec<u8> {
    std::fs::read(
        layout
            .join("blobs")
            .join("sha256")
            .join(digest.trim_start_matches("sha256:")),
    )
    .unwrap_or_else(|e| panic!("blob {digest} in {}: {e}", layout.display()))
}

/// The manifest (JSON) of the image tagged `tag` in a layout, following an index to its first
/// child if needed... use [`manifests`] for multi-arch images.
pub fn manifest(layout: &Path, tag: &str) -> serde_json::Value {
    manifests(layout, tag).into_iter().next().expect("a manifest").1
}

/// `(platform arch or "", manifest JSON)` for every manifest of the image tagged `tag`.
pub fn manifests(layout: &Path, tag: &str) -> Vec<(String, serde_json::Value)> {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("index.json")).expect("json");
    let desc = index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .find(|d| d["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("no tag {tag} in {}", layout.display()))
        .clone();
    let top: serde_json::Value =
        serde_json::from_slice(&read_blob(layout, desc["digest"].as_str().expect("digest"))).expect("json");
    if let Some(children) = top["manifests"].as_array() {
        children
            .iter()
            .map(|c| {
                let m = serde_json::from_slice(&read_blob(layout, c["digest"].as_str().expect("digest")))
                    .expect("json");
                (c["platform"]["architecture"].as_str().unwrap_or("").to_owned(), m)
            })
            .collect()
    } else {
        vec![(String::new(), top)]
    }
}

/// The first layer's annotation `key` of the first image in `layout`.
pub fn layer_annotation(layout: &Path, key: &str) -> Option<String> {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let d = index["manifests"][0]["digest"].as_str().unwrap().to_owned();
    let m: serde_json::Value = serde_json::from_slice(&read_blob(layout, &d)).unwrap();
    m["layers"][0]["annotations"][key].as_str().map(str::to_owned)
}

/// Sets the first layer's annotation `key` of the first image in `layout` and re-digests the
/// manifest (so only that annotation differs; the layer data is untouched).
pub fn set_layer_annotation(layout: &Path, key: &str, value: &str) {
    let index_path = layout.join("index.json");
    let mut index: serde_json::Value = serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    let d = index["manifests"][0]["digest"].as_str().unwrap().to_owned();
    let mut m: serde_json::Value = serde_json::from_slice(&read_blob(layout, &d)).unwrap();
    m["layers"][0]["annotations"][key] = value.into();
    let bytes = serde_json::to_vec(&m).unwrap();
    let digest = sha256(&bytes);
    let hex = digest.trim_start_matches("sha256:");
    std::fs::write(layout.join("blobs/sha256").join(hex), &bytes).unwrap();
    index["manifests"][0]["digest"] = digest.clone().into();
    index["manifests"][0]["size"] = bytes.len().into();
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
}

/// Copies an OCI layout (or any directory tree of regular files).
pub fn copy_layout(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_layout(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

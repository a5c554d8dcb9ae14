//! The benchmark image generator behind the `mkimage` binary.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use flate2::write::GzEncoder;
use flate2::Compression;
use sha2::{Digest, Sha256};

/// What went wrong generating an image.
#[derive(Debug, thiserror::Error)]
pub enum MkImageError {
    /// Bad command line.
    #[error("{0}\nusage: mkimage LAYOUT TAG --size BYTES[K|M|G] [--layers N] [--seed S]")]
    Usage(String),
    /// Writing failed.
    #[error("writing {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: io::Error,
    },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> MkImageError + '_ {
    move |source| MkImageError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Parses `123`, `64K`, `32M`, `1G` (binary units).
///
/// # Errors
/// [`MkImageError::Usage`] for anything else.
pub fn parse_size(s: &str) -> Result<u64, MkImageError> {
    let s = s.trim();
    let (num, mult) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| MkImageError::Usage(format!("bad size {s:?}: write e.g. 1G, 32M or 4096")))
}

/// A fast deterministic pseudo-random byte stream (xoshiro256**), `len` bytes long.
pub struct RandomReader {
    s: [u64; 4],
    left: u64,
}

impl RandomReader {
    /// `len` bytes seeded by `seed`.
    pub fn new(seed: u64, len: u64) -> Self {
        let mut z = seed;
        let mut next = || {
            // splitmix64
            z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            x ^ (x >> 31)
        };
        Self {
            s: [next(), next(), next(), next()],
            left: len,
        }
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let r = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        r
    }
}

impl Read for RandomReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (buf.len() as u64).min(self.left) as usize;
        for c in buf[..n].chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// A writer that hashes and counts what passes through.
struct Hashing<W> {
    inner: W,
    h: Sha256,
    n: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.h.update(&buf[..n]);
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A written blob: `sha256:<hex>` and size.
#[derive(Debug, Clone)]
pub struct Blob {
    /// Digest.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
}

fn blob_dir(layout: &Path) -> PathBuf {
    layout.join("blobs").join("sha256")
}

fn put_bytes(layout: &Path, bytes: &[u8]) -> Result<Blob, MkImageError> {
    let hex = hex::encode(Sha256::digest(bytes));
    let path = blob_dir(layout).join(&hex);
    fs::write(&path, bytes).map_err(io_at(&path))?;
    Ok(Blob {
        digest: format!("sha256:{hex}"),
        size: bytes.len() as u64,
    })
}

/// Writes one tar+gzip layer holding `payload` random bytes; returns the blob and the diff ID
/// (digest of the uncompressed tar).
///
/// # Errors
/// [`MkImageError::Io`].
pub fn write_layer(layout: &Path, payload: u64, seed: u64) -> Result<(Blob, String), MkImageError> {
    let dir = blob_dir(layout);
    let tmp = dir.join(format!(".mkimage-{seed}"));
    let file = File::create(&tmp).map_err(io_at(&tmp))?;
    let blob_w = Hashing {
        inner: BufWriter::with_capacity(1 << 20, file),
        h: Sha256::new(),
        n: 0,
    };
    let gz = GzEncoder::new(blob_w, Compression::none());
    let tar_w = Hashing {
        inner: gz,
        h: Sha256::new(),
        n: 0,
    };
    let mut tar = tar::Builder::new(tar_w);
    let mut header = tar::Header::new_gnu();
    header.set_size(payload);
    header.set_mode(0o644);
    header.set_mtime(1_700_000_000);
    header.set_entry_type(tar::EntryType::Regular);
    let name = format!("data-{seed}.bin");
    tar.append_data(&mut header, &name, RandomReader::new(seed, payload))
        .map_err(io_at(&tmp))?;
    let tar_w = tar.into_inner().map_err(io_at(&tmp))?;
    let diff_id = format!("sha256:{}", hex::encode(tar_w.h.finalize()));
    let blob_w = tar_w.inner.finish().map_err(io_at(&tmp))?;
    let hex = hex::encode(blob_w.h.finalize());
    let size = blob_w.n;
    let file = blob_w.inner.into_inner().map_err(|e| MkImageError::Io {
        path: tmp.display().to_string(),
        source: e.into_error(),
    })?;
    file.sync_all().map_err(io_at(&tmp))?;
    let dest = dir.join(&hex);
    fs::rename(&tmp, &dest).map_err(io_at(&dest))?;
    Ok((
        Blob {
            digest: format!("sha256:{hex}"),
            size,
        },
        diff_id,
    ))
}

/// Writes an image of `layers` layers of `payload` bytes each into a new OCI layout at
/// `layout`, tagged `tag`. Returns the layer blobs.
///
/// # Errors
/// [`MkImageError::Io`].
pub fn write_image(
    layout: &Path,
    tag: &str,
    layers: usize,
    payload: u64,
    seed: u64,
) -> Result<Vec<Blob>, MkImageError> {
    let dir = blob_dir(layout);
    fs::create_dir_all(&dir).map_err(io_at(&dir))?;
    let oci_layout = layout.join("oci-layout");
    fs::write(&oci_layout, br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io_at(&oci_layout))?;
    let mut blobs = Vec::new();
    let mut diff_ids = Vec::new();
    for i in 0..layers {
        let (b, d) = write_layer(layout, payload, seed.wrapping_add(i as u64))?;
        blobs.push(b);
        diff_ids.push(d);
    }
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let config = put_bytes(layout, &serde_json::to_vec(&config).expect("json"))?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config.digest,
            "size": config.size,
        },
        "layers": blobs.iter().map(|b| serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": b.digest,
            "size": b.size,
        })).collect::<Vec<_>>(),
    });
    let manifest = put_bytes(layout, &serde_json::to_vec(&manifest).expect("json"))?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest.digest,
            "size": manifest.size,
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    });
    let index_path = layout.join("index.json");
    fs::write(&index_path, serde_json::to_vec(&index).expect("json")).map_err(io_at(&index_path))?;
    Ok(blobs)
}

/// The command line of `mkimage`.
///
/// # Errors
/// [`MkImageError`].
pub fn main_with_args(args: Vec<String>) -> Result<(), MkImageError> {
    let mut pos = Vec::new();
    let mut size = None;
    let mut layers = 1usize;
    let mut seed = 1u64;
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str| {
            it.next()
                .ok_or_else(|| MkImageError::Usage(format!("{name} needs a value")))
        };
        match a.as_str() {
            "--size" => size = Some(parse_size(&val("--size")?)?),
            "--layers" => {
                layers = val("--layers")?
                    .parse()
                    .map_err(|_| MkImageError::Usage("--layers takes a number".into()))?
            }
            "--seed" => {
                seed = val("--seed")?
                    .parse()
                    .map_err(|_| MkImageError::Usage("--seed takes a number".into()))?
            }
            s if s.starts_with("--") => return Err(MkImageError::Usage(format!("unknown option {s}"))),
            _ => pos.push(a),
        }
    }
    let [layout, tag] = <[String; 2]>::try_from(pos)
        .map_err(|_| MkImageError::Usage("give the layout directory and the tag".into()))?;
    let size = size.ok_or_else(|| MkImageError::Usage("--size is required".into()))?;
    if layers == 0 {
        return Err(MkImageError::Usage("--layers must be at least 1".into()));
    }
    let layout = PathBuf::from(layout);
    if layout.exists()
        && fs::read_dir(&layout)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(MkImageError::Usage(format!(
            "{} exists and is not empty: give a new directory",
            layout.display()
        )));
    }
    let blobs = write_image(&layout, &tag, layers, size, seed)?;
    for b in blobs {
        println!("{} {}", b.digest, b.size);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("32M").unwrap(), 32 << 20);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert!(parse_size("1T").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn random_reader_is_deterministic_and_exact() {
        let mut a = Vec::new();
        RandomReader::new(7, 1001).read_to_end(&mut a).unwrap();
        let mut b = Vec::new();
        RandomReader::new(7, 1001).read_to_end(&mut b).unwrap();
        let mut c = Vec::new();
        RandomReader::new(8, 1001).read_to_end(&mut c).unwrap();
        assert_eq!(a.len(), 1001);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn layer_is_a_real_tar_gzip_with_matching_digests() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = write_image(dir.path(), "t", 2, 100_000, 3).unwrap();
        assert_eq!(blobs.len(), 2);
        let hex = blobs[0].digest.trim_start_matches("sha256:");
        let raw = fs::read(dir.path().join("blobs/sha256").join(hex)).unwrap();
        assert_eq!(raw.len() as u64, blobs[0].size);
        assert_eq!(
            format!("sha256:{}", hex::encode(Sha256::digest(&raw))),
            blobs[0].digest
        );
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(&raw[..]));
        let mut entries = ar.entries().unwrap();
        let mut e = entries.next().unwrap().unwrap();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        let mut expect = Vec::new();
        RandomReader::new(3, 100_000).read_to_end(&mut expect).unwrap();
        assert_eq!(data, expect);
        assert!(entries.next().is_none());
    }
}

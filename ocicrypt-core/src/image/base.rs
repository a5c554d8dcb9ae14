//! Base images for `encrypt --skip-base`: the layers an image shares with the image it was built
//! on stay unencrypted, so they stay shared and cacheable, and only the application's own
//! layers are encrypted.
//!
//! A layer is a *base layer* when its digest — the digest its manifest names, of the blob as
//! stored (compressed or not) — is among the layers of the base image's manifest for the same
//! platform. Blobs are compared as stored because that is what registries, caches and
//! `skopeo` share: a base layer recompressed differently is a different blob, and encrypting it
//! costs nothing that sharing would have saved.
//!
//! "The same platform":
//! * a multi-platform base (an index): the child manifest whose platform matches the image's
//!   (OS and architecture equal; variants equal when both name one). No match is an error.
//! * a single-platform base: its config's `os`/`architecture`[/`variant`]. A different platform
//!   is an error; a base whose config names no platform (or an image whose platform is unknown)
//!   is compared by layers alone.
//!
//! Encrypting marks each base layer with [`BASE_LAYER_ANNOTATION`] so that `inspect` can tell a
//! layer left unencrypted on purpose from one that was never selected; decrypting an image
//! back to all-plain layers removes the marks again, so `decrypt(encrypt(x))` keeps `x`'s digest.

use std::collections::BTreeSet;

use oci_spec::image::{ImageIndex, ImageManifest};

use super::ops::{config_platform, is_index, platform_name};
use super::ImageSource;
use crate::Error;

/// The annotation `encrypt --skip-base` puts on each layer it left unencrypted because the base
/// image has it (value `"true"`). OCI tools ignore unknown annotations (skopeo copies and
/// decrypts such images); `decrypt` removes it when no layer of the manifest stays encrypted.
pub const BASE_LAYER_ANNOTATION: &str = "org.imgcrypt.base-layer";

/// The layers of one manifest of a base image.
#[derive(Debug, Clone)]
struct BaseManifest {
    /// `os/arch[/variant]`, when the index or the config names one.
    platform: Option<String>,
    /// Layer digests as the manifest names them.
    layers: BTreeSet<String>,
}

/// A base image's layers, per platform, read once before an operation.
#[derive(Debug, Clone)]
pub struct BaseImage {
    name: String,
    /// True for an index (multi-platform), false for a single manifest.
    multi: bool,
    manifests: Vec<BaseManifest>,
}

/// Whether platform names `a` and `b` (`os/arch[/variant]`) are the same platform: OS and
/// architecture equal, and variants equal when both name one.
fn same_platform(a: &str, b: &str) -> bool {
    let mut x = a.split('/');
    let mut y = b.split('/');
    if x.next() != y.next() || x.next() != y.next() {
        return false;
    }
    match (x.next(), y.next()) {
        (Some(v), Some(w)) => v == w,
        _ => true,
    }
}

impl BaseImage {
    /// Reads the manifests of the base image `src` (not its layers).
    ///
    /// # Errors
    /// Image-level errors: unreadable or malformed manifests or configs.
    pub async fn read(src: &dyn ImageSource) -> Result<Self, Error> {
        let name = src.describe();
        let root = src.root().await?;
        let bytes = src.read_small(&root).await?;
        let layers_of = |m: &ImageManifest| m.layers().iter().map(|l| l.digest().to_string()).collect();
        if is_index(root.media_type().as_ref(), &bytes) {
            let index = ImageIndex::from_reader(&bytes[..])
                .map_err(|e| Error::Image(format!("base image {name}: its index does not parse: {e}")))?;
            let mut manifests = Vec::new();
            for child in index.manifests() {
                let b = src.read_small(child).await?;
                let Ok(m) = ImageManifest::from_reader(&b[..]) else {
                    continue; // a nested index or an artifact: no layers to share
                };
                let platform = match child.platform() {
                    Some(p) => Some(platform_name(p)),
                    None => config_platform(src, m.config()).await?,
                };
                manifests.push(BaseManifest {
                    platform,
                    layers: layers_of(&m),
                });
            }
            Ok(Self {
                name,
                multi: true,
                manifests,
            })
        } else {
            let m = ImageManifest::from_reader(&bytes[..])
                .map_err(|e| Error::Image(format!("base image {name}: its manifest does not parse: {e}")))?;
            let platform = config_platform(src, m.config()).await?;
            Ok(Self {
                name,
                multi: false,
                manifests: vec![BaseManifest {
                    platform,
                    layers: layers_of(&m),
                }],
            })
        }
    }

    /// The base image's name, as its source describes it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The base layers (digests) for an image manifest of `platform` (`None`: not known).
    ///
    /// # Errors
    /// [`Error::Selection`] when the base has no manifest for that platform.
    pub fn layers_for(&self, platform: Option<&str>, image: &str) -> Result<&BTreeSet<String>, Error> {
        let names = || {
            self.manifests
                .iter()
                .map(|m| m.platform.as_deref().unwrap_or("(none)"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if !self.multi {
            let base = &self.manifests[0];
            return match (platform, base.platform.as_deref()) {
                (Some(p), Some(b)) if !same_platform(p, b) => Err(Error::Selection(format!(
                    "--skip-base {} is an image for {b}, but {image} is for {p}; name a base for {p} (or a multi-platform base)",
                    self.name
                ))),
                _ => Ok(&base.layers),
            };
        }
        let found = match platform {
            Some(p) => self
                .manifests
                .iter()
                .find(|m| m.platform.as_deref() == Some(p))
                .or_else(|| {
                    self.manifests
                        .iter()
                        .find(|m| m.platform.as_deref().is_some_and(|b| same_platform(p, b)))
                }),
            None if self.manifests.len() == 1 => self.manifests.first(),
            None => {
                return Err(Error::Selection(format!(
                    "--skip-base {} is a multi-platform image ({}), and the platform of {image} is not known (its config names none): name a single-platform base",
                    self.name,
                    names()
                )))
            }
        };
        found.map(|m| &m.layers).ok_or_else(|| {
            Error::Selection(format!(
                "--skip-base {} has no manifest for {}, the platform of {image}; its platforms are: {}",
                self.name,
                platform.unwrap_or("(none)"),
                names()
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(multi: bool, m: &[(Option<&str>, &[&str])]) -> BaseImage {
        BaseImage {
            name: "oci:base".into(),
            multi,
            manifests: m
                .iter()
                .map(|(p, l)| BaseManifest {
                    platform: p.map(str::to_owned),
                    layers: l.iter().map(|s| (*s).to_owned()).collect(),
                })
                .collect(),
        }
    }

    #[test]
    fn platforms_match_on_os_arch_and_variant_when_both_name_one() {
        assert!(same_platform("linux/amd64", "linux/amd64"));
        assert!(same_platform("linux/arm64", "linux/arm64/v8"));
        assert!(!same_platform("linux/arm/v6", "linux/arm/v7"));
        assert!(!same_platform("linux/amd64", "linux/arm64"));
        assert!(!same_platform("windows/amd64", "linux/amd64"));
    }

    #[test]
    fn the_matching_platform_is_picked_and_a_missing_one_refused() {
        let b = base(
            true,
            &[
                (Some("linux/amd64"), &["sha256:a"]),
                (Some("linux/arm/v7"), &["sha256:b"]),
            ],
        );
        assert!(b
            .layers_for(Some("linux/amd64"), "img")
            .unwrap()
            .contains("sha256:a"));
        assert!(b
            .layers_for(Some("linux/arm/v7"), "img")
            .unwrap()
            .contains("sha256:b"));
        let e = b.layers_for(Some("linux/s390x"), "img").unwrap_err().to_string();
        assert!(
            e.contains("no manifest for linux/s390x") && e.contains("linux/arm/v7"),
            "{e}"
        );
        assert!(matches!(b.layers_for(None, "img"), Err(Error::Selection(_))));

        let single = base(false, &[(Some("linux/amd64"), &["sha256:a"])]);
        assert!(single.layers_for(Some("linux/amd64"), "img").is_ok());
        assert!(single.layers_for(None, "img").is_ok());
        let e = single
            .layers_for(Some("linux/arm64"), "img")
            .unwrap_err()
            .to_string();
        assert!(e.contains("for linux/amd64, but img is for linux/arm64"), "{e}");
        // No platform in the base's config: compared by layers alone.
        let unknown = base(false, &[(None, &["sha256:a"])]);
        assert!(unknown.layers_for(Some("linux/arm64"), "img").is_ok());
    }
}

//! Layer media types and encryption annotations.
//!
//! Encrypting appends `+encrypted`; Docker layer types are first mapped to their OCI equivalents
//! (the result must live in an OCI manifest, as in containers/image and imgcrypt). Decrypting
//! strips the suffix (containers/image behaviour), so the decrypted descriptor describes the
//! byte-identical original blob.

use crate::Error;

/// `application/vnd.oci.image.layer.v1.tar`
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// `application/vnd.oci.image.layer.v1.tar+gzip`
pub const OCI_LAYER_TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// `application/vnd.oci.image.layer.v1.tar+zstd`
pub const OCI_LAYER_TAR_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// `application/vnd.oci.image.layer.v1.tar+encrypted`
pub const OCI_LAYER_TAR_ENC: &str = "application/vnd.oci.image.layer.v1.tar+encrypted";
/// `application/vnd.oci.image.layer.v1.tar+gzip+encrypted`
pub const OCI_LAYER_TAR_GZIP_ENC: &str = "application/vnd.oci.image.layer.v1.tar+gzip+encrypted";
/// `application/vnd.oci.image.layer.v1.tar+zstd+encrypted`
pub const OCI_LAYER_TAR_ZSTD_ENC: &str = "application/vnd.oci.image.layer.v1.tar+zstd+encrypted";
/// `application/vnd.oci.image.layer.nondistributable.v1.tar`
pub const OCI_NONDIST_TAR: &str = "application/vnd.oci.image.layer.nondistributable.v1.tar";
/// `application/vnd.oci.image.layer.nondistributable.v1.tar+gzip`
pub const OCI_NONDIST_TAR_GZIP: &str = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip";
/// `application/vnd.oci.image.layer.nondistributable.v1.tar+zstd`
pub const OCI_NONDIST_TAR_ZSTD: &str = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd";
/// `application/vnd.docker.image.rootfs.diff.tar`
pub const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
/// `application/vnd.docker.image.rootfs.diff.tar.gzip`
pub const DOCKER_LAYER_TAR_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// `application/vnd.oci.image.manifest.v1+json`
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// `application/vnd.oci.image.index.v1+json`
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// `application/vnd.docker.distribution.manifest.v2+json`
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// `application/vnd.docker.distribution.manifest.list.v2+json`
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// The suffix that marks an encrypted layer.
pub const ENCRYPTED_SUFFIX: &str = "+encrypted";
/// Prefix of every encryption annotation; all are removed on decrypt.
pub const ANNOTATION_PREFIX: &str = "org.opencontainers.image.enc.";
/// Prefix of the wrapped-key annotations: `org.opencontainers.image.enc.keys.<scheme>`.
pub const KEYS_ANNOTATION_PREFIX: &str = "org.opencontainers.image.enc.keys.";
/// The public options annotation.
pub const PUBOPTS_ANNOTATION: &str = "org.opencontainers.image.enc.pubopts";

/// The annotation that carries wrapped keys for `scheme` (`jwe`, `pkcs7`, `provider.<name>`…).
pub fn keys_annotation(scheme: &str) -> String {
    format!("{KEYS_ANNOTATION_PREFIX}{scheme}")
}

/// Whether a layer media type is encrypted (any base type with the `+encrypted` suffix).
pub fn is_encrypted(media_type: &str) -> bool {
    media_type.ends_with(ENCRYPTED_SUFFIX)
}

/// Whether a media type is a layer type we know how to encrypt.
pub fn is_encryptable_layer(media_type: &str) -> bool {
    let base = media_type.split('+').next().unwrap_or_default();
    matches!(
        base,
        "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | DOCKER_LAYER_TAR
            | DOCKER_LAYER_TAR_GZIP
    )
}

/// The media type of the encrypted form of a layer.
///
/// # Errors
/// [`Error::AlreadyEncrypted`] for an encrypted layer, [`Error::UnsupportedMediaType`] for a type
/// that is not a layer (configs, foreign layers, …).
pub fn encrypted_media_type(media_type: &str) -> Result<String, Error> {
    if media_type.split('+').any(|p| p == "encrypted") {
        return Err(Error::AlreadyEncrypted {
            media_type: media_type.to_owned(),
        });
    }
    let oci = match media_type {
        DOCKER_LAYER_TAR => OCI_LAYER_TAR,
        DOCKER_LAYER_TAR_GZIP => OCI_LAYER_TAR_GZIP,
        other if is_encryptable_layer(other) => other,
        other => {
            return Err(Error::UnsupportedMediaType {
                media_type: other.to_owned(),
            })
        }
    };
    Ok(format!("{oci}{ENCRYPTED_SUFFIX}"))
}

/// The media type of the decrypted form of an encrypted layer (the suffix stripped).
///
/// # Errors
/// [`Error::NotEncrypted`] when the type has no `+encrypted` suffix.
pub fn decrypted_media_type(media_type: &str) -> Result<String, Error> {
    media_type
        .strip_suffix(ENCRYPTED_SUFFIX)
        .map(str::to_owned)
        .ok_or_else(|| Error::NotEncrypted {
            media_type: media_type.to_owned(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_both_ways() {
        for (plain, enc) in [
            (OCI_LAYER_TAR, OCI_LAYER_TAR_ENC),
            (OCI_LAYER_TAR_GZIP, OCI_LAYER_TAR_GZIP_ENC),
            (OCI_LAYER_TAR_ZSTD, OCI_LAYER_TAR_ZSTD_ENC),
            (
                OCI_NONDIST_TAR_GZIP,
                "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip+encrypted",
            ),
            (
                OCI_NONDIST_TAR_ZSTD,
                "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd+encrypted",
            ),
        ] {
            assert_eq!(encrypted_media_type(plain).unwrap(), enc);
            assert_eq!(decrypted_media_type(enc).unwrap(), plain);
            assert!(is_encrypted(enc) && !is_encrypted(plain));
        }
        assert_eq!(
            encrypted_media_type(DOCKER_LAYER_TAR_GZIP).unwrap(),
            OCI_LAYER_TAR_GZIP_ENC
        );
        assert_eq!(encrypted_media_type(DOCKER_LAYER_TAR).unwrap(), OCI_LAYER_TAR_ENC);
        assert_eq!(
            decrypted_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip+encrypted").unwrap(),
            DOCKER_LAYER_TAR_GZIP
        );
    }

    #[test]
    fn refuses_double_encryption_and_non_layers() {
        assert!(matches!(
            encrypted_media_type(OCI_LAYER_TAR_GZIP_ENC),
            Err(Error::AlreadyEncrypted { .. })
        ));
        assert!(matches!(
            encrypted_media_type("application/vnd.oci.image.config.v1+json"),
            Err(Error::UnsupportedMediaType { .. })
        ));
        assert!(matches!(
            decrypted_media_type(OCI_LAYER_TAR),
            Err(Error::NotEncrypted { .. })
        ));
        assert_eq!(keys_annotation("jwe"), "org.opencontainers.image.enc.keys.jwe");
    }
}

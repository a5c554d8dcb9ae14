//! The crate's error type.

use crate::keywrap::{Attempt, WrapError};

/// Errors of the layer cipher, options, key handling and image operations.
///
/// An HMAC failure is deliberately opaque: [`Error::AuthenticationFailed`] says only that
/// verification failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The layer key is not 32 bytes.
    #[error("invalid layer key length: expected {expected} bytes, got {got}")]
    InvalidKeyLength {
        /// Expected length.
        expected: usize,
        /// Actual length.
        got: usize,
    },
    /// The nonce is not 16 bytes.
    #[error("invalid nonce length: expected {expected} bytes, got {got}")]
    InvalidNonceLength {
        /// Expected length.
        expected: usize,
        /// Actual length.
        got: usize,
    },
    /// The private options carry no nonce.
    #[error("the layer options carry no nonce; refusing to decrypt (Go ocicrypt would produce garbage)")]
    MissingNonce,
    /// The public (unauthenticated) options carry a nonce that differs from the private one.
    #[error("the public layer options (pubopts annotation) carry a nonce that differs from the one in the wrapped private options: the image was tampered with; refusing to decrypt")]
    ConflictingNonce,
    /// Public options carry no HMAC.
    #[error("HMAC is not provided for decryption")]
    MissingHmac,
    /// The HMAC is not 32 bytes.
    #[error("invalid HMAC length: expected {expected} bytes, got {got}")]
    InvalidHmacLength {
        /// Expected length.
        expected: usize,
        /// Actual length.
        got: usize,
    },
    /// The layer failed authentication (wrong data, tampered layer, or wrong options).
    #[error("layer verification failed")]
    AuthenticationFailed,
    /// A stream was finished before it was read to the end.
    #[error("the stream was not read to the end, cannot finalize")]
    StreamNotFinished,
    /// Options JSON or base64 is malformed.
    #[error("malformed {which} layer options: {reason}")]
    InvalidOptions {
        /// `private` or `public`.
        which: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A cipher other than AES_256_CTR_HMAC_SHA256.
    #[error("unsupported layer cipher {name:?}")]
    UnsupportedCipher {
        /// The name found.
        name: String,
    },
    /// A required annotation is missing.
    #[error("missing annotation {0}")]
    MissingAnnotation(&'static str),
    /// The layer is already encrypted.
    #[error("layer is already encrypted ({media_type}); refusing to encrypt it twice")]
    AlreadyEncrypted {
        /// Its media type.
        media_type: String,
    },
    /// The layer is not encrypted.
    #[error("layer is not encrypted ({media_type})")]
    NotEncrypted {
        /// Its media type.
        media_type: String,
    },
    /// Not a layer media type we can encrypt.
    #[error("unsupported layer media type {media_type}")]
    UnsupportedMediaType {
        /// The media type.
        media_type: String,
    },
    /// No recipients were given for an encryption.
    #[error("no recipients given: pass at least one (e.g. --recipient jwe:public.pem)")]
    NoRecipients,
    /// Wrapping failed in one scheme.
    #[error("wrapping the layer key with {scheme} failed")]
    Wrap {
        /// The scheme.
        scheme: String,
        /// Why.
        #[source]
        source: WrapError,
    },
    /// None of the given keys is for any scheme the layer was encrypted with.
    #[error("missing private key needed for decryption: the layer is encrypted for {}, and no key for those was given", schemes.join(", "))]
    NoKeyForScheme {
        /// The schemes present on the layer.
        schemes: Vec<String>,
    },
    /// A `keys.<scheme>` annotation holds more entries than [`crate::keywrap::MAX_KEY_ENTRIES`].
    #[error("the org.opencontainers.image.enc.keys.{scheme} annotation holds {count} wrapped-key entries, above the limit of {}: no image needs that many, refusing to try them", crate::keywrap::MAX_KEY_ENTRIES)]
    TooManyKeyEntries {
        /// The scheme (sanitized).
        scheme: String,
        /// Entries found.
        count: usize,
    },
    /// Keys were tried and none could unwrap the layer key.
    #[error("none of the given keys can decrypt this layer (tried: {})", attempts.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Unwrap {
        /// Every attempt that failed.
        attempts: Vec<Attempt>,
    },
    /// A key could not be read or used.
    #[error(transparent)]
    Key(#[from] crate::keys::KeyError),
    /// Content does not match its digest.
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        /// What was read.
        what: String,
        /// Digest claimed.
        expected: String,
        /// Digest computed.
        actual: String,
    },
    /// An operation failed on one layer; the source says why.
    #[error("layer {index} ({digest}) of {image}")]
    Layer {
        /// The image (`oci:path:tag`, `docker://…`), and manifest digest for multi-arch images.
        image: String,
        /// Layer index in its manifest.
        index: usize,
        /// Layer digest.
        digest: String,
        /// The cause.
        #[source]
        source: Box<Error>,
    },
    /// Malformed image data (index, manifest, layout).
    #[error("{0}")]
    Image(String),
    /// A `--platform` or `--layer` selection that selects nothing, or a layer index out of
    /// range: a usage error, never a silent no-op.
    #[error("{0}")]
    Selection(String),
    /// Recipients to remove that are on no selected layer.
    #[error("{} {} not a recipient of {image}; its recipients are: {}", missing.join(", "), if missing.len() == 1 { "is" } else { "are" }, if present.is_empty() { "none with a key id".to_owned() } else { present.join(", ") })]
    RecipientNotFound {
        /// The image.
        image: String,
        /// The ids asked for and not found.
        missing: Vec<String>,
        /// The ids that are there.
        present: Vec<String>,
    },
    /// Recipients could not be removed from a layer.
    #[error(transparent)]
    Recipients(#[from] crate::recipients::RemoveError),
    /// An I/O error.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Error {
    /// The innermost error, past [`Error::Layer`] context: what a caller classifies.
    pub fn root_cause(&self) -> &Error {
        match self {
            Error::Layer { source, .. } => source.root_cause(),
            other => other,
        }
    }

    /// Converts an I/O error from a stream back into the crate error it carries, if any.
    pub fn from_stream(e: std::io::Error) -> Error {
        if e.get_ref().and_then(|i| i.downcast_ref::<Error>()).is_some() {
            let inner = e.into_inner().expect("checked");
            match inner.downcast::<Error>() {
                Ok(b) => *b,
                Err(other) => Error::Io(std::io::Error::other(other)),
            }
        } else {
            Error::Io(e)
        }
    }
}

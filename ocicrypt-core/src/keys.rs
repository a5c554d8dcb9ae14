//! Public and private key parsing, key directories and key generation.
//!
//! What is accepted, compared with Go containers/ocicrypt (`utils.ParsePrivateKey`,
//! `ParsePublicKey`):
//!
//! | input | [`PrivateKey::from_bytes`] | [`PublicKey::from_bytes`] | Go ocicrypt |
//! | --- | --- | --- | --- |
//! | PKCS#8 PEM/DER (`PRIVATE KEY`) | yes | no (names it) | yes |
//! | PKCS#1 PEM/DER (`RSA PRIVATE KEY`) | yes | no | yes |
//! | SEC1 DER | yes | no | yes |
//! | SEC1 PEM (`EC PRIVATE KEY`) | yes | no | **silently ignored** |
//! | legacy encrypted PEM (`Proc-Type`/`DEK-Info`) | with password | no | with password |
//! | encrypted PKCS#8 (`ENCRYPTED PRIVATE KEY`, PEM or DER) | with password | no | no |
//! | private JWK (JSON) | yes (keeps `alg`/`kid`) | no | yes |
//! | SPKI PEM/DER (`PUBLIC KEY`) | no (names it) | yes | yes |
//! | PKCS#1 `RSA PUBLIC KEY` PEM/DER | no | yes | no |
//! | public JWK (JSON, may carry `alg`, `kid`) | no | yes | yes |
//! | X.509 certificate PEM/DER | no | yes (its key) | `pkcs7:` only |
//!
//! Key types: RSA (any size OpenSSL accepts) and EC on P-256, P-384 and P-521. Anything else
//! (Ed25519, DSA, other curves, OpenSSH or PGP files) is refused with a [`KeyError`] that
//! names the source, says what was found and what to do.
//!
//! Parsing uses OpenSSL (the `openssl` crate), which frees private key numbers with
//! `BN_clear_free`; intermediate buffers holding key bytes are [`zeroize::Zeroizing`]. An
//! encrypted key is only ever decrypted with the password given: no terminal prompt is
//! possible (OpenSSL's default PEM password callback is never installed).
//!
//! The pure-Rust `rsa` crate is deliberately not used for private-key operations: its
//! decryption is not constant time (RUSTSEC-2023-0071, the "Marvin" timing attack).
//!
//! Key directories ([`read_key_dir`], [`classify_key_file`]) follow CRI-O's
//! `decryption_keys_path` and containerd's `ctd-decoder --decryption-keys-path`, which hand
//! every file to Go `ocicrypt/utils.SortDecryptionKeys`.
//!
//! ## Example
//! ```
//! use ocicrypt_core::keys::{generate_ec, KeyError, PrivateKey, PublicKey};
//!
//! let (private_pem, public_pem) = generate_ec("P-384")?;
//! let key = PrivateKey::from_bytes(private_pem.as_bytes(), None, "key.pem")?;
//! assert_eq!(key.describe(), "EC P-384");
//! assert!(key.public_key().same_key(&PublicKey::from_bytes(public_pem.as_bytes(), "key.pub.pem")?));
//!
//! // A public key where a private one is needed: the error says what was found.
//! let err = PrivateKey::from_bytes(public_pem.as_bytes(), None, "key.pub.pem").unwrap_err();
//! assert!(matches!(err, KeyError::Unsupported { .. }));
//! assert!(err.to_string().contains("key.pub.pem: not a usable key: found a public key"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::path::PathBuf;

#[cfg(feature = "jwe")]
mod dir;
#[cfg(feature = "jwe")]
mod generate;
#[cfg(feature = "jwe")]
mod jwk;
#[cfg(feature = "jwe")]
mod parse;
#[cfg(feature = "jwe")]
mod pem;
#[cfg(all(test, feature = "jwe"))]
mod tests;
#[cfg(feature = "jwe")]
mod thumbprint;

#[cfg(feature = "jwe")]
pub use dir::{
    classify_key_file, read_key_dir, read_key_dir_lenient, KeyDir, KeyDirEntry, KeyDirFile, KeyFileKind,
    SkippedKeyFile,
};
#[cfg(feature = "jwe")]
pub use generate::{generate_ec, generate_rsa};
#[cfg(feature = "jwe")]
pub(crate) use parse::ec_coordinates as parse_ec_coordinates;
#[cfg(feature = "jwe")]
pub(crate) use parse::{openpgp_tag, read_key_file};
#[cfg(feature = "jwe")]
pub use parse::{Curve, KeyFormat, KeyKind, PrivateKey, PublicKey, MAX_KEY_FILE_SIZE};
#[cfg(feature = "jwe")]
pub(crate) use pem::{contains_pem, parse_blocks as pem_blocks};

/// Why a key could not be read or used.
///
/// Messages name the source (a file name, or whatever the caller passed as `source_name`),
/// say what was found and what to do. They never contain key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The data is not a supported key of the kind asked for.
    #[error("{source_name}: not a usable key: found {found}")]
    Unsupported {
        /// File or other origin of the key.
        source_name: String,
        /// What was found in it, with a hint when one helps.
        found: String,
    },
    /// A key of an algorithm or curve we do not support.
    #[error("{source_name}: unsupported key type: {found} (supported: RSA, EC P-256, P-384, P-521)")]
    UnsupportedAlgorithm {
        /// File or other origin of the key.
        source_name: String,
        /// The key type found (`Ed25519`, `EC secp256k1`, …).
        found: String,
    },
    /// The private key is encrypted and no password was given.
    #[error("{source_name} is encrypted: give its password as FILE:PASSWORD")]
    NeedsPassword {
        /// File or other origin of the key.
        source_name: String,
    },
    /// The password does not decrypt the key.
    #[error("{source_name}: wrong password for the encrypted private key (or the file is damaged)")]
    WrongPassword {
        /// File or other origin of the key.
        source_name: String,
    },
    /// The data looks like a key of a known format but does not parse.
    #[error("{source_name}: malformed {what}: {reason}")]
    Malformed {
        /// File or other origin of the key.
        source_name: String,
        /// The format it claimed to be (`PEM block "PRIVATE KEY"`, `JWK`, …).
        what: String,
        /// What is wrong (never key material).
        reason: String,
    },
    /// A key file or directory could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A key directory holds a symbolic link (CRI-O and containerd refuse those too).
    #[error("{}: symbolic links are not allowed in a key directory: replace it with the file it points to", path.display())]
    Symlink {
        /// The link.
        path: PathBuf,
    },
    /// A file in a key directory that a container runtime cannot use: the runtime would fail
    /// every pull of an encrypted image because of it.
    #[error("key directory file {}: {reason}; remove it or move it out of the directory (CRI-O and containerd fail the whole decryption on such a file)", path.display())]
    UnusableKeyFile {
        /// The file.
        path: PathBuf,
        /// Why it cannot be used.
        reason: String,
    },
    /// A parameter of a key operation is invalid (key size, curve name).
    #[error("invalid key parameter: {0}")]
    InvalidParameter(String),
    /// OpenSSL failed while generating or converting a key.
    #[error("{context}: {reason}")]
    Crypto {
        /// What was being done.
        context: String,
        /// OpenSSL's message (never key material).
        reason: String,
    },
}

impl KeyError {
    /// Whether this is an I/O "not found" error (CRI-O treats a missing key directory as an
    /// empty one; callers mirroring that check this).
    pub fn is_not_found(&self) -> bool {
        matches!(self, KeyError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

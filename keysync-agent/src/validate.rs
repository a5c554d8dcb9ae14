//! Which key files may be written: only private keys that the runtimes' loader (Go
//! `ocicrypt/utils.SortDecryptionKeys`, used by CRI-O and containerd's `ctd-decoder`) accepts.
//!
//! One bad file in CRI-O's key directory makes every image pull on the node fail, so anything the
//! loader would refuse (public keys, encrypted keys, SEC1 `EC PRIVATE KEY` PEM, text, truncated
//! PEM) is rejected here and never written. Certificates and GPG public keyrings, which the
//! loader tolerates, are rejected too: the agent installs decryption keys only.
//!
//! GPG secret keyrings (for `pgp` layers) are decryption keys: a binary one is written as is;
//! an armored one (`gpg --armor --export-secret-keys`, which Go runtimes cannot read: CRI-O
//! fails every pull on it) is written as the equivalent binary keyring
//! ([`Accepted::rewritten`]). A keyring must parse completely and hold unprotected secret keys
//! (a runtime has no passphrase).

use ocicrypt_core::keys::{classify_key_file, KeyError, KeyFileKind};
use ocicrypt_core::pgp::{secret_keyring_binary, PgpSecretKey};
use zeroize::Zeroizing;

/// Largest key file accepted (an RSA-16384 PKCS#8 PEM is about 13 KiB).
pub const MAX_KEY_SIZE: usize = 64 * 1024;

/// Why a key file was rejected. Messages never contain key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Rejection {
    /// Larger than [`MAX_KEY_SIZE`].
    #[error("{size} bytes, more than the {MAX_KEY_SIZE}-byte limit for a key file")]
    TooLarge {
        /// Its size.
        size: usize,
    },
    /// Empty.
    #[error("empty")]
    Empty,
    /// A password-protected private key: the runtime has no password and fails on it.
    #[error(
        "an encrypted private key: the container runtime cannot use it and would fail every pull; \
         store it unencrypted (openssl pkey -in key.pem -out plain.pem)"
    )]
    Encrypted,
    /// A private key in an encoding the runtime ignores or refuses (SEC1 `EC PRIVATE KEY` PEM).
    #[error(
        "{found}, which the container runtime cannot read; convert it to PKCS#8 \
         (openssl pkcs8 -topk8 -nocrypt -in key.pem -out key.p8.pem)"
    )]
    UnreadableFormat {
        /// What it is.
        found: String,
    },
    /// A GPG secret key protected by a passphrase: the runtime has none and cannot use it.
    #[error(
        "a passphrase-protected GPG secret key: the container runtime cannot unlock it; \
         export it without a passphrase (gpg --passwd KEYID to an empty one, then gpg --export-secret-keys KEYID)"
    )]
    ProtectedKeyring,
    /// Something the runtime accepts but that is not a private key (a certificate, a keyring).
    #[error("{found}, not a private key: only private decryption keys are installed")]
    NotPrivate {
        /// What it is.
        found: String,
    },
    /// Anything else.
    #[error("not a private key the container runtime can use: {found}")]
    NotAKey {
        /// What was found.
        found: String,
    },
}

/// What was accepted, for logs (type, size and encoding; never key material).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// E.g. `RSA-2048 private key (PKCS#8 PEM)`.
    pub description: String,
    /// The bytes to write instead of the input, when the runtime needs another encoding of the
    /// same key (an armored GPG keyring is written binary).
    pub rewritten: Option<Zeroizing<Vec<u8>>>,
}

/// Checks one key file's contents.
pub fn validate_key(bytes: &[u8], source_name: &str) -> Result<Accepted, Rejection> {
    if bytes.len() > MAX_KEY_SIZE {
        return Err(Rejection::TooLarge { size: bytes.len() });
    }
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(Rejection::Empty);
    }
    let kind = classify_key_file(bytes, source_name);
    match kind {
        KeyFileKind::PrivateKey(ref k) if k.format().go_ocicrypt_reads() => Ok(Accepted {
            description: kind.describe(),
            rewritten: None,
        }),
        KeyFileKind::GpgSecretKeyring | KeyFileKind::GpgArmoredSecretKeyring => {
            let damaged = |e: KeyError| Rejection::NotAKey {
                found: match e {
                    // The reason is already a sanitized token (ocicrypt_core::redact).
                    KeyError::Malformed { reason, .. } => format!("a damaged GPG secret keyring ({reason})"),
                    KeyError::Unsupported { found, .. } => format!("a GPG keyring with {found}"),
                    other => ocicrypt_core::redact::token(&other.to_string()).into_owned(),
                },
            };
            let keys = PgpSecretKey::from_bytes_many(bytes, None, source_name).map_err(damaged)?;
            if keys.iter().any(PgpSecretKey::is_protected) {
                return Err(Rejection::ProtectedKeyring);
            }
            let armored = matches!(kind, KeyFileKind::GpgArmoredSecretKeyring);
            let rewritten = if armored {
                Some(secret_keyring_binary(bytes, source_name).map_err(damaged)?)
            } else {
                None
            };
            let ids: Vec<String> = keys.iter().map(PgpSecretKey::key_id).collect();
            Ok(Accepted {
                description: format!(
                    "{} (key id {}){}",
                    kind.describe(),
                    ids.join(", "),
                    if armored { ", written binary" } else { "" }
                ),
                rewritten,
            })
        }
        KeyFileKind::PrivateKey(_) => Err(Rejection::UnreadableFormat {
            found: kind.describe(),
        }),
        KeyFileKind::EncryptedPrivateKey => Err(Rejection::Encrypted),
        // A key on a token: the runtime loads it if it parses (it names the module, token and
        // key; whether the node has them is the runtime's to find out, no module is loaded
        // here).
        KeyFileKind::Pkcs11Yaml => Ok(Accepted {
            description: kind.describe(),
            rewritten: None,
        }),
        KeyFileKind::Unknown { found } => Err(Rejection::NotAKey { found }),
        other => Err(Rejection::NotPrivate {
            found: other.describe(),
        }),
    }
}

#[cfg(test)]
mod pkcs11_tests {
    use super::*;

    #[test]
    fn a_pkcs11_key_yaml_is_a_key_the_runtime_loads() {
        let yaml = b"pkcs11:\n  uri: pkcs11:token=t;id=%01;object=k?pin-value=1234&module-name=softhsm2\nmodule:\n  env:\n    SOFTHSM2_CONF: /etc/softhsm2.conf\n";
        let a = validate_key(yaml, "k.yaml").unwrap();
        assert!(a.description.contains("PKCS#11"), "{a:?}");
        // A URI Go cannot parse makes the runtime fail ("Unknown decryption key type").
        let bad = b"pkcs11:\n  uri: pkcs11:token=t;token=u\n";
        assert!(matches!(
            validate_key(bad, "k.yaml"),
            Err(Rejection::NotAKey { .. })
        ));
        assert!(matches!(
            validate_key(b"other:\n  uri: pkcs11:token=t\n", "k.yaml"),
            Err(Rejection::NotAKey { .. })
        ));
    }
}

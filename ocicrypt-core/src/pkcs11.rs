//! The PKCS#11 key-wrap scheme (`org.opencontainers.image.enc.keys.pkcs11`), compatible with Go
//! ocicrypt (`keywrap/pkcs11`, `crypto/pkcs11`): keys that never leave a hardware security
//! module (or SoftHSM).
//!
//! A blob is JSON, `{"version":0,"recipients":[{"version":0,"blob":"<base64>","hash":"sha256"}]}`:
//! per recipient, the private options JSON RSA-OAEP-encrypted directly (empty label, MGF1 with
//! the same hash). `hash` is `sha256`, or `sha1` when `OCICRYPT_OAEP_HASHALG=sha1` (SoftHSM 2.6
//! does only SHA-1 OAEP); an empty or missing `hash` on input means SHA-1 (older writers).
//! RSA-2048 with SHA-256 OAEP carries at most 190 bytes, less than the options JSON: use SHA-1
//! or a key of 3072 bits or more (the error says so).
//!
//! Recipients are RSA public keys ([`Pkcs11Recipient::PublicKey`], encrypted in software and
//! decryptable later on the token) or [`Pkcs11KeyFile`]s naming a public key on a token
//! ([`Pkcs11Recipient::Token`], encrypted by the token). Decryption uses key files naming the
//! private key: the RSA operation runs on the token (feature `pkcs11`, through `cryptoki`).
//!
//! Modules are loaded only as the [`Pkcs11Config`] policy allows (`ocicrypt.conf`, see
//! [`Pkcs11Config::from_env`]): with no policy, none. A wrong PIN is not tried again by the
//! same unwrapper (real tokens lock after a few wrong PINs).
//!
//! Without the `pkcs11` feature the formats (blob JSON, key files, URIs, the policy) are still
//! parsed; no module can be loaded.

mod config;
mod keyfile;
#[cfg(all(test, feature = "pkcs11"))]
mod tests;
#[cfg(feature = "pkcs11")]
mod token;
mod uri;

use std::path::Path;

use serde::{Deserialize, Serialize};

pub use config::{Pkcs11Config, CONFIG_ENV, CONFIG_FILE, SYSTEM_CONFIG};
pub use keyfile::Pkcs11KeyFile;
pub use uri::Pkcs11Uri;

/// The annotation scheme name.
pub const SCHEME: &str = "pkcs11";
/// The environment variable choosing the OAEP hash when wrapping (`sha1` or `sha256`).
pub const OAEP_HASH_ENV: &str = "OCICRYPT_OAEP_HASHALG";
/// Recipients accepted in one blob (a real one has a handful): bounds the token operations a
/// hostile annotation can cause.
pub const MAX_RECIPIENTS: usize = 64;

/// A path for a message: shown as given, control characters replaced.
pub(crate) fn shown(p: &Path) -> String {
    p.display()
        .to_string()
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// What went wrong with a PKCS#11 key, token or module. Messages never quote a PIN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Pkcs11Error {
    /// A PKCS#11 URI that does not parse or names too little.
    #[error("PKCS#11 URI: {reason}")]
    Uri {
        /// What is wrong.
        reason: String,
    },
    /// A file that is not a PKCS#11 key file.
    #[error("{source_name}: {reason}")]
    KeyFile {
        /// The file.
        source_name: String,
        /// What is wrong.
        reason: String,
    },
    /// A file could not be read.
    #[error("cannot read {path}: {reason}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        reason: String,
    },
    /// No `ocicrypt.conf` was found: no module may be loaded.
    #[error("no ocicrypt config file was found (looked at {}), so no PKCS#11 module may be loaded", searched.join(", "))]
    NoConfig {
        /// The places looked at.
        searched: Vec<String>,
    },
    /// The ocicrypt config does not parse.
    #[error("ocicrypt config {source_name}: {reason}")]
    Config {
        /// The file.
        source_name: String,
        /// What is wrong.
        reason: String,
    },
    /// The module is outside what the config allows.
    #[error("PKCS#11 module {module} is not allowed by the ocicrypt config (allowed-module-paths)")]
    ModuleNotAllowed {
        /// The module path.
        module: String,
    },
    /// No module was found.
    #[error("PKCS#11 module not found: {what}")]
    ModuleNotFound {
        /// What was looked for.
        what: String,
    },
    /// The module could not be loaded or initialized.
    #[error("PKCS#11 module {module} could not be loaded: {reason}")]
    ModuleLoad {
        /// The module path.
        module: String,
        /// Why.
        reason: String,
    },
    /// A key file's `module: env:` has an invalid variable name.
    #[error("module environment variable {name} is not a valid name")]
    Env {
        /// The name.
        name: String,
    },
    /// No PIN for a private-key operation.
    #[error("no PIN for the private key: add pin-value (or pin-source) to the URI, or pass --key FILE:PIN")]
    MissingPin,
    /// The PIN file cannot be read.
    #[error("PIN: {reason}")]
    PinSource {
        /// Why.
        reason: String,
    },
    /// The token refused the PIN.
    #[error("the token refused the PIN (wrong PIN)")]
    WrongPin,
    /// The token's user PIN is locked.
    #[error("the token's user PIN is locked")]
    PinLocked,
    /// No token with the URI's label (or no such slot).
    #[error("no token {token} in any slot of the module")]
    TokenNotFound {
        /// The token label or slot.
        token: String,
    },
    /// The key is not on the token.
    #[error("no {what} on the token")]
    KeyNotFound {
        /// What was looked for.
        what: String,
    },
    /// More than one key matches.
    #[error("{count} objects match: {what}; make the URI name one (add id or object)")]
    AmbiguousKey {
        /// What was looked for.
        what: String,
        /// How many matched.
        count: usize,
    },
    /// The token does not support the OAEP parameters.
    #[error("the token refused RSA-OAEP with SHA-256 ({op}: {reason}); SoftHSM and some HSMs do only SHA-1 OAEP: set OCICRYPT_OAEP_HASHALG=sha1")]
    Mechanism {
        /// The operation.
        op: String,
        /// The token's error.
        reason: String,
    },
    /// The options do not fit the key with this hash.
    #[error("the layer options ({len} bytes) are too long for RSA-OAEP-{} with this key; use a key of 3072 bits or more, or OCICRYPT_OAEP_HASHALG=sha1", hash.name())]
    TooLong {
        /// The data length.
        len: usize,
        /// The hash.
        hash: OaepHash,
    },
    /// An unsupported hash name.
    #[error("unsupported OAEP hash {found} (sha1 and sha256 are known)")]
    Hash {
        /// What was found.
        found: String,
    },
    /// Another token error.
    #[error("PKCS#11 {op} failed: {reason}")]
    Token {
        /// The operation.
        op: String,
        /// The token's error.
        reason: String,
    },
}

impl Pkcs11Error {
    /// Whether the key (its file, module, token or PIN) cannot be used at all, as opposed to a
    /// key that works but opens none of the blobs.
    pub fn key_unusable(&self) -> bool {
        !matches!(self, Pkcs11Error::Hash { .. } | Pkcs11Error::TooLong { .. })
    }
}

/// The RSA-OAEP hash (also the MGF1 hash).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OaepHash {
    /// SHA-1 (SoftHSM 2.6 knows only this).
    Sha1,
    /// SHA-256 (Go's default).
    Sha256,
}

impl OaepHash {
    /// The name written in the blob's `hash`.
    pub fn name(self) -> &'static str {
        match self {
            OaepHash::Sha1 => "sha1",
            OaepHash::Sha256 => "sha256",
        }
    }

    /// The wrap hash from [`OAEP_HASH_ENV`] (Go: unset, empty or `sha256` → SHA-256, `sha1`
    /// → SHA-1, case-insensitive).
    ///
    /// # Errors
    /// [`Pkcs11Error::Hash`] for another value.
    pub fn from_env() -> Result<OaepHash, Pkcs11Error> {
        let v = std::env::var(OAEP_HASH_ENV).unwrap_or_default();
        match v.to_ascii_lowercase().as_str() {
            "" | "sha256" => Ok(OaepHash::Sha256),
            "sha1" => Ok(OaepHash::Sha1),
            _ => Err(Pkcs11Error::Hash {
                found: format!("{}={}", OAEP_HASH_ENV, crate::redact::token(&v)),
            }),
        }
    }

    /// The hash of a blob's `hash` field (empty = SHA-1, as in Go).
    ///
    /// # Errors
    /// [`Pkcs11Error::Hash`].
    pub fn from_blob(name: &str) -> Result<OaepHash, Pkcs11Error> {
        match name {
            "" | "sha1" => Ok(OaepHash::Sha1),
            "sha256" => Ok(OaepHash::Sha256),
            other => Err(Pkcs11Error::Hash {
                found: crate::redact::token(other).into_owned(),
            }),
        }
    }
}

/// The blob JSON (Go's `Pkcs11Blob`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pkcs11Blob {
    /// Always 0.
    pub version: u32,
    /// One entry per recipient.
    #[serde(default)]
    pub recipients: Vec<Pkcs11BlobRecipient>,
}

/// One recipient of a [`Pkcs11Blob`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pkcs11BlobRecipient {
    /// Always 0.
    pub version: u32,
    /// Base64 (standard, padded) of the RSA-OAEP ciphertext.
    #[serde(default)]
    pub blob: String,
    /// `sha1`, `sha256`, or empty (= SHA-1).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hash: String,
}

impl Pkcs11Blob {
    /// Parses a blob and checks its versions (0 only, as Go).
    ///
    /// # Errors
    /// A message saying what is wrong (no input quoted).
    pub fn parse(bytes: &[u8]) -> Result<Pkcs11Blob, String> {
        let b: Pkcs11Blob = serde_json::from_slice(bytes).map_err(|e| {
            format!(
                "not the PKCS#11 blob JSON (line {} column {})",
                e.line(),
                e.column()
            )
        })?;
        if b.version != 0 {
            return Err(format!("blob version {} (only version 0 is known)", b.version));
        }
        if b.recipients.len() > MAX_RECIPIENTS {
            return Err(format!(
                "{} recipients (at most {MAX_RECIPIENTS} are read)",
                b.recipients.len()
            ));
        }
        if let Some(r) = b.recipients.iter().find(|r| r.version != 0) {
            return Err(format!(
                "recipient version {} (only version 0 is known)",
                r.version
            ));
        }
        Ok(b)
    }

    /// The JSON, as Go's `json.Marshal` writes it.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("the blob serializes")
    }

    /// The decodable recipients: ciphertext and hash, in order (undecodable ones are skipped,
    /// as in Go, and counted).
    pub fn ciphertexts(&self) -> (Vec<(Vec<u8>, OaepHash)>, Vec<String>) {
        let mut ok = Vec::new();
        let mut errs = Vec::new();
        for (i, r) in self.recipients.iter().enumerate() {
            let hash = match OaepHash::from_blob(&r.hash) {
                Ok(h) => h,
                Err(e) => {
                    errs.push(format!("recipient {i}: {e}"));
                    continue;
                }
            };
            match crate::options::decode_b64(&r.blob) {
                Ok(b) if !b.is_empty() => ok.push((b, hash)),
                _ => errs.push(format!("recipient {i}: blob is not base64")),
            }
        }
        (ok, errs)
    }
}

#[cfg(feature = "pkcs11")]
pub use wrap::{Pkcs11Recipient, Pkcs11Unwrapper, Pkcs11Wrapper};

#[cfg(feature = "pkcs11")]
mod wrap {
    use std::borrow::Cow;
    use std::collections::BTreeSet;
    use std::sync::Mutex;

    use openssl::md::Md;
    use openssl::pkey_ctx::PkeyCtx;
    use openssl::rsa::Padding;
    use zeroize::Zeroizing;

    use super::token::{self, Decrypted};
    use super::*;
    use crate::keys::{KeyKind, PublicKey};
    use crate::keywrap::{KeyUnwrapper, KeyWrapper, UnwrapError, WrapError};

    /// A recipient of the PKCS#11 scheme.
    #[derive(Debug, Clone)]
    pub enum Pkcs11Recipient {
        /// An RSA public key: encrypted in software (`pkcs11:PUBKEY.pem`).
        PublicKey(PublicKey),
        /// A public key on a token, named by a key file (`pkcs11:KEY.yaml`).
        Token(Pkcs11KeyFile),
    }

    impl Pkcs11Recipient {
        fn name(&self) -> Cow<'_, str> {
            match self {
                Pkcs11Recipient::PublicKey(k) => Cow::Borrowed(k.source_name()),
                Pkcs11Recipient::Token(k) => Cow::Owned(k.describe()),
            }
        }
    }

    /// Wraps for a set of recipients: one blob with an entry each.
    #[derive(Debug, Clone)]
    pub struct Pkcs11Wrapper {
        recipients: Vec<Pkcs11Recipient>,
        hash: OaepHash,
        config: Pkcs11Config,
    }

    impl Pkcs11Wrapper {
        /// A wrapper for these recipients, with the OAEP hash and the module policy (used for
        /// [`Pkcs11Recipient::Token`] only).
        ///
        /// # Errors
        /// [`WrapError::NoRecipients`], [`WrapError::BadRecipient`] for a public key that is
        /// not RSA.
        pub fn new(
            recipients: Vec<Pkcs11Recipient>,
            hash: OaepHash,
            config: Pkcs11Config,
        ) -> Result<Self, WrapError> {
            if recipients.is_empty() {
                return Err(WrapError::NoRecipients {
                    scheme: SCHEME.into(),
                });
            }
            for r in &recipients {
                if let Pkcs11Recipient::PublicKey(k) = r {
                    if !matches!(k.kind(), KeyKind::Rsa { .. }) {
                        return Err(WrapError::BadRecipient {
                            recipient: k.source_name().to_owned(),
                            reason: format!(
                                "pkcs11: public keys must be RSA (RSA-OAEP), this is {}",
                                k.describe()
                            ),
                        });
                    }
                }
            }
            Ok(Pkcs11Wrapper {
                recipients,
                hash,
                config,
            })
        }
    }

    fn software_oaep(k: &PublicKey, hash: OaepHash, data: &[u8]) -> Result<Vec<u8>, Pkcs11Error> {
        let (md, md_len) = match hash {
            OaepHash::Sha1 => (Md::sha1(), 20),
            OaepHash::Sha256 => (Md::sha256(), 32),
        };
        let KeyKind::Rsa { bits } = k.kind() else {
            return Err(Pkcs11Error::Token {
                op: "encrypt".into(),
                reason: "not an RSA key".into(),
            });
        };
        let max = (bits as usize / 8).saturating_sub(2 * md_len + 2);
        if data.len() > max {
            return Err(Pkcs11Error::TooLong {
                len: data.len(),
                hash,
            });
        }
        let run = || -> Result<Vec<u8>, openssl::error::ErrorStack> {
            let mut ctx = PkeyCtx::new(k.pkey())?;
            ctx.encrypt_init()?;
            ctx.set_rsa_padding(Padding::PKCS1_OAEP)?;
            ctx.set_rsa_oaep_md(md)?;
            ctx.set_rsa_mgf1_md(md)?;
            let mut out = Vec::new();
            ctx.encrypt_to_vec(data, &mut out)?;
            Ok(out)
        };
        run().map_err(|e| Pkcs11Error::Token {
            op: "RSA-OAEP encryption".into(),
            reason: e.to_string(),
        })
    }

    impl KeyWrapper for Pkcs11Wrapper {
        fn scheme(&self) -> &str {
            SCHEME
        }

        fn wrap_keys(&self, optsdata: &[u8]) -> Result<Vec<u8>, WrapError> {
            let mut blob = Pkcs11Blob {
                version: 0,
                recipients: Vec::new(),
            };
            for r in &self.recipients {
                let ct = match r {
                    Pkcs11Recipient::PublicKey(k) => software_oaep(k, self.hash, optsdata),
                    Pkcs11Recipient::Token(k) => token::encrypt(k, &self.config, self.hash, optsdata),
                }
                .map_err(|e| WrapError::BadRecipient {
                    recipient: r.name().into_owned(),
                    reason: e.to_string(),
                })?;
                blob.recipients.push(Pkcs11BlobRecipient {
                    version: 0,
                    blob: crate::options::encode_b64(&ct),
                    hash: self.hash.name().to_owned(),
                });
            }
            Ok(blob.to_json())
        }
    }

    /// Unwraps with private keys on tokens, named by key files.
    #[derive(Debug)]
    pub struct Pkcs11Unwrapper {
        keys: Vec<Pkcs11KeyFile>,
        config: Pkcs11Config,
        /// Keys that could not be used (wrong PIN, missing token…): not tried again, so a
        /// wrong PIN is presented once, not once per layer.
        dead: Mutex<Vec<Option<Pkcs11Error>>>,
    }

    impl Pkcs11Unwrapper {
        /// An unwrapper for these key files under this module policy.
        pub fn new(keys: Vec<Pkcs11KeyFile>, config: Pkcs11Config) -> Self {
            let dead = Mutex::new(vec![None; keys.len()]);
            Pkcs11Unwrapper { keys, config, dead }
        }

        /// The key files.
        pub fn keys(&self) -> &[Pkcs11KeyFile] {
            &self.keys
        }
    }

    impl KeyUnwrapper for Pkcs11Unwrapper {
        fn scheme(&self) -> &str {
            SCHEME
        }

        fn unwrap_key(&self, blob: &[u8]) -> Result<Zeroizing<Vec<u8>>, UnwrapError> {
            let parsed = Pkcs11Blob::parse(blob).map_err(|reason| UnwrapError::Malformed {
                scheme: SCHEME.into(),
                reason,
            })?;
            let (cts, mut errs) = parsed.ciphertexts();
            if cts.is_empty() {
                return Err(UnwrapError::Malformed {
                    scheme: SCHEME.into(),
                    reason: if errs.is_empty() {
                        "the blob has no recipients".into()
                    } else {
                        errs.join("; ")
                    },
                });
            }
            let mut unusable: BTreeSet<String> = BTreeSet::new();
            for (i, key) in self.keys.iter().enumerate() {
                let known = self
                    .dead
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)[i]
                    .clone();
                if let Some(e) = known {
                    unusable.insert(format!("{}: {e}", key.describe()));
                    continue;
                }
                match token::decrypt_any(key, &self.config, &cts) {
                    Ok(Decrypted::Plain(p)) => return Ok(p),
                    Ok(Decrypted::NoMatch(e)) => errs.push(format!("{}: {}", key.describe(), e.join(", "))),
                    Err(e) => {
                        unusable.insert(format!("{}: {e}", key.describe()));
                        if e.key_unusable() {
                            self.dead
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)[i] = Some(e);
                        }
                    }
                }
            }
            if !unusable.is_empty() {
                return Err(UnwrapError::KeyUnusable {
                    scheme: SCHEME.into(),
                    reason: unusable.into_iter().collect::<Vec<_>>().join("; "),
                });
            }
            Err(UnwrapError::NoMatchingKey {
                scheme: SCHEME.into(),
            })
        }
    }
}

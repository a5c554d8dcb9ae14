//! The JWE key-wrap scheme (`org.opencontainers.image.enc.keys.jwe`), compatible with Go
//! containers/ocicrypt (go-jose) in both directions.
//!
//! **Writing** ([`JweWrapper`]): one JWE per wrap covering every recipient, content encryption
//! `A256GCM`, payload = the private options JSON, no compression. Per recipient: RSA →
//! `RSA-OAEP` (SHA-1), EC → `ECDH-ES+A256KW`, a JWK with `alg` → that alg (one of
//! [`KeyAlg`]). One recipient → flattened JSON with `alg` (and `epk`, `kid`) and `enc` in the
//! protected header, exactly the shape go-jose's `FullSerialize` writes; several → general JSON
//! with `protected` = `{"enc":"A256GCM"}` and a per-recipient `header`. Every recipient
//! carries a `kid`: the RFC 7638 thumbprint of its public key
//! ([`PublicKey::thumbprint`](crate::keys::PublicKey::thumbprint); a JWK's own `kid` is not
//! used), which go-jose ignores and which lets [`crate::recipients`] list and remove
//! recipients without a private key. Unlike go-jose we do not
//! add the redundant top-level `encrypted_key` to general JSON (RFC 7516 does not allow it;
//! Go reads both).
//!
//! Divergence from Go on purpose: an EC JWK *without* `alg` gets `ECDH-ES+A256KW` (Go falls
//! back to `RSA-OAEP` and then fails).
//!
//! **Reading** ([`JweUnwrapper`]): flattened and general JSON, and compact serialization (go-jose's
//! `ParseEncrypted` takes all three); key algorithms [`KeyAlg`], content algorithms
//! [`ContentAlg`] (all six of Go's); go-jose's extra top-level `encrypted_key` in general JSON
//! is ignored. Every private key is tried against every recipient until one opens the
//! content. An RSA-OAEP failure continues with a random key (RFC 7516 §11.5) so a bad padding
//! and a bad tag look alike.
//!
//! The implementation is a small hand-rolled one on OpenSSL (RSA-OAEP, ECDH + Concat KDF,
//! AES Key Wrap, AES-GCM, AES-CBC + HMAC) rather than josekit: go-jose's serialization shapes,
//! its quirks, trying every key on every recipient and keeping keys out of error messages are
//! all easier to get exactly right this way. josekit serves as an independent implementation
//! in the tests. The pure-Rust `rsa` crate is not used for decryption (RUSTSEC-2023-0071).
//!
//! ## Example
//! ```
//! use ocicrypt_core::jwe::{JweUnwrapper, JweWrapper};
//! use ocicrypt_core::keys::{generate_ec, generate_rsa, PrivateKey, PublicKey};
//! use ocicrypt_core::{KeyUnwrapper, KeyWrapper};
//!
//! let (rsa_private, rsa_public) = generate_rsa(2048)?;
//! let (_, ec_public) = generate_ec("P-256")?;
//! let recipients = vec![
//!     PublicKey::from_bytes(rsa_public.as_bytes(), "alice.pub.pem")?,
//!     PublicKey::from_bytes(ec_public.as_bytes(), "bob.pub.pem")?,
//! ];
//! let optsdata = br#"{"symkey":"...","digest":"sha256:...","cipheroptions":{}}"#;
//! let blob = JweWrapper::new(recipients)?.wrap_keys(optsdata)?; // general JSON: two recipients
//!
//! let alice = PrivateKey::from_bytes(rsa_private.as_bytes(), None, "alice.pem")?;
//! let back = JweUnwrapper::new(vec![alice]).unwrap_key(&blob)?;
//! assert_eq!(&back[..], &optsdata[..]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;

use base64::Engine as _;
use openssl::derive::Deriver;
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::md::Md;
use openssl::pkey::{PKey, PKeyRef, Private, Public};
use openssl::pkey_ctx::PkeyCtx;
use openssl::rsa::Padding;
use openssl::symm::Cipher;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use zeroize::Zeroizing;

use crate::keys::{Curve, KeyKind, PrivateKey, PublicKey};
use crate::keywrap::{KeyUnwrapper, KeyWrapper, UnwrapError, WrapError};

/// The annotation scheme name.
pub const SCHEME: &str = "jwe";

/// Recipients accepted in one JWE. ocicrypt writes one per `--recipient`; real images carry a
/// handful. Each recipient costs a private-key operation per key that fits it, so a JWE with
/// more is refused when it is parsed, before any key is tried.
pub const MAX_RECIPIENTS: usize = 256;

/// Bytes accepted in one JWE (one comma entry of the annotation). 256 recipients with EC
/// ephemeral keys take about 200 KiB.
pub const MAX_JWE_LEN: usize = 1024 * 1024;

/// Bytes accepted in a protected header (decoded JSON). ocicrypt's largest, with an EC `epk`
/// and a `kid`, is under 400 bytes.
pub const MAX_HEADER_LEN: usize = 16 * 1024;

/// A JWE key-management algorithm ocicrypt uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyAlg {
    /// RSAES-OAEP with SHA-1 and MGF1-SHA-1 (the default for RSA keys).
    RsaOaep,
    /// RSAES-OAEP with SHA-256 and MGF1-SHA-256.
    RsaOaep256,
    /// ECDH-ES, Concat KDF, AES-128 key wrap.
    EcdhEsA128Kw,
    /// ECDH-ES, Concat KDF, AES-192 key wrap.
    EcdhEsA192Kw,
    /// ECDH-ES, Concat KDF, AES-256 key wrap (the default for EC keys).
    EcdhEsA256Kw,
}

impl KeyAlg {
    /// Every algorithm, in the order of the enum.
    pub const ALL: [KeyAlg; 5] = [
        KeyAlg::RsaOaep,
        KeyAlg::RsaOaep256,
        KeyAlg::EcdhEsA128Kw,
        KeyAlg::EcdhEsA192Kw,
        KeyAlg::EcdhEsA256Kw,
    ];

    /// The JOSE name (`RSA-OAEP`…).
    pub fn name(self) -> &'static str {
        match self {
            KeyAlg::RsaOaep => "RSA-OAEP",
            KeyAlg::RsaOaep256 => "RSA-OAEP-256",
            KeyAlg::EcdhEsA128Kw => "ECDH-ES+A128KW",
            KeyAlg::EcdhEsA192Kw => "ECDH-ES+A192KW",
            KeyAlg::EcdhEsA256Kw => "ECDH-ES+A256KW",
        }
    }

    /// Parses a JOSE name.
    pub fn from_name(name: &str) -> Option<KeyAlg> {
        KeyAlg::ALL.into_iter().find(|a| a.name() == name)
    }

    /// Whether this algorithm is for RSA keys (else EC).
    pub fn is_rsa(self) -> bool {
        matches!(self, KeyAlg::RsaOaep | KeyAlg::RsaOaep256)
    }

    /// Whether the algorithm fits a key of this kind.
    pub fn fits(self, kind: KeyKind) -> bool {
        matches!(
            (self.is_rsa(), kind),
            (true, KeyKind::Rsa { .. }) | (false, KeyKind::Ec(_))
        )
    }

    /// The algorithm ocicrypt uses for a recipient: its JWK `alg` if it has one, else
    /// `RSA-OAEP` for RSA and `ECDH-ES+A256KW` for EC.
    ///
    /// # Errors
    /// A message when the `alg` is not a supported key-wrap algorithm or does not fit the key.
    pub fn for_recipient(key: &PublicKey) -> Result<KeyAlg, String> {
        match key.alg() {
            Some(name) => {
                let alg = KeyAlg::from_name(name).ok_or_else(|| {
                    format!(
                        "its JWK \"alg\" \"{}\" is not a JWE key-wrap algorithm ocicrypt supports (RSA-OAEP, RSA-OAEP-256, ECDH-ES+A128KW, ECDH-ES+A192KW, ECDH-ES+A256KW)",
                        crate::redact::token(name)
                    )
                })?;
                if !alg.fits(key.kind()) {
                    return Err(format!(
                        "its JWK \"alg\" {name} cannot be used with a {} key",
                        key.describe()
                    ));
                }
                Ok(alg)
            }
            None => Ok(match key.kind() {
                KeyKind::Rsa { .. } => KeyAlg::RsaOaep,
                KeyKind::Ec(_) => KeyAlg::EcdhEsA256Kw,
            }),
        }
    }

    fn kw_len(self) -> usize {
        match self {
            KeyAlg::EcdhEsA128Kw => 16,
            KeyAlg::EcdhEsA192Kw => 24,
            _ => 32,
        }
    }
}

impl fmt::Display for KeyAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A JWE content-encryption algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ContentAlg {
    /// AES-128-GCM.
    A128Gcm,
    /// AES-192-GCM.
    A192Gcm,
    /// AES-256-GCM (what ocicrypt writes).
    A256Gcm,
    /// AES-128-CBC + HMAC-SHA-256.
    A128CbcHs256,
    /// AES-192-CBC + HMAC-SHA-384.
    A192CbcHs384,
    /// AES-256-CBC + HMAC-SHA-512.
    A256CbcHs512,
}

impl ContentAlg {
    /// Every algorithm.
    pub const ALL: [ContentAlg; 6] = [
        ContentAlg::A128Gcm,
        ContentAlg::A192Gcm,
        ContentAlg::A256Gcm,
        ContentAlg::A128CbcHs256,
        ContentAlg::A192CbcHs384,
        ContentAlg::A256CbcHs512,
    ];

    /// The JOSE name (`A256GCM`…).
    pub fn name(self) -> &'static str {
        match self {
            ContentAlg::A128Gcm => "A128GCM",
            ContentAlg::A192Gcm => "A192GCM",
            ContentAlg::A256Gcm => "A256GCM",
            ContentAlg::A128CbcHs256 => "A128CBC-HS256",
            ContentAlg::A192CbcHs384 => "A192CBC-HS384",
            ContentAlg::A256CbcHs512 => "A256CBC-HS512",
        }
    }

    /// Parses a JOSE name.
    pub fn from_name(name: &str) -> Option<ContentAlg> {
        ContentAlg::ALL.into_iter().find(|a| a.name() == name)
    }

    /// The content-encryption key length in bytes.
    pub fn key_len(self) -> usize {
        match self {
            ContentAlg::A128Gcm => 16,
            ContentAlg::A192Gcm => 24,
            ContentAlg::A256Gcm | ContentAlg::A128CbcHs256 => 32,
            ContentAlg::A192CbcHs384 => 48,
            ContentAlg::A256CbcHs512 => 64,
        }
    }

    fn iv_len(self) -> usize {
        if self.is_gcm() {
            12
        } else {
            16
        }
    }

    fn tag_len(self) -> usize {
        if self.is_gcm() {
            16
        } else {
            self.key_len() / 2
        }
    }

    fn is_gcm(self) -> bool {
        matches!(
            self,
            ContentAlg::A128Gcm | ContentAlg::A192Gcm | ContentAlg::A256Gcm
        )
    }

    fn gcm_cipher(self) -> Cipher {
        match self {
            ContentAlg::A128Gcm => Cipher::aes_128_gcm(),
            ContentAlg::A192Gcm => Cipher::aes_192_gcm(),
            _ => Cipher::aes_256_gcm(),
        }
    }

    fn cbc_parts(self) -> (Cipher, MessageDigest) {
        match self {
            ContentAlg::A128CbcHs256 => (Cipher::aes_128_cbc(), MessageDigest::sha256()),
            ContentAlg::A192CbcHs384 => (Cipher::aes_192_cbc(), MessageDigest::sha384()),
            _ => (Cipher::aes_256_cbc(), MessageDigest::sha512()),
        }
    }
}

impl fmt::Display for ContentAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

fn b64e(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Base64url, padding optional (go-jose strips `=` before decoding).
fn b64d(s: &str) -> Result<Vec<u8>, base64::DecodeError> {
    base64::engine::GeneralPurpose::new(
        &base64::alphabet::URL_SAFE,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    )
    .decode(s)
}

fn random(len: usize) -> Zeroizing<Vec<u8>> {
    let mut v = Zeroizing::new(vec![0u8; len]);
    openssl::rand::rand_bytes(&mut v).expect("the OpenSSL RNG works");
    v
}

/// The ephemeral public key header, in go-jose's member order.
#[derive(Serialize, Deserialize, Debug, Clone)]
struct Epk {
    kty: String,
    crv: String,
    x: String,
    y: String,
}

/// A header in go-jose's order (it marshals a map, so members are sorted).
#[derive(Serialize, Default)]
struct OutHeader<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    alg: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    enc: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    epk: Option<Epk>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kid: Option<String>,
}

#[derive(Serialize)]
struct OutRecipient<'a> {
    header: OutHeader<'a>,
    encrypted_key: String,
}

/// go-jose's `rawJSONWebEncryption` member order.
#[derive(Serialize)]
struct OutJwe<'a> {
    protected: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    recipients: Option<Vec<OutRecipient<'a>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    encrypted_key: Option<String>,
    iv: String,
    ciphertext: String,
    tag: String,
}

/// Wraps the private options for a set of public keys into one JWE.
pub struct JweWrapper {
    recipients: Vec<(PublicKey, KeyAlg)>,
    enc: ContentAlg,
}

impl fmt::Debug for JweWrapper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JweWrapper")
            .field(
                "recipients",
                &self
                    .recipients
                    .iter()
                    .map(|(k, a)| format!("{} {} ({a})", k.source_name(), k.describe()))
                    .collect::<Vec<_>>(),
            )
            .field("enc", &self.enc)
            .finish()
    }
}

impl JweWrapper {
    /// A wrapper for these recipients (RSA or EC public keys; a JWK's `alg` is honoured).
    ///
    /// # Errors
    /// [`WrapError::NoRecipients`] for an empty list, [`WrapError::BadRecipient`] naming the
    /// key when its JWK `alg` is unsupported or does not fit it.
    pub fn new(recipients: Vec<PublicKey>) -> Result<Self, WrapError> {
        if recipients.is_empty() {
            return Err(WrapError::NoRecipients {
                scheme: SCHEME.into(),
            });
        }
        let recipients = recipients
            .into_iter()
            .map(|k| match KeyAlg::for_recipient(&k) {
                Ok(a) => Ok((k, a)),
                Err(reason) => Err(WrapError::BadRecipient {
                    recipient: k.source_name().to_owned(),
                    reason,
                }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(JweWrapper {
            recipients,
            enc: ContentAlg::A256Gcm,
        })
    }

    /// Uses another content encryption. ocicrypt always writes `A256GCM` (the default); the
    /// others exist to test readers.
    #[must_use]
    pub fn with_content_alg(mut self, enc: ContentAlg) -> Self {
        self.enc = enc;
        self
    }

    /// The recipients and the algorithm each gets.
    pub fn recipients(&self) -> impl Iterator<Item = (&PublicKey, KeyAlg)> {
        self.recipients.iter().map(|(k, a)| (k, *a))
    }

    fn wrap_for(
        &self,
        key: &PublicKey,
        alg: KeyAlg,
        cek: &[u8],
    ) -> Result<(Option<Epk>, Vec<u8>), WrapError> {
        let fail = |e: openssl::error::ErrorStack| WrapError::BadRecipient {
            recipient: key.source_name().to_owned(),
            reason: format!("{alg} key wrapping failed: {e}"),
        };
        match (alg, key.kind()) {
            (KeyAlg::RsaOaep | KeyAlg::RsaOaep256, KeyKind::Rsa { .. }) => {
                Ok((None, rsa_oaep_encrypt(key.pkey(), alg, cek).map_err(fail)?))
            }
            (_, KeyKind::Ec(curve)) if !alg.is_rsa() => {
                let (epk, ek) = ecdh_wrap(key.pkey(), curve, alg, cek).map_err(fail)?;
                Ok((Some(epk), ek))
            }
            _ => Err(WrapError::BadRecipient {
                recipient: key.source_name().to_owned(),
                reason: format!("{alg} cannot be used with a {} key", key.describe()),
            }),
        }
    }
}

impl KeyWrapper for JweWrapper {
    fn scheme(&self) -> &str {
        SCHEME
    }

    fn wrap_keys(&self, optsdata: &[u8]) -> Result<Vec<u8>, WrapError> {
        let enc = self.enc;
        let cek = random(enc.key_len());
        let mut wrapped = Vec::with_capacity(self.recipients.len());
        for (key, alg) in &self.recipients {
            let (epk, ek) = self.wrap_for(key, *alg, &cek)?;
            wrapped.push((key, *alg, epk, ek));
        }
        let single = wrapped.len() == 1;
        let protected = if single {
            let (key, alg, epk, _) = &wrapped[0];
            OutHeader {
                alg: Some(alg.name()),
                enc: Some(enc.name()),
                epk: epk.clone(),
                kid: Some(key.thumbprint()),
            }
        } else {
            OutHeader {
                enc: Some(enc.name()),
                ..OutHeader::default()
            }
        };
        let protected = b64e(&serde_json::to_vec(&protected).expect("headers serialize"));
        let iv = random(enc.iv_len());
        let (ciphertext, tag) =
            content_encrypt(enc, &cek, &iv, protected.as_bytes(), optsdata).map_err(|e| {
                WrapError::Backend {
                    context: format!("JWE content encryption ({enc}) failed"),
                    source: Box::new(e),
                }
            })?;
        let (recipients, encrypted_key) = if single {
            (None, Some(b64e(&wrapped[0].3)))
        } else {
            let r = wrapped
                .into_iter()
                .map(|(key, alg, epk, ek)| OutRecipient {
                    header: OutHeader {
                        alg: Some(alg.name()),
                        enc: None,
                        epk,
                        kid: Some(key.thumbprint()),
                    },
                    encrypted_key: b64e(&ek),
                })
                .collect();
            (Some(r), None)
        };
        let out = OutJwe {
            protected,
            recipients,
            encrypted_key,
            iv: b64e(&iv),
            ciphertext: b64e(&ciphertext),
            tag: b64e(&tag),
        };
        Ok(serde_json::to_vec(&out).expect("JWE serializes"))
    }

    fn recipient_ids(&self) -> Vec<String> {
        self.recipients.iter().map(|(k, _)| k.thumbprint()).collect()
    }

    fn subset(&self, ids: &[String]) -> Option<std::sync::Arc<dyn crate::AsyncKeyWrapper>> {
        let recipients: Vec<(PublicKey, KeyAlg)> = self
            .recipients
            .iter()
            .filter(|(k, _)| ids.contains(&k.thumbprint()))
            .cloned()
            .collect();
        (!recipients.is_empty()).then(|| {
            std::sync::Arc::new(JweWrapper {
                recipients,
                enc: self.enc,
            }) as std::sync::Arc<dyn crate::AsyncKeyWrapper>
        })
    }
}

/// Unwraps JWE blobs with a set of private keys.
pub struct JweUnwrapper {
    keys: Vec<PrivateKey>,
    /// Recipients that may still be tried over all calls ([`JweUnwrapper::with_recipient_budget`]).
    budget: Option<std::sync::atomic::AtomicUsize>,
}

impl fmt::Debug for JweUnwrapper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JweUnwrapper")
            .field(
                "keys",
                &self
                    .keys
                    .iter()
                    .map(|k| format!("{} {}", k.source_name(), k.describe()))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl JweUnwrapper {
    /// An unwrapper trying these keys.
    pub fn new(keys: Vec<PrivateKey>) -> Self {
        JweUnwrapper { keys, budget: None }
    }

    /// Bounds the recipients tried over all the blobs this unwrapper is given (all the comma
    /// entries of one layer, for the containerd decoder), so that the private-key operations
    /// one layer can cost are bounded by `recipients` × keys. A blob whose recipients do not
    /// fit into what is left fails without any key being tried.
    #[must_use]
    pub fn with_recipient_budget(mut self, recipients: usize) -> Self {
        self.budget = Some(std::sync::atomic::AtomicUsize::new(recipients));
        self
    }

    /// Takes `n` recipients from the budget.
    fn spend(&self, n: usize) -> Result<(), UnwrapError> {
        use std::sync::atomic::Ordering;
        let Some(budget) = &self.budget else {
            return Ok(());
        };
        budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| left.checked_sub(n))
            .map(drop)
            .map_err(|left| {
                malformed(format!(
                    "the layer's JWE entries name more recipients than the limit allows ({n} more, {left} left); refusing to try them"
                ))
            })
    }

    /// The keys it tries.
    pub fn keys(&self) -> &[PrivateKey] {
        &self.keys
    }
}

impl KeyUnwrapper for JweUnwrapper {
    fn scheme(&self) -> &str {
        SCHEME
    }

    fn unwrap_key(&self, blob: &[u8]) -> Result<Zeroizing<Vec<u8>>, UnwrapError> {
        let jwe = ParsedJwe::parse(blob)?;
        self.spend(jwe.recipients.len())?;
        let mut unsupported = Vec::new();
        let mut usable = 0;
        for r in &jwe.recipients {
            let alg = match &r.alg {
                Ok(a) => *a,
                Err(name) => {
                    unsupported.push(name.clone());
                    continue;
                }
            };
            usable += 1;
            for key in &self.keys {
                if !alg.fits(key.kind()) {
                    continue;
                }
                let Some(cek) = unwrap_cek(key, alg, r, jwe.enc) else {
                    continue;
                };
                if let Ok(pt) = content_decrypt(
                    jwe.enc,
                    &cek,
                    &jwe.iv,
                    jwe.aad.as_bytes(),
                    &jwe.ciphertext,
                    &jwe.tag,
                ) {
                    return Ok(pt);
                }
            }
        }
        if usable == 0 {
            return Err(malformed(format!(
                "no recipient uses a supported key algorithm (found {}; supported: RSA-OAEP, RSA-OAEP-256, ECDH-ES+A128KW, ECDH-ES+A192KW, ECDH-ES+A256KW)",
                unsupported.join(", ")
            )));
        }
        Err(UnwrapError::NoMatchingKey {
            scheme: SCHEME.into(),
        })
    }
}

/// What a JWE says about one recipient (no decryption needed): for `inspect` output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JweRecipientInfo {
    /// Key-management algorithm as written.
    pub alg: String,
    /// Content encryption.
    pub enc: String,
    /// `kid`, if any.
    pub kid: Option<String>,
    /// The ephemeral key's curve for ECDH-ES.
    pub epk_curve: Option<String>,
}

/// Lists the recipients of a JWE blob.
///
/// # Errors
/// [`UnwrapError::Malformed`].
pub fn inspect(blob: &[u8]) -> Result<Vec<JweRecipientInfo>, UnwrapError> {
    let jwe = ParsedJwe::parse(blob)?;
    Ok(jwe
        .recipients
        .iter()
        .map(|r| JweRecipientInfo {
            alg: match &r.alg {
                Ok(a) => a.name().to_owned(),
                Err(n) => n.clone(),
            },
            enc: jwe.enc.name().to_owned(),
            kid: r.kid.clone(),
            epk_curve: r.epk.as_ref().map(|e| e.crv.clone()),
        })
        .collect())
}

fn malformed(reason: impl Into<String>) -> UnwrapError {
    UnwrapError::Malformed {
        scheme: SCHEME.into(),
        reason: reason.into(),
    }
}

#[derive(Deserialize)]
struct InRecipient {
    header: Option<Map<String, Value>>,
    encrypted_key: Option<String>,
}

#[derive(Deserialize)]
struct InJwe {
    protected: Option<String>,
    unprotected: Option<Map<String, Value>>,
    header: Option<Map<String, Value>>,
    encrypted_key: Option<String>,
    recipients: Option<Vec<InRecipient>>,
    aad: Option<String>,
    iv: Option<String>,
    ciphertext: Option<String>,
    tag: Option<String>,
}

/// A recipient's header and `encrypted_key`, as found in the JSON.
type RecipientRef<'a> = (Option<&'a Map<String, Value>>, Option<&'a str>);

struct ParsedRecipient {
    /// The algorithm, or the unsupported name found.
    alg: Result<KeyAlg, String>,
    kid: Option<String>,
    epk: Option<Epk>,
    apu: Vec<u8>,
    apv: Vec<u8>,
    encrypted_key: Vec<u8>,
}

struct ParsedJwe {
    enc: ContentAlg,
    /// The additional authenticated data: the protected header as written, plus `.aad`.
    aad: String,
    iv: Vec<u8>,
    ciphertext: Vec<u8>,
    tag: Vec<u8>,
    recipients: Vec<ParsedRecipient>,
}

fn field(name: &str, v: Option<&str>) -> Result<Vec<u8>, UnwrapError> {
    let s = v.ok_or_else(|| malformed(format!("no \"{name}\" member")))?;
    b64d(s).map_err(|e| malformed(format!("\"{name}\" is not base64url ({e})")))
}

impl ParsedJwe {
    fn parse(blob: &[u8]) -> Result<ParsedJwe, UnwrapError> {
        if blob.len() > MAX_JWE_LEN {
            return Err(malformed(format!(
                "a JWE of {} bytes is above the limit of {MAX_JWE_LEN}",
                blob.len()
            )));
        }
        let raw: InJwe = if blob.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
            serde_json::from_slice(blob).map_err(|e| malformed(format!("not JWE JSON ({e})")))?
        } else {
            compact_to_json(blob)?
        };
        let protected_b64 = raw.protected.clone().unwrap_or_default();
        if protected_b64.len() > MAX_HEADER_LEN / 3 * 4 + 4 {
            return Err(malformed(format!(
                "a protected header of {} base64 characters is above the limit of {MAX_HEADER_LEN} bytes",
                protected_b64.len()
            )));
        }
        let protected: Map<String, Value> = if protected_b64.is_empty() {
            Map::new()
        } else {
            let bytes = b64d(&protected_b64)
                .map_err(|e| malformed(format!("protected header is not base64url ({e})")))?;
            serde_json::from_slice(&bytes)
                .map_err(|e| malformed(format!("protected header is not a JSON object ({e})")))?
        };
        let mut aad = protected_b64;
        if let Some(a) = &raw.aad {
            aad.push('.');
            aad.push_str(a);
        }
        // go-jose writes a redundant top-level `encrypted_key` next to `recipients`: ignored.
        let recipients: Vec<RecipientRef<'_>> = match &raw.recipients {
            Some(rs) if rs.is_empty() => return Err(malformed("empty \"recipients\"")),
            Some(rs) if rs.len() > MAX_RECIPIENTS => {
                return Err(malformed(format!(
                    "{} recipients, above the limit of {MAX_RECIPIENTS} per JWE",
                    rs.len()
                )))
            }
            Some(rs) => rs
                .iter()
                .map(|r| (r.header.as_ref(), r.encrypted_key.as_deref()))
                .collect(),
            None => vec![(raw.header.as_ref(), raw.encrypted_key.as_deref())],
        };
        let mut enc = None;
        let mut parsed = Vec::with_capacity(recipients.len());
        for (header, ek) in recipients {
            // go-jose merges protected, then unprotected, then per-recipient; first one wins.
            // Looked up in place rather than merged into a copy: a copy per recipient made
            // the work grow with recipients × header members.
            let merged = Merged([Some(&protected), raw.unprotected.as_ref(), header]);
            if merged.contains_key("crit") {
                return Err(malformed(
                    "critical header parameters (\"crit\") are not supported",
                ));
            }
            if merged.contains_key("zip") {
                return Err(malformed("compressed payloads (\"zip\") are not supported"));
            }
            let e = match merged.get("enc") {
                Some(Value::String(s)) => ContentAlg::from_name(s)
                    .ok_or_else(|| malformed(format!("unsupported content encryption {s:?}")))?,
                _ => return Err(malformed("no \"enc\" header")),
            };
            if enc.is_some_and(|prev| prev != e) {
                return Err(malformed("recipients disagree on \"enc\""));
            }
            enc = Some(e);
            let alg = match merged.get("alg") {
                Some(Value::String(s)) => KeyAlg::from_name(s).ok_or_else(|| s.clone()),
                _ => return Err(malformed("a recipient has no \"alg\" header")),
            };
            let epk = match (&alg, merged.get("epk")) {
                (Ok(a), Some(v)) if !a.is_rsa() => {
                    // Checked before it is copied: it may be shared by every recipient.
                    let small = v.as_object().is_some_and(|m| {
                        m.len() <= 8 && m.values().all(|x| x.as_str().is_some_and(|s| s.len() <= 256))
                    });
                    if !small {
                        return Err(malformed("bad \"epk\" header (not a small object of strings)"));
                    }
                    Some(Epk::deserialize(v).map_err(|e| malformed(format!("bad \"epk\" header ({e})")))?)
                }
                (Ok(a), None) if !a.is_rsa() => {
                    return Err(malformed(format!("{a} recipient without \"epk\"")))
                }
                _ => None,
            };
            let party = |name: &str| -> Result<Vec<u8>, UnwrapError> {
                match merged.get(name) {
                    Some(Value::String(s)) => {
                        b64d(s).map_err(|e| malformed(format!("\"{name}\" is not base64url ({e})")))
                    }
                    Some(_) => Err(malformed(format!("\"{name}\" is not a string"))),
                    None => Ok(Vec::new()),
                }
            };
            let encrypted_key = field("encrypted_key", ek)?;
            parsed.push(ParsedRecipient {
                kid: merged.get("kid").and_then(Value::as_str).map(str::to_owned),
                apu: party("apu")?,
                apv: party("apv")?,
                alg,
                epk,
                encrypted_key,
            });
        }
        let enc = enc.ok_or_else(|| malformed("no recipients"))?;
        let iv = field("iv", raw.iv.as_deref())?;
        let ciphertext = field("ciphertext", raw.ciphertext.as_deref())?;
        let tag = field("tag", raw.tag.as_deref())?;
        if iv.len() != enc.iv_len() {
            return Err(malformed(format!(
                "{enc} needs a {}-byte iv, got {}",
                enc.iv_len(),
                iv.len()
            )));
        }
        if tag.len() != enc.tag_len() {
            return Err(malformed(format!(
                "{enc} needs a {}-byte tag, got {}",
                enc.tag_len(),
                tag.len()
            )));
        }
        Ok(ParsedJwe {
            enc,
            aad,
            iv,
            ciphertext,
            tag,
            recipients: parsed,
        })
    }
}

/// A recipient's view of the headers: protected, unprotected, per-recipient, first one wins.
struct Merged<'a>([Option<&'a Map<String, Value>>; 3]);

impl<'a> Merged<'a> {
    fn get(&self, name: &str) -> Option<&'a Value> {
        self.0.iter().flatten().find_map(|m| m.get(name))
    }

    fn contains_key(&self, name: &str) -> bool {
        self.get(name).is_some()
    }
}

/// Compact serialization `protected.encrypted_key.iv.ciphertext.tag` as flattened JSON.
fn compact_to_json(blob: &[u8]) -> Result<InJwe, UnwrapError> {
    let s = std::str::from_utf8(blob).map_err(|_| malformed("neither JWE JSON nor compact serialization"))?;
    let parts: Vec<&str> = s.trim().split('.').collect();
    if parts.len() != 5 {
        return Err(malformed(
            "neither JWE JSON nor compact serialization (5 dot-separated parts)",
        ));
    }
    let some = |p: &str| (!p.is_empty()).then(|| p.to_owned());
    Ok(InJwe {
        protected: some(parts[0]),
        unprotected: None,
        header: None,
        encrypted_key: some(parts[1]),
        recipients: None,
        aad: None,
        iv: some(parts[2]),
        ciphertext: Some(parts[3].to_owned()),
        tag: some(parts[4]),
    })
}

fn oaep_md(alg: KeyAlg) -> &'static openssl::md::MdRef {
    if alg == KeyAlg::RsaOaep256 {
        Md::sha256()
    } else {
        Md::sha1()
    }
}

fn rsa_oaep_encrypt(
    key: &PKeyRef<Public>,
    alg: KeyAlg,
    cek: &[u8],
) -> Result<Vec<u8>, openssl::error::ErrorStack> {
    let mut ctx = PkeyCtx::new(key)?;
    ctx.encrypt_init()?;
    ctx.set_rsa_padding(Padding::PKCS1_OAEP)?;
    ctx.set_rsa_oaep_md(oaep_md(alg))?;
    ctx.set_rsa_mgf1_md(oaep_md(alg))?;
    let mut out = Vec::new();
    ctx.encrypt_to_vec(cek, &mut out)?;
    Ok(out)
}

fn rsa_oaep_decrypt(
    key: &PKeyRef<Private>,
    alg: KeyAlg,
    ek: &[u8],
) -> Result<Zeroizing<Vec<u8>>, openssl::error::ErrorStack> {
    let mut ctx = PkeyCtx::new(key)?;
    ctx.decrypt_init()?;
    ctx.set_rsa_padding(Padding::PKCS1_OAEP)?;
    ctx.set_rsa_oaep_md(oaep_md(alg))?;
    ctx.set_rsa_mgf1_md(oaep_md(alg))?;
    let mut out = Zeroizing::new(Vec::new());
    ctx.decrypt_to_vec(ek, &mut out)?;
    Ok(out)
}

/// Concat KDF (NIST SP 800-56A, RFC 7518 §4.6.2) with SHA-256.
fn concat_kdf(z: &[u8], alg_id: &str, apu: &[u8], apv: &[u8], len: usize) -> Zeroizing<Vec<u8>> {
    let mut other = Vec::new();
    for part in [alg_id.as_bytes(), apu, apv] {
        other.extend_from_slice(&u32::try_from(part.len()).expect("short").to_be_bytes());
        other.extend_from_slice(part);
    }
    other.extend_from_slice(&u32::try_from(len * 8).expect("short").to_be_bytes());
    let mut out = Zeroizing::new(Vec::with_capacity(len + 32));
    let mut counter: u32 = 1;
    while out.len() < len {
        let mut h = openssl::sha::Sha256::new();
        h.update(&counter.to_be_bytes());
        h.update(z);
        h.update(&other);
        out.extend_from_slice(&Zeroizing::new(h.finish())[..]);
        counter += 1;
    }
    out.truncate(len);
    out
}

fn aes_kw_wrap(kek: &[u8], cek: &[u8]) -> Result<Vec<u8>, openssl::error::ErrorStack> {
    let key = openssl::aes::AesKey::new_encrypt(kek).map_err(|_| openssl::error::ErrorStack::get())?;
    let mut out = vec![0u8; cek.len() + 8];
    openssl::aes::wrap_key(&key, None, &mut out, cek).map_err(|_| openssl::error::ErrorStack::get())?;
    Ok(out)
}

fn aes_kw_unwrap(kek: &[u8], wrapped: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    if wrapped.len() < 24 || wrapped.len() % 8 != 0 {
        return None;
    }
    let key = openssl::aes::AesKey::new_decrypt(kek).ok()?;
    let mut out = Zeroizing::new(vec![0u8; wrapped.len() - 8]);
    openssl::aes::unwrap_key(&key, None, &mut out, wrapped).ok()?;
    Some(out)
}

fn ecdh(
    private: &PKeyRef<Private>,
    peer: &PKeyRef<Public>,
) -> Result<Zeroizing<Vec<u8>>, openssl::error::ErrorStack> {
    let mut d = Deriver::new(private)?;
    d.set_peer(peer)?;
    Ok(Zeroizing::new(d.derive_to_vec()?))
}

fn ecdh_wrap(
    recipient: &PKeyRef<Public>,
    curve: Curve,
    alg: KeyAlg,
    cek: &[u8],
) -> Result<(Epk, Vec<u8>), openssl::error::ErrorStack> {
    let group = EcGroup::from_curve_name(curve.nid())?;
    let eph = EcKey::generate(&group)?;
    let (x, y) = crate::keys::parse_ec_coordinates(&eph, curve)?;
    let eph = PKey::from_ec_key(eph)?;
    let z = ecdh(&eph, recipient)?;
    let kek = concat_kdf(&z, alg.name(), &[], &[], alg.kw_len());
    let ek = aes_kw_wrap(&kek, cek)?;
    Ok((
        Epk {
            kty: "EC".into(),
            crv: curve.name().into(),
            x: b64e(&x),
            y: b64e(&y),
        },
        ek,
    ))
}

/// The recipient's content-encryption key, or `None` when this key cannot open it.
fn unwrap_cek(
    key: &PrivateKey,
    alg: KeyAlg,
    r: &ParsedRecipient,
    enc: ContentAlg,
) -> Option<Zeroizing<Vec<u8>>> {
    let cek = if alg.is_rsa() {
        // On failure carry on with a random key so a padding error and a wrong tag take the
        // same path (RFC 7516 §11.5).
        rsa_oaep_decrypt(key.pkey(), alg, &r.encrypted_key).unwrap_or_else(|_| random(enc.key_len()))
    } else {
        let KeyKind::Ec(curve) = key.kind() else {
            return None;
        };
        let epk = r.epk.as_ref()?;
        if epk.kty != "EC" || Curve::from_name(&epk.crv) != Some(curve) {
            return None;
        }
        let peer = epk_public(epk, curve)?;
        let z = ecdh(key.pkey(), &peer).ok()?;
        let kek = concat_kdf(&z, alg.name(), &r.apu, &r.apv, alg.kw_len());
        aes_kw_unwrap(&kek, &r.encrypted_key)?
    };
    (cek.len() == enc.key_len()).then_some(cek)
}

/// The ephemeral public key; OpenSSL checks the point is on the curve.
fn epk_public(epk: &Epk, curve: Curve) -> Option<PKey<Public>> {
    let group = EcGroup::from_curve_name(curve.nid()).ok()?;
    let x = openssl::bn::BigNum::from_slice(&b64d(&epk.x).ok()?).ok()?;
    let y = openssl::bn::BigNum::from_slice(&b64d(&epk.y).ok()?).ok()?;
    let k = EcKey::from_public_key_affine_coordinates(&group, &x, &y).ok()?;
    PKey::from_ec_key(k).ok()
}

fn cbc_mac(
    enc: ContentAlg,
    mac_key: &[u8],
    aad: &[u8],
    iv: &[u8],
    ct: &[u8],
) -> Result<Vec<u8>, openssl::error::ErrorStack> {
    let (_, md) = enc.cbc_parts();
    let pkey = PKey::hmac(mac_key)?;
    let mut s = openssl::sign::Signer::new(md, &pkey)?;
    s.update(aad)?;
    s.update(iv)?;
    s.update(ct)?;
    s.update(&(aad.len() as u64 * 8).to_be_bytes())?;
    let mut t = s.sign_to_vec()?;
    t.truncate(enc.tag_len());
    Ok(t)
}

fn content_encrypt(
    enc: ContentAlg,
    cek: &[u8],
    iv: &[u8],
    aad: &[u8],
    pt: &[u8],
) -> Result<(Vec<u8>, Vec<u8>), openssl::error::ErrorStack> {
    if enc.is_gcm() {
        let mut tag = vec![0u8; 16];
        let ct = openssl::symm::encrypt_aead(enc.gcm_cipher(), cek, Some(iv), aad, pt, &mut tag)?;
        Ok((ct, tag))
    } else {
        let half = enc.key_len() / 2;
        let (mac_key, enc_key) = cek.split_at(half);
        let ct = openssl::symm::encrypt(enc.cbc_parts().0, enc_key, Some(iv), pt)?;
        let tag = cbc_mac(enc, mac_key, aad, iv, &ct)?;
        Ok((ct, tag))
    }
}

fn content_decrypt(
    enc: ContentAlg,
    cek: &[u8],
    iv: &[u8],
    aad: &[u8],
    ct: &[u8],
    tag: &[u8],
) -> Result<Zeroizing<Vec<u8>>, openssl::error::ErrorStack> {
    if enc.is_gcm() {
        Ok(Zeroizing::new(openssl::symm::decrypt_aead(
            enc.gcm_cipher(),
            cek,
            Some(iv),
            aad,
            ct,
            tag,
        )?))
    } else {
        let half = enc.key_len() / 2;
        let (mac_key, enc_key) = cek.split_at(half);
        let expected = cbc_mac(enc, mac_key, aad, iv, ct)?;
        if expected.len() != tag.len() || !openssl::memcmp::eq(&expected, tag) {
            return Err(openssl::error::ErrorStack::get());
        }
        Ok(Zeroizing::new(openssl::symm::decrypt(
            enc.cbc_parts().0,
            enc_key,
            Some(iv),
            ct,
        )?))
    }
}

#[cfg(test)]
mod tests;

//! The OpenPGP key-wrap scheme (`org.opencontainers.image.enc.keys.pgp`), compatible with Go
//! ocicrypt (`keywrap/pgp`, x/crypto/openpgp and ProtonMail go-crypto).
//!
//! A blob is a binary OpenPGP message: one PKESK (v3) per recipient key, then a SEIPD (v1,
//! with MDC) packet encrypted with AES-256 holding a literal data packet with the private
//! options JSON. No compression, no signature. The OpenPGP implementation is rPGP (the `pgp`
//! crate, MIT or Apache-2.0, pure Rust).
//!
//! Recipients are OpenPGP public keys (transferable public keys, armored or binary); each one
//! is encrypted to its first subkey flagged for encryption (else its primary key, if that can
//! encrypt). [`gpg_export`] runs `gpg --batch --export` the way Go does to find `pgp:NAME`
//! recipients in the user's keyring; [`select_recipients`] matches a name or an e-mail.
//!
//! Decryption keys are secret keys, binary (what Go reads) **or armored** (which Go silently
//! ignores), with an optional password for protected keys.
//!
//! RSA decryption inside rPGP uses the RustCrypto `rsa` crate, which is not constant time
//! (RUSTSEC-2023-0071); see `docs/security.md`.

use std::fmt;
use std::io::Read;
use std::path::Path;

use pgp::composed::{Deserializable, Message, MessageBuilder, SignedPublicKey, SignedSecretKey, TheRing};
use pgp::crypto::sym::SymmetricKeyAlgorithm;
use pgp::types::{KeyDetails, Password, PublicKeyTrait};
use zeroize::Zeroizing;

use crate::keys::KeyError;
use crate::keywrap::{KeyUnwrapper, KeyWrapper, UnwrapError, WrapError};

/// The annotation scheme name.
pub const SCHEME: &str = "pgp";

/// The options JSON is a few hundred bytes: a decrypted message larger than this is refused.
const MAX_PLAINTEXT: u64 = 1 << 20;
/// Keys read from one keyring at most (bounds work on hostile files).
const MAX_KEYS: usize = 1024;

fn key_error(source_name: &str, what: &str, e: impl fmt::Display) -> KeyError {
    KeyError::Malformed {
        source_name: source_name.to_owned(),
        what: what.to_owned(),
        reason: crate::redact::token(&e.to_string()).into_owned(),
    }
}

/// An OpenPGP public key (certificate) that can be a recipient.
#[derive(Clone)]
pub struct PgpPublicKey {
    key: SignedPublicKey,
    source_name: String,
}

impl fmt::Debug for PgpPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgpPublicKey")
            .field("key_id", &self.key_id())
            .field("source_name", &self.source_name)
            .finish()
    }
}

impl PgpPublicKey {
    /// Every public key in an armored or binary keyring.
    ///
    /// # Errors
    /// [`KeyError::Malformed`] when the data does not parse, [`KeyError::Unsupported`] when it
    /// holds no public key.
    pub fn from_bytes_many(bytes: &[u8], source_name: &str) -> Result<Vec<PgpPublicKey>, KeyError> {
        let (iter, _) = SignedPublicKey::from_reader_many(bytes)
            .map_err(|e| key_error(source_name, "OpenPGP public key", e))?;
        let mut out = Vec::new();
        for k in iter.take(MAX_KEYS) {
            let key = k.map_err(|e| key_error(source_name, "OpenPGP public key", e))?;
            out.push(PgpPublicKey {
                key,
                source_name: source_name.to_owned(),
            });
        }
        if out.is_empty() {
            return Err(KeyError::Unsupported {
                source_name: source_name.to_owned(),
                found: "no OpenPGP public key".into(),
            });
        }
        Ok(out)
    }

    /// Reads a public key file (armored or binary; every key in it).
    ///
    /// # Errors
    /// As [`PgpPublicKey::from_bytes_many`], or [`KeyError::Io`].
    pub fn from_file(path: &Path) -> Result<Vec<PgpPublicKey>, KeyError> {
        let bytes = crate::keys::read_key_file(path)?;
        PgpPublicKey::from_bytes_many(&bytes, &path.display().to_string())
    }

    /// The primary key id, 16 hex digits.
    pub fn key_id(&self) -> String {
        hex::encode(self.key.primary_key.key_id())
    }

    /// The id of the (sub)key a message is encrypted to for this recipient (16 hex digits): what
    /// its PKESK packet names, so the recipient id `inspect` shows. `None` when no key of it
    /// can encrypt.
    pub fn encryption_key_id(&self) -> Option<String> {
        match encryption_key(&self.key)? {
            EncKey::Sub(s) => Some(hex::encode(s.key.key_id())),
            EncKey::Primary(p) => Some(hex::encode(p.primary_key.key_id())),
        }
    }

    /// The user ids, as text.
    pub fn user_ids(&self) -> Vec<String> {
        self.key
            .details
            .users
            .iter()
            .map(|u| String::from_utf8_lossy(u.id.id()).into_owned())
            .collect()
    }

    /// Where it came from.
    pub fn source_name(&self) -> &str {
        &self.source_name
    }

    /// Whether a user id has this name or e-mail address (as Go matches `pgp:NAME-OR-EMAIL`),
    /// or is exactly `who`. E-mails compare case-insensitively.
    pub fn matches(&self, who: &str) -> bool {
        self.user_ids().iter().any(|uid| {
            let (name, email) = split_uid(uid);
            uid == who || name == who || email.is_some_and(|e| e.eq_ignore_ascii_case(who))
        })
    }
}

/// `Name (comment) <email>` → (`Name`, `email`).
fn split_uid(uid: &str) -> (&str, Option<&str>) {
    let email = uid
        .rfind('<')
        .and_then(|s| uid[s + 1..].find('>').map(|e| &uid[s + 1..s + 1 + e]));
    let mut name = uid.split('<').next().unwrap_or("").trim();
    if let Some(p) = name.find(" (") {
        name = name[..p].trim();
    }
    (name, email)
}

/// Why a recipient lookup failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LookupError {
    /// The gpg binary could not be run or failed.
    #[error(
        "cannot list the gpg public keyring ({0}); install gnupg, or give the public key as a file: pgp:FILE"
    )]
    Gpg(String),
    /// No key has that name or e-mail.
    #[error("no OpenPGP key in the gpg keyring has the name or e-mail {0} (gpg --list-keys shows them; a key file works too: pgp:FILE)")]
    NotFound(String),
    /// The exported keyring does not parse.
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// The public keyring of the user's gpg (`GNUPGHOME` or `~/.gnupg`), as Go ocicrypt gets it:
/// `gpg --batch --export` (gpg2 if there is one). At most 16 MiB, 60 seconds.
///
/// # Errors
/// [`LookupError::Gpg`].
pub fn gpg_export() -> Result<Vec<u8>, LookupError> {
    let bin = ["gpg2", "gpg"]
        .into_iter()
        .find(|b| {
            std::process::Command::new(b)
                .arg("--version")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .ok_or_else(|| LookupError::Gpg("no gpg or gpg2 on PATH".into()))?;
    let mut child = std::process::Command::new(bin)
        .args(["--batch", "--export"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| LookupError::Gpg(format!("{bin}: {e}")))?;
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.take(16 << 20).read_to_end(&mut v);
        v
    });
    let err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.take(64 << 10).read_to_end(&mut v);
        v
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| LookupError::Gpg(e.to_string()))? {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(LookupError::Gpg(format!(
                "{bin} --export did not finish within 60 s"
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let out = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    if !status.success() {
        return Err(LookupError::Gpg(format!(
            "{bin} --export failed: {}",
            crate::redact::token(String::from_utf8_lossy(&err).trim())
        )));
    }
    Ok(out)
}

/// The keys of `keyring` (the output of [`gpg_export`]) that match each of `who`, in order.
///
/// # Errors
/// [`LookupError::NotFound`] for the first name without a key, [`LookupError::Key`].
pub fn select_recipients(keyring: &[u8], who: &[&str]) -> Result<Vec<PgpPublicKey>, LookupError> {
    if keyring.is_empty() {
        return Err(LookupError::NotFound(
            crate::redact::token(who.first().copied().unwrap_or("")).into_owned(),
        ));
    }
    let keys = PgpPublicKey::from_bytes_many(keyring, "the gpg public keyring")?;
    let mut out = Vec::new();
    for w in who {
        let found: Vec<&PgpPublicKey> = keys.iter().filter(|k| k.matches(w)).collect();
        if found.is_empty() {
            return Err(LookupError::NotFound(crate::redact::token(w).into_owned()));
        }
        for k in found {
            let mut k = k.clone();
            k.source_name = format!("pgp:{w} (0x{})", k.key_id());
            out.push(k);
        }
    }
    Ok(out)
}

/// Wraps for a set of OpenPGP public keys.
#[derive(Debug, Clone)]
pub struct PgpWrapper {
    recipients: Vec<PgpPublicKey>,
}

impl PgpWrapper {
    /// A wrapper for these keys; each must have a key that can encrypt.
    ///
    /// # Errors
    /// [`WrapError::NoRecipients`], [`WrapError::BadRecipient`] for a key without an
    /// encryption-capable (sub)key.
    pub fn new(recipients: Vec<PgpPublicKey>) -> Result<Self, WrapError> {
        if recipients.is_empty() {
            return Err(WrapError::NoRecipients {
                scheme: SCHEME.into(),
            });
        }
        for r in &recipients {
            if encryption_key(&r.key).is_none() {
                return Err(WrapError::BadRecipient {
                    recipient: r.source_name.clone(),
                    reason: format!("OpenPGP key 0x{} has no key that can encrypt", r.key_id()),
                });
            }
        }
        Ok(PgpWrapper { recipients })
    }

    /// The recipients.
    pub fn recipients(&self) -> &[PgpPublicKey] {
        &self.recipients
    }
}

enum EncKey<'a> {
    Sub(&'a pgp::composed::SignedPublicSubKey),
    Primary(&'a SignedPublicKey),
}

/// The first subkey whose binding signature flags it for encryption, else one that can
/// encrypt by algorithm, else the primary key if it can.
fn encryption_key(k: &SignedPublicKey) -> Option<EncKey<'_>> {
    let flagged = k.public_subkeys.iter().find(|s| {
        s.key.is_encryption_key()
            && s.signatures
                .iter()
                .any(|sig| sig.key_flags().encrypt_comms() || sig.key_flags().encrypt_storage())
    });
    if let Some(s) = flagged {
        return Some(EncKey::Sub(s));
    }
    if let Some(s) = k.public_subkeys.iter().find(|s| s.key.is_encryption_key()) {
        return Some(EncKey::Sub(s));
    }
    k.primary_key.is_encryption_key().then_some(EncKey::Primary(k))
}

impl KeyWrapper for PgpWrapper {
    fn scheme(&self) -> &str {
        SCHEME
    }

    fn recipient_ids(&self) -> Vec<String> {
        self.recipients
            .iter()
            .filter_map(PgpPublicKey::encryption_key_id)
            .collect()
    }

    fn subset(&self, ids: &[String]) -> Option<std::sync::Arc<dyn crate::AsyncKeyWrapper>> {
        let recipients: Vec<PgpPublicKey> = self
            .recipients
            .iter()
            .filter(|k| k.encryption_key_id().is_some_and(|i| ids.contains(&i)))
            .cloned()
            .collect();
        (!recipients.is_empty()).then(|| {
            std::sync::Arc::new(PgpWrapper { recipients }) as std::sync::Arc<dyn crate::AsyncKeyWrapper>
        })
    }

    fn wrap_keys(&self, optsdata: &[u8]) -> Result<Vec<u8>, WrapError> {
        let mut rng = rand::thread_rng();
        let mut builder = MessageBuilder::from_bytes("", optsdata.to_vec())
            .seipd_v1(&mut rng, SymmetricKeyAlgorithm::AES256);
        for r in &self.recipients {
            let res = match encryption_key(&r.key) {
                Some(EncKey::Sub(s)) => builder.encrypt_to_key(&mut rng, &s.key).map(|_| ()),
                Some(EncKey::Primary(p)) => builder.encrypt_to_key(&mut rng, &p.primary_key).map(|_| ()),
                None => unreachable!("checked in new"),
            };
            res.map_err(|e| WrapError::BadRecipient {
                recipient: r.source_name.clone(),
                reason: format!("OpenPGP encryption failed: {e}"),
            })?;
        }
        builder.to_vec(&mut rng).map_err(|e| WrapError::Backend {
            context: "writing the OpenPGP message".into(),
            source: Box::new(e),
        })
    }
}

/// An OpenPGP secret key with the password to unlock it (if protected).
pub struct PgpSecretKey {
    key: SignedSecretKey,
    password: Password,
    source_name: String,
}

impl fmt::Debug for PgpSecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgpSecretKey")
            .field("key_id", &hex::encode(self.key.primary_key.key_id()))
            .field("source_name", &self.source_name)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl PgpSecretKey {
    /// Every secret key in a binary or armored keyring (`gpg --export-secret-keys`, with or
    /// without `--armor`). `password` unlocks protected keys.
    ///
    /// # Errors
    /// [`KeyError::Malformed`] when it does not parse, [`KeyError::Unsupported`] when it holds
    /// no secret key.
    pub fn from_bytes_many(
        bytes: &[u8],
        password: Option<&[u8]>,
        source_name: &str,
    ) -> Result<Vec<PgpSecretKey>, KeyError> {
        let (iter, _) = SignedSecretKey::from_reader_many(bytes)
            .map_err(|e| key_error(source_name, "OpenPGP secret key", e))?;
        let mut out = Vec::new();
        for k in iter.take(MAX_KEYS) {
            let key = k.map_err(|e| key_error(source_name, "OpenPGP secret key", e))?;
            out.push(PgpSecretKey {
                key,
                password: password.map_or_else(Password::empty, Password::from),
                source_name: source_name.to_owned(),
            });
        }
        if out.is_empty() {
            return Err(KeyError::Unsupported {
                source_name: source_name.to_owned(),
                found: "no OpenPGP secret key".into(),
            });
        }
        Ok(out)
    }

    /// Reads a secret keyring file.
    ///
    /// # Errors
    /// As [`PgpSecretKey::from_bytes_many`], or [`KeyError::Io`].
    pub fn from_file(path: &Path, password: Option<&[u8]>) -> Result<Vec<PgpSecretKey>, KeyError> {
        let bytes = crate::keys::read_key_file(path)?;
        PgpSecretKey::from_bytes_many(&bytes, password, &path.display().to_string())
    }

    /// Where it came from.
    pub fn source_name(&self) -> &str {
        &self.source_name
    }

    /// The primary key id, 16 hex digits.
    pub fn key_id(&self) -> String {
        hex::encode(self.key.primary_key.key_id())
    }

    /// Whether the primary key or a secret subkey is protected by a passphrase (S2K): it can
    /// only be used with its password, which a container runtime never has.
    pub fn is_protected(&self) -> bool {
        self.key.primary_key.secret_params().is_encrypted()
            || self
                .key
                .secret_subkeys
                .iter()
                .any(|s| s.key.secret_params().is_encrypted())
    }

    /// The key as a binary transferable secret key (what `gpg --export-secret-keys` writes
    /// without `--armor`, and the only form Go ocicrypt reads).
    ///
    /// # Errors
    /// [`KeyError::Crypto`] if rPGP cannot serialize it.
    pub fn to_binary(&self) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        use pgp::ser::Serialize as _;
        self.key
            .to_bytes()
            .map(Zeroizing::new)
            .map_err(|e| KeyError::Crypto {
                context: format!("{}: writing the OpenPGP secret key", self.source_name),
                reason: crate::redact::token(&e.to_string()).into_owned(),
            })
    }
}

/// A secret keyring (binary or armored) as one binary keyring, every key in it re-serialized:
/// what a Go runtime reads from a key directory. Armored input is converted; binary input is
/// normalized the same way.
///
/// # Errors
/// As [`PgpSecretKey::from_bytes_many`] and [`PgpSecretKey::to_binary`].
pub fn secret_keyring_binary(bytes: &[u8], source_name: &str) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    let mut out = Zeroizing::new(Vec::new());
    for k in PgpSecretKey::from_bytes_many(bytes, None, source_name)? {
        out.extend_from_slice(&k.to_binary()?);
    }
    Ok(out)
}

/// Whether the bytes look like an OpenPGP key file (binary packet or armor): a cheap test
/// before trying to parse one.
pub fn looks_like_openpgp(bytes: &[u8]) -> bool {
    let armored = bytes
        .windows(b"-----BEGIN PGP ".len())
        .take(4096)
        .any(|w| w == b"-----BEGIN PGP ");
    armored || matches!(crate::keys::openpgp_tag(bytes), Some(5 | 6))
}

/// Unwraps OpenPGP blobs with secret keys.
#[derive(Debug)]
pub struct PgpUnwrapper {
    keys: Vec<PgpSecretKey>,
}

impl PgpUnwrapper {
    /// An unwrapper trying these keys.
    pub fn new(keys: Vec<PgpSecretKey>) -> Self {
        PgpUnwrapper { keys }
    }
}

impl KeyUnwrapper for PgpUnwrapper {
    fn scheme(&self) -> &str {
        SCHEME
    }

    fn unwrap_key(&self, blob: &[u8]) -> Result<Zeroizing<Vec<u8>>, UnwrapError> {
        let ids = pkesk_key_ids(blob).map_err(|reason| UnwrapError::Malformed {
            scheme: SCHEME.into(),
            reason,
        })?;
        if ids.is_empty() {
            return Err(UnwrapError::Malformed {
                scheme: SCHEME.into(),
                reason: "the message has no public-key encrypted session key".into(),
            });
        }
        let msg = Message::from_bytes(blob).map_err(|e| UnwrapError::Malformed {
            scheme: SCHEME.into(),
            reason: crate::redact::token(&e.to_string()).into_owned(),
        })?;
        let ring = TheRing {
            secret_keys: self.keys.iter().map(|k| &k.key).collect(),
            key_passwords: self.keys.iter().map(|k| &k.password).collect(),
            ..Default::default()
        };
        let Ok((mut msg, _)) = msg.decrypt_the_ring(ring, true) else {
            return Err(UnwrapError::NoMatchingKey {
                scheme: SCHEME.into(),
            });
        };
        if msg.is_compressed() {
            msg = msg.decompress().map_err(|e| UnwrapError::Malformed {
                scheme: SCHEME.into(),
                reason: format!("cannot decompress: {}", crate::redact::token(&e.to_string())),
            })?;
        }
        let mut out = Zeroizing::new(Vec::new());
        // Reading to the end checks the MDC.
        (&mut msg)
            .take(MAX_PLAINTEXT + 1)
            .read_to_end(&mut out)
            .map_err(|e| UnwrapError::Malformed {
                scheme: SCHEME.into(),
                reason: format!(
                    "the message does not verify (modification detection failed or damaged data): {}",
                    crate::redact::token(&e.to_string())
                ),
            })?;
        if out.len() as u64 > MAX_PLAINTEXT {
            return Err(UnwrapError::Malformed {
                scheme: SCHEME.into(),
                reason: format!("decrypted data larger than {MAX_PLAINTEXT} bytes"),
            });
        }
        Ok(out)
    }
}

/// The key ids (16 hex digits) of the PKESK packets at the start of an OpenPGP message, as Go's
/// `GetKeyIdsFromPacket` reports them. Parsed by hand (packet headers only, bounded).
///
/// # Errors
/// A reason when the packet framing is broken.
pub fn pkesk_key_ids(blob: &[u8]) -> Result<Vec<String>, String> {
    Ok(pkesk_packets(blob)?
        .into_iter()
        .map(|(_, id)| id.unwrap_or_else(|| "(non-v3 PKESK)".into()))
        .collect())
}

/// A PKESK packet: its byte range in the message and its key id.
type Pkesk = (std::ops::Range<usize>, Option<String>);

/// The PKESK packets at the start of a message: each one's byte range and key id (`None` for
/// a non-v3 packet or the wildcard id `0000000000000000`, which names no key).
fn pkesk_packets(blob: &[u8]) -> Result<Vec<Pkesk>, String> {
    let mut ids = Vec::new();
    let mut rest = blob;
    while !rest.is_empty() && ids.len() < 4096 {
        let start = blob.len() - rest.len();
        let first = rest[0];
        if first & 0x80 == 0 {
            return Err("not an OpenPGP packet".into());
        }
        let (tag, hl, len): (u8, usize, usize) = if first & 0x40 != 0 {
            let tag = first & 0x3f;
            let b1 = usize::from(*rest.get(1).ok_or("truncated packet header")?);
            match b1 {
                0..=191 => (tag, 2, b1),
                192..=223 => {
                    let b2 = usize::from(*rest.get(2).ok_or("truncated packet header")?);
                    (tag, 3, ((b1 - 192) << 8) + b2 + 192)
                }
                255 => {
                    let b = rest.get(2..6).ok_or("truncated packet header")?;
                    (tag, 6, u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
                }
                // A partial body length: only the encrypted data packet uses it; stop there.
                _ => break,
            }
        } else {
            let tag = (first >> 2) & 0x0f;
            match first & 3 {
                0 => (
                    tag,
                    2,
                    usize::from(*rest.get(1).ok_or("truncated packet header")?),
                ),
                1 => {
                    let b = rest.get(1..3).ok_or("truncated packet header")?;
                    (tag, 3, usize::from(u16::from_be_bytes([b[0], b[1]])))
                }
                2 => {
                    let b = rest.get(1..5).ok_or("truncated packet header")?;
                    (tag, 5, u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
                }
                _ => break,
            }
        };
        let body = rest
            .get(hl..hl.checked_add(len).ok_or("length overflow")?)
            .ok_or("truncated packet")?;
        match tag {
            1 => {
                let id = (body.first() == Some(&3) && body.len() >= 10 && body[1..9] != [0u8; 8])
                    .then(|| hex::encode(&body[1..9]));
                ids.push((start..start + hl + len, id));
            }
            3 => {}
            _ => break,
        }
        rest = &rest[hl + len..];
    }
    Ok(ids)
}

/// Recipient ids of OpenPGP blobs (PKESK key ids), for [`crate::recipients`].
#[derive(Debug)]
pub struct PgpIds;

impl crate::recipients::IdScheme for PgpIds {
    fn scheme(&self) -> &'static str {
        SCHEME
    }

    fn ids(&self, blob: &[u8]) -> Result<Vec<Option<String>>, String> {
        Ok(pkesk_packets(blob)?.into_iter().map(|(_, id)| id).collect())
    }

    /// Drops the PKESK packets naming these key ids; every other byte of the message stays
    /// (the encrypted data packet does not cover the PKESKs).
    fn remove(
        &self,
        blob: &[u8],
        ids: &std::collections::BTreeSet<String>,
    ) -> Result<Option<Vec<u8>>, String> {
        let packets = pkesk_packets(blob)?;
        let (gone, kept): (Vec<_>, Vec<_>) = packets
            .iter()
            .partition(|(_, id)| id.as_ref().is_some_and(|i| ids.contains(i)));
        if kept.is_empty() {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(blob.len());
        let mut at = 0;
        for (range, _) in gone {
            out.extend_from_slice(&blob[at..range.start]);
            at = range.end;
        }
        out.extend_from_slice(&blob[at..]);
        Ok(Some(out))
    }
}

/// The number of PKESKs in a `keys.pgp` annotation value (all comma entries).
pub fn count_recipients(annotation: &str) -> Option<usize> {
    let mut total = 0;
    for entry in annotation.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let blob = crate::options::decode_b64(entry).ok()?;
        total += pkesk_key_ids(&blob).ok()?.len();
    }
    Some(total)
}

#[cfg(test)]
mod tests;

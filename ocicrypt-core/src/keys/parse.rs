//! [`PublicKey`] and [`PrivateKey`]: parsing from PEM, DER and JWK, with errors that say what
//! was found.

use std::cell::Cell;
use std::fmt;
use std::io::Read as _;
use std::path::Path;

use openssl::bn::BigNumContext;
use openssl::ec::EcKey;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{HasPublic, Id, PKey, PKeyRef, Private, Public};
use openssl::rsa::Rsa;
use openssl::x509::X509;
use zeroize::Zeroizing;

use super::pem::{self, PemBlock};
use super::{jwk, KeyError};
use crate::redact;

/// Key files larger than this are refused (no key format comes close).
pub const MAX_KEY_FILE_SIZE: u64 = 1 << 20;

/// An elliptic curve we support.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Curve {
    /// NIST P-256 (secp256r1, prime256v1).
    P256,
    /// NIST P-384 (secp384r1).
    P384,
    /// NIST P-521 (secp521r1).
    P521,
}

impl Curve {
    /// The JOSE name: `P-256`, `P-384`, `P-521`.
    pub fn name(self) -> &'static str {
        match self {
            Curve::P256 => "P-256",
            Curve::P384 => "P-384",
            Curve::P521 => "P-521",
        }
    }

    /// Parses a JOSE curve name (`P-256`…); also accepts `prime256v1`, `secp384r1`, `secp521r1`.
    pub fn from_name(name: &str) -> Option<Curve> {
        match name {
            "P-256" | "p-256" | "P256" | "prime256v1" | "secp256r1" => Some(Curve::P256),
            "P-384" | "p-384" | "P384" | "secp384r1" => Some(Curve::P384),
            "P-521" | "p-521" | "P521" | "secp521r1" => Some(Curve::P521),
            _ => None,
        }
    }

    /// Length in bytes of a field element (JWK `x`, `y`, `d`).
    pub fn field_len(self) -> usize {
        match self {
            Curve::P256 => 32,
            Curve::P384 => 48,
            Curve::P521 => 66,
        }
    }

    pub(crate) fn nid(self) -> Nid {
        match self {
            Curve::P256 => Nid::X9_62_PRIME256V1,
            Curve::P384 => Nid::SECP384R1,
            Curve::P521 => Nid::SECP521R1,
        }
    }

    fn from_nid(nid: Nid) -> Option<Curve> {
        match nid {
            Nid::X9_62_PRIME256V1 => Some(Curve::P256),
            Nid::SECP384R1 => Some(Curve::P384),
            Nid::SECP521R1 => Some(Curve::P521),
            _ => None,
        }
    }
}

impl fmt::Display for Curve {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The type of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyKind {
    /// RSA with a modulus of `bits` bits.
    Rsa {
        /// Modulus size.
        bits: u32,
    },
    /// EC on a NIST curve.
    Ec(Curve),
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyKind::Rsa { bits } => write!(f, "RSA-{bits}"),
            KeyKind::Ec(c) => write!(f, "EC {c}"),
        }
    }
}

/// The encoding a key was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KeyFormat {
    /// PKCS#8 PEM (`BEGIN PRIVATE KEY`).
    Pkcs8Pem,
    /// PKCS#8 DER.
    Pkcs8Der,
    /// Encrypted PKCS#8 PEM (`BEGIN ENCRYPTED PRIVATE KEY`).
    EncryptedPkcs8Pem,
    /// Encrypted PKCS#8 DER.
    EncryptedPkcs8Der,
    /// PKCS#1 RSA PEM (`BEGIN RSA PRIVATE KEY`).
    Pkcs1Pem,
    /// PKCS#1 RSA DER.
    Pkcs1Der,
    /// SEC1 EC PEM (`BEGIN EC PRIVATE KEY`).
    Sec1Pem,
    /// SEC1 EC DER.
    Sec1Der,
    /// Legacy OpenSSL encrypted PEM (`Proc-Type: 4,ENCRYPTED`, `DEK-Info`).
    LegacyEncryptedPem,
    /// A JSON Web Key.
    Jwk,
    /// SubjectPublicKeyInfo PEM (`BEGIN PUBLIC KEY`).
    SpkiPem,
    /// SubjectPublicKeyInfo DER.
    SpkiDer,
    /// PKCS#1 RSA public key PEM (`BEGIN RSA PUBLIC KEY`).
    Pkcs1PublicPem,
    /// PKCS#1 RSA public key DER.
    Pkcs1PublicDer,
    /// The key of an X.509 certificate, PEM.
    CertificatePem,
    /// The key of an X.509 certificate, DER.
    CertificateDer,
}

impl KeyFormat {
    /// Whether Go containers/ocicrypt (skopeo, CRI-O, containerd's imgcrypt) reads this
    /// encoding for the same purpose. SEC1 PEM private keys are silently ignored by Go,
    /// encrypted PKCS#8 is not supported there, and `RSA PUBLIC KEY` PEM and certificates are
    /// not accepted as `jwe:` recipients.
    pub fn go_ocicrypt_reads(self) -> bool {
        !matches!(
            self,
            KeyFormat::Sec1Pem
                | KeyFormat::EncryptedPkcs8Pem
                | KeyFormat::EncryptedPkcs8Der
                | KeyFormat::Pkcs1PublicPem
                | KeyFormat::Pkcs1PublicDer
                | KeyFormat::CertificatePem
                | KeyFormat::CertificateDer
        )
    }

    /// A short human name: `PKCS#8 PEM`, `SEC1 DER`, `JWK`…
    pub fn name(self) -> &'static str {
        match self {
            KeyFormat::Pkcs8Pem => "PKCS#8 PEM",
            KeyFormat::Pkcs8Der => "PKCS#8 DER",
            KeyFormat::EncryptedPkcs8Pem => "encrypted PKCS#8 PEM",
            KeyFormat::EncryptedPkcs8Der => "encrypted PKCS#8 DER",
            KeyFormat::Pkcs1Pem => "PKCS#1 PEM",
            KeyFormat::Pkcs1Der => "PKCS#1 DER",
            KeyFormat::Sec1Pem => "SEC1 PEM",
            KeyFormat::Sec1Der => "SEC1 DER",
            KeyFormat::LegacyEncryptedPem => "legacy encrypted PEM",
            KeyFormat::Jwk => "JWK",
            KeyFormat::SpkiPem => "SPKI PEM",
            KeyFormat::SpkiDer => "SPKI DER",
            KeyFormat::Pkcs1PublicPem => "PKCS#1 public PEM",
            KeyFormat::Pkcs1PublicDer => "PKCS#1 public DER",
            KeyFormat::CertificatePem => "X.509 certificate PEM",
            KeyFormat::CertificateDer => "X.509 certificate DER",
        }
    }
}

impl fmt::Display for KeyFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A recipient's public key: RSA or EC (P-256/384/521), possibly from a JWK carrying `alg`
/// and `kid`.
#[derive(Clone)]
pub struct PublicKey {
    pkey: PKey<Public>,
    kind: KeyKind,
    alg: Option<String>,
    kid: Option<String>,
    format: KeyFormat,
    source_name: String,
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublicKey")
            .field("kind", &self.kind)
            .field("alg", &self.alg.as_deref().map(redact::token))
            .field("kid", &self.kid.as_deref().map(redact::token))
            .field("format", &self.format)
            .field("source_name", &self.source_name)
            .finish()
    }
}

impl PublicKey {
    /// Parses a public key: SPKI PEM/DER, PKCS#1 `RSA PUBLIC KEY` PEM/DER, a public JWK, or an
    /// X.509 certificate (PEM/DER; its subject key is used). `source_name` names the origin in
    /// errors.
    ///
    /// # Errors
    /// [`KeyError::Unsupported`] saying what was found (e.g. a private key),
    /// [`KeyError::UnsupportedAlgorithm`], [`KeyError::Malformed`].
    pub fn from_bytes(bytes: &[u8], source_name: &str) -> Result<PublicKey, KeyError> {
        let bytes = strip_bom(bytes);
        let (pkey, format, alg, kid) = if pem::contains_pem(bytes) {
            let (p, f) = public_from_pem(bytes, source_name)?;
            (p, f, None, None)
        } else if looks_like_json(bytes) {
            let j = jwk::parse_public(bytes, source_name)?;
            (j.pkey, KeyFormat::Jwk, j.alg, j.kid)
        } else {
            let (p, f) = public_from_der(bytes, source_name)?;
            (p, f, None, None)
        };
        let kind = kind_of(&pkey, source_name)?;
        Ok(PublicKey {
            pkey,
            kind,
            alg,
            kid,
            format,
            source_name: source_name.to_owned(),
        })
    }

    /// Reads and parses a public key file (at most [`MAX_KEY_FILE_SIZE`] bytes). The file name
    /// becomes the source name.
    ///
    /// # Errors
    /// [`KeyError::Io`] or as [`PublicKey::from_bytes`].
    pub fn from_file(path: &Path) -> Result<PublicKey, KeyError> {
        let bytes = read_key_file(path)?;
        PublicKey::from_bytes(&bytes, &path.display().to_string())
    }

    /// `RSA-2048`, `EC P-256`…
    pub fn describe(&self) -> String {
        self.kind.to_string()
    }

    /// The key type.
    pub fn kind(&self) -> KeyKind {
        self.kind
    }

    /// The JWK `alg` member, when the key came from a JWK that has one.
    pub fn alg(&self) -> Option<&str> {
        self.alg.as_deref()
    }

    /// The JWK `kid` member, when the key came from a JWK that has one.
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// The encoding it was read from.
    pub fn format(&self) -> KeyFormat {
        self.format
    }

    /// Where it came from (as given to `from_bytes`, or the file path).
    pub fn source_name(&self) -> &str {
        &self.source_name
    }

    /// The SubjectPublicKeyInfo DER.
    pub fn to_spki_der(&self) -> Vec<u8> {
        self.pkey
            .public_key_to_der()
            .expect("a parsed public key always encodes")
    }

    /// The SubjectPublicKeyInfo PEM (`BEGIN PUBLIC KEY`), the form `jwe:` recipients take.
    pub fn to_spki_pem(&self) -> String {
        String::from_utf8(
            self.pkey
                .public_key_to_pem()
                .expect("a parsed public key always encodes"),
        )
        .expect("PEM is ASCII")
    }

    /// `sha256:<hex>` of the SubjectPublicKeyInfo DER: a stable identifier for logs and
    /// reports.
    pub fn fingerprint(&self) -> String {
        let d =
            openssl::hash::hash(MessageDigest::sha256(), &self.to_spki_der()).expect("sha256 is available");
        format!("sha256:{}", hex::encode(d))
    }

    /// Whether two keys are the same public key.
    pub fn same_key(&self, other: &PublicKey) -> bool {
        self.pkey.public_eq(&other.pkey)
    }

    pub(crate) fn pkey(&self) -> &PKeyRef<Public> {
        &self.pkey
    }
}

/// A private key: RSA or EC (P-256/384/521). Not `Clone`; `Debug` shows no key material;
/// OpenSSL clears the key numbers when it is dropped.
pub struct PrivateKey {
    pkey: PKey<Private>,
    kind: KeyKind,
    alg: Option<String>,
    kid: Option<String>,
    format: KeyFormat,
    source_name: String,
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrivateKey")
            .field("kind", &self.kind)
            .field("format", &self.format)
            .field("source_name", &self.source_name)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl PrivateKey {
    /// Parses a private key: PKCS#8, PKCS#1 and SEC1 in PEM or DER, encrypted PKCS#8 (PEM or
    /// DER) and legacy encrypted PEM (`Proc-Type`/`DEK-Info`) with `password`, or a private
    /// JWK. A password given for an unencrypted key is ignored, as in Go. `source_name` names
    /// the origin in errors.
    ///
    /// # Errors
    /// [`KeyError::NeedsPassword`], [`KeyError::WrongPassword`], [`KeyError::Unsupported`]
    /// saying what was found (a certificate, a public key, a PGP key, text…),
    /// [`KeyError::UnsupportedAlgorithm`], [`KeyError::Malformed`].
    pub fn from_bytes(
        bytes: &[u8],
        password: Option<&[u8]>,
        source_name: &str,
    ) -> Result<PrivateKey, KeyError> {
        let bytes = strip_bom(bytes);
        let (pkey, format, alg, kid) = if pem::contains_pem(bytes) {
            let (p, f) = private_from_pem(bytes, password, source_name)?;
            (p, f, None, None)
        } else if looks_like_json(bytes) {
            let j = jwk::parse_private(bytes, source_name)?;
            (j.pkey, KeyFormat::Jwk, j.alg, j.kid)
        } else {
            let (p, f) = private_from_der(bytes, password, source_name)?;
            (p, f, None, None)
        };
        let kind = kind_of(&pkey, source_name)?;
        Ok(PrivateKey {
            pkey,
            kind,
            alg,
            kid,
            format,
            source_name: source_name.to_owned(),
        })
    }

    /// Reads and parses a private key file (at most [`MAX_KEY_FILE_SIZE`] bytes). The file
    /// name becomes the source name.
    ///
    /// # Errors
    /// [`KeyError::Io`] or as [`PrivateKey::from_bytes`].
    pub fn from_file(path: &Path, password: Option<&[u8]>) -> Result<PrivateKey, KeyError> {
        let bytes = read_key_file(path)?;
        PrivateKey::from_bytes(&bytes, password, &path.display().to_string())
    }

    /// `RSA-2048`, `EC P-256`…
    pub fn describe(&self) -> String {
        self.kind.to_string()
    }

    /// The key type.
    pub fn kind(&self) -> KeyKind {
        self.kind
    }

    /// The JWK `alg` member, when the key came from a JWK that has one.
    pub fn alg(&self) -> Option<&str> {
        self.alg.as_deref()
    }

    /// The JWK `kid` member, when the key came from a JWK that has one.
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// The encoding it was read from; see [`KeyFormat::go_ocicrypt_reads`] to know whether a
    /// Go runtime could read the same file.
    pub fn format(&self) -> KeyFormat {
        self.format
    }

    /// Where it came from.
    pub fn source_name(&self) -> &str {
        &self.source_name
    }

    /// The matching public key (keeps a JWK's `alg` and `kid`).
    pub fn public_key(&self) -> PublicKey {
        let der = self
            .pkey
            .public_key_to_der()
            .expect("a parsed private key always has a public part");
        let pkey = PKey::public_key_from_der(&der).expect("own SPKI parses");
        PublicKey {
            pkey,
            kind: self.kind,
            alg: self.alg.clone(),
            kid: self.kid.clone(),
            format: KeyFormat::SpkiDer,
            source_name: self.source_name.clone(),
        }
    }

    /// The key as unencrypted PKCS#8 PEM, the form every Go ocicrypt version reads (use it to
    /// normalise SEC1 PEM or encrypted keys before placing them in a runtime key directory).
    ///
    /// # Errors
    /// [`KeyError::Crypto`] if OpenSSL cannot encode it.
    pub fn to_pkcs8_pem(&self) -> Result<Zeroizing<String>, KeyError> {
        let pem = Zeroizing::new(
            self.pkey
                .private_key_to_pem_pkcs8()
                .map_err(|e| KeyError::Crypto {
                    context: format!("encoding {} as PKCS#8", self.source_name),
                    reason: e.to_string(),
                })?,
        );
        Ok(Zeroizing::new(String::from_utf8_lossy(&pem).into_owned()))
    }

    /// Another handle to the same key, for a second scheme (PKCS#7 and JWE both use RSA keys):
    /// shares OpenSSL's reference-counted key, the key material is not copied.
    pub fn share(&self) -> PrivateKey {
        PrivateKey {
            pkey: self.pkey.clone(),
            kind: self.kind,
            alg: self.alg.clone(),
            kid: self.kid.clone(),
            format: self.format,
            source_name: self.source_name.clone(),
        }
    }

    pub(crate) fn pkey(&self) -> &PKeyRef<Private> {
        &self.pkey
    }
}

/// Reads a key file, refusing anything larger than [`MAX_KEY_FILE_SIZE`].
pub(crate) fn read_key_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    let io = |source| KeyError::Io {
        path: path.to_owned(),
        source,
    };
    // Without blocking on a FIFO, and only a regular file (not /dev/zero).
    let f = crate::fsutil::open_regular(path).map_err(io)?;
    let mut buf = Zeroizing::new(Vec::with_capacity(MAX_KEY_FILE_SIZE as usize + 1));
    f.take(MAX_KEY_FILE_SIZE + 1).read_to_end(&mut buf).map_err(io)?;
    if buf.len() as u64 > MAX_KEY_FILE_SIZE {
        return Err(KeyError::Unsupported {
            source_name: path.display().to_string(),
            found: format!("a file larger than {MAX_KEY_FILE_SIZE} bytes (no key is that big)"),
        });
    }
    Ok(buf)
}

/// Drops a UTF-8 byte-order mark (editors on Windows add one to PEM and JWK files).
fn strip_bom(bytes: &[u8]) -> &[u8] {
    bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes)
}

pub(crate) fn looks_like_json(bytes: &[u8]) -> bool {
    bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}

/// The key type, refusing types the JWE scheme cannot use.
fn kind_of<T: HasPublic>(pkey: &PKeyRef<T>, source_name: &str) -> Result<KeyKind, KeyError> {
    let unsupported = |found: String| KeyError::UnsupportedAlgorithm {
        source_name: source_name.to_owned(),
        found,
    };
    match pkey.id() {
        Id::RSA => Ok(KeyKind::Rsa { bits: pkey.bits() }),
        Id::EC => {
            let ec = pkey
                .ec_key()
                .map_err(|e| unsupported(format!("an EC key OpenSSL cannot read ({e})")))?;
            match ec.group().curve_name() {
                Some(nid) => Curve::from_nid(nid).map(KeyKind::Ec).ok_or_else(|| {
                    unsupported(format!("EC curve {}", nid.short_name().unwrap_or("(unknown)")))
                }),
                None => Err(unsupported("EC key with explicit curve parameters".into())),
            }
        }
        Id::RSA_PSS => Err(unsupported(
            "RSA-PSS (an RSA key restricted to signatures)".into(),
        )),
        Id::ED25519 => Err(unsupported("Ed25519".into())),
        Id::ED448 => Err(unsupported("Ed448".into())),
        Id::X25519 => Err(unsupported("X25519".into())),
        Id::X448 => Err(unsupported("X448".into())),
        Id::DSA => Err(unsupported("DSA".into())),
        Id::DH | Id::DHX => Err(unsupported("Diffie-Hellman".into())),
        other => Err(unsupported(
            Nid::from_raw(other.as_raw())
                .short_name()
                .unwrap_or("an unknown key type")
                .to_owned(),
        )),
    }
}

fn malformed(source_name: &str, what: &str, e: impl fmt::Display) -> KeyError {
    KeyError::Malformed {
        source_name: source_name.to_owned(),
        what: what.to_owned(),
        reason: e.to_string(),
    }
}

const HINT_NEED_PRIVATE: &str = "decryption needs the private key";
const HINT_NEED_PUBLIC: &str =
    "a recipient needs the public key; extract it with: openssl pkey -in KEYFILE -pubout -out PUBFILE";

/// Labels that hold private keys.
fn is_private_label(label: &str) -> bool {
    matches!(
        label,
        "PRIVATE KEY" | "RSA PRIVATE KEY" | "EC PRIVATE KEY" | "ENCRYPTED PRIVATE KEY"
    )
}

/// What a PEM label is, for error messages.
pub(crate) fn describe_pem_label(label: &str) -> String {
    match label {
        "PRIVATE KEY" | "RSA PRIVATE KEY" | "EC PRIVATE KEY" => "a private key".into(),
        "ENCRYPTED PRIVATE KEY" => "an encrypted private key".into(),
        "PUBLIC KEY" | "RSA PUBLIC KEY" => "a public key".into(),
        "CERTIFICATE" | "X509 CERTIFICATE" | "TRUSTED CERTIFICATE" => "an X.509 certificate".into(),
        "CERTIFICATE REQUEST" | "NEW CERTIFICATE REQUEST" => "a certificate signing request".into(),
        "OPENSSH PRIVATE KEY" => {
            "an OpenSSH private key (convert a copy with: ssh-keygen -p -m PKCS8 -f COPY)".into()
        }
        "DSA PRIVATE KEY" => "a DSA private key (unsupported: use RSA or EC)".into(),
        "PGP PRIVATE KEY BLOCK" => "an ASCII-armored OpenPGP secret key (not an RSA/EC key)".into(),
        "PGP PUBLIC KEY BLOCK" => "an ASCII-armored OpenPGP public key (not an RSA/EC key)".into(),
        "PGP MESSAGE" | "PGP SIGNATURE" => "an OpenPGP message (not a key)".into(),
        other => format!("a PEM block {} (not a key)", pem::quote_label(other)),
    }
}

/// Skips blocks that accompany keys without being one (`openssl ecparam -genkey` output).
fn key_blocks<'b, 'a>(blocks: &'b [PemBlock<'a>]) -> impl Iterator<Item = &'b PemBlock<'a>> {
    blocks.iter().filter(|b| b.label != "EC PARAMETERS")
}

fn private_from_pem(
    bytes: &[u8],
    password: Option<&[u8]>,
    source_name: &str,
) -> Result<(PKey<Private>, KeyFormat), KeyError> {
    let blocks = pem::parse_blocks(bytes).map_err(|e| malformed(source_name, "PEM", e))?;
    let Some(block) = key_blocks(&blocks)
        .find(|b| is_private_label(&b.label))
        .or_else(|| key_blocks(&blocks).next())
    else {
        return Err(KeyError::Unsupported {
            source_name: source_name.to_owned(),
            found: "only EC parameters, no key".into(),
        });
    };
    let what = format!("PEM block {}", pem::quote_label(&block.label));
    match block.label.as_str() {
        "RSA PRIVATE KEY" | "EC PRIVATE KEY" if block.is_legacy_encrypted() => {
            let Some(pw) = password else {
                return Err(KeyError::NeedsPassword {
                    source_name: source_name.to_owned(),
                });
            };
            let pkey = decrypt_legacy_pem(block.text, pw).map_err(|_| KeyError::WrongPassword {
                source_name: source_name.to_owned(),
            })?;
            Ok((pkey, KeyFormat::LegacyEncryptedPem))
        }
        "PRIVATE KEY" => {
            let pkey =
                PKey::private_key_from_pkcs8(&block.der).map_err(|e| malformed(source_name, &what, e))?;
            Ok((pkey, KeyFormat::Pkcs8Pem))
        }
        "RSA PRIVATE KEY" => {
            let rsa = Rsa::private_key_from_der(&block.der).map_err(|e| malformed(source_name, &what, e))?;
            let pkey = PKey::from_rsa(rsa).map_err(|e| malformed(source_name, &what, e))?;
            Ok((pkey, KeyFormat::Pkcs1Pem))
        }
        "EC PRIVATE KEY" => {
            let ec = EcKey::private_key_from_der(&block.der).map_err(|e| malformed(source_name, &what, e))?;
            let pkey = PKey::from_ec_key(ec).map_err(|e| malformed(source_name, &what, e))?;
            Ok((pkey, KeyFormat::Sec1Pem))
        }
        "ENCRYPTED PRIVATE KEY" => {
            let Some(pw) = password else {
                return Err(KeyError::NeedsPassword {
                    source_name: source_name.to_owned(),
                });
            };
            let pkey = PKey::private_key_from_pkcs8_passphrase(&block.der, pw).map_err(|_| {
                KeyError::WrongPassword {
                    source_name: source_name.to_owned(),
                }
            })?;
            Ok((pkey, KeyFormat::EncryptedPkcs8Pem))
        }
        "PUBLIC KEY" | "RSA PUBLIC KEY" | "CERTIFICATE" | "X509 CERTIFICATE" | "TRUSTED CERTIFICATE" => {
            Err(KeyError::Unsupported {
                source_name: source_name.to_owned(),
                found: format!("{} ({HINT_NEED_PRIVATE})", describe_pem_label(&block.label)),
            })
        }
        other => Err(KeyError::Unsupported {
            source_name: source_name.to_owned(),
            found: describe_pem_label(other),
        }),
    }
}

/// Legacy `Proc-Type`/`DEK-Info` PEM, decrypted by OpenSSL with exactly this password.
fn decrypt_legacy_pem(text: &[u8], password: &[u8]) -> Result<PKey<Private>, ()> {
    PKey::private_key_from_pem_callback(text, |buf| {
        if password.len() > buf.len() {
            return Err(openssl::error::ErrorStack::get());
        }
        buf[..password.len()].copy_from_slice(password);
        Ok(password.len())
    })
    .map_err(|_| ())
}

fn private_from_der(
    bytes: &[u8],
    password: Option<&[u8]>,
    source_name: &str,
) -> Result<(PKey<Private>, KeyFormat), KeyError> {
    if let Some(k) = try_private_der(bytes) {
        return Ok(k);
    }
    // Encrypted PKCS#8 DER: OpenSSL asks for a password only when the structure is one.
    let asked = Cell::new(false);
    let res = PKey::private_key_from_pkcs8_callback(bytes, |buf| {
        asked.set(true);
        match password {
            Some(pw) if pw.len() <= buf.len() => {
                buf[..pw.len()].copy_from_slice(pw);
                Ok(pw.len())
            }
            _ => Err(openssl::error::ErrorStack::get()),
        }
    });
    match (res, asked.get(), password) {
        (Ok(pkey), _, _) => return Ok((pkey, KeyFormat::EncryptedPkcs8Der)),
        (Err(_), true, None) => {
            return Err(KeyError::NeedsPassword {
                source_name: source_name.to_owned(),
            })
        }
        (Err(_), true, Some(_)) => {
            return Err(KeyError::WrongPassword {
                source_name: source_name.to_owned(),
            })
        }
        (Err(_), false, _) => {}
    }
    let found = if X509::from_der(bytes).is_ok() {
        format!("an X.509 certificate ({HINT_NEED_PRIVATE})")
    } else if is_public_der(bytes) {
        format!("a public key ({HINT_NEED_PRIVATE})")
    } else {
        sniff_non_key(bytes)
    };
    Err(KeyError::Unsupported {
        source_name: source_name.to_owned(),
        found,
    })
}

/// Unencrypted private key DER in Go's order: PKCS#8, PKCS#1, SEC1.
pub(crate) fn try_private_der(bytes: &[u8]) -> Option<(PKey<Private>, KeyFormat)> {
    if let Ok(p) = PKey::private_key_from_pkcs8(bytes) {
        return Some((p, KeyFormat::Pkcs8Der));
    }
    if let Some(p) = Rsa::private_key_from_der(bytes)
        .ok()
        .and_then(|r| PKey::from_rsa(r).ok())
    {
        return Some((p, KeyFormat::Pkcs1Der));
    }
    if let Some(p) = EcKey::private_key_from_der(bytes)
        .ok()
        .and_then(|k| PKey::from_ec_key(k).ok())
    {
        return Some((p, KeyFormat::Sec1Der));
    }
    None
}

fn is_public_der(bytes: &[u8]) -> bool {
    PKey::public_key_from_der(bytes).is_ok() || Rsa::public_key_from_der_pkcs1(bytes).is_ok()
}

/// Whether the bytes are an encrypted PKCS#8 DER structure (without decrypting it).
pub(crate) fn is_encrypted_pkcs8_der(bytes: &[u8]) -> bool {
    let asked = Cell::new(false);
    let _ = PKey::private_key_from_pkcs8_callback(bytes, |_buf| {
        asked.set(true);
        Err(openssl::error::ErrorStack::get())
    });
    asked.get()
}

/// The first OpenPGP packet tag, if the data starts like a binary OpenPGP packet.
pub(crate) fn openpgp_tag(bytes: &[u8]) -> Option<u8> {
    let first = *bytes.first()?;
    if first & 0x80 == 0 {
        return None;
    }
    if first & 0x40 != 0 {
        Some(first & 0x3f)
    } else {
        Some((first >> 2) & 0x0f)
    }
}

/// What some bytes are, when they are neither a key, a certificate nor a public key.
pub(crate) fn sniff_non_key(bytes: &[u8]) -> String {
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return "an empty file".into();
    }
    match openpgp_tag(bytes) {
        Some(5) => return "a binary OpenPGP secret key (not an RSA/EC key)".into(),
        Some(6) => return "a binary OpenPGP public key (not an RSA/EC key)".into(),
        _ => {}
    }
    if looks_like_json(bytes) {
        return "JSON that is not a JWK".into();
    }
    let text = std::str::from_utf8(bytes)
        .is_ok_and(|s| s.chars().all(|c| !c.is_control() || c.is_ascii_whitespace()));
    if text {
        if bytes.starts_with(b"ssh-") || bytes.starts_with(b"ecdsa-sha2-") {
            return "an OpenSSH public key (not usable here)".into();
        }
        "not a key (text)".into()
    } else {
        format!("unrecognised binary data ({} bytes, not a DER key)", bytes.len())
    }
}

fn public_from_pem(bytes: &[u8], source_name: &str) -> Result<(PKey<Public>, KeyFormat), KeyError> {
    let blocks = pem::parse_blocks(bytes).map_err(|e| malformed(source_name, "PEM", e))?;
    let mut first_other: Option<&PemBlock<'_>> = None;
    for block in key_blocks(&blocks) {
        let what = format!("PEM block {}", pem::quote_label(&block.label));
        match block.label.as_str() {
            "PUBLIC KEY" => {
                let p =
                    PKey::public_key_from_der(&block.der).map_err(|e| malformed(source_name, &what, e))?;
                return Ok((p, KeyFormat::SpkiPem));
            }
            "RSA PUBLIC KEY" => {
                let r = Rsa::public_key_from_der_pkcs1(&block.der)
                    .map_err(|e| malformed(source_name, &what, e))?;
                let p = PKey::from_rsa(r).map_err(|e| malformed(source_name, &what, e))?;
                return Ok((p, KeyFormat::Pkcs1PublicPem));
            }
            "CERTIFICATE" | "X509 CERTIFICATE" => {
                let c = X509::from_der(&block.der).map_err(|e| malformed(source_name, &what, e))?;
                let p = c.public_key().map_err(|e| malformed(source_name, &what, e))?;
                return Ok((p, KeyFormat::CertificatePem));
            }
            _ => {
                first_other.get_or_insert(block);
            }
        }
    }
    let found = match first_other {
        None => "only EC parameters, no key".to_owned(),
        Some(b) if is_private_label(&b.label) => {
            format!("{} ({HINT_NEED_PUBLIC})", describe_pem_label(&b.label))
        }
        Some(b) => describe_pem_label(&b.label),
    };
    Err(KeyError::Unsupported {
        source_name: source_name.to_owned(),
        found,
    })
}

fn public_from_der(bytes: &[u8], source_name: &str) -> Result<(PKey<Public>, KeyFormat), KeyError> {
    if let Ok(p) = PKey::public_key_from_der(bytes) {
        return Ok((p, KeyFormat::SpkiDer));
    }
    if let Ok(c) = X509::from_der(bytes) {
        let p = c
            .public_key()
            .map_err(|e| malformed(source_name, "X.509 certificate", e))?;
        return Ok((p, KeyFormat::CertificateDer));
    }
    if let Some(p) = Rsa::public_key_from_der_pkcs1(bytes)
        .ok()
        .and_then(|r| PKey::from_rsa(r).ok())
    {
        return Ok((p, KeyFormat::Pkcs1PublicDer));
    }
    let found = if try_private_der(bytes).is_some() {
        format!("a private key ({HINT_NEED_PUBLIC})")
    } else if is_encrypted_pkcs8_der(bytes) {
        format!("an encrypted private key ({HINT_NEED_PUBLIC})")
    } else {
        sniff_non_key(bytes)
    };
    Err(KeyError::Unsupported {
        source_name: source_name.to_owned(),
        found,
    })
}

/// The affine coordinates of an EC public key, left-padded to the field length.
pub(crate) fn ec_coordinates<T: HasPublic>(
    ec: &EcKey<T>,
    curve: Curve,
) -> Result<(Vec<u8>, Vec<u8>), openssl::error::ErrorStack> {
    let mut ctx = BigNumContext::new()?;
    let mut x = openssl::bn::BigNum::new()?;
    let mut y = openssl::bn::BigNum::new()?;
    ec.public_key()
        .affine_coordinates(ec.group(), &mut x, &mut y, &mut ctx)?;
    let n = i32::try_from(curve.field_len()).expect("small");
    Ok((x.to_vec_padded(n)?, y.to_vec_padded(n)?))
}

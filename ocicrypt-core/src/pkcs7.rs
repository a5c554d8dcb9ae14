//! The PKCS#7 key-wrap scheme (`org.opencontainers.image.enc.keys.pkcs7`), byte-compatible
//! with Go ocicrypt (`keywrap/pkcs7`, which uses smallstep/go.mozilla.org `pkcs7`).
//!
//! A blob is a DER CMS `ContentInfo` holding an `EnvelopedData` (version 0): one
//! `KeyTransRecipientInfo` (version 0, `IssuerAndSerialNumber`, `rsaEncryption` = RSAES
//! PKCS#1 v1.5) per recipient certificate, and the private options JSON encrypted with
//! AES-128-GCM (16-byte key, 12-byte nonce, 16-byte tag appended, no AAD). The GCM
//! parameters are written as Go does, which is not RFC 5084: a *primitive* universal tag 16
//! wrapping `SEQUENCE { [4] IMPLICIT nonce, INTEGER 16 }`. Both that and the RFC 5084 form
//! are read, with AES-128/192/256-GCM.
//!
//! Decryption needs the private key **alone**: every RSA `RecipientInfo` is tried with every
//! RSA key (Go needs the recipient certificate as well, to pick one by issuer and serial;
//! certificates given to [`Pkcs7Unwrapper::with_certificates`] only put the matching key
//! first). The PKCS#1 v1.5 decoding does not leak a padding oracle: the RSA operation is raw
//! (OpenSSL, blinded), the padding is checked in constant time, and a bad padding continues
//! with a random content key, so a bad padding and a wrong key fail the same way, at the
//! GCM tag check (the countermeasure of RFC 5246 §7.4.7.1).
//!
//! ```
//! use ocicrypt_core::keys::PrivateKey;
//! use ocicrypt_core::pkcs7::{Certificate, Pkcs7Unwrapper, Pkcs7Wrapper};
//! use ocicrypt_core::{KeyUnwrapper, KeyWrapper};
//! # let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/vectors/keys");
//! let cert = Certificate::from_file(&dir.join("cert.pem"))?;
//! let blob = Pkcs7Wrapper::new(vec![cert])?.wrap_keys(b"{\"symkey\":\"...\"}")?;
//! let key = PrivateKey::from_file(&dir.join("cert.key.pem"), None)?;
//! let back = Pkcs7Unwrapper::new(vec![key]).unwrap_key(&blob)?;
//! assert_eq!(&back[..], b"{\"symkey\":\"...\"}");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod der;

use std::fmt;
use std::path::Path;

use openssl::pkey::{PKey, PKeyRef, Private, Public};
use openssl::pkey_ctx::PkeyCtx;
use openssl::rsa::Padding;
use openssl::symm::Cipher;
use openssl::x509::{X509Name, X509};
use subtle::{ConditionallySelectable, ConstantTimeEq};
use zeroize::Zeroizing;

use crate::keys::{KeyError, KeyKind, PrivateKey};
use crate::keywrap::{KeyUnwrapper, KeyWrapper, UnwrapError, WrapError};
use der::{Reader, Tlv};

/// The annotation scheme name.
pub const SCHEME: &str = "pkcs7";

const OID_ENVELOPED_DATA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x03];
const OID_DATA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x01];
const OID_RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const OID_AES128_GCM: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x01, 0x06];
const OID_AES192_GCM: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x01, 0x1a];
const OID_AES256_GCM: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x01, 0x2e];

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Far above any real blob (one RecipientInfo is ~300-600 bytes): bounds the work a hostile
/// annotation can cause.
const MAX_RECIPIENTS: usize = 1024;

fn random(len: usize) -> Zeroizing<Vec<u8>> {
    let mut v = Zeroizing::new(vec![0u8; len]);
    openssl::rand::rand_bytes(&mut v).expect("the OpenSSL RNG works");
    v
}

/// An X.509 certificate holding an RSA key: a PKCS#7 recipient.
#[derive(Clone)]
pub struct Certificate {
    pkey: PKey<Public>,
    bits: u32,
    /// The `issuer` Name TLV, as in the certificate.
    issuer: Vec<u8>,
    /// The `serialNumber` INTEGER TLV, as in the certificate.
    serial: Vec<u8>,
    source_name: String,
}

impl fmt::Debug for Certificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certificate")
            .field("source_name", &self.source_name)
            .field("issuer", &describe_name(&self.issuer))
            .field("serial", &hex::encode(serial_value(&self.serial)))
            .finish()
    }
}

impl Certificate {
    /// Parses a certificate, PEM (`BEGIN CERTIFICATE`) or DER. Only RSA certificates can be
    /// PKCS#7 recipients (as in Go).
    ///
    /// # Errors
    /// [`KeyError::Unsupported`] when the data is not a certificate,
    /// [`KeyError::UnsupportedAlgorithm`] for a non-RSA certificate, [`KeyError::Malformed`].
    pub fn from_bytes(bytes: &[u8], source_name: &str) -> Result<Certificate, KeyError> {
        let der =
            if crate::keys::contains_pem(bytes) {
                let blocks = crate::keys::pem_blocks(bytes).map_err(|reason| KeyError::Malformed {
                    source_name: source_name.to_owned(),
                    what: "PEM".into(),
                    reason,
                })?;
                let cert =
                    blocks
                        .iter()
                        .find(|b| b.label == "CERTIFICATE" || b.label == "X509 CERTIFICATE")
                        .ok_or_else(|| KeyError::Unsupported {
                            source_name: source_name.to_owned(),
                            found: format!(
                        "no CERTIFICATE block (PEM blocks: {}); pkcs7: recipients are X.509 certificates",
                        blocks.iter().map(|b| b.label.as_str()).collect::<Vec<_>>().join(", ")
                    ),
                        })?;
                Zeroizing::new(cert.der.to_vec())
            } else {
                Zeroizing::new(bytes.to_vec())
            };
        let malformed = |reason: String| KeyError::Malformed {
            source_name: source_name.to_owned(),
            what: "X.509 certificate".into(),
            reason,
        };
        let x509 = X509::from_der(&der).map_err(|_| KeyError::Unsupported {
            source_name: source_name.to_owned(),
            found: "no X.509 certificate (pkcs7: recipients are certificates, PEM or DER)".into(),
        })?;
        let pkey = x509.public_key().map_err(|e| malformed(e.to_string()))?;
        let Ok(rsa) = pkey.rsa() else {
            return Err(KeyError::UnsupportedAlgorithm {
                source_name: source_name.to_owned(),
                found: "a certificate for a non-RSA key (pkcs7: works only with RSA certificates, as in Go; use jwe: for EC keys)".into(),
            });
        };
        let bits = rsa.size() * 8;
        let (issuer, serial) = issuer_and_serial(&der).map_err(malformed)?;
        Ok(Certificate {
            pkey,
            bits,
            issuer,
            serial,
            source_name: source_name.to_owned(),
        })
    }

    /// Reads a certificate file (bounded like key files).
    ///
    /// # Errors
    /// [`KeyError::Io`] or as [`Certificate::from_bytes`].
    pub fn from_file(path: &Path) -> Result<Certificate, KeyError> {
        let bytes = crate::keys::read_key_file(path)?;
        Certificate::from_bytes(&bytes, &path.display().to_string())
    }

    /// Where it came from.
    pub fn source_name(&self) -> &str {
        &self.source_name
    }

    /// `RSA-2048`…
    pub fn describe(&self) -> String {
        KeyKind::Rsa { bits: self.bits }.to_string()
    }

    /// The issuer as text (`CN=…, O=…`) and the serial number in hex: what identifies this
    /// certificate in a PKCS#7 blob.
    pub fn id(&self) -> String {
        format_id(&self.issuer, &self.serial)
    }

    /// The recipient id of this certificate: `SERIAL@ISSUER`, the serial number in hex and the
    /// first 8 bytes of the SHA-256 of the issuer's DER Name in hex (e.g.
    /// `4f1c…@9a0b1c2d3e4f5061`), as [`crate::recipients`] and `inspect` show it.
    pub fn recipient_id(&self) -> String {
        recipient_id(&self.issuer, &self.serial)
    }
}

/// `SERIALHEX@ISSUERHASH` (see [`Certificate::recipient_id`]).
fn recipient_id(issuer: &[u8], serial: &[u8]) -> String {
    use sha2::Digest as _;
    let h = sha2::Sha256::digest(issuer);
    format!("{}@{}", hex::encode(serial_value(serial)), hex::encode(&h[..8]))
}

/// `issuer=CN=x, serial=0a1b…`.
fn format_id(issuer: &[u8], serial: &[u8]) -> String {
    format!(
        "issuer={} serial={}",
        describe_name(issuer),
        hex::encode(serial_value(serial))
    )
}

fn serial_value(tlv: &[u8]) -> &[u8] {
    Reader::new(tlv).any().map(|t| t.contents).unwrap_or_default()
}

/// An X.509 Name TLV as one line of text (no control characters).
fn describe_name(name: &[u8]) -> String {
    let Ok(n) = X509Name::from_der(name) else {
        return "<unparsable name>".into();
    };
    let parts: Vec<String> = n
        .entries()
        .map(|e| {
            let key = e.object().nid().short_name().unwrap_or("?").to_owned();
            let val = String::from_utf8_lossy(e.data().as_slice());
            format!("{key}={}", crate::redact::token(&val))
        })
        .collect();
    parts.join(", ")
}

/// The issuer Name and serialNumber TLVs of a certificate's TBSCertificate.
fn issuer_and_serial(cert: &[u8]) -> Result<(Vec<u8>, Vec<u8>), String> {
    let mut c = Reader::new(cert).nested(der::SEQUENCE, "Certificate")?;
    let mut tbs = c.nested(der::SEQUENCE, "TBSCertificate")?;
    if tbs.peek_tag() == Some(der::CONTEXT_0_CONS) {
        tbs.any()?; // version
    }
    let serial = tbs.expect(der::INTEGER, "serialNumber")?.full.to_vec();
    tbs.expect(der::SEQUENCE, "signature")?;
    let issuer = tbs.expect(der::SEQUENCE, "issuer")?.full.to_vec();
    Ok((issuer, serial))
}

/// Wraps for a set of RSA certificates: one `EnvelopedData` with a RecipientInfo each.
#[derive(Debug, Clone)]
pub struct Pkcs7Wrapper {
    recipients: Vec<Certificate>,
}

impl Pkcs7Wrapper {
    /// A wrapper for these certificates.
    ///
    /// # Errors
    /// [`WrapError::NoRecipients`] for an empty list.
    pub fn new(recipients: Vec<Certificate>) -> Result<Self, WrapError> {
        if recipients.is_empty() {
            return Err(WrapError::NoRecipients {
                scheme: SCHEME.into(),
            });
        }
        Ok(Pkcs7Wrapper { recipients })
    }

    /// The recipients.
    pub fn recipients(&self) -> &[Certificate] {
        &self.recipients
    }
}

fn rsa_pkcs1_encrypt(key: &PKeyRef<Public>, data: &[u8]) -> Result<Vec<u8>, openssl::error::ErrorStack> {
    let mut ctx = PkeyCtx::new(key)?;
    ctx.encrypt_init()?;
    ctx.set_rsa_padding(Padding::PKCS1)?;
    let mut out = Vec::new();
    ctx.encrypt_to_vec(data, &mut out)?;
    Ok(out)
}

impl KeyWrapper for Pkcs7Wrapper {
    fn scheme(&self) -> &str {
        SCHEME
    }

    fn recipient_ids(&self) -> Vec<String> {
        self.recipients.iter().map(Certificate::recipient_id).collect()
    }

    fn subset(&self, ids: &[String]) -> Option<std::sync::Arc<dyn crate::AsyncKeyWrapper>> {
        let recipients: Vec<Certificate> = self
            .recipients
            .iter()
            .filter(|c| ids.contains(&c.recipient_id()))
            .cloned()
            .collect();
        (!recipients.is_empty()).then(|| {
            std::sync::Arc::new(Pkcs7Wrapper { recipients }) as std::sync::Arc<dyn crate::AsyncKeyWrapper>
        })
    }

    fn wrap_keys(&self, optsdata: &[u8]) -> Result<Vec<u8>, WrapError> {
        let cek = random(16);
        let nonce = random(NONCE_LEN);
        let mut tag = [0u8; TAG_LEN];
        let mut ct =
            openssl::symm::encrypt_aead(Cipher::aes_128_gcm(), &cek, Some(&nonce), &[], optsdata, &mut tag)
                .map_err(|e| WrapError::Backend {
                context: "AES-128-GCM encryption of the layer options".into(),
                source: Box::new(e),
            })?;
        ct.extend_from_slice(&tag);

        let mut infos = Vec::new();
        for r in &self.recipients {
            let ek = rsa_pkcs1_encrypt(&r.pkey, &cek).map_err(|e| WrapError::BadRecipient {
                recipient: r.source_name.clone(),
                reason: format!("RSA PKCS#1 v1.5 encryption failed: {e}"),
            })?;
            infos.push(der::tlv_of(
                der::SEQUENCE,
                &[
                    &der::tlv(der::INTEGER, &[0]),
                    &der::tlv_of(der::SEQUENCE, &[&r.issuer, &r.serial]),
                    &der::tlv(der::SEQUENCE, &der::tlv(der::OID, OID_RSA_ENCRYPTION)),
                    &der::tlv(der::OCTET_STRING, &ek),
                ],
            ));
        }
        // Go: asn1.RawValue{Tag: TagSequence, Bytes: marshal(gcmParameters{Nonce `tag:4`, ICVLen})}
        let params = der::tlv(
            der::GO_PRIMITIVE_SEQUENCE,
            &der::tlv_of(
                der::SEQUENCE,
                &[
                    &der::tlv(der::CONTEXT_4_PRIM, &nonce),
                    &der::tlv(der::INTEGER, &[TAG_LEN as u8]),
                ],
            ),
        );
        let eci = der::tlv_of(
            der::SEQUENCE,
            &[
                &der::tlv(der::OID, OID_DATA),
                &der::tlv_of(der::SEQUENCE, &[&der::tlv(der::OID, OID_AES128_GCM), &params]),
                &der::tlv(der::CONTEXT_0_CONS, &der::tlv(der::OCTET_STRING, &ct)),
            ],
        );
        let enveloped = der::tlv_of(
            der::SEQUENCE,
            &[
                &der::tlv(der::INTEGER, &[0]),
                &der::tlv(der::SET, &infos.concat()),
                &eci,
            ],
        );
        Ok(der::tlv_of(
            der::SEQUENCE,
            &[
                &der::tlv(der::OID, OID_ENVELOPED_DATA),
                &der::tlv(der::CONTEXT_0_CONS, &enveloped),
            ],
        ))
    }
}

/// One RecipientInfo of a parsed blob.
#[derive(Debug, Clone)]
struct ParsedRecipient<'a> {
    /// IssuerAndSerialNumber: (issuer TLV, serial TLV); `None` for a subjectKeyIdentifier.
    issuer_serial: Option<(&'a [u8], &'a [u8])>,
    /// Whether the key encryption algorithm is rsaEncryption (PKCS#1 v1.5).
    rsa_pkcs1: bool,
    alg_oid: &'a [u8],
    encrypted_key: &'a [u8],
}

/// A parsed EnvelopedData.
#[derive(Debug)]
struct Parsed<'a> {
    recipients: Vec<ParsedRecipient<'a>>,
    /// Content key length (16, 24 or 32).
    key_len: usize,
    nonce: &'a [u8],
    tag_len: usize,
    /// ciphertext || tag
    content: Vec<u8>,
}

fn malformed(reason: impl Into<String>) -> UnwrapError {
    UnwrapError::Malformed {
        scheme: SCHEME.into(),
        reason: reason.into(),
    }
}

fn gcm_key_len(oid: &[u8]) -> Option<usize> {
    match oid {
        OID_AES128_GCM => Some(16),
        OID_AES192_GCM => Some(24),
        OID_AES256_GCM => Some(32),
        _ => None,
    }
}

/// GCM parameters: Go's `10 len SEQUENCE{[4] nonce, INTEGER}` or RFC 5084's
/// `SEQUENCE{OCTET STRING nonce, INTEGER DEFAULT 12}`.
fn gcm_params(t: Tlv<'_>) -> Result<(&[u8], usize), String> {
    let seq = match t.tag {
        der::GO_PRIMITIVE_SEQUENCE => Reader::new(t.contents).nested(der::SEQUENCE, "GCM parameters")?,
        der::SEQUENCE => Reader::new(t.contents),
        other => return Err(format!("GCM parameters: unexpected tag 0x{other:02x}")),
    };
    let mut seq = seq;
    let nonce = seq.any().map_err(|e| format!("GCM nonce: {e}"))?;
    if nonce.tag != der::CONTEXT_4_PRIM && nonce.tag != der::OCTET_STRING {
        return Err(format!("GCM nonce: unexpected tag 0x{:02x}", nonce.tag));
    }
    if nonce.contents.is_empty() || nonce.contents.len() > 64 {
        return Err(format!("GCM nonce of {} bytes", nonce.contents.len()));
    }
    let tag_len = if seq.is_empty() {
        12
    } else {
        seq.small_uint("GCM ICV length")? as usize
    };
    if !(12..=16).contains(&tag_len) {
        return Err(format!("GCM tag length {tag_len} (12 to 16 are allowed)"));
    }
    Ok((nonce.contents, tag_len))
}

fn parse(blob: &[u8]) -> Result<Parsed<'_>, UnwrapError> {
    parse_inner(blob).map_err(malformed)
}

fn parse_inner(blob: &[u8]) -> Result<Parsed<'_>, String> {
    let mut top = Reader::new(blob);
    let mut ci = top.nested(der::SEQUENCE, "ContentInfo")?;
    if !top.is_empty() {
        return Err("trailing bytes after the ContentInfo".into());
    }
    let ct = ci.expect(der::OID, "contentType")?;
    if ct.contents != OID_ENVELOPED_DATA {
        return Err("not a CMS EnvelopedData (contentType is another OID)".into());
    }
    let mut ed = ci
        .nested(der::CONTEXT_0_CONS, "content")?
        .nested(der::SEQUENCE, "EnvelopedData")?;
    ed.small_uint("EnvelopedData version")?;
    if ed.peek_tag() == Some(der::CONTEXT_0_CONS) {
        ed.any()?; // originatorInfo
    }
    let mut set = ed.nested(der::SET, "recipientInfos")?;
    let mut recipients = Vec::new();
    while !set.is_empty() {
        if recipients.len() >= MAX_RECIPIENTS {
            return Err(format!("more than {MAX_RECIPIENTS} recipients"));
        }
        let ri = set.any().map_err(|e| format!("RecipientInfo: {e}"))?;
        if ri.tag != der::SEQUENCE {
            // KeyAgree [1], KEK [2], password [3], other [4]: not ours to open.
            continue;
        }
        let mut r = Reader::new(ri.contents);
        let version = r.small_uint("RecipientInfo version")?;
        let rid = r.any().map_err(|e| format!("RecipientInfo rid: {e}"))?;
        let issuer_serial = if version == 0 && rid.tag == der::SEQUENCE {
            let mut is = Reader::new(rid.contents);
            let issuer = is.expect(der::SEQUENCE, "issuer")?.full;
            let serial = is.expect(der::INTEGER, "serialNumber")?.full;
            Some((issuer, serial))
        } else {
            None
        };
        let mut alg = r.nested(der::SEQUENCE, "keyEncryptionAlgorithm")?;
        let alg_oid = alg.expect(der::OID, "keyEncryptionAlgorithm OID")?.contents;
        let encrypted_key = r.expect(der::OCTET_STRING, "encryptedKey")?.contents;
        recipients.push(ParsedRecipient {
            issuer_serial,
            rsa_pkcs1: alg_oid == OID_RSA_ENCRYPTION,
            alg_oid,
            encrypted_key,
        });
    }
    let mut eci = ed.nested(der::SEQUENCE, "EncryptedContentInfo")?;
    eci.expect(der::OID, "contentType of the encrypted content")?;
    let mut alg = eci.nested(der::SEQUENCE, "contentEncryptionAlgorithm")?;
    let oid = alg.expect(der::OID, "content encryption OID")?.contents;
    let key_len = gcm_key_len(oid).ok_or(
        "content encryption is not AES-GCM (ocicrypt writes AES-128-GCM; AES-128/192/256-GCM are read)",
    )?;
    let (nonce, tag_len) = gcm_params(alg.any().map_err(|e| format!("GCM parameters: {e}"))?)?;
    let enc = eci.any().map_err(|e| format!("encryptedContent: {e}"))?;
    let content = match enc.tag {
        // Go: [0] constructed wrapping OCTET STRING(s).
        der::CONTEXT_0_CONS => {
            let mut parts = Reader::new(enc.contents);
            let mut out = Vec::new();
            while !parts.is_empty() {
                out.extend_from_slice(
                    parts
                        .expect(der::OCTET_STRING, "encryptedContent segment")?
                        .contents,
                );
            }
            out
        }
        // RFC 5652: [0] IMPLICIT OCTET STRING.
        der::CONTEXT_0_PRIM => enc.contents.to_vec(),
        other => return Err(format!("encryptedContent: unexpected tag 0x{other:02x}")),
    };
    if content.len() < tag_len {
        return Err("encrypted content shorter than its GCM tag".into());
    }
    Ok(Parsed {
        recipients,
        key_len,
        nonce,
        tag_len,
        content,
    })
}

/// Raw RSA (no padding; OpenSSL blinds it) followed by a constant-time PKCS#1 v1.5 check for
/// a `want`-byte message. On a bad padding the result is `fallback`, chosen without a branch
/// on secret data, so the caller cannot tell the two apart until the content's GCM tag fails.
fn rsa_pkcs1_decrypt_implicit(
    key: &PKeyRef<Private>,
    encrypted: &[u8],
    want: usize,
    fallback: &[u8],
) -> Option<Zeroizing<Vec<u8>>> {
    let mut ctx = PkeyCtx::new(key).ok()?;
    ctx.decrypt_init().ok()?;
    ctx.set_rsa_padding(Padding::NONE).ok()?;
    let mut em = Zeroizing::new(Vec::new());
    // Fails only on public conditions (input not the modulus size, or >= the modulus).
    ctx.decrypt_to_vec(encrypted, &mut em).ok()?;
    Some(pkcs1_v15_select(&em, want, fallback))
}

/// The constant-time part of [`rsa_pkcs1_decrypt_implicit`]: `em` must be
/// `00 02 PS(>= 8 non-zero bytes) 00 M` with `|M| = want`, else `fallback` is returned.
fn pkcs1_v15_select(em: &[u8], want: usize, fallback: &[u8]) -> Zeroizing<Vec<u8>> {
    debug_assert_eq!(fallback.len(), want);
    let k = em.len();
    if k < want + 11 {
        // Public: depends on the key size only.
        return Zeroizing::new(fallback.to_vec());
    }
    let sep = k - want - 1;
    let mut ok = em[0].ct_eq(&0) & em[1].ct_eq(&2) & em[sep].ct_eq(&0);
    for b in &em[2..sep] {
        ok &= !b.ct_eq(&0);
    }
    let mut out = Zeroizing::new(vec![0u8; want]);
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::conditional_select(&fallback[i], &em[sep + 1 + i], ok);
    }
    out
}

/// Unwraps PKCS#7 blobs with RSA private keys (EC keys given here are skipped).
pub struct Pkcs7Unwrapper {
    keys: Vec<PrivateKey>,
    certificates: Vec<Certificate>,
}

impl fmt::Debug for Pkcs7Unwrapper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs7Unwrapper")
            .field(
                "keys",
                &self
                    .keys
                    .iter()
                    .map(|k| format!("{} {}", k.source_name(), k.describe()))
                    .collect::<Vec<_>>(),
            )
            .field("certificates", &self.certificates)
            .finish()
    }
}

impl Pkcs7Unwrapper {
    /// An unwrapper trying these keys on every RecipientInfo.
    pub fn new(keys: Vec<PrivateKey>) -> Self {
        Pkcs7Unwrapper {
            keys,
            certificates: Vec::new(),
        }
    }

    /// Certificates (as skopeo users pass them with `--decryption-key cert.pem`): not needed,
    /// but a RecipientInfo naming one of them is tried first with the key that matches it.
    pub fn with_certificates(mut self, certificates: Vec<Certificate>) -> Self {
        self.certificates = certificates;
        self
    }

    /// Whether there is at least one RSA key to try.
    pub fn has_usable_keys(&self) -> bool {
        self.keys.iter().any(|k| matches!(k.kind(), KeyKind::Rsa { .. }))
    }

    fn try_open(
        &self,
        p: &Parsed<'_>,
        r: &ParsedRecipient<'_>,
        key: &PrivateKey,
    ) -> Option<Zeroizing<Vec<u8>>> {
        let KeyKind::Rsa { bits } = key.kind() else {
            return None;
        };
        if r.encrypted_key.len() != bits.div_ceil(8) as usize {
            return None;
        }
        let fallback = random(p.key_len);
        let cek = rsa_pkcs1_decrypt_implicit(key.pkey(), r.encrypted_key, p.key_len, &fallback)?;
        let cipher = match p.key_len {
            16 => Cipher::aes_128_gcm(),
            24 => Cipher::aes_192_gcm(),
            _ => Cipher::aes_256_gcm(),
        };
        let (ct, tag) = p.content.split_at(p.content.len() - p.tag_len);
        openssl::symm::decrypt_aead(cipher, &cek, Some(p.nonce), &[], ct, tag)
            .ok()
            .map(Zeroizing::new)
    }
}

impl KeyUnwrapper for Pkcs7Unwrapper {
    fn scheme(&self) -> &str {
        SCHEME
    }

    fn unwrap_key(&self, blob: &[u8]) -> Result<Zeroizing<Vec<u8>>, UnwrapError> {
        let p = parse(blob)?;
        let rsa: Vec<&ParsedRecipient<'_>> = p.recipients.iter().filter(|r| r.rsa_pkcs1).collect();
        if rsa.is_empty() {
            let algs: Vec<String> = p.recipients.iter().map(|r| oid_text(r.alg_oid)).collect();
            return Err(malformed(format!(
                "no RecipientInfo uses rsaEncryption (PKCS#1 v1.5), the only key transport ocicrypt writes (found: {})",
                if algs.is_empty() { "none".to_owned() } else { algs.join(", ") }
            )));
        }
        // A certificate given with the keys names its RecipientInfo: try that pair first.
        for c in &self.certificates {
            let Some(r) = rsa
                .iter()
                .find(|r| r.issuer_serial == Some((&c.issuer[..], &c.serial[..])))
            else {
                continue;
            };
            for key in self.keys.iter().filter(|k| k.pkey().public_eq(&c.pkey)) {
                if let Some(pt) = self.try_open(&p, r, key) {
                    return Ok(pt);
                }
            }
        }
        for r in &rsa {
            for key in &self.keys {
                if let Some(pt) = self.try_open(&p, r, key) {
                    return Ok(pt);
                }
            }
        }
        Err(UnwrapError::NoMatchingKey {
            scheme: SCHEME.into(),
        })
    }
}

/// An OID as `rsaEncryption` or dotted text.
fn oid_text(oid: &[u8]) -> String {
    if oid == OID_RSA_ENCRYPTION {
        return "rsaEncryption".into();
    }
    let mut arcs: Vec<u64> = Vec::new();
    let mut cur: u64 = 0;
    for &b in oid.iter().take(64) {
        cur = (cur << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            if arcs.is_empty() {
                let first = (cur / 40).min(2);
                arcs.push(first);
                arcs.push(cur - first * 40);
            } else {
                arcs.push(cur);
            }
            cur = 0;
        }
        if cur > u64::MAX >> 8 {
            return "an unparsable OID".into();
        }
    }
    arcs.iter().map(u64::to_string).collect::<Vec<_>>().join(".")
}

/// What a PKCS#7 blob says about one recipient (no decryption needed): for `inspect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs7RecipientInfo {
    /// `issuer=CN=… serial=<hex>`, or `subjectKeyIdentifier` for the other RecipientInfo form.
    pub id: String,
    /// The key transport: `rsaEncryption` (PKCS#1 v1.5) or another OID as text.
    pub key_encryption: String,
}

/// Lists the recipients of a PKCS#7 blob.
///
/// # Errors
/// [`UnwrapError::Malformed`].
pub fn inspect(blob: &[u8]) -> Result<Vec<Pkcs7RecipientInfo>, UnwrapError> {
    let p = parse(blob)?;
    Ok(p.recipients
        .iter()
        .map(|r| Pkcs7RecipientInfo {
            id: match r.issuer_serial {
                Some((i, s)) => format_id(i, s),
                None => "subjectKeyIdentifier".into(),
            },
            key_encryption: oid_text(r.alg_oid),
        })
        .collect())
}

/// (bytes before the SET, RecipientInfos, bytes after the SET) of an EnvelopedData.
type InfoParts<'a> = (&'a [u8], Vec<Tlv<'a>>, &'a [u8]);

/// The parts of a blob that removing a recipient touches: the EnvelopedData's bytes before its
/// `recipientInfos` SET, each RecipientInfo TLV, and the bytes after the SET.
fn recipient_infos(blob: &[u8]) -> Result<InfoParts<'_>, String> {
    let mut top = Reader::new(blob);
    let mut ci = top.nested(der::SEQUENCE, "ContentInfo")?;
    if !top.is_empty() {
        return Err("trailing bytes after the ContentInfo".into());
    }
    let ct = ci.expect(der::OID, "contentType")?;
    if ct.contents != OID_ENVELOPED_DATA {
        return Err("not a CMS EnvelopedData (contentType is another OID)".into());
    }
    let ed_tlv = ci
        .nested(der::CONTEXT_0_CONS, "content")?
        .expect(der::SEQUENCE, "EnvelopedData")?;
    let mut ed = Reader::new(ed_tlv.contents);
    ed.small_uint("EnvelopedData version")?;
    if ed.peek_tag() == Some(der::CONTEXT_0_CONS) {
        ed.any()?; // originatorInfo
    }
    let before_len = ed_tlv.contents.len() - ed.rest().len();
    let set = ed.expect(der::SET, "recipientInfos")?;
    let mut infos = Vec::new();
    let mut r = Reader::new(set.contents);
    while !r.is_empty() {
        if infos.len() >= MAX_RECIPIENTS {
            return Err(format!("more than {MAX_RECIPIENTS} recipients"));
        }
        infos.push(r.any().map_err(|e| format!("RecipientInfo: {e}"))?);
    }
    Ok((&ed_tlv.contents[..before_len], infos, ed.rest()))
}

/// The id of one RecipientInfo: `Some` for a KeyTransRecipientInfo naming its certificate by
/// issuer and serial number (what ocicrypt writes), `None` for any other form.
fn info_id(ri: &Tlv<'_>) -> Option<String> {
    if ri.tag != der::SEQUENCE {
        return None;
    }
    let mut r = Reader::new(ri.contents);
    let version = r.small_uint("version").ok()?;
    let rid = r.any().ok()?;
    if version != 0 || rid.tag != der::SEQUENCE {
        return None;
    }
    let mut is = Reader::new(rid.contents);
    let issuer = is.expect(der::SEQUENCE, "issuer").ok()?.full;
    let serial = is.expect(der::INTEGER, "serialNumber").ok()?.full;
    Some(recipient_id(issuer, serial))
}

/// Recipient ids of PKCS#7 blobs, for [`crate::recipients`].
#[derive(Debug)]
pub struct Pkcs7Ids;

impl crate::recipients::IdScheme for Pkcs7Ids {
    fn scheme(&self) -> &'static str {
        SCHEME
    }

    fn ids(&self, blob: &[u8]) -> Result<Vec<Option<String>>, String> {
        let (_, infos, _) = recipient_infos(blob)?;
        Ok(infos.iter().map(info_id).collect())
    }

    /// Rewrites the EnvelopedData without the named RecipientInfos: the version, the other
    /// RecipientInfos (in their order) and the encrypted content stay as they were, so no
    /// private key is needed and every other recipient still opens it.
    fn remove(
        &self,
        blob: &[u8],
        ids: &std::collections::BTreeSet<String>,
    ) -> Result<Option<Vec<u8>>, String> {
        let (before, infos, after) = recipient_infos(blob)?;
        let kept: Vec<&[u8]> = infos
            .iter()
            .filter(|ri| !info_id(ri).is_some_and(|i| ids.contains(&i)))
            .map(|ri| ri.full)
            .collect();
        if kept.is_empty() {
            return Ok(None);
        }
        let set = der::tlv(der::SET, &kept.concat());
        let enveloped = der::tlv_of(der::SEQUENCE, &[before, &set, after]);
        Ok(Some(der::tlv_of(
            der::SEQUENCE,
            &[
                &der::tlv(der::OID, OID_ENVELOPED_DATA),
                &der::tlv(der::CONTEXT_0_CONS, &enveloped),
            ],
        )))
    }
}

/// The number of recipients in a `keys.pkcs7` annotation value (all comma entries), or `None`
/// if an entry does not parse.
pub fn count_recipients(annotation: &str) -> Option<usize> {
    let mut total = 0;
    for entry in annotation.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let blob = crate::options::decode_b64(entry).ok()?;
        total += parse(&blob).ok()?.recipients.len();
    }
    Some(total)
}

#[cfg(test)]
mod tests;

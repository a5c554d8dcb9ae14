//! Private and public layer options, the JSON documents containers/ocicrypt stores per layer.
//!
//! Private options (`{"symkey","digest","cipheroptions":{"nonce"}}`) are what every key-wrap
//! scheme encrypts. Public options (`{"cipher","hmac","cipheroptions":{}}`) travel in the clear,
//! base64-encoded, in the `org.opencontainers.image.enc.pubopts` annotation.
//!
//! Byte fields are written as standard padded base64, in Go's field order, so our output matches
//! Go's byte for byte in shape. On input we are lenient like Go: `null` or missing fields, any
//! field order, base64 with embedded newlines, and JSON arrays of numbers are all accepted.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::de::{self, Deserializer};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use crate::cipher::{LayerKey, MacTag, Nonce, AES_256_CTR_HMAC_SHA256};
use crate::Error;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Private layer options: the layer key, the plaintext digest and the nonce.
///
/// Zeroized on drop. Serializes to the exact JSON shape Go writes.
#[doc(alias = "PrivateLayerBlockCipherOptions")]
#[derive(Serialize, Deserialize, Default)]
pub struct PrivateLayerOptions {
    /// The symmetric layer key.
    #[serde(with = "b64_secret", default)]
    pub symkey: Zeroizing<Vec<u8>>,
    /// Digest of the plaintext blob (`sha256:<hex>`); a hint only, never trusted on decrypt.
    #[serde(default, deserialize_with = "null_string")]
    pub digest: String,
    /// Cipher options; `nonce` holds the CTR nonce.
    #[serde(with = "b64_map", default)]
    pub cipheroptions: BTreeMap<String, Vec<u8>>,
}

impl Drop for PrivateLayerOptions {
    fn drop(&mut self) {
        for v in self.cipheroptions.values_mut() {
            v.zeroize();
        }
    }
}

impl std::fmt::Debug for PrivateLayerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivateLayerOptions")
            .field("symkey", &"<redacted>")
            .field("digest", &self.digest)
            .finish_non_exhaustive()
    }
}

impl PrivateLayerOptions {
    /// Options for a freshly generated key and nonce.
    pub fn new(key: &LayerKey, nonce: &Nonce, digest: impl Into<String>) -> Self {
        let mut cipheroptions = BTreeMap::new();
        cipheroptions.insert("nonce".to_owned(), nonce.as_bytes().to_vec());
        Self {
            symkey: Zeroizing::new(key.as_bytes().to_vec()),
            digest: digest.into(),
            cipheroptions,
        }
    }

    /// The layer key.
    ///
    /// # Errors
    /// [`Error::InvalidKeyLength`] unless `symkey` is 32 bytes.
    pub fn key(&self) -> Result<LayerKey, Error> {
        LayerKey::from_slice(&self.symkey)
    }

    /// The JSON bytes that key-wrap schemes encrypt (Go field order, padded base64).
    pub fn to_json(&self) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(serde_json::to_vec(self).expect("options always serialize"))
    }

    /// Parses private options from unwrapped bytes.
    ///
    /// # Errors
    /// [`Error::InvalidOptions`] when the bytes are not the expected JSON.
    pub fn from_json(bytes: &[u8]) -> Result<Self, Error> {
        serde_json::from_slice(bytes).map_err(|e| Error::InvalidOptions {
            which: "private",
            reason: e.to_string(),
        })
    }
}

/// Public layer options: the cipher name and the MAC.
#[doc(alias = "PublicLayerBlockCipherOptions")]
#[derive(Serialize, Deserialize, Default, Debug, Clone, PartialEq, Eq)]
pub struct PublicLayerOptions {
    /// Cipher name; only `AES_256_CTR_HMAC_SHA256` exists.
    #[serde(default, deserialize_with = "null_string")]
    pub cipher: String,
    /// HMAC-SHA256 over the ciphertext.
    #[serde(with = "b64_bytes", default)]
    pub hmac: Vec<u8>,
    /// Public cipher options (Go writes `{}`; a `nonce` here must equal the private one, see
    /// [`PublicLayerOptions::nonce`]).
    #[serde(with = "b64_map", default)]
    pub cipheroptions: BTreeMap<String, Vec<u8>>,
}

impl PublicLayerOptions {
    /// Public options for a finished encryption.
    pub fn new(mac: &MacTag) -> Self {
        Self {
            cipher: AES_256_CTR_HMAC_SHA256.to_owned(),
            hmac: mac.as_bytes().to_vec(),
            cipheroptions: BTreeMap::new(),
        }
    }

    /// The value of the `org.opencontainers.image.enc.pubopts` annotation.
    pub fn to_annotation(&self) -> String {
        B64.encode(serde_json::to_vec(self).expect("options always serialize"))
    }

    /// Parses the `org.opencontainers.image.enc.pubopts` annotation.
    ///
    /// # Errors
    /// [`Error::InvalidOptions`] for bad base64 or JSON, [`Error::UnsupportedCipher`] for a
    /// cipher other than `AES_256_CTR_HMAC_SHA256`.
    pub fn from_annotation(value: &str) -> Result<Self, Error> {
        let raw = decode_b64(value).map_err(|e| Error::InvalidOptions {
            which: "public",
            reason: format!("pubopts is not base64: {e}"),
        })?;
        let opts: Self = serde_json::from_slice(&raw).map_err(|e| Error::InvalidOptions {
            which: "public",
            reason: e.to_string(),
        })?;
        if opts.cipher.is_empty() {
            return Err(Error::InvalidOptions {
                which: "public",
                reason: "no cipher type provided".into(),
            });
        }
        if opts.cipher != AES_256_CTR_HMAC_SHA256 {
            return Err(Error::UnsupportedCipher { name: opts.cipher });
        }
        Ok(opts)
    }

    /// The nonce: the one in the private options, which the key wrapping authenticates.
    ///
    /// Go (`GetOpt`) looks in the public options first, so a `nonce` added to the unauthenticated
    /// `pubopts` annotation would decrypt the layer to garbage that still passes the MAC (it
    /// covers the ciphertext only). Here a public nonce is only accepted when it equals the
    /// private one; a different one is refused.
    ///
    /// # Errors
    /// [`Error::MissingNonce`] when the private options have none (Go would decrypt garbage),
    /// [`Error::ConflictingNonce`] when the public options carry a different one,
    /// [`Error::InvalidNonceLength`] when it is not 16 bytes.
    pub fn nonce(&self, private: &PrivateLayerOptions) -> Result<Nonce, Error> {
        let n = private.cipheroptions.get("nonce").ok_or(Error::MissingNonce)?;
        if let Some(public) = self.cipheroptions.get("nonce") {
            if !bool::from(subtle::ConstantTimeEq::ct_eq(public.as_slice(), n.as_slice())) {
                return Err(Error::ConflictingNonce);
            }
        }
        Nonce::from_slice(n)
    }
}

/// Decodes standard base64 leniently: whitespace and newlines are ignored, padding optional.
///
/// # Errors
/// The base64 decode error.
pub fn decode_b64(s: &str) -> Result<Vec<u8>, base64::DecodeError> {
    let cleaned: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let lenient = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    lenient.decode(cleaned.as_bytes())
}

/// Encodes standard padded base64, as Go's `base64.StdEncoding`.
pub fn encode_b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

/// A byte field: a base64 string, an array of numbers, or null.
#[derive(Deserialize)]
#[serde(untagged)]
enum BytesRepr {
    S(String),
    A(Vec<u8>),
}

fn bytes_from_repr<E: de::Error>(r: Option<BytesRepr>) -> Result<Vec<u8>, E> {
    match r {
        None => Ok(Vec::new()),
        Some(BytesRepr::A(v)) => Ok(v),
        Some(BytesRepr::S(s)) => decode_b64(&s).map_err(|e| E::custom(format!("invalid base64: {e}"))),
    }
}

fn null_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_default())
}

mod b64_bytes {
    use super::*;
    pub(super) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&B64.encode(v))
    }
    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        bytes_from_repr(Option::<BytesRepr>::deserialize(d)?)
    }
}

mod b64_secret {
    use super::*;
    pub(super) fn serialize<S: Serializer>(v: &Zeroizing<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        let enc = Zeroizing::new(B64.encode(v.as_slice()));
        s.serialize_str(&enc)
    }
    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Zeroizing<Vec<u8>>, D::Error> {
        let repr = Option::<BytesRepr>::deserialize(d)?;
        bytes_from_repr(repr).map(Zeroizing::new)
    }
}

mod b64_map {
    use super::*;
    pub(super) fn serialize<S: Serializer>(m: &BTreeMap<String, Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(m.len()))?;
        for (k, v) in m {
            map.serialize_entry(k, &B64.encode(v))?;
        }
        map.end()
    }
    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, Vec<u8>>, D::Error> {
        let raw = Option::<BTreeMap<String, Option<BytesRepr>>>::deserialize(d)?;
        let mut out = BTreeMap::new();
        for (k, v) in raw.unwrap_or_default() {
            out.insert(k, bytes_from_repr(v)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_vector_private_options_parse_and_reserialize_identically() {
        let go = r#"{"symkey":"aMQXnB8hUdA7aP7WEa6X2x+WHDD9/aMt06xvCKu+MS8=","digest":"sha256:1c1b98c9551f0866da476a38c850d62f2af2f409a18145a8c384be96fa37e8b2","cipheroptions":{"nonce":"ky9SWfIZesQp4LZjEqycOw=="}}"#;
        let o = PrivateLayerOptions::from_json(go.as_bytes()).unwrap();
        assert_eq!(o.symkey.len(), 32);
        assert_eq!(o.cipheroptions["nonce"].len(), 16);
        assert_eq!(std::str::from_utf8(&o.to_json()).unwrap(), go);
        assert_eq!(go.len(), 193);
    }

    #[test]
    fn lenient_inputs_are_accepted() {
        let o = PrivateLayerOptions::from_json(
            br#"{"cipheroptions":null,"digest":null,"symkey":"aMQXnB8hUdA7aP7WEa6X2x+WHDD9/aMt\n06xvCKu+MS8="}"#,
        )
        .unwrap();
        assert_eq!(o.symkey.len(), 32);
        assert!(o.cipheroptions.is_empty());
        let o =
            PrivateLayerOptions::from_json(br#"{"symkey":[1,2,3],"cipheroptions":{"nonce":[9,9]}}"#).unwrap();
        assert_eq!(o.symkey.as_slice(), &[1, 2, 3]);
        assert_eq!(o.cipheroptions["nonce"], vec![9, 9]);
    }

    #[test]
    fn public_options_roundtrip_and_go_shape() {
        let p = PublicLayerOptions::new(&MacTag([7u8; 32]));
        let json = serde_json::to_string(&p).unwrap();
        assert!(json.starts_with(r#"{"cipher":"AES_256_CTR_HMAC_SHA256","hmac":""#));
        assert!(json.ends_with(r#"","cipheroptions":{}}"#));
        assert_eq!(
            PublicLayerOptions::from_annotation(&p.to_annotation()).unwrap(),
            p
        );
    }

    #[test]
    fn public_options_errors() {
        let empty = encode_b64(b"{}");
        assert!(matches!(
            PublicLayerOptions::from_annotation(&empty),
            Err(Error::InvalidOptions { .. })
        ));
        let other = encode_b64(br#"{"cipher":"ROT13","hmac":"AA=="}"#);
        assert!(matches!(
            PublicLayerOptions::from_annotation(&other),
            Err(Error::UnsupportedCipher { .. })
        ));
        assert!(PublicLayerOptions::from_annotation("!!!").is_err());
    }

    #[test]
    fn nonce_comes_from_the_private_options_and_a_different_public_one_is_refused() {
        let k = LayerKey::generate();
        let n = Nonce::generate();
        let private = PrivateLayerOptions::new(&k, &n, "");
        let mut public = PublicLayerOptions::new(&MacTag([0; 32]));
        assert_eq!(public.nonce(&private).unwrap(), n);
        // The same nonce in the public options is harmless.
        public.cipheroptions.insert("nonce".into(), n.as_bytes().to_vec());
        assert_eq!(public.nonce(&private).unwrap(), n);
        // A different one (unauthenticated) is refused, whatever its length.
        for other in [vec![1; 16], vec![1; 8]] {
            public.cipheroptions.insert("nonce".into(), other);
            assert!(matches!(public.nonce(&private), Err(Error::ConflictingNonce)));
        }
        // A nonce only in the public options is not used.
        let bare = PrivateLayerOptions::default();
        assert!(matches!(public.nonce(&bare), Err(Error::MissingNonce)));
        assert!(matches!(
            PublicLayerOptions::new(&MacTag([0; 32])).nonce(&bare),
            Err(Error::MissingNonce)
        ));
        let mut short = PrivateLayerOptions::new(&k, &n, "");
        short.cipheroptions.insert("nonce".into(), vec![1; 8]);
        assert!(matches!(
            PublicLayerOptions::new(&MacTag([0; 32])).nonce(&short),
            Err(Error::InvalidNonceLength { .. })
        ));
    }
}

//! containerd stream processor: the payload types and the decrypt logic of
//! `imgcrypt-decoder`, a drop-in for imgcrypt's `ctd-decoder`. The process around it (command
//! line, file descriptor 3, environment, exit code) is `imgcrypt_cli::decoder`; this module does
//! no process I/O of its own, it works on the bytes and streams it is given ([`run`]).
//!
//! containerd runs a stream processor once per encrypted layer it unpacks ([`containerd`'s
//! processor API], `diff/stream_unix.go`):
//!
//! * **stdin** is the encrypted layer blob, **stdout** must be the decrypted blob in the
//!   processor's `returns` media type;
//! * **fd 3** carries the *payload*: a protobuf `google.protobuf.Any` whose `type_url` is
//!   [`PAYLOAD_TYPE_URL`] and whose `value` is JSON
//!   `{"DecryptConfig":{"Parameters":{…}},"Descriptor":{…}}` — the layer descriptor with the
//!   wrapped keys in its annotations, and the decrypt parameters of the pull (Go's
//!   `map[string][][]byte`, so each byte string is base64);
//! * the environment holds [`MEDIA_TYPE_ENV`], the input media type;
//! * on failure the processor exits non-zero and containerd shows its **stderr** in the pull
//!   error.
//!
//! What this module adds on top of the protocol:
//!
//! * keys come from the payload (`privkeys` with `privkeys-passwords` for `jwe` and `pkcs7`,
//!   `x509s` accepted, `gpg-privatekeys` with `gpg-privatekeys-passwords` for `pgp`) and from the
//!   `--decryption-keys-path` directory (private keys, GPG secret keyrings binary or armored),
//!   read with the runtimes' strict semantics
//!   ([`crate::keys::read_key_dir`]: a symbolic link or a file the runtime cannot use fails
//!   the layer, naming the file); a missing directory counts as empty;
//! * **unauthenticated data never overrides authenticated data**: the nonce comes from the
//!   wrapped private options (a different one in `pubopts` is refused); exactly the
//!   descriptor's size is read from stdin and checked against its digest; the media type
//!   containerd passes is required and must match the descriptor;
//! * **costs are bounded**: at most [`crate::keywrap::MAX_KEY_ENTRIES`] wrapped-key entries per
//!   annotation, [`crate::jwe::MAX_RECIPIENTS`] recipients per JWE *and per layer*, so one layer
//!   costs at most that many private-key operations per key; failures are aggregated into one
//!   short line;
//! * **nothing unauthenticated reaches containerd** by default ([`OutputMode::Spool`]): the
//!   plaintext is decrypted into an unnamed temporary file (`O_TMPFILE`), the HMAC is checked
//!   at the end of the input, and only then is the file copied to stdout. A tampered layer
//!   produces no output at all and a non-zero exit. [`OutputMode::Stream`] is Go's behaviour
//!   (everything but the last 10 KiB released before the MAC is known), for nodes without
//!   scratch space; it still exits non-zero on a bad MAC, which fails containerd's unpack.
//!   Memory stays bounded either way (a few 256 KiB buffers, whatever the layer size);
//! * HMAC and CTR run on two threads ([`crate::cipher::parallel`]), so on a node with two free
//!   cores SHA-256 alone bounds a layer's decryption;
//! * every failure is one line on stderr saying what is wrong and what to do, quoting no
//!   secret: values of the payload are named by their field, never echoed.
//!
//! The protobuf envelope is decoded by hand ([`decode_any`]): it is two length-delimited
//! fields.
//!
//! [`containerd`'s processor API]: https://github.com/containerd/containerd/blob/main/docs/stream_processors.md

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::Deserializer;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use crate::cipher::{ExpectedMac, LayerKey, Nonce};
use crate::jwe::JweUnwrapper;
use crate::keyprovider::KeyProviderConfig;
use crate::keys::{read_key_dir, KeyError, PrivateKey};
use crate::keywrap::{schemes_present, AsyncKeyUnwrapper, Attempt, KeyUnwrapper, UnwrapError};
use crate::mediatype::{is_encrypted, KEYS_ANNOTATION_PREFIX, PUBOPTS_ANNOTATION};
use crate::options::{decode_b64, encode_b64};
#[cfg(feature = "pgp")]
use crate::pgp::{PgpSecretKey, PgpUnwrapper};
use crate::pkcs7::{Certificate, Pkcs7Unwrapper};
use crate::Error;

/// The `type_url` of the payload imgcrypt registers (`typeurl.Register(&Payload{}, …)`).
pub const PAYLOAD_TYPE_URL: &str = "io.containerd.ocicrypt.v1.Payload";
/// The environment variable in which containerd passes the input media type.
pub const MEDIA_TYPE_ENV: &str = "STREAM_PROCESSOR_MEDIATYPE";
/// The environment variable naming the ocicrypt key-provider configuration file.
pub const KEYPROVIDER_CONFIG_ENV: &str = "OCICRYPT_KEYPROVIDER_CONFIG";
/// Largest payload accepted (a descriptor and a few keys are a few KiB).
pub const MAX_PAYLOAD_LEN: u64 = 16 << 20;
/// Bytes withheld until the MAC is verified in [`OutputMode::Stream`] (Go's `DelayedReader`).
pub const STREAM_HOLD_BACK: usize = 10 * 1024;
/// The stream processor IDs to which containerd's CRI plugin (through imgcrypt's
/// `PayloadToolIDs`) hands a payload; a processor registered under any other ID gets none.
pub const PAYLOAD_PROCESSOR_IDS: [&str; 2] = [
    "io.containerd.ocicrypt.decoder.v1.tar",
    "io.containerd.ocicrypt.decoder.v1.tar.gzip",
];
/// The default key directory of containerd (`docs/cri/decryption.md`).
pub const DEFAULT_KEYS_PATH: &str = "/etc/containerd/ocicrypt/keys";

/// Capacity of the hold-back buffer beyond [`STREAM_HOLD_BACK`] (one cipher chunk).
const BUF_LEN: usize = crate::cipher::parallel::CHUNK;

/// Why the decoder failed. Every message is one line that names the layer or the file
/// involved and says what to do; none contains key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecoderError {
    /// No payload on fd 3.
    #[error("no decryption payload on file descriptor 3 ({reason}): containerd passes the layer's wrapped keys only to stream processors registered under the IDs \"io.containerd.ocicrypt.decoder.v1.tar\" or \"io.containerd.ocicrypt.decoder.v1.tar.gzip\", and only on pulls that ask for decryption (CRI with image_decryption.key_model = \"node\", ctr-enc, nerdctl); check the stream_processors section of containerd's config.toml")]
    NoPayload {
        /// What happened when reading fd 3.
        reason: String,
    },
    /// The payload is not a protobuf `Any`, or is too large.
    #[error("malformed decryption payload on file descriptor 3: {reason} (expected a protobuf google.protobuf.Any of type io.containerd.ocicrypt.v1.Payload)")]
    MalformedPayload {
        /// What is wrong.
        reason: String,
    },
    /// The payload is an `Any` of another type.
    #[error("the payload on file descriptor 3 has type {type_url:?}, expected \"io.containerd.ocicrypt.v1.Payload\": another tool's payload is configured for this stream processor ID")]
    WrongPayloadType {
        /// The type URL found.
        type_url: String,
    },
    /// The payload JSON does not parse.
    #[error("malformed io.containerd.ocicrypt.v1.Payload JSON on file descriptor 3: {reason}")]
    PayloadJson {
        /// What is wrong.
        reason: String,
    },
    /// The layer is not an encrypted one.
    #[error("layer {digest} has media type {media_type:?}, which is not encrypted: route only +encrypted media types to this stream processor (its `accepts` list in containerd's config.toml)")]
    NotEncrypted {
        /// Layer digest.
        digest: String,
        /// Its media type.
        media_type: String,
    },
    /// containerd's media type variable is missing.
    #[error("{MEDIA_TYPE_ENV} is not set or empty: containerd sets it for every stream processor, and the payload's descriptor must match it; run imgcrypt-decoder only as a containerd stream processor")]
    MissingMediaType,
    /// The descriptor gives no usable size.
    #[error("the payload's descriptor of layer {digest} gives no usable size ({size}): the decoder reads exactly that many bytes from stdin")]
    NoSize {
        /// Layer digest.
        digest: String,
        /// The size found.
        size: i64,
    },
    /// The descriptor's digest is not one the decoder can check.
    #[error("the payload's descriptor gives the digest {found:?}, which is not sha256:<64 hex> or sha512:<128 hex>: stdin cannot be checked against it")]
    BadDigest {
        /// The digest, sanitized.
        found: String,
    },
    /// stdin ended before the descriptor's size.
    #[error("stdin ended after {got} of the {expected} bytes the descriptor of layer {digest} gives: the blob is truncated; {consequence}")]
    ShortInput {
        /// Layer digest.
        digest: String,
        /// The descriptor's size.
        expected: u64,
        /// Bytes read.
        got: u64,
        /// What happened to the output.
        consequence: &'static str,
    },
    /// The bytes read do not have the descriptor's digest.
    #[error("the {bytes} bytes read from stdin have digest {actual}, not the descriptor's {digest}: containerd passed another blob than the payload describes; {consequence}")]
    DigestMismatch {
        /// The descriptor's digest.
        digest: String,
        /// The digest of what was read.
        actual: String,
        /// Bytes read.
        bytes: u64,
        /// What happened to the output.
        consequence: &'static str,
    },
    /// containerd's media type and the payload's descriptor disagree.
    #[error("containerd passes a {env:?} stream but the payload describes layer {digest} of type {payload:?}: the payload belongs to another layer")]
    MediaTypeMismatch {
        /// `STREAM_PROCESSOR_MEDIATYPE`.
        env: String,
        /// The descriptor's media type.
        payload: String,
        /// Layer digest.
        digest: String,
    },
    /// The descriptor lacks the ocicrypt annotations.
    #[error("layer {digest} ({media_type}) carries no {missing} annotation: it was not encrypted with ocicrypt, or the payload describes another layer")]
    NotOcicrypt {
        /// Layer digest.
        digest: String,
        /// Its media type.
        media_type: String,
        /// The missing annotation.
        missing: String,
    },
    /// A private key passed in the payload is unusable.
    #[error("decryption key privkeys[{index}] of the pull request: {source}")]
    PayloadKey {
        /// Index in `privkeys`.
        index: usize,
        /// Why.
        #[source]
        source: KeyError,
    },
    /// A key or certificate passed in another parameter of the payload (`x509s`,
    /// `gpg-privatekeys`) is unusable.
    #[error("{param}[{index}] of the pull request: {source}")]
    PayloadParameter {
        /// The parameter (`x509s`, `gpg-privatekeys`).
        param: &'static str,
        /// Index in it.
        index: usize,
        /// Why.
        #[source]
        source: KeyError,
    },
    /// The key-provider configuration cannot be used.
    #[error("key providers ({KEYPROVIDER_CONFIG_ENV}): {source}")]
    KeyProviders {
        /// Why.
        #[source]
        source: crate::keyprovider::ProviderError,
    },
    /// The key directory cannot be used (as the runtimes, any bad file fails the layer).
    #[error("decryption key directory: {source}")]
    KeyDir {
        /// Why (names the file and what to do).
        #[source]
        source: KeyError,
    },
    /// No key at all for the layer's schemes.
    #[error("no private key to decrypt layer {digest}: it is encrypted for {schemes} and {looked_in}; put the private key of one of the image's recipients into the key directory (keysync-agent does this from a Kubernetes Secret)")]
    NoKey {
        /// Layer digest.
        digest: String,
        /// Schemes present on the layer, comma-separated.
        schemes: String,
        /// Where keys were looked for.
        looked_in: String,
    },
    /// Keys were tried and none unwrapped the layer key.
    #[error("none of the {count} private keys tried can decrypt layer {digest} (tried: {tried}; {attempts}): the layer is encrypted for other recipients; add the private key of one of them to the key directory")]
    WrongKeys {
        /// Layer digest.
        digest: String,
        /// How many keys.
        count: usize,
        /// Their sources.
        tried: String,
        /// What each unwrap attempt said.
        attempts: String,
    },
    /// The unwrapped layer options are unusable.
    #[error("layer {digest}: {source}")]
    Options {
        /// Layer digest.
        digest: String,
        /// Why.
        #[source]
        source: Error,
    },
    /// The HMAC does not match.
    #[error("layer {digest} failed verification (HMAC mismatch after {bytes} bytes): the encrypted blob was tampered with or damaged; {consequence}")]
    Tampered {
        /// Layer digest.
        digest: String,
        /// Ciphertext bytes read.
        bytes: u64,
        /// What happened to the output.
        consequence: &'static str,
    },
    /// An I/O error.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

impl DecoderError {
    fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> DecoderError {
        let context = context.into();
        move |source| DecoderError::Io { context, source }
    }

    /// The message as one line (what containerd shows the user).
    pub fn one_line(&self) -> String {
        let s = crate::keywrap::error_chain(self);
        s.split_whitespace().collect::<Vec<_>>().join(" ")
    }
}

// ---------------------------------------------------------------------------------------------
// protobuf google.protobuf.Any

/// Decodes a protobuf `google.protobuf.Any` (`string type_url = 1; bytes value = 2;`) into
/// `(type_url, value)`. Unknown fields are skipped; for repeated scalar fields the last one
/// wins, as protobuf says.
///
/// # Errors
/// [`DecoderError::MalformedPayload`] for truncated or invalid wire data.
pub fn decode_any(mut buf: &[u8]) -> Result<(String, Vec<u8>), DecoderError> {
    let bad = |reason: String| DecoderError::MalformedPayload { reason };
    let mut type_url = None;
    let mut value = Vec::new();
    while !buf.is_empty() {
        let key = read_varint(&mut buf).ok_or_else(|| bad("truncated field key".into()))?;
        let field = key >> 3;
        let wire = key & 7;
        if field == 0 {
            return Err(bad("field number 0".into()));
        }
        match wire {
            0 => {
                read_varint(&mut buf).ok_or_else(|| bad(format!("truncated varint in field {field}")))?;
            }
            1 | 5 => {
                let n = if wire == 1 { 8 } else { 4 };
                if buf.len() < n {
                    return Err(bad(format!("truncated fixed-width field {field}")));
                }
                buf = &buf[n..];
            }
            2 => {
                let len =
                    read_varint(&mut buf).ok_or_else(|| bad(format!("truncated length of field {field}")))?;
                let len = usize::try_from(len)
                    .ok()
                    .filter(|&l| l <= buf.len())
                    .ok_or_else(|| bad(format!("field {field} claims {len} bytes, {} left", buf.len())))?;
                let (data, rest) = buf.split_at(len);
                buf = rest;
                match field {
                    1 => {
                        type_url = Some(
                            String::from_utf8(data.to_vec())
                                .map_err(|_| bad("type_url is not UTF-8".into()))?,
                        )
                    }
                    2 => value = data.to_vec(),
                    _ => {}
                }
            }
            other => return Err(bad(format!("unsupported wire type {other} in field {field}"))),
        }
    }
    match type_url {
        Some(t) if !t.is_empty() => Ok((t, value)),
        _ => Err(bad(if value.is_empty() {
            "empty message".into()
        } else {
            "no type_url".into()
        })),
    }
}

/// Encodes a protobuf `google.protobuf.Any`, as containerd does for the payload.
pub fn encode_any(type_url: &str, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(type_url.len() + value.len() + 12);
    out.push(0x0a);
    write_varint(&mut out, type_url.len() as u64);
    out.extend_from_slice(type_url.as_bytes());
    if !value.is_empty() {
        out.push(0x12);
        write_varint(&mut out, value.len() as u64);
        out.extend_from_slice(value);
    }
    out
}

fn read_varint(buf: &mut &[u8]) -> Option<u64> {
    let mut v: u64 = 0;
    for i in 0..10 {
        let (&b, rest) = buf.split_first()?;
        *buf = rest;
        if i == 9 && b > 1 {
            return None;
        }
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

fn write_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

// ---------------------------------------------------------------------------------------------
// Payload JSON

/// imgcrypt's `Payload`: the decrypt configuration of the pull and the layer descriptor.
/// Parsed with [`Payload::from_json`] (no `Deserialize`: serde's messages quote values).
#[derive(Debug, Default, Serialize)]
pub struct Payload {
    /// Keys and parameters sent with the pull (often empty: the node key model uses the key
    /// directory).
    #[serde(rename = "DecryptConfig")]
    pub decrypt_config: DecryptConfig,
    /// The encrypted layer's descriptor, with the wrapped keys in its annotations.
    #[serde(rename = "Descriptor")]
    pub descriptor: Descriptor,
}

impl Payload {
    /// Parses the payload bytes read from fd 3.
    ///
    /// # Errors
    /// [`DecoderError::MalformedPayload`], [`DecoderError::WrongPayloadType`],
    /// [`DecoderError::PayloadJson`].
    pub fn from_any_bytes(bytes: &[u8]) -> Result<Payload, DecoderError> {
        let (type_url, value) = decode_any(bytes)?;
        // typeurl accepts the URL with or without a leading "/"-separated prefix only when it
        // is registered that way; imgcrypt registers the bare name.
        if type_url != PAYLOAD_TYPE_URL {
            return Err(DecoderError::WrongPayloadType { type_url });
        }
        let value = Zeroizing::new(value);
        Payload::from_json(&value)
    }

    /// Parses the payload JSON (the `value` of the `Any`).
    ///
    /// The JSON is read into a tree first and checked by hand, so that a value of the wrong
    /// type is named by its field and never quoted: serde's own messages quote the value, and a
    /// `"privkeys"` given as a string instead of a list would put the key on stderr. Every
    /// string of the tree is zeroized once the payload is built.
    ///
    /// # Errors
    /// [`DecoderError::PayloadJson`], naming the field.
    pub fn from_json(json: &[u8]) -> Result<Payload, DecoderError> {
        let bad = |reason: String| DecoderError::PayloadJson { reason };
        // serde_json's syntax errors give a line and column, never the input.
        let tree =
            WipedJson(serde_json::from_slice::<serde_json::Value>(json).map_err(|e| bad(syntax_error(&e)))?);
        let Some(top) = tree.0.as_object() else {
            return Err(bad(format!(
                "the payload is {}, not an object",
                json_kind(&tree.0)
            )));
        };
        let decrypt_config = match top.get("DecryptConfig") {
            None | Some(serde_json::Value::Null) => DecryptConfig::default(),
            Some(serde_json::Value::Object(dc)) => DecryptConfig {
                parameters: parse_parameters(dc.get("Parameters")).map_err(bad)?,
            },
            Some(other) => {
                return Err(bad(format!(
                    "DecryptConfig is {}, not an object",
                    json_kind(other)
                )))
            }
        };
        let descriptor = match top.get("Descriptor") {
            None | Some(serde_json::Value::Null) => Descriptor::default(),
            Some(serde_json::Value::Object(d)) => parse_descriptor(d).map_err(bad)?,
            Some(other) => return Err(bad(format!("Descriptor is {}, not an object", json_kind(other)))),
        };
        Ok(Payload {
            decrypt_config,
            descriptor,
        })
    }

    /// The payload as containerd writes it to fd 3 (for tests and tools).
    pub fn to_any_bytes(&self) -> Vec<u8> {
        let json = Zeroizing::new(serde_json::to_vec(self).expect("payload serializes"));
        encode_any(PAYLOAD_TYPE_URL, &json)
    }
}

/// ocicrypt's `DecryptConfig`: `Parameters` is Go's `map[string][][]byte` (each byte string
/// base64 in JSON). Zeroized on drop; `Debug` shows only the parameter names.
#[derive(Default, Serialize)]
pub struct DecryptConfig {
    /// `privkeys`, `privkeys-passwords`, `x509s`, `gpg-privatekeys`, …
    #[serde(rename = "Parameters", serialize_with = "go_bytes_map::serialize")]
    pub parameters: BTreeMap<String, Vec<Vec<u8>>>,
}

impl fmt::Debug for DecryptConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DecryptConfig")
            .field("parameters", &self.parameters.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Drop for DecryptConfig {
    fn drop(&mut self) {
        for v in self.parameters.values_mut() {
            for b in v.iter_mut() {
                b.zeroize();
            }
        }
    }
}

/// The part of an OCI descriptor the decoder uses.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Descriptor {
    /// Media type (`…+encrypted`).
    #[serde(rename = "mediaType", default, deserialize_with = "null_default")]
    pub media_type: String,
    /// Digest of the encrypted blob.
    #[serde(default, deserialize_with = "null_default")]
    pub digest: String,
    /// Size of the encrypted blob.
    #[serde(default)]
    pub size: i64,
    /// Annotations, with `org.opencontainers.image.enc.*`.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub annotations: BTreeMap<String, String>,
}

/// A JSON tree whose strings are zeroized on drop (it may hold keys and passwords).
struct WipedJson(serde_json::Value);

impl Drop for WipedJson {
    fn drop(&mut self) {
        fn wipe(v: &mut serde_json::Value) {
            match v {
                serde_json::Value::String(s) => s.zeroize(),
                serde_json::Value::Array(a) => a.iter_mut().for_each(wipe),
                serde_json::Value::Object(o) => o.values_mut().for_each(wipe),
                _ => {}
            }
        }
        wipe(&mut self.0);
    }
}

/// serde_json's message without anything quoted from the input: the category and position.
fn syntax_error(e: &serde_json::Error) -> String {
    let what = match e.classify() {
        serde_json::error::Category::Eof => "the JSON ends early",
        serde_json::error::Category::Syntax => "invalid JSON",
        serde_json::error::Category::Io => "unreadable JSON",
        serde_json::error::Category::Data => "unexpected JSON data",
    };
    format!("{what} at line {} column {}", e.line(), e.column())
}

/// What a JSON value is, for messages that must not quote it.
fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}

/// `DecryptConfig.Parameters`: Go's `map[string][][]byte`, each byte string base64.
fn parse_parameters(v: Option<&serde_json::Value>) -> Result<BTreeMap<String, Vec<Vec<u8>>>, String> {
    use serde_json::Value;
    let mut out = BTreeMap::new();
    let map = match v {
        None | Some(Value::Null) => return Ok(out),
        Some(Value::Object(m)) => m,
        Some(other) => {
            return Err(format!(
                "DecryptConfig.Parameters is {}, not an object of lists of base64 strings",
                json_kind(other)
            ))
        }
    };
    for (k, list) in map {
        let name = parameter_name(k);
        let items = match list {
            Value::Null => {
                out.insert(k.clone(), Vec::new());
                continue;
            }
            Value::Array(items) => items,
            other => {
                return Err(format!(
                    "DecryptConfig.Parameters[{name:?}] is {}, not a list of base64 strings",
                    json_kind(other)
                ))
            }
        };
        let mut vals = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            vals.push(match item {
                Value::Null => Vec::new(),
                // The decode error names a character and its offset: not repeated.
                Value::String(s) => decode_b64(s)
                    .map_err(|_| format!("DecryptConfig.Parameters[{name:?}][{i}] is not base64"))?,
                other => {
                    return Err(format!(
                        "DecryptConfig.Parameters[{name:?}][{i}] is {}, not a base64 string",
                        json_kind(other)
                    ))
                }
            });
        }
        out.insert(k.clone(), vals);
    }
    Ok(out)
}

/// A `DecryptConfig` parameter name, safe to quote: one of ocicrypt's, else a sanitized token.
fn parameter_name(k: &str) -> std::borrow::Cow<'static, str> {
    const KNOWN: [&str; 9] = [
        "privkeys",
        "privkeys-passwords",
        "x509s",
        "gpg-privatekeys",
        "gpg-privatekeys-passwords",
        "gpg-pubkeyringfile",
        "pkcs11-config",
        "pkcs11-yamls",
        "pkcs11-pubkeys",
    ];
    match KNOWN.iter().find(|n| **n == k) {
        Some(n) => std::borrow::Cow::Borrowed(n),
        None => crate::redact::token(k),
    }
}

/// The descriptor's fields the decoder uses; values of the wrong type are named, not quoted.
fn parse_descriptor(d: &serde_json::Map<String, serde_json::Value>) -> Result<Descriptor, String> {
    use serde_json::Value;
    let string = |name: &str| -> Result<String, String> {
        match d.get(name) {
            None | Some(Value::Null) => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(format!("Descriptor.{name} is {}, not a string", json_kind(other))),
        }
    };
    let size = match d.get("size") {
        None | Some(Value::Null) => 0,
        Some(Value::Number(n)) => n
            .as_i64()
            .ok_or_else(|| "Descriptor.size is not an integer in range".to_owned())?,
        Some(other) => return Err(format!("Descriptor.size is {}, not a number", json_kind(other))),
    };
    let mut annotations = BTreeMap::new();
    match d.get("annotations") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            for (k, v) in m {
                match v {
                    Value::String(s) => {
                        annotations.insert(k.clone(), s.clone());
                    }
                    other => {
                        return Err(format!(
                            "Descriptor.annotations[{:?}] is {}, not a string",
                            crate::redact::token(k),
                            json_kind(other)
                        ))
                    }
                }
            }
        }
        Some(other) => {
            return Err(format!(
                "Descriptor.annotations is {}, not an object",
                json_kind(other)
            ))
        }
    }
    Ok(Descriptor {
        media_type: string("mediaType")?,
        digest: string("digest")?,
        size,
        annotations,
    })
}

fn null_default<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

mod go_bytes_map {
    use super::*;
    use serde::ser::{SerializeMap, Serializer};

    pub(super) fn serialize<S: Serializer>(
        m: &BTreeMap<String, Vec<Vec<u8>>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(m.len()))?;
        for (k, v) in m {
            let list: Vec<Zeroizing<String>> = v.iter().map(|b| Zeroizing::new(encode_b64(b))).collect();
            let refs: Vec<&str> = list.iter().map(|s| s.as_str()).collect();
            map.serialize_entry(k, &refs)?;
        }
        map.end()
    }
}

// ---------------------------------------------------------------------------------------------
// Command line

/// How decrypted bytes reach stdout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputMode {
    /// Decrypt into an unnamed temporary file in `dir`, verify the MAC, then copy to stdout:
    /// containerd never sees unauthenticated bytes. Needs scratch space as large as the layer.
    Spool {
        /// Directory of the temporary file (`--spool-dir`); default [`default_spool_dir`].
        dir: PathBuf,
    },
    /// Go `ctd-decoder`'s behaviour: release everything but the last [`STREAM_HOLD_BACK`]
    /// bytes before the MAC is known; exit non-zero if it then fails.
    Stream,
}

/// The decoder's options (`ctd-decoder`'s flags plus the output mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecoderOptions {
    /// `--decryption-keys-path DIR`.
    pub keys_path: Option<PathBuf>,
    /// `--spool-dir DIR` / `--stream`.
    pub output: OutputMode,
}

// ---------------------------------------------------------------------------------------------
// Keys

/// The keys gathered for one layer, with where they came from.
#[derive(Debug, Default)]
pub struct KeySet {
    /// Private keys (JWE scheme, and PKCS#7 for RSA keys).
    pub keys: Vec<PrivateKey>,
    /// PKCS#11 key files (`pkcs11-yamls` and YAMLs in the key directory).
    pub pkcs11: Vec<crate::pkcs11::Pkcs11KeyFile>,
    /// The module policy: the `pkcs11-config` parameter, else the user's `ocicrypt.conf` (as
    /// Go's `SortDecryptionKeys`), else none (no module may be loaded).
    pub pkcs11_config: crate::pkcs11::Pkcs11Config,
    /// Certificates (`x509s`): not needed for PKCS#7 (the private key alone opens a layer), but
    /// accepted as Go's `ctr-enc` sends them, and used to try the matching RecipientInfo first.
    pub certificates: Vec<Certificate>,
    /// OpenPGP secret keys (`gpg-privatekeys`, and GPG secret keyrings in the key directory).
    #[cfg(feature = "pgp")]
    pub pgp: Vec<PgpSecretKey>,
    /// What was looked at, for error messages: "the key directory /x (2 keys)", …
    pub looked_in: Vec<String>,
}

/// `"no X"`, `"1 X"`, `"n Xs"`.
fn count_of(n: usize, what: &str) -> String {
    match n {
        0 => format!("no {what}"),
        1 => format!("1 {what}"),
        n => format!("{n} {what}s"),
    }
}

impl KeySet {
    /// Gathers the keys of the payload (`privkeys` with `privkeys-passwords`, `x509s`,
    /// `gpg-privatekeys` with `gpg-privatekeys-passwords`: Go's `DecryptConfig` parameters, each
    /// a list of byte strings) and of the key directory. The directory is read strictly, like
    /// the runtimes: a symbolic link or a file a runtime cannot use fails with
    /// [`DecoderError::KeyDir`] naming it. A missing directory counts as empty (CRI-O's rule;
    /// Go `ctd-decoder` fails on it).
    ///
    /// # Errors
    /// [`DecoderError::PayloadKey`], [`DecoderError::PayloadParameter`],
    /// [`DecoderError::KeyDir`].
    pub fn gather(config: &DecryptConfig, keys_path: Option<&Path>) -> Result<KeySet, DecoderError> {
        let mut set = KeySet::default();
        let empty = Vec::new();
        let param = |name: &str| config.parameters.get(name).unwrap_or(&empty);
        let privs = param("privkeys");
        let pwds = param("privkeys-passwords");
        for (index, bytes) in privs.iter().enumerate() {
            let pwd = pwds.get(index).filter(|p| !p.is_empty()).map(Vec::as_slice);
            let key = PrivateKey::from_bytes(bytes, pwd, &format!("privkeys[{index}]"))
                .map_err(|source| DecoderError::PayloadKey { index, source })?;
            set.keys.push(key);
        }
        for (index, bytes) in param("x509s").iter().enumerate() {
            let cert = Certificate::from_bytes(bytes, &format!("x509s[{index}]")).map_err(|source| {
                DecoderError::PayloadParameter {
                    param: "x509s",
                    index,
                    source,
                }
            })?;
            set.certificates.push(cert);
        }
        let gpg = param("gpg-privatekeys");
        #[cfg(feature = "pgp")]
        {
            let gpg_pwds = param("gpg-privatekeys-passwords");
            for (index, bytes) in gpg.iter().enumerate() {
                let pwd = gpg_pwds.get(index).filter(|p| !p.is_empty()).map(Vec::as_slice);
                let bad = |source| DecoderError::PayloadParameter {
                    param: "gpg-privatekeys",
                    index,
                    source,
                };
                let name = format!("gpg-privatekeys[{index}]");
                let keys = PgpSecretKey::from_bytes_many(bytes, pwd, &name).map_err(bad)?;
                if pwd.is_none() && keys.iter().any(PgpSecretKey::is_protected) {
                    return Err(bad(KeyError::Unsupported {
                        source_name: name,
                        found:
                            "a passphrase-protected secret key, and no gpg-privatekeys-passwords entry for it"
                                .into(),
                    }));
                }
                set.pgp.extend(keys);
            }
        }
        let mut carried = vec![count_of(privs.len(), "private key")];
        if !gpg.is_empty() {
            carried.push(count_of(gpg.len(), "GPG secret keyring"));
        }
        set.looked_in
            .push(format!("the pull request carried {}", carried.join(" and ")));
        set.gather_pkcs11(config);
        if let Some(dir) = keys_path {
            match read_key_dir(dir) {
                Ok(kd) => {
                    let n = kd.keys.len();
                    let yamls = set.pkcs11_from_dir(&kd);
                    let others = kd.ignored.len() - yamls;
                    let rings = kd.gpg_keyrings.len();
                    #[cfg(feature = "pgp")]
                    for ring in &kd.gpg_keyrings {
                        set.pgp.extend(dir_keyring(ring)?);
                    }
                    set.keys.extend(kd.into_private_keys());
                    set.looked_in.push(format!(
                        "the key directory {} holds {}{}{}",
                        dir.display(),
                        count_of(n, "private key"),
                        if rings > 0 {
                            format!(" and {}", count_of(rings, "GPG secret keyring"))
                        } else {
                            String::new()
                        },
                        if others > 0 {
                            format!(" (and {others} certificates, public keyrings or other files unused by this decoder)")
                        } else {
                            String::new()
                        }
                    ));
                }
                Err(e) if e.is_not_found() => {
                    set.looked_in
                        .push(format!("the key directory {} does not exist", dir.display()));
                }
                Err(source) => return Err(DecoderError::KeyDir { source }),
            }
        } else {
            set.looked_in
                .push("no key directory was given (--decryption-keys-path)".to_owned());
        }
        Ok(set)
    }

    /// The `pkcs11-yamls` and `pkcs11-config` parameters. A YAML that does not parse is
    /// skipped (as Go does at unwrap time); the policy defaults to the user's ocicrypt.conf.
    fn gather_pkcs11(&mut self, config: &DecryptConfig) {
        for (i, y) in config
            .parameters
            .get("pkcs11-yamls")
            .into_iter()
            .flatten()
            .enumerate()
        {
            if let Ok(k) = crate::pkcs11::Pkcs11KeyFile::from_bytes(y, &format!("pkcs11-yamls[{i}]")) {
                self.pkcs11.push(k);
            }
        }
        self.pkcs11_config = match config.parameters.get("pkcs11-config").and_then(|v| v.first()) {
            Some(y) => crate::pkcs11::Pkcs11Config::from_yaml(y, "pkcs11-config").unwrap_or_default(),
            None => crate::pkcs11::Pkcs11Config::from_env()
                .map(|(c, _)| c)
                .unwrap_or_default(),
        };
    }

    /// Takes the PKCS#11 key YAMLs of a key directory; returns how many.
    fn pkcs11_from_dir(&mut self, kd: &crate::keys::KeyDir) -> usize {
        let before = self.pkcs11.len();
        for f in &kd.ignored {
            let Ok(bytes) = crate::fsutil::read_regular(&f.path, crate::keys::MAX_KEY_FILE_SIZE) else {
                continue;
            };
            let bytes = Zeroizing::new(bytes);
            if crate::pkcs11::Pkcs11KeyFile::is_key_file(&bytes) {
                if let Ok(k) = crate::pkcs11::Pkcs11KeyFile::from_bytes(&bytes, &f.path.display().to_string())
                {
                    self.pkcs11.push(k);
                }
            }
        }
        self.pkcs11.len() - before
    }

    /// Where each key came from, in the order they are tried.
    fn sources(&self) -> Vec<String> {
        let mut out: Vec<String> = self.keys.iter().map(|k| k.source_name().to_owned()).collect();
        #[cfg(feature = "pgp")]
        out.extend(self.pgp.iter().map(|k| k.source_name().to_owned()));
        out.extend(self.pkcs11.iter().map(crate::pkcs11::Pkcs11KeyFile::describe));
        out.dedup();
        out
    }
}

/// The secret keys of a GPG keyring of the key directory; a damaged or passphrase-protected
/// one fails like any file the runtime cannot use.
#[cfg(feature = "pgp")]
fn dir_keyring(ring: &crate::keys::KeyDirFile) -> Result<Vec<PgpSecretKey>, DecoderError> {
    let unusable = |reason: String| DecoderError::KeyDir {
        source: KeyError::UnusableKeyFile {
            path: ring.path.clone(),
            reason,
        },
    };
    let keys =
        PgpSecretKey::from_bytes_many(&ring.bytes, None, &ring.path.display().to_string()).map_err(|e| {
            match e {
                KeyError::Malformed { reason, .. } => {
                    unusable(format!("a damaged GPG secret keyring ({reason})"))
                }
                KeyError::Unsupported { found, .. } => unusable(format!("a GPG keyring with {found}")),
                other => unusable(other.to_string()),
            }
        })?;
    if keys.iter().any(PgpSecretKey::is_protected) {
        return Err(unusable(
            "a passphrase-protected GPG secret key: the runtime has no passphrase; export it unprotected (gpg --passwd to an empty passphrase, then gpg --export-secret-keys)".into(),
        ));
    }
    Ok(keys)
}

/// A scheme's unwrapper with a budget of recipients over all the entries of a layer, so that a
/// layer costs at most that many private-key operations per key whatever its annotations say
/// (the JWE unwrapper has its own, [`JweUnwrapper::with_recipient_budget`]).
#[derive(Debug)]
struct Budgeted<U> {
    inner: U,
    /// Recipients a blob names (`None` when it does not parse: the inner unwrapper says why).
    count: fn(&[u8]) -> Option<usize>,
    left: std::sync::atomic::AtomicUsize,
}

impl<U: KeyUnwrapper> Budgeted<U> {
    fn new(inner: U, count: fn(&[u8]) -> Option<usize>) -> Self {
        Budgeted {
            inner,
            count,
            left: std::sync::atomic::AtomicUsize::new(crate::jwe::MAX_RECIPIENTS),
        }
    }
}

impl<U: KeyUnwrapper> KeyUnwrapper for Budgeted<U> {
    fn scheme(&self) -> &str {
        self.inner.scheme()
    }

    fn unwrap_key(&self, blob: &[u8]) -> Result<Zeroizing<Vec<u8>>, UnwrapError> {
        use std::sync::atomic::Ordering;
        if let Some(n) = (self.count)(blob) {
            let took = self
                .left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| left.checked_sub(n));
            if took.is_err() {
                return Err(UnwrapError::Malformed {
                    scheme: self.inner.scheme().to_owned(),
                    reason: format!(
                        "the layer's entries name more than {} recipients together; not tried",
                        crate::jwe::MAX_RECIPIENTS
                    ),
                });
            }
        }
        self.inner.unwrap_key(blob)
    }
}

// ---------------------------------------------------------------------------------------------
// Decryption

/// What a successful run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Bytes written to stdout.
    pub bytes: u64,
    /// The layer digest.
    pub digest: String,
}

/// The decoder: a payload, its keys and options; [`Decoder::decrypt`] does the streaming.
#[derive(Debug)]
pub struct Decoder {
    payload: Payload,
    /// The descriptor's size: exactly this many bytes are read from stdin.
    size: u64,
    /// The descriptor's digest, checked against what was read.
    check: Option<DigestCheck>,
    keys: KeySet,
    extra: Vec<Arc<dyn AsyncKeyUnwrapper>>,
    output: OutputMode,
}

impl Decoder {
    /// Checks the payload against containerd's media type and gathers the keys.
    ///
    /// # Errors
    /// [`DecoderError::NotEncrypted`], [`DecoderError::MissingMediaType`],
    /// [`DecoderError::MediaTypeMismatch`], [`DecoderError::NotOcicrypt`],
    /// [`DecoderError::NoSize`], [`DecoderError::BadDigest`], and the errors of
    /// [`KeySet::gather`].
    pub fn new(
        payload: Payload,
        env_media_type: Option<&str>,
        options: &DecoderOptions,
    ) -> Result<Self, DecoderError> {
        let d = &payload.descriptor;
        let digest = if d.digest.is_empty() {
            "(no digest)".to_owned()
        } else {
            d.digest.clone()
        };
        if !is_encrypted(&d.media_type) {
            return Err(DecoderError::NotEncrypted {
                digest,
                media_type: d.media_type.clone(),
            });
        }
        let env = env_media_type
            .filter(|e| !e.is_empty())
            .ok_or(DecoderError::MissingMediaType)?;
        if env != d.media_type {
            return Err(DecoderError::MediaTypeMismatch {
                env: env.to_owned(),
                payload: d.media_type.clone(),
                digest,
            });
        }
        let missing = if !d.annotations.contains_key(PUBOPTS_ANNOTATION) {
            Some(PUBOPTS_ANNOTATION.to_owned())
        } else if schemes_present(&d.annotations).is_empty() {
            Some(format!("{KEYS_ANNOTATION_PREFIX}*"))
        } else {
            None
        };
        if let Some(missing) = missing {
            return Err(DecoderError::NotOcicrypt {
                digest,
                media_type: d.media_type.clone(),
                missing,
            });
        }
        let size = u64::try_from(d.size)
            .ok()
            .filter(|&n| n > 0)
            .ok_or(DecoderError::NoSize { digest, size: d.size })?;
        let check = DigestCheck::parse(&d.digest)?;
        let keys = KeySet::gather(&payload.decrypt_config, options.keys_path.as_deref())?;
        Ok(Self {
            payload,
            size,
            check,
            keys,
            extra: Vec::new(),
            output: options.output.clone(),
        })
    }

    /// Adds unwrappers for other schemes (key providers).
    pub fn with_unwrappers(mut self, extra: Vec<Arc<dyn AsyncKeyUnwrapper>>) -> Self {
        if !extra.is_empty() {
            let schemes: Vec<&str> = extra.iter().map(|u| u.scheme()).collect();
            self.keys.looked_in.push(format!(
                "the key providers configured are for {}",
                schemes.join(", ")
            ));
        }
        self.extra = extra;
        self
    }

    /// The layer digest.
    pub fn digest(&self) -> &str {
        &self.payload.descriptor.digest
    }

    /// Unwraps the layer key, decrypts `input` and writes the verified plaintext to `output`.
    ///
    /// # Errors
    /// [`DecoderError::NoKey`], [`DecoderError::WrongKeys`], [`DecoderError::Options`],
    /// [`DecoderError::Tampered`], [`DecoderError::ShortInput`],
    /// [`DecoderError::DigestMismatch`], [`DecoderError::Io`].
    pub fn decrypt<R: Read, W: Write + Send>(self, input: R, output: W) -> Result<Outcome, DecoderError> {
        let digest = self.payload.descriptor.digest.clone();
        let annotations = &self.payload.descriptor.annotations;
        let tried = self.keys.sources();
        let key_count = tried.len();
        let mut unwrappers: Vec<Arc<dyn AsyncKeyUnwrapper>> = Vec::new();
        // All the comma entries of the layer together may name at most as many recipients as
        // one JWE may, per scheme: the private-key operations a layer costs are bounded by that
        // number times the keys.
        #[cfg(feature = "pgp")]
        if !self.keys.pgp.is_empty() {
            let pgp = PgpUnwrapper::new(self.keys.pgp);
            unwrappers.push(Arc::new(Budgeted::new(pgp, |b| {
                crate::pgp::pkesk_key_ids(b).ok().map(|ids| ids.len())
            })));
        }
        if !self.keys.keys.is_empty() {
            let p7 = Pkcs7Unwrapper::new(self.keys.keys.iter().map(PrivateKey::share).collect())
                .with_certificates(self.keys.certificates);
            if p7.has_usable_keys() {
                unwrappers.push(Arc::new(Budgeted::new(p7, |b| {
                    crate::pkcs7::inspect(b).ok().map(|r| r.len())
                })));
            }
            unwrappers.insert(
                0,
                Arc::new(JweUnwrapper::new(self.keys.keys).with_recipient_budget(crate::jwe::MAX_RECIPIENTS)),
            );
        }
        #[cfg(feature = "pkcs11")]
        if !self.keys.pkcs11.is_empty() {
            unwrappers.push(Arc::new(crate::pkcs11::Pkcs11Unwrapper::new(
                self.keys.pkcs11,
                self.keys.pkcs11_config,
            )));
        }
        unwrappers.extend(self.extra);
        let unwrapped = futures::executor::block_on(crate::keywrap::unwrap_options(annotations, &unwrappers));
        let (private, public) = match unwrapped {
            Ok(o) => o,
            Err(Error::NoKeyForScheme { schemes }) => {
                return Err(DecoderError::NoKey {
                    digest,
                    schemes: schemes.join(", "),
                    looked_in: self.keys.looked_in.join(", "),
                })
            }
            Err(Error::Unwrap { attempts }) => {
                return Err(DecoderError::WrongKeys {
                    digest,
                    count: key_count,
                    tried: match tried.len() {
                        0 => "key providers only".into(),
                        n if n > MAX_TRIED_NAMED => format!(
                            "{} and {} more",
                            tried[..MAX_TRIED_NAMED].join(", "),
                            n - MAX_TRIED_NAMED
                        ),
                        _ => tried.join(", "),
                    },
                    attempts: summarize(&attempts),
                })
            }
            Err(source) => return Err(DecoderError::Options { digest, source }),
        };
        let opts_err = |source| DecoderError::Options {
            digest: digest.clone(),
            source,
        };
        let key = private.key().map_err(opts_err)?;
        let nonce = public.nonce(&private).map_err(opts_err)?;
        // Refuse a missing or malformed tag before reading any input.
        let mac = ExpectedMac::from_slice(&public.hmac).map_err(opts_err)?;
        drop(private);
        let layer = LayerParams {
            key: &key,
            nonce: &nonce,
            mac: &mac,
            digest: &digest,
            size: self.size,
            check: self.check.as_ref(),
        };
        let bytes = match &self.output {
            OutputMode::Spool { dir } => spool_then_copy(input, output, dir, &layer)?,
            OutputMode::Stream => stream_with_hold_back(input, output, &layer)?,
        };
        Ok(Outcome { bytes, digest })
    }
}

/// The attempts as one short line: identical messages counted (`3 entries: …`), at most
/// [`MAX_REASONS`] distinct ones shown, each cut to [`MAX_REASON_LEN`] characters. Linear in the
/// number of attempts, whatever they say.
fn summarize(attempts: &[Attempt]) -> String {
    let mut counts: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut order: Vec<String> = Vec::new();
    for a in attempts {
        let mut s = format!("{}: {}", a.scheme, a.error);
        if s.len() > MAX_REASON_LEN {
            let mut end = MAX_REASON_LEN;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s.truncate(end);
            s.push('…');
        }
        let n = counts.entry(s.clone()).or_insert(0);
        if *n == 0 && order.len() <= MAX_REASONS {
            order.push(s);
        }
        *n += 1;
    }
    let shown: Vec<String> = order
        .iter()
        .take(MAX_REASONS)
        .map(|s| match counts[s] {
            1 => s.clone(),
            n => format!("{n} entries: {s}"),
        })
        .collect();
    let mut line = shown.join("; ");
    if counts.len() > MAX_REASONS {
        let hidden: usize = order.iter().skip(MAX_REASONS).map(|s| counts[s]).sum::<usize>()
            + counts
                .iter()
                .filter(|(s, _)| !order.contains(s))
                .map(|(_, n)| n)
                .sum::<usize>();
        line.push_str(&format!(
            "; {hidden} more entries failed with {} other reasons",
            counts.len() - MAX_REASONS
        ));
    }
    line
}

/// Keys named in a [`DecoderError::WrongKeys`] message.
const MAX_TRIED_NAMED: usize = 5;
/// Distinct unwrap failures named in a [`DecoderError::WrongKeys`] message.
const MAX_REASONS: usize = 3;
/// Characters of one unwrap failure in a message.
const MAX_REASON_LEN: usize = 160;

/// The descriptor's digest, to check stdin against.
#[derive(Debug, Clone)]
enum DigestCheck {
    Sha256([u8; 32]),
    Sha512([u8; 64]),
}

impl DigestCheck {
    /// `None` for an empty digest (nothing to check).
    fn parse(digest: &str) -> Result<Option<DigestCheck>, DecoderError> {
        if digest.is_empty() {
            return Ok(None);
        }
        let bad = || DecoderError::BadDigest {
            found: crate::redact::token(digest.split(':').next().unwrap_or_default()).into_owned() + ":…",
        };
        let (alg, hex_part) = digest.split_once(':').ok_or_else(bad)?;
        // Lower-case hex only, as the OCI image spec says.
        if hex_part.bytes().any(|b| !matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(bad());
        }
        match (alg, hex_part.len()) {
            ("sha256", 64) => {
                let mut d = [0u8; 32];
                hex::decode_to_slice(hex_part, &mut d).map_err(|_| bad())?;
                Ok(Some(DigestCheck::Sha256(d)))
            }
            ("sha512", 128) => {
                let mut d = [0u8; 64];
                hex::decode_to_slice(hex_part, &mut d).map_err(|_| bad())?;
                Ok(Some(DigestCheck::Sha512(d)))
            }
            _ => Err(bad()),
        }
    }

    fn hasher(&self) -> Hasher {
        match self {
            DigestCheck::Sha256(_) => Hasher::Sha256(sha2::Sha256::default()),
            DigestCheck::Sha512(_) => Hasher::Sha512(sha2::Sha512::default()),
        }
    }
}

enum Hasher {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    fn update(&mut self, data: &[u8]) {
        use sha2::Digest as _;
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    /// `None` when the digest matches `expected`, else the digest found.
    fn mismatch(self, expected: &DigestCheck) -> Option<String> {
        use sha2::Digest as _;
        let (found, alg) = match self {
            Hasher::Sha256(h) => (h.finalize().to_vec(), "sha256"),
            Hasher::Sha512(h) => (h.finalize().to_vec(), "sha512"),
        };
        let want: &[u8] = match expected {
            DigestCheck::Sha256(d) => d,
            DigestCheck::Sha512(d) => d,
        };
        (found != want).then(|| format!("{alg}:{}", hex::encode(found)))
    }
}

/// stdin as the decoder reads it: at most the descriptor's size, counted and hashed, and
/// remembering whether the input (rather than the output) failed.
struct Bounded<R> {
    inner: R,
    left: u64,
    bytes: u64,
    hasher: Option<Hasher>,
    failed: bool,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let max = usize::try_from(self.left).unwrap_or(usize::MAX).min(buf.len());
        if max == 0 {
            return Ok(0);
        }
        match self.inner.read(&mut buf[..max]) {
            Ok(n) => {
                self.bytes += n as u64;
                self.left -= n as u64;
                if let Some(h) = &mut self.hasher {
                    h.update(&buf[..n]);
                }
                Ok(n)
            }
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    self.failed = true;
                }
                Err(e)
            }
        }
    }
}

/// Decrypts at most the descriptor's size of `input` into `sink` with CTR and HMAC on two
/// threads ([`crate::cipher::parallel::decrypt`]), then checks that exactly that many bytes
/// came, with the descriptor's digest. Maps a MAC failure to [`DecoderError::Tampered`] (or
/// [`DecoderError::ShortInput`] when stdin ended early) and I/O errors to one naming the
/// input or `sink_name`.
fn decrypt_into<R: Read, W: Write + Send>(
    input: R,
    sink: W,
    layer: &LayerParams<'_>,
    consequence: &'static str,
    sink_name: &str,
) -> Result<(W, u64), DecoderError> {
    let mut src = Bounded {
        inner: input,
        left: layer.size,
        bytes: 0,
        hasher: layer.check.map(DigestCheck::hasher),
        failed: false,
    };
    let short = |src: &Bounded<R>| DecoderError::ShortInput {
        digest: layer.digest.to_owned(),
        expected: layer.size,
        got: src.bytes,
        consequence,
    };
    let done = match crate::cipher::parallel::decrypt(&mut src, sink, layer.key, layer.nonce, layer.mac) {
        Ok(done) => done,
        Err(Error::AuthenticationFailed) if src.bytes < layer.size => return Err(short(&src)),
        Err(Error::AuthenticationFailed) => {
            return Err(DecoderError::Tampered {
                digest: layer.digest.to_owned(),
                bytes: src.bytes,
                consequence,
            })
        }
        Err(Error::Io(e)) if src.failed => {
            return Err(DecoderError::io("reading the encrypted layer from stdin")(e))
        }
        Err(Error::Io(e)) => return Err(DecoderError::io(sink_name.to_owned())(e)),
        Err(other) => {
            return Err(DecoderError::Options {
                digest: layer.digest.to_owned(),
                source: other,
            })
        }
    };
    if src.bytes < layer.size {
        return Err(short(&src));
    }
    if let (Some(h), Some(check)) = (src.hasher.take(), layer.check) {
        if let Some(actual) = h.mismatch(check) {
            return Err(DecoderError::DigestMismatch {
                digest: layer.digest.to_owned(),
                actual,
                bytes: src.bytes,
                consequence,
            });
        }
    }
    Ok(done)
}

/// What [`decrypt_into`] needs to know about the layer.
struct LayerParams<'a> {
    key: &'a LayerKey,
    nonce: &'a Nonce,
    mac: &'a ExpectedMac,
    digest: &'a str,
    size: u64,
    check: Option<&'a DigestCheck>,
}

fn spool_then_copy<R: Read, W: Write>(
    input: R,
    mut output: W,
    dir: &Path,
    layer: &LayerParams<'_>,
) -> Result<u64, DecoderError> {
    // O_TMPFILE where supported: no name, gone when closed, even on a crash.
    let mut spool = tempfile::tempfile_in(dir).map_err(DecoderError::io(format!(
        "cannot create a spool file in {} (set --spool-dir to a writable directory with room for the layer, or use --stream)",
        dir.display()
    )))?;
    let (_, total) = decrypt_into(
        input,
        &mut spool,
        layer,
        "nothing was passed on to containerd",
        &format!("writing the spool file in {}", dir.display()),
    )?;
    spool
        .seek(SeekFrom::Start(0))
        .map_err(DecoderError::io("rewinding the spool file"))?;
    // `io::copy` from a file to a file or pipe is done in the kernel (copy_file_range, sendfile
    // or splice), without passing the bytes through user space.
    let copied = io::copy(&mut spool, &mut output).map_err(DecoderError::io(
        "copying the verified layer from the spool file to stdout",
    ))?;
    output
        .flush()
        .map_err(DecoderError::io("writing the decrypted layer to stdout"))?;
    if copied != total {
        return Err(DecoderError::io("reading the spool file")(io::Error::other(
            format!("read back {copied} bytes of {total}"),
        )));
    }
    Ok(copied)
}

/// Passes everything on but the last [`STREAM_HOLD_BACK`] bytes; [`HoldBack::release`] writes
/// those once the MAC verified.
struct HoldBack<W> {
    out: W,
    held: Vec<u8>,
}

impl<W: Write> Write for HoldBack<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.held.extend_from_slice(buf);
        if self.held.len() > STREAM_HOLD_BACK {
            let release = self.held.len() - STREAM_HOLD_BACK;
            self.out.write_all(&self.held[..release])?;
            self.held.drain(..release);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        // The held bytes are not released by a flush: only `release` does that.
        self.out.flush()
    }
}

impl<W: Write> HoldBack<W> {
    fn release(mut self) -> io::Result<()> {
        self.out.write_all(&self.held)?;
        self.out.flush()
    }
}

fn stream_with_hold_back<R: Read, W: Write + Send>(
    input: R,
    output: W,
    layer: &LayerParams<'_>,
) -> Result<u64, DecoderError> {
    let hold = HoldBack {
        out: output,
        held: Vec::with_capacity(BUF_LEN + STREAM_HOLD_BACK),
    };
    let (hold, total) = decrypt_into(
        input,
        hold,
        layer,
        "the output released so far is unauthenticated and must be discarded (containerd fails the unpack on the non-zero exit)",
        "writing the decrypted layer to stdout",
    )?;
    hold.release()
        .map_err(DecoderError::io("writing the decrypted layer to stdout"))?;
    Ok(total)
}

// ---------------------------------------------------------------------------------------------
// Process entry

/// Reads a payload from `r` (file descriptor 3 in the decoder), bounded by
/// [`MAX_PAYLOAD_LEN`].
///
/// # Errors
/// [`DecoderError::NoPayload`] when `r` is empty or fails, [`DecoderError::MalformedPayload`]
/// when it is too large.
pub fn read_payload<R: Read>(r: R) -> Result<Vec<u8>, DecoderError> {
    let mut buf = Vec::new();
    r.take(MAX_PAYLOAD_LEN + 1)
        .read_to_end(&mut buf)
        .map_err(|e| DecoderError::NoPayload {
            reason: e.to_string(),
        })?;
    if buf.is_empty() {
        return Err(DecoderError::NoPayload {
            reason: "it is empty".into(),
        });
    }
    if buf.len() as u64 > MAX_PAYLOAD_LEN {
        return Err(DecoderError::MalformedPayload {
            reason: format!("larger than {MAX_PAYLOAD_LEN} bytes"),
        });
    }
    Ok(buf)
}

/// One decoder run over explicit inputs: parses the payload bytes, gathers keys, decrypts
/// `input` into `output`.
///
/// # Errors
/// Any [`DecoderError`].
pub fn run<R: Read, W: Write + Send>(
    options: &DecoderOptions,
    env_media_type: Option<&str>,
    payload: &[u8],
    extra_unwrappers: Vec<Arc<dyn AsyncKeyUnwrapper>>,
    input: R,
    output: W,
) -> Result<Outcome, DecoderError> {
    let payload = Payload::from_any_bytes(payload)?;
    Decoder::new(payload, env_media_type, options)?
        .with_unwrappers(extra_unwrappers)
        .decrypt(input, output)
}

/// A provider unwrapper, asynchronous where the crate can be (gRPC calls then need no runtime
/// of their own, commands run on the blocking pool).
fn provider_unwrapper(u: crate::keyprovider::KeyProviderUnwrapper) -> Arc<dyn AsyncKeyUnwrapper> {
    #[cfg(feature = "tokio")]
    return u.into_async();
    #[cfg(not(feature = "tokio"))]
    return Arc::new(u);
}

/// Unwrappers for every key provider (command or gRPC) of the configuration file `path` (the file
/// named by [`KEYPROVIDER_CONFIG_ENV`]), sent the pull's decrypt parameters as Go does. None
/// when `path` is `None` or names a file that does not exist (Go ocicrypt's rule, which
/// containerd's documented configuration relies on).
///
/// # Errors
/// [`DecoderError::KeyProviders`] when the file exists but cannot be read or parsed.
pub fn key_provider_unwrappers(
    path: Option<&Path>,
    config: &DecryptConfig,
) -> Result<Vec<Arc<dyn AsyncKeyUnwrapper>>, DecoderError> {
    let Some(path) = path.filter(|p| !p.as_os_str().is_empty()) else {
        return Ok(Vec::new());
    };
    if matches!(std::fs::metadata(path), Err(e) if e.kind() == io::ErrorKind::NotFound) {
        return Ok(Vec::new());
    }
    let cfg = KeyProviderConfig::from_file(path).map_err(|source| DecoderError::KeyProviders { source })?;
    Ok(cfg
        .unwrappers()
        .into_iter()
        .map(|u| provider_unwrapper(u.with_parameters(config.parameters.clone())))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_roundtrip_and_unknown_fields() {
        let bytes = encode_any(PAYLOAD_TYPE_URL, b"{\"x\":1}");
        assert_eq!(
            decode_any(&bytes).unwrap(),
            (PAYLOAD_TYPE_URL.to_owned(), b"{\"x\":1}".to_vec())
        );
        // Unknown varint, fixed64, fixed32 and bytes fields are skipped.
        let mut with_extra = vec![
            0x18, 0x96, 0x01, 0x21, 1, 2, 3, 4, 5, 6, 7, 8, 0x2d, 1, 2, 3, 4, 0x22, 1, 0,
        ];
        with_extra.extend_from_slice(&bytes);
        assert_eq!(decode_any(&with_extra).unwrap().0, PAYLOAD_TYPE_URL);
        // A long value needs a multi-byte length.
        let big = vec![b'a'; 300];
        let enc = encode_any("t", &big);
        assert_eq!(&enc[..5], &[0x0a, 1, b't', 0x12, 0xac]);
        assert_eq!(decode_any(&enc).unwrap().1, big);
    }

    #[test]
    fn any_malformed() {
        for (bytes, want) in [
            (&b""[..], "empty message"),
            (&[0x0a, 5, b'a'][..], "claims 5 bytes"),
            (&[0x0a][..], "truncated length"),
            (&[0x80][..], "truncated field key"),
            (&[0x0b, 0][..], "wire type 3"),
            (&[0x12, 1, b'x'][..], "no type_url"),
            (&[0x0a, 2, 0xff, 0xfe][..], "not UTF-8"),
            (&[0x02][..], "field number 0"),
        ] {
            let e = decode_any(bytes).unwrap_err().to_string();
            assert!(e.contains(want), "{bytes:?}: {e}");
        }
        let over = [0xff; 11];
        assert!(decode_any(&over).is_err());
    }

    #[test]
    fn payload_json_go_shapes() {
        // What imgcrypt's typeurl JSON looks like for the CRI node key model: no parameters.
        let json = br#"{"DecryptConfig":{"Parameters":null},"Descriptor":{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip+encrypted","digest":"sha256:ab","size":12,"annotations":{"org.opencontainers.image.enc.pubopts":"e30="}}}"#;
        let p = Payload::from_any_bytes(&encode_any(PAYLOAD_TYPE_URL, json)).unwrap();
        assert!(p.decrypt_config.parameters.is_empty());
        assert_eq!(p.descriptor.size, 12);
        assert_eq!(p.descriptor.annotations.len(), 1);
        // With keys: Go's [][]byte is a list of base64 strings; null entries are empty.
        let json = br#"{"DecryptConfig":{"Parameters":{"privkeys":["aGVsbG8="],"privkeys-passwords":[null]}},"Descriptor":null}"#;
        let p = Payload::from_any_bytes(&encode_any(PAYLOAD_TYPE_URL, json)).unwrap();
        assert_eq!(p.decrypt_config.parameters["privkeys"], vec![b"hello".to_vec()]);
        assert_eq!(
            p.decrypt_config.parameters["privkeys-passwords"],
            vec![Vec::<u8>::new()]
        );
        assert!(!format!("{:?}", p.decrypt_config).contains("hello"));
        // Round trip.
        let again = Payload::from_any_bytes(&p.to_any_bytes()).unwrap();
        assert_eq!(
            again.decrypt_config.parameters["privkeys"],
            vec![b"hello".to_vec()]
        );
        // Errors.
        assert!(matches!(
            Payload::from_any_bytes(&encode_any("other.Type", json)),
            Err(DecoderError::WrongPayloadType { .. })
        ));
        assert!(matches!(
            Payload::from_any_bytes(&encode_any(PAYLOAD_TYPE_URL, b"{")),
            Err(DecoderError::PayloadJson { .. })
        ));
        let e = Payload::from_any_bytes(&encode_any(
            PAYLOAD_TYPE_URL,
            br#"{"DecryptConfig":{"Parameters":{"privkeys":["%%%"]}}}"#,
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("privkeys") && e.contains("base64"), "{e}");
    }

    #[test]
    fn one_line_messages() {
        let e = DecoderError::Io {
            context: "a\nb".into(),
            source: io::Error::other("c\n  d"),
        };
        assert_eq!(e.one_line(), "a b: c d");
    }
}

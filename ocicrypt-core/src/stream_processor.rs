//! containerd stream processor: the logic of `imgcrypt-decoder`, a drop-in for imgcrypt's
//! `ctd-decoder`.
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
//! * keys come from the payload (`privkeys` with `privkeys-passwords`) and from the
//!   `--decryption-keys-path` directory, read with the runtimes' strict semantics
//!   ([`crate::keys::read_key_dir`]: a symbolic link or a file the runtime cannot use fails
//!   the layer, naming the file); a missing directory counts as empty;
//! * **nothing unauthenticated reaches containerd** by default ([`OutputMode::Spool`]): the
//!   plaintext is decrypted into an unnamed temporary file (`O_TMPFILE`), the HMAC is checked
//!   at the end of the input, and only then is the file copied to stdout. A tampered layer
//!   produces no output at all and a non-zero exit. [`OutputMode::Stream`] is Go's behaviour
//!   (everything but the last 10 KiB released before the MAC is known), for nodes without
//!   scratch space; it still exits non-zero on a bad MAC, which fails containerd's unpack.
//!   Memory stays bounded either way (a few 256 KiB buffers, whatever the layer size);
//! * HMAC and CTR run on two threads ([`crate::cipher::parallel`]), so on a node with two free
//!   cores SHA-256 alone bounds a layer's decryption;
//! * every failure is one line on stderr saying what is wrong and what to do.
//!
//! The protobuf envelope is decoded by hand ([`decode_any`]): it is two length-delimited
//! fields.
//!
//! [`containerd`'s processor API]: https://github.com/containerd/containerd/blob/main/docs/stream_processors.md

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::fs::File;
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
use crate::keywrap::{schemes_present, AsyncKeyUnwrapper, Attempt};
use crate::mediatype::{is_encrypted, KEYS_ANNOTATION_PREFIX, PUBOPTS_ANNOTATION};
use crate::options::{decode_b64, encode_b64};
use crate::Error;

/// The `type_url` of the payload imgcrypt registers (`typeurl.Register(&Payload{}, …)`).
pub const PAYLOAD_TYPE_URL: &str = "io.containerd.ocicrypt.v1.Payload";
/// The environment variable in which containerd passes the input media type.
pub const MEDIA_TYPE_ENV: &str = "STREAM_PROCESSOR_MEDIATYPE";
/// The environment variable naming the ocicrypt key-provider configuration file.
pub const KEYPROVIDER_CONFIG_ENV: &str = "OCICRYPT_KEYPROVIDER_CONFIG";
/// Where the payload file descriptor (fd 3) is opened from, without `unsafe`.
pub const PAYLOAD_FD_PATH: &str = "/proc/self/fd/3";
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
    /// Bad command line.
    #[error(
        "{0} (usage: imgcrypt-decoder [--decryption-keys-path DIR] [--spool-dir DIR | --stream]; see --help)"
    )]
    Usage(String),
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
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Payload {
    /// Keys and parameters sent with the pull (often empty: the node key model uses the key
    /// directory).
    #[serde(rename = "DecryptConfig", default, deserialize_with = "null_default")]
    pub decrypt_config: DecryptConfig,
    /// The encrypted layer's descriptor, with the wrapped keys in its annotations.
    #[serde(rename = "Descriptor", default, deserialize_with = "null_default")]
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
        serde_json::from_slice(&value).map_err(|e| DecoderError::PayloadJson {
            reason: e.to_string(),
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
#[derive(Default, Serialize, Deserialize)]
pub struct DecryptConfig {
    /// `privkeys`, `privkeys-passwords`, `x509s`, `gpg-privatekeys`, …
    #[serde(rename = "Parameters", default, with = "go_bytes_map")]
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

fn null_default<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

mod go_bytes_map {
    use super::*;
    use serde::de::Error as _;
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

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, Vec<Vec<u8>>>, D::Error> {
        let raw = Option::<BTreeMap<String, Option<Vec<Option<String>>>>>::deserialize(d)?;
        let mut out = BTreeMap::new();
        for (k, list) in raw.unwrap_or_default() {
            let mut vals = Vec::new();
            for (i, item) in list.unwrap_or_default().into_iter().enumerate() {
                let bytes = match item.map(Zeroizing::new) {
                    None => Vec::new(),
                    Some(s) => decode_b64(&s).map_err(|e| {
                        D::Error::custom(format!("Parameters[{k:?}][{i}] is not base64: {e}"))
                    })?,
                };
                vals.push(bytes);
            }
            out.insert(k, vals);
        }
        Ok(out)
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

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Decrypt stdin to stdout.
    Run(DecoderOptions),
    /// Print [`HELP`].
    Help,
    /// Print the version.
    Version,
}

/// `--help` text.
pub const HELP: &str = "\
imgcrypt-decoder: containerd stream processor that decrypts ocicrypt-encrypted image layers
(a drop-in for imgcrypt's ctd-decoder).

containerd runs it once per encrypted layer: the encrypted blob on stdin, the decrypted blob on
stdout, the layer descriptor and decrypt parameters as a protobuf Any on file descriptor 3.

Options:
  --decryption-keys-path DIR  also use the private keys in DIR (read like the runtime reads its
                              key directory: every file must be a usable key, no symbolic links)
  --spool-dir DIR             scratch directory for the verified-before-release output
                              (default: $TMPDIR, else /var/tmp)
  --stream                    release output before the HMAC is verified, like Go's ctd-decoder
                              (no scratch space; a bad HMAC still exits non-zero)
  -h, --help                  this help
  --version                   the version

Environment: STREAM_PROCESSOR_MEDIATYPE (set by containerd),
OCICRYPT_KEYPROVIDER_CONFIG (key providers).
See docs/runtime-integration.md.
";

/// The default spool directory: `$TMPDIR` when set, else `/var/tmp` (usually on disk, unlike
/// a tmpfs `/tmp` that would hold the layer in memory), else `/tmp`.
pub fn default_spool_dir() -> PathBuf {
    if let Some(t) = std::env::var_os("TMPDIR").filter(|t| !t.is_empty()) {
        return PathBuf::from(t);
    }
    if Path::new("/var/tmp").is_dir() {
        return PathBuf::from("/var/tmp");
    }
    std::env::temp_dir()
}

/// Parses the arguments (without the program name). Accepts Go's flag spellings:
/// `--flag VALUE`, `--flag=VALUE`, `-flag VALUE`.
///
/// # Errors
/// [`DecoderError::Usage`].
pub fn parse_args<I: IntoIterator<Item = OsString>>(args: I) -> Result<Command, DecoderError> {
    let mut keys_path = None;
    let mut spool_dir: Option<PathBuf> = None;
    let mut stream = false;
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let s = arg
            .to_str()
            .ok_or_else(|| DecoderError::Usage(format!("argument {arg:?} is not UTF-8")))?
            .to_owned();
        let (name, inline) = match s.split_once('=') {
            Some((n, v)) if n.starts_with('-') => (n.to_owned(), Some(PathBuf::from(v))),
            _ => (s.clone(), None),
        };
        let flag = name.trim_start_matches('-');
        if !name.starts_with('-') || flag.is_empty() {
            return Err(DecoderError::Usage(format!("unexpected argument {s:?}")));
        }
        let mut value = |inline: Option<PathBuf>| -> Result<PathBuf, DecoderError> {
            match inline {
                Some(v) => Ok(v),
                None => it
                    .next()
                    .map(PathBuf::from)
                    .ok_or_else(|| DecoderError::Usage(format!("{name} needs a value"))),
            }
        };
        match flag {
            "decryption-keys-path" => keys_path = Some(value(inline)?),
            "spool-dir" => spool_dir = Some(value(inline)?),
            "stream" if inline.is_none() => stream = true,
            "h" | "help" if inline.is_none() => return Ok(Command::Help),
            "version" if inline.is_none() => return Ok(Command::Version),
            _ => return Err(DecoderError::Usage(format!("unknown option {s:?}"))),
        }
    }
    if stream && spool_dir.is_some() {
        return Err(DecoderError::Usage(
            "--stream and --spool-dir exclude each other".into(),
        ));
    }
    let keys_path = keys_path.filter(|p| !p.as_os_str().is_empty());
    let output = if stream {
        OutputMode::Stream
    } else {
        OutputMode::Spool {
            dir: spool_dir.unwrap_or_else(default_spool_dir),
        }
    };
    Ok(Command::Run(DecoderOptions { keys_path, output }))
}

// ---------------------------------------------------------------------------------------------
// Keys

/// The keys gathered for one layer, with where they came from.
#[derive(Debug, Default)]
pub struct KeySet {
    /// Private keys (JWE scheme).
    pub keys: Vec<PrivateKey>,
    /// What was looked at, for error messages: "the key directory /x (2 keys)", …
    pub looked_in: Vec<String>,
}

impl KeySet {
    /// Gathers the keys of the payload (`privkeys`, `privkeys-passwords`) and of the key
    /// directory. The directory is read strictly, like the runtimes: a symbolic link or a file
    /// a runtime cannot use fails with [`DecoderError::KeyDir`] naming it. A missing
    /// directory counts as empty (CRI-O's rule; Go `ctd-decoder` fails on it).
    ///
    /// # Errors
    /// [`DecoderError::PayloadKey`], [`DecoderError::KeyDir`].
    pub fn gather(config: &DecryptConfig, keys_path: Option<&Path>) -> Result<KeySet, DecoderError> {
        let mut set = KeySet::default();
        let empty = Vec::new();
        let privs = config.parameters.get("privkeys").unwrap_or(&empty);
        let pwds = config.parameters.get("privkeys-passwords").unwrap_or(&empty);
        for (index, bytes) in privs.iter().enumerate() {
            let pwd = pwds.get(index).filter(|p| !p.is_empty()).map(Vec::as_slice);
            let key = PrivateKey::from_bytes(bytes, pwd, &format!("privkeys[{index}]"))
                .map_err(|source| DecoderError::PayloadKey { index, source })?;
            set.keys.push(key);
        }
        set.looked_in.push(match privs.len() {
            0 => "the pull request carried no keys".to_owned(),
            1 => "the pull request carried 1 key".to_owned(),
            n => format!("the pull request carried {n} keys"),
        });
        if let Some(dir) = keys_path {
            match read_key_dir(dir) {
                Ok(kd) => {
                    let n = kd.keys.len();
                    let others = kd.ignored.len();
                    set.keys.extend(kd.into_private_keys());
                    set.looked_in.push(format!(
                        "the key directory {} holds {}{}",
                        dir.display(),
                        match n {
                            0 => "no private key".to_owned(),
                            1 => "1 private key".to_owned(),
                            n => format!("{n} private keys"),
                        },
                        if others > 0 {
                            format!(" (and {others} certificates or keyrings, unused by this decoder)")
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
    keys: KeySet,
    extra: Vec<Arc<dyn AsyncKeyUnwrapper>>,
    output: OutputMode,
}

impl Decoder {
    /// Checks the payload against containerd's media type and gathers the keys.
    ///
    /// # Errors
    /// [`DecoderError::NotEncrypted`], [`DecoderError::MediaTypeMismatch`],
    /// [`DecoderError::NotOcicrypt`], and the errors of [`KeySet::gather`].
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
        if let Some(env) = env_media_type.filter(|e| !e.is_empty()) {
            if env != d.media_type {
                return Err(DecoderError::MediaTypeMismatch {
                    env: env.to_owned(),
                    payload: d.media_type.clone(),
                    digest,
                });
            }
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
        let keys = KeySet::gather(&payload.decrypt_config, options.keys_path.as_deref())?;
        Ok(Self {
            payload,
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
    /// [`DecoderError::Tampered`], [`DecoderError::Io`].
    pub fn decrypt<R: Read, W: Write + Send>(self, input: R, output: W) -> Result<Outcome, DecoderError> {
        let digest = self.payload.descriptor.digest.clone();
        let annotations = &self.payload.descriptor.annotations;
        let tried: Vec<String> = self
            .keys
            .keys
            .iter()
            .map(|k| k.source_name().to_owned())
            .collect();
        let key_count = tried.len();
        let mut unwrappers: Vec<Arc<dyn AsyncKeyUnwrapper>> = Vec::new();
        if !self.keys.keys.is_empty() {
            unwrappers.push(Arc::new(JweUnwrapper::new(self.keys.keys)));
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
                    tried: if tried.is_empty() {
                        "key providers only".into()
                    } else {
                        tried.join(", ")
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
        };
        let bytes = match &self.output {
            OutputMode::Spool { dir } => spool_then_copy(input, output, dir, &layer)?,
            OutputMode::Stream => stream_with_hold_back(input, output, &layer)?,
        };
        Ok(Outcome { bytes, digest })
    }
}

/// Attempts, deduplicated: one JWE unwrapper over N keys reports once per entry.
fn summarize(attempts: &[Attempt]) -> String {
    let mut seen: Vec<String> = Vec::new();
    for a in attempts {
        let s = format!("{}: {}", a.scheme, a.error);
        if !seen.contains(&s) {
            seen.push(s);
        }
    }
    seen.join("; ")
}

/// Counts the ciphertext bytes read, and remembers whether the input (rather than the output)
/// failed.
struct Counted<R> {
    inner: R,
    bytes: u64,
    failed: bool,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.bytes += n as u64;
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

/// Decrypts `input` into `sink` with CTR and HMAC on two threads
/// ([`crate::cipher::parallel::decrypt`]), mapping a MAC failure to [`DecoderError::Tampered`]
/// and I/O errors to one naming the input or `sink_name`.
fn decrypt_into<R: Read, W: Write + Send>(
    input: R,
    sink: W,
    layer: &LayerParams<'_>,
    consequence: &'static str,
    sink_name: &str,
) -> Result<(W, u64), DecoderError> {
    let mut src = Counted {
        inner: input,
        bytes: 0,
        failed: false,
    };
    match crate::cipher::parallel::decrypt(&mut src, sink, layer.key, layer.nonce, layer.mac) {
        Ok(done) => Ok(done),
        Err(Error::AuthenticationFailed) => Err(DecoderError::Tampered {
            digest: layer.digest.to_owned(),
            bytes: src.bytes,
            consequence,
        }),
        Err(Error::Io(e)) if src.failed => Err(DecoderError::io("reading the encrypted layer from stdin")(e)),
        Err(Error::Io(e)) => Err(DecoderError::io(sink_name.to_owned())(e)),
        Err(other) => Err(DecoderError::Options {
            digest: layer.digest.to_owned(),
            source: other,
        }),
    }
}

/// What [`decrypt_into`] needs to know about the layer.
struct LayerParams<'a> {
    key: &'a LayerKey,
    nonce: &'a Nonce,
    mac: &'a ExpectedMac,
    digest: &'a str,
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

/// Reads the payload from file descriptor 3 (bounded by [`MAX_PAYLOAD_LEN`]).
///
/// # Errors
/// [`DecoderError::NoPayload`] when fd 3 is not open or empty,
/// [`DecoderError::MalformedPayload`] when it is too large.
pub fn read_payload_fd() -> Result<Vec<u8>, DecoderError> {
    let f = File::open(PAYLOAD_FD_PATH).map_err(|e| DecoderError::NoPayload {
        reason: if e.kind() == io::ErrorKind::NotFound {
            "it is not open".to_owned()
        } else {
            e.to_string()
        },
    })?;
    read_payload(f)
}

/// Reads a payload from `r` (bounded by [`MAX_PAYLOAD_LEN`]).
///
/// # Errors
/// As [`read_payload_fd`].
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

/// The whole `imgcrypt-decoder` process: arguments from the command line, payload from fd 3,
/// media type from the environment, stdin to stdout. Prints one line on stderr and returns a
/// failure exit code on any error.
pub fn main() -> std::process::ExitCode {
    use std::os::fd::AsFd as _;
    let fail = |e: &DecoderError| {
        let _ = writeln!(io::stderr(), "imgcrypt-decoder: {}", e.one_line());
        std::process::ExitCode::FAILURE
    };
    let options = match parse_args(std::env::args_os().skip(1)) {
        Ok(Command::Run(o)) => o,
        Ok(Command::Help) => {
            print!("{HELP}");
            return std::process::ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("imgcrypt-decoder {}", env!("CARGO_PKG_VERSION"));
            return std::process::ExitCode::SUCCESS;
        }
        Err(e) => return fail(&e),
    };
    // A raw descriptor: std's stdout is line-buffered, and the decoder does its own buffering.
    let result = run_process(&options, || {
        io::stdout().as_fd().try_clone_to_owned().map(File::from)
    });
    match result {
        Ok(_) => std::process::ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// What the decoder process does once its arguments are parsed, with the output opened by
/// `open_output` (stdout in the binary): payload from fd 3, media type from
/// [`MEDIA_TYPE_ENV`], key providers from [`KEYPROVIDER_CONFIG_ENV`], input from stdin.
///
/// The payload is read before any descriptor is opened or duplicated: when containerd passes
/// no payload, fd 3 is free and the next descriptor opened would take its number.
///
/// # Errors
/// Any [`DecoderError`].
pub fn run_process<W: Write + Send>(
    options: &DecoderOptions,
    open_output: impl FnOnce() -> io::Result<W>,
) -> Result<Outcome, DecoderError> {
    use std::os::fd::AsFd as _;
    let payload = Payload::from_any_bytes(&read_payload_fd()?)?;
    let env_media_type = std::env::var(MEDIA_TYPE_ENV).ok();
    let providers = key_provider_unwrappers(&payload.decrypt_config)?;
    let stdin = io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map(File::from)
        .map_err(DecoderError::io("stdin"))?;
    let output = open_output().map_err(DecoderError::io("stdout"))?;
    Decoder::new(payload, env_media_type.as_deref(), options)?
        .with_unwrappers(providers)
        .decrypt(stdin, output)
}

/// Unwrappers for every command key provider of the file named by
/// [`KEYPROVIDER_CONFIG_ENV`], sent the pull's decrypt parameters as Go does. None when the
/// variable is unset or empty, or names a file that does not exist (Go ocicrypt's rule, which
/// containerd's documented configuration relies on).
///
/// # Errors
/// [`DecoderError::KeyProviders`] when the file exists but cannot be read or parsed.
pub fn key_provider_unwrappers(
    config: &DecryptConfig,
) -> Result<Vec<Arc<dyn AsyncKeyUnwrapper>>, DecoderError> {
    let Some(path) = std::env::var_os(KEYPROVIDER_CONFIG_ENV).filter(|p| !p.is_empty()) else {
        return Ok(Vec::new());
    };
    let path = PathBuf::from(path);
    if matches!(std::fs::metadata(&path), Err(e) if e.kind() == io::ErrorKind::NotFound) {
        return Ok(Vec::new());
    }
    let cfg = KeyProviderConfig::from_file(&path).map_err(|source| DecoderError::KeyProviders { source })?;
    Ok(cfg
        .unwrappers()
        .into_iter()
        .map(|u| Arc::new(u.with_parameters(config.parameters.clone())) as Arc<dyn AsyncKeyUnwrapper>)
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
    fn args() {
        let os = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        let Command::Run(o) = parse_args(os(&["--decryption-keys-path", "/k"])).unwrap() else {
            panic!()
        };
        assert_eq!(o.keys_path.as_deref(), Some(Path::new("/k")));
        assert!(matches!(o.output, OutputMode::Spool { .. }));
        let Command::Run(o) = parse_args(os(&["-decryption-keys-path=/k", "--stream"])).unwrap() else {
            panic!()
        };
        assert_eq!(o.keys_path.as_deref(), Some(Path::new("/k")));
        assert_eq!(o.output, OutputMode::Stream);
        let Command::Run(o) = parse_args(os(&["--spool-dir", "/s"])).unwrap() else {
            panic!()
        };
        assert_eq!(o.output, OutputMode::Spool { dir: "/s".into() });
        assert_eq!(o.keys_path, None);
        assert_eq!(parse_args(os(&["--help"])).unwrap(), Command::Help);
        assert_eq!(parse_args(os(&["--version"])).unwrap(), Command::Version);
        for bad in [
            &["--nope"][..],
            &["x"],
            &["--decryption-keys-path"],
            &["--stream", "--spool-dir", "/s"],
            &["--stream=1"],
        ] {
            assert!(
                matches!(parse_args(os(bad)), Err(DecoderError::Usage(_))),
                "{bad:?}"
            );
        }
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

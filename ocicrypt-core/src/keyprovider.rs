//! Client side of the ocicrypt key-provider protocol (`provider:<name>` recipients).
//!
//! Providers are configured as in containers/ocicrypt: the JSON file named by
//! `OCICRYPT_KEYPROVIDER_CONFIG`,
//!
//! ```json
//! {"key-providers": {
//!    "mycmd":  {"cmd": {"path": "/usr/local/bin/my-kp", "args": ["--x"]}},
//!    "mygrpc": {"grpc": "localhost:50051"}
//! }}
//! ```
//!
//! Each provider `<name>` is the scheme `provider.<name>` (annotation
//! `org.opencontainers.image.enc.keys.provider.<name>`). For a `cmd` provider, the request is
//! written as JSON to the command's stdin and the answer read from its stdout, exactly as Go's
//! ocicrypt does:
//!
//! ```json
//! {"op":"keywrap","keywrapparams":{"ec":{"Parameters":{"<name>":["<b64 param>"]},"DecryptConfig":{"Parameters":{}}},"optsdata":"<b64>"},"keyunwrapparams":{"dc":null,"annotation":null}}
//! {"op":"keyunwrap","keywrapparams":{"ec":null,"optsdata":null},"keyunwrapparams":{"dc":{"Parameters":{}},"annotation":"<b64>"}}
//! ```
//!
//! answered by `{"keywrapresults":{"annotation":"<b64>"}}` /
//! `{"keyunwrapresults":{"optsdata":"<b64>"}}`. Byte fields are written as standard base64 (as
//! Go writes `[]byte`) and accepted as base64 strings or arrays of numbers (as ocicrypt-rs
//! writes them).
//!
//! A `grpc` provider (crate feature `grpc`) gets the same JSON in the one `bytes` field of
//! `keyprovider.KeyProviderService/WrapKey` or `UnWrapKey` and answers in the same way: see
//! [`grpc`]. ttrpc and native providers (ocicrypt-rs) are recognised but not supported: using
//! one is a clear error.
//!
//! The types of the protocol are public so a provider (the server side) can be written with
//! them too ([`KeyProviderRequest`], [`KeyProviderResponse`]).

use std::collections::BTreeMap;
use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::keywrap::{KeyUnwrapper, KeyWrapper, UnwrapError, WrapError};
use crate::options::{decode_b64, encode_b64};

/// Environment variable naming the key-provider config file.
pub const ENV_CONFIG: &str = "OCICRYPT_KEYPROVIDER_CONFIG";
/// Default bound on one provider command run.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// `op` of a wrap request.
pub const OP_KEYWRAP: &str = "keywrap";
/// `op` of an unwrap request.
pub const OP_KEYUNWRAP: &str = "keyunwrap";

const MAX_STDOUT: usize = 16 << 20;

#[cfg(feature = "grpc")]
pub mod grpc;
#[cfg(feature = "grpc-server")]
pub mod grpc_server;
const MAX_STDERR: usize = 64 << 10;

// ------------------------------------------------------------------------------------------
// Errors

/// Why a key provider could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProviderError {
    /// The config file is unreadable or invalid.
    #[error("key provider config {path}: {reason}")]
    Config {
        /// The file (or `<inline>`).
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// No provider of that name is configured.
    #[error("no key provider named {name:?} in {ENV_CONFIG} (configured: {configured})")]
    UnknownProvider {
        /// The name asked for.
        name: String,
        /// Names configured, comma-separated.
        configured: String,
    },
    /// The provider uses a transport we do not implement (or this build lacks).
    #[error("key provider {name:?} uses {kind}, which this build of imgcrypt does not support; configure it as a \"cmd\" or \"grpc\" provider")]
    Unsupported {
        /// The provider.
        name: String,
        /// `grpc`, `ttrpc`, `native`.
        kind: String,
    },
    /// The command could not be started.
    #[error("cannot run key provider {name:?} ({path}): {source}")]
    Spawn {
        /// The provider.
        name: String,
        /// The command.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The command did not finish in time (it was killed).
    #[error("key provider {name:?} ({path}) did not answer within {secs} s and was killed")]
    Timeout {
        /// The provider.
        name: String,
        /// The command.
        path: String,
        /// The limit.
        secs: u64,
    },
    /// The command failed.
    #[error("key provider {name:?} ({path}) failed ({status}): {stderr}")]
    Failed {
        /// The provider.
        name: String,
        /// The command.
        path: String,
        /// Exit status text.
        status: String,
        /// Its stderr (trimmed, truncated).
        stderr: String,
    },
    /// The provider's answer is not the protocol's JSON.
    #[error("key provider {name:?} ({path}) gave an invalid answer: {reason}")]
    BadAnswer {
        /// The provider.
        name: String,
        /// The command, or the gRPC address.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// A gRPC provider could not be reached.
    #[error("cannot reach key provider {name:?} at {addr} (gRPC): {reason}; is the provider running and listening there?")]
    Connect {
        /// The provider.
        name: String,
        /// Its address.
        addr: String,
        /// Why (the OS or HTTP/2 error).
        reason: String,
    },
    /// A gRPC provider did not answer in time.
    #[error("key provider {name:?} at {addr} (gRPC) did not answer within {secs} s")]
    GrpcTimeout {
        /// The provider.
        name: String,
        /// Its address.
        addr: String,
        /// The limit.
        secs: u64,
    },
    /// A gRPC provider answered with an error status.
    #[error("key provider {name:?} at {addr} (gRPC) failed: {code}: {message}")]
    Status {
        /// The provider.
        name: String,
        /// Its address.
        addr: String,
        /// The gRPC status code.
        code: String,
        /// Its message (sanitized, truncated).
        message: String,
    },
}

// ------------------------------------------------------------------------------------------
// Config

/// One provider's entry.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct ProviderAttrs {
    /// A command provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<CommandSpec>,
    /// A gRPC provider address: `HOST:PORT` (as Go's `grpc.Dial` takes it), `dns:///HOST:PORT`
    /// or `unix:PATH`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<String>,
    /// gRPC TLS settings (Go ocicrypt since 2026; ocicrypt 1.1.x ignores them and dials in
    /// plain text). Without them the connection is plain-text HTTP/2.
    #[serde(default, rename = "grpc-tls", skip_serializing_if = "Option::is_none")]
    pub grpc_tls: Option<GrpcTls>,
    /// ttrpc address (ocicrypt-rs; not supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttrpc: Option<String>,
    /// Native provider (ocicrypt-rs; not supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub native: Option<String>,
}

/// `grpc-tls`: `{"root-ca-file", "cert-file", "key-file", "server-name", "insecure-skip-verify"}`
/// (Go's `GrpcTLS`).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct GrpcTls {
    /// PEM CA certificates the server's certificate must chain to (default: the system roots).
    #[serde(default, rename = "root-ca-file", skip_serializing_if = "Option::is_none")]
    pub root_ca_file: Option<PathBuf>,
    /// PEM client certificate (with `key-file`), for servers that require one.
    #[serde(default, rename = "cert-file", skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// PEM client key.
    #[serde(default, rename = "key-file", skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// The name the server's certificate must carry (default: the host of the address).
    #[serde(default, rename = "server-name", skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// Go's "accept any certificate": refused by imgcrypt (a clear error).
    #[serde(default, rename = "insecure-skip-verify")]
    pub insecure_skip_verify: bool,
}

/// `{"path": "...", "args": [...]}`.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct CommandSpec {
    /// The executable.
    pub path: PathBuf,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
}

/// The parsed `OCICRYPT_KEYPROVIDER_CONFIG` file.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct KeyProviderConfig {
    /// Providers by name.
    #[serde(rename = "key-providers", default)]
    pub key_providers: BTreeMap<String, ProviderAttrs>,
}

impl KeyProviderConfig {
    /// Parses the config JSON.
    ///
    /// # Errors
    /// [`ProviderError::Config`].
    pub fn from_json(bytes: &[u8]) -> Result<Self, ProviderError> {
        Self::parse(bytes, "<inline>")
    }

    fn parse(bytes: &[u8], path: &str) -> Result<Self, ProviderError> {
        let c: Self = serde_json::from_slice(bytes).map_err(|e| ProviderError::Config {
            path: path.to_owned(),
            reason: format!("not a key provider config {{\"key-providers\": {{name: {{\"cmd\": {{\"path\", \"args\"}}}}}}}}: {e}"),
        })?;
        for (name, a) in &c.key_providers {
            if name.is_empty() || name.contains([',', ':']) || name.chars().any(char::is_whitespace) {
                return Err(ProviderError::Config {
                    path: path.to_owned(),
                    reason: format!("provider name {name:?} must be non-empty, without ',', ':' or spaces"),
                });
            }
            if a.cmd.is_none() && a.grpc.is_none() && a.ttrpc.is_none() && a.native.is_none() {
                return Err(ProviderError::Config {
                    path: path.to_owned(),
                    reason: format!("provider {name:?} has neither \"cmd\" nor \"grpc\""),
                });
            }
            if let Some(g) = &a.grpc {
                if g.trim().is_empty() {
                    return Err(ProviderError::Config {
                        path: path.to_owned(),
                        reason: format!("provider {name:?}: grpc address is empty (expected HOST:PORT)"),
                    });
                }
            }
            if let Some(c) = &a.cmd {
                if c.path.as_os_str().is_empty() {
                    return Err(ProviderError::Config {
                        path: path.to_owned(),
                        reason: format!("provider {name:?}: cmd.path is empty"),
                    });
                }
            }
        }
        Ok(c)
    }

    /// Reads a config file.
    ///
    /// # Errors
    /// [`ProviderError::Config`].
    pub fn from_file(path: &Path) -> Result<Self, ProviderError> {
        let bytes = std::fs::read(path).map_err(|e| ProviderError::Config {
            path: path.display().to_string(),
            reason: format!("cannot read it: {e}"),
        })?;
        Self::parse(&bytes, &path.display().to_string())
    }

    /// Reads the file named by `OCICRYPT_KEYPROVIDER_CONFIG`; `Ok(None)` when it is unset or
    /// empty (no providers, as in Go).
    ///
    /// # Errors
    /// [`ProviderError::Config`].
    pub fn from_env() -> Result<Option<Self>, ProviderError> {
        match std::env::var_os(ENV_CONFIG) {
            Some(p) if !p.is_empty() => Self::from_file(Path::new(&p)).map(Some),
            _ => Ok(None),
        }
    }

    /// The provider `name` (a `cmd` provider, or a `grpc` one with the `grpc` feature).
    ///
    /// # Errors
    /// [`ProviderError::UnknownProvider`], [`ProviderError::Unsupported`], or
    /// [`ProviderError::Config`] for an unusable gRPC address or TLS setting.
    pub fn provider(&self, name: &str) -> Result<Provider, ProviderError> {
        let a = self
            .key_providers
            .get(name)
            .ok_or_else(|| ProviderError::UnknownProvider {
                name: name.to_owned(),
                configured: if self.key_providers.is_empty() {
                    "none".to_owned()
                } else {
                    self.key_providers.keys().cloned().collect::<Vec<_>>().join(", ")
                },
            })?;
        match a {
            ProviderAttrs { cmd: Some(c), .. } => Ok(Provider::Command(CommandProvider {
                name: name.to_owned(),
                path: c.path.clone(),
                args: c.args.clone(),
                timeout: DEFAULT_TIMEOUT,
            })),
            #[cfg(feature = "grpc")]
            ProviderAttrs { grpc: Some(addr), .. } => {
                let mut g = grpc::GrpcProvider::new(name, addr.trim());
                if let Some(t) = &a.grpc_tls {
                    g = g.with_tls(t.clone());
                }
                g.check().map(Provider::Grpc)
            }
            #[cfg(not(feature = "grpc"))]
            ProviderAttrs { grpc: Some(_), .. } => Err(unsupported(name, "grpc")),
            ProviderAttrs { ttrpc: Some(_), .. } => Err(unsupported(name, "ttrpc")),
            _ => Err(unsupported(name, "a native provider")),
        }
    }

    /// A wrapper for `provider:<name>[:<param>]` (`params` are the recipient parameters).
    ///
    /// # Errors
    /// As [`provider`](Self::provider).
    pub fn wrapper(&self, name: &str, params: Vec<Vec<u8>>) -> Result<KeyProviderWrapper, ProviderError> {
        Ok(KeyProviderWrapper::new(self.provider(name)?, params))
    }

    /// An unwrapper for provider `name`.
    ///
    /// # Errors
    /// As [`provider`](Self::provider).
    pub fn unwrapper(&self, name: &str) -> Result<KeyProviderUnwrapper, ProviderError> {
        Ok(KeyProviderUnwrapper::new(self.provider(name)?))
    }

    /// Unwrappers for every provider (what skopeo tries on decrypt); providers with an
    /// unsupported transport are skipped with a warning.
    pub fn unwrappers(&self) -> Vec<KeyProviderUnwrapper> {
        self.key_providers
            .keys()
            .filter_map(|n| match self.unwrapper(n) {
                Ok(u) => Some(u),
                Err(e) => {
                    tracing::warn!("skipping key provider: {e}");
                    None
                }
            })
            .collect()
    }
}

fn unsupported(name: &str, kind: &str) -> ProviderError {
    ProviderError::Unsupported {
        name: name.to_owned(),
        kind: kind.to_owned(),
    }
}

// ------------------------------------------------------------------------------------------
// Protocol types

/// A byte string: serialized as standard base64 (like Go's `[]byte`), deserialized from base64
/// or from an array of numbers (like Rust serde's `Vec<u8>`). Zeroized on drop.
#[derive(Clone, PartialEq, Eq, Default, Zeroize, ZeroizeOnDrop)]
pub struct Bytes(pub Vec<u8>);

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bytes({} bytes)", self.0.len())
    }
}

impl From<&[u8]> for Bytes {
    fn from(b: &[u8]) -> Self {
        Self(b.to_vec())
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let z = Zeroizing::new(encode_b64(&self.0));
        s.serialize_str(&z)
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Bytes;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a base64 string or an array of byte values")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Bytes, E> {
                decode_b64(v)
                    .map(Bytes)
                    .map_err(|e| E::custom(format!("invalid base64: {e}")))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Bytes, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
                while let Some(b) = seq.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(Bytes(out))
            }
        }
        d.deserialize_any(V)
    }
}

fn null_as_empty<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Go's `config.DecryptConfig`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DecryptConfig {
    /// `Parameters map[string][][]byte`.
    #[serde(rename = "Parameters", default, deserialize_with = "null_as_empty")]
    pub parameters: BTreeMap<String, Vec<Bytes>>,
}

/// Go's `config.EncryptConfig`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct EncryptConfig {
    /// `Parameters map[string][][]byte` (the provider's recipients under its name).
    #[serde(rename = "Parameters", default, deserialize_with = "null_as_empty")]
    pub parameters: BTreeMap<String, Vec<Bytes>>,
    /// `DecryptConfig`.
    #[serde(rename = "DecryptConfig", default)]
    pub decrypt_config: DecryptConfig,
}

/// `keywrapparams`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct KeyWrapParams {
    /// `ec`.
    #[serde(default)]
    pub ec: Option<EncryptConfig>,
    /// `optsdata`: the private options JSON.
    #[serde(default)]
    pub optsdata: Option<Bytes>,
}

/// `keyunwrapparams`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct KeyUnwrapParams {
    /// `dc`.
    #[serde(default)]
    pub dc: Option<DecryptConfig>,
    /// `annotation`: the wrapped blob.
    #[serde(default)]
    pub annotation: Option<Bytes>,
}

/// The request (Go's `KeyProviderKeyWrapProtocolInput`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct KeyProviderRequest {
    /// `keywrap` or `keyunwrap`.
    pub op: String,
    /// Wrap parameters (nulls on unwrap).
    #[serde(default)]
    pub keywrapparams: KeyWrapParams,
    /// Unwrap parameters (nulls on wrap).
    #[serde(default)]
    pub keyunwrapparams: KeyUnwrapParams,
}

impl KeyProviderRequest {
    /// A wrap request for provider `name`, as Go builds it.
    pub fn keywrap(name: &str, params: &[Vec<u8>], optsdata: &[u8]) -> Self {
        let mut p = BTreeMap::new();
        p.insert(name.to_owned(), params.iter().map(|v| Bytes(v.clone())).collect());
        Self {
            op: OP_KEYWRAP.into(),
            keywrapparams: KeyWrapParams {
                ec: Some(EncryptConfig {
                    parameters: p,
                    decrypt_config: DecryptConfig::default(),
                }),
                optsdata: Some(Bytes(optsdata.to_vec())),
            },
            keyunwrapparams: KeyUnwrapParams::default(),
        }
    }

    /// An unwrap request, as Go builds it.
    pub fn keyunwrap(dc: DecryptConfig, annotation: &[u8]) -> Self {
        Self {
            op: OP_KEYUNWRAP.into(),
            keywrapparams: KeyWrapParams::default(),
            keyunwrapparams: KeyUnwrapParams {
                dc: Some(dc),
                annotation: Some(Bytes(annotation.to_vec())),
            },
        }
    }

    /// The JSON bytes (compact, field order as Go writes them).
    pub fn to_json(&self) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(serde_json::to_vec(self).expect("json"))
    }

    /// Parses a request.
    ///
    /// # Errors
    /// A serde error naming what is wrong.
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// `keywrapresults`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct KeyWrapResults {
    /// The wrapped blob.
    #[serde(default)]
    pub annotation: Option<Bytes>,
}

/// `keyunwrapresults`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct KeyUnwrapResults {
    /// The private options JSON.
    #[serde(default)]
    pub optsdata: Option<Bytes>,
}

/// The answer (Go's `KeyProviderKeyWrapProtocolOutput`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct KeyProviderResponse {
    /// Set on wrap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keywrapresults: Option<KeyWrapResults>,
    /// Set on unwrap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyunwrapresults: Option<KeyUnwrapResults>,
}

impl KeyProviderResponse {
    /// A wrap answer.
    pub fn wrapped(annotation: &[u8]) -> Self {
        Self {
            keywrapresults: Some(KeyWrapResults {
                annotation: Some(Bytes(annotation.to_vec())),
            }),
            keyunwrapresults: None,
        }
    }

    /// An unwrap answer.
    pub fn unwrapped(optsdata: &[u8]) -> Self {
        Self {
            keywrapresults: None,
            keyunwrapresults: Some(KeyUnwrapResults {
                optsdata: Some(Bytes(optsdata.to_vec())),
            }),
        }
    }

    /// The JSON bytes.
    pub fn to_json(&self) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(serde_json::to_vec(self).expect("json"))
    }
}

// ------------------------------------------------------------------------------------------
// Providers

/// A configured provider: a command, or a gRPC server (feature `grpc`).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Provider {
    /// `{"cmd": {"path", "args"}}`.
    Command(CommandProvider),
    /// `{"grpc": "HOST:PORT"}`.
    #[cfg(feature = "grpc")]
    Grpc(grpc::GrpcProvider),
}

impl Provider {
    /// The provider name.
    pub fn name(&self) -> &str {
        match self {
            Self::Command(c) => &c.name,
            #[cfg(feature = "grpc")]
            Self::Grpc(g) => g.name(),
        }
    }

    /// Runs a `keywrap` (a gRPC call is driven on a runtime of its own, on a scoped thread,
    /// so this works inside and outside tokio; async callers use
    /// [`KeyProviderWrapper::into_async`]).
    ///
    /// # Errors
    /// [`ProviderError`].
    pub fn keywrap(&self, params: &[Vec<u8>], optsdata: &[u8]) -> Result<Vec<u8>, ProviderError> {
        match self {
            Self::Command(c) => c.keywrap(params, optsdata),
            #[cfg(feature = "grpc")]
            Self::Grpc(g) => grpc::blocking(|| g.keywrap(params, optsdata)),
        }
    }

    /// Runs a `keyunwrap` (as [`keywrap`](Self::keywrap)).
    ///
    /// # Errors
    /// [`ProviderError`].
    pub fn keyunwrap(
        &self,
        dc: &DecryptConfig,
        annotation: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, ProviderError> {
        match self {
            Self::Command(c) => c.keyunwrap(dc, annotation),
            #[cfg(feature = "grpc")]
            Self::Grpc(g) => grpc::blocking(|| g.keyunwrap(dc, annotation)),
        }
    }
}

impl From<CommandProvider> for Provider {
    fn from(c: CommandProvider) -> Self {
        Self::Command(c)
    }
}

#[cfg(feature = "grpc")]
impl From<grpc::GrpcProvider> for Provider {
    fn from(g: grpc::GrpcProvider) -> Self {
        Self::Grpc(g)
    }
}

/// The annotation of a `keywrap` answer.
fn wrap_result(out: &[u8], bad: impl Fn(String) -> ProviderError) -> Result<Vec<u8>, ProviderError> {
    let resp: KeyProviderResponse =
        serde_json::from_slice(out).map_err(|e| bad(format!("not the protocol JSON: {}", json_error(&e))))?;
    match resp.keywrapresults.and_then(|r| r.annotation) {
        Some(a) if !a.0.is_empty() => Ok(a.0.clone()),
        _ => Err(bad("keywrapresults.annotation is missing or empty".into())),
    }
}

/// The private options of a `keyunwrap` answer.
fn unwrap_result(
    out: &[u8],
    bad: impl Fn(String) -> ProviderError,
) -> Result<Zeroizing<Vec<u8>>, ProviderError> {
    let resp: KeyProviderResponse =
        serde_json::from_slice(out).map_err(|e| bad(format!("not the protocol JSON: {}", json_error(&e))))?;
    match resp.keyunwrapresults.and_then(|r| r.optsdata) {
        Some(o) if !o.0.is_empty() => Ok(Zeroizing::new(o.0.clone())),
        _ => Err(bad("keyunwrapresults.optsdata is missing or empty".into())),
    }
}

/// A serde error without the input it may quote (a value of the wrong type can be key
/// material): its category and position.
fn json_error(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let what = match e.classify() {
        Category::Io => "read error",
        Category::Syntax => "syntax error",
        Category::Data => "unexpected value or type",
        Category::Eof => "unexpected end of input",
    };
    format!("{what} at line {} column {}", e.line(), e.column())
}

// ------------------------------------------------------------------------------------------
// Running a command provider

/// A `cmd` provider: runs `path args...` once per request.
#[derive(Clone, Debug)]
pub struct CommandProvider {
    name: String,
    path: PathBuf,
    args: Vec<String>,
    timeout: Duration,
}

impl CommandProvider {
    /// A provider from its parts.
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>, args: Vec<String>) -> Self {
        Self {
            name: name.into(),
            path: path.into(),
            args,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Sets the bound on one run (default [`DEFAULT_TIMEOUT`]).
    #[must_use]
    pub fn with_timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// The provider name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs the command with `input` on stdin and returns its stdout.
    ///
    /// # Errors
    /// [`ProviderError::Spawn`], [`ProviderError::Timeout`] (the command is killed),
    /// [`ProviderError::Failed`] (non-zero exit, with stderr).
    pub fn run(&self, input: &[u8]) -> Result<Zeroizing<Vec<u8>>, ProviderError> {
        let path = self.path.display().to_string();
        let mut child = Command::new(&self.path)
            .args(&self.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| ProviderError::Spawn {
                name: self.name.clone(),
                path: path.clone(),
                source: e,
            })?;
        let mut stdin = child.stdin.take().expect("piped");
        let input = Zeroizing::new(input.to_vec());
        let writer = std::thread::spawn(move || {
            // A provider that exits without reading gives EPIPE: not our error to report.
            let _ = stdin.write_all(&input);
        });
        let mut stdout = child.stdout.take().expect("piped");
        let out_reader = std::thread::spawn(move || {
            let mut buf = Zeroizing::new(Vec::new());
            let _ = (&mut stdout).take(MAX_STDOUT as u64 + 1).read_to_end(&mut buf);
            buf
        });
        let mut stderr = child.stderr.take().expect("piped");
        let err_reader = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = (&mut stderr).take(MAX_STDERR as u64).read_to_end(&mut buf);
            // drain the rest so the child never blocks on a full pipe
            let _ = std::io::copy(&mut stderr, &mut std::io::sink());
            buf
        });
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if Instant::now() >= deadline => break None,
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(ProviderError::Spawn {
                        name: self.name.clone(),
                        path,
                        source: e,
                    });
                }
            }
        };
        let Some(status) = status else {
            let _ = child.kill();
            let _ = child.wait();
            let _ = writer.join();
            // Readers end when the pipes close (the child is dead; grandchildren holding the
            // pipes would keep them open, so do not wait for them).
            return Err(ProviderError::Timeout {
                name: self.name.clone(),
                path,
                secs: self.timeout.as_secs().max(1),
            });
        };
        let _ = writer.join();
        let out = out_reader.join().unwrap_or_default();
        let err = err_reader.join().unwrap_or_default();
        if !status.success() {
            let mut stderr: String = String::from_utf8_lossy(&err).trim().chars().take(2000).collect();
            if stderr.is_empty() {
                stderr = "(no stderr)".into();
            }
            return Err(ProviderError::Failed {
                name: self.name.clone(),
                path,
                status: status.to_string(),
                stderr,
            });
        }
        if out.len() > MAX_STDOUT {
            return Err(ProviderError::BadAnswer {
                name: self.name.clone(),
                path,
                reason: format!("more than {MAX_STDOUT} bytes on stdout"),
            });
        }
        Ok(out)
    }

    fn bad(&self, reason: String) -> ProviderError {
        ProviderError::BadAnswer {
            name: self.name.clone(),
            path: self.path.display().to_string(),
            reason,
        }
    }

    /// Runs a `keywrap` and returns the annotation bytes.
    ///
    /// # Errors
    /// [`ProviderError`].
    pub fn keywrap(&self, params: &[Vec<u8>], optsdata: &[u8]) -> Result<Vec<u8>, ProviderError> {
        let out = self.run(&KeyProviderRequest::keywrap(&self.name, params, optsdata).to_json())?;
        wrap_result(&out, |r| self.bad(r))
    }

    /// Runs a `keyunwrap` and returns the private options JSON.
    ///
    /// # Errors
    /// [`ProviderError`].
    pub fn keyunwrap(
        &self,
        dc: &DecryptConfig,
        annotation: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, ProviderError> {
        let out = self.run(&KeyProviderRequest::keyunwrap(dc.clone(), annotation).to_json())?;
        unwrap_result(&out, |r| self.bad(r))
    }
}

/// A [`KeyWrapper`] backed by a key provider: scheme `provider.<name>`.
#[derive(Clone, Debug)]
pub struct KeyProviderWrapper {
    provider: Provider,
    scheme: String,
    params: Vec<Vec<u8>>,
}

impl KeyProviderWrapper {
    /// Wraps with `provider`, passing `params` (the `<param>` of `provider:<name>:<param>`
    /// recipients) under the provider's name in `ec.Parameters`.
    pub fn new(provider: impl Into<Provider>, params: Vec<Vec<u8>>) -> Self {
        let provider = provider.into();
        Self {
            scheme: format!("provider.{}", provider.name()),
            provider,
            params,
        }
    }
}

impl KeyWrapper for KeyProviderWrapper {
    fn scheme(&self) -> &str {
        &self.scheme
    }
    fn wrap_keys(&self, optsdata: &[u8]) -> Result<Vec<u8>, WrapError> {
        self.provider
            .keywrap(&self.params, optsdata)
            .map_err(|e| WrapError::Backend {
                context: format!("key provider {} wrap", self.provider.name()),
                source: Box::new(e),
            })
    }
}

/// A [`KeyUnwrapper`] backed by a key provider: scheme `provider.<name>`.
#[derive(Clone, Debug)]
pub struct KeyProviderUnwrapper {
    provider: Provider,
    scheme: String,
    dc: DecryptConfig,
}

impl KeyProviderUnwrapper {
    /// Unwraps with `provider`, sending an empty `dc.Parameters`.
    pub fn new(provider: impl Into<Provider>) -> Self {
        let provider = provider.into();
        Self {
            scheme: format!("provider.{}", provider.name()),
            provider,
            dc: DecryptConfig::default(),
        }
    }

    /// Sends these decrypt parameters to the provider (Go sends the whole decrypt config).
    #[must_use]
    pub fn with_parameters(mut self, parameters: BTreeMap<String, Vec<Vec<u8>>>) -> Self {
        self.dc.parameters = parameters
            .into_iter()
            .map(|(k, v)| (k, v.into_iter().map(Bytes).collect()))
            .collect();
        self
    }
}

impl KeyUnwrapper for KeyProviderUnwrapper {
    fn scheme(&self) -> &str {
        &self.scheme
    }
    fn unwrap_key(&self, blob: &[u8]) -> Result<Zeroizing<Vec<u8>>, UnwrapError> {
        self.provider
            .keyunwrap(&self.dc, blob)
            .map_err(|e| UnwrapError::Backend {
                context: format!("key provider {} unwrap", self.provider.name()),
                source: Box::new(e),
            })
    }
}

/// Runs a blocking key provider on tokio's blocking pool, so a provider command never occupies
/// an async worker thread (outside a tokio runtime it runs inline).
#[cfg(feature = "tokio")]
#[derive(Debug)]
pub struct OnBlockingPool<T>(std::sync::Arc<T>);

#[cfg(feature = "tokio")]
impl KeyProviderWrapper {
    /// This wrapper as an [`AsyncKeyWrapper`](crate::AsyncKeyWrapper): a command provider runs
    /// on tokio's blocking pool, a gRPC provider is called asynchronously (no `block_on`).
    pub fn into_async(self) -> std::sync::Arc<dyn crate::AsyncKeyWrapper> {
        match self.provider {
            #[cfg(feature = "grpc")]
            Provider::Grpc(g) => std::sync::Arc::new(grpc::GrpcWrapper::new(g, self.params)),
            _ => std::sync::Arc::new(OnBlockingPool(std::sync::Arc::new(self))),
        }
    }
}

#[cfg(feature = "tokio")]
impl KeyProviderUnwrapper {
    /// This unwrapper as an [`AsyncKeyUnwrapper`](crate::AsyncKeyUnwrapper): a command
    /// provider runs on tokio's blocking pool, a gRPC provider is called asynchronously.
    pub fn into_async(self) -> std::sync::Arc<dyn crate::AsyncKeyUnwrapper> {
        match self.provider {
            #[cfg(feature = "grpc")]
            Provider::Grpc(g) => std::sync::Arc::new(grpc::GrpcUnwrapper::new(g, self.dc)),
            _ => std::sync::Arc::new(OnBlockingPool(std::sync::Arc::new(self))),
        }
    }
}

#[cfg(feature = "tokio")]
fn on_pool<T, R>(
    inner: &std::sync::Arc<T>,
    f: impl FnOnce(&T) -> R + Send + 'static,
) -> crate::keywrap::BoxFuture<'static, Option<R>>
where
    T: Send + Sync + 'static,
    R: Send + 'static,
{
    let inner = inner.clone();
    match tokio::runtime::Handle::try_current() {
        Ok(h) => Box::pin(async move { h.spawn_blocking(move || f(&inner)).await.ok() }),
        Err(_) => Box::pin(std::future::ready(Some(f(&inner)))),
    }
}

#[cfg(feature = "tokio")]
impl crate::AsyncKeyWrapper for OnBlockingPool<KeyProviderWrapper> {
    fn scheme(&self) -> &str {
        &self.0.scheme
    }
    fn wrap_keys<'a>(
        &'a self,
        optsdata: &'a [u8],
    ) -> crate::keywrap::BoxFuture<'a, Result<Vec<u8>, WrapError>> {
        let data = Zeroizing::new(optsdata.to_vec());
        let fut = on_pool(&self.0, move |w| KeyWrapper::wrap_keys(w, &data));
        let name = self.0.provider.name().to_owned();
        Box::pin(async move {
            fut.await.unwrap_or_else(|| {
                Err(WrapError::Backend {
                    context: format!("key provider {name} wrap"),
                    source: "the blocking task failed".into(),
                })
            })
        })
    }
}

#[cfg(feature = "tokio")]
impl crate::AsyncKeyUnwrapper for OnBlockingPool<KeyProviderUnwrapper> {
    fn scheme(&self) -> &str {
        &self.0.scheme
    }
    fn unwrap_key<'a>(
        &'a self,
        blob: &'a [u8],
    ) -> crate::keywrap::BoxFuture<'a, Result<Zeroizing<Vec<u8>>, UnwrapError>> {
        let blob = blob.to_vec();
        let fut = on_pool(&self.0, move |u| KeyUnwrapper::unwrap_key(u, &blob));
        let name = self.0.provider.name().to_owned();
        Box::pin(async move {
            fut.await.unwrap_or_else(|| {
                Err(UnwrapError::Backend {
                    context: format!("key provider {name} unwrap"),
                    source: "the blocking task failed".into(),
                })
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_json_is_go_shaped() {
        let r = KeyProviderRequest::keywrap("kp", &[b"root-1".to_vec()], b"{\"a\":1}");
        assert_eq!(
            std::str::from_utf8(&r.to_json()).unwrap(),
            r#"{"op":"keywrap","keywrapparams":{"ec":{"Parameters":{"kp":["cm9vdC0x"]},"DecryptConfig":{"Parameters":{}}},"optsdata":"eyJhIjoxfQ=="},"keyunwrapparams":{"dc":null,"annotation":null}}"#
        );
        let r = KeyProviderRequest::keyunwrap(DecryptConfig::default(), b"blob");
        assert_eq!(
            std::str::from_utf8(&r.to_json()).unwrap(),
            r#"{"op":"keyunwrap","keywrapparams":{"ec":null,"optsdata":null},"keyunwrapparams":{"dc":{"Parameters":{}},"annotation":"YmxvYg=="}}"#
        );
    }

    #[test]
    fn bytes_accept_arrays_and_nulls() {
        let r: KeyProviderRequest = serde_json::from_str(
            r#"{"op":"keyunwrap","keywrapparams":{"ec":null,"optsdata":null},"keyunwrapparams":{"dc":{"Parameters":null},"annotation":[98,108,111,98]}}"#,
        )
        .unwrap();
        assert_eq!(r.keyunwrapparams.annotation.unwrap().0, b"blob");
        let a: KeyProviderResponse = serde_json::from_str(
            r#"{"keywrapresults":{"annotation":"YmxvYg=="},"keyunwrapresults":{"optsdata":null}}"#,
        )
        .unwrap();
        assert_eq!(a.keywrapresults.unwrap().annotation.unwrap().0, b"blob");
        assert!(
            serde_json::from_str::<KeyProviderResponse>(r#"{"keywrapresults":{"annotation":"***"}}"#)
                .is_err()
        );
    }

    #[test]
    fn config_parsing() {
        let c = KeyProviderConfig::from_json(
            br#"{"key-providers":{"a":{"cmd":{"path":"/bin/x","args":["-y"]}},"g":{"grpc":"localhost:1"}}}"#,
        )
        .unwrap();
        assert_eq!(c.provider("a").unwrap().name(), "a");
        #[cfg(not(feature = "grpc"))]
        {
            let e = c.provider("g").unwrap_err().to_string();
            assert!(e.contains("grpc") && e.contains("not support"), "{e}");
            assert_eq!(c.unwrappers().len(), 1);
        }
        #[cfg(feature = "grpc")]
        {
            assert_eq!(c.provider("g").unwrap().name(), "g");
            assert_eq!(c.unwrappers().len(), 2);
        }
        let e = c.provider("zz").unwrap_err().to_string();
        assert!(e.contains("a, g"), "{e}");
        assert!(KeyProviderConfig::from_json(br#"{"key-providers":{"x":{"grpc":" "}}}"#).is_err());
        assert!(KeyProviderConfig::from_json(br#"{"key-providers":{"x":{}}}"#).is_err());
        assert!(KeyProviderConfig::from_json(br#"{"key-providers":{"x":{"cmd":{"path":""}}}}"#).is_err());
        assert!(KeyProviderConfig::from_json(b"[").is_err());
    }

    #[cfg(feature = "tokio")]
    #[tokio::test]
    async fn async_adapters_run_the_command_off_the_runtime() {
        // A provider answering a fixed wrap result, via printf (no JSON tooling needed).
        let ans = r#"{"keywrapresults":{"annotation":"YmxvYg=="}}"#;
        let p = CommandProvider::new(
            "p",
            "/bin/sh",
            vec!["-c".into(), format!("cat >/dev/null; printf '%s' '{ans}'")],
        );
        let w = KeyProviderWrapper::new(p.clone(), vec![]).into_async();
        assert_eq!(w.scheme(), "provider.p");
        assert_eq!(w.wrap_keys(b"{}").await.unwrap(), b"blob");
        let u = KeyProviderUnwrapper::new(p).into_async();
        let e = u.unwrap_key(b"blob").await.unwrap_err();
        assert!(
            crate::keywrap::error_chain(&e).contains("optsdata is missing"),
            "{e}"
        );
    }

    #[test]
    fn command_errors() {
        let p = CommandProvider::new("sh", "/bin/sh", vec!["-c".into(), "echo boom >&2; exit 3".into()]);
        let e = p.run(b"{}").unwrap_err().to_string();
        assert!(e.contains("boom") && e.contains('3'), "{e}");
        let p = CommandProvider::new("sh", "/bin/sh", vec!["-c".into(), "exec sleep 30".into()])
            .with_timeout(Duration::from_millis(200));
        assert!(matches!(p.run(b"{}"), Err(ProviderError::Timeout { .. })));
        let p = CommandProvider::new("none", "/nonexistent/provider", vec![]);
        assert!(matches!(p.run(b"{}"), Err(ProviderError::Spawn { .. })));
        let p = CommandProvider::new(
            "cat",
            "/bin/sh",
            vec!["-c".into(), "cat >/dev/null; echo '{}'".into()],
        );
        assert!(p
            .keywrap(&[], b"x")
            .unwrap_err()
            .to_string()
            .contains("annotation is missing"));
    }
}

//! Key providers over gRPC (crate feature `grpc`): the client, and a server any provider can
//! be served with (feature `grpc-server`).
//!
//! The service is Go ocicrypt's `utils/keyprovider/keyprovider.proto`:
//!
//! ```proto
//! package keyprovider;
//! message keyProviderKeyWrapProtocolInput  { bytes KeyProviderKeyWrapProtocolInput = 1; }
//! message keyProviderKeyWrapProtocolOutput { bytes KeyProviderKeyWrapProtocolOutput = 1; }
//! service KeyProviderService {
//!   rpc WrapKey(keyProviderKeyWrapProtocolInput) returns (keyProviderKeyWrapProtocolOutput) {};
//!   rpc UnWrapKey(keyProviderKeyWrapProtocolInput) returns (keyProviderKeyWrapProtocolOutput) {};
//! }
//! ```
//!
//! The bytes are the same JSON request and answer as a `cmd` provider reads on stdin and
//! writes on stdout ([`KeyProviderRequest`], [`KeyProviderResponse`]). The two messages are
//! written by hand with `prost` and the calls made with tonic's generic client, so there is
//! no generated code and no `protoc`.
//!
//! As in Go, every call opens a new connection. Unlike Go (which dials with no deadline and
//! calls with `context.Background()`), connecting is bounded by
//! [`DEFAULT_CONNECT_TIMEOUT`], each call by [`DEFAULT_TIMEOUT`](super::DEFAULT_TIMEOUT),
//! and an answer larger than [`MAX_MESSAGE`] is refused. Without `grpc-tls` the connection is
//! plain-text HTTP/2 (as Go's `grpc.WithInsecure()`): use it on loopback or a unix socket.

use std::time::Duration;

use tonic::codec::ProstCodec;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use zeroize::{Zeroize, Zeroizing};

use super::{
    unwrap_result, wrap_result, DecryptConfig, GrpcTls, KeyProviderRequest, ProviderError, DEFAULT_TIMEOUT,
};
use crate::keywrap::{BoxFuture, UnwrapError, WrapError};
use crate::redact;

/// The gRPC service name.
pub const SERVICE: &str = "keyprovider.KeyProviderService";
/// The path of `WrapKey`.
pub const WRAP_KEY_PATH: &str = "/keyprovider.KeyProviderService/WrapKey";
/// The path of `UnWrapKey`.
pub const UNWRAP_KEY_PATH: &str = "/keyprovider.KeyProviderService/UnWrapKey";
/// Default bound on connecting to a provider.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request or answer message accepted (1 MiB; an answer is a wrapped key of a few
/// KiB).
pub const MAX_MESSAGE: usize = 1 << 20;

/// `keyProviderKeyWrapProtocolInput` (field 1: the request JSON). Zeroized on drop.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ProtocolInput {
    /// The request JSON.
    #[prost(bytes = "vec", tag = "1")]
    pub key_provider_key_wrap_protocol_input: Vec<u8>,
}

impl Drop for ProtocolInput {
    fn drop(&mut self) {
        self.key_provider_key_wrap_protocol_input.zeroize();
    }
}

/// `keyProviderKeyWrapProtocolOutput` (field 1: the answer JSON). Zeroized on drop.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ProtocolOutput {
    /// The answer JSON.
    #[prost(bytes = "vec", tag = "1")]
    pub key_provider_key_wrap_protocol_output: Vec<u8>,
}

impl Drop for ProtocolOutput {
    fn drop(&mut self) {
        self.key_provider_key_wrap_protocol_output.zeroize();
    }
}

/// A `{"grpc": "HOST:PORT"}` provider.
#[derive(Clone, Debug)]
pub struct GrpcProvider {
    name: String,
    addr: String,
    tls: Option<GrpcTls>,
    connect_timeout: Duration,
    timeout: Duration,
    max_message: usize,
}

impl GrpcProvider {
    /// A provider `name` at `addr` (`HOST:PORT`, `dns:///HOST:PORT` or `unix:PATH`).
    pub fn new(name: impl Into<String>, addr: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            addr: addr.into(),
            tls: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            timeout: DEFAULT_TIMEOUT,
            max_message: MAX_MESSAGE,
        }
    }

    /// Connects with TLS (`grpc-tls`).
    #[must_use]
    pub fn with_tls(mut self, tls: GrpcTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Sets the bounds on connecting and on one call.
    #[must_use]
    pub fn with_timeouts(mut self, connect: Duration, call: Duration) -> Self {
        self.connect_timeout = connect;
        self.timeout = call;
        self
    }

    /// Sets the largest answer accepted (default [`MAX_MESSAGE`]).
    #[must_use]
    pub fn with_max_message(mut self, bytes: usize) -> Self {
        self.max_message = bytes;
        self
    }

    /// The provider name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address as configured.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn config_error(&self, reason: String) -> ProviderError {
        ProviderError::Config {
            path: format!("provider {:?}", self.name),
            reason,
        }
    }

    /// Checks the address and TLS settings (without connecting or reading files).
    ///
    /// # Errors
    /// [`ProviderError::Config`].
    pub fn check(self) -> Result<Self, ProviderError> {
        self.uri()?;
        if let Some(t) = &self.tls {
            if t.insecure_skip_verify {
                return Err(self.config_error(
                    "grpc-tls \"insecure-skip-verify\": true is refused: give the provider's CA in \"root-ca-file\" instead"
                        .into(),
                ));
            }
            if t.cert_file.is_some() != t.key_file.is_some() {
                return Err(self.config_error(
                    "grpc-tls needs both \"cert-file\" and \"key-file\" for a client certificate, or neither"
                        .into(),
                ));
            }
        }
        Ok(self)
    }

    /// The endpoint URI: `http://HOST:PORT`, `https://HOST:PORT` with TLS, or `unix:PATH`.
    fn uri(&self) -> Result<String, ProviderError> {
        let a = self.addr.trim();
        if let Some(path) = a.strip_prefix("unix://").or_else(|| a.strip_prefix("unix:")) {
            if self.tls.is_some() {
                return Err(self.config_error("grpc-tls over a unix socket is not supported".into()));
            }
            if path.is_empty() {
                return Err(self.config_error("grpc address \"unix:\" names no socket".into()));
            }
            return Ok(format!("unix:{path}"));
        }
        let hostport = a
            .strip_prefix("dns:///")
            .or_else(|| a.strip_prefix("passthrough:///"))
            .unwrap_or(a);
        let ok = !hostport.is_empty()
            && !hostport.contains(['/', '?', '#', '@'])
            && !hostport.chars().any(char::is_whitespace)
            && hostport
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
        if !ok {
            return Err(self.config_error(format!(
                "grpc address \"{}\" is not HOST:PORT (or dns:///HOST:PORT, unix:PATH)",
                redact::token(a)
            )));
        }
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        Ok(format!("{scheme}://{hostport}"))
    }

    fn endpoint(&self) -> Result<Endpoint, ProviderError> {
        let uri = self.uri()?;
        let mut ep = Endpoint::from_shared(uri.clone())
            .map_err(|e| self.config_error(format!("grpc address: {e}")))?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true);
        if let Some(t) = &self.tls {
            let read = |what: &str, p: &std::path::Path| {
                std::fs::read(p).map_err(|e| {
                    self.config_error(format!("grpc-tls {what} {}: cannot read it: {e}", p.display()))
                })
            };
            let mut tc = ClientTlsConfig::new();
            match &t.root_ca_file {
                Some(p) => tc = tc.ca_certificate(Certificate::from_pem(read("root-ca-file", p)?)),
                None => tc = tc.with_native_roots(),
            }
            if let (Some(c), Some(k)) = (&t.cert_file, &t.key_file) {
                let key = Zeroizing::new(read("key-file", k)?);
                tc = tc.identity(Identity::from_pem(read("cert-file", c)?, &*key));
            }
            if let Some(n) = &t.server_name {
                tc = tc.domain_name(n.clone());
            }
            ep = ep
                .tls_config(tc)
                .map_err(|e| self.config_error(format!("grpc-tls: {}", chain(&e))))?;
        }
        Ok(ep)
    }

    /// Sends `input` (a request's JSON) to `path` ([`WRAP_KEY_PATH`] or [`UNWRAP_KEY_PATH`])
    /// and returns the answer's JSON.
    ///
    /// # Errors
    /// [`ProviderError::Connect`], [`ProviderError::GrpcTimeout`], [`ProviderError::Status`],
    /// [`ProviderError::Config`] (TLS files).
    pub async fn call(&self, path: &'static str, input: &[u8]) -> Result<Zeroizing<Vec<u8>>, ProviderError> {
        let ep = self.endpoint()?;
        let connect = async {
            let ch = ep.connect().await.map_err(|e| self.connect_error(&e))?;
            let mut g = tonic::client::Grpc::new(ch)
                .max_decoding_message_size(self.max_message)
                .max_encoding_message_size(MAX_MESSAGE.max(input.len() + 64));
            g.ready().await.map_err(|e| self.connect_error(&e))?;
            Ok::<_, ProviderError>(g)
        };
        let mut g =
            match tokio::time::timeout(self.connect_timeout + Duration::from_millis(500), connect).await {
                Ok(r) => r?,
                Err(_) => {
                    return Err(ProviderError::Connect {
                        name: self.name.clone(),
                        addr: self.addr.clone(),
                        reason: format!("no connection within {} s", self.connect_timeout.as_secs().max(1)),
                    })
                }
            };
        let mut req = tonic::Request::new(ProtocolInput {
            key_provider_key_wrap_protocol_input: input.to_vec(),
        });
        req.set_timeout(self.timeout);
        let codec = ProstCodec::<ProtocolInput, ProtocolOutput>::default();
        let call = g.unary(req, http::uri::PathAndQuery::from_static(path), codec);
        match tokio::time::timeout(self.timeout, call).await {
            Err(_) => Err(self.timeout_error()),
            Ok(Err(s)) if is_timeout(&s) => Err(self.timeout_error()),
            Ok(Err(s)) => Err(self.status_error(&s)),
            Ok(Ok(r)) => {
                let mut out = r.into_inner();
                Ok(Zeroizing::new(std::mem::take(
                    &mut out.key_provider_key_wrap_protocol_output,
                )))
            }
        }
    }

    /// `WrapKey`: returns the annotation bytes.
    ///
    /// # Errors
    /// [`ProviderError`].
    pub async fn keywrap(&self, params: &[Vec<u8>], optsdata: &[u8]) -> Result<Vec<u8>, ProviderError> {
        let req = KeyProviderRequest::keywrap(&self.name, params, optsdata).to_json();
        let out = self.call(WRAP_KEY_PATH, &req).await?;
        wrap_result(&out, |r| self.bad(r))
    }

    /// `UnWrapKey`: returns the private options JSON.
    ///
    /// # Errors
    /// [`ProviderError`].
    pub async fn keyunwrap(
        &self,
        dc: &DecryptConfig,
        annotation: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, ProviderError> {
        let req = KeyProviderRequest::keyunwrap(dc.clone(), annotation).to_json();
        let out = self.call(UNWRAP_KEY_PATH, &req).await?;
        unwrap_result(&out, |r| self.bad(r))
    }

    fn bad(&self, reason: String) -> ProviderError {
        ProviderError::BadAnswer {
            name: self.name.clone(),
            path: self.addr.clone(),
            reason,
        }
    }

    fn connect_error(&self, e: &(dyn std::error::Error + 'static)) -> ProviderError {
        ProviderError::Connect {
            name: self.name.clone(),
            addr: self.addr.clone(),
            reason: chain(e),
        }
    }

    fn timeout_error(&self) -> ProviderError {
        ProviderError::GrpcTimeout {
            name: self.name.clone(),
            addr: self.addr.clone(),
            secs: self.timeout.as_secs().max(1),
        }
    }

    fn status_error(&self, s: &tonic::Status) -> ProviderError {
        if s.code() == tonic::Code::Unavailable {
            return self.connect_error(s);
        }
        let msg: String = redact::server_text(s.message(), &[]).chars().take(300).collect();
        ProviderError::Status {
            name: self.name.clone(),
            addr: self.addr.clone(),
            code: format!("{:?}", s.code()),
            message: if msg.is_empty() {
                "(no message)".into()
            } else {
                msg
            },
        }
    }
}

/// A deadline status: the server's `DEADLINE_EXCEEDED`, or tonic's own `grpc-timeout` cut-off.
fn is_timeout(s: &tonic::Status) -> bool {
    use std::error::Error as _;
    s.code() == tonic::Code::DeadlineExceeded
        || (s.code() == tonic::Code::Cancelled
            && (s.message() == "Timeout expired"
                || s.source()
                    .is_some_and(|e| e.downcast_ref::<tonic::TimeoutExpired>().is_some())))
}

/// An error and its sources, `: `-joined, without repeats (tonic nests the same text).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(e);
    while let Some(err) = cur {
        let t = redact::server_text(&err.to_string(), &[]);
        if !t.is_empty() && !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        cur = err.source();
    }
    parts.join(": ").chars().take(400).collect()
}

/// Runs `f`'s future to completion on a current-thread runtime of its own, on a scoped
/// thread (so it works whether or not the caller is inside a tokio runtime).
pub(super) fn blocking<'a, T, F>(f: impl FnOnce() -> F + Send + 'a) -> Result<T, ProviderError>
where
    F: std::future::Future<Output = Result<T, ProviderError>>,
    T: Send,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| ProviderError::Config {
                    path: "<runtime>".into(),
                    reason: format!("cannot start an async runtime for a gRPC key provider: {e}"),
                })?;
            rt.block_on(f())
        })
        .join()
        .unwrap_or_else(|_| {
            Err(ProviderError::Config {
                path: "<runtime>".into(),
                reason: "the gRPC key provider call panicked".into(),
            })
        })
    })
}

/// A gRPC provider as an [`AsyncKeyWrapper`](crate::AsyncKeyWrapper) (from
/// [`KeyProviderWrapper::into_async`](super::KeyProviderWrapper::into_async)).
#[derive(Debug)]
pub struct GrpcWrapper {
    provider: GrpcProvider,
    scheme: String,
    params: Vec<Vec<u8>>,
}

impl GrpcWrapper {
    /// Wraps with `provider`, passing `params` under its name in `ec.Parameters`.
    pub fn new(provider: GrpcProvider, params: Vec<Vec<u8>>) -> Self {
        Self {
            scheme: format!("provider.{}", provider.name),
            provider,
            params,
        }
    }
}

impl crate::AsyncKeyWrapper for GrpcWrapper {
    fn scheme(&self) -> &str {
        &self.scheme
    }
    fn wrap_keys<'a>(&'a self, optsdata: &'a [u8]) -> BoxFuture<'a, Result<Vec<u8>, WrapError>> {
        Box::pin(async move {
            self.provider
                .keywrap(&self.params, optsdata)
                .await
                .map_err(|e| WrapError::Backend {
                    context: format!("key provider {} wrap", self.provider.name),
                    source: Box::new(e),
                })
        })
    }
}

/// A gRPC provider as an [`AsyncKeyUnwrapper`](crate::AsyncKeyUnwrapper) (from
/// [`KeyProviderUnwrapper::into_async`](super::KeyProviderUnwrapper::into_async)).
#[derive(Debug)]
pub struct GrpcUnwrapper {
    provider: GrpcProvider,
    scheme: String,
    dc: DecryptConfig,
}

impl GrpcUnwrapper {
    /// Unwraps with `provider`, sending `dc`.
    pub fn new(provider: GrpcProvider, dc: DecryptConfig) -> Self {
        Self {
            scheme: format!("provider.{}", provider.name),
            provider,
            dc,
        }
    }
}

impl crate::AsyncKeyUnwrapper for GrpcUnwrapper {
    fn scheme(&self) -> &str {
        &self.scheme
    }
    fn unwrap_key<'a>(&'a self, blob: &'a [u8]) -> BoxFuture<'a, Result<Zeroizing<Vec<u8>>, UnwrapError>> {
        Box::pin(async move {
            self.provider
                .keyunwrap(&self.dc, blob)
                .await
                .map_err(|e| UnwrapError::Backend {
                    context: format!("key provider {} unwrap", self.provider.name),
                    source: Box::new(e),
                })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn messages_encode_as_the_proto_does() {
        // field 1, wire type 2 (length-delimited): tag byte 0x0a
        let m = ProtocolInput {
            key_provider_key_wrap_protocol_input: b"{}".to_vec(),
        };
        assert_eq!(m.encode_to_vec(), b"\x0a\x02{}");
        let o = ProtocolOutput::decode(&b"\x0a\x03abc"[..]).unwrap();
        assert_eq!(o.key_provider_key_wrap_protocol_output, b"abc");
    }

    #[test]
    fn addresses() {
        let u = |a: &str| GrpcProvider::new("p", a).uri();
        assert_eq!(u("localhost:50051").unwrap(), "http://localhost:50051");
        assert_eq!(u("dns:///127.0.0.1:1").unwrap(), "http://127.0.0.1:1");
        assert_eq!(u("[::1]:7").unwrap(), "http://[::1]:7");
        assert_eq!(u("unix:///run/kp.sock").unwrap(), "unix:/run/kp.sock");
        for bad in ["localhost", "http://x:1", "x:99999", ":1", "a b:1"] {
            assert!(u(bad).is_err(), "{bad}");
        }
        let t = GrpcProvider::new("p", "h:1").with_tls(GrpcTls::default());
        assert_eq!(t.uri().unwrap(), "https://h:1");
        let skip = GrpcTls {
            insecure_skip_verify: true,
            ..GrpcTls::default()
        };
        let e = GrpcProvider::new("p", "h:1")
            .with_tls(skip)
            .check()
            .unwrap_err()
            .to_string();
        assert!(e.contains("insecure-skip-verify"), "{e}");
    }

    #[tokio::test]
    async fn provider_down_is_a_bounded_clear_error() {
        // A port that was free a moment ago: connection refused.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        let p = GrpcProvider::new("down", addr.clone())
            .with_timeouts(Duration::from_secs(2), Duration::from_secs(2));
        let t = std::time::Instant::now();
        let e = p.keyunwrap(&DecryptConfig::default(), b"blob").await.unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(5));
        let s = e.to_string();
        assert!(matches!(e, ProviderError::Connect { .. }), "{s}");
        assert!(s.contains("\"down\"") && s.contains(&addr), "{s}");
    }
}

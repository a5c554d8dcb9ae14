//! The server side of gRPC key providers (crate feature `grpc-server`): serve any provider's
//! request handler as `keyprovider.KeyProviderService` (Go ocicrypt's proto), on TCP or a
//! unix socket, with bounded message sizes and a graceful shutdown.
//!
//! The service has no authentication: whoever can connect can wrap and unwrap. Listen on
//! loopback or on a unix socket only its users can open ([`Listener::bind`] refuses other
//! addresses unless told otherwise).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::codec::ProstCodec;
use tonic::codegen::tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::codegen::{http, Body, Service, StdError};
use tonic::server::NamedService;
use zeroize::Zeroizing;

use super::grpc::{ProtocolInput, ProtocolOutput, MAX_MESSAGE, SERVICE, UNWRAP_KEY_PATH, WRAP_KEY_PATH};
use super::{OP_KEYUNWRAP, OP_KEYWRAP};
use crate::keywrap::BoxFuture;
use crate::redact;

/// Which method a request came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// `WrapKey` (`op` must be `keywrap`).
    WrapKey,
    /// `UnWrapKey` (`op` must be `keyunwrap`).
    UnWrapKey,
}

/// A provider: turns one request JSON into the answer JSON, or a gRPC status (whose message
/// must quote no key material).
pub trait Handler: Send + Sync + 'static {
    /// Serves one request. `input` is the request JSON; its `op` has been checked against
    /// `method`.
    fn handle(
        &self,
        method: Method,
        input: Zeroizing<Vec<u8>>,
    ) -> BoxFuture<'static, Result<Zeroizing<Vec<u8>>, tonic::Status>>;
}

/// `keyprovider.KeyProviderService` around a [`Handler`]: a `tower::Service` for tonic's server.
pub struct KeyProviderService<H> {
    handler: Arc<H>,
}

impl<H> Clone for KeyProviderService<H> {
    fn clone(&self) -> Self {
        Self {
            handler: self.handler.clone(),
        }
    }
}

impl<H: Handler> KeyProviderService<H> {
    /// The service.
    pub fn new(handler: H) -> Self {
        Self {
            handler: Arc::new(handler),
        }
    }
}

impl<H> NamedService for KeyProviderService<H> {
    const NAME: &'static str = SERVICE;
}

struct Unary<H> {
    handler: Arc<H>,
    method: Method,
}

impl<H: Handler> tonic::server::UnaryService<ProtocolInput> for Unary<H> {
    type Response = ProtocolOutput;
    type Future = BoxFuture<'static, Result<tonic::Response<ProtocolOutput>, tonic::Status>>;

    fn call(&mut self, req: tonic::Request<ProtocolInput>) -> Self::Future {
        let handler = self.handler.clone();
        let method = self.method;
        Box::pin(async move {
            let mut msg = req.into_inner();
            let input = Zeroizing::new(std::mem::take(&mut msg.key_provider_key_wrap_protocol_input));
            check_op(method, &input)?;
            let mut out = handler.handle(method, input).await?;
            Ok(tonic::Response::new(ProtocolOutput {
                key_provider_key_wrap_protocol_output: std::mem::take(&mut *out),
            }))
        })
    }
}

/// The request's `op` must match the method (Go's providers check it in the JSON only).
#[allow(clippy::result_large_err)] // tonic::Status is what the service returns anyway
fn check_op(method: Method, input: &[u8]) -> Result<(), tonic::Status> {
    #[derive(serde::Deserialize)]
    struct Op {
        op: String,
    }
    let op = serde_json::from_slice::<Op>(input)
        .map_err(|e| {
            tonic::Status::invalid_argument(format!(
                "not a keyprovider request {{\"op\", …}}: {}",
                super::json_error(&e)
            ))
        })?
        .op;
    let want = match method {
        Method::WrapKey => OP_KEYWRAP,
        Method::UnWrapKey => OP_KEYUNWRAP,
    };
    if op != want {
        return Err(tonic::Status::invalid_argument(format!(
            "op \"{}\" sent to {method:?} (expected \"{want}\")",
            redact::token(&op)
        )));
    }
    Ok(())
}

impl<H, B> Service<http::Request<B>> for KeyProviderService<H>
where
    H: Handler,
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = match req.uri().path() {
            WRAP_KEY_PATH => Method::WrapKey,
            UNWRAP_KEY_PATH => Method::UnWrapKey,
            _ => {
                return Box::pin(async {
                    Ok(tonic::Status::unimplemented(
                        "keyprovider.KeyProviderService has WrapKey and UnWrapKey only",
                    )
                    .into_http())
                })
            }
        };
        let svc = Unary {
            handler: self.handler.clone(),
            method,
        };
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(ProstCodec::<ProtocolOutput, ProtocolInput>::default())
                .apply_max_message_size_config(Some(MAX_MESSAGE), Some(MAX_MESSAGE));
            Ok(grpc.unary(svc, req).await)
        })
    }
}

/// Where to listen.
#[derive(Debug)]
pub enum Listener {
    /// A bound TCP socket.
    Tcp(tokio::net::TcpListener),
    /// A bound unix socket (removed again when serving ends).
    Unix(tokio::net::UnixListener, PathBuf),
}

/// Why a listener could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ListenError {
    /// The address is not `HOST:PORT` or `unix:PATH`.
    #[error("listen address \"{0}\" is not HOST:PORT or unix:PATH")]
    BadAddress(String),
    /// A TCP address that is not loopback, without `allow_remote`.
    #[error("{addr} is not a loopback address: the gRPC key provider has no authentication, so it listens on 127.0.0.1, [::1] or a unix socket (pass --allow-remote to bind elsewhere, behind your own TLS and access control)")]
    NotLoopback {
        /// The address.
        addr: String,
    },
    /// Binding failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl Listener {
    /// Binds `addr` (`HOST:PORT`, `[V6]:PORT`, `unix:PATH`). TCP addresses must resolve to
    /// loopback only, unless `allow_remote`. A unix socket is created 0600; an existing socket
    /// file at `PATH` (from a previous run) is replaced, any other file is an error.
    ///
    /// # Errors
    /// [`ListenError`].
    pub async fn bind(addr: &str, allow_remote: bool) -> Result<Self, ListenError> {
        let bind_err = |source| ListenError::Bind {
            addr: addr.to_owned(),
            source,
        };
        if let Some(path) = addr
            .strip_prefix("unix://")
            .or_else(|| addr.strip_prefix("unix:"))
        {
            if path.is_empty() {
                return Err(ListenError::BadAddress(redact::token(addr).into_owned()));
            }
            let path = PathBuf::from(path);
            use std::os::unix::fs::{FileTypeExt, PermissionsExt};
            match std::fs::symlink_metadata(&path) {
                Ok(m) if m.file_type().is_socket() => std::fs::remove_file(&path).map_err(bind_err)?,
                Ok(_) => {
                    return Err(bind_err(std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        "a file that is not a socket is in the way",
                    )))
                }
                Err(_) => {}
            }
            let l = tokio::net::UnixListener::bind(&path).map_err(bind_err)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
            return Ok(Self::Unix(l, path));
        }
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(addr)
            .await
            .map_err(|_| ListenError::BadAddress(redact::token(addr).into_owned()))?
            .collect();
        if addrs.is_empty() {
            return Err(ListenError::BadAddress(redact::token(addr).into_owned()));
        }
        if !allow_remote && addrs.iter().any(|a| !a.ip().is_loopback()) {
            return Err(ListenError::NotLoopback {
                addr: addr.to_owned(),
            });
        }
        let l = tokio::net::TcpListener::bind(&addrs[..])
            .await
            .map_err(bind_err)?;
        Ok(Self::Tcp(l))
    }

    /// The bound address: `127.0.0.1:PORT` (the real port when 0 was asked) or `unix:PATH`.
    pub fn local_addr(&self) -> String {
        match self {
            Self::Tcp(l) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            Self::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }
}

/// How long calls in flight may take to finish after shutdown was asked for (connections still
/// open after that, such as idle clients that keep theirs, are dropped).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Serves `handler` on `listener` until `shutdown` completes, then lets calls in flight finish
/// (at most [`SHUTDOWN_GRACE`]; each call is also cut off after 120 s).
///
/// # Errors
/// tonic's transport error.
pub async fn serve<H: Handler>(
    listener: Listener,
    handler: H,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let svc = KeyProviderService::new(handler);
    let server = tonic::transport::Server::builder()
        .timeout(Duration::from_secs(120))
        .concurrency_limit_per_connection(32)
        .max_frame_size(Some(1 << 16));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        let _ = tx.send(());
    };
    let grace = async move {
        if rx.await.is_err() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(SHUTDOWN_GRACE).await;
        tracing::warn!("connections still open {SHUTDOWN_GRACE:?} after shutdown: dropping them");
    };
    let (serving, path): (BoxFuture<'_, _>, _) = match listener {
        Listener::Tcp(l) => (
            Box::pin(server.serve_with_incoming_shutdown(svc, TcpListenerStream::new(l), signal)),
            None,
        ),
        Listener::Unix(l, path) => (
            Box::pin(server.serve_with_incoming_shutdown(svc, UnixListenerStream::new(l), signal)),
            Some(path),
        ),
    };
    let r = tokio::select! {
        r = serving => r,
        () = grace => Ok(()),
    };
    if let Some(p) = path {
        let _ = std::fs::remove_file(p);
    }
    r
}

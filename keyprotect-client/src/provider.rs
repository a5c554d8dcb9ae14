//! The server side of the ocicrypt keyprovider protocol, backed by Key Protect (the
//! `keyprotect-keyprovider` binary).
//!
//! Configure it for skopeo/buildah/imgcrypt in the file named by `OCICRYPT_KEYPROVIDER_CONFIG`:
//!
//! ```json
//! {"key-providers":{"keyprotect":{"cmd":{"path":"/usr/local/bin/keyprotect-keyprovider","args":[]}}}}
//! ```
//!
//! and encrypt with `--encryption-key provider:keyprotect:<root-key-id>`. Over gRPC
//! (`keyprotect-keyprovider --grpc 127.0.0.1:50051`, [`serve_grpc`]) the entry is
//! `{"keyprotect": {"grpc": "127.0.0.1:50051"}}`. The annotation it
//! produces is the same `{"kp_url","instance_id","root_key_id","ciphertext"}` JSON as
//! [`KeyProtectWrapper`](crate::KeyProtectWrapper), so images are interchangeable between the
//! provider and imgcrypt's built-in `provider:keyprotect` recipients (when the provider is
//! registered under the name `keyprotect`).

use ocicrypt_core::keyprovider::grpc_server;
use ocicrypt_core::keyprovider::{KeyProviderRequest, KeyProviderResponse, OP_KEYUNWRAP, OP_KEYWRAP};
use ocicrypt_core::keywrap::error_chain;
use ocicrypt_core::redact::token;
use ocicrypt_core::{AsyncKeyUnwrapper, AsyncKeyWrapper};
use zeroize::Zeroizing;

use crate::{Client, KeyProtectUnwrapper, KeyProtectWrapper};

/// How the provider was configured.
#[derive(Clone, Debug)]
pub struct ProviderOptions {
    /// The name it is registered under (its key in `ec.Parameters`); default `keyprotect`.
    pub name: String,
    /// Root key used when the recipient carries no parameter (`provider:keyprotect`).
    pub default_root_key: Option<String>,
}

impl Default for ProviderOptions {
    fn default() -> Self {
        Self {
            name: "keyprotect".into(),
            default_root_key: None,
        }
    }
}

/// Why a request could not be served (printed on stderr by the binary, which exits 1).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProviderServeError {
    /// The request is not the protocol's JSON.
    #[error("invalid keyprovider request: {0}")]
    BadRequest(String),
    /// Wrapping failed.
    #[error("keywrap: {0}")]
    Wrap(#[source] ocicrypt_core::WrapError),
    /// Unwrapping failed.
    #[error("keyunwrap: {0}")]
    Unwrap(#[source] ocicrypt_core::UnwrapError),
}

/// Serves one request (`input` = the JSON read from stdin) and returns the JSON answer.
///
/// # Errors
/// [`ProviderServeError`].
pub async fn serve_request(
    client: &Client,
    opts: &ProviderOptions,
    input: &[u8],
) -> Result<Zeroizing<Vec<u8>>, ProviderServeError> {
    // serde's message quotes a value of the wrong type (a key, a password): never print it.
    let req = KeyProviderRequest::from_json(input).map_err(|e| {
        ProviderServeError::BadRequest(format!(
            "not a keyprovider request {{\"op\", \"keywrapparams\"|\"keyunwrapparams\"}}: {} at line {} column {}",
            crate::wrapper::json_error_kind(&e),
            e.line(),
            e.column()
        ))
    })?;
    match req.op.as_str() {
        OP_KEYWRAP => {
            let ec = req
                .keywrapparams
                .ec
                .as_ref()
                .ok_or_else(|| ProviderServeError::BadRequest("keywrapparams.ec is null".into()))?;
            let optsdata = req
                .keywrapparams
                .optsdata
                .as_ref()
                .filter(|o| !o.0.is_empty())
                .ok_or_else(|| ProviderServeError::BadRequest("keywrapparams.optsdata is missing".into()))?;
            let params = match ec.parameters.get(&opts.name) {
                Some(p) => p.clone(),
                None if ec.parameters.len() == 1 => {
                    ec.parameters.values().next().cloned().unwrap_or_default()
                }
                None => {
                    return Err(ProviderServeError::BadRequest(format!(
                        "ec.Parameters has no entry \"{}\" (this provider's name; set it with --name)",
                        token(&opts.name)
                    )))
                }
            };
            let ids: Vec<String> = params
                .iter()
                .map(|p| String::from_utf8_lossy(&p.0).trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect();
            let root = match (ids.as_slice(), &opts.default_root_key) {
                ([one], _) => one.clone(),
                ([], Some(d)) => d.clone(),
                ([], None) => return Err(ProviderServeError::BadRequest(
                    "no root key id: use provider:<name>:<root-key-id> or start the provider with --root-key"
                        .into(),
                )),
                (many, _) => {
                    return Err(ProviderServeError::BadRequest(format!(
                        "{} root keys given; one provider recipient takes one root key",
                        many.len()
                    )))
                }
            };
            let w = KeyProtectWrapper::new(client.clone(), root);
            let blob = w.wrap_keys(&optsdata.0).await.map_err(ProviderServeError::Wrap)?;
            Ok(KeyProviderResponse::wrapped(&blob).to_json())
        }
        OP_KEYUNWRAP => {
            let ann = req
                .keyunwrapparams
                .annotation
                .as_ref()
                .filter(|a| !a.0.is_empty())
                .ok_or_else(|| {
                    ProviderServeError::BadRequest("keyunwrapparams.annotation is missing".into())
                })?;
            let u = KeyProtectUnwrapper::new(client.clone());
            let opts = u.unwrap_key(&ann.0).await.map_err(ProviderServeError::Unwrap)?;
            Ok(KeyProviderResponse::unwrapped(&opts).to_json())
        }
        other => Err(ProviderServeError::BadRequest(format!(
            "unknown op \"{}\" (expected keywrap or keyunwrap)",
            token(other)
        ))),
    }
}

/// Key Protect as a gRPC key-provider handler (`keyprotect-keyprovider --grpc`): each request
/// is served as [`serve_request`] serves stdin; a bad request is `INVALID_ARGUMENT`, a failed
/// wrap or unwrap `FAILED_PRECONDITION` with the (redacted) reason.
#[derive(Clone, Debug)]
pub struct GrpcHandler {
    client: Client,
    opts: ProviderOptions,
}

impl GrpcHandler {
    /// A handler for `client` configured by `opts`.
    pub fn new(client: Client, opts: ProviderOptions) -> Self {
        Self { client, opts }
    }
}

impl grpc_server::Handler for GrpcHandler {
    fn handle(
        &self,
        _method: grpc_server::Method,
        input: Zeroizing<Vec<u8>>,
    ) -> ocicrypt_core::keywrap::BoxFuture<'static, Result<Zeroizing<Vec<u8>>, tonic::Status>> {
        let me = self.clone();
        Box::pin(async move {
            serve_request(&me.client, &me.opts, &input)
                .await
                .map_err(|e| match e {
                    ProviderServeError::BadRequest(m) => tonic::Status::invalid_argument(m),
                    e => {
                        tracing::warn!("keyprovider request failed: {}", error_chain(&e));
                        tonic::Status::failed_precondition(error_chain(&e))
                    }
                })
        })
    }
}

/// Serves Key Protect over gRPC on `listener` until SIGTERM or SIGINT, then finishes the calls
/// in flight.
///
/// # Errors
/// The transport's error, or a signal handler that cannot be installed.
pub async fn serve_grpc(
    client: Client,
    opts: ProviderOptions,
    listener: grpc_server::Listener,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("signal received: finishing calls in flight");
    };
    grpc_server::serve(listener, GrpcHandler::new(client, opts), shutdown).await?;
    Ok(())
}

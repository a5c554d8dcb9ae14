//! What can go wrong reaching an image: one variant per thing a caller can act on.
//!
//! Errors of [`ImageSource`](ocicrypt_core::image::ImageSource) and
//! [`ImageDest`](ocicrypt_core::image::ImageDest) methods are `ocicrypt_core::Error`s; a
//! registry failure travels inside one as [`ocicrypt_core::Error::Io`] wrapping this type, and
//! [`Error::find`] gets it back.

use crate::credhelper::HelperError;
use crate::tls::{TlsError, TlsFailure};

/// What went wrong talking to a registry or resolving how to reach it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Credentials missing or refused.
    #[error("registry {registry}: authentication failed: {detail}")]
    Auth {
        /// `host[:port]`.
        registry: String,
        /// What happened.
        detail: String,
    },
    /// The registry cannot be reached, timed out or failed (5xx).
    #[error("registry {registry}: {detail}")]
    Network {
        /// `host[:port]`.
        registry: String,
        /// What happened.
        detail: String,
    },
    /// The image or a blob does not exist.
    #[error("{what} does not exist in registry {registry}")]
    NotFound {
        /// `host[:port]`.
        registry: String,
        /// What was asked for.
        what: String,
    },
    /// The TLS handshake failed (certificate not trusted, expired, wrong name; client
    /// certificate required; plain HTTP).
    #[error("registry {registry}: TLS handshake failed: {}", failure.reason())]
    Tls {
        /// `host[:port]`.
        registry: String,
        /// Why.
        failure: TlsFailure,
    },
    /// The registry said no (another 4xx) or answered something unexpected.
    #[error("registry {registry}: {detail}")]
    Protocol {
        /// `host[:port]`.
        registry: String,
        /// What happened.
        detail: String,
    },
    /// An image reference that does not parse.
    #[error("bad image reference {input:?}: {why}")]
    BadReference {
        /// The reference as given.
        input: String,
        /// What is wrong with it.
        why: String,
    },
    /// A registry host that does not make a URL.
    #[error("{url} is not a valid registry URL: {detail}")]
    BadUrl {
        /// The URL built from the host.
        url: String,
        /// Why.
        detail: String,
    },
    /// Credentials that are not `USER:PASSWORD`.
    #[error("{origin} must be USER:PASSWORD")]
    BadCreds {
        /// Where they came from (`--creds`, an auth file).
        origin: String,
    },
    /// An auth file that cannot be read.
    #[error("cannot read auth file {path}: {source}")]
    AuthFileUnreadable {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// An auth file that is not JSON.
    #[error("auth file {path} is not valid JSON: {detail}")]
    AuthFileSyntax {
        /// The file.
        path: String,
        /// The parser's message.
        detail: String,
    },
    /// An `auths` entry whose `auth` is not `base64(USER:PASSWORD)`.
    #[error("auth file {path}: the \"auth\" entry for {key} is {problem}")]
    AuthEntry {
        /// The file.
        path: String,
        /// The entry's key (a registry).
        key: String,
        /// What is wrong (`not base64: …`, `not UTF-8`, `not base64(USER:PASSWORD)`).
        problem: String,
    },
    /// A credential helper named by `credHelpers` or `credsStore` failed or is missing.
    #[error("registry {registry}: {source} ({field} in {path})")]
    CredHelper {
        /// `host[:port]`.
        registry: String,
        /// The helper's name (`docker-credential-NAME`).
        helper: String,
        /// `credHelpers` or `credsStore`.
        field: &'static str,
        /// The auth file naming it.
        path: String,
        /// Why.
        source: Box<HelperError>,
    },
    /// A certificate directory (certs.d, `cert_dir`) that cannot be used.
    #[error("registry {registry}: {source}")]
    CertDir {
        /// `host[:port]`.
        registry: String,
        /// Why.
        source: Box<TlsError>,
    },
    /// The HTTP client cannot be built.
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

impl Error {
    /// The registry error carried by an `ocicrypt_core::Error` (directly, or inside the I/O
    /// error of a layer stream), if any.
    pub fn find(e: &ocicrypt_core::Error) -> Option<&Error> {
        let mut cur = e.root_cause();
        loop {
            let ocicrypt_core::Error::Io(io) = cur else {
                return None;
            };
            let inner = io.get_ref()?;
            if let Some(r) = inner.downcast_ref::<Error>() {
                return Some(r);
            }
            cur = inner.downcast_ref::<ocicrypt_core::Error>()?.root_cause();
        }
    }
}

impl From<Error> for ocicrypt_core::Error {
    fn from(e: Error) -> Self {
        ocicrypt_core::Error::Io(std::io::Error::other(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ocicrypt_core::Error as CoreError;

    #[test]
    fn found_through_layers_and_streams() {
        let reg = || Error::NotFound {
            registry: "h:1".into(),
            what: "blob x".into(),
        };
        let direct: CoreError = reg().into();
        assert!(matches!(Error::find(&direct), Some(Error::NotFound { .. })));
        // A layer's stream failed with a registry error, carried as an I/O error.
        let layered = CoreError::Layer {
            image: "docker://h:1/a:v1".into(),
            index: 0,
            digest: "sha256:ab".into(),
            source: Box::new(CoreError::Io(std::io::Error::other(CoreError::from(reg())))),
        };
        assert!(matches!(Error::find(&layered), Some(Error::NotFound { .. })));
        assert!(Error::find(&CoreError::AuthenticationFailed).is_none());
        assert!(Error::find(&CoreError::Io(std::io::Error::other("plain"))).is_none());
    }
}

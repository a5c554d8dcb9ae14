//! Typed errors. None of them carries key material, tokens or the API key.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One entry of the service's `reasons` array.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reason {
    /// Machine-readable code, e.g. `KEY_ACTION_INVALID_STATE_ERR`.
    #[serde(default)]
    pub code: String,
    /// Human-readable message.
    #[serde(default)]
    pub message: String,
    /// HTTP status the service attached to the reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Documentation link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub more_info: Option<String>,
    /// The field or resource the reason is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<ReasonTarget>,
}

/// `reasons[].target`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReasonTarget {
    /// `field`, `header`, ...
    #[serde(default, rename = "type")]
    pub kind: String,
    /// The field name.
    #[serde(default)]
    pub name: String,
}

/// Which Key Protect operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Operation {
    /// IAM token exchange.
    Token,
    /// Wrap.
    Wrap,
    /// Unwrap.
    Unwrap,
    /// Rewrap.
    Rewrap,
    /// Get a key (with payload).
    GetKey,
    /// Get key metadata.
    GetKeyMetadata,
    /// List key versions.
    ListKeyVersions,
    /// List keys.
    ListKeys,
    /// Create a key.
    CreateKey,
    /// Rotate a key.
    RotateKey,
    /// Disable a key.
    DisableKey,
    /// Enable a key.
    EnableKey,
    /// Delete a key.
    DeleteKey,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Token => "IAM token exchange",
            Self::Wrap => "wrap",
            Self::Unwrap => "unwrap",
            Self::Rewrap => "rewrap",
            Self::GetKey => "get key",
            Self::GetKeyMetadata => "get key metadata",
            Self::ListKeyVersions => "list key versions",
            Self::ListKeys => "list keys",
            Self::CreateKey => "create key",
            Self::RotateKey => "rotate key",
            Self::DisableKey => "disable key",
            Self::EnableKey => "enable key",
            Self::DeleteKey => "delete key",
        })
    }
}

/// A Key Protect or IAM failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Bad configuration (URL, instance id, API key, CA bundle...).
    #[error("{0}")]
    Config(String),
    /// Bad caller input (empty key id, invalid base64...).
    #[error("{0}")]
    InvalidInput(String),
    /// Key Protect answered with an error status.
    #[error("Key Protect {op} failed: HTTP {status}: {message}{}{}", fmt_reasons(reasons), fmt_corr(correlation_id.as_deref()))]
    Api {
        /// The operation.
        op: Operation,
        /// HTTP status.
        status: u16,
        /// `resources[0].errorMsg`, or the (truncated) body for non-JSON errors.
        message: String,
        /// The service's `reasons`.
        reasons: Vec<Reason>,
        /// The request's correlation id (`correlation-id`).
        correlation_id: Option<String>,
        /// How many attempts were made.
        attempts: u32,
    },
    /// IAM refused the API key or failed.
    #[error("IAM token exchange failed: HTTP {status}: {}{}{}", code.as_deref().map(|c| format!("{c}: ")).unwrap_or_default(), message, request_id.as_deref().map(|r| format!(" (IAM request id {r})")).unwrap_or_default())]
    Iam {
        /// HTTP status.
        status: u16,
        /// IAM `errorCode`, e.g. `BXNIM0415E`.
        code: Option<String>,
        /// IAM `errorMessage`.
        message: String,
        /// IAM `context.requestId`.
        request_id: Option<String>,
        /// How many attempts were made.
        attempts: u32,
    },
    /// The request did not get an HTTP answer (connection refused/reset, timeout, TLS).
    #[error("Key Protect {op}: {kind} talking to {host}{}", fmt_corr(correlation_id.as_deref()))]
    Transport {
        /// The operation.
        op: Operation,
        /// `timeout`, `connection error`, ...
        kind: TransportKind,
        /// Host that was contacted.
        host: String,
        /// The request's correlation id.
        correlation_id: Option<String>,
        /// How many attempts were made.
        attempts: u32,
        /// The underlying error.
        #[source]
        source: reqwest::Error,
    },
    /// Key Protect answered 2xx with a body we cannot understand.
    #[error("Key Protect {op}: unexpected response: {reason}{}", fmt_corr(correlation_id.as_deref()))]
    BadResponse {
        /// The operation.
        op: Operation,
        /// What is wrong.
        reason: String,
        /// The request's correlation id.
        correlation_id: Option<String>,
    },
}

/// Kind of a transport failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TransportKind {
    /// The request or connect timed out.
    Timeout,
    /// Connecting failed or the connection dropped.
    Connection,
    /// TLS failed (an untrusted or invalid server certificate): not retried.
    Tls,
    /// The request could not be built or sent for another reason.
    Other,
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Timeout => "timeout",
            Self::Connection => "connection error",
            Self::Tls => "TLS error (is the server certificate trusted? set KP_CA_BUNDLE for a private CA)",
            Self::Other => "request error",
        })
    }
}

fn fmt_reasons(r: &[Reason]) -> String {
    if r.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = r
        .iter()
        .map(|r| {
            if r.message.is_empty() {
                r.code.clone()
            } else {
                format!("{}: {}", r.code, r.message)
            }
        })
        .collect();
    format!(" [{}]", parts.join("; "))
}

fn fmt_corr(c: Option<&str>) -> String {
    c.map(|c| format!(" (correlation-id {c})")).unwrap_or_default()
}

impl Error {
    /// The HTTP status, when the service answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } | Self::Iam { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The correlation id of the failed request, when known.
    pub fn correlation_id(&self) -> Option<&str> {
        match self {
            Self::Api { correlation_id, .. }
            | Self::Transport { correlation_id, .. }
            | Self::BadResponse { correlation_id, .. } => correlation_id.as_deref(),
            _ => None,
        }
    }

    /// The service's reasons (empty when none).
    pub fn reasons(&self) -> &[Reason] {
        match self {
            Self::Api { reasons, .. } => reasons,
            _ => &[],
        }
    }

    /// True for failures that may go away by themselves: 429, 5xx (except 501), timeouts and
    /// connection errors, from Key Protect or IAM. Everything else (4xx, a disabled or
    /// deleted key, bad config, bad input) is permanent until something changes: a caller
    /// must **never** treat a transient error as "the key is gone".
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Api { status, .. } | Self::Iam { status, .. } => is_transient_status(*status),
            Self::Transport { kind, .. } => {
                matches!(kind, TransportKind::Timeout | TransportKind::Connection)
            }
            Self::BadResponse { .. } | Self::Config(_) | Self::InvalidInput(_) => false,
        }
    }

    /// True when credentials or permissions are wrong (IAM 4xx, Key Protect 401/403).
    pub fn is_auth(&self) -> bool {
        match self {
            Self::Iam { status, .. } => (400..500).contains(status) && *status != 429,
            Self::Api { status, .. } => matches!(status, 401 | 403),
            _ => false,
        }
    }

    /// True when the root key cannot be used: disabled/suspended (409) or deleted (410).
    pub fn is_key_unusable(&self) -> bool {
        matches!(
            self,
            Self::Api {
                status: 409 | 410,
                ..
            }
        )
    }

    /// True when the key was deleted (410).
    pub fn is_key_deleted(&self) -> bool {
        matches!(self, Self::Api { status: 410, .. })
    }

    /// True when the key (or the instance) was not found (404).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Api { status: 404, .. })
    }

    /// True when the ciphertext was not wrapped by this key or the AAD differs (422).
    pub fn is_unprocessable_ciphertext(&self) -> bool {
        matches!(self, Self::Api { status: 422, .. })
    }
}

/// Statuses worth retrying: 429 and 5xx except 501.
pub fn is_transient_status(status: u16) -> bool {
    status == 429 || ((500..600).contains(&status) && status != 501)
}

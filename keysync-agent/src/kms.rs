//! Key Protect: the config Secret, and unwrapping `kp-key` entries through `keyprotect-client`.
//!
//! Unwraps run in the background with bounded concurrency and a random start delay (so a
//! DaemonSet rollout or a Secret update does not hit Key Protect from every node at once). The
//! plaintext Key Protect returns is the PEM the user wrapped (`ibmcloud kp key wrap -p
//! base64(pem)`); a plaintext that was base64-encoded once more is decoded once more. The result is
//! validated like any key before it can be written.

use std::sync::Arc;
use std::time::Duration;

use keyprotect_client::{Client, ClientOptions, KeyProtectConfig, TransportKind};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use zeroize::Zeroizing;

use crate::decode::extra_base64_layer;
use crate::secrets::{ConfigStatus, SecretRecord, UnwrapRequest, CONFIG_KEY, CONFIG_SECRET};
use crate::validate::validate_key;

/// Key Protect settings of the agent.
#[derive(Debug, Clone)]
pub struct KmsOptions {
    /// Unwraps in flight at most.
    pub concurrency: usize,
    /// Upper bound of the random delay before each first unwrap attempt.
    pub jitter: Duration,
    /// Per-request timeout.
    pub request_timeout: Duration,
    /// Attempts per unwrap call inside the client (the agent retries on top, with backoff).
    pub client_attempts: u32,
    /// First retry delay after a transient failure (doubles, with jitter).
    pub retry_base: Duration,
    /// Longest retry delay after transient failures.
    pub retry_cap: Duration,
    /// Retry delay after a permanent failure (wrong key, revoked key, bad credentials).
    pub permanent_retry: Duration,
    /// Extra CA certificates (PEM) to trust for Key Protect and IAM.
    pub ca_bundle_pem: Option<Vec<u8>>,
}

impl Default for KmsOptions {
    fn default() -> Self {
        KmsOptions {
            concurrency: 4,
            jitter: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            client_attempts: 3,
            retry_base: Duration::from_secs(2),
            retry_cap: Duration::from_secs(300),
            permanent_retry: Duration::from_secs(600),
            ca_bundle_pem: None,
        }
    }
}

impl KmsOptions {
    /// The delay before the next attempt after `attempts` failures.
    pub fn backoff(&self, attempts: u32, transient: bool) -> Duration {
        if !transient {
            return self.permanent_retry;
        }
        let exp = self
            .retry_base
            .saturating_mul(1u32 << attempts.saturating_sub(1).min(20));
        let capped = exp.min(self.retry_cap);
        // Between half and all of it ("equal jitter"): bounded below so retries never storm.
        capped.mul_f64(0.5 + rand::random::<f64>() / 2.0)
    }
}

/// The Key Protect config Secret, parsed.
pub struct KmsConfig {
    /// What planning needs.
    pub status: ConfigStatus,
    /// The client, when the config is valid.
    pub client: Option<Client>,
    /// The config Secret's resource version this came from.
    pub source_version: Option<String>,
}

impl KmsConfig {
    /// Reads the config Secret (`None`: there is none).
    pub fn load(rec: Option<&SecretRecord>, opts: &KmsOptions) -> Self {
        let source_version = rec.and_then(|r| r.resource_version.clone());
        let invalid = |msg: String| KmsConfig {
            status: ConfigStatus::Invalid(msg),
            client: None,
            source_version: source_version.clone(),
        };
        let Some(rec) = rec else {
            return KmsConfig {
                status: ConfigStatus::Missing,
                client: None,
                source_version,
            };
        };
        let Some(bytes) = rec.data.get(CONFIG_KEY) else {
            return invalid(format!(
                "the Secret {CONFIG_SECRET} has no {CONFIG_KEY} entry; create it with \
                 kubectl create secret generic {CONFIG_SECRET} --from-file=config.json"
            ));
        };
        let cfg = match KeyProtectConfig::from_json(bytes) {
            Ok(c) => c,
            Err(e) => return invalid(format!("{CONFIG_SECRET}/{CONFIG_KEY}: {e}")),
        };
        let default_root_key = serde_json::from_slice::<serde_json::Value>(bytes)
            .ok()
            .and_then(|v| {
                v.get("rootkeyid")
                    .and_then(|r| r.as_str())
                    .map(|s| s.trim().to_string())
            })
            .filter(|s| !s.is_empty());
        let copts = ClientOptions {
            request_timeout: opts.request_timeout,
            connect_timeout: opts.request_timeout.min(Duration::from_secs(10)),
            max_attempts: opts.client_attempts.max(1),
            retry_deadline: opts
                .request_timeout
                .saturating_mul(opts.client_attempts.max(1) + 1),
            ca_bundle_pem: opts.ca_bundle_pem.clone(),
            ..ClientOptions::default()
        };
        let client = match Client::with_options(cfg, copts) {
            Ok(c) => c,
            Err(e) => return invalid(format!("{CONFIG_SECRET}/{CONFIG_KEY}: {e}")),
        };
        let fingerprint = hex::encode(Sha256::digest(bytes.as_slice()));
        KmsConfig {
            status: ConfigStatus::Valid {
                fingerprint,
                default_root_key,
            },
            client: Some(client),
            source_version,
        }
    }
}

/// Why an unwrap failed.
#[derive(Debug, Clone)]
pub struct UnwrapFailure {
    /// What happened and what to do (no key material, no API key).
    pub message: String,
    /// Whether retrying soon may help.
    pub transient: bool,
}

/// The result of one unwrap.
pub struct UnwrapDone {
    /// The request.
    pub request: UnwrapRequest,
    /// The validated key bytes, or why not.
    pub outcome: Result<Arc<Zeroizing<Vec<u8>>>, UnwrapFailure>,
    /// The metric label of the call (`200`, `429`, `timeout`, ...).
    pub status_label: String,
    /// Whether Key Protect returned a rewrapped ciphertext (the root key was rotated).
    pub rewrap_recommended: bool,
}

/// Runs one unwrap: waits `delay`, takes a concurrency permit, calls Key Protect, decodes and
/// validates the plaintext.
pub async fn unwrap(
    client: Client,
    request: UnwrapRequest,
    delay: Duration,
    permits: Arc<Semaphore>,
) -> UnwrapDone {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let _permit = permits.acquire_owned().await.ok();
    let result = client
        .unwrap(&request.root_key_id, &request.ciphertext, None)
        .await;
    let (outcome, status_label, rewrap_recommended) = match result {
        Ok(out) => {
            let rewrapped = out.rewrapped.is_some();
            let plaintext = out.plaintext;
            let source = format!("{}/{}", request.secret, request.file);
            let outcome = match validate_key(&plaintext, &source) {
                Ok(a) => Ok(Arc::new(a.rewritten.unwrap_or(plaintext))),
                Err(rejection) => match extra_base64_layer(&plaintext)
                    .and_then(|d| validate_key(&d, &source).ok().map(|a| a.rewritten.unwrap_or(d)))
                {
                    Some(decoded) => {
                        tracing::warn!(
                            secret = %request.secret,
                            file = %request.file,
                            "the unwrapped key was base64-encoded twice; using it after decoding once more \
                             (wrap base64(private.pem), not base64(base64(private.pem)))"
                        );
                        Ok(Arc::new(decoded))
                    }
                    _ => Err(UnwrapFailure {
                        message: format!(
                            "Key Protect unwrapped the ciphertext, but the result is {rejection}; \
                             wrap the base64 of the private key PEM (ibmcloud kp key wrap <root key> -p \"$(base64 -w0 key.pem)\")"
                        ),
                        transient: false,
                    }),
                },
            };
            (outcome, "200".to_string(), rewrapped)
        }
        Err(e) => {
            let label = match &e {
                keyprotect_client::Error::Transport {
                    kind: TransportKind::Timeout,
                    ..
                } => "timeout".to_string(),
                keyprotect_client::Error::Transport { .. } => "connection".to_string(),
                other => other
                    .status()
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "error".into()),
            };
            let hint = if e.is_key_unusable() {
                " (the root key is disabled or deleted: the key stays installed until the Secret is deleted)"
            } else if e.is_auth() {
                " (check the apikey in the keyprotect-config Secret: the Service ID needs Reader on the instance)"
            } else if e.is_not_found() {
                " (check the rootkeyid and the instance-id)"
            } else {
                ""
            };
            let failure = UnwrapFailure {
                message: format!("unwrapping with root key {}: {e}{hint}", request.root_key_id),
                transient: e.is_transient(),
            };
            (Err(failure), label, false)
        }
    };
    UnwrapDone {
        request,
        outcome,
        status_label,
        rewrap_recommended,
    }
}

//! # keyprotect-client
//!
//! IBM Key Protect for imgcrypt:
//!
//! * [`Client`]: an async Key Protect client (IAM token exchange with caching, proactive
//!   refresh and one re-auth on 401; wrap/unwrap/rewrap/rotate, key get/list/create; bounded
//!   retries with capped exponential backoff and full jitter honouring `Retry-After`; one pooled
//!   connection pool; custom CA bundle; proxies from the environment). Errors are typed
//!   ([`Error`]) and tell transient failures from permanent ones ([`Error::is_transient`]).
//! * [`KeyProtectConfig`]: the Image Key Synchronizer add-on's `config.json`, from a file or the
//!   environment.
//! * [`wrapper`]: Key Protect as an ocicrypt key wrapper (scheme `provider.keyprotect`), and the
//!   `kp wrap` / `kp unwrap` helpers for `kp-key` Secrets.
//! * [`provider`]: the server side of the ocicrypt keyprovider protocol (the
//!   `keyprotect-keyprovider` binary).
//!
//! The Key Protect emulator used by the tests (and the `kp-emulator` binary) is the separate
//! `keyprotect-emulator` crate, so that no production binary carries an HTTP server.
//!
//! ```no_run
//! # async fn demo() -> Result<(), keyprotect_client::Error> {
//! use keyprotect_client::{Client, KeyProtectConfig};
//! let cfg = KeyProtectConfig::from_env()?.expect("set KP_URL, KP_INSTANCE_ID, KP_APIKEY");
//! let kp = Client::new(cfg)?;
//! let w = kp.wrap("root-key-id", b"secret bytes", None).await?;
//! let u = kp.unwrap("root-key-id", &w.ciphertext, None).await?;
//! assert_eq!(&u.plaintext[..], b"secret bytes");
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod b64;
mod client;
pub mod config;
mod error;
pub mod provider;
mod types;
pub mod wrapper;

pub use client::{
    parse_retry_after, Client, ClientOptions, ENV_CA_BUNDLE, HEADER_CORRELATION, HEADER_INSTANCE,
};
pub use config::KeyProtectConfig;
pub use error::{is_transient_status, Error, Operation, Reason, ReasonTarget, TransportKind};
pub use types::{
    CreateKey, Key, KeyState, KeyVersion, ListKeysOptions, RewrapOutput, Rewrapped, UnwrapOutput, WrapOutput,
};
pub use wrapper::{KeyProtectUnwrapper, KeyProtectWrapper, SCHEME};

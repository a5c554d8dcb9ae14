//! # keysync-agent
//!
//! A node agent (one pod per node, as a DaemonSet) that installs image decryption keys from
//! Kubernetes Secrets into the container runtime's key directory, like IBM Cloud's Image Key
//! Synchronizer add-on:
//!
//! * Secrets of `type: key` hold key files; `type: kp-key` Secrets hold ciphertexts wrapped with
//!   IBM Key Protect ([`secrets`] has the contract, [`decode`] the decoding chain, [`kms`] the
//!   unwrapping); the Opaque Secret `keyprotect-config` (`config.json`) configures Key Protect.
//! * Every key is validated ([`validate`]) before it is written: only private keys CRI-O and
//!   containerd can load reach the disk, since one bad file breaks every pull on the node.
//! * Files are written atomically, `0600` in `0700` directories, without following symlinks and
//!   without touching anything outside the agent's subtree ([`keydir`]).
//! * The whole desired state is reconciled after every change and every relist ([`agent`]);
//!   problems become Kubernetes Events ([`events`]); `/healthz`, `/readyz` and `/metrics` are
//!   served by [`metrics`].
//!
//! Operators: see `docs/operating-the-agent.md`; manifests are in `deploy/`.

pub mod agent;
pub mod cli;
pub mod decode;
pub mod events;
pub mod keydir;
pub mod kms;
pub mod metrics;
pub mod names;
pub mod secrets;
pub mod validate;

pub use agent::{cleanup, Agent, AgentError, AgentOptions, RunSummary};

//! The Secret contract (research note §3.2) and the desired state derived from the Secrets.
//!
//! * `type: key`: every data entry is one key file, `<target>/<secret>/<data key>`.
//! * `type: kp-key`: IBM's layout, `rootkeyid` + `ciphertext`, gives `<target>/<secret>/<secret>.pem`;
//!   any other data key is a file name whose value is a ciphertext (`<target>/<secret>/<data key>`),
//!   with the root key from the `rootkeyid` entry, else the annotation [`ROOT_KEY_ANNOTATION`], else
//!   the `rootkeyid` field of the Key Protect config.
//! * The Secret [`CONFIG_SECRET`] (`config.json`) configures Key Protect.
//!
//! [`plan`] turns the Secrets, the Key Protect config status and the unwrap results into the
//! files to write ([`Desired`]), the problems to report and the unwraps to start. It is pure: the
//! agent runs it after every change and every relist.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::api::core::v1::Secret;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::decode::{extra_base64_layer, kp_ciphertext, trimmed_text};
use crate::keydir::{Desired, FileDesired};
use crate::names::{describe_unsafe, is_safe_file_name, is_safe_secret_name};
use crate::validate::{validate_key, Accepted, Rejection, MAX_KEY_SIZE};

/// Largest `kp-key` entry kept: a wrapped key is its plaintext's size plus the envelope, base64
/// encoded (an RSA-16384 PEM wraps to about 19 KiB).
pub const MAX_KP_ENTRY_SIZE: usize = 2 * MAX_KEY_SIZE;

/// The Secret holding the Key Protect configuration.
pub const CONFIG_SECRET: &str = "keyprotect-config";
/// Its data key.
pub const CONFIG_KEY: &str = "config.json";
/// Secret type of plain key Secrets.
pub const TYPE_KEY: &str = "key";
/// Secret type of Key Protect wrapped key Secrets.
pub const TYPE_KP_KEY: &str = "kp-key";
/// Data key naming the root key of a `kp-key` Secret.
pub const ROOT_KEY_ENTRY: &str = "rootkeyid";
/// Data key of the ciphertext in IBM's `kp-key` layout.
pub const CIPHERTEXT_ENTRY: &str = "ciphertext";
/// Annotation naming the root key of a `kp-key` Secret that has no `rootkeyid` entry.
pub const ROOT_KEY_ANNOTATION: &str = "keysync.imgcrypt.io/rootkeyid";

/// The parts of a Secret the agent keeps (values zeroized on drop).
#[derive(Clone)]
pub struct SecretRecord {
    /// Name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Type (`Opaque` when unset).
    pub type_: String,
    /// UID, for Events.
    pub uid: Option<String>,
    /// Resource version, for Events.
    pub resource_version: Option<String>,
    /// Data entries.
    pub data: BTreeMap<String, Arc<Zeroizing<Vec<u8>>>>,
    /// The [`ROOT_KEY_ANNOTATION`] value.
    pub root_key_annotation: Option<String>,
    /// Entries refused when the Secret arrived ([`SecretRecord::drop_refused`]): their data is
    /// not kept, only why.
    pub refused: BTreeMap<String, Rejection>,
}

impl std::fmt::Debug for SecretRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretRecord")
            .field("name", &self.name)
            .field("type", &self.type_)
            .field("resource_version", &self.resource_version)
            .field("data_keys", &self.data.keys().collect::<Vec<_>>())
            .field("refused", &self.refused.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl SecretRecord {
    /// Takes what the agent needs from a Secret; the value buffers move into zeroizing storage.
    pub fn from_secret(s: Secret) -> Self {
        let mut data: BTreeMap<String, Arc<Zeroizing<Vec<u8>>>> = BTreeMap::new();
        for (k, v) in s.data.unwrap_or_default() {
            data.insert(k, Arc::new(Zeroizing::new(v.0)));
        }
        // The API server folds stringData into data; a stand-in or old server might not.
        for (k, v) in s.string_data.unwrap_or_default() {
            data.entry(k)
                .or_insert_with(|| Arc::new(Zeroizing::new(v.into_bytes())));
        }
        let root_key_annotation = s
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ROOT_KEY_ANNOTATION))
            .cloned();
        SecretRecord {
            name: s.metadata.name.unwrap_or_default(),
            namespace: s.metadata.namespace.unwrap_or_default(),
            type_: s.type_.unwrap_or_else(|| "Opaque".into()),
            uid: s.metadata.uid,
            resource_version: s.metadata.resource_version,
            data,
            root_key_annotation,
            refused: BTreeMap::new(),
        }
    }

    /// Drops what the agent will not use, so memory is bounded by what it keeps: all data of a
    /// Secret it does not act on; entries larger than a key (or a key's ciphertext) can be; and
    /// `type: key` entries that are not a usable key. Refused entries are remembered with the
    /// reason, and reported by [`plan`] as before.
    pub fn drop_refused(&mut self, validation: &mut ValidationCache) {
        match self.kind() {
            SecretKind::Ignored => self.data.clear(),
            SecretKind::Config => {}
            kind @ (SecretKind::Key | SecretKind::KpKey) => {
                let limit = match kind {
                    SecretKind::Key => MAX_KEY_SIZE,
                    _ => MAX_KP_ENTRY_SIZE,
                };
                let mut refused = Vec::new();
                for (k, v) in &self.data {
                    if v.len() > limit {
                        refused.push((k.clone(), Rejection::TooLarge { size: v.len() }));
                    } else if kind == SecretKind::Key && is_safe_file_name(k) {
                        if let Err(r) = validation.check(v, &format!("{}/{k}", self.name)) {
                            refused.push((k.clone(), r));
                        }
                    }
                }
                for (k, r) in refused {
                    self.data.remove(&k);
                    self.refused.insert(k, r);
                }
            }
        }
    }

    /// What the agent does with this Secret.
    pub fn kind(&self) -> SecretKind {
        if self.name == CONFIG_SECRET {
            SecretKind::Config
        } else if self.type_ == TYPE_KEY {
            SecretKind::Key
        } else if self.type_ == TYPE_KP_KEY {
            SecretKind::KpKey
        } else {
            SecretKind::Ignored
        }
    }
}

/// The Secret kinds the agent handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SecretKind {
    /// `type: key`.
    Key,
    /// `type: kp-key`.
    KpKey,
    /// The Key Protect config Secret.
    Config,
    /// Anything else (left alone).
    Ignored,
}

impl SecretKind {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            SecretKind::Key => "key",
            SecretKind::KpKey => "kp-key",
            SecretKind::Config => "config",
            SecretKind::Ignored => "ignored",
        }
    }
}

/// Why something could not be synced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProblemReason {
    /// A Secret name or data key that is not a safe path component.
    UnsafeName,
    /// A value that is not a private key the runtime can use.
    InvalidKey,
    /// A value that cannot be decoded (not text, not base64, empty).
    BadValue,
    /// A `kp-key` entry with no root key id anywhere.
    MissingRootKey,
    /// `kp-key` Secrets exist but the config Secret does not.
    ConfigMissing,
    /// The config Secret is invalid.
    ConfigInvalid,
    /// Key Protect refused or failed the unwrap.
    KeyProtect,
    /// Writing the file failed.
    WriteFailed,
}

impl ProblemReason {
    /// The Event reason and metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ProblemReason::UnsafeName => "UnsafeName",
            ProblemReason::InvalidKey => "InvalidKey",
            ProblemReason::BadValue => "BadValue",
            ProblemReason::MissingRootKey => "MissingRootKey",
            ProblemReason::ConfigMissing => "KeyProtectConfigMissing",
            ProblemReason::ConfigInvalid => "KeyProtectConfigInvalid",
            ProblemReason::KeyProtect => "KeyProtectError",
            ProblemReason::WriteFailed => "WriteFailed",
        }
    }
}

/// One problem with one Secret (or one of its entries). Messages never hold key material.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Problem {
    /// The Secret.
    pub secret: String,
    /// The data entry, when the problem is about one.
    pub entry: Option<String>,
    /// Category.
    pub reason: ProblemReason,
    /// What is wrong and what to do.
    pub message: String,
}

/// The Key Protect configuration as far as planning needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigStatus {
    /// No config Secret.
    Missing,
    /// The config Secret is unusable (the message says why; never the API key).
    Invalid(String),
    /// Usable.
    Valid {
        /// Hash of every field (API key included), so a change re-unwraps everything.
        fingerprint: String,
        /// Default root key id for `kp-key` entries that name none.
        default_root_key: Option<String>,
    },
}

/// Where one unwrap stands.
#[derive(Clone)]
pub enum UnwrapState {
    /// Requested and not finished.
    InFlight,
    /// Unwrapped and validated: the key file's bytes.
    Done(Arc<Zeroizing<Vec<u8>>>),
    /// Failed; retried at `retry_at`.
    Failed {
        /// Why (no key material).
        message: String,
        /// Whether a retry may help soon.
        transient: bool,
        /// Attempts so far.
        attempts: u32,
        /// When to try again.
        retry_at: Instant,
    },
}

/// An unwrap to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnwrapRequest {
    /// Cache key ([`unwrap_key`]).
    pub key: String,
    /// Root key id.
    pub root_key_id: String,
    /// Canonical ciphertext.
    pub ciphertext: String,
    /// For logs: the Secret.
    pub secret: String,
    /// For logs: the file.
    pub file: String,
}

/// The unwrap cache key: config fingerprint, root key and ciphertext hashed together.
pub fn unwrap_key(fingerprint: &str, root_key_id: &str, ciphertext: &str) -> String {
    let mut h = Sha256::new();
    for part in [fingerprint, root_key_id, ciphertext] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(h.finalize())
}

/// Validation results by content hash, so unchanged keys are not parsed again on every pass.
#[derive(Default)]
pub struct ValidationCache {
    map: HashMap<[u8; 32], Validated>,
}

#[derive(Clone)]
enum Validated {
    Ok,
    /// Valid after removing one base64 layer.
    OkDecoded(Arc<Zeroizing<Vec<u8>>>),
    Rejected(Rejection),
}

impl ValidationCache {
    /// Validates key bytes, decoding one extra base64 layer when that yields a valid key.
    /// Returns the bytes to write.
    pub fn check(
        &mut self,
        bytes: &Arc<Zeroizing<Vec<u8>>>,
        source: &str,
    ) -> Result<Arc<Zeroizing<Vec<u8>>>, Rejection> {
        let digest: [u8; 32] = Sha256::digest(bytes.as_slice()).into();
        let v = self.map.entry(digest).or_insert_with(|| match validate_key(bytes, source) {
            Ok(Accepted {
                rewritten: Some(other),
                ..
            }) => Validated::OkDecoded(Arc::new(other)),
            Ok(_) => Validated::Ok,
            Err(rejection) => match extra_base64_layer(bytes) {
                Some(decoded) => match validate_key(&decoded, source) {
                    Ok(a) => {
                        tracing::warn!(
                            source,
                            "the key was base64-encoded twice; using it after decoding once more (store the PEM itself)"
                        );
                        Validated::OkDecoded(Arc::new(a.rewritten.unwrap_or(decoded)))
                    }
                    Err(_) => Validated::Rejected(rejection),
                },
                None => Validated::Rejected(rejection),
            },
        });
        match v {
            Validated::Ok => Ok(bytes.clone()),
            Validated::OkDecoded(d) => Ok(d.clone()),
            Validated::Rejected(r) => Err(r.clone()),
        }
    }

    /// Bounds the cache: forgets everything once it holds more than `max` results (they are
    /// recomputed on the next pass).
    pub fn retain_recent(&mut self, max: usize) {
        if self.map.len() > max {
            self.map.clear();
        }
    }
}

/// The outcome of planning.
#[derive(Debug, Default)]
pub struct Plan {
    /// Files per Secret directory.
    pub desired: Desired,
    /// Problems found (sorted).
    pub problems: Vec<Problem>,
    /// Unwraps to start now.
    pub unwraps: Vec<UnwrapRequest>,
    /// Unwrap cache keys still referenced (the rest may be dropped).
    pub live_unwraps: Vec<String>,
    /// Secrets per kind.
    pub kinds: BTreeMap<SecretKind, usize>,
}

/// One `kp-key` entry, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KpEntry {
    /// Output file name.
    pub file: String,
    /// Root key id.
    pub root_key_id: String,
    /// Canonical ciphertext.
    pub ciphertext: String,
}

/// Resolves the entries of a `kp-key` Secret: per data key, the file to write or the problem.
pub fn kp_entries(
    rec: &SecretRecord,
    default_root_key: Option<&str>,
) -> Vec<(String, Result<KpEntry, Problem>)> {
    let problem = |entry: &str, reason, message: String| Problem {
        secret: rec.name.clone(),
        entry: Some(entry.to_string()),
        reason,
        message,
    };
    let root = match rec.data.get(ROOT_KEY_ENTRY) {
        Some(v) => match trimmed_text(v, "rootkeyid") {
            Ok(s) => Some(Ok(s.to_string())),
            Err(e) => Some(Err(e.to_string())),
        },
        None => rec
            .root_key_annotation
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .or(default_root_key)
            .map(|s| Ok(s.to_string())),
    };
    let mut out = Vec::new();
    for (k, v) in &rec.data {
        if k == ROOT_KEY_ENTRY {
            continue;
        }
        let file = if k == CIPHERTEXT_ENTRY {
            format!("{}.pem", rec.name)
        } else {
            k.clone()
        };
        if !is_safe_file_name(&file) || !is_safe_file_name(k) {
            out.push((
                k.clone(),
                Err(problem(
                    k,
                    ProblemReason::UnsafeName,
                    format!("data key {} cannot be used as a file name", describe_unsafe(k)),
                )),
            ));
            continue;
        }
        let root_key_id = match &root {
            Some(Ok(r)) => r.clone(),
            Some(Err(e)) => {
                out.push((k.clone(), Err(problem(k, ProblemReason::BadValue, e.clone()))));
                continue;
            }
            None => {
                out.push((
                    k.clone(),
                    Err(problem(
                        k,
                        ProblemReason::MissingRootKey,
                        format!(
                            "no root key id: add a `{ROOT_KEY_ENTRY}` entry, the annotation {ROOT_KEY_ANNOTATION}, \
                             or a `rootkeyid` default in {CONFIG_SECRET}/{CONFIG_KEY}"
                        ),
                    )),
                ));
                continue;
            }
        };
        let entry = kp_ciphertext(v, k)
            .map(|ciphertext| KpEntry {
                file,
                root_key_id,
                ciphertext,
            })
            .map_err(|e| problem(k, ProblemReason::BadValue, e.to_string()));
        out.push((k.clone(), entry));
    }
    out
}

/// Computes the desired state (see the module docs).
pub fn plan(
    secrets: &BTreeMap<String, SecretRecord>,
    config: &ConfigStatus,
    unwraps: &HashMap<String, UnwrapState>,
    validation: &mut ValidationCache,
    now: Instant,
) -> Plan {
    let mut p = Plan::default();
    for rec in secrets.values() {
        let kind = rec.kind();
        *p.kinds.entry(kind).or_default() += 1;
        if matches!(kind, SecretKind::Ignored) {
            continue;
        }
        if let (SecretKind::Config, ConfigStatus::Invalid(msg)) = (kind, config) {
            p.problems.push(Problem {
                secret: rec.name.clone(),
                entry: Some(CONFIG_KEY.into()),
                reason: ProblemReason::ConfigInvalid,
                message: msg.clone(),
            });
        }
        if matches!(kind, SecretKind::Config) {
            continue;
        }
        if !is_safe_secret_name(&rec.name) {
            p.problems.push(Problem {
                secret: rec.name.clone(),
                entry: None,
                reason: ProblemReason::UnsafeName,
                message: format!(
                    "Secret name {} cannot be used as a directory name",
                    describe_unsafe(&rec.name)
                ),
            });
            continue;
        }
        let files = p.desired.entry(rec.name.clone()).or_default();
        match kind {
            SecretKind::Key => {
                for (k, r) in &rec.refused {
                    if !is_safe_file_name(k) {
                        p.problems.push(Problem {
                            secret: rec.name.clone(),
                            entry: Some(k.clone()),
                            reason: ProblemReason::UnsafeName,
                            message: format!("data key {} cannot be used as a file name", describe_unsafe(k)),
                        });
                        continue;
                    }
                    p.problems.push(Problem {
                        secret: rec.name.clone(),
                        entry: Some(k.clone()),
                        reason: ProblemReason::InvalidKey,
                        message: format!("{}/{k} is {r}; it is not installed", rec.name),
                    });
                    files.insert(k.clone(), FileDesired::Keep);
                }
                for (k, v) in &rec.data {
                    if !is_safe_file_name(k) {
                        p.problems.push(Problem {
                            secret: rec.name.clone(),
                            entry: Some(k.clone()),
                            reason: ProblemReason::UnsafeName,
                            message: format!("data key {} cannot be used as a file name", describe_unsafe(k)),
                        });
                        continue;
                    }
                    match validation.check(v, &format!("{}/{k}", rec.name)) {
                        Ok(bytes) => {
                            files.insert(k.clone(), FileDesired::Write(bytes));
                        }
                        Err(r) => {
                            p.problems.push(Problem {
                                secret: rec.name.clone(),
                                entry: Some(k.clone()),
                                reason: ProblemReason::InvalidKey,
                                message: format!("{}/{k} is {r}; it is not installed", rec.name),
                            });
                            files.insert(k.clone(), FileDesired::Keep);
                        }
                    }
                }
            }
            SecretKind::KpKey => {
                let default_root = match config {
                    ConfigStatus::Valid { default_root_key, .. } => default_root_key.as_deref(),
                    _ => None,
                };
                for (k, r) in &rec.refused {
                    let file = if k == CIPHERTEXT_ENTRY {
                        format!("{}.pem", rec.name)
                    } else {
                        k.clone()
                    };
                    if !is_safe_file_name(&file) || !is_safe_file_name(k) {
                        p.problems.push(Problem {
                            secret: rec.name.clone(),
                            entry: Some(k.clone()),
                            reason: ProblemReason::UnsafeName,
                            message: format!("data key {} cannot be used as a file name", describe_unsafe(k)),
                        });
                        continue;
                    }
                    p.problems.push(Problem {
                        secret: rec.name.clone(),
                        entry: Some(k.clone()),
                        reason: ProblemReason::BadValue,
                        message: format!("{}/{k} is {r}; it is not installed", rec.name),
                    });
                    files.insert(file, FileDesired::Keep);
                }
                for (k, entry) in kp_entries(rec, default_root) {
                    let entry = match entry {
                        Ok(e) => e,
                        Err(problem) => {
                            if problem.reason != ProblemReason::UnsafeName {
                                let file = if k == CIPHERTEXT_ENTRY {
                                    format!("{}.pem", rec.name)
                                } else {
                                    k
                                };
                                files.insert(file, FileDesired::Keep);
                            }
                            p.problems.push(problem);
                            continue;
                        }
                    };
                    files.insert(entry.file.clone(), FileDesired::Keep);
                    let fingerprint = match config {
                        ConfigStatus::Missing => {
                            p.problems.push(Problem {
                                secret: rec.name.clone(),
                                entry: Some(k),
                                reason: ProblemReason::ConfigMissing,
                                message: format!(
                                    "a kp-key Secret needs the Secret {CONFIG_SECRET} with {CONFIG_KEY} \
                                     (keyprotect-url, instance-id, apikey) in the same namespace"
                                ),
                            });
                            continue;
                        }
                        ConfigStatus::Invalid(_) => {
                            p.problems.push(Problem {
                                secret: rec.name.clone(),
                                entry: Some(k),
                                reason: ProblemReason::ConfigInvalid,
                                message: format!(
                                    "waiting for a valid {CONFIG_SECRET} Secret (see its Events)"
                                ),
                            });
                            continue;
                        }
                        ConfigStatus::Valid { fingerprint, .. } => fingerprint,
                    };
                    let key = unwrap_key(fingerprint, &entry.root_key_id, &entry.ciphertext);
                    p.live_unwraps.push(key.clone());
                    let request = || UnwrapRequest {
                        key: key.clone(),
                        root_key_id: entry.root_key_id.clone(),
                        ciphertext: entry.ciphertext.clone(),
                        secret: rec.name.clone(),
                        file: entry.file.clone(),
                    };
                    match unwraps.get(&key) {
                        Some(UnwrapState::Done(bytes)) => {
                            files.insert(entry.file.clone(), FileDesired::Write(bytes.clone()));
                        }
                        Some(UnwrapState::InFlight) => {}
                        Some(UnwrapState::Failed {
                            message, retry_at, ..
                        }) => {
                            p.problems.push(Problem {
                                secret: rec.name.clone(),
                                entry: Some(k),
                                reason: ProblemReason::KeyProtect,
                                message: message.clone(),
                            });
                            if *retry_at <= now {
                                p.unwraps.push(request());
                            }
                        }
                        None => p.unwraps.push(request()),
                    }
                }
            }
            SecretKind::Config | SecretKind::Ignored => {}
        }
    }
    // Two entries of one Secret asking for the same key are unwrapped once.
    p.unwraps.sort_by(|a, b| a.key.cmp(&b.key));
    p.unwraps.dedup_by(|a, b| a.key == b.key);
    p.problems.sort();
    p.problems.dedup();
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn rec(name: &str, ty: &str, data: &[(&str, &[u8])]) -> SecretRecord {
        let mut s = Secret::default();
        s.metadata.name = Some(name.into());
        s.type_ = Some(ty.into());
        s.data = Some(
            data.iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
                .collect(),
        );
        SecretRecord::from_secret(s)
    }

    fn valid() -> ConfigStatus {
        ConfigStatus::Valid {
            fingerprint: "fp".into(),
            default_root_key: None,
        }
    }

    #[test]
    fn kinds() {
        assert_eq!(rec("a", "key", &[]).kind(), SecretKind::Key);
        assert_eq!(rec("a", "kp-key", &[]).kind(), SecretKind::KpKey);
        assert_eq!(rec(CONFIG_SECRET, "Opaque", &[]).kind(), SecretKind::Config);
        assert_eq!(
            rec("a", "kubernetes.io/dockercfg", &[]).kind(),
            SecretKind::Ignored
        );
    }

    #[test]
    fn ibm_layout_and_file_name_layout() {
        let r = rec(
            "wrapped",
            "kp-key",
            &[("rootkeyid", b" rk-1\n"), ("ciphertext", b"QUJD\n")],
        );
        let e = kp_entries(&r, None);
        assert_eq!(e.len(), 1);
        let entry = e[0].1.clone().unwrap();
        assert_eq!(
            entry,
            KpEntry {
                file: "wrapped.pem".into(),
                root_key_id: "rk-1".into(),
                ciphertext: "QUJD".into()
            }
        );

        let mut r = rec("blog", "kp-key", &[("private.pem", b"QUJD")]);
        assert_eq!(
            kp_entries(&r, None)[0].1.clone().unwrap_err().reason,
            ProblemReason::MissingRootKey
        );
        assert_eq!(
            kp_entries(&r, Some("dflt"))[0].1.clone().unwrap().root_key_id,
            "dflt"
        );
        r.root_key_annotation = Some("from-annotation".into());
        let e = kp_entries(&r, Some("dflt"));
        assert_eq!(e[0].1.clone().unwrap().file, "private.pem");
        assert_eq!(e[0].1.clone().unwrap().root_key_id, "from-annotation");
    }

    #[test]
    fn kp_planning_requests_once_and_keeps_files_meanwhile() {
        let mut secrets = BTreeMap::new();
        let r = rec("w", "kp-key", &[("rootkeyid", b"rk"), ("ciphertext", b"QUJD")]);
        secrets.insert(r.name.clone(), r);
        let mut v = ValidationCache::default();
        let now = Instant::now();
        // No config: a problem, the file is kept, nothing requested.
        let p = plan(&secrets, &ConfigStatus::Missing, &HashMap::new(), &mut v, now);
        assert!(p.unwraps.is_empty());
        assert_eq!(p.problems[0].reason, ProblemReason::ConfigMissing);
        assert!(matches!(p.desired["w"]["w.pem"], FileDesired::Keep));
        // Valid config: one request.
        let p = plan(&secrets, &valid(), &HashMap::new(), &mut v, now);
        assert_eq!(p.unwraps.len(), 1);
        let key = p.unwraps[0].key.clone();
        assert_eq!(key, unwrap_key("fp", "rk", "QUJD"));
        // In flight: no new request, still kept.
        let mut u = HashMap::from([(key.clone(), UnwrapState::InFlight)]);
        let p = plan(&secrets, &valid(), &u, &mut v, now);
        assert!(p.unwraps.is_empty() && p.problems.is_empty());
        // Failed, retry later: a problem but no request until retry_at.
        u.insert(
            key.clone(),
            UnwrapState::Failed {
                message: "429".into(),
                transient: true,
                attempts: 1,
                retry_at: now + std::time::Duration::from_secs(60),
            },
        );
        let p = plan(&secrets, &valid(), &u, &mut v, now);
        assert!(p.unwraps.is_empty());
        assert_eq!(p.problems[0].reason, ProblemReason::KeyProtect);
        let p = plan(
            &secrets,
            &valid(),
            &u,
            &mut v,
            now + std::time::Duration::from_secs(61),
        );
        assert_eq!(p.unwraps.len(), 1);
        // Done: written.
        u.insert(key, UnwrapState::Done(Arc::new(Zeroizing::new(b"PEM".to_vec()))));
        let p = plan(&secrets, &valid(), &u, &mut v, now);
        assert!(matches!(&p.desired["w"]["w.pem"], FileDesired::Write(b) if b.as_slice() == b"PEM"));
        // A config change means a different cache key: unwrapped again.
        let other = ConfigStatus::Valid {
            fingerprint: "fp2".into(),
            default_root_key: None,
        };
        assert_eq!(plan(&secrets, &other, &u, &mut v, now).unwraps.len(), 1);
    }

    #[test]
    fn unsafe_names_are_refused() {
        let mut secrets = BTreeMap::new();
        let r = rec("ok", "key", &[("../evil", b"x"), ("a/b", b"x")]);
        secrets.insert(r.name.clone(), r);
        let r = rec("Bad/Name", "key", &[("k", b"x")]);
        secrets.insert(r.name.clone(), r);
        let p = plan(
            &secrets,
            &ConfigStatus::Missing,
            &HashMap::new(),
            &mut ValidationCache::default(),
            Instant::now(),
        );
        assert_eq!(p.problems.len(), 3);
        assert!(p.problems.iter().all(|x| x.reason == ProblemReason::UnsafeName));
        assert!(!p.desired.contains_key("Bad/Name"));
        assert!(p.desired["ok"].is_empty());
    }
}

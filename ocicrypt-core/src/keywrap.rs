//! Key wrapping: the traits every scheme implements, and the logic that tries them all.
//!
//! A [`KeyWrapper`] encrypts a layer's private options JSON for a set of recipients and returns
//! one blob; it is stored base64-encoded in `org.opencontainers.image.enc.keys.<scheme>` (a comma
//! list when recipients are added later). A [`KeyUnwrapper`] holds private keys (or a KMS
//! client) and turns one such blob back into the options JSON.
//!
//! KMS-backed schemes implement [`AsyncKeyWrapper`] / [`AsyncKeyUnwrapper`] directly, without
//! `block_on`; every synchronous implementation gets the async trait for free through a blanket
//! implementation, so callers hold one heterogeneous list of `Arc<dyn AsyncKeyUnwrapper>`.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use zeroize::Zeroizing;

use crate::mediatype::{keys_annotation, KEYS_ANNOTATION_PREFIX, PUBOPTS_ANNOTATION};
use crate::options::{decode_b64, encode_b64, PrivateLayerOptions, PublicLayerOptions};
use crate::Error;

/// A boxed `Send` future, as returned by the async traits (object-safe, unlike `async fn`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a wrap failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WrapError {
    /// The wrapper has no recipients.
    #[error("no recipients for scheme {scheme}")]
    NoRecipients {
        /// The scheme.
        scheme: String,
    },
    /// A recipient key cannot be used by this scheme.
    #[error("recipient {recipient} cannot be used: {reason}")]
    BadRecipient {
        /// Where the recipient came from (file name, key id).
        recipient: String,
        /// What is wrong.
        reason: String,
    },
    /// The backend (a KMS, a key provider process) failed.
    #[error("{context}")]
    Backend {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Why an unwrap failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UnwrapError {
    /// None of this unwrapper's keys can open the blob (wrong key, or not a recipient).
    #[error("none of the {scheme} keys can unwrap this layer key")]
    NoMatchingKey {
        /// The scheme.
        scheme: String,
    },
    /// The blob is not what the scheme expects.
    #[error("malformed {scheme} key blob: {reason}")]
    Malformed {
        /// The scheme.
        scheme: String,
        /// What is wrong.
        reason: String,
    },
    /// The backend (a KMS, a key provider process) failed.
    #[error("{context}")]
    Backend {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A key cannot be used at all (a token's wrong PIN, a missing token, a module the policy
    /// refuses): the user has to fix the key, not pick another one.
    #[error("{scheme} key cannot be used: {reason}")]
    KeyUnusable {
        /// The scheme.
        scheme: String,
        /// Which key and why (no secret).
        reason: String,
    },
}

/// Wraps private options for a set of recipients (encrypt side).
pub trait KeyWrapper: Send + Sync + fmt::Debug {
    /// The annotation scheme: `jwe`, `pkcs7`, `provider.<name>`…
    fn scheme(&self) -> &str;
    /// Encrypts `optsdata` (private options JSON) for all recipients into one blob.
    ///
    /// # Errors
    /// [`WrapError`].
    fn wrap_keys(&self, optsdata: &[u8]) -> Result<Vec<u8>, WrapError>;
    /// The ids of the recipients it wraps for, where the scheme has ids (JWE: the RFC 7638
    /// thumbprints it writes as `kid`); empty when unknown.
    fn recipient_ids(&self) -> Vec<String> {
        Vec::new()
    }
    /// A wrapper for only the recipients with these ids (a subset of
    /// [`recipient_ids`](Self::recipient_ids)); `None` when the scheme cannot split.
    fn subset(&self, _ids: &[String]) -> Option<Arc<dyn AsyncKeyWrapper>> {
        None
    }
}

/// Unwraps private options (decrypt side).
pub trait KeyUnwrapper: Send + Sync + fmt::Debug {
    /// The annotation scheme this unwrapper reads.
    fn scheme(&self) -> &str;
    /// Decrypts one wrapped blob back into the private options JSON.
    ///
    /// # Errors
    /// [`UnwrapError`].
    fn unwrap_key(&self, blob: &[u8]) -> Result<Zeroizing<Vec<u8>>, UnwrapError>;
}

/// Async variant of [`KeyWrapper`], for KMS-backed schemes.
pub trait AsyncKeyWrapper: Send + Sync + fmt::Debug {
    /// The annotation scheme.
    fn scheme(&self) -> &str;
    /// As [`KeyWrapper::wrap_keys`].
    fn wrap_keys<'a>(&'a self, optsdata: &'a [u8]) -> BoxFuture<'a, Result<Vec<u8>, WrapError>>;
    /// As [`KeyWrapper::recipient_ids`].
    fn recipient_ids(&self) -> Vec<String> {
        Vec::new()
    }
    /// As [`KeyWrapper::subset`].
    fn subset(&self, _ids: &[String]) -> Option<Arc<dyn AsyncKeyWrapper>> {
        None
    }
}

/// Async variant of [`KeyUnwrapper`], for KMS-backed schemes.
pub trait AsyncKeyUnwrapper: Send + Sync + fmt::Debug {
    /// The annotation scheme.
    fn scheme(&self) -> &str;
    /// As [`KeyUnwrapper::unwrap_key`].
    fn unwrap_key<'a>(&'a self, blob: &'a [u8]) -> BoxFuture<'a, Result<Zeroizing<Vec<u8>>, UnwrapError>>;
}

impl<T: KeyWrapper + ?Sized> AsyncKeyWrapper for T {
    fn scheme(&self) -> &str {
        KeyWrapper::scheme(self)
    }
    fn wrap_keys<'a>(&'a self, optsdata: &'a [u8]) -> BoxFuture<'a, Result<Vec<u8>, WrapError>> {
        Box::pin(std::future::ready(KeyWrapper::wrap_keys(self, optsdata)))
    }
    fn recipient_ids(&self) -> Vec<String> {
        KeyWrapper::recipient_ids(self)
    }
    fn subset(&self, ids: &[String]) -> Option<Arc<dyn AsyncKeyWrapper>> {
        KeyWrapper::subset(self, ids)
    }
}

impl<T: KeyUnwrapper + ?Sized> AsyncKeyUnwrapper for T {
    fn scheme(&self) -> &str {
        KeyUnwrapper::scheme(self)
    }
    fn unwrap_key<'a>(&'a self, blob: &'a [u8]) -> BoxFuture<'a, Result<Zeroizing<Vec<u8>>, UnwrapError>> {
        Box::pin(std::future::ready(KeyUnwrapper::unwrap_key(self, blob)))
    }
}

/// A set of unwrappers: what a decrypt may try.
pub type Unwrappers = [Arc<dyn AsyncKeyUnwrapper>];
/// A set of wrappers: the recipients of an encrypt.
pub type Wrappers = [Arc<dyn AsyncKeyWrapper>];

/// One failed attempt during an unwrap, kept for the final report.
#[derive(Debug)]
pub struct Attempt {
    /// The scheme tried.
    pub scheme: String,
    /// Which comma entry (0-based).
    pub entry: usize,
    /// What went wrong, as text (no key material).
    pub error: String,
    /// The key itself cannot be used ([`UnwrapError::KeyUnusable`]), as opposed to a key that
    /// does not open this entry.
    pub key_unusable: bool,
}

impl fmt::Display for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} entry {}: {}", self.scheme, self.entry, self.error)
    }
}

/// The encryption schemes present on a layer (from its annotations), with the number of
/// wrapped-key entries for each.
pub fn schemes_present(annotations: &BTreeMap<String, String>) -> Vec<(String, usize)> {
    annotations
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix(KEYS_ANNOTATION_PREFIX).map(|s| {
                (
                    s.to_owned(),
                    v.split(',').filter(|e| !e.trim().is_empty()).count(),
                )
            })
        })
        .collect()
}

/// Wrapped-key entries (comma-separated) accepted in one `keys.<scheme>` annotation. Each
/// `recipients add` appends one; real images carry a handful. Every entry may cost a
/// private-key operation per key, so a layer with more is refused before any is tried.
pub const MAX_KEY_ENTRIES: usize = 64;

/// Unwraps a layer's private options from its annotations: tries every scheme present for
/// which an unwrapper is given, and every comma entry; stops at the first success.
///
/// # Errors
/// [`Error::NoKeyForScheme`] when no unwrapper matches any scheme present (with the schemes
/// found), [`Error::TooManyKeyEntries`] when an annotation holds more than
/// [`MAX_KEY_ENTRIES`] entries, [`Error::Unwrap`] with every attempt when none succeeded, or
/// an options error.
pub async fn unwrap_options(
    annotations: &BTreeMap<String, String>,
    unwrappers: &Unwrappers,
) -> Result<(PrivateLayerOptions, PublicLayerOptions), Error> {
    let pubopts = annotations
        .get(PUBOPTS_ANNOTATION)
        .ok_or(Error::MissingAnnotation(PUBOPTS_ANNOTATION))?;
    let public = PublicLayerOptions::from_annotation(pubopts)?;
    let present = schemes_present(annotations);
    if present.is_empty() {
        return Err(Error::MissingAnnotation("org.opencontainers.image.enc.keys.*"));
    }
    if let Some((scheme, count)) = present.iter().find(|(_, n)| *n > MAX_KEY_ENTRIES) {
        return Err(Error::TooManyKeyEntries {
            scheme: crate::redact::token(scheme).into_owned(),
            count: *count,
        });
    }
    let mut attempts = Vec::new();
    let mut tried_any = false;
    for (scheme, _) in &present {
        let value = &annotations[&keys_annotation(scheme)];
        for u in unwrappers.iter().filter(|u| u.scheme() == scheme) {
            tried_any = true;
            for (i, entry) in value
                .split(',')
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .enumerate()
            {
                let blob = match decode_b64(entry) {
                    Ok(b) => b,
                    Err(_) => {
                        // The decode error's character and offset add nothing and would make
                        // every entry's message distinct.
                        attempts.push(Attempt {
                            scheme: scheme.clone(),
                            entry: i,
                            error: "entry is not base64".to_owned(),
                            key_unusable: false,
                        });
                        continue;
                    }
                };
                match u.unwrap_key(&blob).await {
                    Ok(optsdata) => {
                        let private = PrivateLayerOptions::from_json(&optsdata)?;
                        return Ok((private, public));
                    }
                    Err(e) => attempts.push(Attempt {
                        scheme: scheme.clone(),
                        entry: i,
                        key_unusable: matches!(e, UnwrapError::KeyUnusable { .. }),
                        error: error_chain(&e),
                    }),
                }
            }
        }
    }
    if !tried_any {
        return Err(Error::NoKeyForScheme {
            schemes: present.into_iter().map(|(s, _)| s).collect(),
        });
    }
    Err(Error::Unwrap { attempts })
}

/// Wraps private options with every wrapper and returns the annotations to set: one
/// `keys.<scheme>` entry per wrapper (wrappers of the same scheme are comma-joined) plus
/// `pubopts`.
///
/// # Errors
/// [`Error::Wrap`] naming the failing scheme.
pub async fn wrap_options(
    private: &PrivateLayerOptions,
    public: &PublicLayerOptions,
    wrappers: &Wrappers,
) -> Result<BTreeMap<String, String>, Error> {
    if wrappers.is_empty() {
        return Err(Error::NoRecipients);
    }
    let optsdata = private.to_json();
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for w in wrappers {
        let blob = w.wrap_keys(&optsdata).await.map_err(|e| Error::Wrap {
            scheme: w.scheme().to_owned(),
            source: e,
        })?;
        append_entry(&mut out, w.scheme(), &blob);
    }
    out.insert(PUBOPTS_ANNOTATION.to_owned(), public.to_annotation());
    Ok(out)
}

/// Appends a wrapped blob to the comma list of `keys.<scheme>`.
pub fn append_entry(annotations: &mut BTreeMap<String, String>, scheme: &str, blob: &[u8]) {
    let key = keys_annotation(scheme);
    let b = encode_b64(blob);
    match annotations.get_mut(&key) {
        Some(v) if !v.is_empty() => {
            v.push(',');
            v.push_str(&b);
        }
        _ => {
            annotations.insert(key, b);
        }
    }
}

/// Renders an error with its sources, `a: b: c`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        let t = src.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = src.source();
    }
    s
}

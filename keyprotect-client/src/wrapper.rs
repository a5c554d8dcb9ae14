//! Key Protect as an ocicrypt key wrapper (scheme `provider.keyprotect`), and the helpers behind
//! `imgcrypt kp wrap` / `imgcrypt kp unwrap`.
//!
//! ## The annotation
//!
//! `org.opencontainers.image.enc.keys.provider.keyprotect` holds, per recipient (comma list),
//! standard base64 of this JSON:
//!
//! ```json
//! {"kp_url":"https://us-south.kms.cloud.ibm.com","instance_id":"<GUID>","root_key_id":"<id>","ciphertext":"<Key Protect ciphertext>"}
//! ```
//!
//! `ciphertext` is the opaque string Key Protect's wrap returned for the layer's private options
//! JSON (the `optsdata`, sent as wrap `plaintext`). An optional `"aad":[...]` array is present
//! when the wrap used additional authenticated data. Decryption needs only a Key Protect config
//! for the same instance (any endpoint: public or private, the URL in the blob is informative);
//! the root key is taken from the blob.

use std::fmt;
use std::path::Path;

use ocicrypt_core::keywrap::BoxFuture;
use ocicrypt_core::redact::token;
use ocicrypt_core::{AsyncKeyUnwrapper, AsyncKeyWrapper, UnwrapError, WrapError};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::{b64, Client, Error};

/// The annotation scheme: `provider.keyprotect`.
pub const SCHEME: &str = "provider.keyprotect";

/// Largest file [`wrap_file_for_secret`] accepts (Key Protect's limit is lower; see docs).
pub const MAX_SECRET_FILE: u64 = 64 * 1024;

/// The JSON stored (base64) in the annotation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyProtectBlob {
    /// Key Protect URL used for the wrap (informative).
    pub kp_url: String,
    /// Instance GUID.
    pub instance_id: String,
    /// Root key id (or alias) that wrapped the options.
    pub root_key_id: String,
    /// Key Protect ciphertext.
    pub ciphertext: String,
    /// AAD used for the wrap, if any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aad: Vec<String>,
}

impl KeyProtectBlob {
    /// Parses a blob (the bytes after base64-decoding the annotation entry).
    ///
    /// # Errors
    /// [`UnwrapError::Malformed`].
    pub fn parse(blob: &[u8]) -> Result<Self, UnwrapError> {
        // serde's message would quote the offending value: say only where and what kind.
        let b: Self = serde_json::from_slice(blob).map_err(|e| UnwrapError::Malformed {
            scheme: SCHEME.into(),
            reason: format!(
                "not the Key Protect JSON {{kp_url, instance_id, root_key_id, ciphertext}} ({} at line {} column {})",
                json_error_kind(&e),
                e.line(),
                e.column()
            ),
        })?;
        if b.root_key_id.trim().is_empty() || b.ciphertext.trim().is_empty() {
            return Err(UnwrapError::Malformed {
                scheme: SCHEME.into(),
                reason: "root_key_id or ciphertext is empty".into(),
            });
        }
        Ok(b)
    }
}

/// Wraps layer options with a Key Protect root key (`--recipient provider:keyprotect:<id>`).
#[derive(Clone)]
pub struct KeyProtectWrapper {
    client: Client,
    root_key_id: String,
    aad: Vec<String>,
}

impl fmt::Debug for KeyProtectWrapper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyProtectWrapper")
            .field("root_key_id", &self.root_key_id)
            .finish_non_exhaustive()
    }
}

impl KeyProtectWrapper {
    /// A wrapper for `root_key_id` (id or alias).
    pub fn new(client: Client, root_key_id: impl Into<String>) -> Self {
        Self {
            client,
            root_key_id: root_key_id.into().trim().to_owned(),
            aad: Vec::new(),
        }
    }

    /// Binds the wrap to these AAD strings (stored in the blob; needed again to unwrap).
    #[must_use]
    pub fn with_aad(mut self, aad: Vec<String>) -> Self {
        self.aad = aad;
        self
    }

    /// The root key.
    pub fn root_key_id(&self) -> &str {
        &self.root_key_id
    }

    async fn wrap_inner(&self, optsdata: &[u8]) -> Result<Vec<u8>, WrapError> {
        if self.root_key_id.is_empty() {
            return Err(WrapError::BadRecipient {
                recipient: "provider:keyprotect:".into(),
                reason: "no root key id given; use provider:keyprotect:<root-key-id>".into(),
            });
        }
        let aad = (!self.aad.is_empty()).then_some(self.aad.as_slice());
        let out = self
            .client
            .wrap(&self.root_key_id, optsdata, aad)
            .await
            .map_err(|e| WrapError::Backend {
                context: format!(
                    "Key Protect wrap with root key {}{}",
                    quote_id(&self.root_key_id),
                    hint(&e)
                ),
                source: Box::new(e),
            })?;
        let blob = KeyProtectBlob {
            kp_url: self.client.url().to_owned(),
            instance_id: self.client.instance_id().to_owned(),
            root_key_id: self.root_key_id.clone(),
            ciphertext: out.ciphertext,
            aad: self.aad.clone(),
        };
        Ok(serde_json::to_vec(&blob).expect("json"))
    }
}

impl AsyncKeyWrapper for KeyProtectWrapper {
    fn scheme(&self) -> &str {
        SCHEME
    }
    fn wrap_keys<'a>(&'a self, optsdata: &'a [u8]) -> BoxFuture<'a, Result<Vec<u8>, WrapError>> {
        Box::pin(self.wrap_inner(optsdata))
    }
}

/// Unwraps `provider.keyprotect` layer keys with a Key Protect client.
#[derive(Clone)]
pub struct KeyProtectUnwrapper {
    client: Client,
}

impl fmt::Debug for KeyProtectUnwrapper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyProtectUnwrapper")
            .field("instance_id", &self.client.instance_id())
            .finish()
    }
}

impl KeyProtectUnwrapper {
    /// An unwrapper using `client`'s instance.
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    async fn unwrap_inner(&self, blob: &[u8]) -> Result<Zeroizing<Vec<u8>>, UnwrapError> {
        let b = KeyProtectBlob::parse(blob)?;
        if !b.instance_id.is_empty() && b.instance_id != self.client.instance_id() {
            return Err(UnwrapError::Backend {
                context: format!(
                    "this layer key was wrapped by Key Protect instance {} ({}), but the configured instance is {}",
                    quote_id(&b.instance_id),
                    token(&b.kp_url),
                    quote_id(self.client.instance_id())
                ),
                source: "Key Protect instance mismatch".into(),
            });
        }
        let aad = (!b.aad.is_empty()).then_some(b.aad.as_slice());
        let out = self
            .client
            .unwrap(&b.root_key_id, &b.ciphertext, aad)
            .await
            .map_err(|e| UnwrapError::Backend {
                context: format!(
                    "Key Protect unwrap with root key {}{}",
                    quote_id(&b.root_key_id),
                    hint(&e)
                ),
                source: Box::new(e),
            })?;
        Ok(out.plaintext)
    }
}

impl AsyncKeyUnwrapper for KeyProtectUnwrapper {
    fn scheme(&self) -> &str {
        SCHEME
    }
    fn unwrap_key<'a>(&'a self, blob: &'a [u8]) -> BoxFuture<'a, Result<Zeroizing<Vec<u8>>, UnwrapError>> {
        Box::pin(self.unwrap_inner(blob))
    }
}

/// A key or instance id for a message: a UUID as itself (the shape Key Protect uses; a UUID
/// holds nothing else), anything else (an alias, or hostile text from an image) as a
/// [`token`].
fn quote_id(id: &str) -> std::borrow::Cow<'_, str> {
    if uuid::Uuid::try_parse(id).is_ok() {
        std::borrow::Cow::Borrowed(id)
    } else {
        token(id)
    }
}

/// What kind of JSON error `e` is, without the input it quotes.
pub(crate) fn json_error_kind(e: &serde_json::Error) -> &'static str {
    match e.classify() {
        serde_json::error::Category::Io => "I/O error",
        serde_json::error::Category::Syntax => "syntax error",
        serde_json::error::Category::Data => "a field is missing or has the wrong type",
        serde_json::error::Category::Eof => "truncated",
    }
}

fn hint(e: &Error) -> &'static str {
    match e.status() {
        Some(409) => " (the root key is disabled/suspended: enable it in Key Protect)",
        Some(410) => " (the root key was deleted)",
        Some(404) => " (no such root key in this instance: check the key id, region and instance-id)",
        Some(422) => " (the ciphertext was not wrapped by this root key, or the AAD differs)",
        Some(401 | 403) => " (check the API key and its access to the instance)",
        _ if e.is_auth() => " (check the API key)",
        _ => "",
    }
}

/// `imgcrypt kp wrap --root-key ID FILE`: wraps the bytes of `path` (e.g. a private key PEM)
/// with `root_key_id` and returns the Key Protect ciphertext to put, with the root key id, in a
/// `kp-key` Secret (`stringData: {rootkeyid: ID, ciphertext: <this>}`). Equivalent to
/// `ibmcloud kp key wrap ID -p "$(base64 -w0 FILE)"`. Refuses symlinks, non-regular files,
/// empty files and files over [`MAX_SECRET_FILE`].
///
/// # Errors
/// [`Error::InvalidInput`] for a bad file, or the Key Protect error.
pub async fn wrap_file_for_secret(client: &Client, root_key_id: &str, path: &Path) -> Result<String, Error> {
    let bytes = read_secret_file(path)?;
    wrap_bytes_for_secret(client, root_key_id, &bytes).await
}

/// As [`wrap_file_for_secret`], for bytes already in memory.
///
/// # Errors
/// As [`wrap_file_for_secret`].
pub async fn wrap_bytes_for_secret(
    client: &Client,
    root_key_id: &str,
    bytes: &[u8],
) -> Result<String, Error> {
    if bytes.is_empty() {
        return Err(Error::InvalidInput("nothing to wrap: the input is empty".into()));
    }
    if b64::encode(bytes).len() > 4096 {
        tracing::warn!(
            "the input is {} bytes; its base64 exceeds the 4096 characters of Key Protect's documented wrap limit and may be refused",
            bytes.len()
        );
    }
    Ok(client.wrap(root_key_id, bytes, None).await?.ciphertext)
}

/// `imgcrypt kp unwrap --root-key ID [CIPHERTEXT]`: unwraps a `kp-key` ciphertext and returns
/// the original bytes (the PEM). Accepts the ciphertext with surrounding whitespace, and the
/// decoded JSON envelope (what a Secret holds when the ciphertext was put under `data:`).
///
/// # Errors
/// [`Error::InvalidInput`] for an empty ciphertext, or the Key Protect error.
pub async fn unwrap_for_secret(
    client: &Client,
    root_key_id: &str,
    ciphertext: &str,
) -> Result<Zeroizing<Vec<u8>>, Error> {
    let ct = normalize_ciphertext(ciphertext)?;
    Ok(client.unwrap(root_key_id, &ct, None).await?.plaintext)
}

/// Trims whitespace; re-encodes a bare JSON envelope `{"ciphertext","iv",...}` to the base64
/// ciphertext string Key Protect expects.
///
/// # Errors
/// [`Error::InvalidInput`] for an empty input.
pub fn normalize_ciphertext(s: &str) -> Result<String, Error> {
    let t = s.trim();
    if t.is_empty() {
        return Err(Error::InvalidInput("the ciphertext is empty".into()));
    }
    if t.starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(t)
            .map_err(|_| Error::InvalidInput("the ciphertext starts with '{' but is not JSON".into()))?;
        if v.get("ciphertext").is_some() && v.get("iv").is_some() {
            return Ok(b64::encode(t.as_bytes()));
        }
        return Err(Error::InvalidInput(
            "the ciphertext is JSON but not a Key Protect envelope {ciphertext, iv, version, handle}".into(),
        ));
    }
    Ok(t.to_owned())
}

/// Reads a small regular file without following a symlink at the last component.
///
/// # Errors
/// [`Error::InvalidInput`].
pub fn read_secret_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, Error> {
    let meta = std::fs::symlink_metadata(path)
        .map_err(|e| Error::InvalidInput(format!("cannot read {}: {e}", path.display())))?;
    if meta.file_type().is_symlink() {
        return Err(Error::InvalidInput(format!(
            "{} is a symlink; pass the real file (symlinks are not followed for key files)",
            path.display()
        )));
    }
    if !meta.is_file() {
        return Err(Error::InvalidInput(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    if meta.len() > MAX_SECRET_FILE {
        return Err(Error::InvalidInput(format!(
            "{} is {} bytes; Key Protect wraps small secrets only (at most {MAX_SECRET_FILE} bytes here, about 3 KB on the service)",
            path.display(),
            meta.len()
        )));
    }
    let bytes = Zeroizing::new(
        std::fs::read(path)
            .map_err(|e| Error::InvalidInput(format!("cannot read {}: {e}", path.display())))?,
    );
    if bytes.is_empty() {
        return Err(Error::InvalidInput(format!("{} is empty", path.display())));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_roundtrip_and_errors() {
        let b = KeyProtectBlob {
            kp_url: "https://x".into(),
            instance_id: "i".into(),
            root_key_id: "r".into(),
            ciphertext: "c".into(),
            aad: vec![],
        };
        let j = serde_json::to_vec(&b).unwrap();
        assert_eq!(
            std::str::from_utf8(&j).unwrap(),
            r#"{"kp_url":"https://x","instance_id":"i","root_key_id":"r","ciphertext":"c"}"#
        );
        assert_eq!(KeyProtectBlob::parse(&j).unwrap(), b);
        assert!(matches!(
            KeyProtectBlob::parse(b"{}"),
            Err(UnwrapError::Malformed { .. })
        ));
        assert!(matches!(
            KeyProtectBlob::parse(br#"{"kp_url":"","instance_id":"","root_key_id":" ","ciphertext":"c"}"#),
            Err(UnwrapError::Malformed { .. })
        ));
    }

    #[test]
    fn normalize() {
        assert_eq!(normalize_ciphertext("  abc=\n").unwrap(), "abc=");
        let env = r#"{"ciphertext":"x","iv":"y","version":"4.0.0","handle":"h"}"#;
        assert_eq!(normalize_ciphertext(env).unwrap(), b64::encode(env.as_bytes()));
        assert!(normalize_ciphertext(" ").is_err());
        assert!(normalize_ciphertext("{\"a\":1}").is_err());
    }

    #[test]
    fn secret_file_checks() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("k.pem");
        std::fs::write(&f, b"pem").unwrap();
        assert_eq!(&read_secret_file(&f).unwrap()[..], b"pem");
        let l = d.path().join("link.pem");
        std::os::unix::fs::symlink(&f, &l).unwrap();
        assert!(read_secret_file(&l).unwrap_err().to_string().contains("symlink"));
        let e = d.path().join("empty");
        std::fs::write(&e, b"").unwrap();
        assert!(read_secret_file(&e).unwrap_err().to_string().contains("empty"));
        assert!(read_secret_file(d.path())
            .unwrap_err()
            .to_string()
            .contains("not a regular file"));
    }
}

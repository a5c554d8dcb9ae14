//! ocicrypt's PKCS#11 key file: YAML naming a key on a token by URI, with the environment its
//! module needs.
//!
//! ```yaml
//! pkcs11:
//!   uri: pkcs11:token=mytoken;object=mykey?pin-value=1234&module-name=softhsm2
//! module:
//!   env:
//!     SOFTHSM2_CONF: /path/softhsm2.conf
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use zeroize::Zeroizing;

use super::{Pkcs11Error, Pkcs11Uri};

#[derive(Deserialize)]
struct Raw {
    pkcs11: RawPkcs11,
    #[serde(default)]
    module: RawModule,
}

#[derive(Deserialize)]
struct RawPkcs11 {
    uri: String,
}

#[derive(Deserialize, Default)]
struct RawModule {
    #[serde(default)]
    env: BTreeMap<String, String>,
}

/// A PKCS#11 key file: a key (public or private) on a token. Its `Debug` shows no PIN.
#[derive(Clone)]
pub struct Pkcs11KeyFile {
    uri: Pkcs11Uri,
    env: BTreeMap<String, String>,
    source_name: String,
}

impl std::fmt::Debug for Pkcs11KeyFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11KeyFile")
            .field("source_name", &self.source_name)
            .field("uri", &self.uri)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Pkcs11KeyFile {
    /// Parses a key file. As in Go, any YAML with a `pkcs11: uri:` that parses as a PKCS#11
    /// URI is one; whether the URI names enough (`id` or `object`, `token` or `slot-id`, a
    /// module, a PIN) is found out when the key is used.
    ///
    /// # Errors
    /// [`Pkcs11Error::KeyFile`]: not such YAML, or the URI does not parse.
    pub fn from_bytes(bytes: &[u8], source_name: &str) -> Result<Pkcs11KeyFile, Pkcs11Error> {
        let not_one = |reason: String| Pkcs11Error::KeyFile {
            source_name: source_name.to_owned(),
            reason,
        };
        let text = std::str::from_utf8(bytes)
            .map_err(|_| not_one("not text, so not a PKCS#11 key file (YAML)".into()))?;
        // serde_yaml's messages may quote values (a PIN): say only where it went wrong.
        let raw: Raw = serde_yaml::from_str(text).map_err(|e| {
            not_one(match e.location() {
                Some(l) => format!(
                    "not a PKCS#11 key file (YAML with pkcs11: uri:): error at line {} column {}",
                    l.line(),
                    l.column()
                ),
                None => "not a PKCS#11 key file (YAML with pkcs11: uri:)".into(),
            })
        })?;
        let raw_uri = Zeroizing::new(raw.pkcs11.uri);
        let uri = Pkcs11Uri::parse(&raw_uri).map_err(|e| not_one(e.to_string()))?;
        Ok(Pkcs11KeyFile {
            uri,
            env: raw.module.env,
            source_name: source_name.to_owned(),
        })
    }

    /// Reads a key file (bounded like every key file).
    ///
    /// # Errors
    /// [`Pkcs11Error::Io`], or as [`from_bytes`](Self::from_bytes).
    pub fn from_file(path: &Path) -> Result<Pkcs11KeyFile, Pkcs11Error> {
        let bytes = Zeroizing::new(
            crate::fsutil::read_regular(path, crate::keys::MAX_KEY_FILE_SIZE).map_err(|e| {
                Pkcs11Error::Io {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                }
            })?,
        );
        Pkcs11KeyFile::from_bytes(&bytes, &path.display().to_string())
    }

    /// Whether `bytes` is a PKCS#11 key file (Go's `IsPkcs11PrivateKey`): cheap, loads nothing.
    pub fn is_key_file(bytes: &[u8]) -> bool {
        // A key file is short YAML text that mentions pkcs11; skip the parse otherwise.
        bytes.len() <= crate::keys::MAX_KEY_FILE_SIZE as usize
            && bytes.windows(6).any(|w| w == b"pkcs11")
            && Pkcs11KeyFile::from_bytes(bytes, "").is_ok()
    }

    /// Uses this PIN (from `--key FILE:PIN`) instead of the URI's.
    #[must_use]
    pub fn with_pin(mut self, pin: &[u8]) -> Self {
        self.uri.set_pin(pin);
        self
    }

    /// The key's URI.
    pub fn uri(&self) -> &Pkcs11Uri {
        &self.uri
    }

    /// The environment the module needs (`module: env:`).
    pub fn env(&self) -> &BTreeMap<String, String> {
        &self.env
    }

    /// Where it came from.
    pub fn source_name(&self) -> &str {
        &self.source_name
    }

    /// The key as text for messages: the file and the URI without its PIN.
    pub fn describe(&self) -> String {
        format!("{} ({})", self.source_name, self.uri.describe())
    }
}

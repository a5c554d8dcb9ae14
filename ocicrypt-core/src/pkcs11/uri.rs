//! PKCS#11 URIs (RFC 7512), read as Go ocicrypt reads them (`stefanberger/go-pkcs11uri`):
//! path attributes `;`-separated, query attributes `&`-separated, values percent-decoded, and
//! the module found from `module-path` / `module-name` within the directories and paths the
//! ocicrypt config allows.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::{shown, Pkcs11Config, Pkcs11Error};
use crate::redact;

/// Largest PIN file read (`pin-source`).
const MAX_PIN_FILE: u64 = 4096;

/// A parsed `pkcs11:` URI. Its `Debug` and [`describe`](Pkcs11Uri::describe) never show
/// `pin-value`.
#[derive(Clone, PartialEq, Eq)]
pub struct Pkcs11Uri {
    path: BTreeMap<String, Vec<u8>>,
    query: BTreeMap<String, Zeroizing<Vec<u8>>>,
}

impl std::fmt::Debug for Pkcs11Uri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

fn pct_decode(s: &str) -> Result<Vec<u8>, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| "invalid percent-encoding".to_owned())?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

fn text(v: &[u8]) -> String {
    redact::token(&String::from_utf8_lossy(v)).into_owned()
}

impl Pkcs11Uri {
    /// Parses a `pkcs11:` URI.
    ///
    /// # Errors
    /// [`Pkcs11Error::Uri`] for a missing `pkcs11:` prefix, a malformed or duplicate attribute,
    /// a bad percent-encoding, a non-numeric `slot-id`, `pin-value` together with `pin-source`,
    /// or a relative `module-path` (the checks of go-pkcs11uri).
    pub fn parse(s: &str) -> Result<Pkcs11Uri, Pkcs11Error> {
        let bad = |reason: &str| Pkcs11Error::Uri {
            reason: reason.to_owned(),
        };
        let rest = s
            .strip_prefix("pkcs11:")
            .ok_or_else(|| bad("it does not start with pkcs11:"))?;
        let (path_part, query_part) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };
        let mut uri = Pkcs11Uri {
            path: BTreeMap::new(),
            query: BTreeMap::new(),
        };
        if !path_part.is_empty() {
            for part in path_part.split(';') {
                let (k, v) = part
                    .split_once('=')
                    .ok_or_else(|| bad("malformed path attribute (no '=')"))?;
                let v =
                    pct_decode(v).map_err(|e| bad(&format!("path attribute {}: {e}", redact::token(k))))?;
                if uri.path.insert(k.to_owned(), v).is_some() {
                    return Err(bad(&format!("duplicate path attribute {}", redact::token(k))));
                }
            }
        }
        if let Some(q) = query_part {
            for part in q.split('&') {
                let (k, v) = part
                    .split_once('=')
                    .ok_or_else(|| bad("malformed query attribute (no '=')"))?;
                let v =
                    pct_decode(v).map_err(|e| bad(&format!("query attribute {}: {e}", redact::token(k))))?;
                if uri.query.insert(k.to_owned(), Zeroizing::new(v)).is_some() {
                    return Err(bad(&format!("duplicate query attribute {}", redact::token(k))));
                }
            }
        }
        uri.validate()?;
        Ok(uri)
    }

    fn validate(&self) -> Result<(), Pkcs11Error> {
        let bad = |reason: String| Pkcs11Error::Uri { reason };
        if let Some(v) = self.path.get("slot-id") {
            if std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse::<i64>().ok())
                .is_none()
            {
                return Err(bad(format!("slot-id must be a number, not {}", text(v))));
            }
        }
        if let Some(v) = self.path.get("type") {
            if !matches!(
                &v[..],
                b"" | b"public" | b"private" | b"cert" | b"secret-key" | b"data"
            ) {
                return Err(bad(format!("invalid type {}", text(v))));
            }
        }
        if self.query.contains_key("pin-source") && self.query.contains_key("pin-value") {
            return Err(bad("it must not carry both pin-source and pin-value".into()));
        }
        if let Some(v) = self.query.get("module-path") {
            if !Path::new(&*String::from_utf8_lossy(v)).is_absolute() {
                return Err(bad(format!("module-path {} must be absolute", text(v))));
            }
        }
        Ok(())
    }

    /// A path attribute (`token`, `object`, `id`, `slot-id`…), percent-decoded.
    pub fn path_attribute(&self, name: &str) -> Option<&[u8]> {
        self.path.get(name).map(Vec::as_slice)
    }

    /// A query attribute other than the PIN (`module-name`, `module-path`), percent-decoded.
    pub fn query_attribute(&self, name: &str) -> Option<&[u8]> {
        if name == "pin-value" {
            return None;
        }
        self.query.get(name).map(|v| v.as_slice())
    }

    /// The URI as text for messages: path attributes and the module, never the PIN.
    pub fn describe(&self) -> String {
        let mut parts: Vec<String> = self
            .path
            .iter()
            .filter(|(k, _)| matches!(k.as_str(), "token" | "object" | "id" | "slot-id" | "type"))
            .map(|(k, v)| {
                if k == "id" {
                    format!("id={}", hex::encode(v))
                } else {
                    format!("{k}={}", text(v))
                }
            })
            .collect();
        for k in ["module-name", "module-path"] {
            if let Some(v) = self.query.get(k) {
                parts.push(format!("{k}={}", text(v)));
            }
        }
        format!("pkcs11:{}", parts.join(";"))
    }

    /// Whether a PIN is given (`pin-value` or `pin-source`).
    pub fn has_pin(&self) -> bool {
        self.query.contains_key("pin-value") || self.query.contains_key("pin-source")
    }

    /// Sets the PIN (as from `--key FILE:PIN`), replacing `pin-value` and `pin-source`.
    pub fn set_pin(&mut self, pin: &[u8]) {
        self.query.remove("pin-source");
        self.query
            .insert("pin-value".to_owned(), Zeroizing::new(pin.to_vec()));
    }

    /// The PIN: `pin-value`, or the content of the file `pin-source` names (an absolute path or
    /// a `file:` URI, as in Go; one trailing newline is dropped, which Go does not do).
    ///
    /// # Errors
    /// [`Pkcs11Error::PinSource`] when the PIN file cannot be read.
    pub fn pin(&self) -> Result<Option<Zeroizing<Vec<u8>>>, Pkcs11Error> {
        if let Some(v) = self.query.get("pin-value") {
            return Ok(Some(v.clone()));
        }
        let Some(src) = self.query.get("pin-source") else {
            return Ok(None);
        };
        let src = String::from_utf8_lossy(src).into_owned();
        let path = src
            .strip_prefix("file://")
            .or_else(|| src.strip_prefix("file:"))
            .unwrap_or(&src);
        let bad = |reason: String| Pkcs11Error::PinSource { reason };
        if !Path::new(path).is_absolute() {
            return Err(bad(format!(
                "pin-source {} is not an absolute path",
                shown(Path::new(path))
            )));
        }
        let mut pin = Zeroizing::new(
            crate::fsutil::read_regular(Path::new(path), MAX_PIN_FILE).map_err(|e| {
                bad(format!(
                    "cannot read the PIN file {}: {e}",
                    shown(Path::new(path))
                ))
            })?,
        );
        if pin.last() == Some(&b'\n') {
            pin.pop();
            if pin.last() == Some(&b'\r') {
                pin.pop();
            }
        }
        Ok(Some(pin))
    }

    /// The `slot-id`, if given.
    ///
    /// # Errors
    /// [`Pkcs11Error::Uri`] when it is negative or above 32 bits (as in Go).
    pub fn slot_id(&self) -> Result<Option<u64>, Pkcs11Error> {
        let Some(v) = self.path.get("slot-id") else {
            return Ok(None);
        };
        let n: i64 = std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Pkcs11Error::Uri {
                reason: "slot-id is not a number".into(),
            })?;
        u32::try_from(n)
            .map(|n| Some(u64::from(n)))
            .map_err(|_| Pkcs11Error::Uri {
                reason: "slot-id is negative or larger than 32 bits".into(),
            })
    }

    /// The module library to load, resolved as go-pkcs11uri does: `module-path` naming a file
    /// must be allowed by `allowed-module-paths`; otherwise `module-name` is looked up (case
    /// insensitively, `NAME` or `NAME.…` at the end of a file name) in `module-path` (a
    /// directory) or in the config's `module-directories`, and the first match must be allowed.
    ///
    /// # Errors
    /// [`Pkcs11Error::ModuleNotAllowed`], [`Pkcs11Error::ModuleNotFound`].
    pub fn module(&self, config: &Pkcs11Config) -> Result<PathBuf, Pkcs11Error> {
        let searchdirs: Vec<PathBuf> = if let Some(v) = self.query.get("module-path") {
            let p = PathBuf::from(&*String::from_utf8_lossy(v));
            let meta = std::fs::metadata(&p).map_err(|_| Pkcs11Error::ModuleNotFound {
                what: format!("module-path {} is not accessible", shown(&p)),
            })?;
            if meta.is_file() {
                if config.allows(&p) {
                    return Ok(p);
                }
                return Err(Pkcs11Error::ModuleNotAllowed { module: shown(&p) });
            }
            if !meta.is_dir() {
                return Err(Pkcs11Error::ModuleNotFound {
                    what: format!("module-path {} is neither a file nor a directory", shown(&p)),
                });
            }
            vec![p]
        } else {
            config.module_directories.iter().map(PathBuf::from).collect()
        };
        let name = self
            .query
            .get("module-name")
            .ok_or_else(|| Pkcs11Error::ModuleNotFound {
                what: "the URI names no module (module-name or module-path)".into(),
            })?;
        let name = String::from_utf8_lossy(name).to_lowercase();
        if name.is_empty() {
            return Err(Pkcs11Error::ModuleNotFound {
                what: "module-name is empty".into(),
            });
        }
        for dir in &searchdirs {
            let Ok(rd) = std::fs::read_dir(dir) else {
                continue;
            };
            let mut names: Vec<String> = rd
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            for file in names {
                let lower = file.to_lowercase();
                let Some(i) = lower.find(&name) else {
                    continue;
                };
                let after = lower.as_bytes().get(i + name.len());
                if after.is_none() || after == Some(&b'.') {
                    let f = dir.join(&file);
                    if config.allows(&f) {
                        return Ok(f);
                    }
                    return Err(Pkcs11Error::ModuleNotAllowed { module: shown(&f) });
                }
            }
        }
        Err(Pkcs11Error::ModuleNotFound {
            what: format!(
                "no module named {} in the module directories ({})",
                redact::token(&name),
                searchdirs.iter().map(|d| shown(d)).collect::<Vec<_>>().join(", ")
            ),
        })
    }
}

//! Registry credentials: `--creds`, `--authfile`/`REGISTRY_AUTH_FILE`,
//! `$XDG_RUNTIME_DIR/containers/auth.json` and `~/.docker/config.json`; in each file a
//! `credHelpers` entry for the registry, else `credsStore`, else the `auths` entry (Docker
//! credential helpers run through [`crate::credhelper`]).

use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use zeroize::Zeroizing;

use crate::credhelper;
use crate::error::Error;

/// Largest auth file read (`auth.json`, `config.json`).
pub const MAX_AUTH_FILE: u64 = 1 << 20;

/// A user name and password.
#[derive(Clone)]
pub struct Creds {
    /// User name.
    pub user: String,
    /// Password (or token).
    pub password: Zeroizing<String>,
    /// Where they came from, for messages.
    pub origin: String,
}

impl fmt::Debug for Creds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Creds")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("origin", &self.origin)
            .finish()
    }
}

impl Creds {
    /// Parses `USER:PASSWORD` (split at the first ':').
    ///
    /// # Errors
    /// [`Error::BadCreds`] naming `origin`.
    pub fn parse(s: &str, origin: &str) -> Result<Creds, Error> {
        match s.split_once(':') {
            Some((u, p)) if !u.is_empty() => Ok(Creds {
                user: u.to_owned(),
                password: Zeroizing::new(p.to_owned()),
                origin: origin.to_owned(),
            }),
            _ => Err(Error::BadCreds {
                origin: origin.to_owned(),
            }),
        }
    }

    /// The `Authorization: Basic …` value.
    pub fn basic_header(&self) -> Zeroizing<String> {
        let raw = Zeroizing::new(format!("{}:{}", self.user, &*self.password));
        Zeroizing::new(format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw.as_bytes())
        ))
    }
}

/// The auth files to look in, in order: the explicit one (`--authfile`, else
/// `REGISTRY_AUTH_FILE`), then podman's and Docker's defaults.
pub fn auth_files(explicit: Option<&Path>) -> Vec<(PathBuf, bool)> {
    let mut out = Vec::new();
    if let Some(p) = explicit {
        out.push((p.to_owned(), true));
        return out;
    }
    if let Some(p) = std::env::var_os("REGISTRY_AUTH_FILE").filter(|v| !v.is_empty()) {
        out.push((PathBuf::from(p), true));
        return out;
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        out.push((PathBuf::from(d).join("containers").join("auth.json"), false));
    }
    if let Some(d) = std::env::var_os("DOCKER_CONFIG").filter(|v| !v.is_empty()) {
        out.push((PathBuf::from(d).join("config.json"), false));
    } else if let Some(h) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        out.push((PathBuf::from(h).join(".docker").join("config.json"), false));
    }
    out
}

fn normalize_key(k: &str) -> &str {
    let k = k
        .strip_prefix("https://")
        .or_else(|| k.strip_prefix("http://"))
        .unwrap_or(k);
    k.split('/').next().unwrap_or(k)
}

fn host_matches(key: &str, host: &str) -> bool {
    let k = normalize_key(key);
    k == host || (host == "docker.io" && matches!(k, "index.docker.io" | "registry-1.docker.io"))
}

/// Looks `host` up in one auth file's JSON.
///
/// # Errors
/// [`Error::AuthFileSyntax`], [`Error::AuthEntry`] for a malformed file or entry,
/// [`Error::CredHelper`] when the helper it names fails.
pub fn lookup_in(json: &[u8], host: &str, origin: &str) -> Result<Option<Creds>, Error> {
    let v: serde_json::Value = serde_json::from_slice(json).map_err(|e| Error::AuthFileSyntax {
        path: origin.to_owned(),
        detail: e.to_string(),
    })?;
    // As the Docker CLI: a credHelpers entry for the registry, else the credsStore, else auths.
    let helper = v
        .get("credHelpers")
        .and_then(|h| h.as_object())
        .and_then(|h| h.iter().find(|(k, _)| host_matches(k, host)))
        .and_then(|(_, n)| n.as_str())
        .map(|n| (n, "credHelpers"))
        .or_else(|| {
            v.get("credsStore")
                .and_then(|n| n.as_str())
                .filter(|n| !n.is_empty())
                .map(|n| (n, "credsStore"))
        });
    if let Some((name, field)) = helper {
        let server = credhelper::server_for(host);
        match credhelper::get(name, &server) {
            Ok(Some(c)) if !c.username.is_empty() => {
                return Ok(Some(Creds {
                    user: c.username,
                    password: c.secret,
                    origin: format!("credential helper docker-credential-{name} ({field} in {origin})"),
                }))
            }
            Ok(_) => {}
            Err(e) => {
                return Err(Error::CredHelper {
                    registry: host.to_owned(),
                    helper: name.to_owned(),
                    field,
                    path: origin.to_owned(),
                    source: Box::new(e),
                })
            }
        }
    }
    let Some(auths) = v.get("auths").and_then(|a| a.as_object()) else {
        return Ok(None);
    };
    for (key, entry) in auths {
        if !host_matches(key, host) {
            continue;
        }
        let Some(b64) = entry
            .get("auth")
            .and_then(|a| a.as_str())
            .filter(|s| !s.is_empty())
        else {
            continue;
        };
        let bad_entry = |problem: String| Error::AuthEntry {
            path: origin.to_owned(),
            key: key.clone(),
            problem,
        };
        let raw = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|e| bad_entry(format!("not base64: {e}")))?,
        );
        let text = std::str::from_utf8(&raw).map_err(|_| bad_entry("not UTF-8".into()))?;
        return Creds::parse(text, &format!("auth file {origin}"))
            .map(Some)
            .map_err(|_| bad_entry("not base64(USER:PASSWORD)".into()));
    }
    Ok(None)
}

/// Finds credentials for `host`: `explicit` first, then the auth files.
///
/// # Errors
/// [`Error::AuthFileUnreadable`] when an explicitly named auth file cannot be read, and the
/// errors of [`lookup_in`].
pub fn find_creds(
    host: &str,
    explicit: Option<Creds>,
    authfile: Option<&Path>,
) -> Result<Option<Creds>, Error> {
    if explicit.is_some() {
        return Ok(explicit);
    }
    for (path, required) in auth_files(authfile) {
        let bytes = match ocicrypt_core::fsutil::read_regular(&path, MAX_AUTH_FILE) {
            Ok(b) => Zeroizing::new(b),
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(Error::AuthFileUnreadable {
                    path: path.display().to_string(),
                    source: e,
                })
            }
        };
        if let Some(c) = lookup_in(&bytes, host, &path.display().to_string())? {
            return Ok(Some(c));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_creds() {
        let c = Creds::parse("u:p:q", "--creds").unwrap();
        assert_eq!((c.user.as_str(), c.password.as_str()), ("u", "p:q"));
        assert!(Creds::parse("nopass", "--creds").is_err());
        assert!(Creds::parse(":p", "--creds").is_err());
        assert_eq!(c.basic_header().as_str(), "Basic dTpwOnE=");
        assert!(!format!("{c:?}").contains("p:q"));
    }

    #[test]
    fn auth_file_lookup() {
        let json = br#"{"auths":{"https://127.0.0.1:5000/v1/":{"auth":"YWxpY2U6c2VjcmV0"},"https://index.docker.io/v1/":{"auth":"Ym9iOnB3"}}}"#;
        let c = lookup_in(json, "127.0.0.1:5000", "f").unwrap().unwrap();
        assert_eq!((c.user.as_str(), c.password.as_str()), ("alice", "secret"));
        let c = lookup_in(json, "docker.io", "f").unwrap().unwrap();
        assert_eq!(c.user, "bob");
        assert!(lookup_in(json, "127.0.0.1:5001", "f").unwrap().is_none());
        assert!(matches!(
            lookup_in(b"{", "h", "f").unwrap_err(),
            Error::AuthFileSyntax { .. }
        ));
        assert!(lookup_in(br#"{"auths":{"h":{"auth":"!!"}}}"#, "h", "f").is_err());
    }
}

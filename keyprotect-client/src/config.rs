//! Key Protect configuration: the add-on's `config.json` shape, from a file or the environment,
//! and endpoint validation (HTTPS, or plain HTTP to loopback only).

use std::fmt;
use std::net::IpAddr;
use std::path::Path;

use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::Error;

/// Environment variable naming a `config.json` file (takes precedence over the `KP_*` variables).
pub const ENV_CONFIG_FILE: &str = "IMGCRYPT_KEYPROTECT_CONFIG";
/// Environment variable: the Key Protect service URL (`https://us-south.kms.cloud.ibm.com`).
pub const ENV_URL: &str = "KP_URL";
/// Environment variable: the Key Protect instance GUID.
pub const ENV_INSTANCE_ID: &str = "KP_INSTANCE_ID";
/// Environment variable: the IBM Cloud API key.
pub const ENV_APIKEY: &str = "KP_APIKEY";
/// Environment variable (optional): the IAM base URL or token URL.
pub const ENV_IAM_URL: &str = "KP_IAM_URL";

/// Public IAM token endpoint.
pub const PUBLIC_IAM_TOKEN_URL: &str = "https://iam.cloud.ibm.com/identity/token";
/// Private IAM token endpoint (used when the Key Protect host starts with `private.`).
pub const PRIVATE_IAM_TOKEN_URL: &str = "https://private.iam.cloud.ibm.com/identity/token";

/// Where and how to reach one Key Protect instance.
///
/// The JSON shape is the Image Key Synchronizer add-on's `config.json`:
/// `{"keyprotect-url": "...", "instance-id": "...", "apikey": "...", "iam-url": "..."}`
/// (`iam-url` optional). The API key never appears in `Debug` output.
#[derive(Clone, Deserialize)]
pub struct KeyProtectConfig {
    /// Key Protect base URL, e.g. `https://us-south.kms.cloud.ibm.com` (a trailing `/` or
    /// `/api/v2` is tolerated).
    #[serde(rename = "keyprotect-url")]
    pub url: String,
    /// Key Protect instance GUID (sent as `bluemix-instance`).
    #[serde(rename = "instance-id")]
    pub instance_id: String,
    /// IBM Cloud API key.
    pub apikey: SecretString,
    /// IAM base URL (`https://iam.cloud.ibm.com`) or full token URL; derived from `url` when absent.
    #[serde(rename = "iam-url", default)]
    pub iam_url: Option<String>,
}

impl fmt::Debug for KeyProtectConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyProtectConfig")
            .field("url", &self.url)
            .field("instance_id", &self.instance_id)
            .field("apikey", &"[REDACTED]")
            .field("iam_url", &self.iam_url)
            .finish()
    }
}

impl KeyProtectConfig {
    /// A config from its parts.
    pub fn new(
        url: impl Into<String>,
        instance_id: impl Into<String>,
        apikey: impl Into<String>,
        iam_url: Option<String>,
    ) -> Self {
        Self {
            url: url.into(),
            instance_id: instance_id.into(),
            apikey: SecretString::from(apikey.into()),
            iam_url,
        }
        .trimmed()
    }

    /// Surrounding whitespace (a trailing newline from `kubectl create secret --from-file`,
    /// an `echo` without `-n`) is not part of any field.
    fn trimmed(self) -> Self {
        let key = self.apikey.expose_secret();
        let apikey = if key.trim() == key {
            self.apikey.clone()
        } else {
            SecretString::from(key.trim().to_owned())
        };
        Self {
            url: self.url.trim().to_owned(),
            instance_id: self.instance_id.trim().to_owned(),
            apikey,
            iam_url: self
                .iam_url
                .map(|u| u.trim().to_owned())
                .filter(|u| !u.is_empty()),
        }
    }

    /// Parses the add-on's `config.json` and validates it.
    ///
    /// # Errors
    /// [`Error::Config`] naming the missing or bad field.
    pub fn from_json(bytes: &[u8]) -> Result<Self, Error> {
        let c: Self = serde_json::from_slice(bytes).map_err(|e| {
            // serde_json errors never echo string values of unknown fields, but be safe:
            // report only the category and position.
            Error::Config(format!(
                "Key Protect config is not valid JSON with fields keyprotect-url, instance-id, apikey \
                 (optional iam-url): {} at line {} column {}",
                classify_json_error(&e),
                e.line(),
                e.column()
            ))
        })?;
        let c = c.trimmed();
        c.validate()?;
        Ok(c)
    }

    /// Reads and parses a `config.json` file.
    ///
    /// # Errors
    /// [`Error::Config`] when the file cannot be read or is invalid.
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let bytes =
            zeroize::Zeroizing::new(std::fs::read(path).map_err(|e| {
                Error::Config(format!("cannot read Key Protect config {}: {e}", path.display()))
            })?);
        Self::from_json(&bytes).map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Loads the config from the environment: the file named by `IMGCRYPT_KEYPROTECT_CONFIG`,
    /// else `KP_URL` + `KP_INSTANCE_ID` + `KP_APIKEY` (+ optional `KP_IAM_URL`).
    /// `Ok(None)` when none of these is set.
    ///
    /// # Errors
    /// [`Error::Config`] when the variables are set only partly or hold bad values.
    pub fn from_env() -> Result<Option<Self>, Error> {
        Self::from_env_with(|k| std::env::var(k).ok())
    }

    /// As [`from_env`](Self::from_env), with a custom variable lookup (for tests).
    ///
    /// # Errors
    /// As [`from_env`](Self::from_env).
    pub fn from_env_with(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, Error> {
        if let Some(path) = get(ENV_CONFIG_FILE).filter(|p| !p.is_empty()) {
            return Self::from_file(Path::new(&path)).map(Some);
        }
        let url = get(ENV_URL).filter(|v| !v.is_empty());
        let inst = get(ENV_INSTANCE_ID).filter(|v| !v.is_empty());
        let key = get(ENV_APIKEY).filter(|v| !v.is_empty());
        let iam = get(ENV_IAM_URL).filter(|v| !v.is_empty());
        match (url, inst, key) {
            (None, None, None) => Ok(None),
            (Some(url), Some(inst), Some(key)) => {
                let c = Self::new(url, inst, key, iam);
                c.validate()?;
                Ok(Some(c))
            }
            (u, i, k) => {
                let missing: Vec<&str> = [
                    (u.is_none(), ENV_URL),
                    (i.is_none(), ENV_INSTANCE_ID),
                    (k.is_none(), ENV_APIKEY),
                ]
                .into_iter()
                .filter_map(|(m, n)| m.then_some(n))
                .collect();
                Err(Error::Config(format!(
                    "incomplete Key Protect environment: set {} (or point {ENV_CONFIG_FILE} at a config.json)",
                    missing.join(", ")
                )))
            }
        }
    }

    /// Checks every field: URLs parse and are HTTPS (HTTP only to loopback), the instance id
    /// and API key are not empty.
    ///
    /// # Errors
    /// [`Error::Config`].
    pub fn validate(&self) -> Result<(), Error> {
        self.api_base()?;
        self.iam_token_url()?;
        if self.instance_id.trim().is_empty() {
            return Err(Error::Config("Key Protect config: instance-id is empty".into()));
        }
        if self
            .instance_id
            .chars()
            .any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(Error::Config(
                "Key Protect config: instance-id contains whitespace or control characters".into(),
            ));
        }
        if self.apikey.expose_secret().trim().is_empty() {
            return Err(Error::Config("Key Protect config: apikey is empty".into()));
        }
        Ok(())
    }

    /// The service base URL with `/api/v2/` appended (`https://host/api/v2/`).
    ///
    /// # Errors
    /// [`Error::Config`] for a bad URL.
    pub fn api_base(&self) -> Result<Url, Error> {
        let mut u = checked_url("keyprotect-url", &self.url)?;
        let mut path = u.path().trim_end_matches('/').to_owned();
        if let Some(p) = path.strip_suffix("/api/v2") {
            path = p.to_owned();
        }
        u.set_path(&format!("{path}/api/v2/"));
        u.set_query(None);
        u.set_fragment(None);
        Ok(u)
    }

    /// The IAM token URL: `iam-url` if set (a bare base gets `/identity/token` appended),
    /// else the private IAM endpoint for a `private.` Key Protect host, else the public one.
    ///
    /// # Errors
    /// [`Error::Config`] for a bad URL.
    pub fn iam_token_url(&self) -> Result<Url, Error> {
        if let Some(iam) = &self.iam_url {
            let mut u = checked_url("iam-url", iam)?;
            let path = u.path().trim_end_matches('/').to_owned();
            if !(path.ends_with("/identity/token") || path.ends_with("/oidc/token")) {
                u.set_path(&format!("{path}/identity/token"));
            }
            return Ok(u);
        }
        let kp = checked_url("keyprotect-url", &self.url)?;
        let private = kp.host_str().is_some_and(|h| h.starts_with("private."));
        Ok(Url::parse(if private {
            PRIVATE_IAM_TOKEN_URL
        } else {
            PUBLIC_IAM_TOKEN_URL
        })
        .expect("constant URL"))
    }
}

fn classify_json_error(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    match e.classify() {
        Category::Io => "I/O error".into(),
        Category::Syntax => "syntax error".into(),
        Category::Eof => "unexpected end of input".into(),
        // "missing field `apikey`" / "invalid type: ..." messages hold no values.
        Category::Data => {
            let m = e.to_string();
            match m.find(" at line") {
                Some(i) => m[..i].to_owned(),
                None => m,
            }
        }
    }
}

/// Parses an endpoint URL: `https`, or `http` only when the host is a loopback address.
///
/// # Errors
/// [`Error::Config`] naming `what`.
pub fn checked_url(what: &str, s: &str) -> Result<Url, Error> {
    let u = Url::parse(s.trim()).map_err(|e| {
        Error::Config(format!(
            "{what} {s:?} is not a URL ({e}); expected e.g. https://us-south.kms.cloud.ibm.com"
        ))
    })?;
    if !u.username().is_empty() || u.password().is_some() {
        return Err(Error::Config(format!("{what} must not contain credentials")));
    }
    match u.scheme() {
        "https" => Ok(u),
        "http" if is_loopback(&u) => Ok(u),
        "http" => Err(Error::Config(format!(
            "{what} {s:?} uses plain http to a non-loopback host; use https (plain http is allowed only for 127.0.0.0/8, ::1 and localhost)"
        ))),
        other => Err(Error::Config(format!("{what} {s:?} has unsupported scheme {other:?}; use https"))),
    }
}

fn is_loopback(u: &Url) -> bool {
    match u.host() {
        Some(url::Host::Ipv4(a)) => a.is_loopback(),
        Some(url::Host::Ipv6(a)) => a.is_loopback(),
        Some(url::Host::Domain(d)) => {
            d.eq_ignore_ascii_case("localhost") || d.parse::<IpAddr>().is_ok_and(|a| a.is_loopback())
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addon_config_and_redacts() {
        let c = KeyProtectConfig::from_json(
            br#"{"keyprotect-url":"https://us-south.kms.cloud.ibm.com","instance-id":"abc","apikey":"s3cr3t-key"}"#,
        )
        .unwrap();
        assert_eq!(
            c.api_base().unwrap().as_str(),
            "https://us-south.kms.cloud.ibm.com/api/v2/"
        );
        assert_eq!(c.iam_token_url().unwrap().as_str(), PUBLIC_IAM_TOKEN_URL);
        assert!(!format!("{c:?}").contains("s3cr3t"));
    }

    #[test]
    fn private_endpoint_derives_private_iam_and_tolerates_api_v2() {
        let c = KeyProtectConfig::new("https://private.eu-de.kms.cloud.ibm.com/api/v2/", "i", "k", None);
        assert_eq!(c.iam_token_url().unwrap().as_str(), PRIVATE_IAM_TOKEN_URL);
        assert_eq!(
            c.api_base().unwrap().as_str(),
            "https://private.eu-de.kms.cloud.ibm.com/api/v2/"
        );
        let c = KeyProtectConfig::new(
            "http://127.0.0.1:8080",
            "i",
            "k",
            Some("http://127.0.0.1:9/".into()),
        );
        assert_eq!(
            c.iam_token_url().unwrap().as_str(),
            "http://127.0.0.1:9/identity/token"
        );
        let c = KeyProtectConfig::new(
            "http://localhost:1",
            "i",
            "k",
            Some("http://[::1]:9/oidc/token".into()),
        );
        assert_eq!(c.iam_token_url().unwrap().as_str(), "http://[::1]:9/oidc/token");
    }

    #[test]
    fn plain_http_only_to_loopback() {
        for bad in [
            "http://kms.example.com",
            "http://10.0.0.1:80",
            "ftp://127.0.0.1",
            "not a url",
        ] {
            let c = KeyProtectConfig::new(bad, "i", "k", None);
            assert!(matches!(c.validate(), Err(Error::Config(_))), "{bad}");
        }
        assert!(KeyProtectConfig::new("http://127.0.0.2:1", "i", "k", None)
            .validate()
            .is_ok());
    }

    #[test]
    fn errors_name_missing_fields_and_hide_values() {
        let e = KeyProtectConfig::from_json(br#"{"keyprotect-url":"https://x","instance-id":"i"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("apikey"), "{e}");
        let e =
            KeyProtectConfig::from_json(br#"{"keyprotect-url":"https://x","instance-id":"i","apikey":""}"#)
                .unwrap_err()
                .to_string();
        assert!(e.contains("apikey is empty"), "{e}");
    }

    #[test]
    fn env_lookup() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| (*v).to_owned())
        };
        assert!(KeyProtectConfig::from_env_with(env(&[])).unwrap().is_none());
        let c = KeyProtectConfig::from_env_with(env(&[
            ("KP_URL", "https://us-south.kms.cloud.ibm.com"),
            ("KP_INSTANCE_ID", "inst"),
            ("KP_APIKEY", "key"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(c.instance_id, "inst");
        let e = KeyProtectConfig::from_env_with(env(&[("KP_URL", "https://x")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("KP_INSTANCE_ID") && e.contains("KP_APIKEY"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(
            &p,
            br#"{"keyprotect-url":"https://x.example","instance-id":"f","apikey":"k"}"#,
        )
        .unwrap();
        let ps = p.to_str().unwrap().to_owned();
        let c = KeyProtectConfig::from_env_with(move |k| (k == ENV_CONFIG_FILE).then(|| ps.clone()))
            .unwrap()
            .unwrap();
        assert_eq!(c.instance_id, "f");
    }
}

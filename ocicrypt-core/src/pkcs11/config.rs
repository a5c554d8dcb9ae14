//! The module policy: which PKCS#11 modules (C libraries) may be loaded, from the `pkcs11:`
//! section of `ocicrypt.conf`, found where Go ocicrypt (`config/pkcs11config`) looks for it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{shown, Pkcs11Error};

/// The config file's name.
pub const CONFIG_FILE: &str = "ocicrypt.conf";
/// The environment variable naming the config file (or `internal`).
pub const CONFIG_ENV: &str = "OCICRYPT_CONFIG";
/// The system-wide config file. (Go reads the *relative* path `etc/ocicrypt.conf`, so it finds
/// the system file only when run from `/`; we read the absolute path.)
pub const SYSTEM_CONFIG: &str = "/etc/ocicrypt.conf";
/// Largest config file read.
const MAX_CONFIG_FILE: u64 = 64 << 10;

/// Where PKCS#11 modules are searched (`module-directories`) and which may be loaded
/// (`allowed-module-paths`: exact files, or directories ending in `/` whose files, not
/// subdirectories, are allowed). This is also the YAML of the decoder's `pkcs11-config`
/// parameter.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pkcs11Config {
    /// Directories searched for `module-name`.
    #[serde(rename = "module-directories", default)]
    pub module_directories: Vec<String>,
    /// Modules that may be loaded.
    #[serde(rename = "allowed-module-paths", default)]
    pub allowed_module_paths: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
struct OcicryptConfig {
    #[serde(default)]
    pkcs11: Pkcs11Config,
}

impl Pkcs11Config {
    /// Go's built-in policy (`OCICRYPT_CONFIG=internal`): the distributions' module
    /// directories, every module in them allowed.
    pub fn internal() -> Pkcs11Config {
        let mut dirs: Vec<String> = [
            "/usr/lib64/pkcs11/",
            "/usr/lib/pkcs11/",
            "/usr/local/lib/pkcs11/",
            "/usr/lib/softhsm/",
        ]
        .map(String::from)
        .to_vec();
        let arch = match std::env::consts::ARCH {
            "x86_64" => Some("x86_64"),
            "aarch64" => Some("aarch64"),
            "arm" => Some("arm"),
            "powerpc64" => Some("powerpc64le"),
            "riscv64" => Some("riscv64"),
            "s390x" => Some("s390x"),
            _ => None,
        };
        if let (Some(a), "linux") = (arch, std::env::consts::OS) {
            dirs.push(format!("/usr/lib/{a}-linux-gnu/"));
        }
        Pkcs11Config {
            module_directories: dirs.clone(),
            allowed_module_paths: dirs,
        }
    }

    /// Parses the YAML of a bare policy (`module-directories:`, `allowed-module-paths:`), the
    /// form of the decoder's `pkcs11-config` parameter.
    ///
    /// # Errors
    /// [`Pkcs11Error::Config`].
    pub fn from_yaml(bytes: &[u8], source_name: &str) -> Result<Pkcs11Config, Pkcs11Error> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Pkcs11Config::default());
        }
        serde_yaml::from_slice(bytes).map_err(|e| Pkcs11Error::Config {
            source_name: source_name.to_owned(),
            reason: yaml_reason(&e),
        })
    }

    /// The policy as YAML (what Go passes as `pkcs11-config`).
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).unwrap_or_default()
    }

    /// Parses an `ocicrypt.conf` (the policy under `pkcs11:`; other sections are ignored).
    ///
    /// # Errors
    /// [`Pkcs11Error::Config`].
    pub fn from_config_file_bytes(bytes: &[u8], source_name: &str) -> Result<Pkcs11Config, Pkcs11Error> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Pkcs11Config::default());
        }
        let c: OcicryptConfig = serde_yaml::from_slice(bytes).map_err(|e| Pkcs11Error::Config {
            source_name: source_name.to_owned(),
            reason: yaml_reason(&e),
        })?;
        Ok(c.pkcs11)
    }

    /// The user's policy, looked up as Go does: `OCICRYPT_CONFIG` (`internal` for the built-in
    /// one, else a file; a missing file falls through), `$XDG_CONFIG_HOME/ocicrypt.conf`,
    /// `$HOME/.config/ocicrypt.conf`, then [`SYSTEM_CONFIG`]. Returns the policy and where it
    /// came from.
    ///
    /// # Errors
    /// [`Pkcs11Error::NoConfig`] when none exists (no module may be loaded then),
    /// [`Pkcs11Error::Config`] for a file that cannot be read or parsed.
    pub fn from_env() -> Result<(Pkcs11Config, String), Pkcs11Error> {
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Some(v) = std::env::var_os(CONFIG_ENV).filter(|v| !v.is_empty()) {
            if v == "internal" {
                return Ok((Pkcs11Config::internal(), format!("{CONFIG_ENV}=internal")));
            }
            candidates.push(PathBuf::from(v));
        }
        if let Some(v) = std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
            candidates.push(Path::new(&v).join(CONFIG_FILE));
        }
        if let Some(v) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            candidates.push(Path::new(&v).join(".config").join(CONFIG_FILE));
        }
        candidates.push(PathBuf::from(SYSTEM_CONFIG));
        for c in &candidates {
            match std::fs::metadata(c) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                _ => {}
            }
            let name = shown(c);
            let bytes = crate::fsutil::read_regular(c, MAX_CONFIG_FILE).map_err(|e| Pkcs11Error::Config {
                source_name: name.clone(),
                reason: e.to_string(),
            })?;
            return Ok((Pkcs11Config::from_config_file_bytes(&bytes, &name)?, name));
        }
        Err(Pkcs11Error::NoConfig {
            searched: candidates.iter().map(|c| shown(c)).collect(),
        })
    }

    /// Whether the module at `path` may be loaded (go-pkcs11uri `isAllowedPath`).
    pub fn allows(&self, path: &Path) -> bool {
        let Some(p) = path.to_str() else {
            return false;
        };
        self.allowed_module_paths.iter().any(|a| {
            if a.is_empty() {
                return false;
            }
            if a == p {
                return true;
            }
            a.ends_with('/') && p.strip_prefix(a.as_str()).is_some_and(|rest| !rest.contains('/'))
        })
    }
}

fn yaml_reason(e: &serde_yaml::Error) -> String {
    // serde_yaml quotes neither values nor the input in its messages beyond field names;
    // keep only the first line.
    let s = e.to_string();
    crate::redact::server_text(s.lines().next().unwrap_or("invalid YAML"), &[])
}

//! Docker credential helpers (`credsStore`, `credHelpers` in `config.json` or `auth.json`): the
//! docker-credential-helpers protocol's `get`.
//!
//! `docker-credential-NAME get` is run with the server (the registry's `HOST[:PORT]`, or
//! `https://index.docker.io/v1/` for Docker Hub) on stdin, and answers
//! `{"ServerURL": …, "Username": …, "Secret": …}` on stdout, or fails with
//! `credentials not found in native keychain` when it has nothing for that server. The helper
//! is found on `PATH`; its output is bounded and it is killed after [`HELPER_TIMEOUT`].

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

/// How long a helper may take.
pub const HELPER_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest helper answer read.
const MAX_OUTPUT: u64 = 64 << 10;
/// What helpers print when they hold nothing for a server.
const NOT_FOUND: &str = "credentials not found in native keychain";

/// Credentials a helper returned.
pub struct HelperCreds {
    /// The user name.
    pub username: String,
    /// The password or token.
    pub secret: Zeroizing<String>,
}

impl std::fmt::Debug for HelperCreds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HelperCreds")
            .field("username", &self.username)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Why a helper gave no credentials.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HelperError {
    /// The helper name is not a plain name.
    #[error("credential helper name {name:?} is not a plain name (letters, digits, '-', '_', '.')")]
    BadName {
        /// The name as configured.
        name: String,
    },
    /// `docker-credential-NAME` is not on PATH (or cannot be run).
    #[error("credential helper {program} cannot be run: {source}")]
    Missing {
        /// `docker-credential-NAME`.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// The helper failed.
    #[error("credential helper {program} failed ({status}): {message}")]
    Failed {
        /// `docker-credential-NAME`.
        program: String,
        /// Exit status.
        status: String,
        /// What it said (sanitized, shortened).
        message: String,
    },
    /// The helper did not finish in time.
    #[error("credential helper {program} did not answer within {} s", HELPER_TIMEOUT.as_secs())]
    Timeout {
        /// `docker-credential-NAME`.
        program: String,
    },
    /// The helper's answer is not the protocol's JSON.
    #[error(
        "credential helper {program} answered something other than {{\"Username\":…,\"Secret\":…}}: {detail}"
    )]
    BadOutput {
        /// `docker-credential-NAME`.
        program: String,
        /// What is wrong.
        detail: String,
    },
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && !n.starts_with('.')
        && n.len() <= 100
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The server string a helper is asked about for `host` (`docker.io` is Docker Hub's
/// `https://index.docker.io/v1/`, as the Docker CLI stores it).
pub fn server_for(host: &str) -> String {
    if host == "docker.io" {
        "https://index.docker.io/v1/".to_owned()
    } else {
        host.to_owned()
    }
}

fn read_bounded(mut r: impl Read) -> Vec<u8> {
    let mut v = Vec::new();
    let _ = r.by_ref().take(MAX_OUTPUT + 1).read_to_end(&mut v);
    // Keep draining so the helper never blocks on a full pipe; discard the rest.
    let _ = std::io::copy(&mut r, &mut std::io::sink());
    v
}

/// Runs `docker-credential-NAME get` for `server`. `Ok(None)`: the helper has nothing for it.
///
/// # Errors
/// [`HelperError`], naming the helper.
pub fn get(name: &str, server: &str) -> Result<Option<HelperCreds>, HelperError> {
    if !valid_name(name) {
        return Err(HelperError::BadName {
            name: name.to_owned(),
        });
    }
    let program = format!("docker-credential-{name}");
    let mut child = Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| HelperError::Missing {
            program: program.clone(),
            source: e,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        // A helper that does not read its input gets EPIPE here: not our failure.
        let _ = stdin.write_all(server.as_bytes());
    }
    let out = child.stdout.take().expect("piped stdout");
    let err = child.stderr.take().expect("piped stderr");
    let t_out = std::thread::spawn(move || Zeroizing::new(read_bounded(out)));
    let t_err = std::thread::spawn(move || read_bounded(err));
    let deadline = Instant::now() + HELPER_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(HelperError::Timeout { program });
            }
        }
    };
    let stdout = t_out.join().unwrap_or_default();
    let stderr = t_err.join().unwrap_or_default();
    let said = |bytes: &[u8]| {
        let text = String::from_utf8_lossy(bytes);
        let text = ocicrypt_core::redact::server_text(text.trim(), &[]);
        text.chars().take(300).collect::<String>()
    };
    if !status.success() {
        let out_text = String::from_utf8_lossy(&stdout);
        if out_text.trim() == NOT_FOUND || String::from_utf8_lossy(&stderr).trim() == NOT_FOUND {
            return Ok(None);
        }
        let message = match (said(&stderr), said(&stdout)) {
            (e, _) if !e.is_empty() => e,
            (_, o) if !o.is_empty() => o,
            _ => "no message".to_owned(),
        };
        return Err(HelperError::Failed {
            program,
            status: status.to_string(),
            message,
        });
    }
    if stdout.len() as u64 > MAX_OUTPUT {
        return Err(HelperError::BadOutput {
            program,
            detail: format!("more than {MAX_OUTPUT} bytes"),
        });
    }
    #[derive(serde::Deserialize)]
    struct Answer {
        #[serde(rename = "Username", default)]
        username: String,
        #[serde(rename = "Secret", default)]
        secret: String,
    }
    let mut a: Answer = serde_json::from_slice(&stdout).map_err(|e| HelperError::BadOutput {
        program: program.clone(),
        detail: format!("not JSON ({})", e.classify_name()),
    })?;
    if a.username == "<token>" {
        zeroize::Zeroize::zeroize(&mut a.secret);
        return Err(HelperError::BadOutput {
            program,
            detail: "an identity token (Username \"<token>\"), which imgcrypt cannot use yet: store a user name and password or access token".into(),
        });
    }
    let secret = Zeroizing::new(std::mem::take(&mut a.secret));
    if secret.is_empty() {
        return Ok(None);
    }
    Ok(Some(HelperCreds {
        username: a.username,
        secret,
    }))
}

trait ClassifyName {
    fn classify_name(&self) -> &'static str;
}

impl ClassifyName for serde_json::Error {
    fn classify_name(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "read error",
            serde_json::error::Category::Syntax => "syntax error",
            serde_json::error::Category::Data => "wrong fields",
            serde_json::error::Category::Eof => "truncated",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_servers() {
        assert!(valid_name("ecr-login") && valid_name("pass") && valid_name("gcloud"));
        for bad in ["", "../x", "a/b", ".hidden", "a b"] {
            assert!(matches!(get(bad, "h"), Err(HelperError::BadName { .. })), "{bad}");
        }
        assert_eq!(server_for("docker.io"), "https://index.docker.io/v1/");
        assert_eq!(server_for("127.0.0.1:5000"), "127.0.0.1:5000");
        let e = get("imgcrypt-test-no-such-helper", "h").unwrap_err();
        assert!(matches!(e, HelperError::Missing { .. }));
        assert!(
            e.to_string()
                .contains("docker-credential-imgcrypt-test-no-such-helper"),
            "{e}"
        );
    }
}

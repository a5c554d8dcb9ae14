//! The command line's errors: one kind per thing a user can act on, each with its own exit code.

use std::fmt;
use std::process::ExitCode;

use ocicrypt_core::keys::KeyError;
use ocicrypt_core::recipients::RemoveError;
use ocicrypt_core::Error as CoreError;

use imgcrypt_registry::Error as RegistryError;

/// What went wrong, as far as a script cares: each kind has its own exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// Anything not listed below.
    Failure,
    /// Bad command-line usage.
    Usage,
    /// No key was given for the scheme(s) a layer is encrypted with.
    MissingKey,
    /// Keys were given, none of them unwraps a layer key.
    WrongKey,
    /// Layer data failed verification (MAC or digest mismatch).
    TamperedLayer,
    /// A recipient or key of a scheme this build does not know.
    UnknownScheme,
    /// An image reference that does not parse or names nothing.
    BadReference,
    /// The registry refused the credentials (or asked for some and none were given).
    RegistryAuth,
    /// The registry could not be reached or failed.
    Network,
    /// A key file that cannot be read or used.
    KeyFile,
    /// `check --platform`: every selected encrypted layer opens, but the image has encrypted
    /// layers the selection left out, which were not checked.
    PartialCheck,
    /// Interrupted by SIGINT (what was written was removed).
    Interrupted,
    /// Terminated by SIGTERM (what was written was removed).
    Terminated,
}

impl ErrorKind {
    /// Every kind, in exit-code order (for `--help` and docs).
    pub const ALL: [ErrorKind; 13] = [
        ErrorKind::Failure,
        ErrorKind::Usage,
        ErrorKind::MissingKey,
        ErrorKind::WrongKey,
        ErrorKind::TamperedLayer,
        ErrorKind::UnknownScheme,
        ErrorKind::BadReference,
        ErrorKind::RegistryAuth,
        ErrorKind::Network,
        ErrorKind::KeyFile,
        ErrorKind::PartialCheck,
        ErrorKind::Interrupted,
        ErrorKind::Terminated,
    ];

    /// The process exit code.
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorKind::Failure => 1,
            ErrorKind::Usage => 2,
            ErrorKind::MissingKey => 3,
            ErrorKind::WrongKey => 4,
            ErrorKind::TamperedLayer => 5,
            ErrorKind::UnknownScheme => 6,
            ErrorKind::BadReference => 7,
            ErrorKind::RegistryAuth => 8,
            ErrorKind::Network => 9,
            ErrorKind::KeyFile => 10,
            ErrorKind::PartialCheck => 11,
            ErrorKind::Interrupted => 130,
            ErrorKind::Terminated => 143,
        }
    }

    /// One line for the EXIT CODES section of `--help`.
    pub fn describe(self) -> &'static str {
        match self {
            ErrorKind::Failure => "other failure",
            ErrorKind::Usage => "bad usage (unknown flag, missing argument, invalid value)",
            ErrorKind::MissingKey => "missing key: no key given for the scheme a layer is encrypted with",
            ErrorKind::WrongKey => "wrong key: none of the given keys can decrypt a layer",
            ErrorKind::TamperedLayer => "tampered layer: layer data failed verification (MAC or digest)",
            ErrorKind::UnknownScheme => {
                if cfg!(feature = "pkcs11") {
                    "unknown scheme in a --recipient or --key (jwe:, pkcs7:, pgp:, pkcs11:, provider: are known)"
                } else {
                    "unknown scheme in a --recipient or --key (jwe:, pkcs7:, pgp:, provider: are known)"
                }
            }
            ErrorKind::BadReference => "bad image reference, or the image does not exist",
            ErrorKind::RegistryAuth => "registry authentication failed",
            ErrorKind::Network => "network failure: the registry could not be reached or failed",
            ErrorKind::KeyFile => {
                "a key file cannot be read or used (missing, wrong password or PIN, not a key, PKCS#11 token or module unusable)"
            }
            ErrorKind::PartialCheck => {
                "check: the selected layers open, but encrypted layers of other platforms were not checked"
            }
            ErrorKind::Interrupted => "interrupted by SIGINT (Ctrl-C); what the run wrote was removed",
            ErrorKind::Terminated => "terminated by SIGTERM; what the run wrote was removed",
        }
    }
}

/// The EXIT CODES section shown in `--help`.
pub fn exit_codes_help() -> String {
    let mut s = String::from("EXIT CODES:\n  0   success\n");
    for k in ErrorKind::ALL {
        s.push_str(&format!("  {:<3} {}\n", k.exit_code(), k.describe()));
    }
    s
}

/// An error as the user sees it: what happened, and what to do.
#[derive(Debug)]
pub struct CliError {
    /// The kind, which decides the exit code.
    pub kind: ErrorKind,
    /// What happened (names the image, layer, key file).
    pub message: String,
    /// What to do about it.
    pub hint: Option<String>,
    /// Extra machine-readable details for `--json`.
    pub details: Option<Box<serde_json::Value>>,
}

impl CliError {
    /// A new error.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            hint: None,
            details: None,
        }
    }

    /// Adds what to do.
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// A usage error.
    pub fn usage(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Usage, message)
    }

    /// The process exit code.
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(self.kind.exit_code())
    }

    /// JSON for `--json`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "error": {
                "kind": self.kind,
                "exit_code": self.kind.exit_code(),
                "message": self.message,
                "hint": self.hint,
            }
        });
        if let (Some(serde_json::Value::Object(d)), Some(obj)) = (self.details.as_deref(), v.as_object_mut())
        {
            for (k, val) in d {
                obj.insert(k.clone(), val.clone());
            }
        }
        v
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "error: {}", self.message)?;
        if let Some(h) = &self.hint {
            write!(f, "\nhint: {h}")?;
        }
        Ok(())
    }
}

impl std::error::Error for CliError {}

impl From<KeyError> for CliError {
    fn from(e: KeyError) -> Self {
        key_error(&e)
    }
}

/// What the user sees for a key that cannot be read or used.
pub fn key_error(e: &KeyError) -> CliError {
    let hint = match e {
        KeyError::NeedsPassword { .. } => {
            "pass the password as --key FILE:PASSWORD, FILE:pass=PASSWORD or FILE:file=PASSWORD_FILE"
        }
        KeyError::WrongPassword { .. } => {
            "check the password given after FILE: (FILE:PASSWORD, FILE:pass=…, FILE:file=…)"
        }
        KeyError::Io { .. } => "check the path of the key file",
        _ => "private keys go to --key (PEM, DER or JWK), public keys to --recipient jwe:FILE",
    };
    CliError::new(ErrorKind::KeyFile, e.to_string()).hint(hint)
}

/// What to do about a wrong key.
pub const WRONG_KEY_HINT: &str = "pass the private key of one of the image's recipients: `imgcrypt inspect IMAGE` lists the key ids each layer is encrypted for, `imgcrypt key-id FILE` prints a key file's id";

/// Context for classifying a core error: the keys that were tried, for the message.
#[derive(Debug, Default, Clone)]
pub struct KeyContext {
    /// Key files (and key directories) given.
    pub key_sources: Vec<String>,
}

/// What the user sees for an error of the registry client (or of resolving how to reach a
/// registry: references, credentials, certificate directories). Every registry error's kind
/// and hint is decided here.
pub fn from_registry(e: &RegistryError) -> CliError {
    let msg = e.to_string();
    match e {
        RegistryError::Auth { .. } => CliError::new(ErrorKind::RegistryAuth, msg).hint(
            "pass --creds USER:PASSWORD (or --src-creds/--dest-creds), or put the credentials in REGISTRY_AUTH_FILE or ~/.docker/config.json",
        ),
        RegistryError::Network { .. } => CliError::new(ErrorKind::Network, msg)
            .hint("check the host and port, that the registry is running, and --tls-verify=false for a plain-HTTP registry"),
        RegistryError::NotFound { .. } => CliError::new(ErrorKind::BadReference, msg)
            .hint("check the repository and tag (skopeo list-tags docker://HOST/REPO lists the tags)"),
        RegistryError::Tls { registry, failure } => {
            CliError::new(ErrorKind::Network, msg).hint(failure.hint(registry))
        }
        RegistryError::BadReference { .. } => CliError::new(ErrorKind::BadReference, msg).hint(
            "use oci:PATH[:TAG] for an OCI image layout, docker://HOST[:PORT]/REPO[:TAG|@sha256:DIGEST] for a registry, oci-archive:PATH[:TAG] or docker-archive:PATH[:NAME:TAG] for an archive",
        ),
        RegistryError::BadUrl { .. } => CliError::new(ErrorKind::BadReference, msg),
        RegistryError::BadCreds { .. } => CliError::usage(msg),
        RegistryError::AuthFileUnreadable { .. } => {
            CliError::new(ErrorKind::RegistryAuth, msg).hint("check --authfile / REGISTRY_AUTH_FILE")
        }
        RegistryError::AuthFileSyntax { .. } => CliError::new(ErrorKind::RegistryAuth, msg)
            .hint("fix or remove the file, or pass --creds USER:PASSWORD"),
        RegistryError::AuthEntry { .. } => CliError::new(ErrorKind::RegistryAuth, msg),
        RegistryError::CredHelper {
            helper, field, path, ..
        } => CliError::new(ErrorKind::RegistryAuth, msg).hint(format!(
            "install docker-credential-{helper} on PATH or fix it, remove the {field} entry from {path}, or pass --creds USER:PASSWORD"
        )),
        RegistryError::CertDir { .. } => CliError::new(ErrorKind::Usage, msg).hint(
            "fix the certificate directory (see containers-certs.d(5): *.crt CAs, NAME.cert with NAME.key)",
        ),
        RegistryError::Protocol { .. } | RegistryError::Client(_) => CliError::new(ErrorKind::Failure, msg),
        _ => CliError::new(ErrorKind::Failure, msg),
    }
}

impl From<RegistryError> for CliError {
    fn from(e: RegistryError) -> Self {
        from_registry(&e)
    }
}

fn io_inner_core(e: &std::io::Error) -> Option<&CoreError> {
    e.get_ref().and_then(|i| i.downcast_ref::<CoreError>())
}

/// Finds the innermost error that decides the kind: past layer context and I/O wrapping.
fn innermost(e: &CoreError) -> &CoreError {
    let root = e.root_cause();
    if let CoreError::Io(io) = root {
        if let Some(inner) = io_inner_core(io) {
            return innermost(inner);
        }
    }
    root
}

/// The "layer N (digest) of IMAGE" prefix, if the error carries it.
fn layer_context(e: &CoreError) -> Option<String> {
    match e {
        CoreError::Layer {
            image, index, digest, ..
        } => Some(format!("layer {index} ({digest}) of {image}")),
        _ => None,
    }
}

/// Turns a core error into what the user sees.
pub fn from_core(e: &CoreError, keys: &KeyContext) -> CliError {
    let ctx = layer_context(e);
    let what = ctx.clone().unwrap_or_else(|| "the image".to_owned());
    let keys_list = if keys.key_sources.is_empty() {
        "no keys".to_owned()
    } else {
        keys.key_sources.join(", ")
    };
    let root = innermost(e);
    match root {
        CoreError::AuthenticationFailed => CliError::new(
            ErrorKind::TamperedLayer,
            format!("{what} failed verification: its data does not match the MAC recorded when it was encrypted (the layer was tampered with or corrupted)"),
        )
        .hint("do not use this image; fetch it again from a trusted source"),
        CoreError::DigestMismatch { what: blob, expected, actual } => CliError::new(
            ErrorKind::TamperedLayer,
            format!("{what}: digest mismatch for {blob}: expected {expected}, got {actual} (the data was tampered with or corrupted)"),
        )
        .hint("do not use this image; fetch it again from a trusted source"),
        CoreError::NoKeyForScheme { schemes } => CliError::new(
            ErrorKind::MissingKey,
            format!(
                "missing key: {what} is encrypted for {} and no key for that scheme was given (given: {keys_list})",
                schemes.join(", ")
            ),
        )
        .hint(format!(
            "pass the private key with --key FILE (or --key-dir DIR){}",
            if schemes.iter().any(|s| s.starts_with("provider")) {
                "; provider.* layers need --key provider:NAME and OCICRYPT_KEYPROVIDER_CONFIG"
            } else {
                ""
            }
        )),
        CoreError::Unwrap { attempts } if attempts.iter().any(|a| a.key_unusable) => {
            let mut seen = Vec::new();
            for a in attempts.iter().filter(|a| a.key_unusable) {
                if !seen.contains(&a.error) {
                    seen.push(a.error.clone());
                }
            }
            CliError::new(
                ErrorKind::KeyFile,
                format!("{what} cannot be decrypted: {}", seen.join("; ")),
            )
            .hint("fix the key: the PIN (pin-value or pin-source in the URI, or --key FILE:PIN), the token (token= or slot-id=, and the module's env such as SOFTHSM2_CONF), and the module policy in ocicrypt.conf (OCICRYPT_CONFIG)")
        }
        CoreError::Unwrap { attempts } => CliError::new(
            ErrorKind::WrongKey,
            format!(
                "wrong key: none of the given keys ({keys_list}) can decrypt {what} ({} attempt(s): {})",
                attempts.len(),
                attempts.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
            ),
        )
        .hint(WRONG_KEY_HINT),
        CoreError::Key(k) => {
            let mut c = key_error(k);
            if let Some(ctx) = &ctx {
                c.message = format!("{ctx}: {}", c.message);
            }
            c
        }
        CoreError::Io(_) => match RegistryError::find(root) {
            Some(r) => {
                let mut c = from_registry(r);
                if let Some(ctx) = &ctx {
                    c.message = format!("{ctx}: {}", c.message);
                }
                c
            }
            None => CliError::new(ErrorKind::Failure, ocicrypt_core::keywrap::error_chain(e)),
        },
        CoreError::NoRecipients => CliError::usage(root.to_string()),
        CoreError::Selection(m) => CliError::usage(m.clone()),
        CoreError::RecipientNotFound { .. } => CliError::usage(root.to_string())
            .hint("`imgcrypt key-id FILE` prints a key file's id; nothing was changed"),
        CoreError::Recipients(r) => {
            let msg = match &ctx {
                Some(c) => format!("{c}: {r}"),
                None => r.to_string(),
            };
            match r {
                RemoveError::WithoutIds { .. } => CliError::new(ErrorKind::Failure, msg).hint(
                    "re-key instead: `imgcrypt recipients set --key KEY --recipient jwe:PUB …` listing everyone who keeps access (after that, entries carry key ids and `remove` works); nothing was changed",
                ),
                RemoveError::LastRecipient { .. } => CliError::usage(msg).hint(
                    "to hand the image to someone else, use `imgcrypt recipients set`; nothing was changed",
                ),
                RemoveError::Malformed(_) => CliError::new(ErrorKind::Failure, msg),
            }
        }
        CoreError::AlreadyEncrypted { .. } => CliError::new(
            ErrorKind::Failure,
            ocicrypt_core::keywrap::error_chain(e),
        )
        .hint("to give more people access to an encrypted image, use `imgcrypt recipients add --key KEY --recipient …`; to encrypt only the plain layers, select them with --layer"),
        _ => CliError::new(ErrorKind::Failure, ocicrypt_core::keywrap::error_chain(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_distinct() {
        let mut codes: Vec<u8> = ErrorKind::ALL.iter().map(|k| k.exit_code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), ErrorKind::ALL.len());
        assert!(!codes.contains(&0));
    }

    #[test]
    fn classifies_core_errors() {
        let keys = KeyContext {
            key_sources: vec!["a.pem".into()],
        };
        let layered = CoreError::Layer {
            image: "oci:x:v1".into(),
            index: 2,
            digest: "sha256:ab".into(),
            source: Box::new(CoreError::AuthenticationFailed),
        };
        let c = from_core(&layered, &keys);
        assert_eq!(c.kind, ErrorKind::TamperedLayer);
        assert!(
            c.message.contains("layer 2 (sha256:ab) of oci:x:v1"),
            "{}",
            c.message
        );
        let c = from_core(
            &CoreError::NoKeyForScheme {
                schemes: vec!["jwe".into()],
            },
            &keys,
        );
        assert_eq!(c.kind, ErrorKind::MissingKey);
        let c = from_core(&CoreError::Unwrap { attempts: vec![] }, &keys);
        assert_eq!(c.kind, ErrorKind::WrongKey);
        assert!(c.message.contains("a.pem"));
        let wrapped = CoreError::Io(std::io::Error::other(CoreError::AuthenticationFailed));
        assert_eq!(from_core(&wrapped, &keys).kind, ErrorKind::TamperedLayer);
    }
}

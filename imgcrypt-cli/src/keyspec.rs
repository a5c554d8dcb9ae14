//! Recipient (`--recipient`) and key (`--key`) arguments, as skopeo and ctr-enc write them.

use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::error::{CliError, ErrorKind};

/// A parsed `--recipient`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecipientSpec {
    /// `jwe:FILE`: a public key file.
    Jwe(PathBuf),
    /// `pkcs7:FILE`: an X.509 certificate (RSA), PEM or DER.
    Pkcs7(PathBuf),
    /// `pgp:NAME-OR-EMAIL` (looked up with gpg) or `pgp:FILE` (an OpenPGP public key file).
    Pgp(String),
    /// `pkcs11:FILE`: a PKCS#11 key file (YAML naming a public key on a token) or an RSA
    /// public key file.
    Pkcs11(PathBuf),
    /// `provider:NAME[:PARAM]`: an ocicrypt key provider.
    Provider {
        /// The provider name.
        name: String,
        /// What follows the name (may contain ':').
        param: Option<String>,
    },
}

/// A parsed `--key`.
#[derive(Debug)]
pub enum KeySpec {
    /// A private key file with an optional password.
    File {
        /// The key file.
        path: PathBuf,
        /// Its password.
        password: Option<Zeroizing<Vec<u8>>>,
    },
    /// `provider:NAME[:PARAM]`.
    Provider {
        /// The provider name.
        name: String,
        /// What follows the name.
        param: Option<String>,
    },
}

impl KeySpec {
    /// How the key is named in messages (never the password).
    pub fn describe(&self) -> String {
        match self {
            KeySpec::File { path, .. } => path.display().to_string(),
            KeySpec::Provider { name, .. } => format!("provider:{name}"),
        }
    }
}

/// Largest password file read.
pub const MAX_PASSWORD_FILE: u64 = 64 << 10;

/// The recipient schemes this build knows.
pub const KNOWN_SCHEMES: &str = if cfg!(feature = "pkcs11") {
    "jwe:, pkcs7:, pgp:, pkcs11:, provider:"
} else {
    "jwe:, pkcs7:, pgp:, provider:"
};

fn unknown_scheme(what: &str, input: &str, scheme: &str) -> CliError {
    let extra = match scheme {
        "pkcs11" => format!(
            " ({scheme}: is an ocicrypt scheme this build was compiled without: build imgcrypt with the pkcs11 feature)"
        ),
        _ => String::new(),
    };
    CliError::new(
        ErrorKind::UnknownScheme,
        format!("{what} {input:?}: unknown scheme {scheme:?}{extra}; known schemes: {KNOWN_SCHEMES}"),
    )
    .hint("write recipients as jwe:PUBLIC_KEY_FILE, pkcs7:CERTIFICATE, pgp:NAME-OR-EMAIL, pgp:PUBLIC_KEY_FILE, pkcs11:KEY.yaml or provider:NAME[:PARAM] (e.g. --recipient jwe:public.pem), and keys as files (private keys, gpg secret keyrings, PKCS#11 key YAMLs) or provider:NAME")
}

fn parse_provider(rest: &str) -> Result<(String, Option<String>), String> {
    let (name, param) = match rest.split_once(':') {
        Some((n, p)) => (n, Some(p.to_owned())),
        None => (rest, None),
    };
    if name.is_empty() {
        return Err("provider: needs a provider name (provider:NAME[:PARAM])".into());
    }
    Ok((name.to_owned(), param))
}

/// Parses a `--recipient` (`--encryption-key`): `SCHEME:VALUE`, split at the first ':'.
///
/// # Errors
/// [`ErrorKind::Usage`] for a missing scheme or value, [`ErrorKind::UnknownScheme`].
pub fn parse_recipient(input: &str) -> Result<RecipientSpec, CliError> {
    let Some((scheme, value)) = input.split_once(':') else {
        return Err(CliError::usage(format!(
            "recipient {input:?} has no scheme: write jwe:{input} for a public key file"
        )));
    };
    match scheme {
        "jwe" => {
            if value.is_empty() {
                return Err(CliError::usage(
                    "recipient jwe: needs a public key file: jwe:public.pem",
                ));
            }
            Ok(RecipientSpec::Jwe(PathBuf::from(value)))
        }
        "pkcs7" => {
            if value.is_empty() {
                return Err(CliError::usage(
                    "recipient pkcs7: needs an X.509 certificate file: pkcs7:cert.pem",
                ));
            }
            Ok(RecipientSpec::Pkcs7(PathBuf::from(value)))
        }
        "pgp" => {
            if value.is_empty() {
                return Err(CliError::usage(
                    "recipient pgp: needs a name or e-mail from the gpg keyring, or a public key file: pgp:alice@example.com",
                ));
            }
            Ok(RecipientSpec::Pgp(value.to_owned()))
        }
        "pkcs11" if cfg!(feature = "pkcs11") => {
            if value.is_empty() {
                return Err(CliError::usage(
                    "recipient pkcs11: needs a PKCS#11 key file (YAML) or an RSA public key file: pkcs11:key.yaml",
                ));
            }
            Ok(RecipientSpec::Pkcs11(PathBuf::from(value)))
        }
        "provider" => {
            let (name, param) = parse_provider(value).map_err(CliError::usage)?;
            Ok(RecipientSpec::Provider { name, param })
        }
        other => Err(unknown_scheme("recipient", input, other)),
    }
}

fn password_from(spec: &str, path: &Path) -> Result<Zeroizing<Vec<u8>>, CliError> {
    if let Some(pw) = spec.strip_prefix("pass=") {
        return Ok(Zeroizing::new(pw.as_bytes().to_vec()));
    }
    if let Some(file) = spec.strip_prefix("file=") {
        let bytes = Zeroizing::new(
            ocicrypt_core::fsutil::read_regular(Path::new(file), MAX_PASSWORD_FILE).map_err(|e| {
                CliError::new(
                    ErrorKind::KeyFile,
                    format!(
                        "cannot read the password file {file} for key {}: {e}",
                        path.display()
                    ),
                )
            })?,
        );
        // The first line, as ocicrypt reads it.
        let end = bytes.iter().position(|&b| b == b'\n').unwrap_or(bytes.len());
        let mut line = &bytes[..end];
        if line.last() == Some(&b'\r') {
            line = &line[..line.len() - 1];
        }
        return Ok(Zeroizing::new(line.to_vec()));
    }
    if spec.starts_with("fd=") {
        return Err(CliError::usage(format!(
            "key {}: passwords from a file descriptor (fd=) are not supported; use FILE:file=PASSWORD_FILE",
            path.display()
        )));
    }
    Ok(Zeroizing::new(spec.as_bytes().to_vec()))
}

/// Parses a `--key` (`--decryption-key`): `FILE`, `FILE:PASSWORD`, `FILE:pass=PW`,
/// `FILE:file=PWFILE` or `provider:NAME[:PARAM]`.
///
/// A FILE that exists as given is never split (paths may contain ':'); otherwise the longest
/// prefix before a ':' that is an existing file is the key file and the rest the password.
///
/// # Errors
/// [`ErrorKind::KeyFile`] when no such file exists, [`ErrorKind::UnknownScheme`] for
/// `pgp:`/`pkcs7:`/`pkcs11:` forms, [`ErrorKind::Usage`].
pub fn parse_key(input: &str) -> Result<KeySpec, CliError> {
    if input.is_empty() {
        return Err(CliError::usage("--key needs a private key file"));
    }
    if Path::new(input).exists() {
        return Ok(KeySpec::File {
            path: PathBuf::from(input),
            password: None,
        });
    }
    if let Some(rest) = input.strip_prefix("provider:") {
        let (name, param) = parse_provider(rest).map_err(CliError::usage)?;
        return Ok(KeySpec::Provider { name, param });
    }
    // Longest existing prefix wins.
    for (i, _) in input.rmatch_indices(':') {
        let path = Path::new(&input[..i]);
        if i > 0 && path.is_file() {
            let password = password_from(&input[i + 1..], path)?;
            return Ok(KeySpec::File {
                path: path.to_owned(),
                password: Some(password),
            });
        }
    }
    if let Some((scheme, _)) = input.split_once(':') {
        if matches!(scheme, "pgp" | "pkcs7" | "pkcs11" | "jwe") {
            if scheme != "pkcs11" || cfg!(feature = "pkcs11") {
                return Err(CliError::usage(format!(
                    "--key {input:?}: keys are files without a scheme; write --key {}",
                    &input[scheme.len() + 1..]
                )));
            }
            return Err(unknown_scheme("key", input, scheme));
        }
    }
    let file = input.split(':').next().unwrap_or(input);
    Err(CliError::new(
        ErrorKind::KeyFile,
        format!(
            "key file {file} does not exist (from --key {:?})",
            redact(input, file)
        ),
    )
    .hint("check the path; the forms are FILE, FILE:PASSWORD, FILE:pass=PW, FILE:file=PWFILE"))
}

/// The key argument with anything after the file name hidden (it may be a password).
fn redact(input: &str, file: &str) -> String {
    if input.len() > file.len() {
        format!("{file}:***")
    } else {
        input.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipients() {
        assert_eq!(
            parse_recipient("jwe:a.pem").unwrap(),
            RecipientSpec::Jwe("a.pem".into())
        );
        assert_eq!(
            parse_recipient("jwe:c:/x.pem").unwrap(),
            RecipientSpec::Jwe("c:/x.pem".into())
        );
        assert_eq!(
            parse_recipient("provider:keyprotect:abc:def").unwrap(),
            RecipientSpec::Provider {
                name: "keyprotect".into(),
                param: Some("abc:def".into())
            }
        );
        assert_eq!(
            parse_recipient("provider:x").unwrap(),
            RecipientSpec::Provider {
                name: "x".into(),
                param: None
            }
        );
        assert_eq!(
            parse_recipient("pkcs7:c.pem").unwrap(),
            RecipientSpec::Pkcs7("c.pem".into())
        );
        assert_eq!(parse_recipient("pkcs7:").unwrap_err().kind, ErrorKind::Usage);
        assert_eq!(
            parse_recipient("pgp:me@x").unwrap(),
            RecipientSpec::Pgp("me@x".into())
        );
        assert_eq!(
            parse_recipient("pkcs11:k.yaml").unwrap(),
            RecipientSpec::Pkcs11("k.yaml".into())
        );
        assert_eq!(parse_recipient("pkcs11:").unwrap_err().kind, ErrorKind::Usage);
        assert_eq!(
            parse_recipient("foo:bar").unwrap_err().kind,
            ErrorKind::UnknownScheme
        );
        assert_eq!(parse_recipient("a.pem").unwrap_err().kind, ErrorKind::Usage);
        assert_eq!(parse_recipient("jwe:").unwrap_err().kind, ErrorKind::Usage);
    }

    #[test]
    fn keys() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("k.pem");
        std::fs::write(&k, "x").unwrap();
        let colon = dir.path().join("odd:name.pem");
        std::fs::write(&colon, "x").unwrap();
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, "s3cret\nignored").unwrap();
        let ks = k.display().to_string();

        let pw = |s: &str| match parse_key(s).unwrap() {
            KeySpec::File { path, password } => {
                (path, password.map(|p| String::from_utf8(p.to_vec()).unwrap()))
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(pw(&ks), (k.clone(), None));
        assert_eq!(pw(&format!("{ks}:1234")), (k.clone(), Some("1234".into())));
        assert_eq!(pw(&format!("{ks}:a:b")), (k.clone(), Some("a:b".into())));
        assert_eq!(pw(&format!("{ks}:pass=x")), (k.clone(), Some("x".into())));
        assert_eq!(
            pw(&format!("{ks}:file={}", pwfile.display())),
            (k.clone(), Some("s3cret".into()))
        );
        assert_eq!(pw(&colon.display().to_string()), (colon.clone(), None));
        assert_eq!(pw(&format!("{}:pw", colon.display())), (colon, Some("pw".into())));

        let missing = format!("{}/nope.pem:secret", dir.path().display());
        let e = parse_key(&missing).unwrap_err();
        assert_eq!(e.kind, ErrorKind::KeyFile);
        assert!(!e.message.contains("secret"), "{}", e.message);
        assert!(e.message.contains("nope.pem"));
        assert_eq!(parse_key("pgp:me").unwrap_err().kind, ErrorKind::Usage);
        assert_eq!(parse_key("pkcs11:k.yaml").unwrap_err().kind, ErrorKind::Usage);
        assert!(matches!(
            parse_key("provider:kp").unwrap(),
            KeySpec::Provider { .. }
        ));
        assert_eq!(
            parse_key(&format!("{ks}:fd=3")).unwrap_err().kind,
            ErrorKind::Usage
        );
    }
}

//! Turns recipient and key specs into the core's key wrappers and unwrappers (JWE, PKCS#7,
//! key providers). No cryptography here: the schemes live in `ocicrypt-core`.

use std::collections::BTreeMap;
use std::sync::Arc;

use ocicrypt_core::jwe::{JweUnwrapper, JweWrapper};
use ocicrypt_core::keyprovider::{KeyProviderConfig, ProviderError};
use ocicrypt_core::keys::{read_key_dir_lenient, KeyError, PrivateKey, PublicKey};
use ocicrypt_core::pgp::{PgpPublicKey, PgpSecretKey, PgpUnwrapper, PgpWrapper};
use ocicrypt_core::pkcs7::{Certificate, Pkcs7Unwrapper, Pkcs7Wrapper};
use ocicrypt_core::{AsyncKeyUnwrapper, AsyncKeyWrapper};

use crate::config::Keys;
use crate::error::{CliError, ErrorKind, KeyContext};
use crate::keyspec::{KeySpec, RecipientSpec};

fn provider_error(e: ProviderError) -> CliError {
    let kind = match e {
        ProviderError::UnknownProvider { .. } | ProviderError::Unsupported { .. } => ErrorKind::UnknownScheme,
        _ => ErrorKind::Failure,
    };
    CliError::new(kind, e.to_string())
        .hint("configure the provider in the JSON file named by OCICRYPT_KEYPROVIDER_CONFIG ({\"key-providers\": {\"NAME\": {\"cmd\": {\"path\": …}}}})")
}

/// The built-in Key Protect provider name (`provider:keyprotect:<root-key-id>`).
pub const KEYPROTECT: &str = "keyprotect";

fn kp_error(e: &keyprotect_client::Error) -> CliError {
    CliError::new(ErrorKind::Failure, format!("Key Protect: {e}"))
}

/// A Key Protect client from `IMGCRYPT_KEYPROTECT_CONFIG` or `KP_URL`/`KP_INSTANCE_ID`/`KP_APIKEY`.
///
/// # Errors
/// [`ErrorKind::Usage`] when Key Protect is not configured, or the configuration error.
pub fn keyprotect_client() -> Result<keyprotect_client::Client, CliError> {
    let cfg = keyprotect_client::KeyProtectConfig::from_env()
        .map_err(|e| kp_error(&e))?
        .ok_or_else(|| {
            CliError::usage("Key Protect is not configured")
                .hint("set IMGCRYPT_KEYPROTECT_CONFIG to the add-on's config.json, or KP_URL, KP_INSTANCE_ID and KP_APIKEY")
        })?;
    keyprotect_client::Client::new(cfg).map_err(|e| kp_error(&e))
}

/// Whether `provider:<name>` is served by an `OCICRYPT_KEYPROVIDER_CONFIG` entry (which wins over
/// the built-in Key Protect provider, as in skopeo).
fn configured_provider(name: &str) -> bool {
    matches!(KeyProviderConfig::from_env(), Ok(Some(c)) if c.provider(name).is_ok())
}

fn provider_config(spec: &str) -> Result<KeyProviderConfig, CliError> {
    match KeyProviderConfig::from_env() {
        Ok(Some(c)) => Ok(c),
        Ok(None) => Err(CliError::new(
            ErrorKind::UnknownScheme,
            format!("{spec}: OCICRYPT_KEYPROVIDER_CONFIG is not set, so no key provider is known"),
        )
        .hint("point OCICRYPT_KEYPROVIDER_CONFIG at a key-provider config file ({\"key-providers\": {\"NAME\": {\"cmd\": {\"path\": …}}}})")),
        Err(e) => Err(provider_error(e)),
    }
}

/// The wrappers for a set of recipients: every `jwe:` public key goes into one JWE and every
/// `pkcs7:` certificate into one PKCS#7 blob (as skopeo does), every provider gets its own
/// wrapper.
///
/// # Errors
/// [`ErrorKind::KeyFile`] for an unreadable or unusable public key, provider errors.
pub fn wrappers(recipients: &[RecipientSpec]) -> Result<Vec<Arc<dyn AsyncKeyWrapper>>, CliError> {
    let mut jwe_keys = Vec::new();
    let mut certs = Vec::new();
    let mut pgp_keys = Vec::new();
    let mut pgp_names: Vec<&str> = Vec::new();
    let mut out: Vec<Arc<dyn AsyncKeyWrapper>> = Vec::new();
    for r in recipients {
        match r {
            // An existing file is a key file (our extra); anything else a gpg name or e-mail.
            RecipientSpec::Pgp(v) if std::path::Path::new(v).is_file() => {
                let keys = PgpPublicKey::from_file(std::path::Path::new(v)).map_err(|e| {
                    let mut c = CliError::from(e);
                    c.message = format!("recipient pgp:{v}: {}", c.message);
                    c
                })?;
                pgp_keys.extend(keys);
            }
            RecipientSpec::Pgp(v) => pgp_names.push(v),
            RecipientSpec::Pkcs7(path) => {
                let c = Certificate::from_file(path).map_err(|e| {
                    let mut c = CliError::from(e);
                    c.message = format!("recipient pkcs7:{}: {}", path.display(), c.message);
                    c
                })?;
                certs.push(c);
            }
            RecipientSpec::Jwe(path) => {
                let k = PublicKey::from_file(path).map_err(|e| {
                    let mut c = CliError::from(e);
                    c.message = format!("recipient jwe:{}: {}", path.display(), c.message);
                    c
                })?;
                jwe_keys.push(k);
            }
            RecipientSpec::Provider { name, param } if name == KEYPROTECT && !configured_provider(name) => {
                let Some(root_key) = param.as_deref().filter(|p| !p.is_empty()) else {
                    return Err(CliError::usage(
                        "provider:keyprotect needs the root key: --recipient provider:keyprotect:ROOT_KEY_ID",
                    ));
                };
                let w = keyprotect_client::KeyProtectWrapper::new(keyprotect_client()?, root_key);
                out.push(Arc::new(w));
            }
            RecipientSpec::Provider { name, param } => {
                let spec = format!("provider:{name}");
                let cfg = provider_config(&spec)?;
                let p = param.clone().unwrap_or_else(|| "Enabled".to_owned()).into_bytes();
                let w = cfg.wrapper(name, vec![p]).map_err(provider_error)?;
                out.push(Arc::new(w));
            }
        }
    }
    if !jwe_keys.is_empty() {
        let w = JweWrapper::new(jwe_keys).map_err(|e| {
            CliError::new(
                ErrorKind::KeyFile,
                format!("cannot encrypt for these recipients: {e}"),
            )
        })?;
        out.insert(0, Arc::new(w));
    }
    if !pgp_names.is_empty() {
        let lookup = |e: ocicrypt_core::pgp::LookupError| {
            CliError::new(ErrorKind::KeyFile, format!("recipient pgp: {e}"))
        };
        let ring = ocicrypt_core::pgp::gpg_export().map_err(lookup)?;
        pgp_keys.extend(ocicrypt_core::pgp::select_recipients(&ring, &pgp_names).map_err(lookup)?);
    }
    if !pgp_keys.is_empty() {
        let w = PgpWrapper::new(pgp_keys).map_err(|e| {
            CliError::new(
                ErrorKind::KeyFile,
                format!("cannot encrypt for these recipients: {e}"),
            )
        })?;
        out.push(Arc::new(w));
    }
    if !certs.is_empty() {
        let w = Pkcs7Wrapper::new(certs).map_err(|e| {
            CliError::new(
                ErrorKind::KeyFile,
                format!("cannot encrypt for these recipients: {e}"),
            )
        })?;
        out.push(Arc::new(w));
    }
    Ok(out)
}

/// The unwrappers for `--key` and `--key-dir`, and the names of the keys for messages.
///
/// # Errors
/// [`ErrorKind::KeyFile`] for unreadable or unusable keys, provider errors.
pub fn unwrappers(keys: Keys) -> Result<(Vec<Arc<dyn AsyncKeyUnwrapper>>, KeyContext), CliError> {
    let mut private: Vec<PrivateKey> = Vec::new();
    let mut certs: Vec<Certificate> = Vec::new();
    let mut pgp_keys: Vec<PgpSecretKey> = Vec::new();
    let mut ctx = KeyContext::default();
    let mut out: Vec<Arc<dyn AsyncKeyUnwrapper>> = Vec::new();
    for k in keys.keys {
        ctx.key_sources.push(k.describe());
        match k {
            KeySpec::File { path, password } => {
                match PrivateKey::from_file(&path, password.as_deref().map(|p| &p[..])) {
                    Ok(key) => private.push(key),
                    // skopeo users pass the certificate too for pkcs7 (Go needs it; we do
                    // not, but take it to try the matching RecipientInfo first).
                    Err(e @ KeyError::Unsupported { .. }) => {
                        if let Some(keys) = pgp_secret_keys(&path, password.as_deref().map(|p| &p[..]))? {
                            pgp_keys.extend(keys);
                            continue;
                        }
                        match Certificate::from_file(&path) {
                            Ok(c) => certs.push(c),
                            Err(_) => return Err(e.into()),
                        }
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            KeySpec::Provider { name, .. } if name == KEYPROTECT && !configured_provider(&name) => {
                out.push(Arc::new(keyprotect_client::KeyProtectUnwrapper::new(
                    keyprotect_client()?,
                )));
            }
            KeySpec::Provider { name, param } => {
                let cfg = provider_config(&format!("provider:{name}"))?;
                let mut u = cfg.unwrapper(&name).map_err(provider_error)?;
                if let Some(p) = param {
                    u = u.with_parameters(BTreeMap::from([(name.clone(), vec![p.into_bytes()])]));
                }
                out.push(Arc::new(u));
            }
        }
    }
    for dir in keys.dirs {
        let d = read_key_dir_lenient(&dir).map_err(|e| {
            let mut c = CliError::from(e);
            c.message = format!("--key-dir {}: {}", dir.display(), c.message);
            c
        })?;
        for skipped in d.ignored.iter().chain(d.skipped.iter()) {
            // gpg secret keyrings (binary, as runtimes read them, or armored) are keys too.
            if let Ok(Some(keys)) = pgp_secret_keys(&skipped.path, None) {
                ctx.key_sources.push(skipped.path.display().to_string());
                pgp_keys.extend(keys);
                continue;
            }
            eprintln!(
                "note: --key-dir {}: skipped {}: {}",
                dir.display(),
                skipped.path.display(),
                skipped.reason
            );
        }
        if d.keys.is_empty() {
            ctx.key_sources
                .push(format!("{} (no usable private key in it)", dir.display()));
        }
        for e in d.keys {
            ctx.key_sources.push(e.path.display().to_string());
            private.push(e.key);
        }
    }
    if !pgp_keys.is_empty() {
        out.insert(0, Arc::new(PgpUnwrapper::new(pgp_keys)));
    }
    if !private.is_empty() {
        let p7 =
            Pkcs7Unwrapper::new(private.iter().map(PrivateKey::share).collect()).with_certificates(certs);
        if p7.has_usable_keys() {
            out.insert(0, Arc::new(p7));
        }
        out.insert(0, Arc::new(JweUnwrapper::new(private)));
    }
    Ok((out, ctx))
}

/// The OpenPGP secret keys in `path`, if it is an OpenPGP key file (`None` if it is not one).
fn pgp_secret_keys(
    path: &std::path::Path,
    password: Option<&[u8]>,
) -> Result<Option<Vec<PgpSecretKey>>, CliError> {
    let Ok(head) = std::fs::File::open(path).and_then(|f| {
        use std::io::Read;
        let mut b = Vec::new();
        f.take(8192).read_to_end(&mut b).map(|_| b)
    }) else {
        return Ok(None);
    };
    if !ocicrypt_core::pgp::looks_like_openpgp(&head) {
        return Ok(None);
    }
    match PgpSecretKey::from_file(path, password) {
        Ok(k) => Ok(Some(k)),
        // A public keyring is not a decryption key: say so.
        Err(e) => Err(CliError::from(e)),
    }
}

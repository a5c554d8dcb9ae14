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
        .hint("configure the provider in the JSON file named by OCICRYPT_KEYPROVIDER_CONFIG ({\"key-providers\": {\"NAME\": {\"cmd\": {\"path\": …}}}} or {\"NAME\": {\"grpc\": \"127.0.0.1:PORT\"}})")
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
    #[cfg(feature = "pkcs11")]
    let mut p11 = pkcs11::Recipients::default();
    for r in recipients {
        match r {
            #[cfg(feature = "pkcs11")]
            RecipientSpec::Pkcs11(path) => p11.add(path)?,
            #[cfg(not(feature = "pkcs11"))]
            RecipientSpec::Pkcs11(_) => {
                unreachable!("pkcs11: is refused by parse_recipient without the feature")
            }
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
                out.push(w.into_async());
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
    #[cfg(feature = "pkcs11")]
    if let Some(w) = p11.wrapper()? {
        out.push(w);
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
    #[cfg(feature = "pkcs11")]
    let mut p11_keys = Vec::new();
    for k in keys.keys {
        ctx.key_sources.push(k.describe());
        match k {
            KeySpec::File { path, password } => {
                #[cfg(feature = "pkcs11")]
                if let Some(key) = pkcs11::key_file(&path, password.as_deref().map(|p| &p[..]))? {
                    p11_keys.push(key);
                    continue;
                }
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
                out.push(u.into_async());
            }
        }
    }
    for dir in keys.dirs {
        let d = read_key_dir_lenient(&dir).map_err(|e| {
            let mut c = CliError::from(e);
            c.message = format!("--key-dir {}: {}", dir.display(), c.message);
            c
        })?;
        // gpg secret keyrings (binary, as runtimes read them, or armored) are keys too.
        for ring in &d.gpg_keyrings {
            let name = ring.path.display().to_string();
            match PgpSecretKey::from_bytes_many(&ring.bytes, None, &name) {
                Ok(keys) => {
                    ctx.key_sources.push(name);
                    pgp_keys.extend(keys);
                }
                Err(e) => eprintln!("note: --key-dir {}: skipped {e}", dir.display()),
            }
        }
        for skipped in d.ignored.iter().chain(d.skipped.iter()) {
            // PKCS#11 key YAMLs (keys on a token), as the runtimes take them (regular files
            // only: `ignored`, never a skipped symbolic link).
            #[cfg(feature = "pkcs11")]
            if !d.skipped.contains(skipped) {
                if let Ok(Some(key)) = pkcs11::key_file(&skipped.path, None) {
                    ctx.key_sources.push(skipped.path.display().to_string());
                    p11_keys.push(key);
                    continue;
                }
            }
            eprintln!(
                "note: --key-dir {}: skipped {}: {}",
                dir.display(),
                skipped.path.display(),
                skipped.reason
            );
        }
        if d.keys.is_empty() && d.gpg_keyrings.is_empty() {
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
    #[cfg(feature = "pkcs11")]
    if !p11_keys.is_empty() {
        out.push(pkcs11::unwrapper(p11_keys)?);
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

/// The `pkcs11:` recipients and keys: key files need the module policy of ocicrypt.conf,
/// public key files do not (nothing is loaded for them; Go asks for the config anyway).
#[cfg(feature = "pkcs11")]
mod pkcs11 {
    use std::path::Path;
    use std::sync::Arc;

    use ocicrypt_core::keys::{KeyKind, PublicKey};
    use ocicrypt_core::pkcs11::{
        OaepHash, Pkcs11Config, Pkcs11Error, Pkcs11KeyFile, Pkcs11Recipient, Pkcs11Unwrapper, Pkcs11Wrapper,
    };
    use ocicrypt_core::{AsyncKeyUnwrapper, AsyncKeyWrapper};

    use crate::error::{CliError, ErrorKind};

    /// What to do about a module policy that is missing or broken.
    const CONFIG_HINT: &str = "PKCS#11 modules are loaded only as ocicrypt.conf allows: set OCICRYPT_CONFIG=internal (the distributions' module directories) or point it at a file with pkcs11: module-directories: and allowed-module-paths:";

    fn p11_error(what: &str, e: &Pkcs11Error) -> CliError {
        let c = CliError::new(ErrorKind::KeyFile, format!("{what}: {e}"));
        match e {
            Pkcs11Error::NoConfig { .. }
            | Pkcs11Error::Config { .. }
            | Pkcs11Error::ModuleNotAllowed { .. } => c.hint(CONFIG_HINT),
            Pkcs11Error::Hash { .. } => CliError::usage(format!("{what}: {e}")),
            _ => c,
        }
    }

    /// The module policy for key files.
    pub(super) fn config() -> Result<Pkcs11Config, CliError> {
        Pkcs11Config::from_env()
            .map(|(c, _)| c)
            .map_err(|e| p11_error("PKCS#11 keys", &e))
    }

    /// The recipients of one encryption.
    #[derive(Default)]
    pub(super) struct Recipients {
        list: Vec<Pkcs11Recipient>,
        token_keys: bool,
    }

    impl Recipients {
        pub(super) fn add(&mut self, path: &Path) -> Result<(), CliError> {
            let what = format!("recipient pkcs11:{}", path.display());
            let bytes = ocicrypt_core::fsutil::read_regular(path, ocicrypt_core::keys::MAX_KEY_FILE_SIZE)
                .map_err(|e| CliError::new(ErrorKind::KeyFile, format!("{what}: cannot read it: {e}")))?;
            if Pkcs11KeyFile::is_key_file(&bytes) {
                let k = Pkcs11KeyFile::from_bytes(&bytes, &path.display().to_string())
                    .map_err(|e| p11_error(&what, &e))?;
                self.list.push(Pkcs11Recipient::Token(k));
                self.token_keys = true;
                return Ok(());
            }
            let k = PublicKey::from_bytes(&bytes, &path.display().to_string()).map_err(|e| {
                CliError::new(
                    ErrorKind::KeyFile,
                    format!(
                        "{what}: neither a PKCS#11 key file (YAML with pkcs11: uri:) nor a public key: {e}"
                    ),
                )
            })?;
            if !matches!(k.kind(), KeyKind::Rsa { .. }) {
                return Err(CliError::new(
                    ErrorKind::KeyFile,
                    format!("{what}: pkcs11: encrypts with RSA-OAEP, this is {}", k.describe()),
                ));
            }
            self.list.push(Pkcs11Recipient::PublicKey(k));
            Ok(())
        }

        pub(super) fn wrapper(self) -> Result<Option<Arc<dyn AsyncKeyWrapper>>, CliError> {
            if self.list.is_empty() {
                return Ok(None);
            }
            let hash = OaepHash::from_env().map_err(|e| p11_error("recipient pkcs11:", &e))?;
            let config = if self.token_keys {
                config()?
            } else {
                Pkcs11Config::default()
            };
            let w = Pkcs11Wrapper::new(self.list, hash, config).map_err(|e| {
                CliError::new(
                    ErrorKind::KeyFile,
                    format!("cannot encrypt for these recipients: {e}"),
                )
            })?;
            Ok(Some(Arc::new(w)))
        }
    }

    /// The key file at `path` if it is a PKCS#11 key file (with the PIN of `--key FILE:PIN`).
    pub(super) fn key_file(path: &Path, pin: Option<&[u8]>) -> Result<Option<Pkcs11KeyFile>, CliError> {
        let Ok(bytes) = ocicrypt_core::fsutil::read_regular(path, ocicrypt_core::keys::MAX_KEY_FILE_SIZE)
        else {
            // Left to the other key parsers, which say what is wrong.
            return Ok(None);
        };
        let bytes = zeroize::Zeroizing::new(bytes);
        if !Pkcs11KeyFile::is_key_file(&bytes) {
            return Ok(None);
        }
        let k = Pkcs11KeyFile::from_bytes(&bytes, &path.display().to_string())
            .map_err(|e| p11_error(&format!("key {}", path.display()), &e))?;
        Ok(Some(match pin {
            Some(p) => k.with_pin(p),
            None => k,
        }))
    }

    /// The unwrapper for these key files.
    pub(super) fn unwrapper(keys: Vec<Pkcs11KeyFile>) -> Result<Arc<dyn AsyncKeyUnwrapper>, CliError> {
        Ok(Arc::new(Pkcs11Unwrapper::new(keys, config()?)))
    }
}

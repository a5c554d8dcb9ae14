//! TLS for registries, set up the way containers/image (skopeo, podman, buildah, CRI-O) does it.
//!
//! * **Trusted roots**: the compiled-in web roots, the system store (honouring `SSL_CERT_FILE`
//!   and `SSL_CERT_DIR`, as Go's `x509.SystemCertPool` does), and every `*.crt` in the
//!   registry's certificate directory.
//! * **The certificate directory** of a registry `HOST[:PORT]`: the one given explicitly
//!   (`--cert-dir`), else the first of `$HOME/.config/containers/certs.d/HOST[:PORT]`,
//!   `/etc/containers/certs.d/HOST[:PORT]` and `/etc/docker/certs.d/HOST[:PORT]` that exists
//!   ([`CERTS_D_ROOTS`]); see containers-certs.d(5).
//! * **Client certificates** (mutual TLS): a `NAME.cert` (PEM chain) with its `NAME.key` in
//!   that directory. A `.cert` without its `.key` or a `.key` without its `.cert` is an error, as
//!   in containers/image. With several pairs, the first in name order is offered.
//! * **`skip_verify`** (`--tls-verify=false`): HTTPS without verifying the registry's
//!   certificate (handshake signatures are still checked); the caller falls back to plain HTTP
//!   only if the registry does not speak TLS at all.
//!
//! A handshake that fails is explained by [`classify`]: unknown issuer, expired, wrong name,
//! client certificate required, plain HTTP.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// The per-registry certificate directories consulted, in order, below `$HOME` first (relative
/// entries are taken relative to the home directory), as containers/image does.
pub const CERTS_D_ROOTS: [&str; 3] = [
    ".config/containers/certs.d",
    "/etc/containers/certs.d",
    "/etc/docker/certs.d",
];

/// Largest certificate or key file read.
const MAX_PEM: u64 = 1 << 20;

/// How to set up TLS for one registry.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// Do not verify the registry's certificate (`--tls-verify=false`); plain HTTP is tried
    /// when the registry does not speak TLS.
    pub skip_verify: bool,
    /// A directory used instead of the per-registry lookup (`--cert-dir`).
    pub cert_dir: Option<PathBuf>,
    /// Roots of per-registry directories, instead of `$HOME/.config/containers/certs.d`,
    /// `/etc/containers/certs.d`, `/etc/docker/certs.d` (for embedding and tests).
    pub certs_d_roots: Option<Vec<PathBuf>>,
}

/// What can go wrong setting up TLS (before any connection is made).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A certificate directory or file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A client certificate without its key.
    #[error("missing key {key} for client certificate {cert} in {dir} (CA certificates must use the extension .crt)")]
    MissingKey {
        /// The directory.
        dir: PathBuf,
        /// `NAME.cert`.
        cert: String,
        /// `NAME.key`.
        key: String,
    },
    /// A client key without its certificate.
    #[error("missing client certificate {cert} for key {key} in {dir}")]
    MissingCert {
        /// The directory.
        dir: PathBuf,
        /// `NAME.cert`.
        cert: String,
        /// `NAME.key`.
        key: String,
    },
    /// A file that should hold PEM certificates or a key does not.
    #[error("{path}: {detail}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// rustls refused the configuration (e.g. a key that does not match its certificate).
    #[error("TLS configuration for {host}: {detail}")]
    Config {
        /// `host[:port]`.
        host: String,
        /// rustls's reason.
        detail: String,
    },
}

/// What a certificate directory holds.
#[derive(Debug, Default)]
pub struct CertDir {
    /// The directory (None: none found).
    pub path: Option<PathBuf>,
    /// CA certificates from `*.crt`.
    pub cas: Vec<CertificateDer<'static>>,
    /// Client certificate pairs (`NAME.cert`, `NAME.key`), in name order.
    pub client: Vec<ClientPair>,
}

/// A client certificate chain with its key.
#[derive(Debug)]
pub struct ClientPair {
    /// The `.cert` file.
    pub cert_path: PathBuf,
    /// The chain.
    pub chain: Vec<CertificateDer<'static>>,
    /// The key.
    pub key: PrivateKeyDer<'static>,
}

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
}

/// The per-registry roots to search, in order.
pub fn default_certs_d_roots() -> Vec<PathBuf> {
    CERTS_D_ROOTS
        .iter()
        .filter_map(|r| {
            let p = Path::new(r);
            if p.is_absolute() {
                Some(p.to_owned())
            } else {
                home().map(|h| h.join(p))
            }
        })
        .collect()
}

/// The certificate directory for `host_port` (`HOST[:PORT]` as written in the image
/// reference): `opts.cert_dir`, else the first existing `ROOT/HOST[:PORT]`.
///
/// # Errors
/// [`TlsError::Read`] when a candidate cannot be examined for a reason other than not
/// existing or permissions (containers/image skips those two).
pub fn cert_dir_for(host_port: &str, opts: &TlsOptions) -> Result<Option<PathBuf>, TlsError> {
    if let Some(d) = &opts.cert_dir {
        return Ok(Some(d.clone()));
    }
    if host_port.contains('/') || host_port.starts_with('.') {
        return Ok(None);
    }
    let roots = opts.certs_d_roots.clone().unwrap_or_else(default_certs_d_roots);
    for root in roots {
        let dir = root.join(host_port);
        match std::fs::metadata(&dir) {
            Ok(_) => return Ok(Some(dir)),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
                ) =>
            {
                continue
            }
            Err(e) => return Err(TlsError::Read { path: dir, source: e }),
        }
    }
    Ok(None)
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, TlsError> {
    use std::io::Read as _;
    let read = |path: &Path| -> std::io::Result<Vec<u8>> {
        let mut buf = Vec::new();
        std::fs::File::open(path)?
            .take(MAX_PEM + 1)
            .read_to_end(&mut buf)?;
        Ok(buf)
    };
    let buf = read(path).map_err(|e| TlsError::Read {
        path: path.to_owned(),
        source: e,
    })?;
    if buf.len() as u64 > MAX_PEM {
        return Err(TlsError::BadFile {
            path: path.to_owned(),
            detail: format!("larger than {MAX_PEM} bytes: not a certificate or key file"),
        });
    }
    Ok(buf)
}

fn pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = read_bounded(path)?;
    let certs = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadFile {
            path: path.to_owned(),
            detail: format!("not PEM certificates: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::BadFile {
            path: path.to_owned(),
            detail: "no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into(),
        });
    }
    Ok(certs)
}

fn pem_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let data = zeroize::Zeroizing::new(read_bounded(path)?);
    PrivateKeyDer::from_pem_slice(&data).map_err(|e| TlsError::BadFile {
        path: path.to_owned(),
        detail: format!("no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"),
    })
}

/// Reads a certificate directory as containers/image's `SetupCertificates` does: entries in
/// name order; `*.crt` are CAs, `NAME.cert` + `NAME.key` client pairs. A missing directory, or
/// one that cannot be listed for lack of permission, holds nothing.
///
/// # Errors
/// [`TlsError`] for unreadable files, unpaired `.cert`/`.key`, files without PEM content.
pub fn load_cert_dir(dir: &Path) -> Result<CertDir, TlsError> {
    let mut out = CertDir {
        path: Some(dir.to_owned()),
        ..CertDir::default()
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
            ) =>
        {
            tracing::debug!("certificate directory {}: {e}", dir.display());
            return Ok(out);
        }
        Err(e) => {
            return Err(TlsError::Read {
                path: dir.to_owned(),
                source: e,
            })
        }
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    let has = |n: &str| names.iter().any(|x| x == n);
    for name in &names {
        let path = dir.join(name);
        if name.ends_with(".crt") {
            out.cas.extend(pem_certs(&path)?);
        } else if let Some(stem) = name.strip_suffix(".cert") {
            let key = format!("{stem}.key");
            if !has(&key) {
                return Err(TlsError::MissingKey {
                    dir: dir.to_owned(),
                    cert: name.clone(),
                    key,
                });
            }
            out.client.push(ClientPair {
                chain: pem_certs(&path)?,
                key: pem_key(&dir.join(&key))?,
                cert_path: path,
            });
        } else if let Some(stem) = name.strip_suffix(".key") {
            let cert = format!("{stem}.cert");
            if !has(&cert) {
                return Err(TlsError::MissingCert {
                    dir: dir.to_owned(),
                    cert,
                    key: name.clone(),
                });
            }
        }
    }
    Ok(out)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The web roots plus the system store, loaded once per process.
fn base_roots() -> &'static RootCertStore {
    static ROOTS: OnceLock<RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let mut roots = RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            tracing::debug!("system certificate store: {e}");
        }
        let (added, ignored) = roots.add_parsable_certificates(native.certs);
        tracing::debug!("system certificate store: {added} certificates ({ignored} unusable)");
        roots
    })
}

/// A TLS client configuration for one registry, with what went into it (for messages).
#[derive(Debug, Clone)]
pub struct RegistryTls {
    /// The rustls configuration.
    pub config: Arc<ClientConfig>,
    /// The certificate directory used, if any.
    pub cert_dir: Option<PathBuf>,
    /// The client certificate offered, if any.
    pub client_cert: Option<PathBuf>,
    /// Whether verification is off.
    pub skip_verify: bool,
}

impl RegistryTls {
    /// Sets up TLS for `host_port` (`HOST[:PORT]` as written in the image reference).
    ///
    /// # Errors
    /// [`TlsError`] when the certificate directory is malformed.
    pub fn new(host_port: &str, opts: &TlsOptions) -> Result<Self, TlsError> {
        let dir = cert_dir_for(host_port, opts)?;
        let contents = match &dir {
            Some(d) => load_cert_dir(d)?,
            None => CertDir::default(),
        };
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config {
                host: host_port.to_owned(),
                detail: e.to_string(),
            })?;
        let builder = if opts.skip_verify {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerify(provider())))
        } else {
            let mut roots = base_roots().clone();
            for ca in contents.cas {
                roots.add(ca).map_err(|e| TlsError::Config {
                    host: host_port.to_owned(),
                    detail: format!("a CA certificate in {} is unusable: {e}", display(&dir)),
                })?;
            }
            builder.with_root_certificates(roots)
        };
        let mut client_cert = None;
        let mut config = match contents.client.into_iter().next() {
            Some(pair) => {
                client_cert = Some(pair.cert_path.clone());
                builder
                    .with_client_auth_cert(pair.chain, pair.key)
                    .map_err(|e| TlsError::Config {
                        host: host_port.to_owned(),
                        detail: format!(
                            "client certificate {} and its key cannot be used: {e}",
                            pair.cert_path.display()
                        ),
                    })?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            config: Arc::new(config),
            cert_dir: dir,
            client_cert,
            skip_verify: opts.skip_verify,
        })
    }

    /// A reqwest client builder using this configuration.
    pub fn apply(&self, builder: reqwest::ClientBuilder) -> reqwest::ClientBuilder {
        builder.use_preconfigured_tls((*self.config).clone())
    }
}

fn display(p: &Option<PathBuf>) -> String {
    p.as_ref().map_or_else(
        || "the certificate directory".to_owned(),
        |p| p.display().to_string(),
    )
}

/// Accepts any server certificate but still checks the handshake signatures.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Why a TLS connection failed, as far as the user can act on it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TlsFailure {
    /// The registry's certificate was issued by a CA we do not trust.
    UnknownIssuer,
    /// The registry's certificate has expired.
    Expired,
    /// The registry's certificate is not valid yet.
    NotYetValid,
    /// The registry's certificate is not for this host name or address.
    WrongName,
    /// Another problem with the registry's certificate.
    BadCertificate(String),
    /// The registry asked for a client certificate and got none (or refused the one offered).
    ClientCertificate(String),
    /// The registry answered in plain HTTP.
    PlainHttp,
}

impl TlsFailure {
    /// The reason, in words.
    pub fn reason(&self) -> String {
        match self {
            TlsFailure::UnknownIssuer => {
                "its certificate is signed by an unknown authority (unknown issuer)".into()
            }
            TlsFailure::Expired => "its certificate has expired".into(),
            TlsFailure::NotYetValid => "its certificate is not valid yet (check the clock)".into(),
            TlsFailure::WrongName => "its certificate is not valid for this host name or address".into(),
            TlsFailure::BadCertificate(d) => format!("its certificate is unusable ({d})"),
            TlsFailure::ClientCertificate(d) => {
                format!("it requires a client certificate and refused the handshake ({d})")
            }
            TlsFailure::PlainHttp => "it answered in plain HTTP, not HTTPS".into(),
        }
    }

    /// What to do about it.
    pub fn hint(&self, host: &str) -> String {
        match self {
            TlsFailure::UnknownIssuer => format!(
                "trust the registry's CA: put it (PEM, extension .crt) in /etc/containers/certs.d/{host}/ \
                 or ~/.config/containers/certs.d/{host}/, or pass --cert-dir DIR (--src-cert-dir/--dest-cert-dir), \
                 or add it to the system store (update-ca-certificates, or SSL_CERT_FILE); \
                 --tls-verify=false skips verification"
            ),
            TlsFailure::Expired | TlsFailure::NotYetValid | TlsFailure::BadCertificate(_) => {
                "the registry must present a valid certificate; --tls-verify=false skips verification".into()
            }
            TlsFailure::WrongName => format!(
                "use the name the certificate was issued for instead of {host}, or --tls-verify=false to skip verification"
            ),
            TlsFailure::ClientCertificate(_) => format!(
                "put a client certificate and its key as NAME.cert and NAME.key in /etc/containers/certs.d/{host}/ \
                 or in the directory given with --cert-dir"
            ),
            TlsFailure::PlainHttp => {
                "pass --tls-verify=false (or --src-tls-verify=false / --dest-tls-verify=false) for a plain-HTTP registry".into()
            }
        }
    }
}

fn from_rustls(e: &rustls::Error) -> Option<TlsFailure> {
    use rustls::AlertDescription as A;
    Some(match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => TlsFailure::UnknownIssuer,
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => TlsFailure::Expired,
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                TlsFailure::NotYetValid
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                TlsFailure::WrongName
            }
            other => TlsFailure::BadCertificate(format!("{other:?}")),
        },
        rustls::Error::AlertReceived(
            a @ (A::CertificateRequired
            | A::BadCertificate
            | A::UnknownCA
            | A::CertificateUnknown
            | A::HandshakeFailure
            | A::AccessDenied),
        ) => TlsFailure::ClientCertificate(format!("alert {a:?}")),
        rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType) => TlsFailure::PlainHttp,
        _ => return None,
    })
}

/// Finds a TLS failure in an error's chain (reqwest, hyper, io and rustls errors).
pub fn classify(err: &(dyn std::error::Error + 'static)) -> Option<TlsFailure> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    let mut depth = 0;
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return from_rustls(r);
        }
        depth += 1;
        if depth > 16 {
            break;
        }
        // An io::Error's source() skips the error it wraps: descend into that one instead.
        cur = match e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cert_dir_pairs_and_errors() {
        let d = tempfile::tempdir().unwrap();
        // Nothing there: nothing loaded.
        let c = load_cert_dir(&d.path().join("missing")).unwrap();
        assert!(c.cas.is_empty() && c.client.is_empty());
        std::fs::write(d.path().join("client.cert"), "x").unwrap();
        let e = load_cert_dir(d.path()).unwrap_err();
        assert!(matches!(e, TlsError::MissingKey { .. }), "{e}");
        assert!(e.to_string().contains("client.key"), "{e}");
        std::fs::remove_file(d.path().join("client.cert")).unwrap();
        std::fs::write(d.path().join("other.key"), "x").unwrap();
        let e = load_cert_dir(d.path()).unwrap_err();
        assert!(matches!(e, TlsError::MissingCert { .. }), "{e}");
        std::fs::remove_file(d.path().join("other.key")).unwrap();
        std::fs::write(d.path().join("ca.crt"), "not pem").unwrap();
        let e = load_cert_dir(d.path()).unwrap_err();
        assert!(e.to_string().contains("ca.crt"), "{e}");
        // Other files are ignored.
        std::fs::remove_file(d.path().join("ca.crt")).unwrap();
        std::fs::write(d.path().join("README"), "x").unwrap();
        assert!(load_cert_dir(d.path()).unwrap().cas.is_empty());
    }

    #[test]
    fn per_registry_lookup_order() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        std::fs::create_dir(b.path().join("reg.example:5000")).unwrap();
        let opts = TlsOptions {
            certs_d_roots: Some(vec![a.path().to_owned(), b.path().to_owned()]),
            ..TlsOptions::default()
        };
        assert_eq!(
            cert_dir_for("reg.example:5000", &opts).unwrap(),
            Some(b.path().join("reg.example:5000"))
        );
        std::fs::create_dir(a.path().join("reg.example:5000")).unwrap();
        assert_eq!(
            cert_dir_for("reg.example:5000", &opts).unwrap(),
            Some(a.path().join("reg.example:5000"))
        );
        assert_eq!(cert_dir_for("other", &opts).unwrap(), None);
        assert_eq!(cert_dir_for("../x", &opts).unwrap(), None);
        let explicit = TlsOptions {
            cert_dir: Some("/x".into()),
            ..opts
        };
        assert_eq!(
            cert_dir_for("reg.example:5000", &explicit).unwrap(),
            Some("/x".into())
        );
    }

    #[test]
    fn classifies_rustls_errors_inside_io_errors() {
        let e = std::io::Error::other(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer));
        assert_eq!(classify(&e), Some(TlsFailure::UnknownIssuer));
        let e = std::io::Error::other(rustls::Error::InvalidMessage(
            rustls::InvalidMessage::InvalidContentType,
        ));
        assert_eq!(classify(&e), Some(TlsFailure::PlainHttp));
        let e = std::io::Error::other(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(CertificateError::NotValidForName),
        ));
        assert_eq!(classify(&e), Some(TlsFailure::WrongName));
        let e = std::io::Error::other("other");
        assert_eq!(classify(&e), None);
    }
}

//! The validated configuration: what [`crate::cli`] parsed, checked and resolved before any
//! work is done.

use std::path::PathBuf;

use ocicrypt_core::image::LayerSelection;

use crate::cli::{self, Cli, Command, RecipientsCommand};
use crate::error::CliError;
use crate::keyspec::{parse_key, parse_recipient, KeySpec, RecipientSpec};
use imgcrypt_registry::{Creds, ImageRef, Reference, RegistryOptions};

/// Output settings.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    /// JSON on stdout.
    pub json: bool,
    /// No progress, no summary.
    pub quiet: bool,
}

/// Registry access for one side (source or destination): the registry client's options,
/// filled from that side's flags.
pub type Access = RegistryOptions;

/// What a transform does.
#[derive(Debug)]
pub enum OpSpec {
    /// Encrypt for recipients.
    Encrypt {
        /// Recipients.
        recipients: Vec<RecipientSpec>,
    },
    /// Decrypt with keys.
    Decrypt {
        /// Keys.
        keys: Keys,
    },
    /// Add recipients.
    AddRecipients {
        /// Keys that can decrypt.
        keys: Keys,
        /// New recipients.
        recipients: Vec<RecipientSpec>,
    },
    /// Keep exactly these recipients.
    SetRecipients {
        /// Keys that can decrypt.
        keys: Keys,
        /// Remaining recipients.
        recipients: Vec<RecipientSpec>,
    },
    /// Remove recipients by key id (no key needed).
    RemoveRecipients {
        /// (key id, how the user named it).
        ids: Vec<(String, String)>,
    },
}

impl OpSpec {
    /// `encrypt`, `decrypt`, …
    pub fn name(&self) -> &'static str {
        match self {
            OpSpec::Encrypt { .. } => "encrypt",
            OpSpec::Decrypt { .. } => "decrypt",
            OpSpec::AddRecipients { .. } => "recipients add",
            OpSpec::SetRecipients { .. } => "recipients set",
            OpSpec::RemoveRecipients { .. } => "recipients remove",
        }
    }
}

/// Keys given with `--key` and `--key-dir`.
#[derive(Debug, Default)]
pub struct Keys {
    /// `--key` values.
    pub keys: Vec<KeySpec>,
    /// `--key-dir` values.
    pub dirs: Vec<PathBuf>,
}

/// A copy from `src` to `dst` with an operation.
#[derive(Debug)]
pub struct Transform {
    /// Source image.
    pub src: ImageRef,
    /// Destination image.
    pub dst: ImageRef,
    /// Source access.
    pub src_access: Access,
    /// Destination access.
    pub dst_access: Access,
    /// The operation.
    pub op: OpSpec,
    /// Layers and platforms.
    pub selection: LayerSelection,
    /// `encrypt --skip-base`: the base image, read with `src_access`.
    pub skip_base: Option<ImageRef>,
    /// Layers in flight.
    pub concurrency: usize,
}

/// A validated command.
#[derive(Debug)]
pub enum Config {
    /// encrypt, decrypt, recipients add/remove.
    Transform(Box<Transform>),
    /// inspect.
    Inspect {
        /// The image.
        image: ImageRef,
        /// Access.
        access: Access,
    },
    /// check.
    Check {
        /// The image.
        image: ImageRef,
        /// Access.
        access: Access,
        /// Keys.
        keys: Keys,
        /// Platforms.
        platforms: Vec<String>,
    },
    /// key-id.
    KeyId {
        /// Key files.
        files: Vec<PathBuf>,
    },
    /// keygen.
    Keygen {
        /// Key type.
        kind: KeyType,
        /// Private key file.
        private: PathBuf,
        /// Public key file.
        public: PathBuf,
        /// Overwrite.
        force: bool,
    },
    /// kp wrap.
    KpWrap {
        /// Root key.
        root_key: String,
        /// File to wrap.
        file: PathBuf,
    },
    /// kp unwrap.
    KpUnwrap {
        /// Root key.
        root_key: String,
        /// Output file (stdout if none).
        out: Option<PathBuf>,
        /// Overwrite.
        force: bool,
        /// Ciphertext (stdin if none).
        ciphertext: Option<String>,
    },
    /// demo.
    Demo {
        /// Working directory.
        dir: Option<PathBuf>,
    },
}

/// Key types `keygen` makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    /// RSA with this many bits.
    Rsa(u32),
    /// EC on this curve (`P-256`, `P-384`, `P-521`).
    Ec(&'static str),
}

impl KeyType {
    /// Parses `rsa-3072`, `rsa3072`, `rsa`, `ec-p256`, `p256`, `ec`, `ec-p384`…
    ///
    /// # Errors
    /// [`CliError`] usage.
    pub fn parse(s: &str) -> Result<KeyType, CliError> {
        let norm: String = s
            .to_ascii_lowercase()
            .chars()
            .filter(|c| *c != '-' && *c != '_')
            .collect();
        Ok(match norm.as_str() {
            "rsa" | "rsa3072" => KeyType::Rsa(3072),
            "rsa2048" => KeyType::Rsa(2048),
            "rsa4096" => KeyType::Rsa(4096),
            "ec" | "ecp256" | "p256" | "prime256v1" => KeyType::Ec("P-256"),
            "ecp384" | "p384" | "secp384r1" => KeyType::Ec("P-384"),
            "ecp521" | "p521" | "secp521r1" => KeyType::Ec("P-521"),
            _ => {
                return Err(CliError::usage(format!(
                    "unknown key type {s:?}: use rsa-2048, rsa-3072, rsa-4096, ec-p256 or ec-p384"
                )))
            }
        })
    }
}

impl std::fmt::Display for KeyType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyType::Rsa(b) => write!(f, "RSA-{b}"),
            KeyType::Ec(c) => write!(f, "EC {c}"),
        }
    }
}

fn access(t: &cli::TransportArgs, src: bool) -> Result<Access, CliError> {
    let (side_creds, flag, side_tls, side_cert_dir) = if src {
        (&t.src_creds, "--src-creds", t.src_tls_verify, &t.src_cert_dir)
    } else {
        (&t.dst_creds, "--dest-creds", t.dst_tls_verify, &t.dst_cert_dir)
    };
    let creds = match (side_creds, &t.creds) {
        (Some(c), _) => Some(Creds::parse(c, flag)?),
        (None, Some(c)) => Some(Creds::parse(c, "--creds")?),
        (None, None) => None,
    };
    let mut a = RegistryOptions::default()
        .tls_verify(side_tls.or(t.tls_verify).unwrap_or(true))
        .stall_timeout(stall_timeout(t.stall_timeout)?)
        .cancel(crate::interrupt::cancel_flag());
    a.creds = creds;
    a.tls.cert_dir = side_cert_dir.clone().or_else(|| t.cert_dir.clone());
    a.authfile = t.authfile.clone();
    Ok(a)
}

fn stall_timeout(secs: Option<f64>) -> Result<std::time::Duration, CliError> {
    match secs {
        None => Ok(imgcrypt_registry::client::DEFAULT_STALL),
        Some(s) if s.is_finite() && (0.1..=86_400.0).contains(&s) => {
            Ok(std::time::Duration::from_secs_f64(s))
        }
        Some(s) => Err(CliError::usage(format!(
            "--stall-timeout {s}: give a number of seconds between 0.1 and 86400"
        ))),
    }
}

fn recipients(list: &[String]) -> Result<Vec<RecipientSpec>, CliError> {
    if list.is_empty() {
        return Err(CliError::usage(
            "give at least one --recipient jwe:PUBLIC_KEY_FILE",
        ));
    }
    list.iter().map(|r| parse_recipient(r)).collect()
}

fn keys(k: &cli::KeyArgs) -> Result<Keys, CliError> {
    let keys = k
        .keys
        .iter()
        .map(|s| parse_key(s))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Keys {
        keys,
        dirs: k.key_dirs.clone(),
    })
}

fn require_keys(k: &Keys, what: &str) -> Result<(), CliError> {
    if k.keys.is_empty() && k.dirs.is_empty() {
        return Err(CliError::usage(format!(
            "{what} needs a private key: --key FILE[:PASSWORD] or --key-dir DIR"
        )));
    }
    Ok(())
}

fn selection(s: &cli::SelectionArgs) -> Result<LayerSelection, CliError> {
    for p in &s.platforms {
        let parts: Vec<&str> = p.split('/').collect();
        if !(2..=3).contains(&parts.len()) || parts.iter().any(|x| x.is_empty()) {
            return Err(CliError::usage(format!(
                "platform {p:?}: write OS/ARCH[/VARIANT], e.g. linux/amd64"
            )));
        }
    }
    Ok(LayerSelection {
        layers: s.layers.clone(),
        platforms: s.platforms.clone(),
        skip_base: None,
    })
}

fn destination(s: &str) -> Result<ImageRef, CliError> {
    let r = ImageRef::parse(s)?;
    if let ImageRef::Registry(reg) = &r {
        if let Reference::Digest(_) = reg.reference {
            return Err(CliError::new(
                crate::error::ErrorKind::BadReference,
                format!("destination {s}: a changed image gets a new digest; push it to a tag (docker://HOST/REPO:TAG)"),
            ));
        }
    }
    Ok(r)
}

impl Config {
    /// Validates parsed arguments.
    ///
    /// # Errors
    /// [`CliError`] naming the bad argument.
    pub fn from_cli(cli: Cli) -> Result<(Config, Output), CliError> {
        let out = Output {
            json: cli.json,
            quiet: cli.quiet,
        };
        let top = &cli.transport;
        let transform = |src: &str,
                         dst: &str,
                         op: OpSpec,
                         sel: &cli::SelectionArgs,
                         sub: &cli::TransportArgs,
                         conc: Option<usize>|
         -> Result<Config, CliError> {
            let t = top.merged(sub);
            let concurrency = conc.or(cli.concurrency).unwrap_or(4);
            if concurrency == 0 || concurrency > 64 {
                return Err(CliError::usage("--concurrency must be between 1 and 64"));
            }
            Ok(Config::Transform(Box::new(Transform {
                src: ImageRef::parse(src)?,
                dst: destination(dst)?,
                src_access: access(&t, true)?,
                dst_access: access(&t, false)?,
                op,
                selection: selection(sel)?,
                skip_base: None,
                concurrency,
            })))
        };
        let cfg = match &cli.command {
            Command::Encrypt(a) => {
                let mut cfg = transform(
                    &a.src,
                    &a.dst,
                    OpSpec::Encrypt {
                        recipients: recipients(&a.recipients)?,
                    },
                    &a.selection,
                    &a.transport,
                    a.concurrency,
                )?;
                if let (Config::Transform(t), Some(base)) = (&mut cfg, &a.skip_base) {
                    t.skip_base = Some(ImageRef::parse(base).map_err(|e| {
                        let mut e = CliError::from(e);
                        e.message = format!("--skip-base: {}", e.message);
                        e
                    })?);
                }
                cfg
            }
            Command::Decrypt(a) => {
                let k = keys(&a.keys)?;
                require_keys(&k, "decrypt")?;
                transform(
                    &a.src,
                    &a.dst,
                    OpSpec::Decrypt { keys: k },
                    &a.selection,
                    &a.transport,
                    a.concurrency,
                )?
            }
            Command::Recipients(RecipientsCommand::Remove(a)) => {
                let mut ids = Vec::new();
                for r in &a.recipients {
                    ids.extend(recipient_ids(r)?);
                }
                let dst = a.dst.as_deref().unwrap_or(&a.image);
                transform(
                    &a.image,
                    dst,
                    OpSpec::RemoveRecipients { ids },
                    &a.selection,
                    &a.transport,
                    a.concurrency,
                )?
            }
            Command::Recipients(rc) => {
                let (a, add) = match rc {
                    RecipientsCommand::Add(a) => (a, true),
                    RecipientsCommand::Set(a) => (a, false),
                    RecipientsCommand::Remove(_) => unreachable!("handled above"),
                };
                let k = keys(&a.keys)?;
                require_keys(&k, if add { "recipients add" } else { "recipients set" })?;
                let r = recipients(&a.recipients)?;
                let op = if add {
                    OpSpec::AddRecipients {
                        keys: k,
                        recipients: r,
                    }
                } else {
                    OpSpec::SetRecipients {
                        keys: k,
                        recipients: r,
                    }
                };
                let dst = a.dst.as_deref().unwrap_or(&a.image);
                transform(&a.image, dst, op, &a.selection, &a.transport, a.concurrency)?
            }
            Command::Inspect(a) => Config::Inspect {
                image: ImageRef::parse(&a.image)?,
                access: access(&top.merged(&a.transport), true)?,
            },
            Command::Check(a) => {
                let k = keys(&a.keys)?;
                require_keys(&k, "check")?;
                selection(&cli::SelectionArgs {
                    layers: vec![],
                    platforms: a.platforms.clone(),
                })?;
                Config::Check {
                    image: ImageRef::parse(&a.image)?,
                    access: access(&top.merged(&a.transport), true)?,
                    keys: k,
                    platforms: a.platforms.clone(),
                }
            }
            Command::KeyId(a) => Config::KeyId {
                files: a.files.clone(),
            },
            Command::Keygen(a) => {
                let kind = KeyType::parse(&a.r#type)?;
                let private = private_key_path(&a.out);
                if private.as_os_str() == "-" {
                    return Err(CliError::usage(
                        "keygen writes the private key to a file (mode 0600), not to stdout: name the file",
                    ));
                }
                let public = match &a.public {
                    Some(p) => p.clone(),
                    None => default_public_path(&private),
                };
                if public == private {
                    return Err(CliError::usage(
                        "the public key path must differ from the private key path",
                    ));
                }
                Config::Keygen {
                    kind,
                    private,
                    public,
                    force: a.force,
                }
            }
            Command::Kp(cli::KpCommand::Wrap { root_key, file }) => Config::KpWrap {
                root_key: non_empty_root_key(root_key)?,
                file: file.clone(),
            },
            Command::Kp(cli::KpCommand::Unwrap {
                root_key,
                out,
                force,
                ciphertext,
            }) => Config::KpUnwrap {
                root_key: non_empty_root_key(root_key)?,
                out: out.clone(),
                force: *force,
                ciphertext: ciphertext.clone(),
            },
            Command::Demo(a) => Config::Demo { dir: a.dir.clone() },
        };
        Ok((cfg, out))
    }
}

/// The key id a `recipients remove --recipient` names: `id:KEY_ID`, or the thumbprint of the
/// key in `jwe:FILE` (a public key, or an unencrypted private key).
/// Whether `id` has the form of a recipient id: a JWE thumbprint (43 base64url characters), a
/// PGP key id (16 hex digits) or a PKCS#7 `SERIAL@ISSUERHASH` (hex digits around one `@`).
fn is_recipient_id(id: &str) -> bool {
    let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    let jwe = id.len() == 43
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    let pgp = id.len() == 16 && hex(id);
    let pkcs7 = id.split_once('@').is_some_and(|(serial, issuer)| {
        serial.len() <= 128 && hex(serial) && issuer.len() == 16 && hex(issuer)
    });
    jwe || pgp || pkcs7
}

/// The ids a `recipients remove --recipient` names, each with how the user wrote it: a key id
/// (`id:…`), or a recipient whose scheme has ids (jwe:, pkcs7:, pgp:; any wrapper that reports
/// [`recipient_ids`](ocicrypt_core::KeyWrapper::recipient_ids)).
fn recipient_ids(spec: &str) -> Result<Vec<(String, String)>, CliError> {
    if let Some(id) = spec.strip_prefix("id:") {
        if !is_recipient_id(id) {
            return Err(CliError::usage(format!(
                "--recipient {}: not a recipient id; ids are what `imgcrypt inspect` prints after the scheme: 43 base64url characters (jwe), 16 hex digits (pgp), SERIAL@ISSUERHASH (pkcs7)",
                ocicrypt_core::redact::token(id)
            )));
        }
        return Ok(vec![(id.to_owned(), spec.to_owned())]);
    }
    let no_ids = || {
        CliError::usage(format!(
            "--recipient {}: this scheme's entries do not name their recipients, so they cannot be removed one by one",
            ocicrypt_core::redact::token(spec)
        ))
        .hint("re-key with `imgcrypt recipients set --key KEY --recipient …` listing the recipients to keep")
    };
    match parse_recipient(spec)? {
        // A private key file works too (same id).
        RecipientSpec::Jwe(path) => Ok(vec![(crate::commands::key_file_id(&path)?, spec.to_owned())]),
        RecipientSpec::Provider { .. } => Err(no_ids()),
        r => {
            let ids: Vec<String> = crate::schemes::wrappers(std::slice::from_ref(&r))?
                .iter()
                .flat_map(|w| w.recipient_ids())
                .collect();
            if ids.is_empty() {
                return Err(no_ids());
            }
            Ok(ids.into_iter().map(|i| (i, spec.to_owned())).collect())
        }
    }
}

fn non_empty_root_key(k: &str) -> Result<String, CliError> {
    if k.trim().is_empty() {
        return Err(CliError::usage(
            "--root-key must name a Key Protect root key id or alias",
        ));
    }
    Ok(k.trim().to_owned())
}

/// The private key file `keygen NAME` writes: `NAME` with `.pem` added when it has no
/// extension (`carol` → `carol.pem`), else as given.
pub fn private_key_path(out: &std::path::Path) -> PathBuf {
    match out.file_name() {
        Some(n) if out.extension().is_none() && n != "-" && !n.to_string_lossy().starts_with('.') => {
            out.with_extension("pem")
        }
        _ => out.to_path_buf(),
    }
}

/// `key.pem` → `key.pub.pem`; `key.der` → `key.der.pub.pem`.
pub fn default_public_path(private: &std::path::Path) -> PathBuf {
    let name = private
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name.strip_suffix(".pem").unwrap_or(&name);
    private.with_file_name(format!("{stem}.pub.pem"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn cfg(args: &[&str]) -> Result<Config, CliError> {
        let mut v = vec!["imgcrypt"];
        v.extend_from_slice(args);
        Config::from_cli(Cli::try_parse_from(v).map_err(|e| CliError::usage(e.to_string()))?).map(|(c, _)| c)
    }

    #[test]
    fn key_types_and_paths() {
        assert_eq!(KeyType::parse("rsa-2048").unwrap(), KeyType::Rsa(2048));
        assert_eq!(KeyType::parse("EC-P384").unwrap(), KeyType::Ec("P-384"));
        assert!(KeyType::parse("ed25519").is_err());
        assert_eq!(
            default_public_path("/k/a.pem".as_ref()),
            PathBuf::from("/k/a.pub.pem")
        );
        assert_eq!(
            default_public_path("a.key".as_ref()),
            PathBuf::from("a.key.pub.pem")
        );
        assert_eq!(private_key_path("carol".as_ref()), PathBuf::from("carol.pem"));
        assert_eq!(
            private_key_path("d/carol.pem".as_ref()),
            PathBuf::from("d/carol.pem")
        );
        assert_eq!(private_key_path("carol.key".as_ref()), PathBuf::from("carol.key"));
    }

    #[test]
    fn skopeo_aliases_and_selection() {
        let c = cfg(&[
            "encrypt",
            "--encryption-key",
            "jwe:a.pem",
            "--encrypt-layer",
            "-1",
            "--encrypt-layer",
            "0,1",
            "--platform",
            "linux/arm64",
            "oci:a:v1",
            "oci:b:v1",
        ])
        .unwrap();
        let Config::Transform(t) = c else { panic!() };
        assert_eq!(t.selection.layers, vec![-1, 0, 1]);
        assert_eq!(t.selection.platforms, vec!["linux/arm64".to_owned()]);
        assert!(matches!(t.op, OpSpec::Encrypt { ref recipients } if recipients.len() == 1));
        assert!(!t.src_access.tls.skip_verify);
        let c = cfg(&[
            "--tls-verify=false",
            "--creds",
            "u:p",
            "inspect",
            "docker://h:1/r:t",
        ])
        .unwrap();
        let Config::Inspect { access, .. } = c else {
            panic!()
        };
        assert!(access.tls.skip_verify);
        assert_eq!(access.creds.unwrap().user, "u");
        assert!(cfg(&["decrypt", "oci:a", "oci:b"]).is_err());
        assert!(cfg(&[
            "encrypt",
            "--recipient",
            "jwe:a",
            "--platform",
            "linux",
            "oci:a",
            "oci:b"
        ])
        .is_err());
        let d = format!("docker://h.io/r@sha256:{}", "a".repeat(64));
        assert!(cfg(&["encrypt", "--recipient", "jwe:a", "oci:a", &d]).is_err());
    }
}

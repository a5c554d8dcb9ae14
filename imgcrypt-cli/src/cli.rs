//! Raw command-line arguments (clap derive). Validation happens in [`crate::config`].
// Doc comments here double as `--help` text, where `[:PARAM]` means "optional", not a link.
#![allow(rustdoc::broken_intra_doc_links)]

use std::path::PathBuf;

use std::ffi::OsString;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

/// Environment variables read by the command line.
pub struct EnvVars;

impl EnvVars {
    /// A containers-auth.json file with registry credentials (as skopeo, podman).
    pub const REGISTRY_AUTH_FILE: &'static str = "REGISTRY_AUTH_FILE";
    /// The runtime directory holding `containers/auth.json` (podman login's default).
    pub const XDG_RUNTIME_DIR: &'static str = "XDG_RUNTIME_DIR";
    /// Home directory (for `~/.docker/config.json`).
    pub const HOME: &'static str = "HOME";
    /// Docker's config directory (default `~/.docker`).
    pub const DOCKER_CONFIG: &'static str = "DOCKER_CONFIG";
    /// The ocicrypt key-provider configuration file (`provider:` recipients and keys).
    pub const OCICRYPT_KEYPROVIDER_CONFIG: &'static str = "OCICRYPT_KEYPROVIDER_CONFIG";
}

const AFTER_HELP: &str = "\
IMAGE REFERENCES:
  oci:PATH[:TAG]                           an OCI image layout directory (created when a destination is missing)
  docker://HOST[:PORT]/REPO[:TAG|@DIGEST]  an image in a registry (OCI distribution API)
  oci-archive:PATH[:TAG]                   a tar of an OCI image layout
  docker-archive:PATH[:NAME:TAG]           docker save output (as a destination: unencrypted only)

RECIPIENTS (--recipient, --encryption-key):
  jwe:PUBLIC_KEY_FILE    SPKI/PKCS#1 PEM or DER, public JWK, or an X.509 certificate
  provider:NAME[:PARAM]  an ocicrypt key provider from OCICRYPT_KEYPROVIDER_CONFIG

KEYS (--key, --decryption-key):
  FILE, FILE:PASSWORD, FILE:pass=PASSWORD, FILE:file=PASSWORD_FILE, provider:NAME[:PARAM]
  (a FILE that exists as given is never split at ':')";

/// Encrypt, decrypt, inspect and re-key OCI container images (ocicrypt format, interoperable
/// with skopeo, buildah, podman and containerd's imgcrypt).
#[derive(Debug, Parser)]
#[command(name = "imgcrypt", version, about, after_help = after_help())]
pub struct Cli {
    /// Print results as JSON on stdout (errors too), no progress bars.
    #[arg(long, global = true)]
    pub json: bool,
    /// No progress bars and no summary.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// Layers processed at once (default 4).
    #[arg(long, value_name = "N")]
    pub concurrency: Option<usize>,
    /// Registry access (also accepted after the image commands: encrypt, decrypt, recipients,
    /// inspect, check; there, the last one given wins).
    #[command(flatten)]
    pub transport: TransportArgs,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Parses arguments (the first is the program name); every subcommand's `--help` ends with the
/// EXIT CODES section too.
///
/// # Errors
/// clap's usage error (or the `--help`/`--version` "error").
pub fn parse_from<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    fn with_codes(c: clap::Command) -> clap::Command {
        c.mut_subcommands(|s| with_codes(s.after_help(crate::error::exit_codes_help())))
    }
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    bool_value_after_space(&args)?;
    let matches = with_codes(Cli::command()).try_get_matches_from(args)?;
    Cli::from_arg_matches(&matches)
}

/// The boolean registry flags, which take their value only after `=`.
const BOOL_FLAGS: [&str; 4] = [
    "--tls-verify",
    "--src-tls-verify",
    "--dest-tls-verify",
    "--dst-tls-verify",
];

/// `--tls-verify false` (a space instead of `=`): skopeo refuses it too (its bool flags take a
/// value only after `=`), but with a confusing message, and here `false` would be read as an
/// image reference. Say what to write instead.
fn bool_value_after_space(args: &[OsString]) -> Result<(), clap::Error> {
    for w in args.windows(2) {
        let (Some(flag), Some(value)) = (w[0].to_str(), w[1].to_str()) else {
            continue;
        };
        if flag == "--" {
            break;
        }
        let v = value.to_ascii_lowercase();
        if BOOL_FLAGS.contains(&flag) && (v == "true" || v == "false") {
            return Err(clap::Error::raw(
                clap::error::ErrorKind::InvalidValue,
                format!(
                    "{flag} {value}: a yes/no flag takes its value after '=', as in skopeo: write {flag}={v} (alone, {flag} means {flag}=true)\n"
                ),
            ));
        }
    }
    Ok(())
}

fn after_help() -> String {
    format!("{AFTER_HELP}\n\n{}", crate::error::exit_codes_help())
}

/// Registry access options (skopeo's names).
#[derive(Debug, Args, Default, Clone)]
pub struct TransportArgs {
    /// Registry credentials USER:PASSWORD for source and destination.
    #[arg(long, value_name = "USER:PASSWORD")]
    pub creds: Option<String>,
    /// Credentials for the source registry.
    #[arg(long, value_name = "USER:PASSWORD")]
    pub src_creds: Option<String>,
    /// Credentials for the destination registry.
    #[arg(long = "dest-creds", value_name = "USER:PASSWORD", alias = "dst-creds")]
    pub dst_creds: Option<String>,
    /// Verify the registry's TLS certificate (false: HTTPS without verification, plain HTTP if
    /// the registry does not speak TLS).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub tls_verify: Option<bool>,
    /// As --tls-verify, for the source.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub src_tls_verify: Option<bool>,
    /// As --tls-verify, for the destination.
    #[arg(long = "dest-tls-verify", alias = "dst-tls-verify", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub dst_tls_verify: Option<bool>,
    /// Certificates for the registries (*.crt CAs, NAME.cert + NAME.key client certificate),
    /// instead of /etc/containers/certs.d/HOST[:PORT] and the other certs.d directories.
    #[arg(long, value_name = "DIR")]
    pub cert_dir: Option<PathBuf>,
    /// As --cert-dir, for the source.
    #[arg(long, value_name = "DIR")]
    pub src_cert_dir: Option<PathBuf>,
    /// As --cert-dir, for the destination.
    #[arg(long = "dest-cert-dir", alias = "dst-cert-dir", value_name = "DIR")]
    pub dst_cert_dir: Option<PathBuf>,
    /// A containers-auth.json file with credentials (default: $REGISTRY_AUTH_FILE,
    /// $XDG_RUNTIME_DIR/containers/auth.json, ~/.docker/config.json).
    #[arg(long, value_name = "PATH")]
    pub authfile: Option<PathBuf>,
    /// Fail a registry request whose answer does not start, or a transfer that moves less
    /// than 1 KiB, within this many seconds (default 60).
    #[arg(long, value_name = "SECONDS")]
    pub stall_timeout: Option<f64>,
}

impl TransportArgs {
    /// These options, with each one given in `sub` (after the subcommand) taking precedence.
    pub fn merged(&self, sub: &TransportArgs) -> TransportArgs {
        TransportArgs {
            creds: sub.creds.clone().or_else(|| self.creds.clone()),
            src_creds: sub.src_creds.clone().or_else(|| self.src_creds.clone()),
            dst_creds: sub.dst_creds.clone().or_else(|| self.dst_creds.clone()),
            tls_verify: sub.tls_verify.or(self.tls_verify),
            src_tls_verify: sub.src_tls_verify.or(self.src_tls_verify),
            dst_tls_verify: sub.dst_tls_verify.or(self.dst_tls_verify),
            cert_dir: sub.cert_dir.clone().or_else(|| self.cert_dir.clone()),
            src_cert_dir: sub.src_cert_dir.clone().or_else(|| self.src_cert_dir.clone()),
            dst_cert_dir: sub.dst_cert_dir.clone().or_else(|| self.dst_cert_dir.clone()),
            authfile: sub.authfile.clone().or_else(|| self.authfile.clone()),
            stall_timeout: sub.stall_timeout.or(self.stall_timeout),
        }
    }
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Encrypt the layers of an image for recipients.
    Encrypt(EncryptArgs),
    /// Decrypt the layers of an image.
    Decrypt(DecryptArgs),
    /// Add, remove or set the recipients of an encrypted image, without re-encrypting layer data.
    #[command(subcommand)]
    Recipients(RecipientsCommand),
    /// Show which layers are encrypted, and for which schemes and recipients.
    Inspect(InspectArgs),
    /// Check that keys can decrypt every encrypted layer (no layer data is read).
    Check(CheckArgs),
    /// Generate a key pair (private key PEM 0600, public key PEM) and print its key id.
    Keygen(KeygenArgs),
    /// Print the key id (RFC 7638 JWK thumbprint) of public or private key files: the id
    /// `inspect` shows for each recipient of a layer.
    KeyId(KeyIdArgs),
    /// IBM Key Protect helpers for `kp-key` Secrets (wrap a private key, unwrap it back).
    #[command(subcommand)]
    Kp(KpCommand),
    /// Show the whole job on a built-in example: make keys and an image, encrypt, fail without
    /// the key, decrypt, compare.
    Demo(DemoArgs),
}

/// Which layers and platforms.
#[derive(Debug, Args, Default)]
pub struct SelectionArgs {
    /// Only these layers (0-based; negative counts from the top, -1 = last; repeat or comma list).
    #[arg(
        long = "layer",
        visible_alias = "encrypt-layer",
        value_name = "N",
        allow_negative_numbers = true,
        value_delimiter = ','
    )]
    pub layers: Vec<i64>,
    /// Only these platforms of a multi-arch image (OS/ARCH[/VARIANT]; repeat or comma list).
    #[arg(long = "platform", value_name = "OS/ARCH", value_delimiter = ',')]
    pub platforms: Vec<String>,
}

/// Private keys.
#[derive(Debug, Args, Default)]
pub struct KeyArgs {
    /// A private key: FILE, FILE:PASSWORD, FILE:pass=PW, FILE:file=PWFILE or provider:NAME[:PARAM].
    #[arg(long = "key", visible_alias = "decryption-key", value_name = "KEY")]
    pub keys: Vec<String>,
    /// A directory of private keys, read as CRI-O reads /etc/crio/keys (files that are not usable
    /// private keys are skipped).
    #[arg(long = "key-dir", value_name = "DIR")]
    pub key_dirs: Vec<PathBuf>,
}

/// `encrypt`.
#[derive(Debug, Args)]
pub struct EncryptArgs {
    /// Registry access.
    #[command(flatten)]
    pub transport: TransportArgs,
    /// Layers processed at once (default 4).
    #[arg(long, value_name = "N")]
    pub concurrency: Option<usize>,
    /// A recipient: jwe:PUBLIC_KEY_FILE or provider:NAME[:PARAM] (repeat for several).
    #[arg(
        long = "recipient",
        visible_alias = "encryption-key",
        value_name = "RECIPIENT",
        required = true
    )]
    pub recipients: Vec<String>,
    /// Layers and platforms.
    #[command(flatten)]
    pub selection: SelectionArgs,
    /// Leave unencrypted every layer this base image (any transport, read with the source's
    /// registry options) has for the same platform; only the other layers are encrypted.
    #[arg(long = "skip-base", value_name = "IMAGE")]
    pub skip_base: Option<String>,
    /// The source image.
    pub src: String,
    /// The destination image.
    pub dst: String,
}

/// `decrypt`.
#[derive(Debug, Args)]
pub struct DecryptArgs {
    /// Registry access.
    #[command(flatten)]
    pub transport: TransportArgs,
    /// Layers processed at once (default 4).
    #[arg(long, value_name = "N")]
    pub concurrency: Option<usize>,
    /// Private keys.
    #[command(flatten)]
    pub keys: KeyArgs,
    /// Layers and platforms.
    #[command(flatten)]
    pub selection: SelectionArgs,
    /// The source image.
    pub src: String,
    /// The destination image.
    pub dst: String,
}

/// `recipients add|remove|set`.
#[derive(Debug, Subcommand)]
pub enum RecipientsCommand {
    /// Add recipients: unwrap each layer key with --key, wrap it for the new --recipient too.
    /// Recipients a layer already has are skipped (and reported).
    Add(RecipientsArgs),
    /// Remove exactly the listed recipients (found by key id; no private key needed); everyone
    /// else keeps access. A removed party that kept a copy of the image or its layer keys can
    /// still decrypt that copy: real revocation means decrypt and encrypt again.
    Remove(RemoveArgs),
    /// Replace all recipients with exactly the --recipient list: unwrap each layer key with
    /// --key and wrap it for those only. Use it to re-key images whose entries carry no key
    /// ids (written by skopeo).
    Set(RecipientsArgs),
}

/// Arguments of `recipients remove`.
#[derive(Debug, Args)]
pub struct RemoveArgs {
    /// Registry access.
    #[command(flatten)]
    pub transport: TransportArgs,
    /// Layers processed at once (default 4).
    #[arg(long, value_name = "N")]
    pub concurrency: Option<usize>,
    /// Private keys: not needed (accepted for compatibility, unused).
    #[command(flatten)]
    pub keys: KeyArgs,
    /// A recipient to remove: jwe:PUBLIC_KEY_FILE (or its private key file), or id:KEY_ID as
    /// `inspect` shows it (repeat for several).
    #[arg(
        long = "recipient",
        visible_alias = "encryption-key",
        value_name = "RECIPIENT",
        required = true
    )]
    pub recipients: Vec<String>,
    /// Layers and platforms.
    #[command(flatten)]
    pub selection: SelectionArgs,
    /// The image.
    pub image: String,
    /// Where to write the result (default: IMAGE itself).
    pub dst: Option<String>,
}

/// Arguments of `recipients add|set`.
#[derive(Debug, Args)]
pub struct RecipientsArgs {
    /// Registry access.
    #[command(flatten)]
    pub transport: TransportArgs,
    /// Layers processed at once (default 4).
    #[arg(long, value_name = "N")]
    pub concurrency: Option<usize>,
    /// Private keys.
    #[command(flatten)]
    pub keys: KeyArgs,
    /// A recipient to add (add) or to have (set): jwe:FILE or provider:NAME[:PARAM].
    #[arg(
        long = "recipient",
        visible_alias = "encryption-key",
        value_name = "RECIPIENT",
        required = true
    )]
    pub recipients: Vec<String>,
    /// Layers and platforms.
    #[command(flatten)]
    pub selection: SelectionArgs,
    /// The image.
    pub image: String,
    /// Where to write the result (default: IMAGE itself).
    pub dst: Option<String>,
}

/// `inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Registry access.
    #[command(flatten)]
    pub transport: TransportArgs,
    /// The image.
    pub image: String,
}

/// `check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Registry access.
    #[command(flatten)]
    pub transport: TransportArgs,
    /// Private keys.
    #[command(flatten)]
    pub keys: KeyArgs,
    /// Only these platforms of a multi-arch image.
    #[arg(long = "platform", value_name = "OS/ARCH", value_delimiter = ',')]
    pub platforms: Vec<String>,
    /// The image.
    pub image: String,
}

/// `keygen`.
#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Key type: rsa-2048, rsa-3072, rsa-4096, ec-p256, ec-p384.
    #[arg(long, short = 't', default_value = "rsa-3072", value_name = "TYPE")]
    pub r#type: String,
    /// Where to write the public key (default: OUT with .pem replaced by .pub.pem).
    #[arg(long, value_name = "PATH")]
    pub public: Option<PathBuf>,
    /// Overwrite existing files.
    #[arg(long)]
    pub force: bool,
    /// The private key file to write.
    pub out: PathBuf,
}

/// `key-id`.
#[derive(Debug, Args)]
pub struct KeyIdArgs {
    /// Key files: public (PEM, DER, JWK, certificate) or unencrypted private keys.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

/// `kp wrap|unwrap` (Key Protect from IMGCRYPT_KEYPROTECT_CONFIG or KP_URL, KP_INSTANCE_ID, KP_APIKEY).
#[derive(Debug, Subcommand)]
pub enum KpCommand {
    /// Wrap a file (e.g. a private key PEM) with a root key; prints the ciphertext for a
    /// `kp-key` Secret (`stringData: {rootkeyid: ID, ciphertext: …}`).
    Wrap {
        /// The root key id (or alias).
        #[arg(long = "root-key", value_name = "ID")]
        root_key: String,
        /// The file to wrap (at most 64 KiB).
        file: PathBuf,
    },
    /// Unwrap a `kp-key` ciphertext back to the original bytes.
    Unwrap {
        /// The root key id (or alias).
        #[arg(long = "root-key", value_name = "ID")]
        root_key: String,
        /// Write the result to this file (mode 0600, atomically) instead of stdout.
        #[arg(long, short, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Overwrite --out if it exists.
        #[arg(long)]
        force: bool,
        /// The ciphertext (default: read from stdin).
        ciphertext: Option<String>,
    },
}

/// `demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Working directory (must be empty or missing; default: a new directory under the system's
    /// temporary directory, kept so you can rerun the printed commands).
    pub dir: Option<PathBuf>,
}

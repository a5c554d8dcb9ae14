//! The `imgcrypt-decoder` process: containerd's stream processor protocol around
//! [`ocicrypt_core::stream_processor`], which holds the payload types and the decrypt logic.
//!
//! This module is the process plumbing only: the command line ([`parse_args`]), the payload on
//! file descriptor 3 ([`read_payload_fd`]), the environment (`STREAM_PROCESSOR_MEDIATYPE`,
//! `OCICRYPT_KEYPROVIDER_CONFIG`), stdin and stdout, one line on stderr and the exit code
//! ([`main`]). The binary `imgcrypt-decoder` (`src/bin/imgcrypt-decoder.rs`) calls [`main`].

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use ocicrypt_core::stream_processor::{
    key_provider_unwrappers, read_payload, Decoder, DecoderError, DecoderOptions, Outcome, OutputMode,
    Payload, KEYPROVIDER_CONFIG_ENV, MEDIA_TYPE_ENV,
};

/// Where the payload file descriptor (fd 3) is opened from, without `unsafe`.
pub const PAYLOAD_FD_PATH: &str = "/proc/self/fd/3";

/// Why the decoder process failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProcessError {
    /// Bad command line.
    #[error(
        "{0} (usage: imgcrypt-decoder [--decryption-keys-path DIR] [--spool-dir DIR | --stream]; see --help)"
    )]
    Usage(String),
    /// The decoder failed.
    #[error(transparent)]
    Decoder(#[from] DecoderError),
}

impl ProcessError {
    /// The message as one line (what containerd shows the user).
    pub fn one_line(&self) -> String {
        match self {
            ProcessError::Usage(_) => self.to_string().split_whitespace().collect::<Vec<_>>().join(" "),
            ProcessError::Decoder(e) => e.one_line(),
        }
    }
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Decrypt stdin to stdout.
    Run(DecoderOptions),
    /// Print [`HELP`].
    Help,
    /// Print the version.
    Version,
}

/// `--help` text.
pub const HELP: &str = "\
imgcrypt-decoder: containerd stream processor that decrypts ocicrypt-encrypted image layers
(a drop-in for imgcrypt's ctd-decoder).

containerd runs it once per encrypted layer: the encrypted blob on stdin, the decrypted blob on
stdout, the layer descriptor and decrypt parameters as a protobuf Any on file descriptor 3.

Options:
  --decryption-keys-path DIR  also use the private keys and GPG secret keyrings in DIR (read
                              like the runtime reads its key directory: every file must be a
                              usable key, no symbolic links)
  --spool-dir DIR             scratch directory for the verified-before-release output
                              (default: $TMPDIR, else /var/tmp)
  --stream                    release output before the HMAC is verified, like Go's ctd-decoder
                              (no scratch space; a bad HMAC still exits non-zero, but all but
                              the last 10 KiB of unverified plaintext has reached containerd)
  -h, --help                  this help
  --version                   the version

Keys sent with the pull (payload parameters): privkeys(-passwords) for jwe and pkcs7 layers,
x509s (accepted, not needed), gpg-privatekeys(-passwords) for pgp layers.

Environment: STREAM_PROCESSOR_MEDIATYPE (set by containerd; required),
OCICRYPT_KEYPROVIDER_CONFIG (key providers).
See docs/runtime-integration.md.
";

/// The default spool directory: `$TMPDIR` when set, else `/var/tmp` (usually on disk, unlike
/// a tmpfs `/tmp` that would hold the layer in memory), else `/tmp`.
pub fn default_spool_dir() -> PathBuf {
    if let Some(t) = std::env::var_os("TMPDIR").filter(|t| !t.is_empty()) {
        return PathBuf::from(t);
    }
    if Path::new("/var/tmp").is_dir() {
        return PathBuf::from("/var/tmp");
    }
    std::env::temp_dir()
}

/// Parses the arguments (without the program name). Accepts Go's flag spellings:
/// `--flag VALUE`, `--flag=VALUE`, `-flag VALUE`.
///
/// # Errors
/// [`ProcessError::Usage`].
pub fn parse_args<I: IntoIterator<Item = OsString>>(args: I) -> Result<Command, ProcessError> {
    let mut keys_path = None;
    let mut spool_dir: Option<PathBuf> = None;
    let mut stream = false;
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let s = arg
            .to_str()
            .ok_or_else(|| ProcessError::Usage(format!("argument {arg:?} is not UTF-8")))?
            .to_owned();
        let (name, inline) = match s.split_once('=') {
            Some((n, v)) if n.starts_with('-') => (n.to_owned(), Some(PathBuf::from(v))),
            _ => (s.clone(), None),
        };
        let flag = name.trim_start_matches('-');
        if !name.starts_with('-') || flag.is_empty() {
            return Err(ProcessError::Usage(format!("unexpected argument {s:?}")));
        }
        let mut value = |inline: Option<PathBuf>| -> Result<PathBuf, ProcessError> {
            match inline {
                Some(v) => Ok(v),
                None => it
                    .next()
                    .map(PathBuf::from)
                    .ok_or_else(|| ProcessError::Usage(format!("{name} needs a value"))),
            }
        };
        match flag {
            "decryption-keys-path" => keys_path = Some(value(inline)?),
            "spool-dir" => spool_dir = Some(value(inline)?),
            "stream" if inline.is_none() => stream = true,
            "h" | "help" if inline.is_none() => return Ok(Command::Help),
            "version" if inline.is_none() => return Ok(Command::Version),
            _ => return Err(ProcessError::Usage(format!("unknown option {s:?}"))),
        }
    }
    if stream && spool_dir.is_some() {
        return Err(ProcessError::Usage(
            "--stream and --spool-dir exclude each other".into(),
        ));
    }
    let keys_path = keys_path.filter(|p| !p.as_os_str().is_empty());
    let output = if stream {
        OutputMode::Stream
    } else {
        OutputMode::Spool {
            dir: spool_dir.unwrap_or_else(default_spool_dir),
        }
    };
    Ok(Command::Run(DecoderOptions { keys_path, output }))
}

/// Reads the payload from file descriptor 3 (bounded by
/// [`ocicrypt_core::stream_processor::MAX_PAYLOAD_LEN`]).
///
/// # Errors
/// [`DecoderError::NoPayload`] when fd 3 is not open or empty,
/// [`DecoderError::MalformedPayload`] when it is too large.
pub fn read_payload_fd() -> Result<Vec<u8>, DecoderError> {
    let f = File::open(PAYLOAD_FD_PATH).map_err(|e| DecoderError::NoPayload {
        reason: if e.kind() == io::ErrorKind::NotFound {
            "it is not open".to_owned()
        } else {
            e.to_string()
        },
    })?;
    read_payload(f)
}

/// The whole `imgcrypt-decoder` process: arguments from the command line, payload from fd 3,
/// media type from the environment, stdin to stdout. Prints one line on stderr and returns a
/// failure exit code on any error.
pub fn main() -> std::process::ExitCode {
    use std::os::fd::AsFd as _;
    let fail = |e: &ProcessError| {
        let _ = writeln!(io::stderr(), "imgcrypt-decoder: {}", e.one_line());
        std::process::ExitCode::FAILURE
    };
    let options = match parse_args(std::env::args_os().skip(1)) {
        Ok(Command::Run(o)) => o,
        Ok(Command::Help) => {
            print!("{HELP}");
            return std::process::ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("imgcrypt-decoder {}", env!("CARGO_PKG_VERSION"));
            return std::process::ExitCode::SUCCESS;
        }
        Err(e) => return fail(&e),
    };
    // A raw descriptor: std's stdout is line-buffered, and the decoder does its own buffering.
    let result = run_process(&options, || {
        io::stdout().as_fd().try_clone_to_owned().map(File::from)
    });
    match result {
        Ok(_) => std::process::ExitCode::SUCCESS,
        Err(e) => fail(&ProcessError::Decoder(e)),
    }
}

/// What the decoder process does once its arguments are parsed, with the output opened by
/// `open_output` (stdout in the binary): payload from fd 3, media type from
/// [`MEDIA_TYPE_ENV`], key providers from [`KEYPROVIDER_CONFIG_ENV`], input from stdin.
///
/// The payload is read before any descriptor is opened or duplicated: when containerd passes
/// no payload, fd 3 is free and the next descriptor opened would take its number.
///
/// # Errors
/// Any [`DecoderError`].
pub fn run_process<W: Write + Send>(
    options: &DecoderOptions,
    open_output: impl FnOnce() -> io::Result<W>,
) -> Result<Outcome, DecoderError> {
    use std::os::fd::AsFd as _;
    let payload = Payload::from_any_bytes(&read_payload_fd()?)?;
    let env_media_type = std::env::var(MEDIA_TYPE_ENV).ok();
    let provider_config = std::env::var_os(KEYPROVIDER_CONFIG_ENV).map(PathBuf::from);
    let providers = key_provider_unwrappers(provider_config.as_deref(), &payload.decrypt_config)?;
    let stdin = io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map(File::from)
        .map_err(|source| DecoderError::Io {
            context: "stdin".into(),
            source,
        })?;
    let output = open_output().map_err(|source| DecoderError::Io {
        context: "stdout".into(),
        source,
    })?;
    Decoder::new(payload, env_media_type.as_deref(), options)?
        .with_unwrappers(providers)
        .decrypt(stdin, output)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args() {
        let os = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        let Command::Run(o) = parse_args(os(&["--decryption-keys-path", "/k"])).unwrap() else {
            panic!()
        };
        assert_eq!(o.keys_path.as_deref(), Some(Path::new("/k")));
        assert!(matches!(o.output, OutputMode::Spool { .. }));
        let Command::Run(o) = parse_args(os(&["-decryption-keys-path=/k", "--stream"])).unwrap() else {
            panic!()
        };
        assert_eq!(o.keys_path.as_deref(), Some(Path::new("/k")));
        assert_eq!(o.output, OutputMode::Stream);
        let Command::Run(o) = parse_args(os(&["--spool-dir", "/s"])).unwrap() else {
            panic!()
        };
        assert_eq!(o.output, OutputMode::Spool { dir: "/s".into() });
        assert_eq!(o.keys_path, None);
        assert_eq!(parse_args(os(&["--help"])).unwrap(), Command::Help);
        assert_eq!(parse_args(os(&["--version"])).unwrap(), Command::Version);
        for bad in [
            &["--nope"][..],
            &["x"],
            &["--decryption-keys-path"],
            &["--stream", "--spool-dir", "/s"],
            &["--stream=1"],
        ] {
            assert!(
                matches!(parse_args(os(bad)), Err(ProcessError::Usage(_))),
                "{bad:?}"
            );
        }
    }
}

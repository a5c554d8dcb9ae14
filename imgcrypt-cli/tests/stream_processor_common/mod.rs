//! Helpers shared by the stream processor tests: payloads for the committed Go-made vectors,
//! layers encrypted here, and a decoder child process that gets its payload on a real fd 3.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use ocicrypt_core::cipher::{LayerEncryptor, LayerKey, Nonce};
use ocicrypt_core::jwe::JweWrapper;
use ocicrypt_core::keys::PublicKey;
use ocicrypt_core::keywrap::wrap_options;
use ocicrypt_core::stream_processor::{DecoderError, DecoderOptions, Descriptor, OutputMode, Payload};
use ocicrypt_core::{AsyncKeyWrapper, PrivateLayerOptions, PublicLayerOptions};
use testkit::image::{manifest, read_blob};

pub fn vectors() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ocicrypt-core/tests/data/vectors")
}

pub fn vector_key(name: &str) -> PathBuf {
    vectors().join("keys").join(name)
}

/// The payload containerd would send for layer 0 of a vector layout, and the encrypted blob.
pub fn vector_layer(layout: &str) -> (Payload, Vec<u8>) {
    let dir = vectors().join("layouts").join(layout);
    let m = manifest(&dir, "v1");
    let l = &m["layers"][0];
    let descriptor: Descriptor = serde_json::from_value(l.clone()).expect("descriptor");
    let blob = read_blob(&dir, l["digest"].as_str().unwrap());
    (
        Payload {
            descriptor,
            ..Payload::default()
        },
        blob,
    )
}

/// The plaintext source blob of the vectors (tar+gzip).
pub fn vector_source_blob() -> Vec<u8> {
    let dir = vectors().join("layouts/src");
    let m = manifest(&dir, "v1");
    read_blob(&dir, m["layers"][0]["digest"].as_str().unwrap())
}

/// Layer key, nonce and annotations for a layer whose ciphertext has MAC `mac`.
pub fn annotations_for(
    key: &LayerKey,
    nonce: &Nonce,
    mac: &ocicrypt_core::cipher::MacTag,
    recipients: &[&Path],
) -> BTreeMap<String, String> {
    let pubs = recipients
        .iter()
        .map(|p| PublicKey::from_file(p).unwrap())
        .collect();
    let wrappers: Vec<Arc<dyn AsyncKeyWrapper>> = vec![Arc::new(JweWrapper::new(pubs).unwrap())];
    let private = PrivateLayerOptions::new(key, nonce, "");
    let public = PublicLayerOptions::new(mac);
    futures::executor::block_on(wrap_options(&private, &public, &wrappers)).unwrap()
}

/// Encrypts `plaintext` for `recipients` (JWE public key files) as a layer of `media_type`.
pub fn encrypt_layer(plaintext: &[u8], media_type: &str, recipients: &[&Path]) -> (Payload, Vec<u8>) {
    let key = LayerKey::generate();
    let nonce = Nonce::generate();
    let mut ct = plaintext.to_vec();
    let mut enc = LayerEncryptor::new(&key, &nonce);
    enc.update(&mut ct);
    let mac = enc.finish();
    let annotations = annotations_for(&key, &nonce, &mac, recipients);
    let descriptor = Descriptor {
        media_type: media_type.to_owned(),
        digest: testkit::image::sha256(&ct),
        size: ct.len() as i64,
        annotations,
    };
    (
        Payload {
            descriptor,
            ..Payload::default()
        },
        ct,
    )
}

pub fn options(keys_path: Option<&Path>, output: OutputMode) -> DecoderOptions {
    DecoderOptions {
        keys_path: keys_path.map(Path::to_owned),
        output,
    }
}

pub fn spool(dir: &Path) -> OutputMode {
    OutputMode::Spool { dir: dir.to_owned() }
}

/// Runs the decoder library over in-memory input; returns what reached "stdout" and the result.
pub fn decode(
    payload: &Payload,
    opts: &DecoderOptions,
    input: &[u8],
) -> (Vec<u8>, Result<u64, DecoderError>) {
    let mut out = Vec::new();
    let r = ocicrypt_core::stream_processor::run(
        opts,
        Some(&payload.descriptor.media_type),
        &payload.to_any_bytes(),
        Vec::new(),
        input,
        &mut out,
    )
    .map(|o| o.bytes);
    (out, r)
}

/// A key directory (0700) holding copies of `files` as `(name, bytes)`.
pub fn key_dir(files: &[(&str, Vec<u8>)]) -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt as _;
    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    for (name, bytes) in files {
        let p = d.path().join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, bytes).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    d
}

/// The environment variable that turns the `decoder_child` test into a decoder process.
pub const CHILD_ENV: &str = "STREAM_PROCESSOR_TEST_CHILD";

/// Starts this test binary's `decoder_child` test as a decoder process, the way containerd
/// starts a stream processor: `args`, payload on fd 3 (from `payload_file`, or fd 3 closed when
/// `None`), `STREAM_PROCESSOR_MEDIATYPE`, stdin piped. The decrypted output arrives on the
/// child's stdout; libtest's own chatter is sent to stderr.
pub fn spawn_child(args: &[&str], payload_file: Option<&Path>, media_type: &str) -> std::process::Child {
    spawn_child_env(args, payload_file, media_type, &[])
}

/// As [`spawn_child`], with extra environment variables.
pub fn spawn_child_env(
    args: &[&str],
    payload_file: Option<&Path>,
    media_type: &str,
    envs: &[(&str, &str)],
) -> std::process::Child {
    let exe = std::env::current_exe().unwrap();
    let redirect = match payload_file {
        Some(_) => "3<\"$PAYLOAD_FILE\"",
        None => "3<&-",
    };
    let script = format!(
        "exec \"$0\" --exact decoder_child --ignored --nocapture --test-threads=1 {redirect} 4>&1 1>&2"
    );
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(script)
        .arg(exe)
        .env(CHILD_ENV, args.join("\u{1f}"))
        .env("STREAM_PROCESSOR_MEDIATYPE", media_type)
        .env_remove("OCICRYPT_KEYPROVIDER_CONFIG")
        .envs(envs.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(p) = payload_file {
        cmd.env("PAYLOAD_FILE", p);
    }
    cmd.spawn().expect("spawn decoder child")
}

/// The body of the `decoder_child` test: what `imgcrypt-decoder`'s `main` does, with stdout
/// on fd 4 (libtest owns fd 1). Reports its peak RSS on stderr as `VMHWM_KB=<n>` and exits.
pub fn child_main() {
    let Ok(args) = std::env::var(CHILD_ENV) else {
        return;
    };
    use imgcrypt_cli::decoder as sp;
    let args = args
        .split('\u{1f}')
        .filter(|a| !a.is_empty())
        .map(std::ffi::OsString::from);
    let code = match sp::parse_args(args) {
        Ok(sp::Command::Run(opts)) => {
            eprintln!("VMRSS_BEFORE_KB={}", status_kb("VmRSS:"));
            let fd4 = || std::fs::OpenOptions::new().write(true).open("/proc/self/fd/4");
            match sp::run_process(&opts, fd4) {
                Ok(_) => 0,
                Err(e) => {
                    eprintln!("imgcrypt-decoder: {}", e.one_line());
                    1
                }
            }
        }
        other => {
            eprintln!("unexpected command line: {other:?}");
            2
        }
    };
    eprintln!("VMHWM_KB={}", status_kb("VmHWM:"));
    std::process::exit(code);
}

/// A `kB` field of /proc/self/status (`VmRSS:`, `VmHWM:` = peak resident set).
pub fn status_kb(field: &str) -> u64 {
    let mut s = String::new();
    std::fs::File::open("/proc/self/status")
        .unwrap()
        .read_to_string(&mut s)
        .unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/self/status"))
}

/// The `imgcrypt-decoder:` line of a child's stderr.
pub fn decoder_line(stderr: &str) -> String {
    // libtest's "test decoder_child ... " may precede it on the same line.
    stderr
        .lines()
        .find_map(|l| l.find("imgcrypt-decoder: ").map(|i| l[i..].to_owned()))
        .unwrap_or_else(|| panic!("no decoder message in: {stderr}"))
}

fn child_report(stderr: &str, tag: &str) -> u64 {
    stderr
        .lines()
        .find_map(|l| l.find(tag).map(|i| &l[i + tag.len()..]))
        .unwrap_or_else(|| panic!("no {tag} in: {stderr}"))
        .trim()
        .parse()
        .unwrap()
}

/// The child's peak resident set (KiB).
pub fn child_hwm(stderr: &str) -> u64 {
    child_report(stderr, "VMHWM_KB=")
}

/// The child's resident set just before it started decoding (KiB).
pub fn child_rss_before(stderr: &str) -> u64 {
    child_report(stderr, "VMRSS_BEFORE_KB=")
}

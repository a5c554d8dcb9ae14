//! The decoder under hostile payloads (issue 16, items 10-13): annotations built to burn CPU,
//! parameters built to make the deserializer echo secrets, a key directory rotated under the
//! reader, and unauthenticated inputs that must not override authenticated ones.
//!
//! Written against main 9ffdef0; every test here fails there.

mod stream_processor_common;

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use base64::Engine as _;
use ocicrypt_core::stream_processor::{DecoderError, OutputMode, Payload, PAYLOAD_TYPE_URL};
use stream_processor_common::*;

const TAR_ENC: &str = "application/vnd.oci.image.layer.v1.tar+encrypted";
const KEYS_JWE: &str = "org.opencontainers.image.enc.keys.jwe";
const PUBOPTS: &str = "org.opencontainers.image.enc.pubopts";

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

fn b64url(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// A small layer encrypted for the vector RSA key, and a key directory holding that key.
fn layer() -> (Payload, Vec<u8>, Vec<u8>, tempfile::TempDir) {
    let plaintext: Vec<u8> = (0..4096u32).flat_map(|i| i.to_le_bytes()).collect();
    let (payload, ct) = encrypt_layer(&plaintext, TAR_ENC, &[&vector_key("rsa.pub.pem")]);
    let dir = key_dir(&[("rsa.pem", read(&vector_key("rsa.pem")))]);
    (payload, ct, plaintext, dir)
}

/// A general-JSON JWE with `n` RSA-OAEP recipients whose encrypted keys are random, and a
/// protected header of about `protected_len` bytes.
fn jwe_with_recipients(n: usize, protected_len: usize) -> String {
    let mut protected = String::from("{\"enc\":\"A256GCM\"");
    let mut i = 0;
    while protected.len() < protected_len {
        protected.push_str(&format!(",\"m{i}\":{i}"));
        i += 1;
    }
    protected.push('}');
    let mut ek = [0u8; 256];
    let mut recipients = Vec::with_capacity(n);
    for i in 0..n {
        ek[..8].copy_from_slice(&(i as u64).to_le_bytes());
        recipients.push(format!(
            "{{\"header\":{{\"alg\":\"RSA-OAEP\"}},\"encrypted_key\":\"{}\"}}",
            b64url(&ek)
        ));
    }
    format!(
        "{{\"protected\":\"{}\",\"recipients\":[{}],\"iv\":\"{}\",\"ciphertext\":\"{}\",\"tag\":\"{}\"}}",
        b64url(protected.as_bytes()),
        recipients.join(","),
        b64url(&[1; 12]),
        b64url(&[2; 40]),
        b64url(&[3; 16]),
    )
}

fn decode_with(payload: &Payload, dir: &Path, input: &[u8]) -> (Vec<u8>, Result<u64, DecoderError>) {
    let scratch = tempfile::tempdir().unwrap();
    decode(payload, &options(Some(dir), spool(scratch.path())), input)
}

// ---------------------------------------------------------------------------------------------
// Item 10: costs bounded by design

/// A JWE with more recipients than any real image has is refused before any private-key
/// operation (the release binary spent ~16 minutes on 540,000 of them).
#[test]
fn item10_too_many_recipients_in_one_jwe_are_refused() {
    let (mut payload, ct, _, dir) = layer();
    let jwe = jwe_with_recipients(2_000, 0);
    payload
        .descriptor
        .annotations
        .insert(KEYS_JWE.into(), b64(jwe.as_bytes()));
    let t = std::time::Instant::now();
    let (out, r) = decode_with(&payload, dir.path(), &ct);
    let msg = r.unwrap_err().one_line();
    assert!(out.is_empty());
    assert!(msg.contains("recipients") && msg.contains("limit"), "{msg}");
    assert!(msg.len() < 1000, "{} bytes: {msg}", msg.len());
    // Not a timed assertion of speed, only of "not hours": refusing is immediate.
    assert!(t.elapsed().as_secs() < 60);
}

/// A protected header larger than the limit is refused (it was copied once per recipient).
#[test]
fn item10_oversized_protected_header_is_refused() {
    let (mut payload, ct, _, dir) = layer();
    let jwe = jwe_with_recipients(2, 100_000);
    payload
        .descriptor
        .annotations
        .insert(KEYS_JWE.into(), b64(jwe.as_bytes()));
    let (_, r) = decode_with(&payload, dir.path(), &ct);
    let msg = r.unwrap_err().one_line();
    assert!(msg.contains("protected header") && msg.contains("limit"), "{msg}");
}

/// 40,000 comma entries, each failing differently, give one short line with a count, not a
/// 2.8 MB one.
#[test]
fn item10_many_comma_entries_give_one_short_line() {
    let (mut payload, ct, _, dir) = layer();
    let good = payload.descriptor.annotations[KEYS_JWE].clone();
    // Distinct failures: base64 errors at distinct offsets.
    let entries: Vec<String> = (0..40_000).map(|i| format!("{}!", "A".repeat(i % 997))).collect();
    payload
        .descriptor
        .annotations
        .insert(KEYS_JWE.into(), format!("{},{good}", entries.join(",")));
    let (out, r) = decode_with(&payload, dir.path(), &ct);
    let msg = r.unwrap_err().one_line();
    assert!(out.is_empty());
    assert!(
        msg.len() < 1000,
        "{} bytes: {}",
        msg.len(),
        &msg[..1000.min(msg.len())]
    );
    assert!(msg.contains("entries") && msg.contains("limit"), "{msg}");

    // Below the limit, distinct failures are aggregated with counts, still one short line.
    let n = 60;
    let entries: Vec<String> = (0..n).map(|i| format!("{}!", "A".repeat(i))).collect();
    payload
        .descriptor
        .annotations
        .insert(KEYS_JWE.into(), entries.join(","));
    let (_, r) = decode_with(&payload, dir.path(), &ct);
    let msg = r.unwrap_err().one_line();
    assert!(msg.len() < 600, "{} bytes: {msg}", msg.len());
    assert!(msg.contains(&format!("{n} entries")), "{msg}");
}

// ---------------------------------------------------------------------------------------------
// Item 11: no secret in a message

fn payload_json(payload: &Payload, params: &str) -> Vec<u8> {
    let descriptor = serde_json::to_string(&payload.descriptor).unwrap();
    let json = format!("{{\"DecryptConfig\":{{\"Parameters\":{params}}},\"Descriptor\":{descriptor}}}");
    ocicrypt_core::stream_processor::encode_any(PAYLOAD_TYPE_URL, json.as_bytes())
}

fn run_bytes(payload_bytes: &[u8], media_type: &str, input: &[u8]) -> (Vec<u8>, Result<u64, DecoderError>) {
    let scratch = tempfile::tempdir().unwrap();
    let mut out = Vec::new();
    let r = ocicrypt_core::stream_processor::run(
        &options(None, spool(scratch.path())),
        Some(media_type),
        payload_bytes,
        Vec::new(),
        input,
        &mut out,
    )
    .map(|o| o.bytes);
    (out, r)
}

#[test]
fn item11_wrong_typed_parameters_are_not_echoed() {
    let (payload, ct, _, _dir) = layer();
    let key_b64 = b64(&read(&vector_key("rsa.pem")));
    let secrets = [key_b64.as_str(), "S3cretPassw0rd"];
    for params in [
        // A string where a list of base64 strings belongs.
        format!("{{\"privkeys\":\"{key_b64}\"}}"),
        format!("{{\"privkeys\":[\"{key_b64}\"],\"privkeys-passwords\":\"S3cretPassw0rd\"}}"),
        // A list of numbers or objects.
        format!("{{\"privkeys\":[{{\"k\":\"{key_b64}\"}}]}}"),
        "{\"privkeys-passwords\":[[\"S3cretPassw0rd\"]]}".to_owned(),
        // Parameters itself of the wrong type.
        format!("\"{key_b64}\""),
    ] {
        let (out, r) = run_bytes(&payload_json(&payload, &params), TAR_ENC, &ct);
        assert!(out.is_empty());
        let msg = r.unwrap_err().one_line();
        for s in secrets {
            for w in s.as_bytes().windows(8) {
                let w = std::str::from_utf8(w).unwrap();
                assert!(!msg.contains(w), "{w:?} of a secret in: {msg}");
            }
        }
    }
    // DecryptConfig itself of the wrong type.
    let descriptor = serde_json::to_string(&payload.descriptor).unwrap();
    let json = format!("{{\"DecryptConfig\":\"S3cretPassw0rd\",\"Descriptor\":{descriptor}}}");
    let bytes = ocicrypt_core::stream_processor::encode_any(PAYLOAD_TYPE_URL, json.as_bytes());
    let msg = run_bytes(&bytes, TAR_ENC, &ct).1.unwrap_err().one_line();
    assert!(!msg.contains("S3cret"), "{msg}");
    assert!(msg.contains("DecryptConfig"), "{msg}");
}

#[test]
fn item11_non_base64_password_reveals_no_character_or_offset() {
    let (payload, ct, _, _dir) = layer();
    let key_b64 = b64(&read(&vector_key("rsa.enc.pem")));
    let params = format!("{{\"privkeys\":[\"{key_b64}\"],\"privkeys-passwords\":[\"hunter#2x\"]}}");
    let (_, r) = run_bytes(&payload_json(&payload, &params), TAR_ENC, &ct);
    let msg = r.unwrap_err().one_line();
    assert!(
        msg.contains("privkeys-passwords") && msg.contains("base64"),
        "{msg}"
    );
    assert!(
        !msg.contains('#') && !msg.contains("35") && !msg.contains("offset 4"),
        "{msg}"
    );
    assert!(!msg.contains("hunter"), "{msg}");
}

/// A PEM whose label is key material is not quoted, whether it comes from the key directory
/// or from the payload.
#[test]
fn item11_pem_labels_of_key_files_and_payload_keys_are_not_quoted() {
    let (mut payload, ct, _, _dir) = layer();
    let secret_label = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQ";
    let pem = format!("-----BEGIN {secret_label}-----\nAAAA\n-----END {secret_label}-----\n");
    let dir = key_dir(&[("odd.pem", pem.clone().into_bytes())]);
    let (_, r) = decode_with(&payload, dir.path(), &ct);
    let msg = r.unwrap_err().one_line();
    assert!(msg.contains("odd.pem"), "{msg}");
    assert!(!msg.contains(&secret_label[..16]), "{msg}");

    payload
        .decrypt_config
        .parameters
        .insert("privkeys".into(), vec![pem.into_bytes()]);
    let empty = key_dir(&[]);
    let (_, r) = decode_with(&payload, empty.path(), &ct);
    let msg = r.unwrap_err().one_line();
    assert!(msg.contains("privkeys[0]"), "{msg}");
    assert!(!msg.contains(&secret_label[..16]), "{msg}");
}

// ---------------------------------------------------------------------------------------------
// Item 12: key directory races

/// Installs `bytes` under `dir/name` the way keysync-agent does: the complete file appears
/// under a hidden temporary name (keysync-agent links an `O_TMPFILE`; here it is written in
/// `staging`, on the same file system, and renamed in), then is renamed over `name`.
fn rotate(staging: &Path, dir: &Path, name: &str, bytes: &[u8], i: usize) {
    let staged = staging.join(format!("{i}"));
    std::fs::write(&staged, bytes).unwrap();
    let tmp = dir.join(format!(".keysync-tmp-{i:016x}"));
    std::fs::rename(&staged, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

/// keysync-agent replaces a key by renaming a complete temporary file over it. A decoder
/// reading the directory meanwhile must always find the keys: an entry that vanishes between
/// the listing and the open (the temporary name) is absent, not "the directory does not
/// exist", and a replaced inode is not a symbolic link.
#[test]
fn item12_key_rotated_by_rename_while_the_decoder_reads() {
    const ROTATIONS: usize = 3000;
    let (payload, ct, plaintext, dir) = layer();
    let staging = tempfile::tempdir_in(dir.path().parent().unwrap()).unwrap();
    let key = read(&vector_key("rsa.pem"));
    let sub = dir.path().join("secret");
    std::fs::create_dir(&sub).unwrap();
    std::fs::write(sub.join("ec.pem"), read(&vector_key("ec.p8.pem"))).unwrap();
    std::fs::write(sub.join("rsa2.pem"), &key).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (root, sub, staging, stop) = (
            dir.path().to_owned(),
            sub.clone(),
            staging.path().to_owned(),
            stop.clone(),
        );
        std::thread::spawn(move || {
            for i in 0..ROTATIONS {
                rotate(&staging, &root, "rsa.pem", &key, 2 * i);
                rotate(&staging, &sub, "rsa2.pem", &key, 2 * i + 1);
            }
            stop.store(true, Ordering::SeqCst);
        })
    };
    let mut reads = 0usize;
    let mut failures = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        reads += 1;
        match ocicrypt_core::stream_processor::KeySet::gather(&Default::default(), Some(dir.path())) {
            // rsa.pem, secret/ec.pem, secret/rsa2.pem, and possibly a temporary name caught
            // between its two renames.
            Ok(set) if set.keys.len() >= 3 => {}
            Ok(set) => failures.push(format!(
                "{} keys: {:?}",
                set.keys.len(),
                set.keys
                    .iter()
                    .map(|k| k.source_name().to_owned())
                    .collect::<Vec<_>>()
            )),
            Err(e) => failures.push(e.one_line()),
        }
    }
    writer.join().unwrap();
    eprintln!(
        "{reads} reads during {ROTATIONS} rotations, {} failures",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {reads} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    // And the layer decrypts with the rotated key.
    let (out, r) = decode_with(&payload, dir.path(), &ct);
    r.unwrap();
    assert!(out == plaintext);
}

/// A FIFO swapped in under a key's name is never opened in a way that blocks: every read of
/// the directory finishes (with an error naming the FIFO, or with the key); it does not hang.
/// Before, the name was checked, then opened: a FIFO renamed in between blocked the open forever.
#[test]
fn item12_fifo_swapped_in_does_not_hang() {
    const SWAPS: usize = 1000;
    let (_, _, _, dir) = layer();
    let staging = tempfile::tempdir_in(dir.path().parent().unwrap()).unwrap();
    let root = dir.path().to_owned();
    let key = read(&vector_key("rsa.pem"));
    // Everything staged first, so that the swaps are bare renames.
    let fifos: Vec<_> = (0..SWAPS)
        .map(|i| staging.path().join(format!("fifo-{i}")))
        .collect();
    assert!(std::process::Command::new("mkfifo")
        .args(&fifos)
        .status()
        .unwrap()
        .success());
    let files: Vec<_> = (0..SWAPS)
        .map(|i| {
            let p = staging.path().join(format!("key-{i}"));
            std::fs::write(&p, &key).unwrap();
            p
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (root, stop) = (root.clone(), stop.clone());
        std::thread::spawn(move || {
            for (fifo, file) in fifos.iter().zip(&files) {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                std::fs::rename(fifo, root.join("rsa.pem")).unwrap();
                std::fs::rename(file, root.join("rsa.pem")).unwrap();
                // Mostly a regular file, a FIFO for an instant: the window of the old race.
                for _ in 0..2000 {
                    std::hint::spin_loop();
                }
            }
            stop.store(true, Ordering::SeqCst);
        })
    };
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let (root, stop) = (root.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut reads, mut errors) = (0usize, 0usize);
            while !stop.load(Ordering::SeqCst) {
                reads += 1;
                if ocicrypt_core::keys::read_key_dir(&root).is_err() {
                    errors += 1;
                }
            }
            let _ = tx.send((reads, errors));
        });
    }
    match rx.recv_timeout(std::time::Duration::from_secs(120)) {
        Ok((reads, errors)) => eprintln!("{reads} reads, {errors} refused the FIFO"),
        Err(_) => {
            stop.store(true, Ordering::SeqCst);
            // Unblock the stuck reader: opening the FIFO for writing completes its open.
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(0o4000)
                .open(root.join("rsa.pem"));
            panic!("the key directory reader hung on a FIFO");
        }
    }
    writer.join().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Item 13: unauthenticated inputs never override authenticated ones

/// A nonce in the public options (not covered by the MAC) that differs from the private one is
/// an error; before, it took precedence and the layer decrypted to garbage with exit 0.
#[test]
fn item13_public_nonce_cannot_override_the_private_one() {
    let (mut payload, ct, plaintext, dir) = layer();
    let pubopts = payload.descriptor.annotations[PUBOPTS].clone();
    let mut public: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(&pubopts)
            .unwrap(),
    )
    .unwrap();
    public["cipheroptions"]["nonce"] = serde_json::Value::String(b64(&[7u8; 16]));
    payload
        .descriptor
        .annotations
        .insert(PUBOPTS.into(), b64(&serde_json::to_vec(&public).unwrap()));
    for mode in [OutputMode::Stream, spool(dir.path())] {
        let (out, r) = decode(&payload, &options(Some(dir.path()), mode), &ct);
        let msg = r.unwrap_err().one_line();
        assert!(msg.contains("nonce"), "{msg}");
        assert!(out.is_empty());
    }
    // The same nonce in both places is accepted.
    let _ = plaintext;
}

/// A counting reader: how much of stdin the decoder consumed.
struct Counting<R> {
    inner: R,
    read: Arc<std::sync::atomic::AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n as u64, Ordering::SeqCst);
        Ok(n)
    }
}

fn run_reader<R: Read>(
    payload: &Payload,
    media_type: Option<&str>,
    input: R,
) -> (Vec<u8>, Result<u64, DecoderError>) {
    let scratch = tempfile::tempdir().unwrap();
    let dir = key_dir(&[("rsa.pem", read(&vector_key("rsa.pem")))]);
    let mut out = Vec::new();
    let r = ocicrypt_core::stream_processor::run(
        &options(Some(dir.path()), spool(scratch.path())),
        media_type,
        &payload.to_any_bytes(),
        Vec::new(),
        input,
        &mut out,
    )
    .map(|o| o.bytes);
    (out, r)
}

/// The decoder reads at most the descriptor's size from stdin (an endless stdin used to be
/// spooled until the disk filled up), and checks the descriptor's digest.
#[test]
fn item13_stdin_is_bounded_by_the_descriptor_and_checked_against_its_digest() {
    let (payload, ct, plaintext, _dir) = layer();
    // A stdin that goes on after the blob (8 MiB here; endless would fill the disk of an
    // unfixed decoder): only the blob is read.
    let read_count = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let endless = Counting {
        inner: ct.as_slice().chain(std::io::repeat(0).take(8 << 20)),
        read: read_count.clone(),
    };
    let (out, r) = run_reader(&payload, Some(TAR_ENC), endless);
    assert_eq!(r.unwrap(), plaintext.len() as u64);
    assert!(out == plaintext);
    assert!(read_count.load(Ordering::SeqCst) <= ct.len() as u64 + 1);

    // A stdin shorter than the descriptor's size is an error naming both sizes.
    let (out, r) = run_reader(&payload, Some(TAR_ENC), &ct[..ct.len() - 10]);
    let msg = r.unwrap_err().one_line();
    assert!(out.is_empty());
    assert!(msg.contains(&ct.len().to_string()), "{msg}");

    // A digest that does not match the bytes read is an error, and nothing is released
    // (the MAC alone would have passed: the blob is intact, the descriptor lies).
    let mut lying = payload;
    lying.descriptor.digest = format!("sha256:{}", "ab".repeat(32));
    let (out, r) = run_reader(&lying, Some(TAR_ENC), &ct[..]);
    let msg = r.unwrap_err().one_line();
    assert!(out.is_empty());
    assert!(msg.contains("digest"), "{msg}");
}

/// `STREAM_PROCESSOR_MEDIATYPE` is required: containerd always sets it, and the payload's
/// descriptor must match it.
#[test]
fn item13_media_type_variable_is_required() {
    let (payload, ct, _, _dir) = layer();
    for env in [None, Some("")] {
        let (out, r) = run_reader(&payload, env, &ct[..]);
        let msg = r.unwrap_err().one_line();
        assert!(out.is_empty());
        assert!(msg.contains("STREAM_PROCESSOR_MEDIATYPE"), "{msg}");
    }
}

/// The decoder half of "no secret on stderr": the real `imgcrypt-decoder` binary, payload on a
/// real fd 3, fed wrong-typed parameters, malformed keys and wrong passwords. Its stderr is one
/// line and holds no piece of a key body or password.
#[test]
fn item11_decoder_binary_stderr_carries_no_secret() {
    let (payload, ct, _, dir) = layer();
    let key_pem = String::from_utf8(read(&vector_key("rsa.pem"))).unwrap();
    let enc_pem = read(&vector_key("rsa.enc.pem"));
    let body: String = key_pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let secret_label = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQ";
    let odd = format!("-----BEGIN {secret_label}-----\nAAAA\n-----END {secret_label}-----\n");
    let password = "S3cretPassw0rd";
    let cases = [
        format!("{{\"privkeys\":\"{}\"}}", b64(key_pem.as_bytes())),
        format!(
            "{{\"privkeys\":[\"{}\"],\"privkeys-passwords\":\"{password}\"}}",
            b64(&enc_pem)
        ),
        format!(
            "{{\"privkeys\":[\"{}\"],\"privkeys-passwords\":[\"{}\"]}}",
            b64(&enc_pem),
            b64(password.as_bytes())
        ),
        format!(
            "{{\"privkeys\":[\"{}\"],\"privkeys-passwords\":[\"{password}!\"]}}",
            b64(&enc_pem)
        ),
        format!("{{\"privkeys\":[\"{}\"]}}", b64(odd.as_bytes())),
        format!(
            "{{\"privkeys\":[\"{}\"]}}",
            b64(&key_pem.as_bytes()[..key_pem.len() / 2])
        ),
    ];
    let secrets = [body.as_str(), password, secret_label];
    let tmp = tempfile::tempdir().unwrap();
    for (i, params) in cases.iter().enumerate() {
        let pfile = tmp.path().join(format!("payload-{i}"));
        std::fs::write(&pfile, payload_json(&payload, params)).unwrap();
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg("exec \"$0\" --decryption-keys-path \"$1\" 3<\"$2\"")
            .arg(env!("CARGO_BIN_EXE_imgcrypt-decoder"))
            .arg(dir.path())
            .arg(&pfile)
            .env("STREAM_PROCESSOR_MEDIATYPE", TAR_ENC)
            .env_remove("OCICRYPT_KEYPROVIDER_CONFIG")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let data = ct.clone();
        let feeder = std::thread::spawn(move || {
            let _ = std::io::Write::write_all(&mut stdin, &data);
        });
        let out = child.wait_with_output().unwrap();
        feeder.join().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "case {i}: {err}");
        assert!(out.stdout.is_empty(), "case {i}");
        assert_eq!(err.lines().count(), 1, "case {i}: {err}");
        assert!(err.starts_with("imgcrypt-decoder: "), "case {i}: {err}");
        for s in secrets {
            for w in s.as_bytes().windows(10) {
                let w = std::str::from_utf8(w).unwrap();
                assert!(!err.contains(w), "case {i}: {w:?} of a secret in: {err}");
            }
        }
    }
}

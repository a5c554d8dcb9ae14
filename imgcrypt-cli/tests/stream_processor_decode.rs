//! The containerd stream processor (`imgcrypt-decoder`'s logic): Go-made vectors decrypted,
//! every failure the issue lists, and the process contract (payload on a real fd 3).

mod stream_processor_common;

use std::io::{Read, Write};
use std::process::Command;

use ocicrypt_core::stream_processor::{
    read_payload, DecoderError, OutputMode, Payload, PAYLOAD_TYPE_URL, STREAM_HOLD_BACK,
};
use stream_processor_common::*;
use testkit::image::sha256;
use testkit::tools::{have_tool, openssl_keypair};

const GZIP_ENC: &str = "application/vnd.oci.image.layer.v1.tar+gzip+encrypted";
const TAR_ENC: &str = "application/vnd.oci.image.layer.v1.tar+encrypted";

fn read(path: &std::path::Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// The child entry of the process tests (see `spawn_child`); a no-op unless started by them.
#[test]
#[ignore = "decoder child process entry; run by the process tests"]
fn decoder_child() {
    child_main();
}

#[test]
fn go_made_gzip_layer_decrypts_with_a_key_from_the_directory_or_the_payload() {
    let scratch = tempfile::tempdir().unwrap();
    let (payload, blob) = vector_layer("enc-jwe");
    let source = vector_source_blob();

    // RSA key (PKCS#1 PEM) in the key directory.
    let dir = key_dir(&[("rsa.pem", read(&vector_key("rsa.pem")))]);
    let (out, r) = decode(&payload, &options(Some(dir.path()), spool(scratch.path())), &blob);
    assert_eq!(r.unwrap(), source.len() as u64);
    assert!(out == source, "decrypted blob is the Go source blob");

    // EC key passed in the payload (ctr-enc --key), no key directory.
    let mut with_key = vector_layer("enc-jwe").0;
    with_key
        .decrypt_config
        .parameters
        .insert("privkeys".into(), vec![read(&vector_key("ec.p8.pem"))]);
    let (out, r) = decode(&with_key, &options(None, OutputMode::Stream), &blob);
    r.unwrap();
    assert!(out == source);

    // Password-protected key in the payload with its password.
    let mut with_pw = vector_layer("enc-jwe").0;
    let p = &mut with_pw.decrypt_config.parameters;
    p.insert("privkeys".into(), vec![read(&vector_key("rsa.enc.pem"))]);
    p.insert("privkeys-passwords".into(), vec![b"1234".to_vec()]);
    let (out, r) = decode(&with_pw, &options(None, spool(scratch.path())), &blob);
    r.unwrap();
    assert!(out == source);

    // Without the password: the error names the payload key.
    with_pw.decrypt_config.parameters.remove("privkeys-passwords");
    let (_, r) = decode(&with_pw, &options(None, spool(scratch.path())), &blob);
    let e = r.unwrap_err();
    assert!(matches!(e, DecoderError::PayloadKey { index: 0, .. }), "{e}");
    assert!(
        e.one_line().contains("privkeys[0]") && e.one_line().contains("password"),
        "{}",
        e.one_line()
    );
}

#[test]
fn zstd_layer_decrypts_to_the_zstd_blob() {
    let scratch = tempfile::tempdir().unwrap();
    let (payload, blob) = vector_layer("enc-zstd");
    assert_eq!(
        payload.descriptor.media_type,
        "application/vnd.oci.image.layer.v1.tar+zstd+encrypted"
    );
    let dir = key_dir(&[("k/rsa.pem", read(&vector_key("rsa.pem")))]);
    let (out, r) = decode(&payload, &options(Some(dir.path()), spool(scratch.path())), &blob);
    r.unwrap();
    assert_eq!(&out[..4], &[0x28, 0xb5, 0x2f, 0xfd], "zstd frame magic");
    // Same tar inside as the gzip source (decompressed with the real tools).
    if have_tool("zstd") && have_tool("gzip") {
        let unz = pipe_through(&["zstd", "-dc"], &out);
        let ungz = pipe_through(&["gzip", "-dc"], &vector_source_blob());
        assert_eq!(sha256(&unz), sha256(&ungz));
    }
}

fn pipe_through(cmd: &[&str], input: &[u8]) -> Vec<u8> {
    let mut child = Command::new(cmd[0])
        .args(&cmd[1..])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = input.to_vec();
    let w = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().unwrap();
    w.join().unwrap().unwrap();
    assert!(out.status.success(), "{cmd:?} failed");
    out.stdout
}

#[test]
fn missing_or_garbled_payload() {
    // Nothing on fd 3.
    let e = read_payload(&b""[..]).unwrap_err();
    assert!(matches!(e, DecoderError::NoPayload { .. }));
    assert!(
        e.to_string()
            .contains("io.containerd.ocicrypt.decoder.v1.tar.gzip"),
        "{e}"
    );

    let scratch = tempfile::tempdir().unwrap();
    let opts = options(None, spool(scratch.path()));
    let run = |bytes: &[u8]| {
        let mut out = Vec::new();
        let r = ocicrypt_core::stream_processor::run(
            &opts,
            Some(GZIP_ENC),
            bytes,
            Vec::new(),
            &b"x"[..],
            &mut out,
        );
        assert!(out.is_empty());
        r.unwrap_err()
    };
    // Not protobuf.
    let e = run(b"\xff\xff\xff");
    assert!(matches!(e, DecoderError::MalformedPayload { .. }), "{e}");
    // Truncated Any.
    let mut good = vector_layer("enc-jwe").0.to_any_bytes();
    good.truncate(good.len() / 2);
    assert!(matches!(run(&good), DecoderError::MalformedPayload { .. }));
    // Another type.
    let e = run(&ocicrypt_core::stream_processor::encode_any(
        "io.containerd.other.v1.Thing",
        b"{}",
    ));
    assert!(matches!(e, DecoderError::WrongPayloadType { .. }), "{e}");
    // Right type, bad JSON.
    let e = run(&ocicrypt_core::stream_processor::encode_any(
        PAYLOAD_TYPE_URL,
        b"{\"Descriptor\": 5}",
    ));
    assert!(matches!(e, DecoderError::PayloadJson { .. }), "{e}");
    // Right type, no descriptor: not encrypted.
    let e = run(&ocicrypt_core::stream_processor::encode_any(
        PAYLOAD_TYPE_URL,
        b"{}",
    ));
    assert!(matches!(e, DecoderError::NotEncrypted { .. }), "{e}");
    // Encrypted type but no ocicrypt annotations.
    let mut p = vector_layer("enc-jwe").0;
    p.descriptor.annotations.clear();
    let e = run(&p.to_any_bytes());
    assert!(matches!(e, DecoderError::NotOcicrypt { .. }), "{e}");
    assert!(e.to_string().contains("org.opencontainers.image.enc.pubopts"));
}

#[test]
fn media_type_from_containerd_must_match_the_payload() {
    let scratch = tempfile::tempdir().unwrap();
    let (payload, blob) = vector_layer("enc-jwe");
    let dir = key_dir(&[("rsa.pem", read(&vector_key("rsa.pem")))]);
    let mut out = Vec::new();
    let e = ocicrypt_core::stream_processor::run(
        &options(Some(dir.path()), spool(scratch.path())),
        Some(TAR_ENC),
        &payload.to_any_bytes(),
        Vec::new(),
        &blob[..],
        &mut out,
    )
    .unwrap_err();
    assert!(matches!(e, DecoderError::MediaTypeMismatch { .. }), "{e}");
    assert!(out.is_empty());
}

#[test]
fn no_key_at_all_says_where_keys_were_looked_for() {
    let scratch = tempfile::tempdir().unwrap();
    let (payload, blob) = vector_layer("enc-jwe");
    let empty = key_dir(&[]);
    let (out, r) = decode(
        &payload,
        &options(Some(empty.path()), spool(scratch.path())),
        &blob,
    );
    let e = r.unwrap_err();
    assert!(out.is_empty());
    assert!(matches!(e, DecoderError::NoKey { .. }), "{e}");
    let msg = e.one_line();
    assert!(msg.contains(&payload.descriptor.digest), "{msg}");
    assert!(msg.contains("encrypted for jwe"), "{msg}");
    assert!(
        msg.contains(&format!("{} holds no private key", empty.path().display())),
        "{msg}"
    );

    // A missing directory is an empty one (CRI-O's rule), and the message says so.
    let gone = empty.path().join("nope");
    let (_, r) = decode(&payload, &options(Some(&gone), spool(scratch.path())), &blob);
    let msg = r.unwrap_err().one_line();
    assert!(msg.contains("does not exist"), "{msg}");
}

#[test]
fn wrong_key_names_the_keys_tried() {
    let scratch = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    if !have_tool("openssl") {
        return;
    }
    let (other, _) = openssl_keypair(keys.path(), "other", "rsa2048");
    let (payload, blob) = vector_layer("enc-jwe");
    let dir = key_dir(&[("other.pem", read(&other))]);
    let (out, r) = decode(&payload, &options(Some(dir.path()), spool(scratch.path())), &blob);
    assert!(out.is_empty());
    let e = r.unwrap_err();
    assert!(matches!(e, DecoderError::WrongKeys { count: 1, .. }), "{e}");
    let msg = e.one_line();
    assert!(msg.contains("other.pem"), "{msg}");
    assert!(msg.contains(&payload.descriptor.digest), "{msg}");
}

#[test]
fn tampered_layer_fails_and_nothing_unverified_is_released() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = key_dir(&[("rsa.pem", read(&vector_key("rsa.pem")))]);

    // The Go-made tampered vector.
    let (payload, blob) = vector_layer("enc-jwe-tampered");
    let (out, r) = decode(&payload, &options(Some(dir.path()), spool(scratch.path())), &blob);
    let e = r.unwrap_err();
    assert!(matches!(e, DecoderError::Tampered { .. }), "{e}");
    assert!(out.is_empty(), "spool mode releases nothing");
    assert!(e.one_line().contains("nothing was passed on"), "{}", e.one_line());

    // A larger layer with one flipped byte in the middle: spool mode releases nothing, stream
    // mode releases all but the held-back tail and still fails.
    let recipient = vector_key("rsa.pub.pem");
    let plaintext: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let (payload, mut ct) = encrypt_layer(&plaintext, TAR_ENC, &[&recipient]);
    let mid = ct.len() / 2;
    ct[mid] ^= 1;
    let (out, r) = decode(&payload, &options(Some(dir.path()), spool(scratch.path())), &ct);
    assert!(matches!(r, Err(DecoderError::Tampered { .. })));
    assert!(out.is_empty());
    let (out, r) = decode(&payload, &options(Some(dir.path()), OutputMode::Stream), &ct);
    let e = r.unwrap_err();
    assert!(matches!(e, DecoderError::Tampered { .. }));
    assert_eq!(out.len(), ct.len() - STREAM_HOLD_BACK, "Go's hold-back");
    assert!(e.one_line().contains("must be discarded"));
    // The spool directory is left empty (unnamed temporary file).
    assert_eq!(std::fs::read_dir(scratch.path()).unwrap().count(), 0);

    // Truncated input fails too, saying so.
    ct[mid] ^= 1;
    let (out, r) = decode(
        &payload,
        &options(Some(dir.path()), spool(scratch.path())),
        &ct[..ct.len() - 1],
    );
    assert!(matches!(r, Err(DecoderError::ShortInput { .. })), "{r:?}");
    assert!(out.is_empty());
    // And the untampered layer decrypts in both modes.
    for mode in [spool(scratch.path()), OutputMode::Stream] {
        let (out, r) = decode(&payload, &options(Some(dir.path()), mode), &ct);
        assert_eq!(r.unwrap(), plaintext.len() as u64);
        assert!(out == plaintext);
    }
}

/// The key directory is read like CRI-O and Go ctd-decoder read it: one file the runtime
/// cannot use fails the layer even when a good key is present, naming the file.
#[test]
fn key_dir_with_a_bad_file_fails_like_the_runtime() {
    let scratch = tempfile::tempdir().unwrap();
    let (payload, blob) = vector_layer("enc-jwe");
    let good = ("rsa.pem", read(&vector_key("rsa.pem")));
    for (name, bytes, want) in [
        (
            "README",
            b"keys go here\n".to_vec(),
            "unknown decryption key type",
        ),
        (
            "ec.sec1.pem",
            read(&vector_key("ec.sec1.pem")),
            "openssl pkcs8 -topk8",
        ),
        (
            "rsa.enc.pem",
            read(&vector_key("rsa.enc.pem")),
            "encrypted private key",
        ),
        (
            "rsa.pub.pem",
            read(&vector_key("rsa.pub.pem")),
            "unknown decryption key type",
        ),
    ] {
        let dir = key_dir(&[good.clone(), (name, bytes)]);
        let (out, r) = decode(&payload, &options(Some(dir.path()), spool(scratch.path())), &blob);
        assert!(out.is_empty());
        let e = r.unwrap_err();
        assert!(matches!(e, DecoderError::KeyDir { .. }), "{name}: {e}");
        let msg = e.one_line();
        assert!(msg.contains(name) && msg.contains(want), "{name}: {msg}");
    }
    // Files a runtime accepts but that are no JWE key (a certificate) do no harm.
    let dir = key_dir(&[good.clone(), ("cert.pem", read(&vector_key("cert.pem")))]);
    let (out, r) = decode(&payload, &options(Some(dir.path()), spool(scratch.path())), &blob);
    r.unwrap();
    assert!(out == vector_source_blob());
    // A symbolic link fails too.
    let dir = key_dir(&[good]);
    std::os::unix::fs::symlink(vector_key("ec.p8.pem"), dir.path().join("link.pem")).unwrap();
    let (_, r) = decode(&payload, &options(Some(dir.path()), spool(scratch.path())), &blob);
    let msg = r.unwrap_err().one_line();
    assert!(msg.contains("link.pem") && msg.contains("symbolic link"), "{msg}");
}

/// The armored test key of the vectors as the binary keyring Go reads (`gpg --dearmor`).
fn pgp_binary_secret() -> Vec<u8> {
    ocicrypt_core::pgp::secret_keyring_binary(&read(&vector_key("pgp-secret.asc")), "pgp-secret.asc")
        .unwrap()
        .to_vec()
}

/// Issue 11 item 5: skopeo-made pkcs7 and pgp layers, keys from the directory (as CRI-O reads
/// it) or from the payload's DecryptConfig (`privkeys` + `x509s`, `gpg-privatekeys` +
/// `gpg-privatekeys-passwords`, as ctr-enc sends them).
#[test]
fn go_made_pkcs7_and_pgp_layers_decrypt_with_keys_from_the_directory_or_the_payload() {
    let scratch = tempfile::tempdir().unwrap();
    let source = vector_source_blob();
    let opts = |dir: Option<&std::path::Path>| options(dir, spool(scratch.path()));

    // PKCS#7: the private key alone in the directory (Go would need the certificate too).
    let (p7, p7_blob) = vector_layer("enc-p7");
    let dir = key_dir(&[("p7/cert.key.pem", read(&vector_key("cert.key.pem")))]);
    let (out, r) = decode(&p7, &opts(Some(dir.path())), &p7_blob);
    r.unwrap();
    assert!(out == source);
    // ... or in the payload, with the certificate in x509s as ctr-enc sends it.
    let mut with_keys = vector_layer("enc-p7").0;
    let params = &mut with_keys.decrypt_config.parameters;
    params.insert("privkeys".into(), vec![read(&vector_key("cert.key.pem"))]);
    params.insert("privkeys-passwords".into(), vec![Vec::new()]);
    params.insert("x509s".into(), vec![read(&vector_key("cert.pem"))]);
    let (out, r) = decode(&with_keys, &opts(None), &p7_blob);
    r.unwrap();
    assert!(out == source);
    // A certificate alone is no key; a garbled one is named, not quoted.
    with_keys.decrypt_config.parameters.remove("privkeys");
    let (out, r) = decode(&with_keys, &opts(None), &p7_blob);
    assert!(out.is_empty());
    let msg = r.unwrap_err().one_line();
    assert!(
        msg.contains("no private key to decrypt") && msg.contains("pkcs7"),
        "{msg}"
    );
    with_keys.decrypt_config.parameters.insert(
        "x509s".into(),
        vec![
            b"-----BEGIN CERTIFICATE-----\nQUJDREVGR0hJSktMTU5PUFFSU1RVVldY\n-----END CERTIFICATE-----\n"
                .to_vec(),
        ],
    );
    let (_, r) = decode(&with_keys, &opts(None), &p7_blob);
    let e = r.unwrap_err();
    assert!(
        matches!(
            e,
            DecoderError::PayloadParameter {
                param: "x509s",
                index: 0,
                ..
            }
        ),
        "{e}"
    );
    assert!(!e.one_line().contains("QUJDREVG"), "{}", e.one_line());

    // PGP: binary (what Go reads) and armored (our extra) keyrings in the directory.
    let (pgp, pgp_blob) = vector_layer("enc-pgp");
    for (name, bytes) in [
        ("secring.gpg", pgp_binary_secret()),
        ("secret.asc", read(&vector_key("pgp-secret.asc"))),
    ] {
        let dir = key_dir(&[("rsa.pem", read(&vector_key("rsa.pem"))), (name, bytes)]);
        let (out, r) = decode(&pgp, &opts(Some(dir.path())), &pgp_blob);
        r.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(out == source, "{name}");
    }
    // ... and in the payload, with an empty password entry.
    let mut with_gpg = vector_layer("enc-pgp").0;
    let params = &mut with_gpg.decrypt_config.parameters;
    params.insert("gpg-privatekeys".into(), vec![pgp_binary_secret()]);
    params.insert("gpg-privatekeys-passwords".into(), vec![Vec::new()]);
    let (out, r) = decode(&with_gpg, &opts(None), &pgp_blob);
    r.unwrap();
    assert!(out == source);
    // Garbage in gpg-privatekeys is named, not quoted.
    with_gpg.decrypt_config.parameters.insert(
        "gpg-privatekeys".into(),
        vec![b"\x95\x01\x0bSECRETSECRETSECRET".to_vec()],
    );
    let (out, r) = decode(&with_gpg, &opts(None), &pgp_blob);
    assert!(out.is_empty());
    let e = r.unwrap_err();
    assert!(
        matches!(
            e,
            DecoderError::PayloadParameter {
                param: "gpg-privatekeys",
                index: 0,
                ..
            }
        ),
        "{e}"
    );
    assert!(!e.one_line().contains("SECRET"), "{}", e.one_line());
    // A damaged keyring in the directory fails like any file the runtime cannot use.
    let mut cut = pgp_binary_secret();
    cut.truncate(cut.len() / 2);
    let dir = key_dir(&[("secring.gpg", cut)]);
    let (_, r) = decode(&pgp, &opts(Some(dir.path())), &pgp_blob);
    let e = r.unwrap_err();
    assert!(matches!(e, DecoderError::KeyDir { .. }), "{e}");
    assert!(e.one_line().contains("secring.gpg"), "{}", e.one_line());
    // Keys of other schemes only: the pgp layer says it has no key, and where keys were sought.
    let dir = key_dir(&[("rsa.pem", read(&vector_key("rsa.pem")))]);
    let (_, r) = decode(&pgp, &opts(Some(dir.path())), &pgp_blob);
    let msg = r.unwrap_err().one_line();
    assert!(
        msg.contains("no private key to decrypt") && msg.contains("pgp"),
        "{msg}"
    );
}

#[test]
fn unwritable_spool_dir_is_a_clear_error() {
    let (payload, blob) = vector_layer("enc-jwe");
    let dir = key_dir(&[("rsa.pem", read(&vector_key("rsa.pem")))]);
    let missing = dir.path().join("no-such-dir");
    let (out, r) = decode(&payload, &options(Some(dir.path()), spool(&missing)), &blob);
    assert!(out.is_empty());
    let msg = r.unwrap_err().one_line();
    assert!(msg.contains("spool file") && msg.contains("no-such-dir"), "{msg}");
}

// ---------------------------------------------------------------------------------------------
// The process contract: payload on a real fd 3, stdin, stdout, one line on stderr, exit code.

fn run_child(
    args: &[&str],
    payload: Option<&Payload>,
    media: &str,
    input: &[u8],
) -> (std::process::ExitStatus, Vec<u8>, String) {
    let tmp = tempfile::tempdir().unwrap();
    let pfile = tmp.path().join("payload");
    if let Some(p) = payload {
        std::fs::write(&pfile, p.to_any_bytes()).unwrap();
    }
    let mut child = spawn_child(args, payload.map(|_| pfile.as_path()), media);
    let mut stdin = child.stdin.take().unwrap();
    let data = input.to_vec();
    let w = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let mut stdout = Vec::new();
    child.stdout.take().unwrap().read_to_end(&mut stdout).unwrap();
    let out = child.wait_with_output().unwrap();
    w.join().unwrap();
    (
        out.status,
        stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn process_contract_fd3_payload_stdin_stdout() {
    let (payload, blob) = vector_layer("enc-jwe");
    let dir = key_dir(&[("rsa.pem", read(&vector_key("rsa.pem")))]);
    let scratch = tempfile::tempdir().unwrap();
    let keys = dir.path().to_str().unwrap();
    let sp = scratch.path().to_str().unwrap();

    let (status, out, err) = run_child(
        &["--decryption-keys-path", keys, "--spool-dir", sp],
        Some(&payload),
        GZIP_ENC,
        &blob,
    );
    assert!(status.success(), "{err}");
    assert!(out == vector_source_blob());

    // fd 3 closed: the message explains which processor IDs get a payload.
    let (status, out, err) = run_child(&["--decryption-keys-path", keys], None, GZIP_ENC, &blob);
    assert!(!status.success());
    assert!(out.is_empty());
    let line = decoder_line(&err);
    assert!(
        line.contains("no decryption payload on file descriptor 3"),
        "{line}"
    );

    // No key: one line naming the layer.
    let empty = key_dir(&[]);
    let (status, out, err) = run_child(
        &["--decryption-keys-path", empty.path().to_str().unwrap()],
        Some(&payload),
        GZIP_ENC,
        &blob,
    );
    assert!(!status.success());
    assert!(out.is_empty());
    let line = decoder_line(&err);
    assert!(
        line.contains("no private key to decrypt layer") && line.contains(&payload.descriptor.digest),
        "{line}"
    );

    // Tampered: non-zero exit, no output.
    let (tpayload, tblob) = vector_layer("enc-jwe-tampered");
    let (status, out, err) = run_child(
        &["--decryption-keys-path", keys, "--spool-dir", sp],
        Some(&tpayload),
        GZIP_ENC,
        &tblob,
    );
    assert!(!status.success());
    assert!(out.is_empty());
    assert!(decoder_line(&err).contains("failed verification"), "{err}");

    // A pgp layer with the keyring in the payload's gpg-privatekeys (base64 in the fd-3 JSON).
    let (mut pgp, pgp_blob) = vector_layer("enc-pgp");
    pgp.decrypt_config
        .parameters
        .insert("gpg-privatekeys".into(), vec![pgp_binary_secret()]);
    let (status, out, err) = run_child(&["--spool-dir", sp], Some(&pgp), GZIP_ENC, &pgp_blob);
    assert!(status.success(), "{err}");
    assert!(out == vector_source_blob());

    // Bad flag.
    let (status, _, err) = run_child(&["--bogus"], Some(&payload), GZIP_ENC, &blob);
    assert!(!status.success());
    assert!(err.contains("--bogus"), "{err}");
}

/// `OCICRYPT_KEYPROVIDER_CONFIG`: a `cmd` key provider unwraps a `provider.<name>` layer.
#[test]
fn key_provider_from_the_environment_unwraps_the_layer() {
    use ocicrypt_core::cipher::{LayerEncryptor, LayerKey, Nonce};
    use ocicrypt_core::keywrap::append_entry;
    use ocicrypt_core::stream_processor::Descriptor;
    use ocicrypt_core::{PrivateLayerOptions, PublicLayerOptions};

    let tmp = tempfile::tempdir().unwrap();
    let key = LayerKey::generate();
    let nonce = Nonce::generate();
    let plaintext = b"a layer for a key provider".repeat(1000);
    let mut ct = plaintext.clone();
    let mut enc = LayerEncryptor::new(&key, &nonce);
    enc.update(&mut ct);
    let mac = enc.finish();
    let mut annotations = std::collections::BTreeMap::new();
    append_entry(&mut annotations, "provider.sample", b"opaque-wrapped-key");
    annotations.insert(
        "org.opencontainers.image.enc.pubopts".to_owned(),
        PublicLayerOptions::new(&mac).to_annotation(),
    );
    let payload = Payload {
        descriptor: Descriptor {
            media_type: TAR_ENC.into(),
            digest: sha256(&ct),
            size: ct.len() as i64,
            annotations,
        },
        ..Payload::default()
    };
    // The provider: saves the request, answers with the private options.
    let optsdata = PrivateLayerOptions::new(&key, &nonce, "").to_json();
    let answer =
        serde_json::json!({"keyunwrapresults": {"optsdata": ocicrypt_core::options::encode_b64(&optsdata)}});
    std::fs::write(tmp.path().join("answer.json"), answer.to_string()).unwrap();
    let script = tmp.path().join("provider.sh");
    std::fs::write(
        &script,
        format!(
            "cat > {d}/request.json\ncat {d}/answer.json\n",
            d = tmp.path().display()
        ),
    )
    .unwrap();
    let config = tmp.path().join("ocicrypt_keyprovider.conf");
    std::fs::write(
        &config,
        serde_json::json!({"key-providers": {"sample": {"cmd": {"path": "/bin/sh", "args": [script]}}}})
            .to_string(),
    )
    .unwrap();
    let pfile = tmp.path().join("payload");
    std::fs::write(&pfile, payload.to_any_bytes()).unwrap();
    let empty = key_dir(&[]);
    let args = [
        "--decryption-keys-path",
        empty.path().to_str().unwrap(),
        "--stream",
    ];

    let run = |envs: &[(&str, &str)]| {
        let mut child = spawn_child_env(&args, Some(&pfile), TAR_ENC, envs);
        let mut stdin = child.stdin.take().unwrap();
        let data = ct.clone();
        let w = std::thread::spawn(move || {
            let _ = stdin.write_all(&data);
        });
        let mut out = Vec::new();
        child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
        let done = child.wait_with_output().unwrap();
        w.join().unwrap();
        (
            done.status,
            out,
            String::from_utf8_lossy(&done.stderr).into_owned(),
        )
    };
    let (status, out, err) = run(&[("OCICRYPT_KEYPROVIDER_CONFIG", config.to_str().unwrap())]);
    assert!(status.success(), "{err}");
    assert!(out == plaintext);
    let request: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("request.json")).unwrap()).unwrap();
    assert_eq!(request["op"], "keyunwrap");
    assert_eq!(
        request["keyunwrapparams"]["annotation"],
        ocicrypt_core::options::encode_b64(b"opaque-wrapped-key")
    );

    // Without the configuration: no key for provider.sample.
    let (status, out, err) = run(&[]);
    assert!(!status.success());
    assert!(out.is_empty());
    let line = decoder_line(&err);
    assert!(line.contains("encrypted for provider.sample"), "{line}");
    // A configuration file that does not exist means no providers (Go's rule).
    let missing = tmp.path().join("missing.conf");
    let (status, _, err) = run(&[("OCICRYPT_KEYPROVIDER_CONFIG", missing.to_str().unwrap())]);
    assert!(!status.success());
    assert!(
        decoder_line(&err).contains("encrypted for provider.sample"),
        "{err}"
    );
    // A broken configuration is named.
    std::fs::write(&config, "{not json").unwrap();
    let (status, _, err) = run(&[("OCICRYPT_KEYPROVIDER_CONFIG", config.to_str().unwrap())]);
    assert!(!status.success());
    let line = decoder_line(&err);
    assert!(
        line.contains("OCICRYPT_KEYPROVIDER_CONFIG") && line.contains("ocicrypt_keyprovider.conf"),
        "{line}"
    );
}

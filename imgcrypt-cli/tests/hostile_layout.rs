//! The real binary against hostile local input: FIFOs and devices where files are expected,
//! symbolic links and oversized files in layouts, wrong blobs in a destination, and public
//! options `decrypt` would refuse (issue 15, items 5, 6, 8, 9).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{imgcrypt, oci, Run};
use testkit::image::{sha256, write_image, Compression, LayerSpec};
use testkit::tools::{have_tool, openssl_keypair};

/// Runs `sh -c "LIMITS; exec imgcrypt ARGS"` with a deadline; `None` when it had to be killed.
fn run_sh(limits: &str, args: &[&str], limit: Duration) -> Option<Run> {
    let mut script = format!("{limits}\nexec \"$0\"");
    for i in 0..args.len() {
        script.push_str(&format!(" \"${}\"", i + 1));
    }
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_imgcrypt"))
        .args(args);
    common::run_limited(cmd, &[], limit)
}

fn run_bounded(args: &[&str]) -> Run {
    run_sh("", args, Duration::from_secs(20))
        .unwrap_or_else(|| panic!("imgcrypt {} hung (killed after 20 s)", args.join(" ")))
}

fn mkfifo(p: &Path) {
    assert!(Command::new("mkfifo").arg(p).status().unwrap().success());
}

fn blob(layout: &Path, digest: &str) -> PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

fn put(layout: &Path, bytes: &[u8]) -> String {
    let d = sha256(bytes);
    std::fs::write(blob(layout, &d), bytes).unwrap();
    d
}

/// The manifest digest of the only image in a layout.
fn manifest_digest(layout: &Path) -> String {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    index["manifests"][0]["digest"].as_str().unwrap().to_owned()
}

/// Replaces the manifest of the only image in `layout` with `m`, pointing index.json at it.
fn set_manifest(layout: &Path, tag: &str, m: &serde_json::Value) {
    let bytes = serde_json::to_vec(m).unwrap();
    let d = put(layout, &bytes);
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d, "size": bytes.len(),
        "annotations": {"org.opencontainers.image.ref.name": tag}}]});
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

fn manifest(layout: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(blob(layout, &manifest_digest(layout))).unwrap()).unwrap()
}

/// Items 5 and 6: FIFOs and /dev/zero given as key, password, recipient and auth files, and a
/// FIFO as a layer blob, are refused at once instead of blocking or reading forever.
#[test]
fn fifos_and_devices_are_refused_at_once() {
    if !have_tool("openssl") || !have_tool("mkfifo") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    write_image(&src, "v1", &[LayerSpec::random(10_000, 1, Compression::Gzip)]);
    let (private, public) = openssl_keypair(t.path(), "k", "p256");
    let fifo = t.path().join("fifo");
    mkfifo(&fifo);
    let f = fifo.display().to_string();
    let k = private.display().to_string();
    let enc = t.path().join("enc");
    imgcrypt(&[
        "encrypt",
        "--recipient",
        &format!("jwe:{}", public.display()),
        &oci(&src, "v1"),
        &oci(&enc, "v1"),
    ])
    .ok();
    let out = |n: &str| oci(&t.path().join(n), "v1");

    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "decrypt".into(),
                "--key".into(),
                f.clone(),
                oci(&enc, "v1"),
                out("o1"),
            ],
            "FIFO",
        ),
        (
            vec![
                "decrypt".into(),
                "--key".into(),
                format!("{k}:file={f}"),
                oci(&enc, "v1"),
                out("o2"),
            ],
            "FIFO",
        ),
        (
            vec![
                "decrypt".into(),
                "--key".into(),
                format!("{k}:file=/dev/zero"),
                oci(&enc, "v1"),
                out("o3"),
            ],
            "character device",
        ),
        (
            vec![
                "encrypt".into(),
                "--recipient".into(),
                format!("jwe:{f}"),
                oci(&src, "v1"),
                out("o4"),
            ],
            "FIFO",
        ),
        (
            vec![
                "--authfile".into(),
                f.clone(),
                "inspect".into(),
                "docker://127.0.0.1:9/a/b:c".into(),
            ],
            "FIFO",
        ),
        (
            vec![
                "--authfile".into(),
                "/dev/zero".into(),
                "inspect".into(),
                "docker://127.0.0.1:9/a/b:c".into(),
            ],
            "character device",
        ),
    ];
    for (args, needle) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let started = Instant::now();
        let r = run_bounded(&args);
        assert_ne!(r.code, 0, "{args:?}");
        assert!(r.stderr.contains(needle), "{args:?}: {}", r.stderr);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{args:?} took {:?}",
            started.elapsed()
        );
    }

    // A layer blob that is a FIFO.
    let layer = manifest(&src)["layers"][0]["digest"].as_str().unwrap().to_owned();
    std::fs::remove_file(blob(&src, &layer)).unwrap();
    mkfifo(&blob(&src, &layer));
    let r = run_bounded(&[
        "encrypt",
        "--recipient",
        &format!("jwe:{}", public.display()),
        &oci(&src, "v1"),
        &out("o5"),
    ]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("FIFO"), "{}", r.stderr);
    assert!(
        !t.path().join("o5").exists(),
        "the destination made by the failed run is removed"
    );
}

/// Item 5: a manifest blob far larger than its descriptor (8 GiB, sparse) is refused before it
/// is read; under a 2 GB address-space limit the old code died allocating it.
#[test]
fn an_oversized_manifest_is_refused_before_it_is_read() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    write_image(&src, "v1", &[LayerSpec::random(1000, 2, Compression::Gzip)]);
    let m = manifest_digest(&src);
    std::fs::OpenOptions::new()
        .write(true)
        .open(blob(&src, &m))
        .unwrap()
        .set_len(8 << 30)
        .unwrap();
    let started = Instant::now();
    let r = run_sh(
        "ulimit -v 2000000",
        &["inspect", &oci(&src, "v1")],
        Duration::from_secs(60),
    )
    .expect("inspect finishes");
    assert!(r.code > 0 && r.code < 128, "a clean error, not a crash: {r:?}");
    assert!(r.stderr.contains("8589934592"), "{}", r.stderr);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

/// Items 5 and 8: a layer blob that is a symbolic link (to /dev/zero, declared 1 TiB) is refused,
/// not streamed; so is a link to a copy of the right bytes.
#[test]
fn symlinked_blobs_in_a_source_are_refused() {
    if !have_tool("openssl") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (_, public) = openssl_keypair(t.path(), "k", "p256");
    let recipient = format!("jwe:{}", public.display());

    // A link to a copy of the right bytes.
    let src = t.path().join("src");
    write_image(&src, "v1", &[LayerSpec::random(5000, 4, Compression::Gzip)]);
    let layer = manifest(&src)["layers"][0]["digest"].as_str().unwrap().to_owned();
    let copy = t.path().join("copy");
    std::fs::rename(blob(&src, &layer), &copy).unwrap();
    std::os::unix::fs::symlink(&copy, blob(&src, &layer)).unwrap();
    let r = run_bounded(&[
        "encrypt",
        "--recipient",
        &recipient,
        &oci(&src, "v1"),
        &oci(&t.path().join("o1"), "v1"),
    ]);
    assert_ne!(r.code, 0, "{}", r.stdout);
    assert!(r.stderr.contains("symbolic link"), "{}", r.stderr);

    // A link to /dev/zero with a huge declared size: under a 64 MiB file-size limit the old code
    // was killed (SIGXFSZ) filling the destination; now it is refused at once.
    let zero = t.path().join("zero");
    write_image(&zero, "v1", &[LayerSpec::random(100, 5, Compression::Gzip)]);
    let mut m = manifest(&zero);
    let fake = sha256(b"not the bytes of /dev/zero");
    m["layers"][0]["digest"] = fake.clone().into();
    m["layers"][0]["size"] = (1u64 << 40).into();
    set_manifest(&zero, "v1", &m);
    std::os::unix::fs::symlink("/dev/zero", blob(&zero, &fake)).unwrap();
    let r = run_sh(
        "ulimit -f 65536",
        &[
            "encrypt",
            "--recipient",
            &recipient,
            &oci(&zero, "v1"),
            &oci(&t.path().join("o2"), "v1"),
        ],
        Duration::from_secs(60),
    )
    .expect("finishes");
    assert!(r.code > 0 && r.code < 128, "a clean error: {r:?}");
    assert!(r.stderr.contains("symbolic link"), "{}", r.stderr);
    assert!(!t.path().join("o2").exists());
}

/// Item 8: a destination whose `blobs` directory is a link is not written through, and a wrong
/// blob already in a destination under a digest being written is rewritten, not trusted.
#[test]
fn destinations_are_not_written_through_links_and_wrong_blobs_are_rewritten() {
    if !have_tool("openssl") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (private, public) = openssl_keypair(t.path(), "k", "p256");
    let src = t.path().join("src");
    write_image(&src, "v1", &[LayerSpec::random(30_000, 6, Compression::Gzip)]);

    // blobs -> elsewhere
    let dst = t.path().join("dst");
    let elsewhere = t.path().join("elsewhere");
    std::fs::create_dir_all(elsewhere.join("sha256")).unwrap();
    std::fs::create_dir(&dst).unwrap();
    std::fs::write(dst.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    std::fs::write(dst.join("index.json"), br#"{"schemaVersion":2,"manifests":[]}"#).unwrap();
    std::os::unix::fs::symlink(&elsewhere, dst.join("blobs")).unwrap();
    let r = run_bounded(&[
        "encrypt",
        "--recipient",
        &format!("jwe:{}", public.display()),
        &oci(&src, "v1"),
        &oci(&dst, "v1"),
    ]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("symbolic link"), "{}", r.stderr);
    assert_eq!(
        std::fs::read_dir(elsewhere.join("sha256")).unwrap().count(),
        0,
        "nothing written through the link"
    );

    // Wrong bytes planted under the digests decrypt will write (plain layer, config).
    let enc = t.path().join("enc");
    imgcrypt(&[
        "encrypt",
        "--recipient",
        &format!("jwe:{}", public.display()),
        &oci(&src, "v1"),
        &oci(&enc, "v1"),
    ])
    .ok();
    let out = t.path().join("out");
    std::fs::create_dir_all(out.join("blobs/sha256")).unwrap();
    std::fs::write(out.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    std::fs::write(out.join("index.json"), br#"{"schemaVersion":2,"manifests":[]}"#).unwrap();
    let m = manifest(&src);
    for d in [&m["layers"][0]["digest"], &m["config"]["digest"]] {
        std::fs::write(blob(&out, d.as_str().unwrap()), b"planted wrong bytes").unwrap();
    }
    imgcrypt(&[
        "decrypt",
        "--key",
        &private.display().to_string(),
        &oci(&enc, "v1"),
        &oci(&out, "v1"),
    ])
    .ok();
    for e in std::fs::read_dir(out.join("blobs/sha256")).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        assert_eq!(
            sha256(&std::fs::read(e.path()).unwrap()),
            format!("sha256:{name}"),
            "blob {name} holds the bytes its name says"
        );
    }
    assert_eq!(common::layer_blobs(&out, "v1"), common::layer_blobs(&src, "v1"));
}

/// Item 9: `check` refuses public options that `decrypt` refuses (no `hmac`).
#[test]
fn check_validates_public_options_as_decrypt_does() {
    if !have_tool("openssl") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (private, public) = openssl_keypair(t.path(), "k", "p256");
    let src = t.path().join("src");
    write_image(&src, "v1", &[LayerSpec::random(3000, 7, Compression::Gzip)]);
    let enc = t.path().join("enc");
    imgcrypt(&[
        "encrypt",
        "--recipient",
        &format!("jwe:{}", public.display()),
        &oci(&src, "v1"),
        &oci(&enc, "v1"),
    ])
    .ok();
    let key = private.display().to_string();
    imgcrypt(&["check", "--key", &key, &oci(&enc, "v1")]).ok();

    let b64 = base64::engine::general_purpose::STANDARD;
    let mut m = manifest(&enc);
    let ann = &mut m["layers"][0]["annotations"]["org.opencontainers.image.enc.pubopts"];
    let mut opts: serde_json::Value =
        serde_json::from_slice(&b64.decode(ann.as_str().unwrap()).unwrap()).unwrap();
    opts.as_object_mut().unwrap().remove("hmac");
    *ann = b64.encode(serde_json::to_vec(&opts).unwrap()).into();
    set_manifest(&enc, "v1", &m);

    let dec = imgcrypt(&[
        "decrypt",
        "--key",
        &key,
        &oci(&enc, "v1"),
        &oci(&t.path().join("dec"), "v1"),
    ]);
    assert_ne!(dec.code, 0, "decrypt refuses it");
    let chk = imgcrypt(&["check", "--key", &key, &oci(&enc, "v1")]);
    assert_ne!(chk.code, 0, "check refuses it too: {}", chk.stdout);
    assert_eq!(
        chk.code, dec.code,
        "with the same exit code\ncheck: {}\ndecrypt: {}",
        chk.stderr, dec.stderr
    );
}

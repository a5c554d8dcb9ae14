//! The smaller fixes of issue 14 item 7: destinations that cannot be written, `--tls-verify
//! false`, skopeo's aliases in `--help`, `keygen` file names and `--public -`, and the hints
//! docs/cli.md promises.

mod common;

use std::path::Path;
use std::process::Command;

use common::{imgcrypt, oci};
use testkit::image::{write_image, Compression, LayerSpec};
use testkit::tools::{have_tool, openssl_keypair};

fn small_image(dir: &Path) {
    write_image(dir, "v1", &[LayerSpec::random(3_000, 1, Compression::None)]);
}

/// Every entry under `dir`, recursively (to show that nothing was written).
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().map(Result::unwrap) {
            out.push(e.path().display().to_string());
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn unwritable_destinations_are_io_errors_naming_the_path() {
    if !have_tool("openssl") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (_, public) = openssl_keypair(t.path(), "k", "p256");
    let r = format!("jwe:{}", public.display());
    let src = t.path().join("src");
    small_image(&src);
    let before = tree(t.path());

    // A missing parent directory: refused as skopeo does (it is not created), exit 1, not 7.
    let missing = t.path().join("nonexistent/dir/img");
    let out = imgcrypt(&[
        "encrypt",
        "--recipient",
        &r,
        &oci(&src, "v1"),
        &oci(&missing, "v1"),
    ]);
    out.expect_code(1).stderr_has(&[
        &format!("{} does not exist", t.path().join("nonexistent/dir").display()),
        "nothing was written",
    ]);
    assert!(!out.stderr.contains("must be an OCI layout"), "{}", out.stderr);
    // The same for oci-archive.
    let out = imgcrypt(&[
        "encrypt",
        "--recipient",
        &r,
        &oci(&src, "v1"),
        &format!("oci-archive:{}:v1", missing.display()),
    ]);
    out.expect_code(1)
        .stderr_has(&["does not exist", "nothing was written"]);
    // A path under a regular file.
    let file = t.path().join("afile");
    std::fs::write(&file, b"x").unwrap();
    let before_file = tree(t.path());
    let out = imgcrypt(&[
        "encrypt",
        "--recipient",
        &r,
        &oci(&src, "v1"),
        &oci(&file.join("img"), "v1"),
    ]);
    out.expect_code(1)
        .stderr_has(&["not a directory", "nothing was written"]);
    assert_eq!(tree(t.path()), before_file);
    std::fs::remove_file(&file).unwrap();
    assert_eq!(tree(t.path()), before);

    // A read-only directory (root ignores permission bits: a read-only bind mount in a private
    // mount namespace).
    let probe = Command::new("unshare").args(["-rm", "true"]).status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED (read-only part): unshare -rm is not available here");
        return;
    }
    let ro = t.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    let d = ro.display().to_string();
    let bin = std::env::var("IMGCRYPT_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_imgcrypt").into());
    let script = format!("mount --bind {d} {d} && mount -o remount,bind,ro {d} && exec \"$@\"");
    let out = Command::new("unshare")
        .args([
            "-rm",
            "sh",
            "-c",
            &script,
            "sh",
            &bin,
            "encrypt",
            "--recipient",
            &r,
        ])
        .arg(oci(&src, "v1"))
        .arg(oci(&ro.join("img"), "v1"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("{d} is not writable")), "{stderr}");
    assert!(stderr.contains("Read-only file system"), "{stderr}");
    assert!(std::fs::read_dir(&ro).unwrap().next().is_none());
}

#[test]
fn tls_verify_with_a_space_says_to_write_equals() {
    for flag in ["--tls-verify", "--src-tls-verify", "--dest-tls-verify"] {
        for v in ["false", "true"] {
            let out = imgcrypt(&["inspect", flag, v, "oci:/nonexistent-img:v1"]);
            out.expect_code(2).stderr_has(&[&format!("write {flag}={v}")]);
        }
    }
    // The `=` form and the bare flag still parse (the image is what fails, exit 7).
    imgcrypt(&["inspect", "--tls-verify=false", "oci:/nonexistent-img:v1"]).expect_code(7);
    imgcrypt(&["inspect", "--tls-verify", "oci:/nonexistent-img:v1"]).expect_code(7);
}

#[test]
fn skopeo_aliases_are_listed_in_help() {
    let enc = imgcrypt(&["encrypt", "--help"]);
    enc.ok().stdout_has(&["--encryption-key", "--encrypt-layer"]);
    for cmd in [
        &["decrypt", "--help"][..],
        &["check", "--help"],
        &["recipients", "add", "--help"],
    ] {
        imgcrypt(cmd).ok().stdout_has(&["--decryption-key"]);
    }
    imgcrypt(&["recipients", "set", "--help"])
        .ok()
        .stdout_has(&["--encryption-key"]);
}

#[test]
fn keygen_names_and_public_key_on_stdout() {
    let t = tempfile::tempdir().unwrap();
    let carol = t.path().join("carol");
    let out = imgcrypt(&["keygen", "--type", "ec-p256", carol.to_str().unwrap()]);
    out.ok().stdout_has(&["carol.pem", "carol.pub.pem"]);
    let mut names: Vec<String> = std::fs::read_dir(t.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["carol.pem", "carol.pub.pem"]);

    // `--public -`: the PEM on stdout (and nothing else there), the private key a 0600 file,
    // no file named `-`.
    let dir = t.path().join("d");
    std::fs::create_dir(&dir).unwrap();
    let dave = dir.join("dave.pem");
    let mut cmd = Command::new(
        std::env::var("IMGCRYPT_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_imgcrypt").into()),
    );
    let out = cmd
        .current_dir(&dir)
        .args(["keygen", "--type", "ec-p256", "--public", "-", "dave.pem"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.starts_with("-----BEGIN PUBLIC KEY-----\n"), "{stdout}");
    assert!(
        stdout.trim_end().ends_with("-----END PUBLIC KEY-----"),
        "{stdout}"
    );
    assert!(!dir.join("-").exists());
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&dave).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let names: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(names.len(), 1);
    // The printed key is dave's: same key id.
    std::fs::write(t.path().join("dave.pub.pem"), &stdout).unwrap();
    let a = imgcrypt(&["key-id", dave.to_str().unwrap()]);
    let b = imgcrypt(&["key-id", t.path().join("dave.pub.pem").to_str().unwrap()]);
    assert_eq!(a.ok().stdout, b.ok().stdout);
    assert!(String::from_utf8_lossy(&out.stderr).contains(a.stdout.trim()));
}

#[test]
fn promised_hints_are_there() {
    if !have_tool("openssl") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (alice, alice_pub) = openssl_keypair(t.path(), "alice", "p256");
    let (mallory, _) = openssl_keypair(t.path(), "mallory", "p256");
    let src = t.path().join("src");
    small_image(&src);
    let enc = oci(&t.path().join("enc"), "v1");
    let r = format!("jwe:{}", alice_pub.display());
    imgcrypt(&["encrypt", "--recipient", &r, &oci(&src, "v1"), &enc]).ok();
    // Encrypting an encrypted image points at `recipients add`.
    imgcrypt(&[
        "encrypt",
        "--recipient",
        &r,
        &enc,
        &oci(&t.path().join("e2"), "v1"),
    ])
    .expect_code(1)
    .stderr_has(&["hint:", "imgcrypt recipients add"]);
    // The wrong-key hint says how to compare key ids: inspect shows them, key-id prints a file's.
    let out = imgcrypt(&["check", "--key", mallory.to_str().unwrap(), &enc]);
    out.expect_code(4)
        .stderr_has(&["hint:", "imgcrypt inspect", "imgcrypt key-id"]);
    let inspect = imgcrypt(&["inspect", &enc]);
    let id = imgcrypt(&["key-id", alice.to_str().unwrap()]);
    inspect.ok().stdout_has(&[id.ok().stdout.trim()]);
}

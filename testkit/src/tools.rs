//! External tools the tests drive (skopeo, openssl): presence checks and runners.

use std::path::Path;
use std::process::{Command, Output};

/// Whether tests must fail rather than skip when a tool is missing (`IMGCRYPT_REQUIRE_TOOLS=1`,
/// set by `scripts/test` and CI).
pub fn tools_required() -> bool {
    std::env::var("IMGCRYPT_REQUIRE_TOOLS").is_ok_and(|v| v == "1")
}

/// Whether `tool` is on PATH. When it is not: panics if tools are required, else prints a skip
/// note and returns false.
pub fn have_tool(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        assert!(
            !tools_required(),
            "{tool} is not installed but IMGCRYPT_REQUIRE_TOOLS=1: run scripts/test, which installs it"
        );
        eprintln!("SKIP: {tool} is not installed (run scripts/test to install it)");
    }
    found
}

/// How long one skopeo run may take before [`skopeo`] kills it and fails the test.
pub const SKOPEO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Runs skopeo with `--insecure-policy` (tests own their images) and returns its output. A run
/// that takes longer than [`SKOPEO_TIMEOUT`] is killed and fails the test.
pub fn skopeo(args: &[&str]) -> Output {
    let mut child = Command::new("skopeo")
        .arg("--insecure-policy")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("skopeo runs");
    // Drained on their own threads, so a chatty skopeo cannot block on a full pipe.
    let stdout = drain(child.stdout.take().expect("piped stdout"));
    let stderr = drain(child.stderr.take().expect("piped stderr"));
    let deadline = std::time::Instant::now() + SKOPEO_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for skopeo") {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "skopeo {} did not finish within {SKOPEO_TIMEOUT:?}",
                args.join(" ")
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

fn drain<R: std::io::Read + Send + 'static>(mut r: R) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        v
    })
}

/// Runs skopeo and panics with its stderr on failure.
pub fn skopeo_ok(args: &[&str]) {
    let out = skopeo(args);
    assert!(
        out.status.success(),
        "skopeo {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `openssl` with `args` in `dir`, panicking on failure.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A fresh key pair made by the `openssl` CLI in `dir`: `kind` is `rsa2048`, `rsa4096`,
/// `p256`, `p384` or `p521`. Writes `<name>.pem` (PKCS#8 private key) and `<name>.pub.pem`
/// (SPKI); returns their paths.
pub fn openssl_keypair(dir: &Path, name: &str, kind: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let priv_name = format!("{name}.pem");
    let pub_name = format!("{name}.pub.pem");
    match kind {
        "rsa2048" | "rsa3072" | "rsa4096" => {
            let bits = format!("rsa_keygen_bits:{}", &kind[3..]);
            openssl(
                dir,
                &[
                    "genpkey",
                    "-algorithm",
                    "RSA",
                    "-pkeyopt",
                    &bits,
                    "-out",
                    &priv_name,
                ],
            );
        }
        "p256" | "p384" | "p521" => {
            let curve = format!("ec_paramgen_curve:P-{}", &kind[1..]);
            openssl(
                dir,
                &[
                    "genpkey",
                    "-algorithm",
                    "EC",
                    "-pkeyopt",
                    &curve,
                    "-out",
                    &priv_name,
                ],
            );
        }
        other => panic!("unknown key kind {other}"),
    }
    openssl(dir, &["pkey", "-in", &priv_name, "-pubout", "-out", &pub_name]);
    (dir.join(priv_name), dir.join(pub_name))
}

/// A fresh RSA-2048 key and self-signed certificate (`CN=<name>`) made by the `openssl` CLI in
/// `dir`: writes `<name>.key.pem` and `<name>.cert.pem`; returns (key, cert).
pub fn openssl_cert(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let key = format!("{name}.key.pem");
    let cert = format!("{name}.cert.pem");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &cert,
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}/O=imgcrypt tests"),
        ],
    );
    (dir.join(key), dir.join(cert))
}

/// Runs `gpg --batch` with `GNUPGHOME=home` and returns its stdout, panicking on failure.
pub fn gpg(home: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new("gpg")
        .env("GNUPGHOME", home)
        .args(["--batch", "--quiet", "--pinentry-mode", "loopback"])
        .args(args)
        .output()
        .expect("gpg runs");
    assert!(
        out.status.success(),
        "gpg {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A new gpg home `dir/gnupg` (mode 0700); the returned guard stops its gpg-agent when dropped.
pub fn gpg_home(dir: &Path) -> GpgAgent {
    use std::os::unix::fs::PermissionsExt as _;
    let home = dir.join("gnupg");
    std::fs::create_dir(&home).expect("create the gpg home");
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).expect("chmod the gpg home");
    GpgAgent(home)
}

/// A gpg home whose agent is stopped on drop; `.0` is the directory.
#[derive(Debug)]
pub struct GpgAgent(pub std::path::PathBuf);

impl Drop for GpgAgent {
    fn drop(&mut self) {
        let _ = Command::new("gpgconf")
            .env("GNUPGHOME", &self.0)
            .args(["--kill", "gpg-agent"])
            .status();
    }
}

/// Generates an RSA-2048 key with an RSA encryption subkey (what Go's x/crypto/openpgp can use)
/// in the gpg home, protected by `passphrase` if given.
pub fn gpg_gen_key(home: &Path, name: &str, email: &str, passphrase: Option<&str>) {
    let params = home.join(format!("{name}.params"));
    // `%no-protection` may come first; a `Passphrase:` only after `Key-Type`.
    let (head, tail) = match passphrase {
        Some(p) => (String::new(), format!("Passphrase: {p}\n")),
        None => ("%no-protection\n".to_owned(), String::new()),
    };
    let body = format!(
        "{head}Key-Type: RSA\nKey-Length: 2048\nSubkey-Type: RSA\nSubkey-Length: 2048\n\
         Name-Real: {name}\nName-Email: {email}\nExpire-Date: 0\n{tail}%commit\n"
    );
    std::fs::write(&params, body).expect("write the gpg key parameters");
    gpg(home, &["--gen-key", params.to_str().expect("UTF-8 path")]);
}

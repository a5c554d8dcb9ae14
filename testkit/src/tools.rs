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

/// Runs skopeo with `--insecure-policy` (tests own their images) and returns its output.
pub fn skopeo(args: &[&str]) -> Output {
    let mut cmd = Command::new("skopeo");
    cmd.arg("--insecure-policy").args(args);
    cmd.output().expect("skopeo runs")
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

//! A SoftHSM2 token of its own per test (Debian's `softhsm2`), with keys made by OpenSC's
//! `pkcs11-tool`: an implementation of PKCS#11 and a client of it that we did not write.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Debian's SoftHSM2 module.
pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// A SoftHSM2 token directory and config under a test's temporary directory.
#[derive(Debug)]
pub struct SoftHsm {
    /// The `softhsm2.conf` to put in `SOFTHSM2_CONF`.
    pub conf: PathBuf,
    /// The token label.
    pub label: String,
    /// The user PIN.
    pub pin: String,
}

fn check(what: &str, o: &Output) {
    assert!(
        o.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

impl SoftHsm {
    /// Whether softhsm2-util, pkcs11-tool and the module are here (see
    /// [`crate::tools::have_tool`] for skipping and requiring).
    pub fn available() -> bool {
        crate::tools::have_tool("softhsm2-util") && crate::tools::have_tool("pkcs11-tool") && {
            let found = Path::new(MODULE).exists();
            assert!(
                found || !crate::tools::tools_required(),
                "{MODULE} is missing but IMGCRYPT_REQUIRE_TOOLS=1"
            );
            found
        }
    }

    /// A new token labelled `label` with user PIN `pin`, its files under `dir`.
    pub fn new(dir: &Path, label: &str, pin: &str) -> SoftHsm {
        let tokens = dir.join("softhsm-tokens");
        std::fs::create_dir_all(&tokens).unwrap();
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                tokens.display()
            ),
        )
        .unwrap();
        let o = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &conf)
            .args([
                "--init-token",
                "--free",
                "--label",
                label,
                "--pin",
                pin,
                "--so-pin",
                "5678",
            ])
            .output()
            .expect("softhsm2-util runs");
        check("softhsm2-util --init-token", &o);
        SoftHsm {
            conf,
            label: label.to_owned(),
            pin: pin.to_owned(),
        }
    }

    /// Runs `pkcs11-tool --module MODULE --token-label LABEL ARGS…`.
    pub fn tool(&self, args: &[&str]) -> Output {
        Command::new("pkcs11-tool")
            .env("SOFTHSM2_CONF", &self.conf)
            .args(["--module", MODULE, "--token-label", &self.label])
            .args(args)
            .output()
            .expect("pkcs11-tool runs")
    }

    /// An RSA key pair on the token (`pkcs11-tool --keypairgen --key-type rsa:BITS`).
    pub fn keypair(&self, id_hex: &str, label: &str, bits: u32) {
        let o = self.tool(&[
            "--login",
            "--pin",
            &self.pin,
            "--keypairgen",
            "--key-type",
            &format!("rsa:{bits}"),
            "--id",
            id_hex,
            "--label",
            label,
        ]);
        check("pkcs11-tool --keypairgen", &o);
    }

    /// The public key `id_hex`, read off the token (`--read-object`), as SPKI PEM in `out`.
    pub fn export_public_pem(&self, id_hex: &str, out: &Path) {
        let der = out.with_extension("der");
        let o = self.tool(&[
            "--read-object",
            "--type",
            "pubkey",
            "--id",
            id_hex,
            "-o",
            der.to_str().unwrap(),
        ]);
        check("pkcs11-tool --read-object", &o);
        let o = Command::new("openssl")
            .args(["pkey", "-pubin", "-inform", "DER", "-in"])
            .arg(&der)
            .arg("-out")
            .arg(out)
            .output()
            .expect("openssl runs");
        check("openssl pkey", &o);
    }

    /// Decrypts `ciphertext` on the token with the private key `id_hex`, RSA-OAEP SHA-1
    /// (`pkcs11-tool --decrypt -m RSA-PKCS-OAEP`). `None` when the token refuses.
    pub fn decrypt_oaep_sha1(&self, id_hex: &str, ciphertext: &[u8], dir: &Path) -> Option<Vec<u8>> {
        let input = dir.join("pkcs11-tool-in.bin");
        let output = dir.join("pkcs11-tool-out.bin");
        std::fs::write(&input, ciphertext).unwrap();
        let _ = std::fs::remove_file(&output);
        let o = self.tool(&[
            "--login",
            "--pin",
            &self.pin,
            "--id",
            id_hex,
            "--decrypt",
            "-m",
            "RSA-PKCS-OAEP",
            "--hash-algorithm",
            "SHA-1",
            "--mgf",
            "MGF1-SHA1",
            "-i",
            input.to_str().unwrap(),
            "-o",
            output.to_str().unwrap(),
        ]);
        if !o.status.success() {
            return None;
        }
        std::fs::read(&output).ok()
    }

    /// ocicrypt's key YAML for key `id_hex`/`object` on this token, with `query` after the
    /// URI's `?` (e.g. `pin-value=1234&module-name=softhsm2`) and SOFTHSM2_CONF in the
    /// module's env.
    pub fn key_yaml(&self, path: &Path, id_hex: &str, object: &str, query: &str) {
        let id: String = id_hex
            .as_bytes()
            .chunks(2)
            .map(|c| format!("%{}", std::str::from_utf8(c).unwrap()))
            .collect();
        std::fs::write(
            path,
            format!(
                "pkcs11:\n  uri: pkcs11:token={};id={id};object={object}?{query}\nmodule:\n  env:\n    SOFTHSM2_CONF: {}\n",
                self.label,
                self.conf.display()
            ),
        )
        .unwrap();
    }
}

/// An `ocicrypt.conf` at `path` whose `pkcs11:` policy allows exactly SoftHSM's module (found
/// by `module-name=softhsm2` in its directory).
pub fn ocicrypt_conf(path: &Path) {
    let dir = Path::new(MODULE).parent().unwrap().display().to_string();
    std::fs::write(
        path,
        format!("pkcs11:\n  module-directories:\n    - {dir}/\n  allowed-module-paths:\n    - {MODULE}\n"),
    )
    .unwrap();
}

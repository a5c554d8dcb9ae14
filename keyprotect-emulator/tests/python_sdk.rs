//! The emulator checked against Key Protect clients we did not write: IBM's Python SDKs from
//! PyPI (`keyprotect`, the generated IbmKeyProtectApiV2, and `redstone`), installed by
//! `scripts/setup.d/keyprotect.sh` into `target/py-kp`. The Python side creates root keys,
//! wraps, unwraps, rotates, rewraps, disables and deletes; ciphertexts cross between the Rust
//! client and the SDK in both directions.
//!
//! Python: `IMGCRYPT_KP_PYTHON`, else `<workspace>/target/py-kp/bin/python`. Missing Python or
//! packages skip the test, or fail it when `IMGCRYPT_REQUIRE_TOOLS=1`.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keyprotect_client::{Client, KeyState};
use keyprotect_emulator::{Emulator, Op};

fn python() -> Option<PathBuf> {
    let p = match std::env::var_os("IMGCRYPT_KP_PYTHON").filter(|p| !p.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/py-kp/bin/python"),
    };
    let ok = p.exists()
        && Command::new(&p)
            .args(["-c", "import keyprotect, redstone, ibm_cloud_sdk_core"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    if ok {
        return Some(p);
    }
    let msg = format!(
        "IBM's Python Key Protect SDK is not available at {} (run scripts/setup.d/keyprotect.sh, or set IMGCRYPT_KP_PYTHON)",
        p.display()
    );
    if std::env::var("IMGCRYPT_REQUIRE_TOOLS").is_ok_and(|v| v == "1") {
        panic!("{msg}");
    }
    eprintln!("skipping: {msg}");
    None
}

#[tokio::test]
async fn ibm_python_sdks_drive_the_emulator() {
    let Some(py) = python() else { return };
    let emu = Emulator::start().unwrap();
    let kp = Client::new(emu.config()).unwrap();

    // Rust wraps; the SDK must unwrap it.
    let rust_root = kp.create_root_key("rust-side").await.unwrap().id;
    let rust_plain = "made by the rust client";
    let rust_ct = kp
        .wrap(&rust_root, rust_plain.as_bytes(), None)
        .await
        .unwrap()
        .ciphertext;

    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/kp_sdk_check.py");
    let mut child = Command::new(&py)
        .arg(&script)
        .env("KP_BASE", emu.base_url())
        .env("KP_INSTANCE_ID", emu.instance_id())
        .env("KP_APIKEY", emu.api_key())
        .env("KP_RUST_ROOT_KEY", &rust_root)
        .env("KP_RUST_CIPHERTEXT", &rust_ct)
        .env("KP_RUST_PLAINTEXT", rust_plain)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the Python SDK check did not finish in 120 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python failed: {}\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("python printed no JSON report ({e}): {stdout}\n{stderr}"));
    assert_eq!(report["ok"], true);
    let steps: Vec<&str> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s.as_str())
        .collect();
    for needed in [
        "sdk: create root key -> 201",
        "sdk: unwrap after rotation returns the rewrapped ciphertext and rewrappedKeyVersion",
        "sdk: unwrap of the Rust client's ciphertext",
        "redstone: unwrap after rotate",
        "redstone: deleted key -> 410",
    ] {
        assert!(steps.contains(&needed), "missing step {needed:?} in {steps:?}");
    }

    // What the SDK did is visible in the emulator's state.
    let sdk_root = report["root_key_id"].as_str().unwrap();
    assert_eq!(
        emu.key_versions(sdk_root).len(),
        2,
        "the SDK rotated its root key once"
    );
    assert_eq!(emu.key_state(sdk_root), Some(KeyState::Active));
    assert_eq!(
        emu.key_versions(sdk_root)[1],
        report["rotated_version"].as_str().unwrap()
    );
    let destroyed = emu
        .key_ids()
        .into_iter()
        .filter(|id| emu.key_state(id) == Some(KeyState::Destroyed))
        .count();
    assert_eq!(destroyed, 1, "redstone deleted its key");
    assert!(
        emu.count(Op::Token) >= 3,
        "the Rust client, the SDK and redstone each fetched a token"
    );
    let reqs = emu.requests();
    assert!(
        reqs.iter().any(|r| r.op == Op::Wrap
            && r.content_type.as_deref() == Some("application/vnd.ibm.kms.key_action_wrap+json")),
        "the generated SDK sends the per-action content type"
    );
    assert!(reqs.iter().any(|r| r.op == Op::Rotate && r.status == 204));

    // And the SDK's ciphertext (made before the rotation) unwraps with the Rust client,
    // which reports the rewrapped one.
    let u = kp
        .unwrap(sdk_root, report["ciphertext"].as_str().unwrap(), None)
        .await
        .unwrap();
    assert_eq!(
        keyprotect_client::b64::encode(&u.plaintext),
        report["plaintext_b64"].as_str().unwrap()
    );
    assert!(u.rewrapped.is_some());
}

//! The emulator's dialect checked with raw HTTP (no client of ours in between), and the
//! `kp-emulator` binary.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use keyprotect_client::wrapper::{unwrap_for_secret, wrap_file_for_secret};
use keyprotect_client::{b64, Client, KeyProtectConfig};
use keyprotect_emulator::{Emulator, Fault, Op};
use serde_json::{json, Value};

async fn token(http: &reqwest::Client, base: &str, apikey: &str, path: &str) -> String {
    let r = http
        .post(format!("{base}{path}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!(
            "grant_type=urn%3Aibm%3Aparams%3Aoauth%3Agrant-type%3Aapikey&apikey={apikey}"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["token_type"], "Bearer");
    assert_eq!(v["refresh_token"], "not_supported");
    assert!(v["expires_in"].as_u64().unwrap() > 0);
    let t = v["access_token"].as_str().unwrap().to_owned();
    // JWT-shaped with iat/exp, as IBM's SDKs decode it.
    let parts: Vec<&str> = t.split('.').collect();
    assert_eq!(parts.len(), 3);
    use base64::Engine;
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[1])
            .unwrap(),
    )
    .unwrap();
    assert!(claims["exp"].as_u64().unwrap() > claims["iat"].as_u64().unwrap());
    t
}

#[tokio::test]
async fn raw_http_dialect() {
    let emu = Emulator::start().unwrap();
    let base = emu.base_url().to_owned();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let tok = token(&http, &base, emu.api_key(), "/identity/token").await;
    let _ = token(&http, &base, emu.api_key(), "/oidc/token").await;

    // IAM refuses unknown keys with its own error JSON.
    let r = http
        .post(format!("{base}/identity/token"))
        .body("grant_type=urn%3Aibm%3Aparams%3Aoauth%3Agrant-type%3Aapikey&apikey=nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["errorCode"], "BXNIM0415E");
    assert!(v["context"]["requestId"].is_string());

    let root = emu.create_root_key("raw");
    let wrap_url = format!("{base}/api/v2/keys/{root}/actions/wrap");
    // No token: 401 with the error collection.
    let r = http
        .post(&wrap_url)
        .header("bluemix-instance", emu.instance_id())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["metadata"]["collectionType"],
        "application/vnd.ibm.kms.error+json"
    );
    assert_eq!(v["resources"][0]["reasons"][0]["code"], "UNAUTHORIZED_ERR");
    // No instance header: 400 naming the header.
    let r = http.post(&wrap_url).bearer_auth(&tok).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["resources"][0]["reasons"][0]["target"]["name"],
        "bluemix-instance"
    );

    // Wrap (path form, generated DEK) with the correlation id echoed.
    let r = http
        .post(&wrap_url)
        .bearer_auth(&tok)
        .header("bluemix-instance", emu.instance_id())
        .header("correlation-id", "11111111-1111-4111-8111-111111111111")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["correlation-id"],
        "11111111-1111-4111-8111-111111111111"
    );
    let v: Value = r.json().await.unwrap();
    let dek = v["plaintext"].as_str().unwrap().to_owned();
    let ct = v["ciphertext"].as_str().unwrap().to_owned();

    // Legacy ?action=unwrap form.
    let r = http
        .post(format!("{base}/api/v2/keys/{root}?action=unwrap"))
        .bearer_auth(&tok)
        .header("bluemix-instance", emu.instance_id())
        .header("content-type", "application/vnd.ibm.kms.key_action+json")
        .json(&json!({"ciphertext": ct}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["plaintext"].as_str().unwrap(), dek);
    assert_eq!(emu.successes(Op::Unwrap), 1);

    // Line-wrapped base64 plaintext is accepted, like Go's StdEncoding.
    let r = http
        .post(&wrap_url)
        .bearer_auth(&tok)
        .header("bluemix-instance", emu.instance_id())
        .json(&json!({"plaintext": "aGVsbG8g\nd29ybGQ=\n"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .post(&wrap_url)
        .bearer_auth(&tok)
        .header("bluemix-instance", emu.instance_id())
        .json(&json!({"plaintext": "*** not base64 ***"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["resources"][0]["reasons"][0]["code"], "INVALID_FIELD_ERR");
    assert_eq!(v["resources"][0]["reasons"][0]["target"]["name"], "plaintext");

    // HEAD /keys gives the count.
    let r = http
        .head(format!("{base}/api/v2/keys"))
        .bearer_auth(&tok)
        .header("bluemix-instance", emu.instance_id())
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["key-total"], "1");

    // Injected 429 carries Retry-After.
    emu.inject(
        Some(Op::GetKeyMetadata),
        Fault::TooManyRequests {
            retry_after: Some("7".into()),
        },
        1,
    );
    let r = http
        .get(format!("{base}/api/v2/keys/{root}/metadata"))
        .bearer_auth(&tok)
        .header("bluemix-instance", emu.instance_id())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "7");
    assert_eq!(emu.pending_faults(), 0);
}

#[tokio::test]
async fn kp_wrap_and_unwrap_helpers_for_kp_key_secrets() {
    let emu = Emulator::start().unwrap();
    let kp = Client::new(emu.config()).unwrap();
    let root = emu.create_root_key("secrets");
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("private.pem");
    let content = b"-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----\n";
    std::fs::write(&pem, content).unwrap();

    let ct = wrap_file_for_secret(&kp, &root, &pem).await.unwrap();
    // What `ibmcloud kp key wrap -p "$(base64 -w0 private.pem)"` gives: unwrap's plaintext is
    // base64 of the file.
    let u = kp.unwrap(&root, &ct, None).await.unwrap();
    assert_eq!(&u.plaintext[..], content);
    assert_eq!(
        &unwrap_for_secret(&kp, &root, &format!("  {ct}\n")).await.unwrap()[..],
        content
    );
    // A Secret whose ciphertext went under `data:` holds the decoded envelope.
    let envelope = String::from_utf8(b64::decode_lenient(&ct).unwrap()).unwrap();
    assert_eq!(
        &unwrap_for_secret(&kp, &root, &envelope).await.unwrap()[..],
        content
    );

    let link = dir.path().join("link.pem");
    std::os::unix::fs::symlink(&pem, &link).unwrap();
    assert!(wrap_file_for_secret(&kp, &root, &link)
        .await
        .unwrap_err()
        .to_string()
        .contains("symlink"));
}

#[tokio::test]
async fn kp_emulator_binary_prints_its_url_first() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cfg.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kp-emulator"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--root-key",
            "ci-root",
            "--write-config",
        ])
        .arg(&cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = Vec::new();
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let done = l == "ready";
            lines.push(l);
            if done {
                break;
            }
        }
        let _ = tx.send(lines);
    });
    let lines = rx.recv_timeout(Duration::from_secs(30));
    let lines = match lines {
        Ok(l) => l,
        Err(_) => {
            let _ = child.kill();
            panic!("kp-emulator did not start within 30 s");
        }
    };
    let result = async {
        assert!(lines[0].starts_with("http://127.0.0.1:"), "{lines:?}");
        let root_line = lines
            .iter()
            .find(|l| l.starts_with("root-key ci-root "))
            .expect("root key line");
        let root = root_line.rsplit(' ').next().unwrap().to_owned();
        let kp = Client::new(KeyProtectConfig::from_file(&cfg).unwrap()).unwrap();
        assert_eq!(kp.url(), lines[0]);
        let w = kp.wrap(&root, b"ci", None).await.unwrap();
        assert_eq!(
            &kp.unwrap(&root, &w.ciphertext, None).await.unwrap().plaintext[..],
            b"ci"
        );
        // The admin API: faults, counts, key states, for CI in any language.
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let admin = |p: &str| format!("{}/_emulator/{p}", lines[0]);
        let r = http
            .post(admin("faults"))
            .json(&json!({"op": "unwrap", "fault": "503", "times": 2}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
        let r = http
            .post(admin("faults"))
            .json(&json!({"op": "nope", "fault": "503"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        assert_eq!(
            &kp.unwrap(&root, &w.ciphertext, None).await.unwrap().plaintext[..],
            b"ci"
        );
        let counts: Value = http
            .get(admin("counts"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(counts["unwrap"], 4, "{counts}");
        assert_eq!(counts["wrap"], 1, "{counts}");
        let r = http
            .post(admin(&format!("keys/{root}/state")))
            .json(&json!({"state": 2}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
        assert_eq!(
            kp.unwrap(&root, &w.ciphertext, None).await.unwrap_err().status(),
            Some(409)
        );
        let created: Value = http
            .post(admin("keys"))
            .json(&json!({"name": "k2"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let k2 = created["id"].as_str().unwrap();
        assert_eq!(kp.get_key_metadata(k2).await.unwrap().name, "k2");
        assert_eq!(http.post(admin("reset")).send().await.unwrap().status(), 204);
        let counts: Value = http
            .get(admin("counts"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(counts, json!({}));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&cfg).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    result
}

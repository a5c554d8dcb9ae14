//! End to end: the real kube-runtime watcher against the API stand-in, the Key Protect emulator for
//! `kp-key` Secrets, and skopeo decrypting a skopeo-encrypted image with exactly the files written.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use common::*;
use keyprotect_emulator::{Emulator, Op};
use testkit::kube::KubeStandin;

const WAIT: Duration = Duration::from_secs(30);

/// Decrypts the skopeo-made `enc-jwe` vector with `key` and checks the result is the plaintext source.
fn skopeo_decrypts_with(key: &Path) {
    skopeo_decrypts_layout_with("enc-jwe", key);
}

/// Decrypts the skopeo-made vector `layout` with `key` and checks the result is the plaintext source.
fn skopeo_decrypts_layout_with(layout: &str, key: &Path) {
    if !testkit::tools::have_tool("skopeo") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let src = vectors().join("layouts").join(layout);
    let out = t.path().join("out");
    testkit::tools::skopeo_ok(&[
        "copy",
        "--decryption-key",
        key.to_str().unwrap(),
        &format!("oci:{}:v1", src.display()),
        &format!("oci:{}:v1", out.display()),
    ]);
    let layers = |dir: &Path| -> Vec<(String, String)> {
        let m = testkit::image::manifest(dir, "v1");
        m["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                (
                    l["mediaType"].as_str().unwrap().to_string(),
                    l["digest"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    assert_eq!(
        layers(&out),
        layers(&vectors().join("layouts/src")),
        "decrypted image differs from the source"
    );
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_secret_lifecycle_and_skopeo_decrypts() {
    let standin = KubeStandin::start().await.unwrap();
    let t = tempfile::tempdir().unwrap();
    let crio = t.path().join("crio/keys/synced");
    let ctrd = t.path().join("containerd/keys/synced");
    let agent = start(&standin, options(vec![crio.clone(), ctrd.clone()]));

    // An unrelated Secret in the namespace (ignored) and the key Secret.
    standin
        .create_secret(secret("other", "Opaque", &[("x", b"not a key")]))
        .unwrap();
    standin
        .create_secret(secret("team-a", "key", &[("rsa.pem", &key("rsa.pem"))]))
        .unwrap();
    let file = crio.join("team-a/rsa.pem");
    wait_for("the key files", WAIT, || {
        read(&file).is_some() && read(&ctrd.join("team-a/rsa.pem")).is_some()
    })
    .await;
    assert_eq!(read(&file).unwrap(), key("rsa.pem"));
    assert_eq!(read(&ctrd.join("team-a/rsa.pem")).unwrap(), key("rsa.pem"));
    assert_eq!(mode(&file), 0o600);
    assert_eq!(mode(&crio.join("team-a")), 0o700);
    assert_eq!(mode(&crio), 0o700);
    assert_eq!(all_files(&crio), vec!["team-a/rsa.pem"]);
    wait_for("ready", WAIT, || agent.health.is_ready()).await;
    skopeo_decrypts_with(&file);

    // Update: the file is replaced (EC key, the other recipient of enc-jwe).
    let mut s = standin.get_secret(NS, "team-a").unwrap();
    s.data = Some([("rsa.pem".to_string(), k8s_openapi::ByteString(key("ec.p8.pem")))].into());
    standin.apply_secret(s).unwrap();
    wait_for("the updated key", WAIT, || read(&file) == Some(key("ec.p8.pem"))).await;
    skopeo_decrypts_with(&file);

    // A second entry, then removing an entry from the Secret removes its file.
    let mut s = standin.get_secret(NS, "team-a").unwrap();
    s.data = Some(
        [
            ("ec.pem".to_string(), k8s_openapi::ByteString(key("ec.p8.pem"))),
            ("ec.der".to_string(), k8s_openapi::ByteString(key("ec.sec1.der"))),
        ]
        .into(),
    );
    standin.apply_secret(s).unwrap();
    wait_for("entries replaced", WAIT, || {
        all_files(&crio) == vec!["team-a/ec.der", "team-a/ec.pem"]
    })
    .await;

    // Delete: the files and the Secret's directory go, in every target.
    assert!(standin.delete_secret(NS, "team-a"));
    wait_for("removal", WAIT, || entries(&crio) == vec![".keysync-agent"]).await;
    wait_for("removal (containerd dir)", WAIT, || {
        entries(&ctrd) == vec![".keysync-agent"]
    })
    .await;

    // Shutdown leaves files alone.
    standin
        .create_secret(secret("team-b", "key", &[("k.pem", &key("rsa.pem"))]))
        .unwrap();
    wait_for("team-b", WAIT, || read(&crio.join("team-b/k.pem")).is_some()).await;
    let summary = agent.stop().await;
    assert!(summary.synced);
    assert!(summary.problems.is_empty(), "{:?}", summary.problems);
    assert_eq!(read(&crio.join("team-b/k.pem")).unwrap(), key("rsa.pem"));
    // No Events: nothing went wrong.
    assert!(standin.events().is_empty(), "{:?}", standin.events());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kp_key_secrets_are_unwrapped_once_and_decrypt() {
    let emu = Emulator::start().unwrap();
    let root = emu.create_root_key("image-keys");
    let kp = keyprotect_client::Client::new(emu.config()).unwrap();
    let pem = key("rsa.pem");
    // The documented procedure: wrap base64(private.pem); Key Protect stores the PEM bytes.
    let wrapped = kp.wrap(&root, &pem, None).await.unwrap().ciphertext;

    let standin = KubeStandin::start().await.unwrap();
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("synced");
    let agent = start(&standin, options(vec![dir.clone()]));

    // IBM's layout, as `stringData` (the API server stores the ciphertext string; a trailing newline
    // as from --from-file).
    let ibm = secret(
        "wrapped",
        "kp-key",
        &[
            ("rootkeyid", format!("{root}\n").as_bytes()),
            ("ciphertext", format!("{wrapped}\n").as_bytes()),
        ],
    );
    standin.create_secret(ibm).unwrap();
    // Without the config Secret: reported, nothing written.
    wait_for("a config-missing Event", WAIT, || {
        event_reasons(&standin, "wrapped").contains(&"KeyProtectConfigMissing".to_string())
    })
    .await;
    assert!(all_files(&dir).is_empty());
    assert_eq!(emu.count(Op::Unwrap), 0);

    standin
        .create_secret(secret(
            "keyprotect-config",
            "Opaque",
            &[("config.json", emu.config_json().as_bytes())],
        ))
        .unwrap();
    let file = dir.join("wrapped/wrapped.pem");
    wait_for("the unwrapped key", WAIT, || read(&file).is_some()).await;
    assert_eq!(read(&file).unwrap(), pem);
    assert_eq!(mode(&file), 0o600);
    skopeo_decrypts_with(&file);

    // The blog layout: a file name mapped to the ciphertext under `data:` (so the agent receives the
    // decoded JSON envelope), the root key from the annotation.
    let envelope = base64::engine::general_purpose::STANDARD
        .decode(&wrapped)
        .unwrap();
    let mut blog = secret("blog", "kp-key", &[("private.pem", &envelope)]);
    blog.metadata.annotations = Some([("keysync.imgcrypt.io/rootkeyid".to_string(), root.clone())].into());
    standin.create_secret(blog).unwrap();
    // And a double-encoded plaintext (base64(base64(pem)) wrapped).
    let b64 = base64::engine::general_purpose::STANDARD.encode(&pem);
    let double = kp.wrap(&root, b64.as_bytes(), None).await.unwrap().ciphertext;
    standin
        .create_secret(secret(
            "double",
            "kp-key",
            &[("rootkeyid", root.as_bytes()), ("ciphertext", double.as_bytes())],
        ))
        .unwrap();
    wait_for("all kp-key files", WAIT, || {
        all_files(&dir) == vec!["blog/private.pem", "double/double.pem", "wrapped/wrapped.pem"]
    })
    .await;
    assert_eq!(read(&dir.join("blog/private.pem")).unwrap(), pem);
    assert_eq!(read(&dir.join("double/double.pem")).unwrap(), pem);
    // "blog" carries the same ciphertext and root key as "wrapped": served from the cache.
    let unwraps = emu.count(Op::Unwrap);
    assert_eq!(unwraps, 2, "one unwrap per distinct ciphertext");

    // Unrelated changes, a relist after an API server restart: no new unwrap.
    standin
        .create_secret(secret("plain", "key", &[("k.pem", &key("ec.p8.pem"))]))
        .unwrap();
    wait_for("plain", WAIT, || read(&dir.join("plain/k.pem")).is_some()).await;
    let relists = agent.metrics.relists.load(std::sync::atomic::Ordering::Relaxed);
    // (A change while the server is down makes the watcher's resource version too old: 410, relist.)
    standin
        .restart_with(|s| {
            s.create_secret(secret("unrelated", "Opaque", &[("a", b"b")]))
                .unwrap();
        })
        .await
        .unwrap();
    wait_for("a relist", WAIT, || {
        agent.metrics.relists.load(std::sync::atomic::Ordering::Relaxed) > relists
    })
    .await;
    // Drift repair: a file deleted by hand comes back from the cache, without Key Protect.
    std::fs::remove_file(&file).unwrap();
    let mut s = standin.get_secret(NS, "plain").unwrap();
    s.metadata.labels = Some([("touch".to_string(), "1".to_string())].into());
    standin.apply_secret(s).unwrap();
    wait_for("repaired file", WAIT, || read(&file).is_some()).await;
    assert_eq!(
        emu.count(Op::Unwrap),
        unwraps,
        "unwrap only when a ciphertext changes"
    );
    assert_eq!(agent.metrics.unwrap_calls_total(), 2);

    // A new ciphertext (rewrapped with a rotated root key) is unwrapped once more.
    emu.rotate_key(&root);
    let rewrapped = kp.wrap(&root, &key("ec.p8.pem"), None).await.unwrap().ciphertext;
    let mut s = standin.get_secret(NS, "wrapped").unwrap();
    s.data = Some(
        [
            (
                "rootkeyid".to_string(),
                k8s_openapi::ByteString(root.clone().into_bytes()),
            ),
            (
                "ciphertext".to_string(),
                k8s_openapi::ByteString(rewrapped.into_bytes()),
            ),
        ]
        .into(),
    );
    standin.apply_secret(s).unwrap();
    wait_for("the new key", WAIT, || read(&file) == Some(key("ec.p8.pem"))).await;
    assert_eq!(emu.count(Op::Unwrap), unwraps + 1);

    // Deleting the kp-key Secret removes its file.
    standin.delete_secret(NS, "wrapped");
    wait_for("removal", WAIT, || !dir.join("wrapped").exists()).await;
    let summary = agent.stop().await;
    assert!(summary.problems.is_empty(), "{:?}", summary.problems);
}

/// Issue 11 item 5: GPG secret keyrings are decryption keys. A binary one is written as is; an
/// armored one is written binary (the only form Go runtimes read), and skopeo decrypts the
/// skopeo-made pgp image with it; a damaged keyring, a public one and armor around junk are
/// refused with an Event that names the problem and quotes nothing of the input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpg_secret_keyrings_are_written_in_the_form_runtimes_read() {
    let standin = KubeStandin::start().await.unwrap();
    let t = tempfile::tempdir().unwrap();
    let crio = t.path().join("crio/keys/synced");
    let agent = start(&standin, options(vec![crio.clone()]));
    let armored = key("pgp-secret.asc");
    let binary = ocicrypt_core::pgp::secret_keyring_binary(&armored, "pgp-secret.asc")
        .unwrap()
        .to_vec();
    standin
        .create_secret(secret(
            "pgp",
            "key",
            &[("secret.asc", &armored), ("secring.gpg", &binary)],
        ))
        .unwrap();
    let junk = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0NTY3";
    let mut cut = binary.clone();
    cut.truncate(binary.len() / 2);
    let armored_junk =
        format!("-----BEGIN PGP PRIVATE KEY BLOCK-----\n\n{junk}\n-----END PGP PRIVATE KEY BLOCK-----\n");
    standin
        .create_secret(secret("bad-cut", "key", &[("k.gpg", &cut)]))
        .unwrap();
    standin
        .create_secret(secret("bad-armor", "key", &[("k.asc", armored_junk.as_bytes())]))
        .unwrap();
    standin
        .create_secret(secret("bad-public", "key", &[("k.asc", &key("pgp-public.asc"))]))
        .unwrap();
    wait_for("the keyrings", WAIT, || {
        read(&crio.join("pgp/secret.asc")).is_some() && read(&crio.join("pgp/secring.gpg")).is_some()
    })
    .await;
    assert_eq!(
        read(&crio.join("pgp/secring.gpg")).unwrap(),
        binary,
        "binary: as is"
    );
    let written = read(&crio.join("pgp/secret.asc")).unwrap();
    assert_eq!(written, binary, "armored: written as the binary keyring");
    for bad in ["bad-cut", "bad-armor", "bad-public"] {
        wait_for(bad, WAIT, || {
            event_reasons(&standin, bad).contains(&"InvalidKey".to_string())
        })
        .await;
    }
    assert_eq!(all_files(&crio), vec!["pgp/secret.asc", "pgp/secring.gpg"]);
    let events = serde_json::to_string(&standin.events()).unwrap();
    assert!(events.contains("GPG secret keyring"), "{events}");
    assert!(!events.contains(&junk[..24]), "{events}");
    // What Go reads from a runtime's key directory decrypts the skopeo-made pgp image.
    skopeo_decrypts_layout_with("enc-pgp", &crio.join("pgp/secret.asc"));
    let summary = agent.stop().await;
    assert!(!summary.problems.is_empty());
}

//! The `keyprotect-keyprovider` binary, configured through `OCICRYPT_KEYPROVIDER_CONFIG` and
//! driven by ocicrypt-core's key-provider client, against the Key Protect emulator. Also fed the
//! committed Go-shaped requests directly, and ocicrypt-rs-shaped ones (number arrays).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use keyprotect_client::wrapper::KeyProtectBlob;
use keyprotect_client::{Client, KeyProtectUnwrapper, KeyProtectWrapper};
use keyprotect_emulator::{Emulator, Op};
use ocicrypt_core::cipher::{LayerKey, MacTag, Nonce};
use ocicrypt_core::keyprovider::{CommandProvider, KeyProviderConfig, KeyProviderResponse, ENV_CONFIG};
use ocicrypt_core::keywrap::{error_chain, unwrap_options, wrap_options};
use ocicrypt_core::{AsyncKeyUnwrapper, AsyncKeyWrapper, PrivateLayerOptions, PublicLayerOptions};

const BIN: &str = env!("CARGO_BIN_EXE_keyprotect-keyprovider");

fn core_sample(name: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../ocicrypt-core/tests/data/keyprovider")
        .join(name);
    let mut v = std::fs::read(p).unwrap();
    while v.last() == Some(&b'\n') {
        v.pop();
    }
    v
}

fn write_kp_config(dir: &Path, emu: &Emulator) -> PathBuf {
    let p = dir.join("kp-config.json");
    std::fs::write(&p, emu.config_json()).unwrap();
    p
}

#[tokio::test]
async fn keyprovider_binary_through_ocicrypt_keyprovider_config() {
    let emu = Emulator::start().unwrap();
    let root = emu.create_root_key("image-keys");
    let dir = tempfile::tempdir().unwrap();
    let kp_cfg = write_kp_config(dir.path(), &emu);
    let provider_cfg = dir.path().join("ocicrypt-keyprovider.json");
    std::fs::write(
        &provider_cfg,
        serde_json::json!({"key-providers": {"keyprotect": {"cmd": {"path": BIN, "args": ["--config", kp_cfg]}}}})
            .to_string(),
    )
    .unwrap();
    // The only test in this binary that touches the environment.
    std::env::set_var(ENV_CONFIG, &provider_cfg);
    let cfg = KeyProviderConfig::from_env()
        .unwrap()
        .expect("providers from OCICRYPT_KEYPROVIDER_CONFIG");
    std::env::remove_var(ENV_CONFIG);

    let key = LayerKey::generate();
    let nonce = Nonce::generate();
    let private = PrivateLayerOptions::new(&key, &nonce, "sha256:0123");
    let public = PublicLayerOptions::new(&MacTag([9; 32]));

    // Encrypt side: provider:keyprotect:<root>.
    let w: Arc<dyn AsyncKeyWrapper> = Arc::new(
        cfg.wrapper("keyprotect", vec![root.clone().into_bytes()])
            .unwrap(),
    );
    assert_eq!(w.scheme(), "provider.keyprotect");
    let ann = wrap_options(&private, &public, &[w]).await.unwrap();
    let entry = &ann["org.opencontainers.image.enc.keys.provider.keyprotect"];
    let blob = KeyProtectBlob::parse(&ocicrypt_core::options::decode_b64(entry).unwrap()).unwrap();
    assert_eq!(blob.root_key_id, root);
    assert_eq!(blob.instance_id, emu.instance_id());
    assert_eq!(emu.successes(Op::Wrap), 1);

    // Decrypt side through the provider.
    // (on tokio's blocking pool, as imgcrypt runs providers)
    let u: Vec<Arc<dyn AsyncKeyUnwrapper>> = cfg.unwrappers().into_iter().map(|u| u.into_async()).collect();
    let (back, _) = unwrap_options(&ann, &u).await.unwrap();
    assert_eq!(back.digest, "sha256:0123");
    assert_eq!(back.key().unwrap().as_bytes(), key.as_bytes());
    assert_eq!(emu.successes(Op::Unwrap), 1);

    // The same annotation opens with imgcrypt's built-in Key Protect unwrapper, and the
    // built-in wrapper's annotation opens with the provider: the formats are one.
    let client = Client::new(emu.config()).unwrap();
    let native: Vec<Arc<dyn AsyncKeyUnwrapper>> = vec![Arc::new(KeyProtectUnwrapper::new(client.clone()))];
    let (back2, _) = unwrap_options(&ann, &native).await.unwrap();
    assert_eq!(back2.key().unwrap().as_bytes(), key.as_bytes());
    let native_w: Arc<dyn AsyncKeyWrapper> = Arc::new(KeyProtectWrapper::new(client, root.clone()));
    let ann2 = wrap_options(&private, &public, &[native_w]).await.unwrap();
    let (back3, _) = unwrap_options(&ann2, &u).await.unwrap();
    assert_eq!(back3.key().unwrap().as_bytes(), key.as_bytes());
    assert_eq!(emu.successes(Op::Unwrap), 3);

    // A disabled root key: the provider fails and its stderr reaches the caller.
    emu.disable_key(&root);
    let e = unwrap_options(&ann, &u).await.unwrap_err();
    let chain = error_chain(&e);
    assert!(chain.contains("409") && chain.contains("disabled"), "{chain}");
    emu.enable_key(&root);
    emu.delete_key(&root);
    let chain = error_chain(&unwrap_options(&ann, &u).await.unwrap_err());
    assert!(chain.contains("410") && chain.contains("deleted"), "{chain}");
}

#[test]
fn go_shaped_requests_and_number_arrays_are_served() {
    let emu = Emulator::start().unwrap();
    // The committed Go request names the provider "kpsample" and the root key "root-key-alias".
    emu.create_root_key_with_aliases("sample", &["root-key-alias"]);
    let dir = tempfile::tempdir().unwrap();
    let kp_cfg = write_kp_config(dir.path(), &emu);
    let provider = CommandProvider::new(
        "kpsample",
        BIN,
        vec![
            "--config".into(),
            kp_cfg.display().to_string(),
            "--name".into(),
            "kpsample".into(),
        ],
    );
    let out = provider.run(&core_sample("go-keywrap-request.json")).unwrap();
    let text = std::str::from_utf8(&out).unwrap();
    assert!(
        text.starts_with(r#"{"keywrapresults":{"annotation":""#),
        "base64 string like Go: {text}"
    );
    let resp: KeyProviderResponse = serde_json::from_slice(&out).unwrap();
    let annotation = resp.keywrapresults.unwrap().annotation.unwrap().0.clone();
    let blob = KeyProtectBlob::parse(&annotation).unwrap();
    assert_eq!(blob.root_key_id, "root-key-alias");

    // ocicrypt-rs writes byte fields as arrays of numbers.
    let req = serde_json::json!({
        "op": "keyunwrap",
        "keywrapparams": {"ec": null, "optsdata": null},
        "keyunwrapparams": {"dc": {"Parameters": {}}, "annotation": annotation},
    });
    let out = provider.run(req.to_string().as_bytes()).unwrap();
    let resp: KeyProviderResponse = serde_json::from_slice(&out).unwrap();
    assert_eq!(
        resp.keyunwrapresults.unwrap().optsdata.unwrap().0,
        core_sample("optsdata.json")
    );

    // Requests that cannot be served fail with a reason on stderr.
    let e = provider.run(br#"{"op":"keywrap","keywrapparams":{"ec":{"Parameters":{"kpsample":[]},"DecryptConfig":{"Parameters":{}}},"optsdata":"e30="},"keyunwrapparams":{"dc":null,"annotation":null}}"#).unwrap_err();
    assert!(e.to_string().contains("no root key id"), "{e}");
    let e = provider.run(b"{").unwrap_err();
    assert!(e.to_string().contains("invalid keyprovider request"), "{e}");
    let e = CommandProvider::new("kp", BIN, vec![])
        .run(b"{}")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no Key Protect config") || e.contains("Key Protect"),
        "without a config the binary says what to set: {e}"
    );
}

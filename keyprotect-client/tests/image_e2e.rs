//! End to end: an image encrypted for `provider:keyprotect:<root-key-id>` decrypts with the Key
//! Protect config alone, fails clearly without it, after the root key is disabled, and after it
//! is deleted.
//!
//! (Debian's skopeo 1.9.3 is built without ocicrypt's keyprovider support: its binary has no
//! `OCICRYPT_KEYPROVIDER_CONFIG` at all, so a skopeo round trip through the
//! `keyprotect-keyprovider` binary cannot run here; the provider is driven with Go-shaped
//! requests in `tests/keyprovider.rs` instead.)

use std::path::Path;
use std::sync::Arc;

use keyprotect_client::wrapper::KeyProtectBlob;
use keyprotect_client::{Client, KeyProtectConfig, KeyProtectUnwrapper, KeyProtectWrapper};
use keyprotect_emulator::{Emulator, Op};
use ocicrypt_core::image::layout::OciLayout;
use ocicrypt_core::image::ops::NoProgress;
use ocicrypt_core::image::{transform_image, LayerSelection, Operation};
use ocicrypt_core::keywrap::error_chain;
use ocicrypt_core::{AsyncKeyUnwrapper, AsyncKeyWrapper};
use testkit::image::{manifest, write_image, Compression, LayerSpec};

const KEYS_ANNOTATION: &str = "org.opencontainers.image.enc.keys.provider.keyprotect";

async fn run(src: &Path, dst: &Path, op: Operation) -> Result<(), ocicrypt_core::Error> {
    transform_image(
        Arc::new(OciLayout::open(src, Some("v1"))?),
        Arc::new(OciLayout::open_or_create(dst, Some("v1"))?),
        op,
        LayerSelection::default(),
        Arc::new(NoProgress),
        2,
    )
    .await
    .map(drop)
}

fn decrypt_op(client: &Client) -> Operation {
    Operation::Decrypt {
        unwrappers: vec![Arc::new(KeyProtectUnwrapper::new(client.clone())) as Arc<dyn AsyncKeyUnwrapper>],
    }
}

fn layer_digests(layout: &Path) -> Vec<String> {
    manifest(layout, "v1")["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn keyprotect_recipient_end_to_end() {
    let emu = Emulator::start().unwrap();
    let root = emu.create_root_key("image-keys");
    let dir = tempfile::tempdir().unwrap();
    let (plain, enc) = (dir.path().join("plain"), dir.path().join("enc"));
    let facts = write_image(
        &plain,
        "v1",
        &[
            LayerSpec::random(200_000, 1, Compression::Gzip),
            LayerSpec::random(50_000, 2, Compression::None),
        ],
    );

    // Encrypt: the wrapper needs only the client and the root key id.
    let cfg_path = dir.path().join("config.json");
    std::fs::write(&cfg_path, emu.config_json()).unwrap();
    let client = Client::new(KeyProtectConfig::from_file(&cfg_path).unwrap()).unwrap();
    let w = Arc::new(KeyProtectWrapper::new(client.clone(), root.clone())) as Arc<dyn AsyncKeyWrapper>;
    run(&plain, &enc, Operation::Encrypt { wrappers: vec![w] })
        .await
        .unwrap();
    let m = manifest(&enc, "v1");
    for l in m["layers"].as_array().unwrap() {
        assert!(l["mediaType"].as_str().unwrap().ends_with("+encrypted"));
        let entry = l["annotations"][KEYS_ANNOTATION]
            .as_str()
            .expect("provider.keyprotect annotation");
        let blob = KeyProtectBlob::parse(&ocicrypt_core::options::decode_b64(entry).unwrap()).unwrap();
        assert_eq!(blob.root_key_id, root);
        assert_eq!(blob.instance_id, emu.instance_id());
        assert!(l["annotations"]["org.opencontainers.image.enc.keys.jwe"].is_null());
    }
    assert_eq!(emu.successes(Op::Wrap), 2, "one wrap per layer key");

    // Decrypt with the Key Protect config only (a fresh client, as a new process would have).
    emu.reset_counts();
    let fresh = Client::new(KeyProtectConfig::from_file(&cfg_path).unwrap()).unwrap();
    let out = dir.path().join("out");
    run(&enc, &out, decrypt_op(&fresh)).await.unwrap();
    let want: Vec<String> = facts.layers.iter().map(|l| l.digest.clone()).collect();
    assert_eq!(layer_digests(&out), want, "decrypted layers are byte-identical");
    assert_eq!(emu.successes(Op::Unwrap), 2, "exactly one unwrap per layer");

    // Without the config: no unwrapper for provider.keyprotect, and the error says so.
    let e = run(
        &enc,
        &dir.path().join("nokey"),
        Operation::Decrypt { unwrappers: vec![] },
    )
    .await
    .unwrap_err();
    let chain = error_chain(&e);
    assert!(chain.contains("provider.keyprotect"), "{chain}");

    // A config for another instance: refused without calling Key Protect.
    emu.reset_counts();
    let mut other = emu.config();
    other.instance_id = "00000000-0000-4000-8000-000000000000".into();
    let e = run(
        &enc,
        &dir.path().join("other"),
        decrypt_op(&Client::new(other).unwrap()),
    )
    .await
    .unwrap_err();
    let chain = error_chain(&e);
    assert!(
        chain.contains("instance") && chain.contains(emu.instance_id()),
        "{chain}"
    );
    assert_eq!(emu.count(Op::Unwrap), 0);

    // Root key disabled: a clear 409.
    emu.disable_key(&root);
    let e = run(&enc, &dir.path().join("disabled"), decrypt_op(&fresh))
        .await
        .unwrap_err();
    let chain = error_chain(&e);
    assert!(chain.contains("409") && chain.contains("disabled"), "{chain}");
    assert!(
        !dir.path().join("disabled/index.json").exists()
            || layer_digests(&dir.path().join("disabled")).is_empty()
    );

    // Re-enabled, it works again; deleted, a clear 410.
    emu.enable_key(&root);
    run(&enc, &dir.path().join("again"), decrypt_op(&fresh))
        .await
        .unwrap();
    emu.delete_key(&root);
    let e = run(&enc, &dir.path().join("deleted"), decrypt_op(&fresh))
        .await
        .unwrap_err();
    let chain = error_chain(&e);
    assert!(chain.contains("410") && chain.contains("deleted"), "{chain}");
}

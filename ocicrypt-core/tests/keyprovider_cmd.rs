//! The key-provider client against `cmd` providers, with the exact JSON that Go's ocicrypt
//! writes and reads (committed samples in `tests/data/keyprovider/`).
//!
//! The provider here is `/bin/sh` saving its stdin and answering a committed sample, so the
//! request bytes are compared exactly. The Key Protect keyprovider binary is driven through
//! `OCICRYPT_KEYPROVIDER_CONFIG` in `keyprotect-client/tests/keyprovider.rs`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ocicrypt_core::cipher::MacTag;
use ocicrypt_core::keyprovider::{
    CommandProvider, KeyProviderConfig, KeyProviderUnwrapper, KeyProviderWrapper, ENV_CONFIG,
};
use ocicrypt_core::keywrap::{append_entry, unwrap_options};
use ocicrypt_core::mediatype::PUBOPTS_ANNOTATION;
use ocicrypt_core::{AsyncKeyUnwrapper, KeyUnwrapper, KeyWrapper, PublicLayerOptions};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/keyprovider")
        .join(name)
}

fn sample(name: &str) -> Vec<u8> {
    let mut v = std::fs::read(data(name)).unwrap();
    while v.last() == Some(&b'\n') {
        v.pop();
    }
    v
}

/// A provider that saves its request in `capture` and prints `answer`.
fn recording_provider(dir: &Path, answer: &str) -> (CommandProvider, PathBuf) {
    let capture = dir.join(format!("{answer}.request"));
    let p = CommandProvider::new(
        "kpsample",
        "/bin/sh",
        vec![
            "-c".into(),
            r#"cat > "$0" && cat "$1""#.into(),
            capture.display().to_string(),
            data(answer).display().to_string(),
        ],
    );
    (p, capture)
}

#[test]
fn keywrap_request_is_byte_exact_go_json_and_go_answers_parse() {
    let dir = tempfile::tempdir().unwrap();
    for answer in ["go-keywrap-response.json", "rs-keywrap-response.json"] {
        let (p, capture) = recording_provider(dir.path(), answer);
        let w = KeyProviderWrapper::new(p, vec![b"root-key-alias".to_vec()]);
        assert_eq!(KeyWrapper::scheme(&w), "provider.kpsample");
        let blob = w.wrap_keys(&sample("optsdata.json")).unwrap();
        assert_eq!(blob, sample("blob.json"), "{answer}");
        assert_eq!(
            String::from_utf8(std::fs::read(&capture).unwrap()).unwrap(),
            String::from_utf8(sample("go-keywrap-request.json")).unwrap()
        );
    }
}

#[test]
fn keyunwrap_request_is_byte_exact_go_json_and_go_answers_parse() {
    let dir = tempfile::tempdir().unwrap();
    for answer in ["go-keyunwrap-response.json", "rs-keyunwrap-response.json"] {
        let (p, capture) = recording_provider(dir.path(), answer);
        let u = KeyProviderUnwrapper::new(p);
        let opts = KeyUnwrapper::unwrap_key(&u, &sample("blob.json")).unwrap();
        assert_eq!(&opts[..], &sample("optsdata.json")[..], "{answer}");
        assert_eq!(
            String::from_utf8(std::fs::read(&capture).unwrap()).unwrap(),
            String::from_utf8(sample("go-keyunwrap-request.json")).unwrap()
        );
    }
}

#[tokio::test]
async fn provider_from_env_config_unwraps_a_layer_through_the_core() {
    let dir = tempfile::tempdir().unwrap();
    let capture = dir.path().join("req.json");
    let config = serde_json::json!({
        "key-providers": {
            "kpsample": {"cmd": {"path": "/bin/sh", "args": [
                "-c", r#"cat > "$0" && cat "$1""#,
                capture.display().to_string(),
                data("go-keyunwrap-response.json").display().to_string(),
            ]}},
            "remote": {"ttrpc": "unix:///run/kp.sock"}
        }
    });
    let cfg_path = dir.path().join("ocicrypt-keyprovider.json");
    std::fs::write(&cfg_path, config.to_string()).unwrap();
    // The only test in this binary that reads the environment.
    std::env::set_var(ENV_CONFIG, &cfg_path);
    let cfg = KeyProviderConfig::from_env()
        .unwrap()
        .expect("config from OCICRYPT_KEYPROVIDER_CONFIG");
    std::env::remove_var(ENV_CONFIG);

    let e = cfg.unwrapper("remote").unwrap_err().to_string();
    assert!(e.contains("ttrpc") && e.contains("not support"), "{e}");
    let unwrappers: Vec<Arc<dyn AsyncKeyUnwrapper>> = cfg
        .unwrappers()
        .into_iter()
        .map(|u| Arc::new(u) as Arc<dyn AsyncKeyUnwrapper>)
        .collect();
    assert_eq!(unwrappers.len(), 1, "the ttrpc provider is skipped");

    let mut ann = BTreeMap::new();
    append_entry(&mut ann, "provider.kpsample", &sample("blob.json"));
    ann.insert(
        PUBOPTS_ANNOTATION.to_owned(),
        PublicLayerOptions::new(&MacTag([7; 32])).to_annotation(),
    );
    let (private, public) = unwrap_options(&ann, &unwrappers).await.unwrap();
    assert_eq!(public.hmac, vec![7; 32]);
    assert_eq!(
        private.digest,
        "sha256:5c6b3bd4e0c9a53e0e4e6b2a3cda0e54a2f2b4d8f9c43ecb1c1a0e3c7f7b5b11"
    );
    assert_eq!(
        String::from_utf8(std::fs::read(&capture).unwrap()).unwrap(),
        String::from_utf8(sample("go-keyunwrap-request.json")).unwrap()
    );
}

#[test]
fn failing_provider_reports_stderr_and_bad_answers_are_named() {
    let p = CommandProvider::new(
        "broken",
        "/bin/sh",
        vec![
            "-c".into(),
            "cat >/dev/null; echo 'root key 1234 is disabled' >&2; exit 2".into(),
        ],
    );
    let e = KeyUnwrapper::unwrap_key(&KeyProviderUnwrapper::new(p), b"blob").unwrap_err();
    let chain = ocicrypt_core::keywrap::error_chain(&e);
    assert!(
        chain.contains("root key 1234 is disabled") && chain.contains("broken"),
        "{chain}"
    );

    let p = CommandProvider::new(
        "garbage",
        "/bin/sh",
        vec!["-c".into(), "cat >/dev/null; echo not-json".into()],
    );
    let e = KeyProviderWrapper::new(p, vec![]).wrap_keys(b"{}").unwrap_err();
    let chain = ocicrypt_core::keywrap::error_chain(&e);
    assert!(chain.contains("invalid answer"), "{chain}");
}

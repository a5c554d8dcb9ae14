//! The fuzz targets: one function per parser of untrusted input, each taking arbitrary bytes.
//!
//! Every function must return normally for every input: a panic, an abort, a hang or an
//! unbounded allocation is a finding. Where a parse succeeds, some targets also check a property
//! (a manifest edited in place with its own layers still parses to the same layers).
//!
//! The same file is compiled twice: by the cargo-fuzz binaries in `fuzz_targets/` (libFuzzer,
//! nightly) and by `keysync-agent/tests/fuzz_corpus.rs`, which replays the committed corpus
//! `fuzz/corpus/<target>/` in CI with a normal `cargo test` (that crate already depends on every
//! parser fuzzed here). [`TARGETS`] names them all.
#![allow(missing_docs, clippy::missing_panics_doc)]

use std::collections::BTreeMap;
use std::sync::OnceLock;

use ocicrypt_core::keys::{classify_key_file, PrivateKey, PublicKey};
use ocicrypt_core::pkcs7::Certificate;
use ocicrypt_core::KeyUnwrapper as _;

/// A fuzz target: arbitrary bytes in, returns normally for every input.
pub type Target = fn(&[u8]);

/// Every target, by the name of its `fuzz_targets/` binary and corpus directory.
pub const TARGETS: &[(&str, Target)] = &[
    ("jwe", jwe),
    ("pkcs7", pkcs7),
    ("pgp_message", pgp_message),
    ("pgp_key", pgp_key),
    ("options_annotations", options_annotations),
    ("manifest_index", manifest_index),
    ("keyprovider_json", keyprovider_json),
    ("decoder_payload", decoder_payload),
    ("key_file", key_file),
    ("kp_envelope", kp_envelope),
    ("agent_secret", agent_secret),
];

const RSA_PEM: &[u8] = include_bytes!("../../ocicrypt-core/tests/data/vectors/keys/rsa.pem");
const EC_PEM: &[u8] = include_bytes!("../../ocicrypt-core/tests/data/vectors/keys/ec.p8.pem");
const CERT_KEY_PEM: &[u8] = include_bytes!("../../ocicrypt-core/tests/data/vectors/keys/cert.key.pem");
const CERT_PEM: &[u8] = include_bytes!("../../ocicrypt-core/tests/data/vectors/keys/cert.pem");
const PGP_SECRET: &[u8] = include_bytes!("../../ocicrypt-core/tests/data/vectors/keys/pgp-secret.asc");

/// The vector keys, parsed once (the keys the Go-made corpus entries are wrapped for, so that
/// mutations of them reach the decryption code, not only the parsers).
struct Keys {
    jwe: ocicrypt_core::jwe::JweUnwrapper,
    pkcs7: ocicrypt_core::pkcs7::Pkcs7Unwrapper,
    pgp: ocicrypt_core::pgp::PgpUnwrapper,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let rsa = PrivateKey::from_bytes(RSA_PEM, None, "rsa.pem").expect("rsa.pem");
        let ec = PrivateKey::from_bytes(EC_PEM, None, "ec.p8.pem").expect("ec.p8.pem");
        let ck = PrivateKey::from_bytes(CERT_KEY_PEM, None, "cert.key.pem").expect("cert.key.pem");
        let cert = Certificate::from_bytes(CERT_PEM, "cert.pem").expect("cert.pem");
        let pgp = ocicrypt_core::pgp::PgpSecretKey::from_bytes_many(PGP_SECRET, None, "pgp-secret.asc")
            .expect("pgp-secret.asc");
        Keys {
            jwe: ocicrypt_core::jwe::JweUnwrapper::new(vec![rsa, ec]),
            pkcs7: ocicrypt_core::pkcs7::Pkcs7Unwrapper::new(vec![ck]).with_certificates(vec![cert]),
            pgp: ocicrypt_core::pgp::PgpUnwrapper::new(pgp),
        }
    })
}

fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}

/// A JWE blob (the `keys.jwe` annotation, decoded): inspection, recipient ids and decryption.
pub fn jwe(data: &[u8]) {
    let _ = ocicrypt_core::jwe::inspect(data);
    let _ = ocicrypt_core::recipients::jwe_entry_ids(data);
    let _ = keys().jwe.unwrap_key(data);
}

/// A PKCS#7 blob (DER EnvelopedData): inspection and decryption; and certificates.
pub fn pkcs7(data: &[u8]) {
    let _ = ocicrypt_core::pkcs7::inspect(data);
    let _ = keys().pkcs7.unwrap_key(data);
    let _ = Certificate::from_bytes(data, "fuzz");
}

/// An OpenPGP message (the `keys.pgp` annotation, decoded): PKESK ids and decryption.
pub fn pgp_message(data: &[u8]) {
    let _ = ocicrypt_core::pgp::pkesk_key_ids(data);
    let _ = keys().pgp.unwrap_key(data);
}

/// OpenPGP keys: secret and public keyrings, binary or armored.
pub fn pgp_key(data: &[u8]) {
    use ocicrypt_core::pgp::{looks_like_openpgp, secret_keyring_binary, PgpPublicKey, PgpSecretKey};
    let _ = looks_like_openpgp(data);
    if let Ok(keys) = PgpSecretKey::from_bytes_many(data, None, "fuzz") {
        for k in &keys {
            let _ = k.key_id();
            let _ = k.is_protected();
        }
        let _ = secret_keyring_binary(data, "fuzz");
    }
    if let Ok(keys) = PgpPublicKey::from_bytes_many(data, "fuzz") {
        for k in &keys {
            let _ = k.key_id();
            let _ = k.user_ids();
            let _ = k.matches("test@example.com");
        }
    }
}

/// Private options JSON, the public options annotation, and a descriptor's annotations (the
/// schemes present, their recipients, and the whole unwrap over every scheme).
pub fn options_annotations(data: &[u8]) {
    use ocicrypt_core::{PrivateLayerOptions, PublicLayerOptions};
    if let Ok(p) = PrivateLayerOptions::from_json(data) {
        let _ = p.key();
        if let Some(t) = text(data) {
            if let Ok(public) = PublicLayerOptions::from_annotation(t) {
                let _ = public.nonce(&p);
            }
        }
    }
    if let Some(t) = text(data) {
        let _ = PublicLayerOptions::from_annotation(t);
        let _ = ocicrypt_core::pgp::count_recipients(t);
        let _ = ocicrypt_core::pkcs7::count_recipients(t);
    }
    let Ok(ann) = serde_json::from_slice::<BTreeMap<String, String>>(data) else {
        return;
    };
    let _ = ocicrypt_core::keywrap::schemes_present(&ann);
    if let Ok(r) = ocicrypt_core::recipients::LayerRecipients::from_annotations(&ann) {
        let _ = r.ids();
        let _ = r.count();
        let _ = r.describe();
    }
    let k = keys();
    let unwrappers: Vec<std::sync::Arc<dyn ocicrypt_core::AsyncKeyUnwrapper>> = vec![std::sync::Arc::new(
        ocicrypt_core::jwe::JweUnwrapper::new(k.jwe.keys().iter().map(PrivateKey::share).collect()),
    )];
    let _ = futures::executor::block_on(ocicrypt_core::keywrap::unwrap_options(&ann, &unwrappers));
}

/// Image manifests and indexes: parsed as the image operations parse them, then edited in place
/// in Go's encoding with their own descriptors, which must give back a document with the same
/// descriptors.
pub fn manifest_index(data: &[u8]) {
    use oci_spec::image::{ImageIndex, ImageManifest};
    use ocicrypt_core::image::gojson::{edit_index, edit_manifest};
    if let Ok(m) = ImageManifest::from_reader(data) {
        if let Ok(out) = edit_manifest(data, m.layers(), None, None) {
            let again = ImageManifest::from_reader(&out[..]).expect("an edited manifest parses");
            assert_eq!(again.layers(), m.layers(), "layers survive an in-place edit");
        }
    }
    if let Ok(i) = ImageIndex::from_reader(data) {
        if let Ok(out) = edit_index(data, i.manifests(), None) {
            let again = ImageIndex::from_reader(&out[..]).expect("an edited index parses");
            assert_eq!(
                again.manifests(),
                i.manifests(),
                "manifests survive an in-place edit"
            );
        }
    }
}

/// Key-provider JSON: the configuration file, a request (what a provider reads) and a response
/// (what we read from a provider).
pub fn keyprovider_json(data: &[u8]) {
    use ocicrypt_core::keyprovider::{KeyProviderConfig, KeyProviderRequest, KeyProviderResponse};
    if let Ok(c) = KeyProviderConfig::from_json(data) {
        let _ = c.unwrappers();
    }
    let _ = KeyProviderRequest::from_json(data);
    let _ = serde_json::from_slice::<KeyProviderResponse>(data);
}

/// The decoder's fd-3 payload: the protobuf `Any`, its JSON, and the keys it carries.
pub fn decoder_payload(data: &[u8]) {
    use ocicrypt_core::stream_processor::{decode_any, KeySet, Payload};
    let _ = decode_any(data);
    let _ = Payload::from_json(data);
    if let Ok(p) = Payload::from_any_bytes(data) {
        let _ = KeySet::gather(&p.decrypt_config, None);
        let _ = p.to_any_bytes();
    }
}

/// Key files: private and public keys (PEM, DER, JWK), encrypted keys with a password,
/// certificates, and the key-directory classification (gpg keyrings, PKCS#11 YAML).
pub fn key_file(data: &[u8]) {
    let _ = PrivateKey::from_bytes(data, None, "fuzz");
    let _ = PrivateKey::from_bytes(data, Some(b"1234"), "fuzz");
    let _ = PublicKey::from_bytes(data, "fuzz");
    let _ = classify_key_file(data, "fuzz").describe();
    let _ = keysync_agent::validate::validate_key(data, "fuzz");
}

/// Key Protect ciphertexts as users put them into Secrets and `imgcrypt kp unwrap`: bare
/// base64, a JSON envelope, base64 of an envelope; and the add-on's config.json.
pub fn kp_envelope(data: &[u8]) {
    if let Some(t) = text(data) {
        let _ = keyprotect_client::wrapper::normalize_ciphertext(t);
        let _ = keyprotect_client::b64::decode_lenient(t);
    }
    let _ = keysync_agent::decode::kp_ciphertext(data, "ciphertext");
    let _ = keysync_agent::decode::extra_base64_layer(data);
    let _ = keyprotect_client::KeyProtectConfig::from_json(data);
}

/// A Kubernetes Secret as the agent decodes it: the JSON object, what the agent keeps of it,
/// the validation of `key` entries and the resolution of `kp-key` entries.
pub fn agent_secret(data: &[u8]) {
    use keysync_agent::secrets::{kp_entries, SecretRecord, ValidationCache};
    let Ok(s) = serde_json::from_slice::<k8s_openapi::api::core::v1::Secret>(data) else {
        return;
    };
    let mut rec = SecretRecord::from_secret(s);
    let _ = rec.kind();
    rec.drop_refused(&mut ValidationCache::default());
    let _ = kp_entries(&rec, Some("default-root-key"));
}

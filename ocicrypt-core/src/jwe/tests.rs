//! JWE tests: round trips for every algorithm and recipient count, go-jose shapes, failures,
//! and cross-checks against josekit as an independent implementation.

use std::sync::OnceLock;

use josekit::jwe::{self as jk, JweDecrypter, JweEncrypter, JweHeader, JweHeaderSet};
use josekit::jwk::KeyPair as _;

use super::*;
use crate::keys::{generate_ec, generate_rsa};

/// (name, private PKCS#8 PEM, public SPKI PEM)
type Pair = (&'static str, Zeroizing<String>, String);

fn keys() -> &'static [Pair] {
    static KEYS: OnceLock<Vec<Pair>> = OnceLock::new();
    KEYS.get_or_init(|| {
        let mut v = Vec::new();
        for name in ["rsa-a", "rsa-b"] {
            let (p, q) = generate_rsa(2048).unwrap();
            v.push((name, p, q));
        }
        for curve in ["P-256", "P-384", "P-521"] {
            let (p, q) = generate_ec(curve).unwrap();
            v.push((curve, p, q));
        }
        let (p, q) = generate_ec("P-256").unwrap();
        v.push(("P-256-b", p, q));
        v
    })
}

fn pair(name: &str) -> &'static Pair {
    keys().iter().find(|k| k.0 == name).unwrap()
}

fn private(name: &str) -> PrivateKey {
    PrivateKey::from_bytes(pair(name).1.as_bytes(), None, name).unwrap()
}

fn public(name: &str) -> PublicKey {
    PublicKey::from_bytes(pair(name).2.as_bytes(), name).unwrap()
}

/// The public key as a JWK with `alg` (and a `kid`), parsed back by us.
fn public_with_alg(name: &str, alg: KeyAlg) -> PublicKey {
    let pem = pair(name).1.as_bytes();
    let mut jwk = if name.starts_with("rsa") {
        josekit::jwk::alg::rsa::RsaKeyPair::from_pem(pem)
            .unwrap()
            .to_jwk_public_key()
    } else {
        josekit::jwk::alg::ec::EcKeyPair::from_pem(pem, None)
            .unwrap()
            .to_jwk_public_key()
    };
    jwk.set_algorithm(alg.name());
    jwk.set_key_id(format!("kid-{name}"));
    PublicKey::from_bytes(jwk.to_string().as_bytes(), name).unwrap()
}

/// A key name that fits the algorithm, and another one.
fn names_for(alg: KeyAlg) -> [&'static str; 3] {
    if alg.is_rsa() {
        ["rsa-a", "rsa-b", "rsa-a"]
    } else {
        ["P-256", "P-384", "P-521"]
    }
}

const OPTS: &[u8] = br#"{"symkey":"c2VjcmV0IGtleSBtYXRlcmlhbCAzMiBieXRlcyBsb25nIQ==","digest":"sha256:00","cipheroptions":{"nonce":"AAAAAAAAAAAAAAAAAAAAAA=="}}"#;

fn json(blob: &[u8]) -> Value {
    serde_json::from_slice(blob).unwrap()
}

fn protected_header(blob: &[u8]) -> String {
    let v = json(blob);
    String::from_utf8(b64d(v["protected"].as_str().unwrap()).unwrap()).unwrap()
}

#[test]
fn round_trip_every_alg_and_recipient_count() {
    for alg in KeyAlg::ALL {
        for n in 1..=3 {
            let names = &names_for(alg)[..n];
            let recipients = names.iter().map(|k| public_with_alg(k, alg)).collect();
            let w = JweWrapper::new(recipients).unwrap();
            let blob = w.wrap_keys(OPTS).unwrap();
            for name in names {
                let u = JweUnwrapper::new(vec![private(name)]);
                let got = u
                    .unwrap_key(&blob)
                    .unwrap_or_else(|e| panic!("{alg} n={n} {name}: {e}"));
                assert_eq!(&got[..], OPTS);
            }
            let info = inspect(&blob).unwrap();
            assert_eq!(info.len(), n);
            assert!(info.iter().all(|i| i.alg == alg.name() && i.enc == "A256GCM"));
        }
    }
}

#[test]
fn round_trip_every_content_alg() {
    for enc in ContentAlg::ALL {
        let w = JweWrapper::new(vec![public("rsa-a"), public("P-384")])
            .unwrap()
            .with_content_alg(enc);
        let blob = w.wrap_keys(OPTS).unwrap();
        assert!(protected_header(&blob).contains(enc.name()));
        for k in ["rsa-a", "P-384"] {
            assert_eq!(
                &JweUnwrapper::new(vec![private(k)]).unwrap_key(&blob).unwrap()[..],
                OPTS,
                "{enc}"
            );
        }
    }
}

#[test]
fn default_algs_and_go_jose_flattened_shape() {
    let blob = JweWrapper::new(vec![public("rsa-a")])
        .unwrap()
        .wrap_keys(OPTS)
        .unwrap();
    let text = String::from_utf8(blob.clone()).unwrap();
    let keys: Vec<&str> = [
        "\"protected\"",
        "\"encrypted_key\"",
        "\"iv\"",
        "\"ciphertext\"",
        "\"tag\"",
    ]
    .into_iter()
    .filter(|k| text.contains(k))
    .collect();
    assert_eq!(keys.len(), 5, "{text}");
    let order: Vec<usize> = keys.iter().map(|k| text.find(k).unwrap()).collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "member order {text}");
    assert!(
        !text.contains("recipients") && !text.contains("\"header\""),
        "{text}"
    );
    assert_eq!(
        protected_header(&blob),
        format!(
            r#"{{"alg":"RSA-OAEP","enc":"A256GCM","kid":"{}"}}"#,
            public("rsa-a").thumbprint()
        )
    );
    let v = json(&blob);
    assert_eq!(b64d(v["iv"].as_str().unwrap()).unwrap().len(), 12);
    assert_eq!(b64d(v["tag"].as_str().unwrap()).unwrap().len(), 16);
    assert_eq!(b64d(v["encrypted_key"].as_str().unwrap()).unwrap().len(), 256);

    let blob = JweWrapper::new(vec![public("P-256")])
        .unwrap()
        .wrap_keys(OPTS)
        .unwrap();
    let h = protected_header(&blob);
    assert!(
        h.starts_with(r#"{"alg":"ECDH-ES+A256KW","enc":"A256GCM","epk":{"kty":"EC","crv":"P-256","x":""#),
        "{h}"
    );
    let epk = &serde_json::from_str::<Value>(&h).unwrap()["epk"];
    assert_eq!(b64d(epk["x"].as_str().unwrap()).unwrap().len(), 32);
    assert_eq!(
        b64d(json(&blob)["encrypted_key"].as_str().unwrap())
            .unwrap()
            .len(),
        40
    );

    let blob = JweWrapper::new(vec![public("P-521")])
        .unwrap()
        .wrap_keys(OPTS)
        .unwrap();
    let epk = &serde_json::from_str::<Value>(&protected_header(&blob)).unwrap()["epk"];
    assert_eq!(b64d(epk["y"].as_str().unwrap()).unwrap().len(), 66);

    // The kid is the RFC 7638 thumbprint, also for a JWK that has a kid of its own.
    let blob = JweWrapper::new(vec![public_with_alg("rsa-b", KeyAlg::RsaOaep256)])
        .unwrap()
        .wrap_keys(OPTS)
        .unwrap();
    assert_eq!(
        protected_header(&blob),
        format!(
            r#"{{"alg":"RSA-OAEP-256","enc":"A256GCM","kid":"{}"}}"#,
            public("rsa-b").thumbprint()
        )
    );
}

#[test]
fn general_shape_for_several_recipients() {
    let blob = JweWrapper::new(vec![public("rsa-a"), public("P-256")])
        .unwrap()
        .wrap_keys(OPTS)
        .unwrap();
    let text = String::from_utf8(blob.clone()).unwrap();
    assert!(text.starts_with(r#"{"protected":""#), "{text}");
    assert!(text.find("\"recipients\"").unwrap() < text.find("\"iv\"").unwrap());
    assert_eq!(protected_header(&blob), r#"{"enc":"A256GCM"}"#);
    let v = json(&blob);
    assert!(
        v.get("encrypted_key").is_none(),
        "no redundant top-level encrypted_key"
    );
    let r = v["recipients"].as_array().unwrap();
    assert_eq!(r.len(), 2);
    assert_eq!(
        r[0]["header"],
        serde_json::json!({"alg": "RSA-OAEP", "kid": public("rsa-a").thumbprint()})
    );
    assert_eq!(r[1]["header"]["kid"], public("P-256").thumbprint());
    assert_eq!(r[1]["header"]["alg"], "ECDH-ES+A256KW");
    assert_eq!(r[1]["header"]["epk"]["crv"], "P-256");
    assert_eq!(
        r[1]["header"]["epk"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>()
            .len(),
        4
    );
    // Per-recipient header members in go-jose's (sorted) order, kid last.
    let text = String::from_utf8(blob).unwrap();
    assert!(text.contains(r#"{"header":{"alg":"RSA-OAEP","kid":""#), "{text}");
}

#[test]
fn go_jose_redundant_top_level_encrypted_key_is_tolerated() {
    let blob = JweWrapper::new(vec![public("rsa-a"), public("P-256")])
        .unwrap()
        .wrap_keys(OPTS)
        .unwrap();
    let mut v = json(&blob);
    let first = v["recipients"][0]["encrypted_key"].clone();
    v.as_object_mut().unwrap().insert("encrypted_key".into(), first);
    let quirky = serde_json::to_vec(&v).unwrap();
    for k in ["rsa-a", "P-256"] {
        assert_eq!(
            &JweUnwrapper::new(vec![private(k)]).unwrap_key(&quirky).unwrap()[..],
            OPTS
        );
    }
}

#[test]
fn every_key_is_tried_on_every_recipient() {
    let blob = JweWrapper::new(vec![public("P-384"), public("rsa-b")])
        .unwrap()
        .wrap_keys(OPTS)
        .unwrap();
    // Wrong keys of both types first, the right one last.
    let u = JweUnwrapper::new(vec![
        private("rsa-a"),
        private("P-256"),
        private("P-521"),
        private("rsa-b"),
    ]);
    assert_eq!(&u.unwrap_key(&blob).unwrap()[..], OPTS);
}

#[test]
fn wrong_keys_fail_with_no_matching_key() {
    let blob = JweWrapper::new(vec![public("rsa-a"), public("P-256")])
        .unwrap()
        .wrap_keys(OPTS)
        .unwrap();
    for keys in [
        vec![private("rsa-b")],
        vec![private("P-256-b"), private("P-384")],
        vec![],
    ] {
        match JweUnwrapper::new(keys).unwrap_key(&blob) {
            Err(UnwrapError::NoMatchingKey { scheme }) => assert_eq!(scheme, "jwe"),
            other => panic!("{other:?}"),
        }
    }
    // A flipped ciphertext bit: nobody can open it.
    let mut v = json(&blob);
    let mut ct = b64d(v["ciphertext"].as_str().unwrap()).unwrap();
    ct[0] ^= 1;
    v["ciphertext"] = Value::String(b64e(&ct));
    let tampered = serde_json::to_vec(&v).unwrap();
    assert!(matches!(
        JweUnwrapper::new(vec![private("rsa-a"), private("P-256")]).unwrap_key(&tampered),
        Err(UnwrapError::NoMatchingKey { .. })
    ));
}

#[test]
fn malformed_blobs() {
    let u = JweUnwrapper::new(vec![private("rsa-a")]);
    let good = json(
        &JweWrapper::new(vec![public("rsa-a")])
            .unwrap()
            .wrap_keys(OPTS)
            .unwrap(),
    );
    let with = |f: &dyn Fn(&mut Value)| {
        let mut v = good.clone();
        f(&mut v);
        serde_json::to_vec(&v).unwrap()
    };
    let header = |h: &str| Value::String(b64e(h.as_bytes()));
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"not json at all".to_vec(), "neither JWE JSON nor compact"),
        (b"{\"protected\": 5}".to_vec(), "not JWE JSON"),
        (
            with(&|v| v["iv"] = Value::String("***".into())),
            "\"iv\" is not base64url",
        ),
        (
            with(&|v| {
                v.as_object_mut().unwrap().remove("tag");
            }),
            "no \"tag\"",
        ),
        (with(&|v| v["iv"] = Value::String(b64e(&[0; 16]))), "12-byte iv"),
        (
            with(&|v| v["protected"] = header(r#"{"alg":"dir","enc":"A256GCM"}"#)),
            "no recipient uses a supported key algorithm (found dir",
        ),
        (
            with(&|v| v["protected"] = header(r#"{"alg":"RSA-OAEP","enc":"A256GCM","zip":"DEF"}"#)),
            "zip",
        ),
        (
            with(&|v| v["protected"] = header(r#"{"alg":"RSA-OAEP","enc":"A256GCM","crit":["x"],"x":1}"#)),
            "crit",
        ),
        (
            with(&|v| v["protected"] = header(r#"{"alg":"RSA-OAEP","enc":"A999GCM"}"#)),
            "unsupported content encryption",
        ),
        (
            with(&|v| v["protected"] = header(r#"{"alg":"ECDH-ES+A256KW","enc":"A256GCM"}"#)),
            "without \"epk\"",
        ),
        (with(&|v| v["protected"] = header("[]")), "not a JSON object"),
    ];
    for (blob, want) in cases {
        match u.unwrap_key(&blob) {
            Err(e @ UnwrapError::Malformed { .. }) => {
                assert!(e.to_string().contains(want), "{e} (want {want})")
            }
            other => panic!("want Malformed {want}: {other:?}"),
        }
    }
}

#[test]
fn recipient_validation() {
    assert!(matches!(
        JweWrapper::new(vec![]),
        Err(WrapError::NoRecipients { .. })
    ));
    let jwk = |alg: &str| {
        let mut j = josekit::jwk::alg::ec::EcKeyPair::from_pem(pair("P-256").1.as_bytes(), None)
            .unwrap()
            .to_jwk_public_key();
        j.set_algorithm(alg);
        PublicKey::from_bytes(j.to_string().as_bytes(), "ec.jwk").unwrap()
    };
    for (alg, want) in [
        ("RSA-OAEP", "cannot be used with a EC P-256 key"),
        ("ES256", "not a JWE key-wrap algorithm"),
    ] {
        match JweWrapper::new(vec![public("rsa-a"), jwk(alg)]) {
            Err(e @ WrapError::BadRecipient { .. }) => {
                let m = e.to_string();
                assert!(m.contains("ec.jwk") && m.contains(want), "{m}");
            }
            other => panic!("{other:?}"),
        }
    }
    let w = JweWrapper::new(vec![public("rsa-a"), jwk("ECDH-ES+A192KW")]).unwrap();
    let algs: Vec<KeyAlg> = w.recipients().map(|(_, a)| a).collect();
    assert_eq!(algs, [KeyAlg::RsaOaep, KeyAlg::EcdhEsA192Kw]);
    let dbg = format!("{w:?} {:?}", JweUnwrapper::new(vec![private("rsa-a")]));
    assert!(
        dbg.contains("rsa-a RSA-2048") && !dbg.contains("PRIVATE"),
        "{dbg}"
    );
}

fn jk_encrypter(alg: KeyAlg, pem: &str) -> Box<dyn JweEncrypter> {
    match alg {
        KeyAlg::RsaOaep => Box::new(jk::RSA_OAEP.encrypter_from_pem(pem).unwrap()),
        KeyAlg::RsaOaep256 => Box::new(jk::RSA_OAEP_256.encrypter_from_pem(pem).unwrap()),
        KeyAlg::EcdhEsA128Kw => Box::new(jk::ECDH_ES_A128KW.encrypter_from_pem(pem).unwrap()),
        KeyAlg::EcdhEsA192Kw => Box::new(jk::ECDH_ES_A192KW.encrypter_from_pem(pem).unwrap()),
        KeyAlg::EcdhEsA256Kw => Box::new(jk::ECDH_ES_A256KW.encrypter_from_pem(pem).unwrap()),
    }
}

fn jk_decrypter(alg: KeyAlg, pem: &str) -> Box<dyn JweDecrypter> {
    match alg {
        KeyAlg::RsaOaep => Box::new(jk::RSA_OAEP.decrypter_from_pem(pem).unwrap()),
        KeyAlg::RsaOaep256 => Box::new(jk::RSA_OAEP_256.decrypter_from_pem(pem).unwrap()),
        KeyAlg::EcdhEsA128Kw => Box::new(jk::ECDH_ES_A128KW.decrypter_from_pem(pem).unwrap()),
        KeyAlg::EcdhEsA192Kw => Box::new(jk::ECDH_ES_A192KW.decrypter_from_pem(pem).unwrap()),
        KeyAlg::EcdhEsA256Kw => Box::new(jk::ECDH_ES_A256KW.decrypter_from_pem(pem).unwrap()),
    }
}

#[test]
fn josekit_reads_what_we_write() {
    for alg in KeyAlg::ALL {
        for enc in ContentAlg::ALL {
            for name in &names_for(alg)[..2] {
                let w = JweWrapper::new(vec![public_with_alg(name, alg)])
                    .unwrap()
                    .with_content_alg(enc);
                let blob = String::from_utf8(w.wrap_keys(OPTS).unwrap()).unwrap();
                let d = jk_decrypter(alg, &pair(name).1);
                let (pt, header) =
                    jk::deserialize_json(&blob, &*d).unwrap_or_else(|e| panic!("{alg} {enc} {name}: {e}"));
                assert_eq!(pt, OPTS);
                assert_eq!(header.content_encryption(), Some(enc.name()));
            }
        }
    }
    // General JSON, several recipients: josekit picks the recipient by alg.
    let w = JweWrapper::new(vec![public("rsa-a"), public("P-256")]).unwrap();
    let blob = String::from_utf8(w.wrap_keys(OPTS).unwrap()).unwrap();
    for (alg, name) in [(KeyAlg::RsaOaep, "rsa-a"), (KeyAlg::EcdhEsA256Kw, "P-256")] {
        let (pt, _) = jk::deserialize_json(&blob, &*jk_decrypter(alg, &pair(name).1)).unwrap();
        assert_eq!(pt, OPTS);
    }
}

#[test]
fn we_read_what_josekit_writes() {
    for alg in KeyAlg::ALL {
        for enc in ContentAlg::ALL {
            let [a, b, _] = names_for(alg);
            let ea = jk_encrypter(alg, &pair(a).2);
            let mut hs = JweHeaderSet::new();
            hs.set_content_encryption(enc.name(), true);
            // Flattened (josekit puts alg/epk in the protected header too).
            let flat = jk::serialize_flattened_json(OPTS, Some(&hs), None, None, &*ea).unwrap();
            // Compact.
            let mut h = JweHeader::new();
            h.set_content_encryption(enc.name());
            let compact = jk::serialize_compact(OPTS, &h, &*ea).unwrap();
            for blob in [&flat, &compact] {
                let got = JweUnwrapper::new(vec![private(a)]).unwrap_key(blob.as_bytes());
                assert_eq!(
                    &got.unwrap_or_else(|e| panic!("{alg} {enc}: {e} {blob}"))[..],
                    OPTS
                );
            }
            // General JSON with two recipients; each key opens it.
            if alg.is_rsa() && b == a {
                continue;
            }
            let eb = jk_encrypter(alg, &pair(b).2);
            let recipients: [(Option<&JweHeader>, &dyn JweEncrypter); 2] = [(None, &*ea), (None, &*eb)];
            let general = jk::serialize_general_json(OPTS, Some(&hs), &recipients, None).unwrap();
            for k in [a, b] {
                let got = JweUnwrapper::new(vec![private(k)])
                    .unwrap_key(general.as_bytes())
                    .unwrap();
                assert_eq!(&got[..], OPTS, "{alg} {enc} general {k}");
            }
        }
    }
}

#[test]
fn concat_kdf_matches_rfc7518_appendix_c() {
    // RFC 7518 Appendix C: ECDH-ES with apu "Alice", apv "Bob", alg A128GCM (direct), 128 bits.
    let z: [u8; 32] = [
        158, 86, 217, 29, 129, 113, 53, 211, 114, 131, 66, 131, 191, 132, 38, 156, 251, 49, 110, 163, 218,
        128, 106, 72, 246, 218, 167, 121, 140, 254, 144, 196,
    ];
    let k = concat_kdf(&z, "A128GCM", b"Alice", b"Bob", 16);
    assert_eq!(b64e(&k), "VqqN6vgjbSBcIijNcacQGg");
}

#[test]
fn aes_key_wrap_matches_rfc3394() {
    // RFC 3394 §4.6: 256-bit KEK, 256-bit key data.
    let kek = hex::decode("000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F").unwrap();
    let data = hex::decode("00112233445566778899AABBCCDDEEFF000102030405060708090A0B0C0D0E0F").unwrap();
    let wrapped = aes_kw_wrap(&kek, &data).unwrap();
    assert_eq!(
        hex::encode_upper(&wrapped),
        "28C9F404C4B810F4CBCCB35CFB87F8263F5786E2D80ED326CBC7F0E71A99F43BFB988B9B7A02DD21"
    );
    assert_eq!(&aes_kw_unwrap(&kek, &wrapped).unwrap()[..], &data[..]);
    let mut bad = wrapped.clone();
    bad[5] ^= 1;
    assert!(aes_kw_unwrap(&kek, &bad).is_none());
}

mod fuzz {
    use proptest::prelude::*;

    use super::*;

    fn blobs() -> &'static [Vec<u8>] {
        static B: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
        B.get_or_init(|| {
            vec![
                JweWrapper::new(vec![public("rsa-a")])
                    .unwrap()
                    .wrap_keys(OPTS)
                    .unwrap(),
                JweWrapper::new(vec![public("P-256")])
                    .unwrap()
                    .wrap_keys(OPTS)
                    .unwrap(),
                JweWrapper::new(vec![public("rsa-a"), public("P-256")])
                    .unwrap()
                    .with_content_alg(ContentAlg::A128CbcHs256)
                    .wrap_keys(OPTS)
                    .unwrap(),
            ]
        })
    }

    fn unwrapper() -> &'static JweUnwrapper {
        static U: OnceLock<JweUnwrapper> = OnceLock::new();
        U.get_or_init(|| JweUnwrapper::new(vec![private("rsa-a"), private("P-256")]))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// A damaged JWE (registry data is untrusted) never panics and never yields anything
        /// but the original plaintext.
        #[test]
        fn damaged_jwe(which in 0usize..3, pos in any::<usize>(), byte in any::<u8>(), cut in any::<bool>()) {
            let mut b = blobs()[which].clone();
            let p = pos % b.len();
            if cut { b.truncate(p) } else { b[p] = byte }
            if let Ok(pt) = unwrapper().unwrap_key(&b) {
                prop_assert_eq!(&pt[..], OPTS);
            }
            let _ = inspect(&b);
        }

        /// Arbitrary bytes never panic.
        #[test]
        fn arbitrary_blob(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            prop_assert!(unwrapper().unwrap_key(&bytes).is_err());
        }
    }
}

use std::path::Path;

use openssl::pkey::PKey;
use openssl::rsa::Rsa;

use super::*;
use crate::keys::PublicKey;
use crate::keywrap::{KeyUnwrapper, KeyWrapper, UnwrapError};

#[test]
fn uri_parses_like_go() {
    let u = Pkcs11Uri::parse(
        "pkcs11:token=my%20tok;id=%01%02;object=k;type=private?pin-value=1234&module-name=softhsm2",
    )
    .unwrap();
    assert_eq!(u.path_attribute("token"), Some(&b"my tok"[..]));
    assert_eq!(u.path_attribute("id"), Some(&[1u8, 2][..]));
    assert_eq!(u.pin().unwrap().unwrap().as_slice(), b"1234");
    assert_eq!(u.query_attribute("pin-value"), None);
    let d = u.describe();
    assert!(!d.contains("1234"), "{d}");
    assert!(d.contains("id=0102") && d.contains("module-name=softhsm2"), "{d}");
    assert!(!format!("{u:?}").contains("1234"));

    for bad in [
        "token=x",
        "pkcs11:token",
        "pkcs11:token=a;token=b",
        "pkcs11:slot-id=x",
        "pkcs11:id=%zz",
        "pkcs11:type=other",
        "pkcs11:object=k?pin-value=1&pin-source=/x",
        "pkcs11:object=k?module-path=rel/lib.so",
    ] {
        assert!(Pkcs11Uri::parse(bad).is_err(), "{bad}");
    }
    let u = Pkcs11Uri::parse("pkcs11:slot-id=-1;object=k").unwrap();
    assert!(u.slot_id().is_err());
    let u = Pkcs11Uri::parse("pkcs11:slot-id=7;object=k").unwrap();
    assert_eq!(u.slot_id().unwrap(), Some(7));
}

#[test]
fn pin_source_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("pin");
    std::fs::write(&f, "4321\n").unwrap();
    let u = Pkcs11Uri::parse(&format!("pkcs11:object=k?pin-source=file:{}", f.display())).unwrap();
    assert_eq!(u.pin().unwrap().unwrap().as_slice(), b"4321");
    let u = Pkcs11Uri::parse(&format!("pkcs11:object=k?pin-source={}", f.display())).unwrap();
    assert_eq!(u.pin().unwrap().unwrap().as_slice(), b"4321");
    let u = Pkcs11Uri::parse("pkcs11:object=k?pin-source=relative").unwrap();
    assert!(matches!(u.pin(), Err(Pkcs11Error::PinSource { .. })));
    let mut u = Pkcs11Uri::parse("pkcs11:object=k").unwrap();
    assert!(!u.has_pin());
    u.set_pin(b"9");
    assert!(u.has_pin());
}

#[test]
fn module_policy() {
    let dir = tempfile::tempdir().unwrap();
    let mods = dir.path().join("mods");
    std::fs::create_dir_all(mods.join("sub")).unwrap();
    for f in ["libsofthsm2.so", "libother.so", "sub/libdeep.so"] {
        std::fs::write(mods.join(f), "").unwrap();
    }
    let d = format!("{}/", mods.display());
    let allow_dir = Pkcs11Config {
        module_directories: vec![d.clone()],
        allowed_module_paths: vec![d.clone()],
    };
    let by_name = Pkcs11Uri::parse("pkcs11:object=k?module-name=SoftHSM2").unwrap();
    assert_eq!(by_name.module(&allow_dir).unwrap(), mods.join("libsofthsm2.so"));
    // "softhsm" must not match libsofthsm2.so (Go requires the name to end there or at a '.').
    let prefix = Pkcs11Uri::parse("pkcs11:object=k?module-name=softhsm").unwrap();
    assert!(matches!(
        prefix.module(&allow_dir),
        Err(Pkcs11Error::ModuleNotFound { .. })
    ));
    // Only the named file allowed.
    let only = Pkcs11Config {
        module_directories: vec![d.clone()],
        allowed_module_paths: vec![mods.join("libother.so").display().to_string()],
    };
    assert!(matches!(
        by_name.module(&only),
        Err(Pkcs11Error::ModuleNotAllowed { .. })
    ));
    // module-path to a file: allowed by directory, not from a subdirectory.
    let path = |p: &Path| Pkcs11Uri::parse(&format!("pkcs11:object=k?module-path={}", p.display())).unwrap();
    assert!(path(&mods.join("libother.so")).module(&allow_dir).is_ok());
    assert!(matches!(
        path(&mods.join("sub/libdeep.so")).module(&allow_dir),
        Err(Pkcs11Error::ModuleNotAllowed { .. })
    ));
    // No policy: nothing.
    assert!(matches!(
        path(&mods.join("libother.so")).module(&Pkcs11Config::default()),
        Err(Pkcs11Error::ModuleNotAllowed { .. })
    ));
    assert!(Pkcs11Config::internal().allows(Path::new("/usr/lib/softhsm/libsofthsm2.so")));
}

#[test]
fn config_yaml() {
    let c = Pkcs11Config::from_config_file_bytes(
        b"pkcs11:\n  module-directories:\n    - /a/\n  allowed-module-paths:\n    - /a/x.so\n",
        "t",
    )
    .unwrap();
    assert_eq!(c.module_directories, vec!["/a/"]);
    let back = Pkcs11Config::from_yaml(c.to_yaml().as_bytes(), "t").unwrap();
    assert_eq!(back, c);
    assert!(Pkcs11Config::from_yaml(b"module-directories: 3", "t").is_err());
}

#[test]
fn key_file_yaml() {
    let y = b"pkcs11:\n  uri: pkcs11:token=t;object=k?pin-value=1234&module-name=softhsm2\nmodule:\n  env:\n    SOFTHSM2_CONF: /x.conf\n";
    assert!(Pkcs11KeyFile::is_key_file(y));
    let k = Pkcs11KeyFile::from_bytes(y, "k.yaml").unwrap();
    assert_eq!(k.env()["SOFTHSM2_CONF"], "/x.conf");
    assert!(!format!("{k:?}").contains("1234"));
    assert!(!k.describe().contains("1234"));
    assert!(!Pkcs11KeyFile::is_key_file(b"-----BEGIN PUBLIC KEY-----\n"));
    assert!(!Pkcs11KeyFile::is_key_file(b"pkcs11:\n  uri: nope\n"));
    // A malformed value is not quoted.
    let e = Pkcs11KeyFile::from_bytes(b"pkcs11:\n  uri: [secretpin99]\n", "k.yaml").unwrap_err();
    assert!(!e.to_string().contains("secretpin99"), "{e}");
}

#[test]
fn blob_json_like_go() {
    let b = Pkcs11Blob {
        version: 0,
        recipients: vec![Pkcs11BlobRecipient {
            version: 0,
            blob: "AAEC".into(),
            hash: "sha256".into(),
        }],
    };
    assert_eq!(
        String::from_utf8(b.to_json()).unwrap(),
        r#"{"version":0,"recipients":[{"version":0,"blob":"AAEC","hash":"sha256"}]}"#
    );
    let old = Pkcs11Blob::parse(br#"{"version":0,"recipients":[{"version":0,"blob":"AAEC"}]}"#).unwrap();
    assert_eq!(old.ciphertexts().0[0].1, OaepHash::Sha1);
    assert!(Pkcs11Blob::parse(br#"{"version":1,"recipients":[]}"#).is_err());
    assert!(Pkcs11Blob::parse(br#"{"version":0,"recipients":[{"version":2,"blob":"AA=="}]}"#).is_err());
    assert!(Pkcs11Blob::parse(b"not json").is_err());
}

fn rsa(bits: u32) -> (PKey<openssl::pkey::Private>, PublicKey) {
    let k = PKey::from_rsa(Rsa::generate(bits).unwrap()).unwrap();
    let pem = k.public_key_to_pem().unwrap();
    let p = PublicKey::from_bytes(&pem, "pub.pem").unwrap();
    (k, p)
}

fn oaep_decrypt(k: &PKey<openssl::pkey::Private>, hash: OaepHash, ct: &[u8]) -> Vec<u8> {
    let md = match hash {
        OaepHash::Sha1 => openssl::md::Md::sha1(),
        OaepHash::Sha256 => openssl::md::Md::sha256(),
    };
    let mut ctx = openssl::pkey_ctx::PkeyCtx::new(k).unwrap();
    ctx.decrypt_init().unwrap();
    ctx.set_rsa_padding(openssl::rsa::Padding::PKCS1_OAEP).unwrap();
    ctx.set_rsa_oaep_md(md).unwrap();
    ctx.set_rsa_mgf1_md(md).unwrap();
    let mut out = Vec::new();
    ctx.decrypt_to_vec(ct, &mut out).unwrap();
    out
}

#[test]
fn software_wrap_decrypts_with_openssl() {
    let (k, p) = rsa(2048);
    let opts = br#"{"cipher":"AES_256_CTR_HMAC_SHA256","symkey":"x"}"#;
    for hash in [OaepHash::Sha1, OaepHash::Sha256] {
        let w = Pkcs11Wrapper::new(
            vec![Pkcs11Recipient::PublicKey(p.clone())],
            hash,
            Pkcs11Config::default(),
        )
        .unwrap();
        let blob = Pkcs11Blob::parse(&w.wrap_keys(opts).unwrap()).unwrap();
        assert_eq!(blob.recipients[0].hash, hash.name());
        let (cts, _) = blob.ciphertexts();
        assert_eq!(oaep_decrypt(&k, hash, &cts[0].0), opts);
    }
    // The size trap: 200 bytes do not fit RSA-2048 with SHA-256 OAEP.
    let w = Pkcs11Wrapper::new(
        vec![Pkcs11Recipient::PublicKey(p)],
        OaepHash::Sha256,
        Pkcs11Config::default(),
    )
    .unwrap();
    let e = w.wrap_keys(&[b'x'; 200]).unwrap_err();
    assert!(e.to_string().contains("OCICRYPT_OAEP_HASHALG=sha1"), "{e}");
}

#[test]
fn unwrap_refuses_a_module_outside_the_policy_without_loading_it() {
    let (_, p) = rsa(2048);
    let w = Pkcs11Wrapper::new(
        vec![Pkcs11Recipient::PublicKey(p)],
        OaepHash::Sha1,
        Pkcs11Config::default(),
    )
    .unwrap();
    let blob = w.wrap_keys(b"{}").unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Not a library at all: loading it would fail differently.
    let module = dir.path().join("libevil.so");
    std::fs::write(&module, "").unwrap();
    let y = format!(
        "pkcs11:\n  uri: pkcs11:token=t;object=k?pin-value=1&module-path={}\n",
        module.display()
    );
    let key = Pkcs11KeyFile::from_bytes(y.as_bytes(), "k.yaml").unwrap();
    let u = Pkcs11Unwrapper::new(vec![key], Pkcs11Config::internal());
    match u.unwrap_key(&blob) {
        Err(UnwrapError::KeyUnusable { reason, .. }) => {
            assert!(reason.contains("not allowed"), "{reason}");
            assert!(!reason.contains("pin-value"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // Malformed blobs are malformed, whatever the keys.
    assert!(matches!(u.unwrap_key(b"{]"), Err(UnwrapError::Malformed { .. })));
}

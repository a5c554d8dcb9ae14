//! Issue 15 item 1 through the CLI: malformed key files given as `--key`, in a `--key-dir` and as
//! `jwe:` recipients produce errors that never quote 40 characters of the key.

mod common;

use common::{imgcrypt, oci, vectors};

fn pem_body(pem: &str) -> String {
    pem.lines()
        .filter(|l| !l.starts_with("-----") && !l.contains(':'))
        .collect::<Vec<_>>()
        .concat()
}

fn assert_no_run(case: &str, secret: &str, text: &str) {
    let chars: Vec<char> = secret.chars().collect();
    for w in chars.windows(40) {
        let w: String = w.iter().collect();
        assert!(!text.contains(&w), "{case}: stderr quotes the key ({w}):\n{text}");
    }
}

#[test]
fn malformed_keys_are_never_quoted() {
    let v = vectors();
    let t = tempfile::tempdir().unwrap();
    let enc = oci(&v.join("layouts/enc-jwe"), "v1");
    let src = oci(&v.join("layouts/src"), "v1");
    let out = oci(&t.path().join("out"), "v1");
    let mut runs = 0;
    for file in ["rsa.pem", "ec.p8.pem", "rsa.pub.pem"] {
        let body = pem_body(&std::fs::read_to_string(v.join("keys").join(file)).unwrap());
        let shapes = [
            format!("-----BEGIN PRIVATE KEY {body} -----END PRIVATE KEY-----\n"),
            format!("-----BEGIN PUBLIC KEY {body}\n-----END PUBLIC KEY-----\n"),
            format!("-----BEGIN {body}-----\nAAAA\n-----END {body}-----\n"),
            format!(r#"{{"kty":"{body}","d":"{body}"}}"#),
            format!(r#"{{"kty":"EC","crv":"{body}","x":"AAAA","y":"AAAA"}}"#),
        ];
        for (i, shape) in shapes.iter().enumerate() {
            let dir = t.path().join(format!("{file}-{i}"));
            std::fs::create_dir(&dir).unwrap();
            let key = dir.join("k.pem");
            std::fs::write(&key, shape).unwrap();
            let key = key.display().to_string();
            let dir = dir.display().to_string();
            let recipient = format!("jwe:{key}");
            for args in [
                vec!["decrypt", "--key", &key, &enc, &out],
                vec!["decrypt", "--key-dir", &dir, &enc, &out],
                vec!["encrypt", "--recipient", &recipient, &src, &out],
            ] {
                let r = imgcrypt(&args);
                assert_ne!(r.code, 0, "{args:?} succeeded");
                assert!(!r.stderr.is_empty(), "{args:?}: no message");
                assert_no_run(&format!("{file} shape {i} {args:?}"), &body, &r.stderr);
                runs += 1;
            }
        }
    }
    assert_eq!(runs, 45);
}

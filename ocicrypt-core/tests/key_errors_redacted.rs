//! No key material in key-parse errors: every malformed-key shape we know (built from the
//! committed vectors, the shapes the security review found, and every file of a fuzz corpus if
//! one is checked in) goes through every key parser, and no 40-character run of the input's
//! encoded data may appear in the error's `Display` or `Debug` (nor in the `Debug` of a key that
//! did parse).

use std::path::{Path, PathBuf};

use base64::Engine as _;
use ocicrypt_core::jwe::KeyAlg;
use ocicrypt_core::keys::{classify_key_file, PrivateKey, PublicKey};

/// The window length the issue names: any 40 characters of the key in a message is a leak.
const RUN: usize = 40;

fn vectors() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/vectors/keys")
}

/// Every run of at least [`RUN`] characters of the base64/base64url/hex alphabet in `input`.
fn secret_runs(input: &[u8]) -> Vec<String> {
    let mut runs = Vec::new();
    let mut cur = String::new();
    for &b in input {
        if b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'_' | b'-') {
            cur.push(b as char);
        } else if !cur.is_empty() {
            if cur.len() >= RUN {
                runs.push(std::mem::take(&mut cur));
            }
            cur.clear();
        }
    }
    if cur.len() >= RUN {
        runs.push(cur);
    }
    runs
}

/// The base64 body of a PEM file, on one line.
fn pem_body(pem: &str) -> String {
    pem.lines()
        .filter(|l| !l.starts_with("-----") && !l.contains(':'))
        .collect::<Vec<_>>()
        .concat()
}

fn assert_no_run(case: &str, input: &[u8], extra_secrets: &[&str], text: &str) {
    let mut runs = secret_runs(input);
    runs.extend(extra_secrets.iter().map(|s| (*s).to_owned()));
    for run in &runs {
        let chars: Vec<char> = run.chars().collect();
        for w in chars.windows(RUN) {
            let w: String = w.iter().collect();
            assert!(
                !text.contains(&w),
                "{case}: the message quotes 40 characters of the key ({w}):\n{text}"
            );
        }
    }
}

/// Runs every parser over `input` and checks every message and debug rendering.
fn check(case: &str, input: &[u8], extra_secrets: &[&str]) -> usize {
    let mut messages = 0;
    let mut look = |text: String| {
        assert_no_run(case, input, extra_secrets, &text);
        messages += 1;
    };
    for pw in [None, Some(&b"1234"[..]), Some(&b"wrong"[..])] {
        match PrivateKey::from_bytes(input, pw, "t") {
            Ok(k) => look(format!("{k:?}")),
            Err(e) => {
                look(e.to_string());
                look(format!("{e:?}"));
            }
        }
    }
    match PublicKey::from_bytes(input, "t") {
        Ok(k) => {
            look(format!("{k:?}"));
            if let Err(e) = KeyAlg::for_recipient(&k) {
                look(e);
            }
        }
        Err(e) => {
            look(e.to_string());
            look(format!("{e:?}"));
        }
    }
    let kind = classify_key_file(input, "t");
    look(kind.describe());
    look(format!("{kind:?}"));
    messages
}

/// The PEM shapes: the review's run-on BEGIN line and its relatives.
fn pem_shapes(label: &str, body: &str, lines: &[&str]) -> Vec<(String, String)> {
    let wrapped = lines.join("\n");
    let mut half = body.to_owned();
    half.truncate(body.len() / 2);
    let mut bad_b64 = body.to_owned();
    bad_b64.insert(body.len() / 2, '!');
    vec![
        (
            "BEGIN line without closing dashes, body on one line".into(),
            format!("-----BEGIN {label} {body} -----END {label}-----\n"),
        ),
        (
            "BEGIN line without closing dashes, body on the same line, END on the next".into(),
            format!("-----BEGIN {label} {body}\n-----END {label}-----\n"),
        ),
        (
            "BEGIN line without closing dashes, wrapped body".into(),
            format!("-----BEGIN {label}\n{wrapped}\n-----END {label}-----\n"),
        ),
        (
            "label is the body".into(),
            format!("-----BEGIN {body}-----\n{wrapped}\n-----END {body}-----\n"),
        ),
        (
            "label runs into the body with dashes".into(),
            format!("-----BEGIN {label}{body}-----\n{wrapped}\n-----END {label}-----\n"),
        ),
        (
            "no END line".into(),
            format!("-----BEGIN {label}-----\n{wrapped}\n"),
        ),
        (
            "END line with the body as its label".into(),
            format!("-----BEGIN {label}-----\n{wrapped}\n-----END {body}-----\n"),
        ),
        (
            "END label differs".into(),
            format!("-----BEGIN {label}-----\n{wrapped}\n-----END {label}X-----\n"),
        ),
        (
            "invalid base64".into(),
            format!("-----BEGIN {label}-----\n{bad_b64}\n-----END {label}-----\n"),
        ),
        (
            "truncated DER".into(),
            format!("-----BEGIN {label}-----\n{half}\n-----END {label}-----\n"),
        ),
        (
            "header line holding the body".into(),
            format!("-----BEGIN {label}-----\nDEK-Info: {body}\n\n{wrapped}\n-----END {label}-----\n"),
        ),
        (
            "unknown label".into(),
            format!("-----BEGIN SOMETHING ELSE-----\n{wrapped}\n-----END SOMETHING ELSE-----\n"),
        ),
        (
            "two BEGIN lines".into(),
            format!("-----BEGIN {label}-----\n-----BEGIN {label} {body}\n-----END {label}-----\n"),
        ),
    ]
}

fn b64url(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// JWK shapes: every string member set to the key's private scalar, and broken JSON around it.
fn jwk_shapes() -> Vec<(String, String, String)> {
    let pem = std::fs::read(vectors().join("ec.p8.pem")).unwrap();
    let ec = openssl::pkey::PKey::private_key_from_pem(&pem)
        .unwrap()
        .ec_key()
        .unwrap();
    let mut ctx = openssl::bn::BigNumContext::new().unwrap();
    let mut x = openssl::bn::BigNum::new().unwrap();
    let mut y = openssl::bn::BigNum::new().unwrap();
    ec.public_key()
        .affine_coordinates(ec.group(), &mut x, &mut y, &mut ctx)
        .unwrap();
    let (x, y) = (
        b64url(&x.to_vec_padded(32).unwrap()),
        b64url(&y.to_vec_padded(32).unwrap()),
    );
    let d = b64url(&ec.private_key().to_vec_padded(32).unwrap());
    // A longer secret too (an RSA PKCS#8 body), in case a field is cut at 43 characters.
    let long = pem_body(&std::fs::read_to_string(vectors().join("rsa.pem")).unwrap());
    let mut out = Vec::new();
    for secret in [d.clone(), long] {
        let s = &secret;
        let good = format!(r#""kty":"EC","crv":"P-256","x":"{x}","y":"{y}""#);
        let shapes = [
            (
                "kty is the key",
                format!(r#"{{"kty":"{s}","crv":"P-256","d":"{s}"}}"#),
            ),
            (
                "crv is the key",
                format!(r#"{{"kty":"EC","crv":"{s}","x":"{x}","y":"{y}","d":"{d}"}}"#),
            ),
            (
                "OKP crv is the key",
                format!(r#"{{"kty":"OKP","crv":"{s}","x":"{s}"}}"#),
            ),
            ("alg is the key (public)", format!(r#"{{{good},"alg":"{s}"}}"#)),
            (
                "alg is the key (private)",
                format!(r#"{{{good},"d":"{d}","alg":"{s}"}}"#),
            ),
            ("kid is the key", format!(r#"{{{good},"kid":"{s}"}}"#)),
            ("d is not base64url", format!(r#"{{{good},"d":"{s}!"}}"#)),
            ("d is not on the curve", format!(r#"{{{good},"d":"{s}"}}"#)),
            (
                "x is the key",
                format!(r#"{{"kty":"EC","crv":"P-256","x":"{s}","y":"{y}","d":"{d}"}}"#),
            ),
            (
                "RSA n is the key",
                format!(r#"{{"kty":"RSA","n":"{s}","e":"AQAB"}}"#),
            ),
            (
                "RSA without primes",
                format!(r#"{{"kty":"RSA","n":"{s}","e":"AQAB","d":"{s}"}}"#),
            ),
            (
                "syntax error after the key",
                format!(r#"{{{good},"d":"{s}" "x"}}"#),
            ),
            ("unterminated string", format!(r#"{{{good},"d":"{s}"#)),
            ("key as a member name", format!(r#"{{{good},"{s}":1,"d":"{s}"}}"#)),
            (
                "wrong type next to the key",
                format!(r#"{{"kty":["{s}"],"d":"{s}"}}"#),
            ),
            (
                "number where a string goes",
                format!(r#"{{"kty":"EC","crv":1{}}}"#, "0".repeat(60)),
            ),
            ("key set", format!(r#"{{"keys":[{{"d":"{s}"}}]}}"#)),
            ("symmetric key", format!(r#"{{"kty":"oct","k":"{s}"}}"#)),
        ];
        for (name, json) in shapes {
            out.push((name.to_owned(), json, secret.clone()));
        }
    }
    out
}

/// Fuzz corpora checked into the workspace (`fuzz/corpus/<target>/`), if any.
fn corpus_files() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut out = Vec::new();
    for fuzz in [root.join("fuzz/corpus"), root.join("ocicrypt-core/fuzz/corpus")] {
        let Ok(targets) = std::fs::read_dir(&fuzz) else {
            continue;
        };
        for t in targets.flatten() {
            let name = t.file_name().to_string_lossy().to_lowercase();
            if !(name.contains("key") || name.contains("pem") || name.contains("jwk")) {
                continue;
            }
            for f in std::fs::read_dir(t.path()).into_iter().flatten().flatten() {
                if f.file_type().is_ok_and(|t| t.is_file()) {
                    out.push(f.path());
                }
            }
        }
    }
    out
}

#[test]
fn no_key_material_in_any_key_parse_message() {
    let mut cases = 0;
    let mut messages = 0;
    for entry in std::fs::read_dir(vectors()).unwrap() {
        let path = entry.unwrap().path();
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let Some(begin) = text.lines().find(|l| l.starts_with("-----BEGIN ")) else {
            continue;
        };
        let label = begin.trim_start_matches("-----BEGIN ").trim_end_matches('-');
        let lines: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.starts_with("-----BEGIN "))
            .skip(1)
            .take_while(|l| !l.starts_with("-----END "))
            .filter(|l| !l.contains(':') && !l.is_empty())
            .collect();
        let body = lines.concat();
        assert!(body.len() > 100, "{}", path.display());
        for (shape, input) in pem_shapes(label, &body, &lines) {
            let case = format!("{} / {shape}", path.display());
            messages += check(&case, input.as_bytes(), &[&body]);
            cases += 1;
        }
    }
    for (shape, json, secret) in jwk_shapes() {
        messages += check(&format!("JWK / {shape}"), json.as_bytes(), &[&secret]);
        cases += 1;
    }
    for path in corpus_files() {
        let input = std::fs::read(&path).unwrap();
        messages += check(&path.display().to_string(), &input, &[]);
        cases += 1;
    }
    // The shapes above: 13 per PEM vector (9 PEM files) and 36 JWKs.
    assert!(cases >= 9 * 13 + 36, "only {cases} cases ran");
    assert!(messages > cases * 8, "only {messages} messages looked at");
}

/// The review's reproduction, checked by name: the run-on BEGIN line must say what is wrong
/// without quoting the body, and must not be mistaken for a valid key.
#[test]
fn run_on_begin_line_says_what_is_wrong() {
    let text = std::fs::read_to_string(vectors().join("cert.key.pem")).unwrap();
    let body = pem_body(&text);
    let input = format!("-----BEGIN PRIVATE KEY {body} -----END PRIVATE KEY-----\n");
    let e = PrivateKey::from_bytes(input.as_bytes(), None, "secret key.pem").unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("invalid label"), "{msg}");
    assert!(msg.contains("closing"), "{msg}");
    assert!(!msg.contains(&body[..RUN]), "{msg}");
    assert!(msg.len() < 300, "{msg}");
}

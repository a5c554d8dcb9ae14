//! The Key Protect client against the emulator, over real HTTP on loopback: every success,
//! retry and error path.

use std::time::Duration;

use keyprotect_client::{
    Client, ClientOptions, CreateKey, Error, KeyProtectConfig, KeyState, ListKeysOptions, Operation,
    TransportKind,
};
use keyprotect_emulator::{Emulator, Fault, Op};

fn fast() -> ClientOptions {
    ClientOptions {
        request_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(5),
        max_attempts: 4,
        backoff_base: Duration::from_millis(5),
        backoff_cap: Duration::from_millis(40),
        max_retry_after: Duration::from_secs(5),
        retry_deadline: Duration::from_secs(30),
        ..ClientOptions::default()
    }
}

fn client(emu: &Emulator) -> Client {
    Client::with_options(emu.config(), fast()).unwrap()
}

#[tokio::test]
async fn wrap_unwrap_roundtrip_with_and_without_aad() {
    let emu = Emulator::start().unwrap();
    let kp = client(&emu);
    let root = kp.create_root_key("roundtrip").await.unwrap();
    assert!(root.is_root());
    assert_eq!(root.key_state(), KeyState::Active);
    assert_eq!(emu.key_state(&root.id), Some(KeyState::Active));

    let secret = b"-----BEGIN PRIVATE KEY-----\nnot really\n-----END PRIVATE KEY-----\n";
    let w = kp.wrap(&root.id, secret, None).await.unwrap();
    assert!(w.plaintext.is_none());
    assert_eq!(
        w.key_version.as_ref().unwrap().id,
        root.id,
        "first version id is the key id"
    );
    let u = kp.unwrap(&root.id, &w.ciphertext, None).await.unwrap();
    assert_eq!(&u.plaintext[..], secret);
    assert!(u.rewrapped.is_none());
    assert_eq!(emu.unwraps_of(&w.ciphertext), 1);

    // The ciphertext is base64 of the documented JSON envelope.
    let env: serde_json::Value =
        serde_json::from_slice(&keyprotect_client::b64::decode_lenient(&w.ciphertext).unwrap()).unwrap();
    assert_eq!(env["version"], "4.0.0");
    assert_eq!(env["handle"], root.id.as_str());
    assert!(env["iv"].is_string() && env["ciphertext"].is_string());

    let aad = vec!["image".to_owned(), "layer-1".to_owned()];
    let w = kp.wrap(&root.id, b"dek", Some(&aad)).await.unwrap();
    assert_eq!(
        &kp.unwrap(&root.id, &w.ciphertext, Some(&aad))
            .await
            .unwrap()
            .plaintext[..],
        b"dek"
    );
    // AAD in another order, or missing: 422.
    let swapped = vec!["layer-1".to_owned(), "image".to_owned()];
    let e = kp
        .unwrap(&root.id, &w.ciphertext, Some(&swapped))
        .await
        .unwrap_err();
    assert!(e.is_unprocessable_ciphertext() && !e.is_transient(), "{e}");
    let e = kp.unwrap(&root.id, &w.ciphertext, None).await.unwrap_err();
    assert_eq!(e.status(), Some(422));
    assert_eq!(e.reasons()[0].code, "UNPROCESSABLE_CIPHERTEXT_ERR");

    // Another root key cannot unwrap it.
    let other = kp.create_root_key("other").await.unwrap();
    let e = kp.unwrap(&other.id, &w.ciphertext, Some(&aad)).await.unwrap_err();
    assert_eq!(e.status(), Some(422), "{e}");

    // A generated data key.
    let g = kp.wrap_generate(&root.id, None).await.unwrap();
    let dek = g.plaintext.as_ref().unwrap();
    assert_eq!(dek.len(), 32);
    assert_eq!(
        &kp.unwrap(&root.id, &g.ciphertext, None).await.unwrap().plaintext[..],
        &dek[..]
    );

    // Aliases name the key too.
    let aliased = emu.create_root_key_with_aliases("aliased", &["my-alias"]);
    let w = kp.wrap("my-alias", b"x", None).await.unwrap();
    assert_eq!(
        &kp.unwrap(&aliased, &w.ciphertext, None).await.unwrap().plaintext[..],
        b"x"
    );

    // One token for all of that, and one pooled connection (IAM and Key Protect share the
    // host here) for every request.
    assert_eq!(emu.count(Op::Token), 1);
    assert_eq!(
        emu.connections(),
        1,
        "{} requests over {} connections",
        emu.requests().len(),
        emu.connections()
    );
}

#[tokio::test]
async fn rotation_returns_rewrapped_ciphertext_and_versions() {
    let emu = Emulator::start().unwrap();
    let kp = client(&emu);
    let root = kp.create_root_key("rot").await.unwrap().id;
    let w = kp.wrap(&root, b"payload", None).await.unwrap();
    kp.rotate_key(&root).await.unwrap();
    let versions = emu.key_versions(&root);
    assert_eq!(versions.len(), 2);

    let u = kp.unwrap(&root, &w.ciphertext, None).await.unwrap();
    assert_eq!(&u.plaintext[..], b"payload");
    assert_eq!(u.key_version.as_ref().unwrap().id, versions[0]);
    let rw = u.rewrapped.expect("a rewrapped ciphertext after rotation");
    assert_eq!(rw.key_version.as_ref().unwrap().id, versions[1]);
    assert_ne!(rw.ciphertext, w.ciphertext);
    // The new ciphertext unwraps without a further rewrap; the old one still works.
    let u2 = kp.unwrap(&root, &rw.ciphertext, None).await.unwrap();
    assert!(u2.rewrapped.is_none());
    assert_eq!(&u2.plaintext[..], b"payload");
    assert_eq!(
        &kp.unwrap(&root, &w.ciphertext, None).await.unwrap().plaintext[..],
        b"payload"
    );

    let r = kp.rewrap(&root, &w.ciphertext, None).await.unwrap();
    assert_eq!(r.key_version.unwrap().id, versions[0]);
    assert_eq!(r.rewrapped_key_version.unwrap().id, versions[1]);
    assert_eq!(
        &kp.unwrap(&root, &r.ciphertext, None).await.unwrap().plaintext[..],
        b"payload"
    );

    let meta = kp.get_key_metadata(&root).await.unwrap();
    assert_eq!(meta.key_version.unwrap().id, versions[1]);
    assert!(meta.last_rotate_date.is_some());
}

#[tokio::test]
async fn key_states_give_409_410_and_deactivated_still_unwraps() {
    let emu = Emulator::start().unwrap();
    let kp = client(&emu);
    let root = kp.create_root_key("states").await.unwrap().id;
    let w = kp.wrap(&root, b"k", None).await.unwrap();

    kp.disable_key(&root).await.unwrap();
    assert_eq!(emu.key_state(&root), Some(KeyState::Suspended));
    let e = kp.unwrap(&root, &w.ciphertext, None).await.unwrap_err();
    assert_eq!(e.status(), Some(409));
    assert!(
        e.is_key_unusable() && !e.is_key_deleted() && !e.is_transient(),
        "{e}"
    );
    assert_eq!(e.reasons()[0].code, "KEY_ACTION_INVALID_STATE_ERR");
    assert!(
        matches!(
            e,
            Error::Api {
                op: Operation::Unwrap,
                attempts: 1,
                ..
            }
        ),
        "409 is not retried: {e:?}"
    );
    let e = kp.wrap(&root, b"k", None).await.unwrap_err();
    assert_eq!(e.status(), Some(409));
    assert_eq!(
        kp.get_key_metadata(&root).await.unwrap().key_state(),
        KeyState::Suspended
    );

    kp.enable_key(&root).await.unwrap();
    assert_eq!(
        &kp.unwrap(&root, &w.ciphertext, None).await.unwrap().plaintext[..],
        b"k"
    );

    emu.set_key_state(&root, KeyState::Deactivated);
    assert_eq!(
        &kp.unwrap(&root, &w.ciphertext, None).await.unwrap().plaintext[..],
        b"k"
    );
    assert_eq!(kp.wrap(&root, b"k", None).await.unwrap_err().status(), Some(409));
    emu.set_key_state(&root, KeyState::Active);

    kp.delete_key(&root).await.unwrap();
    let e = kp.unwrap(&root, &w.ciphertext, None).await.unwrap_err();
    assert!(
        e.is_key_deleted() && e.is_key_unusable() && !e.is_transient(),
        "{e}"
    );
    assert_eq!(e.reasons()[0].code, "KEY_DELETED_ERR");
    let meta = kp.get_key_metadata(&root).await.unwrap();
    assert_eq!(meta.key_state(), KeyState::Destroyed);
    assert_eq!(meta.deleted, Some(true));

    let e = kp
        .unwrap("0f0f0f0f-0000-4000-8000-000000000000", &w.ciphertext, None)
        .await
        .unwrap_err();
    assert!(e.is_not_found() && !e.is_transient(), "{e}");
    let e = kp.unwrap(&root, "!!not base64!!", None).await.unwrap_err();
    assert!(matches!(e, Error::InvalidInput(_)), "{e}");
    // A base64 string that is not an envelope: the service says 400.
    let live = kp.create_root_key("live").await.unwrap().id;
    let e = kp.unwrap(&live, "aGVsbG8=", None).await.unwrap_err();
    assert_eq!(e.status(), Some(400));
    assert_eq!(e.reasons()[0].code, "INVALID_FIELD_ERR");
}

#[tokio::test]
async fn list_get_and_create_keys() {
    let emu = Emulator::start().unwrap();
    let kp = client(&emu);
    let a = kp.create_root_key("a").await.unwrap().id;
    let std_key = kp
        .create_key(&CreateKey {
            name: "standard".into(),
            extractable: true,
            payload: Some(zeroize::Zeroizing::new(b"0123456789abcdef".to_vec())),
            ..CreateKey::default()
        })
        .await
        .unwrap();
    let b = emu.create_root_key("b");
    emu.delete_key(&b);

    let all = kp.list_keys(&ListKeysOptions::default()).await.unwrap();
    let ids: Vec<&str> = all.iter().map(|k| k.id.as_str()).collect();
    assert_eq!(
        ids,
        [a.as_str(), std_key.id.as_str()],
        "deleted keys are not listed by default"
    );
    let roots = kp
        .list_keys(&ListKeysOptions {
            extractable: Some(false),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(roots.len(), 1);
    let deleted = kp
        .list_keys(&ListKeysOptions {
            states: vec![KeyState::Destroyed],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(deleted.len(), 1);
    assert_eq!(deleted[0].id, b);
    let page = kp
        .list_keys(&ListKeysOptions {
            limit: Some(1),
            offset: Some(1),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page[0].id, std_key.id);

    let got = kp.get_key(&std_key.id).await.unwrap();
    use secrecy::ExposeSecret;
    assert_eq!(
        got.payload.as_ref().unwrap().expose_secret(),
        "MDEyMzQ1Njc4OWFiY2RlZg=="
    );
    assert!(
        !format!("{got:?}").contains("MDEy"),
        "payload is redacted in Debug"
    );
    let meta = kp.get_key_metadata(&std_key.id).await.unwrap();
    assert!(meta.payload.is_none());
    // Standard keys cannot wrap.
    assert_eq!(
        kp.wrap(&std_key.id, b"x", None).await.unwrap_err().status(),
        Some(400)
    );
    assert!(matches!(
        kp.create_root_key(" ").await,
        Err(Error::InvalidInput(_))
    ));
}

#[tokio::test]
async fn retries_429_honouring_retry_after_then_succeeds() {
    let emu = Emulator::start().unwrap();
    let kp = client(&emu);
    let root = emu.create_root_key("r");
    let w = kp.wrap(&root, b"x", None).await.unwrap();
    emu.reset_counts();
    emu.inject(
        Some(Op::Unwrap),
        Fault::TooManyRequests {
            retry_after: Some("0".into()),
        },
        2,
    );
    // An HTTP date in the past means "now".
    emu.inject(
        Some(Op::Unwrap),
        Fault::TooManyRequests {
            retry_after: Some("Wed, 21 Oct 2015 07:28:00 GMT".into()),
        },
        1,
    );
    let u = kp.unwrap(&root, &w.ciphertext, None).await.unwrap();
    assert_eq!(&u.plaintext[..], b"x");
    assert_eq!(emu.count(Op::Unwrap), 4);
    assert_eq!(emu.successes(Op::Unwrap), 1);
    // All attempts of one call share the correlation id.
    let corr: Vec<_> = emu
        .requests()
        .into_iter()
        .filter(|r| r.op == Op::Unwrap)
        .map(|r| r.correlation_id)
        .collect();
    assert!(
        corr[0].is_some() && corr.iter().all(|c| *c == corr[0]),
        "{corr:?}"
    );
}

#[tokio::test]
async fn retry_after_longer_than_allowed_stops_at_once() {
    let emu = Emulator::start().unwrap();
    let kp = client(&emu);
    let root = emu.create_root_key("r");
    emu.inject(
        Some(Op::Wrap),
        Fault::TooManyRequests {
            retry_after: Some("3600".into()),
        },
        5,
    );
    let e = kp.wrap(&root, b"x", None).await.unwrap_err();
    assert_eq!(e.status(), Some(429));
    assert!(e.is_transient(), "{e}");
    assert!(matches!(e, Error::Api { attempts: 1, .. }));
    assert_eq!(emu.count(Op::Wrap), 1);
}

#[tokio::test]
async fn retries_5xx_bursts_and_gives_up_after_max_attempts() {
    let emu = Emulator::start().unwrap();
    let kp = client(&emu);
    let root = emu.create_root_key("r");
    for code in [500, 502, 503] {
        emu.inject(Some(Op::Wrap), Fault::ServerError(code), 1);
    }
    kp.wrap(&root, b"x", None).await.unwrap();
    assert_eq!(emu.count(Op::Wrap), 4);

    emu.reset_counts();
    emu.inject(Some(Op::Wrap), Fault::ServerError(503), 10);
    let e = kp.wrap(&root, b"x", None).await.unwrap_err();
    assert!(e.is_transient() && e.status() == Some(503), "{e}");
    assert!(matches!(e, Error::Api { attempts: 4, .. }), "{e:?}");
    assert!(e.correlation_id().is_some());
    assert_eq!(emu.count(Op::Wrap), 4, "bounded by max_attempts");
    emu.clear_faults();

    // 501 is not retried.
    emu.reset_counts();
    emu.inject(Some(Op::Wrap), Fault::ServerError(501), 3);
    let e = kp.wrap(&root, b"x", None).await.unwrap_err();
    assert!(!e.is_transient());
    assert_eq!(emu.count(Op::Wrap), 1);
    emu.clear_faults();

    // Create is never repeated after a 5xx (it may have been executed).
    emu.reset_counts();
    emu.inject(Some(Op::CreateKey), Fault::ServerError(503), 1);
    assert_eq!(kp.create_root_key("c").await.unwrap_err().status(), Some(503));
    assert_eq!(emu.count(Op::CreateKey), 1);
}

#[tokio::test]
async fn retry_deadline_bounds_the_total_time() {
    let emu = Emulator::start().unwrap();
    let opts = ClientOptions {
        max_attempts: 100,
        retry_deadline: Duration::from_millis(200),
        ..fast()
    };
    let kp = Client::with_options(emu.config(), opts).unwrap();
    let root = emu.create_root_key("r");
    emu.inject(
        Some(Op::Wrap),
        Fault::TooManyRequests {
            retry_after: Some("1".into()),
        },
        100,
    );
    let e = kp.wrap(&root, b"x", None).await.unwrap_err();
    assert_eq!(e.status(), Some(429));
    assert_eq!(
        emu.count(Op::Wrap),
        1,
        "a 1 s Retry-After does not fit in a 200 ms deadline"
    );
}

#[tokio::test]
async fn dropped_connections_are_retried_then_reported_as_transient() {
    let emu = Emulator::start().unwrap();
    let kp = client(&emu);
    let root = emu.create_root_key("r");
    let w = kp.wrap(&root, b"x", None).await.unwrap();
    emu.reset_counts();
    emu.inject(Some(Op::Unwrap), Fault::Drop, 2);
    assert_eq!(
        &kp.unwrap(&root, &w.ciphertext, None).await.unwrap().plaintext[..],
        b"x"
    );
    assert_eq!(emu.count(Op::Unwrap), 3);

    emu.inject(Some(Op::Unwrap), Fault::Drop, 10);
    let e = kp.unwrap(&root, &w.ciphertext, None).await.unwrap_err();
    assert!(
        matches!(
            e,
            Error::Transport {
                kind: TransportKind::Connection,
                attempts: 4,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.is_transient());
    emu.clear_faults();

    // Nothing listening: connection refused is transient too.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let cfg = KeyProtectConfig::new(
        format!("http://127.0.0.1:{port}"),
        "i",
        "k",
        Some(format!("http://127.0.0.1:{port}")),
    );
    let dead = Client::with_options(
        cfg,
        ClientOptions {
            max_attempts: 2,
            ..fast()
        },
    )
    .unwrap();
    let e = dead.wrap("r", b"x", None).await.unwrap_err();
    assert!(e.is_transient(), "{e}");
    assert!(
        matches!(
            e,
            Error::Transport {
                op: Operation::Token,
                ..
            }
        ),
        "{e:?}"
    );
}

#[tokio::test]
async fn slow_responses_time_out_and_are_retried() {
    let emu = Emulator::start().unwrap();
    let opts = ClientOptions {
        request_timeout: Duration::from_millis(300),
        ..fast()
    };
    let kp = Client::with_options(emu.config(), opts).unwrap();
    let root = emu.create_root_key("r");
    kp.check_credentials().await.unwrap();
    emu.inject(Some(Op::Wrap), Fault::Slow(Duration::from_secs(3)), 1);
    kp.wrap(&root, b"x", None).await.unwrap();
    assert_eq!(emu.count(Op::Wrap), 2);

    emu.inject(Some(Op::Wrap), Fault::Slow(Duration::from_secs(3)), 4);
    let e = kp.wrap(&root, b"x", None).await.unwrap_err();
    assert!(
        matches!(
            e,
            Error::Transport {
                kind: TransportKind::Timeout,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.is_transient());
}

#[tokio::test]
async fn one_401_triggers_one_reauth() {
    let emu = Emulator::start().unwrap();
    let kp = client(&emu);
    let root = emu.create_root_key("r");
    kp.wrap(&root, b"x", None).await.unwrap();
    assert_eq!(emu.count(Op::Token), 1);

    emu.inject(Some(Op::Wrap), Fault::Unauthorized, 1);
    kp.wrap(&root, b"x", None).await.unwrap();
    assert_eq!(
        emu.count(Op::Token),
        2,
        "a 401 drops the token and fetches a new one"
    );
    assert_eq!(emu.count(Op::Wrap), 3);

    // Revoked tokens (e.g. IAM-side expiry) are handled the same way.
    emu.revoke_tokens();
    kp.wrap(&root, b"x", None).await.unwrap();
    assert_eq!(emu.count(Op::Token), 3);

    // A second 401 in the same call is final: an auth error, not transient.
    emu.inject(Some(Op::Wrap), Fault::Unauthorized, 2);
    let e = kp.wrap(&root, b"x", None).await.unwrap_err();
    assert!(e.is_auth() && !e.is_transient() && e.status() == Some(401), "{e}");
    assert_eq!(emu.count(Op::Token), 4, "only one re-auth per call");

    // Wrong instance id: 401 after the one re-auth.
    let mut cfg = emu.config();
    cfg.instance_id = "00000000-0000-4000-8000-000000000000".into();
    let wrong = Client::with_options(cfg, fast()).unwrap();
    assert_eq!(
        wrong.wrap(&root, b"x", None).await.unwrap_err().status(),
        Some(401)
    );
}

#[tokio::test]
async fn iam_errors_are_typed_and_retried_when_transient() {
    let emu = Emulator::start().unwrap();
    let root = emu.create_root_key("r");
    let mut cfg = emu.config();
    cfg.apikey = "definitely-wrong-key".to_owned().into();
    let bad = Client::with_options(cfg, fast()).unwrap();
    let e = bad.wrap(&root, b"x", None).await.unwrap_err();
    match &e {
        Error::Iam {
            status: 400,
            code: Some(c),
            request_id: Some(_),
            ..
        } => assert_eq!(c, "BXNIM0415E"),
        other => panic!("{other:?}"),
    }
    assert!(e.is_auth() && !e.is_transient());
    let text = format!("{e} {e:?}");
    assert!(
        !text.contains("definitely-wrong-key"),
        "the API key leaks: {text}"
    );
    assert_eq!(emu.count(Op::Token), 1, "IAM 4xx is not retried");
    assert_eq!(emu.count(Op::Wrap), 0);

    emu.reset_counts();
    let kp = client(&emu);
    emu.inject(Some(Op::Token), Fault::ServerError(503), 1);
    emu.inject(
        Some(Op::Token),
        Fault::TooManyRequests {
            retry_after: Some("0".into()),
        },
        1,
    );
    emu.inject(Some(Op::Token), Fault::Drop, 1);
    kp.wrap(&root, b"x", None).await.unwrap();
    assert_eq!(emu.count(Op::Token), 4);

    emu.reset_counts();
    let kp = client(&emu);
    emu.inject(Some(Op::Token), Fault::ServerError(500), 10);
    let e = kp.wrap(&root, b"x", None).await.unwrap_err();
    assert!(
        matches!(
            e,
            Error::Iam {
                status: 500,
                attempts: 4,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.is_transient());
}

#[tokio::test]
async fn tokens_are_cached_and_refreshed_before_expiry() {
    let emu = Emulator::start().unwrap();
    let kp = client(&emu);
    let root = emu.create_root_key("r");
    for _ in 0..10 {
        kp.wrap(&root, b"x", None).await.unwrap();
    }
    assert_eq!(emu.count(Op::Token), 1);

    // Tokens of 1 s: refreshed at 80 % of their life, so none is ever used after expiry.
    emu.set_token_ttl(Duration::from_secs(1));
    emu.revoke_tokens();
    kp.wrap(&root, b"x", None).await.unwrap();
    let before = emu.count(Op::Token);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    kp.wrap(&root, b"x", None).await.unwrap();
    assert_eq!(emu.count(Op::Token), before + 1, "a fresh token was fetched");
    let unauthorized = emu.requests().iter().filter(|r| r.status == 401).count();
    assert_eq!(unauthorized, 1, "only the revoked token was ever refused");

    // Concurrent callers share one token fetch (single flight).
    emu.set_token_ttl(Duration::from_secs(3600));
    let fresh = client(&emu);
    emu.reset_counts();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let c = fresh.clone();
        let r = root.clone();
        set.spawn(async move { c.wrap(&r, b"x", None).await.map(drop) });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap().unwrap();
    }
    assert_eq!(emu.count(Op::Token), 1);
}

#[tokio::test]
async fn secrets_never_appear_in_debug_or_errors() {
    let emu = Emulator::start().unwrap();
    let kp = client(&emu);
    let root = emu.create_root_key("r");
    let w = kp.wrap(&root, b"TOPSECRETPLAINTEXT", None).await.unwrap();
    let u = kp.unwrap(&root, &w.ciphertext, None).await.unwrap();
    let dbg = format!(
        "{kp:?} {:?} {u:?} {:?}",
        emu.config(),
        kp.wrap_generate(&root, None).await.unwrap()
    );
    assert!(!dbg.contains(emu.api_key()), "{dbg}");
    assert!(!dbg.contains("TOPSECRET"), "{dbg}");
    assert!(!dbg.contains("VE9QU0VDUkVU"), "{dbg}"); // base64 of the plaintext
    emu.disable_key(&root);
    let e = kp.unwrap(&root, &w.ciphertext, None).await.unwrap_err();
    let text = format!("{e} {e:?}");
    assert!(
        !text.contains(emu.api_key()) && !text.contains("Bearer"),
        "{text}"
    );
}

#[tokio::test]
async fn invalid_inputs_are_refused_before_any_request() {
    let emu = Emulator::start().unwrap();
    let kp = client(&emu);
    assert!(matches!(
        kp.wrap("", b"x", None).await,
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        kp.wrap("k", b"", None).await,
        Err(Error::InvalidInput(_))
    ));
    let long = vec!["a".repeat(256)];
    assert!(matches!(
        kp.wrap("k", b"x", Some(&long)).await,
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        kp.unwrap("k", "  ", None).await,
        Err(Error::InvalidInput(_))
    ));
    assert_eq!(emu.counts().values().sum::<u64>(), 0);
    let e = Client::with_options(
        emu.config(),
        ClientOptions {
            ca_bundle_pem: Some(b"garbage".to_vec()),
            ..fast()
        },
    )
    .unwrap_err();
    assert!(matches!(e, Error::Config(_)), "{e}");
    let e = Client::new(KeyProtectConfig::new("http://kms.example.com", "i", "k", None)).unwrap_err();
    assert!(e.to_string().contains("loopback"), "{e}");
}

#[tokio::test]
async fn concurrency_cap_bounds_requests_in_flight() {
    let emu = Emulator::start().unwrap();
    let root = emu.create_root_key("r");
    for (limit, bound) in [(Some(2), 2), (None, 8)] {
        let kp = Client::with_options(
            emu.config(),
            ClientOptions {
                max_concurrent_requests: limit,
                ..fast()
            },
        )
        .unwrap();
        kp.check_credentials().await.unwrap();
        emu.reset_counts();
        emu.inject(Some(Op::Wrap), Fault::Slow(Duration::from_millis(300)), 8);
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let (c, r) = (kp.clone(), root.clone());
            set.spawn(async move { c.wrap(&r, b"x", None).await.map(drop) });
        }
        while let Some(r) = set.join_next().await {
            r.unwrap().unwrap();
        }
        assert_eq!(emu.successes(Op::Wrap), 8);
        let max = emu.max_in_flight();
        if limit.is_some() {
            assert!(max <= bound, "limit {limit:?}: {max} in flight");
        } else {
            assert!(max > 2, "without a limit the slow requests overlap: {max}");
        }
    }
}

#[tokio::test]
async fn emulator_plaintext_limit() {
    let emu = Emulator::start_with(keyprotect_emulator::EmulatorConfig {
        max_plaintext_b64: Some(4096),
        ..Default::default()
    })
    .unwrap();
    let kp = client(&emu);
    let root = emu.create_root_key("r");
    kp.wrap(&root, &[1u8; 3072], None).await.unwrap(); // 4096 base64 characters
    let e = kp.wrap(&root, &[1u8; 3073], None).await.unwrap_err();
    assert_eq!(e.status(), Some(400));
    assert_eq!(e.reasons()[0].code, "INVALID_FIELD_ERR");
}

#[tokio::test]
async fn key_versions() {
    let emu = Emulator::start().unwrap();
    let kp = client(&emu);
    let root = kp.create_root_key("v").await.unwrap().id;
    kp.rotate_key(&root).await.unwrap();
    let v = kp.list_key_versions(&root, false).await.unwrap();
    let mut want = emu.key_versions(&root);
    want.reverse();
    assert_eq!(
        v.iter().map(|v| v.id.clone()).collect::<Vec<_>>(),
        want,
        "newest first"
    );
    assert!(v[0].creation_date.is_some());
    kp.disable_key(&root).await.unwrap();
    assert_eq!(
        kp.list_key_versions(&root, false).await.unwrap_err().status(),
        Some(409)
    );
    assert_eq!(kp.list_key_versions(&root, true).await.unwrap().len(), 2);
}

#[tokio::test]
async fn failing_proactive_refresh_keeps_serving_the_valid_token() {
    let emu = Emulator::start().unwrap();
    emu.set_token_ttl(Duration::from_secs(6));
    let opts = ClientOptions {
        token_refresh_fraction: 0.2,
        token_expiry_margin: Duration::from_millis(100),
        ..fast()
    };
    let kp = Client::with_options(emu.config(), opts).unwrap();
    let root = emu.create_root_key("r");
    kp.wrap(&root, b"x", None).await.unwrap();
    assert_eq!(emu.count(Op::Token), 1);
    // Past the refresh point (1.2 s), well before expiry (5.9 s).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    emu.inject(Some(Op::Token), Fault::ServerError(503), 10);
    kp.wrap(&root, b"x", None).await.unwrap();
    assert_eq!(
        emu.count(Op::Token),
        2,
        "one refresh attempt, no retries, while the token is valid"
    );
    kp.wrap(&root, b"x", None).await.unwrap();
    assert_eq!(
        emu.count(Op::Token),
        2,
        "the failed refresh is not repeated at once"
    );
    emu.clear_faults();
}

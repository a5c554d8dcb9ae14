//! The gRPC key-provider client against Google's Python `grpcio` provider (testkit::grpc): the
//! async path (no runtime of its own), the sync `KeyWrapper` path inside and outside a tokio
//! runtime, and the bounds (a provider that never answers, one that is down).
#![cfg(feature = "grpc")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use ocicrypt_core::cipher::{LayerKey, MacTag, Nonce};
use ocicrypt_core::keyprovider::grpc::GrpcProvider;
use ocicrypt_core::keyprovider::{
    DecryptConfig, KeyProviderConfig, KeyProviderUnwrapper, KeyProviderWrapper, Provider, ProviderError,
};
use ocicrypt_core::keywrap::{error_chain, unwrap_options, wrap_options};
use ocicrypt_core::{AsyncKeyUnwrapper, KeyUnwrapper, KeyWrapper, PrivateLayerOptions, PublicLayerOptions};
use testkit::grpc::{python, Mode, PyProvider};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_and_sync_paths_against_grpcio() {
    let Some(py) = python() else { return };
    let p = PyProvider::start(&py, "pyprov", "s3cret", Mode::Ok);
    let cfg = KeyProviderConfig::from_json(
        serde_json::json!({"key-providers": {"pyprov": {"grpc": p.addr()}}})
            .to_string()
            .as_bytes(),
    )
    .unwrap();
    let key = LayerKey::generate();
    let private = PrivateLayerOptions::new(&key, &Nonce::generate(), "sha256:ab");
    let public = PublicLayerOptions::new(&MacTag([1; 32]));

    // async (what imgcrypt uses)
    let w = cfg
        .wrapper("pyprov", vec![b"kid-1".to_vec()])
        .unwrap()
        .into_async();
    let ann = wrap_options(&private, &public, &[w]).await.unwrap();
    let blob = ocicrypt_core::options::decode_b64(&ann["org.opencontainers.image.enc.keys.provider.pyprov"])
        .unwrap();
    let seen: serde_json::Value = serde_json::from_slice(&blob).unwrap();
    assert_eq!(seen["kid"], "kid-1", "the provider got the recipient parameter");
    let u: Vec<Arc<dyn AsyncKeyUnwrapper>> = cfg.unwrappers().into_iter().map(|u| u.into_async()).collect();
    let (back, _) = unwrap_options(&ann, &u).await.unwrap();
    assert_eq!(back.key().unwrap().as_bytes(), key.as_bytes());

    // sync, called from inside the runtime (on a worker thread) and from a plain thread
    let sync_w = cfg.wrapper("pyprov", vec![b"kid-2".to_vec()]).unwrap();
    let b2 = KeyWrapper::wrap_keys(&sync_w, b"{\"x\":1}").unwrap();
    let sync_u = cfg.unwrapper("pyprov").unwrap();
    assert_eq!(&*KeyUnwrapper::unwrap_key(&sync_u, &b2).unwrap(), b"{\"x\":1}");
    let out = std::thread::spawn(move || KeyUnwrapper::unwrap_key(&sync_u, &b2).map(|z| z.to_vec()))
        .join()
        .unwrap()
        .unwrap();
    assert_eq!(out, b"{\"x\":1}");
}

#[tokio::test]
async fn a_provider_that_never_answers_is_cut_off() {
    let Some(py) = python() else { return };
    let p = PyProvider::start(&py, "pyprov", "s", Mode::Slow);
    let g =
        GrpcProvider::new("pyprov", p.addr()).with_timeouts(Duration::from_secs(5), Duration::from_secs(1));
    let start = Instant::now();
    let e = KeyProviderUnwrapper::new(g.clone())
        .into_async()
        .unwrap_key(b"{}")
        .await
        .unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
    let s = error_chain(&e);
    assert!(
        s.contains("did not answer within 1 s") && s.contains(&p.addr()),
        "{s}"
    );
    // the sync path too
    let e = KeyWrapper::wrap_keys(&KeyProviderWrapper::new(g, vec![]), b"{}").unwrap_err();
    assert!(error_chain(&e).contains("did not answer"), "{e}");
}

#[test]
fn refused_connection_names_provider_and_address() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    drop(l);
    let g = GrpcProvider::new("gone", addr.clone());
    let e = Provider::from(g)
        .keyunwrap(&DecryptConfig::default(), b"x")
        .unwrap_err();
    let s = e.to_string();
    assert!(matches!(e, ProviderError::Connect { .. }), "{s}");
    assert!(s.contains("\"gone\"") && s.contains(&addr), "{s}");
}

//! The Kubernetes API stand-in (`testkit::kube`) against the real kube client and kube-runtime
//! watcher: the parts of the API the agent's tests rely on behave as a real API server does.

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ObjectReference, Secret};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::runtime::events::{Event as RecorderEvent, EventType, Recorder, Reporter};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Api;
use testkit::kube::KubeStandin;

const STEP: Duration = Duration::from_secs(10);

/// A watcher polled continuously in the background (as the agent does), its events queued.
struct Stream {
    rx: tokio::sync::mpsc::UnboundedReceiver<Result<Event<Secret>, watcher::Error>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn stream(standin: &KubeStandin, cfg: watcher::Config) -> Stream {
    let api: Api<Secret> = Api::namespaced(kube_client(standin), NS);
    let mut w = watcher::watcher(api, cfg).default_backoff().boxed();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Some(item) = w.next().await {
            if tx.send(item).is_err() {
                break;
            }
        }
    });
    Stream { rx, task }
}

/// The next event that is not an error (errors are part of recovering).
async fn next(s: &mut Stream) -> Event<Secret> {
    loop {
        match tokio::time::timeout(STEP, s.rx.recv())
            .await
            .expect("a watcher event in time")
        {
            Some(Ok(e)) => return e,
            Some(Err(_)) => continue,
            None => panic!("the watcher stream ended"),
        }
    }
}

fn name(e: &Event<Secret>) -> String {
    match e {
        Event::Apply(s) | Event::Delete(s) | Event::InitApply(s) => {
            s.metadata.name.clone().unwrap_or_default()
        }
        Event::Init => "<init>".into(),
        Event::InitDone => "<done>".into(),
    }
}

/// Events up to and including the next `InitDone`.
async fn initial_list(s: &mut Stream) -> Vec<String> {
    let mut names = Vec::new();
    loop {
        let e = next(s).await;
        match e {
            Event::Init => names.clear(),
            Event::InitApply(_) => names.push(name(&e)),
            Event::InitDone => return names,
            other => panic!("unexpected {} during the initial list", name(&other)),
        }
    }
}

#[tokio::test]
async fn watcher_lists_in_pages_then_watches() {
    let standin = KubeStandin::start().await.unwrap();
    for i in 0..7 {
        standin
            .create_secret(secret(&format!("s{i}"), "key", &[("k", b"v")]))
            .unwrap();
    }
    let mut other = secret("elsewhere", "key", &[]);
    other.metadata.namespace = Some("other".into());
    standin.create_secret(other).unwrap();
    let mut s = stream(&standin, watcher::Config::default().page_size(3));
    let names = initial_list(&mut s).await;
    assert_eq!(names, (0..7).map(|i| format!("s{i}")).collect::<Vec<_>>());
    let reqs = standin.requests();
    assert!(
        reqs.iter().filter(|r| r.uri.contains("limit=3")).count() >= 3,
        "{reqs:?}"
    );
    assert!(reqs.iter().any(|r| r.uri.contains("continue=")));

    standin.create_secret(secret("new", "key", &[])).unwrap();
    assert!(matches!(next(&mut s).await, Event::Apply(ref x) if x.metadata.name.as_deref() == Some("new")));
    standin.delete_secret(NS, "s0");
    assert!(matches!(next(&mut s).await, Event::Delete(ref x) if x.metadata.name.as_deref() == Some("s0")));
    assert!(standin
        .requests()
        .iter()
        .any(|r| r.uri.contains("watch=true") && r.uri.contains("resourceVersion=")));
}

#[tokio::test]
async fn expired_resource_version_makes_the_watcher_relist() {
    let standin = KubeStandin::start().await.unwrap();
    standin.create_secret(secret("a", "key", &[])).unwrap();
    let mut s = stream(&standin, watcher::Config::default().disable_bookmarks());
    assert_eq!(initial_list(&mut s).await, vec!["a"]);
    // Changes while down, then the history is gone: ERROR 410 on the watch, then a relist that no
    // longer has "a" (its DELETED event was never delivered).
    standin
        .restart_with(|k| {
            k.delete_secret(NS, "a");
            k.create_secret(secret("b", "key", &[])).unwrap();
        })
        .await
        .unwrap();
    assert_eq!(initial_list(&mut s).await, vec!["b"]);
}

#[tokio::test]
async fn bookmarks_keep_the_resource_version_fresh() {
    // Changes in another namespace advance the resource version without events for this watch.
    // With bookmarks the watcher learns the current version, so a restart that forgets the history
    // does not force a relist; without them it does.
    for bookmarks in [true, false] {
        let standin = KubeStandin::start().await.unwrap();
        standin.set_bookmark_interval(Duration::from_millis(50));
        standin.create_secret(secret("a", "key", &[])).unwrap();
        let mut cfg = watcher::Config::default();
        if !bookmarks {
            cfg = cfg.disable_bookmarks();
        }
        let mut s = stream(&standin, cfg);
        assert_eq!(initial_list(&mut s).await, vec!["a"]);
        for i in 0..3 {
            let mut o = secret(&format!("o{i}"), "key", &[]);
            o.metadata.namespace = Some("other".into());
            standin.create_secret(o).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
        standin.restart().await.unwrap();
        standin.create_secret(secret("after", "key", &[])).unwrap();
        let e = next(&mut s).await;
        if bookmarks {
            assert!(
                matches!(e, Event::Apply(ref x) if x.metadata.name.as_deref() == Some("after")),
                "{} {:?}",
                name(&e),
                standin.requests()
            );
        } else {
            assert!(matches!(e, Event::Init), "expected a relist, got {}", name(&e));
            assert_eq!(initial_list(&mut s).await, vec!["a", "after"]);
        }
    }
}

#[tokio::test]
async fn field_and_label_selectors_filter_list_and_watch() {
    let standin = KubeStandin::start().await.unwrap();
    standin
        .create_secret(secret("cfg", "kubernetes.io/dockercfg", &[]))
        .unwrap();
    let mut labelled = secret("l", "key", &[]);
    labelled.metadata.labels = Some([("app".to_string(), "x".to_string())].into());
    standin.create_secret(labelled).unwrap();
    standin.create_secret(secret("k", "key", &[])).unwrap();

    let mut s = stream(
        &standin,
        watcher::Config::default().fields("type!=kubernetes.io/dockercfg,metadata.name!=k"),
    );
    assert_eq!(initial_list(&mut s).await, vec!["l"]);
    let mut l = stream(&standin, watcher::Config::default().labels("app=x"));
    assert_eq!(initial_list(&mut l).await, vec!["l"]);
    // The label goes away: the label watch sees a DELETED, the field watch a MODIFIED.
    let mut x = standin.get_secret(NS, "l").unwrap();
    x.metadata.labels = None;
    standin.apply_secret(x).unwrap();
    assert!(matches!(next(&mut l).await, Event::Delete(_)));
    assert!(matches!(next(&mut s).await, Event::Apply(_)));
    // Unsupported fields are refused like the API server does.
    let api: Api<Secret> = Api::namespaced(kube_client(&standin), NS);
    let err = api
        .list(&ListParams::default().fields("data.k=v"))
        .await
        .unwrap_err();
    assert!(matches!(err, kube::Error::Api(ref s) if s.code == 400), "{err}");
}

#[tokio::test]
async fn streaming_list_ends_with_the_initial_events_bookmark() {
    let standin = KubeStandin::start().await.unwrap();
    standin.create_secret(secret("a", "key", &[])).unwrap();
    standin.create_secret(secret("b", "key", &[])).unwrap();
    let mut s = stream(&standin, watcher::Config::default().streaming_lists());
    assert_eq!(initial_list(&mut s).await, vec!["a", "b"]);
    standin.create_secret(secret("c", "key", &[])).unwrap();
    assert!(matches!(next(&mut s).await, Event::Apply(_)));
    assert!(standin
        .requests()
        .iter()
        .any(|r| r.uri.contains("sendInitialEvents=true")));
}

#[tokio::test]
async fn watch_timeouts_end_the_stream_and_the_watcher_resumes() {
    let standin = KubeStandin::start().await.unwrap();
    let mut s = stream(&standin, watcher::Config::default().timeout(1));
    assert!(initial_list(&mut s).await.is_empty());
    tokio::time::sleep(Duration::from_millis(2500)).await;
    standin.create_secret(secret("late", "key", &[])).unwrap();
    assert!(matches!(next(&mut s).await, Event::Apply(_)));
    let watches = standin
        .requests()
        .iter()
        .filter(|r| r.uri.contains("watch=true"))
        .count();
    assert!(
        watches >= 2,
        "the watch was re-established after its timeout ({watches})"
    );
}

#[tokio::test]
async fn crud_through_the_kube_client_with_status_errors() {
    let standin = KubeStandin::start().await.unwrap();
    let api: Api<Secret> = Api::namespaced(kube_client(&standin), NS);
    let mut s = secret("x", "key", &[]);
    s.string_data = Some([("k.pem".to_string(), "v".to_string())].into());
    let created = api.create(&PostParams::default(), &s).await.unwrap();
    assert_eq!(
        created.data.unwrap()["k.pem"].0,
        b"v",
        "stringData is folded into data"
    );
    let err = api
        .create(&PostParams::default(), &secret("x", "key", &[]))
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 409 && s.reason == "AlreadyExists"),
        "{err}"
    );
    let err = api
        .create(&PostParams::default(), &secret("Bad_Name", "key", &[]))
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 422 && s.reason == "Invalid"),
        "{err}"
    );
    let err = api
        .create(&PostParams::default(), &secret("y", "key", &[("../x", b"v")]))
        .await
        .unwrap_err();
    assert!(matches!(err, kube::Error::Api(ref s) if s.code == 422), "{err}");

    let mut current = api.get("x").await.unwrap();
    let stale = current.clone();
    current.data = Some([("k.pem".to_string(), k8s_openapi::ByteString(b"w".to_vec()))].into());
    api.replace("x", &PostParams::default(), &current).await.unwrap();
    let err = api
        .replace("x", &PostParams::default(), &stale)
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 409 && s.reason == "Conflict"),
        "{err}"
    );

    api.delete("x", &DeleteParams::default()).await.unwrap();
    let err = api.get("x").await.unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 404 && s.reason == "NotFound"),
        "{err}"
    );
}

#[tokio::test]
async fn events_are_recorded_create_and_patch() {
    let standin = KubeStandin::start().await.unwrap();
    let client = kube::Client::clone(&kube_client(&standin));
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: "test".into(),
            instance: Some("node-1".into()),
        },
    );
    let regarding = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Secret".into()),
        name: Some("s".into()),
        namespace: Some(NS.into()),
        ..Default::default()
    };
    let ev = RecorderEvent {
        type_: EventType::Warning,
        reason: "InvalidKey".into(),
        note: Some("not a key".into()),
        action: "Sync".into(),
        secondary: None,
    };
    recorder.publish(&ev, &regarding).await.unwrap();
    recorder.publish(&ev, &regarding).await.unwrap();
    let events = standin.events();
    assert_eq!(events.len(), 1, "the repeat is a PATCH of the same Event");
    assert_eq!(events[0]["reason"], "InvalidKey");
    assert_eq!(events[0]["series"]["count"], 2);
    assert_eq!(events[0]["apiVersion"], "events.k8s.io/v1");
}

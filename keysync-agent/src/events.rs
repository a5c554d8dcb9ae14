//! Kubernetes Events on Secrets the agent cannot sync (`events.k8s.io/v1`, `create` only: each
//! problem is reported once per Secret version, so no `patch` permission is needed). Events are
//! posted from a bounded queue by one background task, so a slow API server never holds up syncing.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use kube::Api;

use crate::metrics::Metrics;
use crate::secrets::{Problem, SecretRecord};

/// `reportingController` of the agent's Events.
pub const REPORTING_CONTROLLER: &str = "imgcrypt.io/keysync-agent";
/// Longest Event note the API server accepts.
const MAX_NOTE: usize = 1024;
/// Events queued at most; more are dropped (and counted).
const QUEUE: usize = 512;

/// Posts Events in the background, one at a time, in order.
pub struct EventSink {
    namespace: String,
    instance: String,
    pod: Option<String>,
    metrics: Arc<Metrics>,
    tx: Option<tokio::sync::mpsc::Sender<Event>>,
    worker: Option<tokio::task::JoinHandle<()>>,
}

impl EventSink {
    /// Events go to `namespace`; `instance` is the node name; `pod` the agent's own Pod (in
    /// `namespace`), which Events about the target directory regard.
    pub fn new(
        client: kube::Client,
        namespace: &str,
        instance: &str,
        pod: Option<&str>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let api: Api<Event> = Api::namespaced(client, namespace);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Event>(QUEUE);
        let m = metrics.clone();
        let worker = tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                if let Err(e) = api.create(&PostParams::default(), &ev).await {
                    m.event_errors.fetch_add(1, Ordering::Relaxed);
                    let secret = ev.regarding.and_then(|r| r.name).unwrap_or_default();
                    tracing::warn!(secret, error = %e, "could not post a Kubernetes Event");
                }
            }
        });
        EventSink {
            namespace: namespace.to_string(),
            instance: instance.to_string(),
            pod: pod.filter(|p| !p.is_empty()).map(str::to_string),
            metrics,
            tx: Some(tx),
            worker: Some(worker),
        }
    }

    /// Queues a Warning Event about `problem` on its Secret.
    pub fn warn(&mut self, problem: &Problem, rec: Option<&SecretRecord>) {
        let ev = self.build(problem, rec);
        let sent = self.tx.as_ref().is_some_and(|tx| tx.try_send(ev).is_ok());
        if !sent {
            self.metrics.event_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(secret = %problem.secret, "Event queue full: Event dropped");
        }
    }

    fn build(&self, problem: &Problem, rec: Option<&SecretRecord>) -> Event {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let time = k8s_openapi::chrono::DateTime::from_timestamp(
            i64::try_from(now.as_secs()).unwrap_or(0),
            now.subsec_micros() * 1000,
        )
        .unwrap_or_default();
        let mut note = problem.message.clone();
        if note.len() > MAX_NOTE {
            let mut cut = MAX_NOTE - 3;
            while !note.is_char_boundary(cut) {
                cut -= 1;
            }
            note.truncate(cut);
            note.push_str("...");
        }
        // A problem with no Secret is about the node's target directory: the Event regards the
        // agent's own Pod (in this namespace), or, when its name is unknown, the Node; never an
        // object without a name.
        let about_dir = problem.secret.is_empty();
        let base = if about_dir {
            event_name_base(self.pod.as_deref().unwrap_or(&self.instance))
        } else {
            event_name_base(&problem.secret)
        };
        Event {
            metadata: ObjectMeta {
                name: Some(format!(
                    "{base}.{:x}{:08x}",
                    now.as_nanos(),
                    rand::random::<u32>()
                )),
                namespace: Some(self.namespace.clone()),
                ..ObjectMeta::default()
            },
            action: Some("Sync".into()),
            reason: Some(problem.reason.as_str().into()),
            note: Some(note),
            type_: Some("Warning".into()),
            event_time: Some(MicroTime(time)),
            reporting_controller: Some(REPORTING_CONTROLLER.into()),
            reporting_instance: Some(self.instance.clone()),
            regarding: Some(if about_dir {
                match &self.pod {
                    Some(pod) => ObjectReference {
                        api_version: Some("v1".into()),
                        kind: Some("Pod".into()),
                        name: Some(pod.clone()),
                        namespace: Some(self.namespace.clone()),
                        ..ObjectReference::default()
                    },
                    None => ObjectReference {
                        api_version: Some("v1".into()),
                        kind: Some("Node".into()),
                        name: Some(self.instance.clone()),
                        ..ObjectReference::default()
                    },
                }
            } else {
                ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Secret".into()),
                    name: Some(problem.secret.clone()),
                    namespace: Some(self.namespace.clone()),
                    uid: rec.and_then(|r| r.uid.clone()),
                    resource_version: rec.and_then(|r| r.resource_version.clone()),
                    field_path: problem.entry.as_ref().map(|e| format!("data[{e}]")),
                }
            }),
            ..Event::default()
        }
    }

    /// Waits (bounded) for the queued Events to be posted, then stops the worker.
    pub async fn flush(&mut self, timeout: std::time::Duration) {
        self.tx = None;
        if let Some(mut w) = self.worker.take() {
            if tokio::time::timeout(timeout, &mut w).await.is_err() {
                w.abort();
            }
        }
    }
}

impl Drop for EventSink {
    fn drop(&mut self) {
        if let Some(w) = self.worker.take() {
            w.abort();
        }
    }
}

/// A DNS-subdomain prefix for an Event name derived from a Secret name (Secret names from a real
/// API server already are; anything else is reduced to `[a-z0-9.-]`).
fn event_name_base(secret: &str) -> String {
    let cleaned: String = secret
        .chars()
        .take(200)
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let out = cleaned
        .split('.')
        .map(|l| l.trim_matches('-'))
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(".");
    if out.is_empty() {
        "secret".into()
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::event_name_base;

    #[test]
    fn event_names_are_dns_subdomains() {
        assert_eq!(event_name_base("my-key"), "my-key");
        assert_eq!(event_name_base("a.b"), "a.b");
        assert_eq!(event_name_base("../evil"), "evil");
        assert_eq!(event_name_base("Upper"), "pper");
        assert_eq!(event_name_base("a/b"), "a-b");
        assert_eq!(event_name_base(".."), "secret");
        assert_eq!(event_name_base("a.-.b"), "a.b");
    }
}

//! Fault tests: API server restarts with missed events, stalled watches, Key Protect failures,
//! malformed and hostile Secrets, and a reader racing the writer.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use k8s_openapi::ByteString;
use keyprotect_emulator::{Emulator, Fault, Op};
use testkit::kube::KubeStandin;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_restart_with_missed_events_converges() {
    let standin = KubeStandin::start().await.unwrap();
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("synced");
    let agent = start(&standin, options(vec![dir.clone()]));
    for n in ["a1", "a2", "a3"] {
        standin
            .create_secret(secret(n, "key", &[("k.pem", &key("rsa.pem"))]))
            .unwrap();
    }
    wait_for("three files", WAIT, || all_files(&dir).len() == 3).await;
    let relists = agent.metrics.relists.load(Ordering::Relaxed);

    // The server goes down; meanwhile a1 is deleted, a2 changed, a4 created: no watch sees those
    // events, and the history is gone when it comes back (the watcher gets 410 and relists).
    standin
        .restart_with(|s| {
            assert!(s.delete_secret(NS, "a1"));
            let mut a2 = s.get_secret(NS, "a2").unwrap();
            a2.data = Some([("k.pem".to_string(), ByteString(key("ec.p8.pem")))].into());
            s.apply_secret(a2).unwrap();
            s.create_secret(secret("a4", "key", &[("k.pem", &key("ec.sec1.der"))]))
                .unwrap();
        })
        .await
        .unwrap();
    wait_for("convergence after the restart", WAIT, || {
        all_files(&dir) == vec!["a2/k.pem", "a3/k.pem", "a4/k.pem"]
            && read(&dir.join("a2/k.pem")) == Some(key("ec.p8.pem"))
    })
    .await;
    assert!(
        agent.metrics.relists.load(Ordering::Relaxed) > relists,
        "a relist happened"
    );
    assert!(
        agent.metrics.watch_errors.load(Ordering::Relaxed) > 0,
        "the 410 was seen"
    );

    // Twice more in a row, deleting everything while down.
    for round in 0..2 {
        standin
            .restart_with(|s| {
                for sec in s.secrets(NS) {
                    s.delete_secret(NS, sec.metadata.name.as_deref().unwrap());
                }
                s.create_secret(secret(&format!("r{round}"), "key", &[("k.pem", &key("rsa.pem"))]))
                    .unwrap();
            })
            .await
            .unwrap();
        let expect = vec![format!("r{round}/k.pem")];
        wait_for("convergence after another restart", WAIT, || {
            all_files(&dir) == expect
        })
        .await;
    }
    assert!(agent.is_running());
    assert!(agent.health.is_live());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_watch_fails_liveness_then_recovers() {
    let standin = KubeStandin::start().await.unwrap();
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("synced");
    let mut o = options(vec![dir.clone()]);
    o.stall_timeout = Duration::from_millis(1500);
    o.resync_interval = Duration::from_millis(500);
    // Not ready until the first list completes (held back here by a stalled server).
    standin.set_stalled(true);
    let agent = start(&standin, o);
    let probes = serve_probes(&agent).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        http_get(probes, "/readyz").await.0,
        503,
        "not ready before the first sync"
    );
    standin.set_stalled(false);
    standin
        .create_secret(secret("s1", "key", &[("k.pem", &key("rsa.pem"))]))
        .unwrap();
    wait_for("s1", WAIT, || read(&dir.join("s1/k.pem")).is_some()).await;
    wait_for_async("ready", WAIT, || async {
        http_get(probes, "/readyz").await.0 == 200
    })
    .await;
    assert_eq!(http_get(probes, "/healthz").await.0, 200);

    // A wedged API server: watches stay open but silent, lists hang.
    standin.set_stalled(true);
    standin
        .create_secret(secret("s2", "key", &[("k.pem", &key("rsa.pem"))]))
        .unwrap();
    wait_for_async("liveness to fail", WAIT, || async {
        http_get(probes, "/healthz").await.0 == 503
    })
    .await;
    assert!(!dir.join("s2").exists(), "nothing can be seen while stalled");
    assert_eq!(
        read(&dir.join("s1/k.pem")),
        Some(key("rsa.pem")),
        "files stay while stalled"
    );
    let (_, body) = http_get(probes, "/metrics").await;
    assert!(
        metric(&body, "keysync_seconds_since_watch_progress") >= 1,
        "{body}"
    );

    standin.set_stalled(false);
    wait_for_async("liveness to recover", WAIT, || async {
        http_get(probes, "/healthz").await.0 == 200
    })
    .await;
    wait_for("the Secret created during the stall", WAIT, || {
        read(&dir.join("s2/k.pem")).is_some()
    })
    .await;
}

fn kp_secret(name: &str, root: &str, ciphertext: &str) -> k8s_openapi::api::core::v1::Secret {
    secret(
        name,
        "kp-key",
        &[
            ("rootkeyid", root.as_bytes()),
            ("ciphertext", ciphertext.as_bytes()),
        ],
    )
}

fn set_data(standin: &KubeStandin, name: &str, data: &[(&str, &[u8])]) {
    let mut s = standin.get_secret(NS, name).unwrap();
    s.data = Some(
        data.iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
            .collect(),
    );
    standin.apply_secret(s).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_protect_failures_keep_files_and_recover() {
    let emu = Emulator::start().unwrap();
    let root = emu.create_root_key("image-keys");
    let kp = keyprotect_client::Client::new(emu.config()).unwrap();
    let rsa = kp.wrap(&root, &key("rsa.pem"), None).await.unwrap().ciphertext;
    let ec = kp.wrap(&root, &key("ec.p8.pem"), None).await.unwrap().ciphertext;
    let der = kp
        .wrap(&root, &key("ec.sec1.der"), None)
        .await
        .unwrap()
        .ciphertext;

    let standin = KubeStandin::start().await.unwrap();
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("synced");
    let agent = start(&standin, options(vec![dir.clone()]));
    let probes = serve_probes(&agent).await;
    standin
        .create_secret(secret(
            "keyprotect-config",
            "Opaque",
            &[("config.json", emu.config_json().as_bytes())],
        ))
        .unwrap();
    standin.create_secret(kp_secret("k", &root, &rsa)).unwrap();
    let file = dir.join("k/k.pem");
    wait_for("the first unwrap", WAIT, || read(&file) == Some(key("rsa.pem"))).await;

    // 429 with Retry-After, 500s, and timeouts: each time the old file stays until a retry succeeds.
    let cases: Vec<(Fault, &str, &str)> = vec![
        (
            Fault::TooManyRequests {
                retry_after: Some("1".into()),
            },
            "429",
            &ec,
        ),
        (Fault::ServerError(500), "500", &der),
        (Fault::Slow(Duration::from_secs(4)), "timeout", &rsa),
    ];
    let mut expected = key("rsa.pem");
    let kp_events = |s: &KubeStandin| {
        event_reasons(s, "k")
            .iter()
            .filter(|r| *r == "KeyProtectError")
            .count()
    };
    for (i, (fault, label, ciphertext)) in cases.into_iter().enumerate() {
        let before = emu.count(Op::Unwrap);
        emu.inject(Some(Op::Unwrap), fault, 2);
        set_data(
            &standin,
            "k",
            &[
                ("rootkeyid", root.as_bytes()),
                ("ciphertext", ciphertext.as_bytes()),
            ],
        );
        let series = format!("keysync_unwrap_errors_total{{status=\"{label}\"}}");
        wait_for_async(&format!("two {label} failures"), WAIT, || async {
            metric(&http_get(probes, "/metrics").await.1, &series) >= 2
        })
        .await;
        // The installed key was not touched by the failures.
        assert_eq!(read(&file), Some(expected.clone()), "file kept during {label}");
        let new = match label {
            "429" => key("ec.p8.pem"),
            "500" => key("ec.sec1.der"),
            _ => key("rsa.pem"),
        };
        wait_for(&format!("recovery after {label}"), WAIT, || {
            read(&file) == Some(new.clone())
        })
        .await;
        expected = new;
        assert!(
            emu.count(Op::Unwrap) >= before + 3,
            "two failed attempts, then one that worked"
        );
        assert_eq!(emu.pending_faults(), 0);
        // Two failed attempts of one Secret version: one Event, not one per attempt.
        wait_for("the Event", WAIT, || kp_events(&standin) > i).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            kp_events(&standin),
            i + 1,
            "one Event per Secret version during {label}"
        );
    }

    // A wrong API key in the config: permanent, reported, the file stays; fixing it recovers.
    let good = emu.config_json();
    let bad = good.replace(emu.api_key(), "wrong-api-key");
    set_data(&standin, "keyprotect-config", &[("config.json", bad.as_bytes())]);
    wait_for("a Key Protect error Event", WAIT, || {
        event_reasons(&standin, "k").contains(&"KeyProtectError".to_string())
    })
    .await;
    assert_eq!(read(&file), Some(expected.clone()));
    // Malformed config JSON: reported on the config Secret, files stay.
    set_data(
        &standin,
        "keyprotect-config",
        &[("config.json", b"{\"keyprotect-url\": ")],
    );
    wait_for("a config Event", WAIT, || {
        event_reasons(&standin, "keyprotect-config").contains(&"KeyProtectConfigInvalid".to_string())
    })
    .await;
    assert_eq!(read(&file), Some(expected.clone()));
    let notes: Vec<String> = standin
        .events()
        .iter()
        .map(|e| e["note"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        notes
            .iter()
            .all(|n| !n.contains(emu.api_key()) && !n.contains("wrong-api-key")),
        "{notes:?}"
    );
    // Fixed, and the Secret changed meanwhile: synced.
    set_data(
        &standin,
        "k",
        &[("rootkeyid", root.as_bytes()), ("ciphertext", ec.as_bytes())],
    );
    set_data(&standin, "keyprotect-config", &[("config.json", good.as_bytes())]);
    wait_for("recovery after the config fix", WAIT, || {
        read(&file) == Some(key("ec.p8.pem"))
    })
    .await;

    // A disabled root key (409): the key stays installed (deleting the Secret revokes it).
    emu.disable_key(&root);
    set_data(
        &standin,
        "k",
        &[("rootkeyid", root.as_bytes()), ("ciphertext", rsa.as_bytes())],
    );
    wait_for_async("a 409", WAIT, || async {
        metric(
            &http_get(probes, "/metrics").await.1,
            "keysync_unwrap_errors_total{status=\"409\"}",
        ) >= 1
    })
    .await;
    assert_eq!(read(&file), Some(key("ec.p8.pem")));
    emu.enable_key(&root);
    standin.delete_secret(NS, "k");
    wait_for("revocation by deleting the Secret", WAIT, || {
        !dir.join("k").exists()
    })
    .await;
    assert!(agent.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_hostile_secrets_write_nothing() {
    let standin = KubeStandin::start().await.unwrap();
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("synced");
    let outside = t.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("k.pem"), b"precious").unwrap();
    // Symlinks planted before the agent starts: one where a Secret's directory will go, one stray.
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::symlink(&outside, dir.join("victim")).unwrap();
    std::os::unix::fs::symlink(outside.join("k.pem"), dir.join("stray")).unwrap();
    let agent = match keysync_agent::Agent::new(options(vec![dir.clone()]), kube_client(&standin)) {
        Err(e) => {
            // A directory with foreign entries is not taken over silently.
            assert!(e.to_string().contains("--adopt-target-dir"), "{e}");
            let mut o = options(vec![dir.clone()]);
            o.adopt_target_dirs = true;
            start(&standin, o)
        }
        Ok(_) => panic!("a non-empty target without the marker must be refused"),
    };

    let rsa = key("rsa.pem");
    let half = &rsa[..rsa.len() / 2];
    let bad: Vec<(&str, &str, Vec<u8>, &str)> = vec![
        (
            "text",
            "readme.txt",
            b"hello, this is not a key\n".to_vec(),
            "InvalidKey",
        ),
        ("public", "pub.pem", key("rsa.pub.pem"), "InvalidKey"),
        ("encrypted", "enc.pem", key("rsa.enc.pem"), "InvalidKey"),
        ("sec1pem", "ec.pem", key("ec.sec1.pem"), "InvalidKey"),
        ("cert", "cert.pem", key("cert.pem"), "InvalidKey"),
        ("truncated", "rsa.pem", half.to_vec(), "InvalidKey"),
        ("empty", "k.pem", Vec::new(), "InvalidKey"),
        ("big", "k.pem", vec![b'A'; 100 * 1024], "InvalidKey"),
    ];
    for (name, entry, value, _) in &bad {
        standin
            .create_secret(secret(name, "key", &[(entry, value)]))
            .unwrap();
    }
    // What a real API server would refuse, from a hostile one: oversized, unsafe names.
    standin.force_put_secret(secret("huge", "key", &[("k.pem", &vec![b'B'; 2 * 1024 * 1024])]));
    standin.force_put_secret(secret(
        "unsafe",
        "key",
        &[
            ("../escape.pem", &rsa),
            ("a/b.pem", &rsa),
            (".keysync-agent", &rsa),
            ("", &rsa),
            ("..", &rsa),
        ],
    ));
    standin.force_put_secret(secret("../evil", "key", &[("k.pem", &rsa)]));
    standin.force_put_secret(secret("Upper", "key", &[("k.pem", &rsa)]));
    // Broken kp-key Secrets (no Key Protect needed to see they are broken).
    standin
        .create_secret(secret(
            "badb64",
            "kp-key",
            &[("rootkeyid", b"rk"), ("ciphertext", b"not base64!!")],
        ))
        .unwrap();
    standin
        .create_secret(secret("noroot", "kp-key", &[("private.pem", b"QUJD")]))
        .unwrap();
    standin
        .create_secret(secret(
            "badroot",
            "kp-key",
            &[("rootkeyid", &[0xff, 0xfe]), ("ciphertext", b"QUJD")],
        ))
        .unwrap();
    // A mixed Secret: the valid entry is installed, the invalid one is not.
    standin
        .create_secret(secret(
            "mixed",
            "key",
            &[("good.pem", &rsa), ("pub.pem", &key("rsa.pub.pem"))],
        ))
        .unwrap();
    // The Secret whose directory was a symlink.
    standin
        .create_secret(secret("victim", "key", &[("k.pem", &key("ec.p8.pem"))]))
        .unwrap();

    wait_for("the valid keys", WAIT, || {
        all_files(&dir) == vec!["mixed/good.pem", "victim/k.pem"]
    })
    .await;
    for (name, _, _, reason) in &bad {
        wait_for(&format!("an Event for {name}"), WAIT, || {
            event_reasons(&standin, name).contains(&reason.to_string())
        })
        .await;
    }
    wait_for("Events for the rest", WAIT, || {
        event_reasons(&standin, "huge").contains(&"InvalidKey".to_string())
            && event_reasons(&standin, "unsafe")
                .iter()
                .filter(|r| *r == "UnsafeName")
                .count()
                == 5
            && event_reasons(&standin, "badb64").contains(&"BadValue".to_string())
            && event_reasons(&standin, "noroot").contains(&"MissingRootKey".to_string())
            && event_reasons(&standin, "badroot").contains(&"BadValue".to_string())
            && event_reasons(&standin, "mixed") == vec!["InvalidKey".to_string()]
    })
    .await;
    wait_for("Events for unsafe Secret names", WAIT, || {
        event_reasons(&standin, "../evil") == vec!["UnsafeName".to_string()]
            && event_reasons(&standin, "Upper") == vec!["UnsafeName".to_string()]
    })
    .await;
    let problems = http_problem_count(&agent).await;
    assert!(problems >= 20, "{problems}");
    // Nothing outside was touched; the planted symlinks are gone, not followed.
    assert_eq!(std::fs::read(outside.join("k.pem")).unwrap(), b"precious");
    assert_eq!(entries(&outside), vec!["k.pem"]);
    assert!(std::fs::symlink_metadata(dir.join("stray")).is_err());
    assert!(!std::fs::symlink_metadata(dir.join("victim"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(!t.path().join("escape.pem").exists() && !t.path().join("evil").exists());
    // Each problem is reported once per Secret version, not on every pass.
    let n = standin.events().len();
    standin
        .create_secret(secret("later", "key", &[("k.pem", &rsa)]))
        .unwrap();
    wait_for("later", WAIT, || read(&dir.join("later/k.pem")).is_some()).await;
    assert_eq!(standin.events().len(), n, "no repeated Events");
    // Notes never carry key material.
    let body_line = String::from_utf8(rsa.clone())
        .unwrap()
        .lines()
        .nth(1)
        .unwrap()
        .to_string();
    for e in standin.events() {
        let note = e["note"].as_str().unwrap_or_default();
        assert!(
            !note.contains(&body_line[..20]) && !note.contains("MII"),
            "{note}"
        );
    }
    assert_eq!(
        agent.metrics.event_errors.load(Ordering::Relaxed),
        0,
        "no Event was dropped or refused"
    );
    assert!(agent.is_running() && agent.health.is_live());
}

async fn http_problem_count(agent: &Running) -> u64 {
    let addr = serve_probes(agent).await;
    let (_, body) = http_get(addr, "/metrics").await;
    body.lines()
        .filter(|l| l.starts_with("keysync_problems{"))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<u64>().ok()))
        .sum()
}

/// What CRI-O does on every pull: walk the tree, refuse symlinks, read and classify every file.
/// Returns the problems seen and how many files were read.
fn crio_walk(root: &Path, problems: &mut Vec<String>) -> u64 {
    let mut read = 0;
    let Ok(rd) = std::fs::read_dir(root) else { return 0 };
    for e in rd.flatten() {
        let p = e.path();
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.file_type().is_symlink() {
            problems.push(format!("symlink {}", p.display()));
        } else if meta.is_dir() {
            read += crio_walk(&p, problems);
        } else {
            match std::fs::read(&p) {
                Ok(bytes) => {
                    read += 1;
                    if let Err(r) = keysync_agent::validate::validate_key(&bytes, "reader") {
                        problems.push(format!("{}: {r} ({} bytes)", p.display(), bytes.len()));
                    }
                }
                // Removed between the listing and the read: a runtime retries the pull.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => problems.push(format!("{}: {e}", p.display())),
            }
        }
    }
    read
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reader_never_sees_partial_or_invalid_files() {
    // The reader's check itself catches a partial file.
    let t = tempfile::tempdir().unwrap();
    let probe = t.path().join("probe");
    std::fs::create_dir(&probe).unwrap();
    let rsa = key("rsa.pem");
    std::fs::write(probe.join("half.pem"), &rsa[..rsa.len() - 40]).unwrap();
    let mut p = Vec::new();
    crio_walk(&probe, &mut p);
    assert_eq!(p.len(), 1, "the reader must flag a truncated key");

    let standin = KubeStandin::start().await.unwrap();
    let dir: PathBuf = t.path().join("synced");
    let agent = start(&standin, options(vec![dir.clone()]));
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let problems = Arc::new(Mutex::new(Vec::new()));
    let reader = {
        let (stop, reads, problems, dir) = (stop.clone(), reads.clone(), problems.clone(), dir.clone());
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
                let mut p = Vec::new();
                reads.fetch_add(crio_walk(&dir, &mut p), Ordering::Relaxed);
                problems.lock().unwrap().extend(p);
            }
        })
    };
    let keys = [
        key("rsa.pem"),
        key("ec.p8.pem"),
        key("ec.sec1.der"),
        key("cert.key.pem"),
    ];
    for i in 0..40usize {
        let name = format!("s{}", i % 5);
        let k = &keys[i % keys.len()];
        if standin.get_secret(NS, &name).is_some() && i % 7 == 0 {
            standin.delete_secret(NS, &name);
            wait_for("delete", WAIT, || !dir.join(&name).exists()).await;
        } else if standin.get_secret(NS, &name).is_some() {
            set_data(
                &standin,
                &name,
                &[("k.pem", k), ("second.pem", &keys[(i + 1) % keys.len()])],
            );
            let f = dir.join(&name).join("k.pem");
            wait_for("update", WAIT, || read(&f).as_ref() == Some(k)).await;
        } else {
            standin
                .create_secret(secret(&name, "key", &[("k.pem", k)]))
                .unwrap();
            let f = dir.join(&name).join("k.pem");
            wait_for("create", WAIT, || read(&f).as_ref() == Some(k)).await;
        }
        // Invalid updates are rejected and never reach the reader either.
        if i % 9 == 0 {
            standin
                .create_secret(secret(&format!("bad{i}"), "key", &[("k.pem", &rsa[..100])]))
                .unwrap();
        }
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    let problems = problems.lock().unwrap().clone();
    assert!(problems.is_empty(), "the reader saw: {problems:?}");
    assert!(
        reads.load(Ordering::Relaxed) > 50,
        "the reader read {} files",
        reads.load(Ordering::Relaxed)
    );
    assert!(agent.metrics.files_written.load(Ordering::Relaxed) >= 40);
}

//! Helpers shared by the integration tests: run the real binary with a timeout.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What a run of `imgcrypt` produced.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Panics with the output unless the exit code is `code`.
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code, code,
            "unexpected exit code\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }
    pub fn ok(&self) -> &Self {
        self.expect_code(0)
    }
    /// Panics unless stderr contains every needle.
    pub fn stderr_has(&self, needles: &[&str]) -> &Self {
        for n in needles {
            assert!(self.stderr.contains(n), "stderr lacks {n:?}:\n{}", self.stderr);
        }
        self
    }
    pub fn stdout_has(&self, needles: &[&str]) -> &Self {
        for n in needles {
            assert!(self.stdout.contains(n), "stdout lacks {n:?}:\n{}", self.stdout);
        }
        self
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", self.stdout))
    }
}

/// Runs `imgcrypt args…` with extra environment, killing it after two minutes.
pub fn imgcrypt_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    // IMGCRYPT_TEST_BIN runs the suite against another build (e.g. an older commit's binary,
    // to show that a test fails there).
    let bin = std::env::var_os("IMGCRYPT_TEST_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_imgcrypt").into());
    let mut cmd = Command::new(bin);
    cmd.args(args);
    run_limited(cmd, env, Duration::from_secs(120))
        .unwrap_or_else(|| panic!("imgcrypt {} did not finish within 120 s", args.join(" ")))
}

/// Runs `cmd` with stdin closed, stdout and stderr captured and the user's registry credentials
/// kept out (`HOME` a temporary directory, no auth-file variables; `env` is set after that, so
/// a test can point them somewhere); `None` when it did not end within `limit` and was killed.
pub fn run_limited(mut cmd: Command, env: &[(&str, &str)], limit: Duration) -> Option<Run> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("HOME", std::env::temp_dir())
        .env_remove("REGISTRY_AUTH_FILE")
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("DOCKER_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("the command starts");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Some(Run {
        code: status.code().unwrap_or(-1),
        stdout: t_out.join().expect("stdout thread"),
        stderr: t_err.join().expect("stderr thread"),
    })
}

pub fn imgcrypt(args: &[&str]) -> Run {
    imgcrypt_env(args, &[])
}

/// `oci:PATH:TAG`.
pub fn oci(p: &Path, tag: &str) -> String {
    format!("oci:{}:{tag}", p.display())
}

/// The ocicrypt-core interop vectors.
pub fn vectors() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ocicrypt-core/tests/data/vectors")
}

/// sha256 of the layer blobs (as read from disk) of every manifest of `tag`, in order.
pub fn layer_blobs(layout: &Path, tag: &str) -> Vec<String> {
    testkit::image::manifests(layout, tag)
        .into_iter()
        .flat_map(|(_, m)| {
            m["layers"]
                .as_array()
                .expect("layers")
                .iter()
                .map(|l| {
                    testkit::image::sha256(&testkit::image::read_blob(
                        layout,
                        l["digest"].as_str().expect("digest"),
                    ))
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Layer media types of every manifest of `tag`, with the platform arch.
pub fn layer_types(layout: &Path, tag: &str) -> Vec<(String, String)> {
    testkit::image::manifests(layout, tag)
        .into_iter()
        .flat_map(|(arch, m)| {
            m["layers"]
                .as_array()
                .expect("layers")
                .iter()
                .map(|l| {
                    (
                        arch.clone(),
                        l["mediaType"].as_str().expect("mediaType").to_owned(),
                    )
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Number of blobs in a layout (0 if it does not exist).
pub fn blob_count(layout: &Path) -> usize {
    std::fs::read_dir(layout.join("blobs").join("sha256"))
        .map(|d| d.count())
        .unwrap_or(0)
}

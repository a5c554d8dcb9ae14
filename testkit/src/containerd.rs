//! Debian's containerd (1.6) started for a test, as root, with its own root, state and socket in
//! a temporary directory, our `imgcrypt-decoder` registered as stream processor, and a mirror
//! for a plain-HTTP registry on loopback; plus a minimal CRI client (HTTP/2 over the unix
//! socket, hand-encoded protobuf) for `runtime.v1.ImageService/PullImage` and `RemoveImage` —
//! the pull path on which containerd hands stream processors their decryption payload.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;

/// How long one CRI call may take.
const CRI_TIMEOUT: Duration = Duration::from_secs(180);
/// How long containerd may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// What is needed to run containerd end to end: root and the Debian packages.
///
/// Returns `Err(reason)` when something is missing.
pub fn prerequisites() -> Result<(), String> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map_err(|e| format!("id -u: {e}"))?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Err("containerd end-to-end tests must run as root".into());
    }
    for bin in [
        "/usr/bin/containerd",
        "/usr/bin/ctr",
        "/usr/bin/containerd-shim-runc-v2",
        "/usr/sbin/runc",
        "/bin/busybox",
    ] {
        if !Path::new(bin).exists() {
            return Err(format!(
                "{bin} is missing: install containerd, runc and busybox-static (scripts/deps.sh)"
            ));
        }
    }
    Ok(())
}

/// The documented containerd configuration for `imgcrypt-decoder`
/// (`deploy/containerd/imgcrypt-decoder.toml`), with its paths replaced: the decoder binary,
/// the key directory and the key-provider configuration file.
///
/// # Panics
/// When the file is missing or no longer names the paths it is expected to.
pub fn decoder_config_snippet(decoder: &Path, key_dir: &Path, keyprovider_conf: &Path) -> String {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/containerd/imgcrypt-decoder.toml");
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    for needle in [
        "\"/usr/local/bin/imgcrypt-decoder\"",
        "\"/etc/containerd/ocicrypt/keys\"",
        "=/etc/containerd/ocicrypt/ocicrypt_keyprovider.conf\"",
    ] {
        assert!(
            text.contains(needle),
            "{} no longer contains {needle}",
            file.display()
        );
    }
    text.replace(
        "\"/usr/local/bin/imgcrypt-decoder\"",
        &format!("{:?}", decoder.display().to_string()),
    )
    .replace(
        "\"/etc/containerd/ocicrypt/keys\"",
        &format!("{:?}", key_dir.display().to_string()),
    )
    .replace(
        "=/etc/containerd/ocicrypt/ocicrypt_keyprovider.conf\"",
        &format!("={}\"", keyprovider_conf.display()),
    )
}

/// A containerd process, stopped (and its mounts and directory removed) on drop.
#[derive(Debug)]
pub struct Containerd {
    child: Option<Child>,
    dir: Option<tempfile::TempDir>,
    /// The gRPC socket.
    pub socket: PathBuf,
    /// containerd's log file.
    pub log: PathBuf,
}

impl Containerd {
    /// Starts containerd configured with the documented `imgcrypt-decoder` snippet
    /// ([`decoder_config_snippet`]; the decoder at `decoder` reading `key_dir`, a key-provider
    /// configuration that does not exist), and a mirror for the plain-HTTP registry at
    /// `registry` (`127.0.0.1:PORT`).
    ///
    /// # Panics
    /// When containerd does not come up (its log is in the message).
    pub fn start(decoder: &Path, key_dir: &Path, registry: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("ctrd-")
            .tempdir()
            .expect("tempdir");
        let d = dir.path();
        let socket = d.join("containerd.sock");
        let config = format!(
            r#"root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

{sp}
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  level = "info"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d}/cni/bin"
    conf_dir = "{d}/cni/conf"
  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."{registry}"]
    endpoint = ["http://{registry}"]
"#,
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = socket.display(),
            d = d.display(),
            sp = decoder_config_snippet(decoder, key_dir, &d.join("no-keyprovider.conf")),
        );
        let cfg = d.join("config.toml");
        std::fs::write(&cfg, config).expect("write containerd config");
        let log = d.join("containerd.log");
        let logf = std::fs::File::create(&log).expect("log file");
        let child = Command::new("/usr/bin/containerd")
            .arg("--config")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("log"))
            .stderr(logf)
            .spawn()
            .expect("start containerd");
        let mut c = Containerd {
            child: Some(child),
            dir: Some(dir),
            socket,
            log,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if c.socket.exists() && c.ctr(&["version"]).status.success() {
                break;
            }
            if let Some(status) = c.child.as_mut().and_then(|ch| ch.try_wait().ok().flatten()) {
                panic!("containerd exited ({status}) at start:\n{}", c.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not come up:\n{}",
                c.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    /// containerd's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `ctr --address SOCKET -n k8s.io ARGS` (bounded to 120 s).
    pub fn ctr(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new("/usr/bin/ctr");
        cmd.arg("--address")
            .arg(&self.socket)
            .args(["-n", "k8s.io"])
            .args(args);
        run_bounded(cmd, Duration::from_secs(120))
    }

    /// CRI `PullImage`: returns the image ref, or the gRPC error.
    ///
    /// # Errors
    /// [`CriError`] with containerd's message (a stream processor's stderr ends up there).
    pub fn pull_image(&self, image: &str) -> Result<String, CriError> {
        let resp = self.cri_call("/runtime.v1.ImageService/PullImage", &image_spec_request(image))?;
        Ok(first_string_field(&resp).unwrap_or_default())
    }

    /// CRI `RemoveImage` (also drops the snapshots once containerd's GC runs).
    ///
    /// # Errors
    /// [`CriError`].
    pub fn remove_image(&self, image: &str) -> Result<(), CriError> {
        self.cri_call("/runtime.v1.ImageService/RemoveImage", &image_spec_request(image))
            .map(|_| ())
    }

    /// Removes every image of the `k8s.io` namespace synchronously (garbage-collecting their
    /// snapshots), so the next pull unpacks, and thus decrypts, again.
    pub fn remove_all_images(&self) {
        let out = self.ctr(&["images", "ls", "-q"]);
        let list = String::from_utf8_lossy(&out.stdout).into_owned();
        let names: Vec<&str> = list.lines().filter(|l| !l.trim().is_empty()).collect();
        if !names.is_empty() {
            let mut args = vec!["images", "rm", "--sync"];
            args.extend(names);
            let out = self.ctr(&args);
            assert!(
                out.status.success(),
                "ctr images rm: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let snaps = self.ctr(&["snapshots", "ls"]);
        let left = String::from_utf8_lossy(&snaps.stdout)
            .lines()
            .skip(1)
            .filter(|l| !l.trim().is_empty())
            .count();
        assert_eq!(
            left,
            0,
            "snapshots left after removing every image:\n{}",
            String::from_utf8_lossy(&snaps.stdout)
        );
    }

    fn cri_call(&self, path: &str, request: &[u8]) -> Result<Vec<u8>, CriError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let socket = self.socket.clone();
        let path = path.to_owned();
        let request = request.to_vec();
        rt.block_on(async move {
            match tokio::time::timeout(CRI_TIMEOUT, grpc_unary(&socket, &path, request)).await {
                Ok(r) => r,
                Err(_) => Err(CriError {
                    code: 4,
                    message: format!("{path}: no answer within {CRI_TIMEOUT:?}"),
                }),
            }
        })
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(dir) = self.dir.take() {
            unmount_under(dir.path());
            // Leftover shims of a failed test keep files open; removal is best effort.
            let _ = std::fs::remove_dir_all(dir.path());
        }
    }
}

/// Lazily unmounts every mount point under `dir`, deepest first.
fn unmount_under(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| Path::new(p).starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = Command::new("umount").arg("-l").arg(p).status();
    }
}

/// Runs a command with a deadline, killing it when it overruns.
pub fn run_bounded(mut cmd: Command, limit: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let mut so = child.stdout.take().expect("stdout");
    let mut se = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let s = child.wait().expect("wait");
            eprintln!("{cmd:?} killed after {limit:?}");
            break s;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}

/// A gRPC error status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriError {
    /// gRPC status code (2 = UNKNOWN, 5 = NOT_FOUND, …).
    pub code: u32,
    /// `grpc-message`, percent-decoded.
    pub message: String,
}

impl std::fmt::Display for CriError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "gRPC status {}: {}", self.code, self.message)
    }
}

impl std::error::Error for CriError {}

fn transport(e: impl std::fmt::Display) -> CriError {
    CriError {
        code: 14,
        message: format!("transport: {e}"),
    }
}

/// `PullImageRequest{image: ImageSpec{image}}` / `RemoveImageRequest{image: ImageSpec{image}}`:
/// field 1 (message) holding field 1 (string).
pub fn image_spec_request(image: &str) -> Vec<u8> {
    let mut spec = vec![0x0a];
    put_varint(&mut spec, image.len() as u64);
    spec.extend_from_slice(image.as_bytes());
    let mut req = vec![0x0a];
    put_varint(&mut req, spec.len() as u64);
    req.extend_from_slice(&spec);
    req
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Field 1 of a message when it is a string (`PullImageResponse.image_ref`).
fn first_string_field(msg: &[u8]) -> Option<String> {
    let (&tag, rest) = msg.split_first()?;
    if tag != 0x0a {
        return None;
    }
    let mut len = 0usize;
    let mut shift = 0;
    let mut i = 0;
    loop {
        let b = *rest.get(i)?;
        len |= usize::from(b & 0x7f) << shift;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 28 {
            return None;
        }
    }
    rest.get(i..i + len)
        .map(|s| String::from_utf8_lossy(s).into_owned())
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

fn status_from(headers: &http::HeaderMap) -> Option<CriError> {
    let code: u32 = headers.get("grpc-status")?.to_str().ok()?.trim().parse().ok()?;
    let message = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .map(percent_decode)
        .unwrap_or_default();
    Some(CriError { code, message })
}

/// One unary gRPC call over HTTP/2 (h2c) on a unix socket.
async fn grpc_unary(socket: &Path, path: &str, request: Vec<u8>) -> Result<Vec<u8>, CriError> {
    let io = tokio::net::UnixStream::connect(socket).await.map_err(transport)?;
    let (client, conn) = h2::client::handshake(io).await.map_err(transport)?;
    let conn_task = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut client = client.ready().await.map_err(transport)?;
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .map_err(transport)?;
    let (resp, mut send) = client.send_request(req, false).map_err(transport)?;
    let mut frame = Vec::with_capacity(request.len() + 5);
    frame.push(0);
    frame.extend_from_slice(&(request.len() as u32).to_be_bytes());
    frame.extend_from_slice(&request);
    send.send_data(Bytes::from(frame), true).map_err(transport)?;
    let resp = resp.await.map_err(transport)?;
    let (parts, mut body) = resp.into_parts();
    if let Some(st) = status_from(&parts.headers) {
        conn_task.abort();
        return if st.code == 0 { Ok(Vec::new()) } else { Err(st) };
    }
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(transport)?;
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await.map_err(transport)?.unwrap_or_default();
    conn_task.abort();
    match status_from(&trailers) {
        Some(st) if st.code != 0 => return Err(st),
        Some(_) => {}
        None => return Err(transport(format!("no grpc-status (HTTP {})", parts.status))),
    }
    if data.len() < 5 {
        return Ok(Vec::new());
    }
    let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
    Ok(data.get(5..5 + len).map(<[u8]>::to_vec).unwrap_or_default())
}

/// A Secret for the Kubernetes API stand-in, with `data` (raw bytes) and annotations.
pub fn secret(
    namespace: &str,
    name: &str,
    type_: &str,
    data: &[(&str, &[u8])],
) -> k8s_openapi::api::core::v1::Secret {
    let mut s = k8s_openapi::api::core::v1::Secret::default();
    s.metadata.name = Some(name.into());
    s.metadata.namespace = Some(namespace.into());
    s.type_ = Some(type_.into());
    s.data = Some(
        data.iter()
            .map(|(k, v)| ((*k).to_owned(), k8s_openapi::ByteString(v.to_vec())))
            .collect(),
    );
    s
}

/// A binary of this workspace (`keysync-agent`, `kp-emulator`, `kube-standin`) in the target
/// directory the running test binary was built in (`target/<profile>/`).
///
/// Returns `Err(reason)` when it was not built (`cargo build --workspace --bins` builds them;
/// `scripts/test` does).
pub fn workspace_bin(name: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // target/<profile>/deps/<test binary>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("cannot locate the target directory from {}", exe.display()))?;
    let bin = dir.join(name);
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!(
            "{} is not built: run `cargo build --workspace --bins` first (scripts/test does)",
            bin.display()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_and_response_encoding() {
        let r = image_spec_request("127.0.0.1:5000/a:b");
        assert_eq!(r[0], 0x0a);
        assert_eq!(usize::from(r[1]), r.len() - 2);
        assert_eq!(&r[2..4], &[0x0a, 18]);
        assert_eq!(first_string_field(&r[2..]).unwrap(), "127.0.0.1:5000/a:b");
        assert_eq!(percent_decode("a%20b%3A%"), "a b:%");
    }
}

//! Docker credential helpers (`credHelpers`, `credsStore`) against docker-registry with
//! htpasswd auth: a helper script on PATH speaking the docker-credential-helpers protocol.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::{imgcrypt_env, oci};
use testkit::image::{write_image, Compression, LayerSpec};
use testkit::registry::Registry;
use testkit::tools::{have_tool, skopeo_ok};

fn helper(bin: &Path, name: &str, body: &str) {
    let p = bin.join(format!("docker-credential-{name}"));
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn credential_helpers_from_docker_config() {
    if !(have_tool("skopeo") && have_tool("docker-registry")) {
        return;
    }
    let reg = Registry::start_with_auth("alice", "s3cret");
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    write_image(&src, "v1", &[LayerSpec::random(5_000, 31, Compression::Gzip)]);
    let img = reg.image("team/app:v1");
    skopeo_ok(&[
        "copy",
        "--dest-tls-verify=false",
        "--dest-creds",
        "alice:s3cret",
        &oci(&src, "v1"),
        &img,
    ]);

    let bin = t.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let asked = t.path().join("asked");
    // A helper that records the server it was asked about and answers for that one only.
    helper(
        &bin,
        "imgtest",
        &format!(
            "[ \"$1\" = get ] || exit 3\nread -r server || true\nprintf '%s' \"$server\" > {asked}\n\
             if [ \"$server\" = \"{addr}\" ]; then\n\
             printf '{{\"ServerURL\":\"%s\",\"Username\":\"alice\",\"Secret\":\"s3cret\"}}' \"$server\"\n\
             else echo 'credentials not found in native keychain'; exit 1; fi",
            asked = asked.display(),
            addr = reg.addr
        ),
    );
    helper(&bin, "broken", "echo 'vault sealed' >&2; exit 1");
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let cfg = t.path().join("docker");
    std::fs::create_dir(&cfg).unwrap();
    let run = |config: String| {
        std::fs::write(cfg.join("config.json"), config).unwrap();
        let _ = std::fs::remove_file(&asked);
        imgcrypt_env(
            &["--tls-verify=false", "inspect", &img],
            &[("PATH", &path), ("DOCKER_CONFIG", &cfg.display().to_string())],
        )
    };

    // credHelpers: the helper named for this registry is run with the registry on stdin.
    run(format!(r#"{{"credHelpers":{{"{}":"imgtest"}}}}"#, reg.addr)).ok();
    assert_eq!(std::fs::read_to_string(&asked).unwrap(), reg.addr);
    // credsStore: the store is asked for every registry.
    run(r#"{"credsStore":"imgtest"}"#.to_owned()).ok();
    assert_eq!(std::fs::read_to_string(&asked).unwrap(), reg.addr);
    // credHelpers wins over credsStore; a helper for another registry is not run.
    run(format!(
        r#"{{"credsStore":"broken","credHelpers":{{"{}":"imgtest","other.example":"broken"}}}}"#,
        reg.addr
    ))
    .ok();
    // Without credentials the registry refuses (proves the helper's answer was what let us in).
    run(r#"{"auths":{}}"#.to_owned())
        .expect_code(8)
        .stderr_has(&["requires credentials"]);
    // A helper that is not installed, and one that fails: exit 8, naming the helper and the file.
    run(format!(r#"{{"credHelpers":{{"{}":"absent"}}}}"#, reg.addr))
        .expect_code(8)
        .stderr_has(&[
            "docker-credential-absent",
            "credHelpers",
            "config.json",
            "install",
        ]);
    run(r#"{"credsStore":"broken"}"#.to_owned())
        .expect_code(8)
        .stderr_has(&["docker-credential-broken", "failed", "vault sealed", "credsStore"]);
}

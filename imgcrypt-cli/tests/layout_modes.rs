//! Layouts others can read (modes follow the umask, as skopeo's) and temporaries left by a
//! killed run removed by the next write.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::{imgcrypt, oci};
use testkit::image::{write_image, Compression, LayerSpec};
use testkit::tools::{have_tool, openssl_keypair};

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn layout_files_follow_the_umask_and_stale_temporaries_go() {
    if !have_tool("openssl") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    write_image(&src, "v1", &[LayerSpec::random(50_000, 51, Compression::Gzip)]);
    let (key, public) = openssl_keypair(t.path(), "k", "p256");
    let dst = t.path().join("dst");
    imgcrypt(&[
        "encrypt",
        "--recipient",
        &format!("jwe:{}", public.display()),
        &oci(&src, "v1"),
        &oci(&dst, "v1"),
    ])
    .ok();

    // What a file created here under the same umask gets (0644 under umask 022).
    let probe = t.path().join("probe");
    std::fs::File::create(&probe).unwrap();
    let expected = mode(&probe);
    assert_eq!(mode(&dst.join("index.json")), expected);
    assert_eq!(mode(&dst.join("oci-layout")), expected);
    let blobs: Vec<_> = std::fs::read_dir(dst.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(blobs.len() >= 3);
    for b in &blobs {
        assert_eq!(mode(b), expected, "{}", b.display());
    }

    // A temporary left by a killed run (its pid no longer runs; above any pid_max) and one that a
    // running writer (this test's pid) owns.
    let stale = dst.join("blobs/sha256/.tmp-4199999-abcdef");
    let live = dst.join(format!("blobs/sha256/.tmp-{}-abcdef", std::process::id()));
    std::fs::write(&stale, b"partial").unwrap();
    std::fs::write(&live, b"partial").unwrap();
    imgcrypt(&[
        "decrypt",
        "--key",
        &key.display().to_string(),
        &oci(&dst, "v1"),
        &oci(&dst, "plain"),
    ])
    .ok();
    assert!(
        !stale.exists(),
        "the stale temporary is removed by the next write"
    );
    assert!(live.exists(), "a running writer's temporary is kept");
    // Tags intact.
    imgcrypt(&["inspect", &oci(&dst, "v1")])
        .ok()
        .stdout_has(&["encrypted"]);
    imgcrypt(&["inspect", &oci(&dst, "plain")]).ok();
}

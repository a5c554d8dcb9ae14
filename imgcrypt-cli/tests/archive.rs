//! oci-archive: and docker-archive: against skopeo, and hostile archives.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::{imgcrypt, layer_blobs, oci};
use testkit::image::{write_image, Compression, LayerSpec};
use testkit::tools::{have_tool, openssl_keypair, skopeo_ok};

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn archives_round_trip_with_skopeo() {
    if !(have_tool("skopeo") && have_tool("openssl")) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    write_image(
        &src,
        "v1",
        &[
            LayerSpec::random(300_000, 41, Compression::Gzip),
            LayerSpec::random(20_000, 42, Compression::Gzip),
        ],
    );
    let (key, public) = openssl_keypair(t.path(), "k", "p256");
    let recipient = format!("jwe:{}", public.display());
    let key = s(&key);

    // We write an encrypted oci-archive; skopeo reads and decrypts it.
    let a = t.path().join("enc.tar");
    imgcrypt(&[
        "encrypt",
        "--recipient",
        &recipient,
        &oci(&src, "v1"),
        &format!("oci-archive:{}:enc", s(&a)),
    ])
    .ok();
    let out = t.path().join("skopeo-out");
    skopeo_ok(&[
        "copy",
        "--decryption-key",
        &key,
        &format!("oci-archive:{}:enc", s(&a)),
        &oci(&out, "v1"),
    ]);
    assert_eq!(layer_blobs(&out, "v1"), layer_blobs(&src, "v1"));
    // Its mode follows the umask, as a file the test creates in the same directory.
    let probe = t.path().join("probe");
    std::fs::File::create(&probe).unwrap();
    assert_eq!(mode(&a), mode(&probe));
    // No staging leftovers.
    let left: Vec<_> = std::fs::read_dir(t.path())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // skopeo writes an oci-archive; we encrypt from it and decrypt back.
    let b = t.path().join("plain.tar");
    skopeo_ok(&["copy", &oci(&src, "v1"), &format!("oci-archive:{}:v1", s(&b))]);
    let enc = t.path().join("enc");
    imgcrypt(&[
        "encrypt",
        "--recipient",
        &recipient,
        &format!("oci-archive:{}:v1", s(&b)),
        &oci(&enc, "v1"),
    ])
    .ok();
    imgcrypt(&["inspect", &oci(&enc, "v1")])
        .ok()
        .stdout_has(&["encrypted"]);
    let dec = t.path().join("dec");
    imgcrypt(&["decrypt", "--key", &key, &oci(&enc, "v1"), &oci(&dec, "v1")]).ok();
    assert_eq!(layer_blobs(&dec, "v1"), layer_blobs(&src, "v1"));
    // An archive to an archive, both ways.
    let c = t.path().join("dec.tar");
    imgcrypt(&[
        "decrypt",
        "--key",
        &key,
        &format!("oci-archive:{}:enc", s(&a)),
        &format!("oci-archive:{}", s(&c)),
    ])
    .ok();
    let out2 = t.path().join("skopeo-out2");
    skopeo_ok(&["copy", &format!("oci-archive:{}", s(&c)), &oci(&out2, "v1")]);
    assert_eq!(layer_blobs(&out2, "v1"), layer_blobs(&src, "v1"));

    // docker-archive written by skopeo (docker save format) as a source.
    let d = t.path().join("docker.tar");
    skopeo_ok(&[
        "copy",
        &oci(&src, "v1"),
        &format!("docker-archive:{}:team/app:v1", s(&d)),
    ]);
    let plain = t.path().join("plain");
    imgcrypt(&[
        "decrypt",
        "--key",
        &key,
        &format!("docker-archive:{}", s(&d)),
        &oci(&plain, "v1"),
    ])
    .ok();
    let enc2 = t.path().join("enc2");
    imgcrypt(&[
        "encrypt",
        "--recipient",
        &recipient,
        &format!("docker-archive:{}:team/app:v1", s(&d)),
        &oci(&enc2, "v1"),
    ])
    .ok();
    let dec2 = t.path().join("dec2");
    skopeo_ok(&[
        "copy",
        "--decryption-key",
        &key,
        &oci(&enc2, "v1"),
        &oci(&dec2, "v1"),
    ]);
    assert_eq!(layer_blobs(&dec2, "v1"), layer_blobs(&plain, "v1"));
    imgcrypt(&["inspect", &format!("docker-archive:{}:team/app:nope", s(&d))])
        .expect_code(7)
        .stderr_has(&["team/app:nope"]);

    // docker-archive as a destination for a decrypted image: skopeo reads it back.
    let e = t.path().join("out-docker.tar");
    imgcrypt(&[
        "decrypt",
        "--key",
        &key,
        &oci(&enc, "v1"),
        &format!("docker-archive:{}:team/app:v2", s(&e)),
    ])
    .ok();
    let back = t.path().join("back");
    skopeo_ok(&[
        "copy",
        &format!("docker-archive:{}:team/app:v2", s(&e)),
        &oci(&back, "v1"),
    ]);
    // An encrypted image cannot go to a docker-archive: refused, nothing written.
    let f = t.path().join("refused.tar");
    imgcrypt(&[
        "encrypt",
        "--recipient",
        &recipient,
        &oci(&src, "v1"),
        &format!("docker-archive:{}", s(&f)),
    ])
    .expect_code(1)
    .stderr_has(&["encrypted layers", "oci-archive"]);
    assert!(!f.exists());
}

#[test]
fn hostile_archives_are_refused() {
    let t = tempfile::tempdir().unwrap();
    // A link member.
    let p = t.path().join("link.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&p).unwrap());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    b.append_link(&mut h, "index.json", "/etc/passwd").unwrap();
    b.finish().unwrap();
    drop(b);
    imgcrypt(&["inspect", &format!("oci-archive:{}", s(&p))])
        .expect_code(7)
        .stderr_has(&["link", "refused"]);
    // Not a tar at all.
    let q = t.path().join("junk.tar");
    std::fs::write(&q, vec![7u8; 4096]).unwrap();
    imgcrypt(&["inspect", &format!("oci-archive:{}", s(&q))]).expect_code(7);
}

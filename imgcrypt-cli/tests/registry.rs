//! The real binary against Debian's docker-registry on 127.0.0.1, with skopeo on the other end.

mod common;

use std::path::{Path, PathBuf};

use common::{imgcrypt, imgcrypt_env, layer_blobs, layer_types, oci, vectors};
use testkit::image::{write_image, write_multiarch, Compression, LayerSpec};
use testkit::registry::Registry;
use testkit::tools::{have_tool, openssl_keypair, skopeo_ok};

const NO_TLS: &str = "--tls-verify=false";

fn tools() -> bool {
    have_tool("skopeo") && have_tool("openssl") && have_tool("docker-registry")
}

fn src_image(dir: &Path) {
    write_image(
        dir,
        "v1",
        &[
            LayerSpec::random(3 << 20, 11, Compression::Gzip),
            // skopeo compresses plain tar layers on copy, so only gzip layers compare byte for byte.
            LayerSpec::random(100_000, 12, Compression::Gzip),
            LayerSpec::random(10_000, 13, Compression::Gzip),
        ],
    );
}

/// A fresh registry, a work directory, and the three-layer source image in `WORK/src`.
fn registry_and_source() -> (Registry, tempfile::TempDir, PathBuf) {
    let reg = Registry::start();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    src_image(&src);
    (reg, t, src)
}

#[test]
fn push_encrypted_then_skopeo_and_us_decrypt() {
    if !tools() {
        return;
    }
    let (reg, t, src) = registry_and_source();
    let (priv_a, pub_a) = openssl_keypair(t.path(), "a", "rsa2048");
    let (priv_b, pub_b) = openssl_keypair(t.path(), "b", "p256");
    let enc_ref = reg.image("team/app:enc");

    imgcrypt(&[
        NO_TLS,
        "encrypt",
        "--recipient",
        &format!("jwe:{}", pub_a.display()),
        "--recipient",
        &format!("jwe:{}", pub_b.display()),
        &oci(&src, "v1"),
        &enc_ref,
    ])
    .ok()
    .stdout_has(&["3 encrypted"]);

    // What the registry serves is encrypted.
    let j = imgcrypt(&[NO_TLS, "inspect", "--json", &enc_ref]).ok().json();
    let layers = j["manifests"][0]["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3);
    assert!(layers.iter().all(|l| l["encrypted"] == true), "{j}");

    // skopeo pulls and decrypts with either key: byte-identical layers.
    for (i, key) in [&priv_a, &priv_b].iter().enumerate() {
        let out = t.path().join(format!("skopeo{i}"));
        skopeo_ok(&[
            "copy",
            "--src-tls-verify=false",
            "--decryption-key",
            &key.display().to_string(),
            &enc_ref,
            &oci(&out, "v1"),
        ]);
        assert_eq!(layer_blobs(&out, "v1"), layer_blobs(&src, "v1"));
    }
    // We pull and decrypt.
    let ours = t.path().join("ours");
    imgcrypt(&[
        NO_TLS,
        "decrypt",
        "--key",
        &priv_a.display().to_string(),
        &enc_ref,
        &oci(&ours, "v1"),
    ])
    .ok();
    assert_eq!(layer_blobs(&ours, "v1"), layer_blobs(&src, "v1"));
    imgcrypt(&[NO_TLS, "check", "--key", &priv_b.display().to_string(), &enc_ref]).ok();

    // Registry to registry, streaming both ways; skopeo reads the plain result.
    let dec_ref = reg.image("team/app:dec");
    imgcrypt(&[
        NO_TLS,
        "decrypt",
        "--key",
        &priv_b.display().to_string(),
        &enc_ref,
        &dec_ref,
    ])
    .ok();
    let plain = t.path().join("plain");
    skopeo_ok(&["copy", "--src-tls-verify=false", &dec_ref, &oci(&plain, "v1")]);
    assert_eq!(layer_blobs(&plain, "v1"), layer_blobs(&src, "v1"));

    // Wrong key, registry to registry: exit 4, and no tag is pushed.
    let (priv_c, _) = openssl_keypair(t.path(), "c", "p256");
    let bad_ref = reg.image("team/app:bad");
    imgcrypt(&[
        NO_TLS,
        "decrypt",
        "--key",
        &priv_c.display().to_string(),
        &enc_ref,
        &bad_ref,
    ])
    .expect_code(4)
    .stderr_has(&["wrong key", "c.pem", &format!("of {enc_ref}")]);
    imgcrypt(&[NO_TLS, "inspect", &bad_ref])
        .expect_code(7)
        .stderr_has(&["does not exist"]);
}

#[test]
fn skopeo_encrypted_push_is_decrypted_by_us() {
    if !tools() {
        return;
    }
    let (reg, t, src) = registry_and_source();
    let (priv_a, pub_a) = openssl_keypair(t.path(), "a", "rsa2048");
    let r = reg.image("skopeo/enc:v1");
    skopeo_ok(&[
        "copy",
        "--dest-tls-verify=false",
        "--encryption-key",
        &format!("jwe:{}", pub_a.display()),
        &oci(&src, "v1"),
        &r,
    ]);
    let out = t.path().join("out");
    imgcrypt(&[
        NO_TLS,
        "decrypt",
        "--decryption-key",
        &priv_a.display().to_string(),
        &r,
        &oci(&out, "v1"),
    ])
    .ok();
    assert_eq!(layer_blobs(&out, "v1"), layer_blobs(&src, "v1"));
    assert_eq!(layer_types(&out, "v1"), layer_types(&src, "v1"));
}

#[test]
fn multiarch_one_platform_through_the_registry() {
    if !tools() {
        return;
    }
    let reg = Registry::start();
    let t = tempfile::tempdir().unwrap();
    let (priv_a, pub_a) = openssl_keypair(t.path(), "a", "p384");
    let src = t.path().join("src");
    write_multiarch(
        &src,
        "v1",
        &[
            ("amd64", vec![LayerSpec::random(20_000, 21, Compression::Gzip)]),
            (
                "arm64",
                vec![
                    LayerSpec::random(30_000, 22, Compression::Gzip),
                    LayerSpec::random(5_000, 23, Compression::Gzip),
                ],
            ),
        ],
    );
    let r = reg.image("multi/app:v1");
    imgcrypt(&[
        NO_TLS,
        "encrypt",
        "--recipient",
        &format!("jwe:{}", pub_a.display()),
        "--platform",
        "linux/arm64",
        &oci(&src, "v1"),
        &r,
    ])
    .ok();
    // skopeo copies the whole index back without keys; only arm64 is encrypted.
    let pulled = t.path().join("pulled");
    skopeo_ok(&["copy", "--all", "--src-tls-verify=false", &r, &oci(&pulled, "v1")]);
    let types = layer_types(&pulled, "v1");
    assert_eq!(types.len(), 3);
    for (arch, ty) in &types {
        assert_eq!(ty.ends_with("+encrypted"), arch == "arm64", "{types:?}");
    }
    let j = imgcrypt(&[NO_TLS, "inspect", "--json", &r]).ok().json();
    let plats: Vec<String> = j["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["platform"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(plats, vec!["linux/amd64", "linux/arm64"]);
    // We decrypt the whole index from the registry.
    let out = t.path().join("out");
    imgcrypt(&[
        NO_TLS,
        "decrypt",
        "--key",
        &priv_a.display().to_string(),
        &r,
        &oci(&out, "v1"),
    ])
    .ok();
    assert_eq!(layer_blobs(&out, "v1"), layer_blobs(&src, "v1"));
}

#[test]
fn recipients_add_and_remove_in_the_registry() {
    if !tools() {
        return;
    }
    let (reg, t, src) = registry_and_source();
    let (priv_a, pub_a) = openssl_keypair(t.path(), "a", "rsa2048");
    let (priv_b, pub_b) = openssl_keypair(t.path(), "b", "p256");
    let (a, b) = (priv_a.display().to_string(), priv_b.display().to_string());
    let r = reg.image("rk/app:v1");
    imgcrypt(&[
        NO_TLS,
        "encrypt",
        "--recipient",
        &format!("jwe:{}", pub_a.display()),
        &oci(&src, "v1"),
        &r,
    ])
    .ok();
    imgcrypt(&[
        NO_TLS,
        "recipients",
        "add",
        "--key",
        &a,
        "--recipient",
        &format!("jwe:{}", pub_b.display()),
        &r,
    ])
    .ok();
    imgcrypt(&[NO_TLS, "check", "--key", &b, &r]).ok();
    imgcrypt(&[
        NO_TLS,
        "recipients",
        "set",
        "--key",
        &a,
        "--recipient",
        &format!("jwe:{}", pub_b.display()),
        &r,
    ])
    .ok();
    imgcrypt(&[NO_TLS, "check", "--key", &a, &r])
        .expect_code(4)
        .stderr_has(&["wrong key"]);
    // skopeo agrees: b decrypts, a does not.
    let out = t.path().join("out");
    skopeo_ok(&[
        "copy",
        "--src-tls-verify=false",
        "--decryption-key",
        &b,
        &r,
        &oci(&out, "v1"),
    ]);
    assert_eq!(layer_blobs(&out, "v1"), layer_blobs(&src, "v1"));
    let o = testkit::tools::skopeo(&[
        "copy",
        "--src-tls-verify=false",
        "--decryption-key",
        &a,
        &r,
        &oci(&t.path().join("no"), "v1"),
    ]);
    assert!(
        !o.status.success(),
        "skopeo decrypted with a removed recipient's key"
    );
}

#[test]
fn tampered_layer_in_the_registry_pushes_nothing() {
    if !tools() {
        return;
    }
    let reg = Registry::start();
    let v = vectors();
    let r = reg.image("tamper/app:v1");
    // skopeo moves the (MAC-)tampered Go vector into the registry unchanged.
    skopeo_ok(&[
        "copy",
        "--dest-tls-verify=false",
        &oci(&v.join("layouts/enc-jwe-tampered"), "v1"),
        &r,
    ]);
    let out = reg.image("tamper/app:dec");
    imgcrypt(&[
        NO_TLS,
        "decrypt",
        "--key",
        &v.join("keys/rsa.pem").display().to_string(),
        &r,
        &out,
    ])
    .expect_code(5)
    .stderr_has(&["MAC", "tampered", &format!("no tag was pushed to {out}")]);
    imgcrypt(&[NO_TLS, "inspect", &out]).expect_code(7);
}

#[test]
fn registry_auth_and_network_errors() {
    if !tools() {
        return;
    }
    let reg = Registry::start_with_auth("alice", "s3cret");
    let t = tempfile::tempdir().unwrap();
    let (_, pub_a) = openssl_keypair(t.path(), "a", "p256");
    let src = t.path().join("src");
    write_image(&src, "v1", &[LayerSpec::random(1000, 31, Compression::Gzip)]);
    let r = reg.image("auth/app:v1");
    let recipient = format!("jwe:{}", pub_a.display());
    let encrypt = |extra: &[&str], env: &[(&str, &str)]| {
        let mut args = vec![NO_TLS];
        args.extend_from_slice(extra);
        let s = oci(&src, "v1");
        args.extend_from_slice(&["encrypt", "--recipient", &recipient, &s, &r]);
        imgcrypt_env(&args, env)
    };
    // No credentials, wrong credentials: 8.
    encrypt(&[], &[])
        .expect_code(8)
        .stderr_has(&["authentication failed", "none were given", "--creds"]);
    encrypt(&["--creds", "alice:wrong"], &[])
        .expect_code(8)
        .stderr_has(&["\"alice\"", "--creds", "refused"]);
    // --creds, an auth file (REGISTRY_AUTH_FILE) and ~/.docker/config.json all work.
    encrypt(&["--creds", "alice:s3cret"], &[]).ok();
    let authfile = t.path().join("auth.json");
    std::fs::write(
        &authfile,
        format!(r#"{{"auths":{{"{}":{{"auth":"YWxpY2U6czNjcmV0"}}}}}}"#, reg.addr),
    )
    .unwrap();
    imgcrypt_env(
        &[NO_TLS, "inspect", &r],
        &[("REGISTRY_AUTH_FILE", &authfile.display().to_string())],
    )
    .ok();
    let home = t.path().join("home");
    std::fs::create_dir_all(home.join(".docker")).unwrap();
    std::fs::copy(&authfile, home.join(".docker/config.json")).unwrap();
    imgcrypt_env(&[NO_TLS, "inspect", &r], &[("HOME", &home.display().to_string())]).ok();
    // A missing image: bad reference, 7.
    imgcrypt(&[
        NO_TLS,
        "--creds",
        "alice:s3cret",
        "inspect",
        &reg.image("auth/none:v1"),
    ])
    .expect_code(7)
    .stderr_has(&["does not exist"]);
    // Nothing listening: network failure, 9.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    imgcrypt(&[NO_TLS, "inspect", &format!("docker://127.0.0.1:{port}/x/y:v1")])
        .expect_code(9)
        .stderr_has(&["cannot connect", &format!("127.0.0.1:{port}")]);
}

#[test]
fn docker_schema2_source_registry_to_registry_and_digest_references() {
    if !tools() {
        return;
    }
    let (reg, t, src) = registry_and_source();
    let (priv_a, pub_a) = openssl_keypair(t.path(), "a", "rsa2048");
    // A Docker schema 2 image, as most registries serve them.
    let docker = reg.image("d/app:v2s2");
    skopeo_ok(&[
        "copy",
        "--dest-tls-verify=false",
        "--format",
        "v2s2",
        &oci(&src, "v1"),
        &docker,
    ]);
    let j = imgcrypt(&[NO_TLS, "inspect", "--json", &docker]).ok().json();
    assert_eq!(
        j["media_type"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    // By digest.
    let digest = j["digest"].as_str().unwrap().to_owned();
    let by_digest = format!("docker://{}/d/app@{digest}", reg.addr);
    imgcrypt(&[NO_TLS, "inspect", &by_digest])
        .ok()
        .stdout_has(&[&digest]);
    let missing = format!("docker://{}/d/app@sha256:{}", reg.addr, "0".repeat(64));
    imgcrypt(&[NO_TLS, "inspect", &missing]).expect_code(7);
    // Registry to registry encryption of the Docker image: an OCI manifest with encrypted layers.
    let enc = reg.image("d/app:enc");
    imgcrypt(&[
        NO_TLS,
        "encrypt",
        "--recipient",
        &format!("jwe:{}", pub_a.display()),
        &by_digest,
        &enc,
    ])
    .ok();
    let j = imgcrypt(&[NO_TLS, "inspect", "--json", &enc]).ok().json();
    assert_eq!(j["media_type"], "application/vnd.oci.image.manifest.v1+json");
    let out = t.path().join("out");
    skopeo_ok(&[
        "copy",
        "--src-tls-verify=false",
        "--decryption-key",
        &priv_a.display().to_string(),
        &enc,
        &oci(&out, "v1"),
    ]);
    assert_eq!(layer_blobs(&out, "v1"), layer_blobs(&src, "v1"));
}

/// A TCP front for `target` on loopback that answers the first `fail_first` connections with
/// `503 Service Unavailable` and pipes the others through.
fn flaky_front(target: &str, fail_first: usize) -> String {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let target = target.to_owned();
    std::thread::spawn(move || {
        for (n, conn) in listener.incoming().enumerate() {
            let Ok(mut client) = conn else { break };
            if n < fail_first {
                let _ = client.set_read_timeout(Some(std::time::Duration::from_secs(5)));
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && client.read(&mut b).map(|r| r == 1).unwrap_or(false) {
                    head.push(b[0]);
                }
                let _ = client.write_all(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                continue;
            }
            let Ok(upstream) = TcpStream::connect(&target) else {
                continue;
            };
            let (mut c2, mut u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
            let mut upstream = upstream;
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut client, &mut upstream);
                let _ = upstream.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut u2, &mut c2);
                let _ = c2.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

#[test]
fn transient_registry_failures_are_retried_a_bounded_number_of_times() {
    if !tools() {
        return;
    }
    let reg = Registry::start();
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    write_image(&src, "v1", &[LayerSpec::random(1000, 61, Compression::Gzip)]);
    skopeo_ok(&[
        "copy",
        "--dest-tls-verify=false",
        &oci(&src, "v1"),
        &reg.image("flaky/app:v1"),
    ]);
    // Two 503s, then the registry: the third attempt succeeds.
    let front = flaky_front(&reg.addr, 2);
    imgcrypt(&[NO_TLS, "inspect", &format!("docker://{front}/flaky/app:v1")]).ok();
    // Always 503: a network failure after the bounded attempts.
    let front = flaky_front(&reg.addr, usize::MAX);
    imgcrypt(&[NO_TLS, "inspect", &format!("docker://{front}/flaky/app:v1")])
        .expect_code(9)
        .stderr_has(&["503"]);
}

//! Recipient ids for the PKCS#7 and OpenPGP schemes (issue 14): `inspect` lists them, `recipients
//! add` skips a recipient already there, `recipients remove --recipient pkcs7:CERT|pgp:KEY`
//! removes exactly that recipient without a private key, and everyone else still opens the
//! image in skopeo, on an image for jwe + pkcs7 + pgp recipients. One test in its own process:
//! it sets GNUPGHOME for skopeo.

mod common;

use std::path::Path;

use common::{blob_count, imgcrypt, layer_blobs, oci};
use testkit::image::{write_image, Compression, LayerSpec};
use testkit::tools::{gpg, gpg_gen_key, gpg_home, have_tool, openssl_cert, openssl_keypair, skopeo_ok};

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Layer 0's wrapped-key annotation of `scheme`.
fn annotation(layout: &Path, scheme: &str) -> Option<String> {
    let m = testkit::image::manifest(layout, "v1");
    m["layers"][0]["annotations"][format!("org.opencontainers.image.enc.keys.{scheme}")]
        .as_str()
        .map(str::to_owned)
}

/// Layer 0's recipient ids of `scheme`, from `inspect --json`.
fn ids(image: &str, scheme: &str) -> Vec<String> {
    let j = imgcrypt(&["inspect", "--json", image]).ok().json();
    j["manifests"][0]["layers"][0]["recipients"][scheme]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_str().unwrap_or("-").to_owned()).collect())
        .unwrap_or_default()
}

fn skopeo_decrypts(image: &str, keys: &[&Path], out: &Path, src: &Path) {
    let mut args = vec!["copy".to_owned()];
    for k in keys {
        args.extend(["--decryption-key".to_owned(), s(k)]);
    }
    args.extend([image.to_owned(), oci(out, "v1")]);
    skopeo_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(layer_blobs(out, "v1"), layer_blobs(src, "v1"), "{keys:?}");
}

#[test]
fn pkcs7_and_pgp_recipients_have_ids_and_are_removed_one_by_one() {
    if !have_tool("skopeo") || !have_tool("gpg") || !have_tool("openssl") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let agent = gpg_home(d);
    let home = agent.0.clone();
    gpg_gen_key(&home, "Alice", "alice@example.com", None);
    gpg_gen_key(&home, "Bob", "bob@example.com", None);
    std::env::set_var("GNUPGHOME", &home);
    let export = |args: &[&str], name: &str| {
        let p = d.join(name);
        std::fs::write(&p, gpg(&home, args)).unwrap();
        p
    };
    let alice_sec = export(&["--export-secret-keys", "alice@example.com"], "alice.gpg");
    let bob_sec = export(&["--export-secret-keys", "bob@example.com"], "bob.gpg");
    let alice_pub = export(&["--export", "alice@example.com"], "alice.pub.gpg");
    let bob_pub = export(&["--export", "bob@example.com"], "bob.pub.gpg");
    // gpg's own idea of each encryption subkey id, to compare with what inspect shows.
    let subkey_id = |who: &str| {
        let out = String::from_utf8(gpg(&home, &["--with-colons", "--list-keys", who])).unwrap();
        out.lines()
            .find(|l| l.starts_with("sub:"))
            .and_then(|l| l.split(':').nth(4))
            .unwrap()
            .to_ascii_lowercase()
    };
    let (carl_key, carl_cert) = openssl_cert(d, "carl");
    let (dora_key, dora_cert) = openssl_cert(d, "dora");
    let (erin_key, erin_pub) = openssl_keypair(d, "erin", "p256");

    let src = d.join("src");
    write_image(&src, "v1", &[LayerSpec::random(6_000, 21, Compression::Gzip)]);
    let img = d.join("img");
    let image = oci(&img, "v1");
    imgcrypt(&[
        "encrypt",
        "--recipient",
        &format!("pkcs7:{}", s(&carl_cert)),
        "--recipient",
        &format!("pkcs7:{}", s(&dora_cert)),
        "--recipient",
        &format!("jwe:{}", s(&erin_pub)),
        "--recipient",
        &format!("pgp:{}", s(&alice_pub)),
        "--recipient",
        &format!("pgp:{}", s(&bob_pub)),
        &oci(&src, "v1"),
        &image,
    ])
    .ok();

    // inspect: the PGP ids are gpg's subkey ids; two PKCS#7 ids, SERIAL@ISSUERHASH.
    let pgp_ids = ids(&image, "pgp");
    assert_eq!(
        pgp_ids,
        [subkey_id("alice@example.com"), subkey_id("bob@example.com")]
    );
    let p7 = ids(&image, "pkcs7");
    assert_eq!(p7.len(), 2, "{p7:?}");
    assert!(p7.iter().all(|i| i.contains('@')) && p7[0] != p7[1], "{p7:?}");
    let text = imgcrypt(&["inspect", &image]);
    text.ok().stdout_has(&[
        &format!("recipient pgp:{}", pgp_ids[1]),
        &format!("recipient pkcs7:{}", p7[0]),
    ]);

    // add of a pkcs7 and a pgp recipient already there: skipped and reported, nothing changes.
    let before = std::fs::read(img.join("index.json")).unwrap();
    imgcrypt(&[
        "recipients",
        "add",
        "--key",
        &s(&erin_key),
        "--recipient",
        &format!("pkcs7:{}", s(&carl_cert)),
        "--recipient",
        &format!("pgp:{}", s(&bob_pub)),
        &image,
    ])
    .ok()
    .stdout_has(&["already a recipient, not added again", &p7[0], &pgp_ids[1]]);
    assert_eq!(ids(&image, "pkcs7"), p7);
    assert_eq!(ids(&image, "pgp"), pgp_ids);
    assert_eq!(std::fs::read(img.join("index.json")).unwrap(), before);

    // remove carl (pkcs7) without any key: carl is out, the rest of the image untouched.
    let jwe_before = annotation(&img, "jwe").unwrap();
    let pgp_before = annotation(&img, "pgp").unwrap();
    imgcrypt(&[
        "recipients",
        "remove",
        "--recipient",
        &format!("pkcs7:{}", s(&carl_cert)),
        &image,
    ])
    .ok()
    .stdout_has(&["removed:", &p7[0]]);
    assert_eq!(ids(&image, "pkcs7"), [p7[1].clone()]);
    assert_eq!(annotation(&img, "jwe").unwrap(), jwe_before);
    assert_eq!(annotation(&img, "pgp").unwrap(), pgp_before);
    imgcrypt(&["check", "--key", &s(&carl_key), &image])
        .expect_code(4)
        .stderr_has(&["wrong key"]);
    skopeo_decrypts(&image, &[&dora_key, &dora_cert], &d.join("dora-dec"), &src);

    // remove bob (pgp, by e-mail from the gpg keyring): the PKESK goes, alice's stays.
    imgcrypt(&[
        "recipients",
        "remove",
        "--recipient",
        "pgp:bob@example.com",
        &image,
    ])
    .ok()
    .stdout_has(&["removed:", &pgp_ids[1]]);
    assert_eq!(ids(&image, "pgp"), [pgp_ids[0].clone()]);
    {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let old = b64.decode(&pgp_before).unwrap();
        let new = b64.decode(annotation(&img, "pgp").unwrap()).unwrap();
        // The message lost exactly one packet and its tail (the encrypted data) is unchanged.
        assert!(new.len() < old.len() && old.ends_with(&new[new.len() - 200..]));
    }
    imgcrypt(&["check", "--key", &s(&bob_sec), &image])
        .expect_code(4)
        .stderr_has(&["wrong key"]);
    skopeo_decrypts(&image, &[&alice_sec], &d.join("alice-dec"), &src);
    skopeo_decrypts(&image, &[&erin_key], &d.join("erin-dec"), &src);
    skopeo_decrypts(&image, &[&dora_key, &dora_cert], &d.join("dora-dec2"), &src);

    // Removing a recipient not on the image (carl again) is refused, the image unchanged.
    let before = (std::fs::read(img.join("index.json")).unwrap(), blob_count(&img));
    imgcrypt(&[
        "recipients",
        "remove",
        "--recipient",
        &format!("pkcs7:{}", s(&carl_cert)),
        &image,
    ])
    .expect_code(2);
    // Removing every remaining recipient (all schemes) is refused.
    imgcrypt(&[
        "recipients",
        "remove",
        "--recipient",
        &format!("pkcs7:{}", s(&dora_cert)),
        "--recipient",
        &format!("jwe:{}", s(&erin_pub)),
        "--recipient",
        &format!("pgp:{}", s(&alice_pub)),
        &image,
    ])
    .expect_code(2)
    .stderr_has(&["no recipient"]);
    assert_eq!(
        (std::fs::read(img.join("index.json")).unwrap(), blob_count(&img)),
        before
    );
    // By id (as inspect prints it) works too: the pkcs7 and pgp ids.
    imgcrypt(&[
        "recipients",
        "remove",
        "--recipient",
        &format!("id:{}", p7[1]),
        "--recipient",
        &format!("id:{}", pgp_ids[0]),
        &image,
        &oci(&d.join("by-id"), "v1"),
    ])
    .ok();
    assert!(ids(&oci(&d.join("by-id"), "v1"), "pkcs7").is_empty());
    assert!(ids(&oci(&d.join("by-id"), "v1"), "pgp").is_empty());
    skopeo_decrypts(
        &oci(&d.join("by-id"), "v1"),
        &[&erin_key],
        &d.join("erin-dec2"),
        &src,
    );
}

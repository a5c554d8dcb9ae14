//! Streaming proven by peak RSS: a decoder process decrypts a layer several times larger than
//! the memory bound, in both output modes, and its peak resident set exceeds the peak of a
//! 1 MiB run (the fixed cost: code pages, runtimes, keys) by less than the bound.
//!
//! The child reads `VmRSS` just before decoding and `VmHWM` (peak resident set) at exit from
//! its own /proc/self/status. The layer is encrypted by the `openssl` CLI (AES-256-CTR with the
//! nonce as the 128-bit counter block, HMAC-SHA256 over the ciphertext), independently of the
//! library under test. Not a timed test; `IMGCRYPT_RSS_LAYER_MIB` makes the layer larger (the
//! default keeps the test short in unoptimised builds, where the cipher runs at a few MB/s;
//! `benches/decoder-rss.sh` measures a 1 GiB layer with the release binary).

mod stream_processor_common;

use std::io::{Read, Write};
use std::process::Command;

use ocicrypt_core::cipher::{LayerKey, MacTag, Nonce};
use ocicrypt_core::stream_processor::{Descriptor, Payload};
use sha2::{Digest, Sha256};
use stream_processor_common::*;
use testkit::tools::have_tool;

/// Growth of the decoder's resident set allowed while it decrypts.
const GROWTH_BOUND_KB: u64 = 6 * 1024;
const CHUNK: usize = 1 << 20;

fn layer_mib() -> u64 {
    std::env::var("IMGCRYPT_RSS_LAYER_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32)
}

/// The `n`-th MiB of the deterministic plaintext (xorshift: not compressible).
fn plain_chunk(n: u64, buf: &mut [u8]) {
    let mut x = (0x9e37_79b9_7f4a_7c15u64 ^ n.wrapping_mul(0xbf58_476d_1ce4_e5b9)) | 1;
    for w in buf.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
}

fn openssl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl").args(args).output().expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
#[ignore = "decoder child process entry; run by the process tests"]
fn decoder_child() {
    child_main();
}

#[test]
fn peak_rss_stays_bounded_while_decrypting_a_large_layer() {
    if !have_tool("openssl") {
        return;
    }
    // The peak of a 1 MiB run is the fixed cost (code pages of the binary, runtimes, key
    // loading); streaming means the peak of the large run exceeds it by less than the bound.
    let base = peaks(1);
    let mib = layer_mib();
    let big = peaks(mib);
    for ((mode, base_peak), (_, peak)) in base.iter().zip(&big) {
        let growth = peak.saturating_sub(*base_peak);
        eprintln!("decoder {mode}: 1 MiB layer peak {base_peak} KiB, {mib} MiB layer peak {peak} KiB, growth {growth} KiB");
        assert!(
            growth < GROWTH_BOUND_KB && GROWTH_BOUND_KB * 4 <= mib << 10,
            "{mode}: peak resident set grew by {growth} KiB from a 1 MiB to a {mib} MiB layer (bound {GROWTH_BOUND_KB} KiB)"
        );
    }
}

/// Decrypts a `mib` MiB layer in both output modes; returns each mode's peak resident set (KiB).
fn peaks(mib: u64) -> Vec<(String, u64)> {
    let mut peaks = Vec::new();
    let layer = mib << 20;
    let tmp = tempfile::tempdir().unwrap();
    let plain = tmp.path().join("plain");
    let cipher = tmp.path().join("cipher");

    // Plaintext file and its digest.
    let mut want = Sha256::new();
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&plain).unwrap());
        let mut buf = vec![0u8; CHUNK];
        for n in 0..mib {
            plain_chunk(n, &mut buf);
            want.update(&buf);
            f.write_all(&buf).unwrap();
        }
        f.flush().unwrap();
    }
    let want = want.finalize();

    // Encrypt and MAC with openssl.
    let key = LayerKey::generate();
    let nonce = Nonce::generate();
    let khex = hex::encode(key.as_bytes());
    let nhex = hex::encode(nonce.as_bytes());
    openssl(&[
        "enc",
        "-aes-256-ctr",
        "-nosalt",
        "-K",
        &khex,
        "-iv",
        &nhex,
        "-in",
        plain.to_str().unwrap(),
        "-out",
        cipher.to_str().unwrap(),
    ]);
    std::fs::remove_file(&plain).unwrap();
    let mac = openssl(&[
        "dgst",
        "-sha256",
        "-binary",
        "-mac",
        "HMAC",
        "-macopt",
        &format!("hexkey:{khex}"),
        cipher.to_str().unwrap(),
    ]);
    let mac = MacTag(mac.try_into().expect("32-byte HMAC"));

    let recipient = vector_key("rsa.pub.pem");
    let payload = Payload {
        descriptor: Descriptor {
            media_type: "application/vnd.oci.image.layer.v1.tar+encrypted".into(),
            // The decoder checks stdin against the descriptor's digest.
            digest: format!(
                "sha256:{}",
                hex::encode(openssl(&["dgst", "-sha256", "-binary", cipher.to_str().unwrap()]))
            ),
            size: layer as i64,
            annotations: annotations_for(&key, &nonce, &mac, &[&recipient]),
        },
        ..Payload::default()
    };
    let keys = key_dir(&[("rsa.pem", std::fs::read(vector_key("rsa.pem")).unwrap())]);
    let pfile = tmp.path().join("payload");
    std::fs::write(&pfile, payload.to_any_bytes()).unwrap();
    let spool_dir = tmp.path().join("spool");
    std::fs::create_dir(&spool_dir).unwrap();

    for mode in [vec!["--spool-dir", spool_dir.to_str().unwrap()], vec!["--stream"]] {
        let mut args = vec!["--decryption-keys-path", keys.path().to_str().unwrap()];
        args.extend(&mode);
        let mut child = spawn_child(&args, Some(&pfile), &payload.descriptor.media_type);
        // Feed the ciphertext file (a thread, so a child that stops reading cannot block us).
        let mut stdin = child.stdin.take().unwrap();
        let cfile = cipher.clone();
        let feeder = std::thread::spawn(move || {
            let mut f = std::fs::File::open(cfile).unwrap();
            std::io::copy(&mut f, &mut stdin).is_ok()
        });
        let mut stdout = child.stdout.take().unwrap();
        let mut got = Sha256::new();
        let mut total = 0u64;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = stdout.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            got.update(&buf[..n]);
            total += n as u64;
        }
        let out = child.wait_with_output().unwrap();
        let fed = feeder.join().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{mode:?}: {err}");
        assert!(fed, "the decoder read all its input");
        assert_eq!(total, layer);
        assert!(got.finalize() == want, "{mode:?}: plaintext digest");
        let (before, peak) = (child_rss_before(&err), child_hwm(&err));
        eprintln!("decoder {mode:?}: layer {mib} MiB, RSS before {before} KiB, peak {peak} KiB");
        peaks.push((format!("{mode:?}"), peak));
    }
    assert_eq!(
        std::fs::read_dir(&spool_dir).unwrap().count(),
        0,
        "no spool file left"
    );
    peaks
}

/// Why the test can fail: a decoder that buffers the layer grows by the layer size.
#[test]
fn the_bound_is_smaller_than_the_layer() {
    assert!(
        GROWTH_BOUND_KB * 4 <= layer_mib() << 10,
        "the layer must be at least 4x the bound"
    );
}

//! Property tests of the layer cipher: round trips at random sizes and chunkings, any tamper
//! fails, and the streaming adapters (sync and async) agree with the one-shot core and with an
//! independent `ctr` + `hmac` composition, including the two-thread [`cipher::parallel`] functions
//! and the split halves ([`Keystream`], [`LayerMac`]) the image pipeline runs as stages.

use std::io::{Read, Write};

use aes::cipher::{KeyIvInit, StreamCipher};
use cipher::io::{crate_error, DecryptReader, DecryptWriter, EncryptReader, EncryptWriter};
use hmac::{Hmac, Mac};
use ocicrypt_core::cipher::{
    self, decrypt_in_place, encrypt_in_place, ExpectedMac, Keystream, LayerDecryptor, LayerEncryptor,
    LayerKey, LayerMac, Nonce,
};
use ocicrypt_core::Error;
use proptest::prelude::*;
use tokio::io::AsyncReadExt;

/// Reads from a slice in chunks of the given sizes (cycled), to exercise short reads.
struct Chunky<'a> {
    data: &'a [u8],
    sizes: Vec<usize>,
    i: usize,
}

impl Read for Chunky<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = self.sizes[self.i % self.sizes.len()].max(1);
        self.i += 1;
        let n = want.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

fn oracle(key: &[u8; 32], nonce: &[u8; 16], data: &[u8]) -> (Vec<u8>, [u8; 32]) {
    let mut c = ctr::Ctr128BE::<aes::Aes256>::new(key.into(), nonce.into());
    let mut out = data.to_vec();
    c.apply_keystream(&mut out);
    let mut m = <Hmac<sha2::Sha256> as Mac>::new_from_slice(key).unwrap();
    m.update(&out);
    (out, m.finalize().into_bytes().into())
}

fn key_nonce(k: [u8; 32], n: [u8; 16]) -> (LayerKey, Nonce) {
    (LayerKey::from_slice(&k).unwrap(), Nonce::from_slice(&n).unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn streaming_equals_oracle_at_any_chunking(
        data in proptest::collection::vec(any::<u8>(), 0..70_000),
        sizes in proptest::collection::vec(1usize..5000, 1..8),
        k in any::<[u8; 32]>(), n in any::<[u8; 16]>(),
    ) {
        let (key, nonce) = key_nonce(k, n);
        let (want_ct, want_mac) = oracle(&k, &n, &data);

        // Core, fed in arbitrary chunks.
        let mut buf = data.clone();
        let mut e = LayerEncryptor::new(&key, &nonce);
        let mut off = 0;
        let mut i = 0;
        while off < buf.len() {
            let end = (off + sizes[i % sizes.len()]).min(buf.len());
            e.update(&mut buf[off..end]);
            off = end;
            i += 1;
        }
        prop_assert_eq!(&buf, &want_ct);
        prop_assert_eq!(e.finish().0, want_mac);

        // Read adapter with short reads.
        let mut r = EncryptReader::new(Chunky { data: &data, sizes: sizes.clone(), i: 0 }, &key, &nonce);
        let mut ct = Vec::new();
        r.read_to_end(&mut ct).unwrap();
        let (_, mac) = r.finish().unwrap();
        prop_assert_eq!(&ct, &want_ct);
        prop_assert_eq!(mac.0, want_mac);

        // Write adapter.
        let mut w = EncryptWriter::new(Vec::new(), &key, &nonce);
        for c in data.chunks(sizes[0]) { w.write_all(c).unwrap(); }
        let (ct2, mac2) = w.finish().unwrap();
        prop_assert_eq!(&ct2, &want_ct);
        prop_assert_eq!(mac2.0, want_mac);

        // Decrypt: reader and writer give the plaintext back and verify.
        let mut d = DecryptReader::new(Chunky { data: &ct, sizes: sizes.clone(), i: 0 }, &key, &nonce, &want_mac).unwrap();
        let mut back = Vec::new();
        d.read_to_end(&mut back).unwrap();
        prop_assert!(d.is_verified());
        prop_assert_eq!(&back, &data);
        let mut dw = DecryptWriter::new(Vec::new(), &key, &nonce, &want_mac).unwrap();
        for c in ct.chunks(sizes[0]) { dw.write_all(c).unwrap(); }
        prop_assert_eq!(dw.finish().unwrap(), data.clone());

        // Async adapters agree too.
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let (act, amac, aback) = rt.block_on(async {
            let mut er = cipher::tokio::EncryptReader::new(&data[..], &key, &nonce);
            let mut act = Vec::new();
            er.read_to_end(&mut act).await.unwrap();
            let (_, amac) = er.finish().unwrap();
            let mut dr = cipher::tokio::DecryptReader::new(&act[..], &key, &nonce, amac.as_bytes()).unwrap();
            let mut aback = Vec::new();
            dr.read_to_end(&mut aback).await.unwrap();
            assert!(dr.is_verified());
            (act, amac, aback)
        });
        prop_assert_eq!(&act, &want_ct);
        prop_assert_eq!(amac.0, want_mac);
        prop_assert_eq!(&aback, &data);

        // Two threads (CTR on one, HMAC on the other), fed by short reads.
        let (pct, plen, pmac) =
            cipher::parallel::encrypt(Chunky { data: &data, sizes: sizes.clone(), i: 0 }, Vec::new(), &key, &nonce).unwrap();
        prop_assert_eq!(plen, data.len() as u64);
        prop_assert_eq!(&pct, &want_ct);
        prop_assert_eq!(pmac.0, want_mac);
        let (pback, _) =
            cipher::parallel::decrypt(Chunky { data: &ct, sizes: sizes.clone(), i: 0 }, Vec::new(), &key, &nonce, &ExpectedMac::from_slice(&want_mac).unwrap()).unwrap();
        prop_assert_eq!(&pback, &data);

        // The split halves, each fed in its own chunking, as two pipeline stages would.
        let mut split = data.clone();
        let mut ks = Keystream::new(&key, &nonce);
        for c in split.chunks_mut(sizes[0]) { ks.apply(c); }
        let mut m = LayerMac::new(&key);
        for c in split.chunks(sizes[sizes.len() - 1]) { m.update(c); }
        prop_assert_eq!(&split, &want_ct);
        prop_assert_eq!(ks.len(), data.len() as u64);
        prop_assert_eq!(m.finish().0, want_mac);
        let mut m = LayerMac::new(&key);
        m.update(&want_ct);
        prop_assert!(m.verify(&ExpectedMac::from_slice(&want_mac).unwrap()).is_ok());
    }

    #[test]
    fn any_flipped_ciphertext_bit_fails(
        data in proptest::collection::vec(any::<u8>(), 1..20_000),
        pos in any::<proptest::sample::Index>(), bit in 0u8..8,
        k in any::<[u8; 32]>(), n in any::<[u8; 16]>(),
    ) {
        let (key, nonce) = key_nonce(k, n);
        let mut ct = data.clone();
        let mac = encrypt_in_place(&key, &nonce, &mut ct);
        let i = pos.index(ct.len());
        ct[i] ^= 1 << bit;
        let mut copy = ct.clone();
        prop_assert!(matches!(decrypt_in_place(&key, &nonce, mac.as_bytes(), &mut copy), Err(Error::AuthenticationFailed)));
        let mut r = DecryptReader::new(&ct[..], &key, &nonce, mac.as_bytes()).unwrap();
        let mut out = Vec::new();
        let err = r.read_to_end(&mut out).unwrap_err();
        prop_assert!(matches!(crate_error(&err), Some(Error::AuthenticationFailed)));
        // Sticky.
        prop_assert!(r.read(&mut [0u8; 4]).is_err());
        prop_assert!(matches!(
            cipher::parallel::decrypt(&ct[..], Vec::new(), &key, &nonce, &ExpectedMac::from_slice(mac.as_bytes()).unwrap()),
            Err(Error::AuthenticationFailed)
        ));
        let mut m = LayerMac::new(&key);
        m.update(&ct);
        prop_assert!(matches!(m.verify(&ExpectedMac::from_slice(mac.as_bytes()).unwrap()), Err(Error::AuthenticationFailed)));
    }

    #[test]
    fn any_changed_hmac_or_truncation_fails(
        data in proptest::collection::vec(any::<u8>(), 1..5000),
        pos in 0usize..32, bit in 0u8..8, cut in any::<proptest::sample::Index>(),
        k in any::<[u8; 32]>(), n in any::<[u8; 16]>(),
    ) {
        let (key, nonce) = key_nonce(k, n);
        let mut ct = data.clone();
        let mac = encrypt_in_place(&key, &nonce, &mut ct);
        let mut bad = mac.0;
        bad[pos] ^= 1 << bit;
        let mut copy = ct.clone();
        prop_assert!(matches!(decrypt_in_place(&key, &nonce, &bad, &mut copy), Err(Error::AuthenticationFailed)));
        let short = &ct[..cut.index(ct.len())];
        let mut d = LayerDecryptor::new(&key, &nonce, mac.as_bytes()).unwrap();
        let mut s = short.to_vec();
        d.update(&mut s);
        prop_assert!(matches!(d.verify(), Err(Error::AuthenticationFailed)));
        prop_assert!(matches!(
            cipher::parallel::decrypt(short, Vec::new(), &key, &nonce, &ExpectedMac::from_slice(mac.as_bytes()).unwrap()),
            Err(Error::AuthenticationFailed)
        ));
        prop_assert!(matches!(
            cipher::parallel::decrypt(&ct[..], Vec::new(), &key, &nonce, &ExpectedMac::from_slice(&bad).unwrap()),
            Err(Error::AuthenticationFailed)
        ));
    }
}

#[test]
fn decrypt_to_path_publishes_only_verified_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let key = LayerKey::generate();
    let nonce = Nonce::generate();
    let data = vec![0x42u8; 300_000];
    let mut ct = data.clone();
    let mac = encrypt_in_place(&key, &nonce, &mut ct);
    let dest = dir.path().join("layer.tar");

    let mut bad = ct.clone();
    *bad.last_mut().unwrap() ^= 1;
    let e = cipher::io::decrypt_to_path(&bad[..], &key, &nonce, mac.as_bytes(), &dest).unwrap_err();
    assert!(matches!(e, Error::AuthenticationFailed), "{e:?}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing left behind"
    );

    // An existing file at the destination survives a failed decrypt.
    std::fs::write(&dest, b"old").unwrap();
    assert!(cipher::io::decrypt_to_path(&bad[..], &key, &nonce, mac.as_bytes(), &dest).is_err());
    assert_eq!(std::fs::read(&dest).unwrap(), b"old");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

    let n = cipher::io::decrypt_to_path(&ct[..], &key, &nonce, mac.as_bytes(), &dest).unwrap();
    assert_eq!(n, data.len() as u64);
    assert_eq!(std::fs::read(&dest).unwrap(), data);
}

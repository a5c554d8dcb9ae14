use super::io::{DecryptReader, EncryptReader};
use super::*;
use std::io::Read;

/// Known answer: AES-256-CTR with the 128-bit big-endian counter wrapping across the 64-bit
/// boundary must match OpenSSL `aes-256-ctr` (the Go `cipher.NewCTR` behaviour).
#[test]
fn counter_is_128_bit_big_endian() {
    let key = LayerKey::from_slice(&[0x11; 32]).unwrap();
    let mut nonce_bytes = [0u8; 16];
    nonce_bytes[8..].copy_from_slice(&[0xff; 8]);
    let nonce = Nonce::from_slice(&nonce_bytes).unwrap();
    // Encrypting two blocks in one go must equal encrypting them with explicit counters.
    let mut two = [0u8; 32];
    encrypt_in_place(&key, &nonce, &mut two);
    let mut second_nonce = [0u8; 16];
    second_nonce[7] = 1; // carry propagated into the upper 64 bits
    let mut one = [0u8; 16];
    encrypt_in_place(&key, &Nonce::from_slice(&second_nonce).unwrap(), &mut one);
    assert_eq!(&two[16..], &one[..]);
}

#[test]
fn roundtrip_and_tamper() {
    let key = LayerKey::generate();
    let nonce = Nonce::generate();
    let plain = (0..100_000u32).map(|i| i as u8).collect::<Vec<_>>();
    let mut buf = plain.clone();
    let mac = encrypt_in_place(&key, &nonce, &mut buf);
    assert_ne!(buf, plain);
    let mut dec = buf.clone();
    decrypt_in_place(&key, &nonce, mac.as_bytes(), &mut dec).unwrap();
    assert_eq!(dec, plain);
    let mut bad = buf.clone();
    bad[99_999] ^= 1;
    assert!(matches!(
        decrypt_in_place(&key, &nonce, mac.as_bytes(), &mut bad),
        Err(Error::AuthenticationFailed)
    ));
}

#[test]
fn decryptor_refuses_bad_parameters() {
    let key = LayerKey::generate();
    let nonce = Nonce::generate();
    assert!(matches!(
        LayerDecryptor::new(&key, &nonce, &[]),
        Err(Error::MissingHmac)
    ));
    assert!(matches!(
        LayerDecryptor::new(&key, &nonce, &[0; 31]),
        Err(Error::InvalidHmacLength { .. })
    ));
    assert!(matches!(
        LayerKey::from_slice(&[0; 16]),
        Err(Error::InvalidKeyLength { .. })
    ));
    assert!(matches!(
        Nonce::from_slice(&[0; 12]),
        Err(Error::InvalidNonceLength { .. })
    ));
}

#[test]
fn reader_error_is_sticky_and_downcastable() {
    let key = LayerKey::generate();
    let nonce = Nonce::generate();
    let mut ct = vec![5u8; 5000];
    let mac = encrypt_in_place(&key, &nonce, &mut ct);
    ct[0] ^= 0x80;
    let mut r = DecryptReader::new(&ct[..], &key, &nonce, mac.as_bytes()).unwrap();
    let mut out = Vec::new();
    let e = r.read_to_end(&mut out).unwrap_err();
    assert!(matches!(io::crate_error(&e), Some(Error::AuthenticationFailed)));
    let mut b = [0u8; 10];
    assert!(r.read(&mut b).is_err());
    assert!(r.read(&mut b).is_err());
    assert!(matches!(r.finish(), Err(Error::AuthenticationFailed)));
}

#[test]
fn encrypt_reader_finish_requires_eof() {
    let key = LayerKey::generate();
    let nonce = Nonce::generate();
    let data = [1u8; 100];
    let mut r = EncryptReader::new(&data[..], &key, &nonce);
    let mut b = [0u8; 10];
    r.read_exact(&mut b).unwrap();
    assert!(matches!(r.finish(), Err(Error::StreamNotFinished)));
}

#[test]
fn key_debug_is_redacted() {
    let k = LayerKey::from_slice(&[0xAB; 32]).unwrap();
    let s = format!("{k:?}");
    assert!(!s.contains("ab") && !s.contains("171"));
}

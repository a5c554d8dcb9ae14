//! The layer cipher on two threads: AES-256-CTR on one, HMAC-SHA256 on the other.
//!
//! One thread running [`LayerEncryptor`](super::LayerEncryptor) does both halves back to back,
//! so its throughput is `1 / (1/AES + 1/SHA-256)`. Here the halves run side by side, and the
//! caller's thread only reads; they hand owned buffers along bounded channels, so the slower half
//! alone (SHA-256) bounds the throughput, on any machine with two cores:
//!
//! ```text
//!  encrypt:  read (caller's thread) ──► CTR ──► HMAC + write
//!  decrypt:  read (caller's thread) ──► HMAC ──► CTR + write
//!                 ▲                                  │
//!                 └──────── empty buffers ◄──────────┘
//! ```
//!
//! Memory is bounded: at most `2 × DEPTH + 3` buffers of [`CHUNK`] bytes per call.
//!
//! # ⚠️ Unauthenticated output
//! [`decrypt`] writes plaintext before the MAC can be checked (it covers the whole layer). The
//! writer must not publish it before `decrypt` returned `Ok`: write to a temporary file and
//! rename it (as [`decrypt_to_path`](super::io::decrypt_to_path) does), or hold the output back.

use std::io::{self, Read, Write};
use std::sync::mpsc;

use super::{ExpectedMac, Keystream, LayerKey, LayerMac, MacTag, Nonce};
use crate::Error;

/// Size of the buffers handed between the threads.
pub const CHUNK: usize = 256 * 1024;
/// Buffers waiting between two threads.
const DEPTH: usize = 2;

enum Msg {
    Data(Vec<u8>),
    End,
}

/// Encrypts everything `src` yields into `dst`, CTR and HMAC on two threads. Returns `dst`
/// (flushed), the number of bytes and the MAC over the ciphertext.
///
/// # Errors
/// The first I/O error of `src` (reported in preference) or of `dst`. `dst` then holds a
/// prefix of the ciphertext.
pub fn encrypt<R: Read, W: Write + Send>(
    src: R,
    dst: W,
    key: &LayerKey,
    nonce: &Nonce,
) -> io::Result<(W, u64, MacTag)> {
    let mut ks = Keystream::new(key, nonce);
    let mut mac = LayerMac::new(key);
    let (dst, n) = two_stages(src, dst, |b| ks.apply(b), |b| mac.update(b))?;
    Ok((dst, n, mac.finish()))
}

/// Decrypts everything `src` yields into `dst`, HMAC and CTR on two threads, then checks the
/// MAC against `expected` (validated by the caller, so that a malformed tag fails before any
/// output exists). Returns `dst` (flushed) and the number of bytes. See the module's warning:
/// what `dst` received is authenticated only once this returned `Ok`.
///
/// # Errors
/// [`Error::Io`] for I/O errors of either side, [`Error::AuthenticationFailed`] when the MAC
/// does not match.
pub fn decrypt<R: Read, W: Write + Send>(
    src: R,
    dst: W,
    key: &LayerKey,
    nonce: &Nonce,
    expected: &ExpectedMac,
) -> Result<(W, u64), Error> {
    let mut mac = LayerMac::new(key);
    let mut ks = Keystream::new(key, nonce);
    let (dst, n) = two_stages(src, dst, |b| mac.update(b), |b| ks.apply(b)).map_err(Error::Io)?;
    mac.verify(expected)?;
    Ok((dst, n))
}

/// Reads `src` in [`CHUNK`]s on the caller's thread, applies `first` on one scoped thread and
/// `second` then the write on another. Reading has its own thread so that the copy out of `src`
/// does not slow down whichever half is the slower one (SHA-256).
fn two_stages<R: Read, W: Write + Send>(
    mut src: R,
    mut dst: W,
    mut first: impl FnMut(&mut [u8]) + Send,
    mut second: impl FnMut(&mut [u8]) + Send,
) -> io::Result<(W, u64)> {
    let (read_tx, read_rx) = mpsc::sync_channel::<Msg>(DEPTH);
    let (mid_tx, mid_rx) = mpsc::sync_channel::<Msg>(DEPTH);
    let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
    for _ in 0..2 * DEPTH + 3 {
        // Allocated on first use.
        empty_tx.send(Vec::new()).expect("receiver is alive");
    }
    std::thread::scope(|s| {
        s.spawn(move || {
            // Ends without an end marker when the reader stopped early (its error is reported)
            // or the writer is gone (its error is reported).
            while let Ok(msg) = read_rx.recv() {
                let msg = match msg {
                    Msg::Data(mut buf) => {
                        first(&mut buf);
                        Msg::Data(buf)
                    }
                    Msg::End => Msg::End,
                };
                if mid_tx.send(msg).is_err() {
                    return;
                }
            }
        });
        let writer = s.spawn(move || -> io::Result<W> {
            while let Ok(msg) = mid_rx.recv() {
                match msg {
                    Msg::Data(mut buf) => {
                        second(&mut buf);
                        dst.write_all(&buf)?;
                        // The reader may have stopped already; then the buffer is simply freed.
                        let _ = empty_tx.send(buf);
                    }
                    Msg::End => {
                        dst.flush()?;
                        return Ok(dst);
                    }
                }
            }
            // The reading side stopped without an end marker: its error is what the caller sees.
            Err(io::Error::other("the layer cipher's reading side stopped"))
        });
        let mut total = 0u64;
        let read = (|| -> io::Result<()> {
            // `recv` fails only once the writer is gone (it holds the only sender).
            while let Ok(mut buf) = empty_rx.recv() {
                buf.resize(CHUNK, 0);
                let n = read_full(&mut src, &mut buf)?;
                if n == 0 {
                    break;
                }
                buf.truncate(n);
                total += n as u64;
                if read_tx.send(Msg::Data(buf)).is_err() {
                    // The writer failed; its error is reported below.
                    return Ok(());
                }
            }
            let _ = read_tx.send(Msg::End);
            Ok(())
        })();
        drop(read_tx);
        let written = writer
            .join()
            .map_err(|_| io::Error::other("the layer cipher's writer thread panicked"))?;
        read?;
        Ok((written?, total))
    })
}

/// Fills `buf` from `src` until it is full or `src` ends; returns the bytes read.
fn read_full<R: Read>(src: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match src.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cipher::{decrypt_in_place, encrypt_in_place};

    fn checked(bytes: &[u8]) -> ExpectedMac {
        ExpectedMac::from_slice(bytes).expect("a 32-byte tag")
    }

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 + i / 253) as u8).collect()
    }

    /// Returns at most `step` bytes per read, to exercise `read_full`.
    struct Trickle<'a>(&'a [u8], usize);
    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.0.len().min(buf.len()).min(self.1);
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn agrees_with_the_single_threaded_cipher_at_chunk_boundaries() {
        let key = LayerKey::from_slice(&[7; 32]).unwrap();
        let nonce = Nonce::from_slice(&[9; 16]).unwrap();
        for n in [0, 1, 15, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17, 8 * CHUNK] {
            let plain = data(n);
            let mut expected = plain.clone();
            let tag = encrypt_in_place(&key, &nonce, &mut expected);
            let (ct, len, mac) = encrypt(Trickle(&plain, 100_003), Vec::new(), &key, &nonce).unwrap();
            assert_eq!(len, n as u64);
            assert_eq!(ct, expected, "ciphertext at {n} bytes");
            assert_eq!(mac, tag, "tag at {n} bytes");
            let (back, len) = decrypt(&ct[..], Vec::new(), &key, &nonce, &checked(mac.as_bytes())).unwrap();
            assert_eq!(len, n as u64);
            assert_eq!(back, plain, "plaintext at {n} bytes");
            let mut again = ct.clone();
            decrypt_in_place(&key, &nonce, mac.as_bytes(), &mut again).unwrap();
            assert_eq!(again, plain);
        }
    }

    #[test]
    fn a_flipped_bit_or_a_wrong_tag_fails_verification() {
        let key = LayerKey::from_slice(&[1; 32]).unwrap();
        let nonce = Nonce::from_slice(&[2; 16]).unwrap();
        let (mut ct, _, mac) = encrypt(&data(CHUNK * 2 + 5)[..], Vec::new(), &key, &nonce).unwrap();
        let mut bad_tag = *mac.as_bytes();
        bad_tag[31] ^= 1;
        assert!(matches!(
            decrypt(&ct[..], Vec::new(), &key, &nonce, &checked(&bad_tag)),
            Err(Error::AuthenticationFailed)
        ));
        ct[CHUNK + 3] ^= 0x40;
        assert!(matches!(
            decrypt(&ct[..], Vec::new(), &key, &nonce, &checked(mac.as_bytes())),
            Err(Error::AuthenticationFailed)
        ));
        assert!(matches!(ExpectedMac::from_slice(&[]), Err(Error::MissingHmac)));
        assert!(matches!(
            ExpectedMac::from_slice(&[0; 31]),
            Err(Error::InvalidHmacLength { .. })
        ));
    }

    #[derive(Debug)]
    struct FailAfter(usize);
    impl Read for FailAfter {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0 == 0 {
                return Err(io::Error::new(io::ErrorKind::ConnectionReset, "source broke"));
            }
            let n = self.0.min(buf.len());
            buf[..n].fill(3);
            self.0 -= n;
            Ok(n)
        }
    }
    impl Write for FailAfter {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.0 == 0 {
                return Err(io::Error::new(io::ErrorKind::StorageFull, "sink full"));
            }
            let n = self.0.min(buf.len());
            self.0 -= n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn errors_of_either_side_are_reported_and_nothing_hangs() {
        let key = LayerKey::from_slice(&[1; 32]).unwrap();
        let nonce = Nonce::from_slice(&[2; 16]).unwrap();
        let e = encrypt(FailAfter(3 * CHUNK + 1), Vec::new(), &key, &nonce).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
        let e = encrypt(&data(10 * CHUNK)[..], FailAfter(CHUNK + 9), &key, &nonce).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::StorageFull);
        let zero = checked(&[0u8; 32]);
        match decrypt(FailAfter(CHUNK / 2), Vec::new(), &key, &nonce, &zero) {
            Err(Error::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
            other => panic!("expected the source's error, got {other:?}"),
        }
        match decrypt(&data(10 * CHUNK)[..], FailAfter(5), &key, &nonce, &zero) {
            Err(Error::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::StorageFull),
            other => panic!("expected the sink's error, got {other:?}"),
        }
    }
}

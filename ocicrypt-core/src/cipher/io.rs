//! `std::io` adapters over the sans-I/O layer cipher.
//!
//! Errors from the cipher cross `Read`/`Write` as `io::Error` of kind `InvalidData` wrapping a
//! [`crate::Error`], so callers can `downcast` them. After an authentication failure a
//! [`DecryptReader`] keeps failing on every later read.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

use super::{ExpectedMac, LayerDecryptor, LayerEncryptor, LayerKey, MacTag, Nonce};
use crate::Error;

/// Turns a crate error into an `io::Error` that can be downcast back.
pub(crate) fn to_io(e: Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// The crate error inside an `io::Error`, if it carries one.
pub fn crate_error(e: &io::Error) -> Option<&Error> {
    e.get_ref().and_then(|inner| inner.downcast_ref::<Error>())
}

/// A `Read` that yields the ciphertext of everything read from `inner`.
pub struct EncryptReader<R> {
    inner: R,
    enc: LayerEncryptor,
    eof: bool,
}

impl<R: Read> EncryptReader<R> {
    /// Encrypts what `inner` yields with `key` and `nonce`.
    pub fn new(inner: R, key: &LayerKey, nonce: &Nonce) -> Self {
        Self {
            inner,
            enc: LayerEncryptor::new(key, nonce),
            eof: false,
        }
    }

    /// Bytes encrypted so far.
    pub fn bytes(&self) -> u64 {
        self.enc.len()
    }

    /// Returns the inner reader and the MAC once the stream has been read to the end.
    ///
    /// # Errors
    /// [`Error::StreamNotFinished`] when the reader has not returned end-of-file yet.
    pub fn finish(self) -> Result<(R, MacTag), Error> {
        if !self.eof {
            return Err(Error::StreamNotFinished);
        }
        Ok((self.inner, self.enc.finish()))
    }
}

impl<R: Read> Read for EncryptReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        if n == 0 {
            self.eof = true;
        }
        self.enc.update(&mut buf[..n]);
        Ok(n)
    }
}

/// A `Read` that yields the plaintext of the ciphertext read from `inner`, and fails with
/// `InvalidData` instead of returning end-of-file when the MAC does not match.
///
/// ⚠️ Bytes returned before the end are unauthenticated; see [`decrypt_to_path`].
pub struct DecryptReader<R> {
    inner: R,
    dec: Option<LayerDecryptor>,
    state: DecState,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum DecState {
    Streaming,
    Verified,
    Failed,
}

impl<R: Read> DecryptReader<R> {
    /// Decrypts what `inner` yields.
    ///
    /// # Errors
    /// As [`LayerDecryptor::new`].
    pub fn new(inner: R, key: &LayerKey, nonce: &Nonce, expected_mac: &[u8]) -> Result<Self, Error> {
        Ok(Self {
            inner,
            dec: Some(LayerDecryptor::new(key, nonce, expected_mac)?),
            state: DecState::Streaming,
        })
    }

    /// Whether the stream was read to the end and the MAC verified.
    pub fn is_verified(&self) -> bool {
        self.state == DecState::Verified
    }

    /// Returns the inner reader once the MAC has been verified.
    ///
    /// # Errors
    /// [`Error::StreamNotFinished`] before end-of-file, [`Error::AuthenticationFailed`] after a
    /// failed verification.
    pub fn finish(self) -> Result<R, Error> {
        match self.state {
            DecState::Verified => Ok(self.inner),
            DecState::Failed => Err(Error::AuthenticationFailed),
            DecState::Streaming => Err(Error::StreamNotFinished),
        }
    }
}

impl<R: Read> Read for DecryptReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.state {
            DecState::Failed => return Err(to_io(Error::AuthenticationFailed)),
            DecState::Verified => return Ok(0),
            DecState::Streaming => {}
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        let dec = self.dec.as_mut().expect("decryptor present while streaming");
        if n > 0 {
            dec.update(&mut buf[..n]);
            return Ok(n);
        }
        let dec = self.dec.take().expect("decryptor present while streaming");
        match dec.verify() {
            Ok(()) => {
                self.state = DecState::Verified;
                Ok(0)
            }
            Err(e) => {
                self.state = DecState::Failed;
                Err(to_io(e))
            }
        }
    }
}

/// A `Write` that encrypts everything written to it into `inner`.
pub struct EncryptWriter<W: Write> {
    inner: W,
    enc: LayerEncryptor,
    buf: Vec<u8>,
}

impl<W: Write> EncryptWriter<W> {
    /// Encrypts into `inner`.
    pub fn new(inner: W, key: &LayerKey, nonce: &Nonce) -> Self {
        Self {
            inner,
            enc: LayerEncryptor::new(key, nonce),
            buf: Vec::new(),
        }
    }

    /// Flushes `inner` and returns it with the MAC.
    ///
    /// # Errors
    /// I/O errors from flushing `inner`.
    pub fn finish(mut self) -> io::Result<(W, MacTag)> {
        self.inner.flush()?;
        Ok((self.inner, self.enc.finish()))
    }
}

impl<W: Write> Write for EncryptWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(1 << 20);
        self.buf.clear();
        self.buf.extend_from_slice(&data[..n]);
        self.enc.update(&mut self.buf);
        // The cipher state has advanced by n bytes: they must all reach `inner`.
        self.inner.write_all(&self.buf)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A `Write` that decrypts everything written to it into `inner`; [`finish`](Self::finish)
/// verifies the MAC. ⚠️ `inner` receives unauthenticated plaintext.
pub struct DecryptWriter<W: Write> {
    inner: W,
    dec: LayerDecryptor,
    buf: Vec<u8>,
}

impl<W: Write> DecryptWriter<W> {
    /// Decrypts into `inner`.
    ///
    /// # Errors
    /// As [`LayerDecryptor::new`].
    pub fn new(inner: W, key: &LayerKey, nonce: &Nonce, expected_mac: &[u8]) -> Result<Self, Error> {
        Ok(Self {
            inner,
            dec: LayerDecryptor::new(key, nonce, expected_mac)?,
            buf: Vec::new(),
        })
    }

    /// Flushes `inner`, verifies the MAC and returns `inner`.
    ///
    /// # Errors
    /// I/O errors, or `InvalidData` wrapping [`Error::AuthenticationFailed`].
    pub fn finish(mut self) -> io::Result<W> {
        self.inner.flush()?;
        self.dec.verify().map_err(to_io)?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for DecryptWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(1 << 20);
        self.buf.clear();
        self.buf.extend_from_slice(&data[..n]);
        self.dec.update(&mut self.buf);
        self.inner.write_all(&self.buf)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Decrypts `ciphertext` into `dest` safely: the plaintext goes to a temporary file beside
/// `dest`, is synced, and is renamed into place only after the MAC has been verified. On any
/// failure nothing is left at `dest` (an existing file there is untouched) and the temporary
/// file is removed. Returns the number of plaintext bytes.
///
/// # Errors
/// [`Error::AuthenticationFailed`] when the MAC does not match, [`Error::Io`] otherwise.
pub fn decrypt_to_path<R: Read>(
    ciphertext: R,
    key: &LayerKey,
    nonce: &Nonce,
    expected_mac: &[u8],
    dest: &Path,
) -> Result<u64, Error> {
    // A missing or malformed tag fails here, before a temporary file exists. CTR and HMAC run
    // on two threads; the file is renamed into place only after the MAC verified.
    let expected = ExpectedMac::from_slice(expected_mac)?;
    crate::fsutil::write_atomic(dest, |file: &mut File| {
        super::parallel::decrypt(ciphertext, file, key, nonce, &expected).map(|(_, n)| n)
    })
}

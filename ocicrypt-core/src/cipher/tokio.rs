//! tokio `AsyncRead` adapters over the layer cipher (feature `tokio`).
//!
//! Same contract as the [`io`](super::io) adapters: a decrypting reader reports a MAC mismatch as
//! an `InvalidData` error in place of end-of-file, and keeps failing afterwards.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use ::tokio::io::{AsyncRead, ReadBuf};

use super::io::to_io;
use super::{LayerDecryptor, LayerEncryptor, LayerKey, MacTag, Nonce};
use crate::Error;

/// An `AsyncRead` yielding the ciphertext of `inner`.
pub struct EncryptReader<R> {
    inner: R,
    enc: LayerEncryptor,
    eof: bool,
}

impl<R: AsyncRead + Unpin> EncryptReader<R> {
    /// Encrypts what `inner` yields.
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
    /// [`Error::StreamNotFinished`] before end-of-file.
    pub fn finish(self) -> Result<(R, MacTag), Error> {
        if !self.eof {
            return Err(Error::StreamNotFinished);
        }
        Ok((self.inner, self.enc.finish()))
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for EncryptReader<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let filled = buf.filled_mut();
                if filled.len() == before {
                    this.eof = true;
                }
                this.enc.update(&mut filled[before..]);
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

/// An `AsyncRead` yielding the plaintext of `inner`, failing with `InvalidData` in place of
/// end-of-file when the MAC does not match. ⚠️ Bytes before the end are unauthenticated.
pub struct DecryptReader<R> {
    inner: R,
    dec: Option<LayerDecryptor>,
    failed: bool,
}

impl<R: AsyncRead + Unpin> DecryptReader<R> {
    /// Decrypts what `inner` yields.
    ///
    /// # Errors
    /// As [`LayerDecryptor::new`].
    pub fn new(inner: R, key: &LayerKey, nonce: &Nonce, expected_mac: &[u8]) -> Result<Self, Error> {
        Ok(Self {
            inner,
            dec: Some(LayerDecryptor::new(key, nonce, expected_mac)?),
            failed: false,
        })
    }

    /// Whether the stream was read to the end and the MAC verified.
    pub fn is_verified(&self) -> bool {
        self.dec.is_none() && !self.failed
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for DecryptReader<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.failed {
            return Poll::Ready(Err(to_io(Error::AuthenticationFailed)));
        }
        if this.dec.is_none() || buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let filled = buf.filled_mut();
                if filled.len() > before {
                    this.dec.as_mut().expect("present").update(&mut filled[before..]);
                    return Poll::Ready(Ok(()));
                }
                let dec = this.dec.take().expect("present");
                match dec.verify() {
                    Ok(()) => Poll::Ready(Ok(())),
                    Err(e) => {
                        this.failed = true;
                        Poll::Ready(Err(to_io(e)))
                    }
                }
            }
            other => other,
        }
    }
}

//! Digest helpers: sha256 formatting and a verifying stream.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, ReadBuf};

use crate::Error;

/// `sha256:<hex>` of a byte string.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Formats a finished hasher as `sha256:<hex>`.
pub fn format_sha256(h: Sha256) -> String {
    format!("sha256:{}", hex::encode(h.finalize()))
}

/// Checks that `bytes` match `expected` (`sha256:<hex>`) and `size`.
///
/// # Errors
/// [`Error::DigestMismatch`].
pub fn verify_bytes(what: &str, bytes: &[u8], expected: &str, size: u64) -> Result<(), Error> {
    let actual = sha256_digest(bytes);
    if actual != expected || bytes.len() as u64 != size {
        return Err(Error::DigestMismatch {
            what: what.to_owned(),
            expected: format!("{expected} ({size} bytes)"),
            actual: format!("{actual} ({} bytes)", bytes.len()),
        });
    }
    Ok(())
}

/// An `AsyncRead` that hashes what passes through and, at end-of-file, fails with
/// `InvalidData` ([`Error::DigestMismatch`]) unless digest and size match the expected ones.
pub struct VerifyReader<R> {
    inner: R,
    hasher: Option<Sha256>,
    expected: String,
    size: u64,
    seen: u64,
    what: String,
}

impl<R> VerifyReader<R> {
    /// Verifies `inner` against `expected` (`sha256:<hex>`) and `size`; `what` names the blob.
    ///
    /// # Errors
    /// [`Error::Image`] for a digest algorithm other than sha256.
    pub fn new(inner: R, expected: &str, size: u64, what: impl Into<String>) -> Result<Self, Error> {
        let what = what.into();
        if !expected.starts_with("sha256:") {
            return Err(Error::Image(format!(
                "{what}: unsupported digest algorithm in {expected}; only sha256 is supported"
            )));
        }
        Ok(Self {
            inner,
            hasher: Some(Sha256::new()),
            expected: expected.to_owned(),
            size,
            seen: 0,
            what,
        })
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for VerifyReader<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.hasher.is_none() {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let new = &buf.filled()[before..];
                if !new.is_empty() {
                    this.seen += new.len() as u64;
                    if this.seen > this.size {
                        this.hasher = None;
                        return Poll::Ready(Err(crate::cipher::io::to_io(Error::DigestMismatch {
                            what: this.what.clone(),
                            expected: format!("{} ({} bytes)", this.expected, this.size),
                            actual: format!("more than {} bytes", this.size),
                        })));
                    }
                    this.hasher.as_mut().expect("present").update(new);
                    return Poll::Ready(Ok(()));
                }
                let actual = format_sha256(this.hasher.take().expect("present"));
                if actual != this.expected || this.seen != this.size {
                    return Poll::Ready(Err(crate::cipher::io::to_io(Error::DigestMismatch {
                        what: this.what.clone(),
                        expected: format!("{} ({} bytes)", this.expected, this.size),
                        actual: format!("{actual} ({} bytes)", this.seen),
                    })));
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

/// An `AsyncRead` that hashes what passes through, for writers that must name the blob by its
/// digest once it is complete.
pub struct HashingReader<'a> {
    inner: &'a mut (dyn AsyncRead + Send + Unpin),
    hasher: Sha256,
    len: u64,
}

impl<'a> HashingReader<'a> {
    /// Hashes what `inner` yields.
    pub fn new(inner: &'a mut (dyn AsyncRead + Send + Unpin)) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            len: 0,
        }
    }

    /// The digest and length of everything read.
    pub fn finish(self) -> (String, u64) {
        (format_sha256(self.hasher), self.len)
    }
}

impl AsyncRead for HashingReader<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let r = Pin::new(&mut *this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            let new = &buf.filled()[before..];
            this.hasher.update(new);
            this.len += new.len() as u64;
        }
        r
    }
}

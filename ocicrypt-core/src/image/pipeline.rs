//! Pipelining: runs a stage of a streaming chain (hashing, cipher) in its own task, so the
//! stages of one layer (source digest check, CTR + HMAC, destination digest + write) use
//! several cores at once. Buffers are recycled; at most `depth` chunks are in flight, so memory
//! per stage is bounded by `depth × chunk` whatever the layer size.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Chunk size handed between stages.
pub const CHUNK: usize = 256 * 1024;
/// Chunks in flight between two stages.
pub const DEPTH: usize = 4;

/// The reading end of a stage running in its own task.
pub struct Prefetch {
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    back: mpsc::Sender<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
    done: bool,
}

/// Runs `inner` in a spawned task that reads it to the end in `chunk`-sized pieces; returns a
/// reader over what it produced, and a handle that yields `inner` back once it reached
/// end-of-file (or the reader was dropped). An error of `inner` is delivered to the reader in
/// order, after the bytes before it.
pub fn spawn<R>(mut inner: R, chunk: usize, depth: usize) -> (Prefetch, JoinHandle<R>)
where
    R: AsyncRead + Send + Unpin + 'static,
{
    let (tx, rx) = mpsc::channel::<io::Result<Vec<u8>>>(depth);
    let (back, mut back_rx) = mpsc::channel::<Vec<u8>>(depth + 1);
    let handle = tokio::spawn(async move {
        loop {
            let mut buf = back_rx.try_recv().unwrap_or_else(|_| Vec::with_capacity(chunk));
            buf.resize(chunk, 0);
            let mut filled = 0;
            // Fill the chunk (short reads are common) unless the stream ends.
            let res = loop {
                match inner.read(&mut buf[filled..]).await {
                    Ok(0) => break Ok(true),
                    Ok(n) => {
                        filled += n;
                        if filled == buf.len() {
                            break Ok(false);
                        }
                    }
                    Err(e) => break Err(e),
                }
            };
            buf.truncate(filled);
            match res {
                Ok(eof) => {
                    if !buf.is_empty() && tx.send(Ok(buf)).await.is_err() {
                        return inner;
                    }
                    if eof {
                        return inner;
                    }
                }
                Err(e) => {
                    if !buf.is_empty() {
                        let _ = tx.send(Ok(buf)).await;
                    }
                    let _ = tx.send(Err(e)).await;
                    return inner;
                }
            }
        }
    });
    (
        Prefetch {
            rx,
            back,
            cur: Vec::new(),
            pos: 0,
            done: false,
        },
        handle,
    )
}

impl AsyncRead for Prefetch {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.pos < this.cur.len() {
                let n = (this.cur.len() - this.pos).min(buf.remaining());
                buf.put_slice(&this.cur[this.pos..this.pos + n]);
                this.pos += n;
                if this.pos == this.cur.len() {
                    let spent = std::mem::take(&mut this.cur);
                    this.pos = 0;
                    let _ = this.back.try_send(spent);
                }
                return Poll::Ready(Ok(()));
            }
            if this.done {
                return Poll::Ready(Ok(()));
            }
            match this.rx.poll_recv(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    this.cur = chunk;
                    this.pos = 0;
                }
                Poll::Ready(Some(Err(e))) => {
                    this.done = true;
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(None) => {
                    this.done = true;
                    return Poll::Ready(Ok(()));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Failing {
        left: usize,
    }
    impl AsyncRead for Failing {
        fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            if self.left == 0 {
                return Poll::Ready(Err(io::Error::other("boom")));
            }
            let n = self.left.min(buf.remaining()).min(1000);
            buf.put_slice(&vec![7u8; n]);
            self.left -= n;
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn passes_bytes_in_order_and_returns_inner() {
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let (mut p, h) = spawn(io::Cursor::new(data.clone()), 4096, 3);
        let mut out = Vec::new();
        p.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, data);
        let inner = h.await.unwrap();
        assert_eq!(inner.position(), data.len() as u64);
    }

    #[tokio::test]
    async fn delivers_bytes_then_the_error() {
        let (mut p, _h) = spawn(Failing { left: 10_500 }, 4096, 2);
        let mut out = Vec::new();
        let e = p.read_to_end(&mut out).await.unwrap_err();
        assert_eq!(e.to_string(), "boom");
        assert_eq!(out.len(), 10_500);
    }
}

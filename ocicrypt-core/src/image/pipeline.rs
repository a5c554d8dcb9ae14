//! Pipelining: the stages of one layer (source read + digest check, CTR, HMAC, destination
//! digest + write) run on their own threads and hand owned chunks to each other, so one layer
//! uses up to four cores, and no byte is copied between stages.
//!
//! ```text
//!  encrypt:  source ──► CTR (in place) ──► HMAC ──► destination
//!  decrypt:  source ──► HMAC ──► CTR (in place) ──► destination
//!  (source: read + sha256; destination: sha256 + write)
//!      ▲                                               │
//!      └──────────────── buffer pool ◄─────────────────┘
//! ```
//!
//! A chunk stream ([`ChunkReceiver`]) ends with an explicit end marker: a stream whose producer
//! vanished without sending it (a panic, a cancelled task) reads as an error, never as a clean
//! end, so a destination cannot publish a truncated blob. Errors (a digest mismatch at the
//! source, a MAC mismatch) travel in order after the bytes before them. At most `depth` chunks
//! wait between two stages and buffers are recycled through a [`ChunkPool`], so memory per layer
//! is bounded by about `(3 × depth + 4) × chunk` whatever the layer size.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};
use tokio::sync::mpsc;

/// Chunk size handed between stages.
pub const CHUNK: usize = 512 * 1024;
/// Chunks in flight between two stages.
pub const DEPTH: usize = 2;
/// Layers in flight whose buffers [`ChunkPool::standard`] keeps for reuse.
pub const STANDARD_POOL_LAYERS: usize = 4;

/// Recycled chunk buffers shared by the stages of one layer.
#[derive(Clone, Debug)]
pub struct ChunkPool {
    free: Arc<Mutex<Vec<Vec<u8>>>>,
    chunk: usize,
    keep: usize,
}

impl ChunkPool {
    /// A pool handing out buffers of `chunk` bytes capacity, keeping at most `keep` spare ones.
    pub fn new(chunk: usize, keep: usize) -> Self {
        Self {
            free: Arc::new(Mutex::new(Vec::with_capacity(keep))),
            chunk: chunk.max(1),
            keep,
        }
    }

    /// The pool the image operations use: one per process, of [`CHUNK`]-sized buffers, keeping
    /// enough spares for [`STANDARD_POOL_LAYERS`] layers in flight. Sharing it across layers
    /// means a ten-layer image reuses the buffers of the first layers instead of allocating
    /// new ones from other threads' malloc arenas (which keep freed memory resident).
    pub fn standard() -> Self {
        static POOL: std::sync::OnceLock<ChunkPool> = std::sync::OnceLock::new();
        POOL.get_or_init(|| Self::new(CHUNK, STANDARD_POOL_LAYERS * (3 * DEPTH + 4)))
            .clone()
    }

    /// Size of the chunks.
    pub fn chunk_size(&self) -> usize {
        self.chunk
    }

    /// A buffer of exactly one chunk's length, to be read into and truncated. Its contents are
    /// whatever a previous use left (recycled buffers are not zeroed again).
    pub fn get(&self) -> Vec<u8> {
        let spare = self.free.lock().expect("pool lock").pop();
        let mut b = spare.unwrap_or_default();
        b.resize(self.chunk, 0);
        b
    }

    /// Returns a buffer for reuse.
    pub fn put(&self, buf: Vec<u8>) {
        if buf.capacity() < self.chunk {
            return;
        }
        let mut free = self.free.lock().expect("pool lock");
        if free.len() < self.keep {
            free.push(buf);
        }
    }
}

enum Msg {
    Data(Vec<u8>),
    End,
    Err(io::Error),
}

/// The producing end of a chunk stream.
#[derive(Debug)]
pub struct ChunkSender {
    tx: mpsc::Sender<Msg>,
    pool: ChunkPool,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Msg::Data(d) => write!(f, "Data({} bytes)", d.len()),
            Msg::End => f.write_str("End"),
            Msg::Err(e) => write!(f, "Err({e})"),
        }
    }
}

/// The consuming end of a chunk stream: a blob as owned chunks, then a clean end or an error.
#[derive(Debug)]
pub struct ChunkReceiver {
    rx: mpsc::Receiver<Msg>,
    pool: ChunkPool,
    finished: bool,
}

/// A chunk stream of at most `depth` waiting chunks, recycling buffers through `pool`.
pub fn chunk_channel(depth: usize, pool: ChunkPool) -> (ChunkSender, ChunkReceiver) {
    let (tx, rx) = mpsc::channel(depth.max(1));
    (
        ChunkSender {
            tx,
            pool: pool.clone(),
        },
        ChunkReceiver {
            rx,
            pool,
            finished: false,
        },
    )
}

/// The receiving stage is gone: stop producing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

fn truncated() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "a pipeline stage stopped before the end of the stream",
    )
}

impl ChunkSender {
    /// The pool buffers come from.
    pub fn pool(&self) -> &ChunkPool {
        &self.pool
    }

    /// Sends a chunk (empty ones are recycled, not sent).
    ///
    /// # Errors
    /// [`Closed`] when the receiver is gone.
    pub async fn send(&self, chunk: Vec<u8>) -> Result<(), Closed> {
        if chunk.is_empty() {
            self.pool.put(chunk);
            return Ok(());
        }
        self.tx.send(Msg::Data(chunk)).await.map_err(|_| Closed)
    }

    /// As [`send`](Self::send), from a thread outside the async runtime.
    ///
    /// # Errors
    /// [`Closed`] when the receiver is gone.
    pub fn blocking_send(&self, chunk: Vec<u8>) -> Result<(), Closed> {
        if chunk.is_empty() {
            self.pool.put(chunk);
            return Ok(());
        }
        self.tx.blocking_send(Msg::Data(chunk)).map_err(|_| Closed)
    }

    /// Ends the stream cleanly.
    pub async fn finish(self) {
        let _ = self.tx.send(Msg::End).await;
    }

    /// As [`finish`](Self::finish), from a thread outside the async runtime.
    pub fn blocking_finish(self) {
        let _ = self.tx.blocking_send(Msg::End);
    }

    /// Ends the stream with an error.
    pub async fn fail(self, e: io::Error) {
        let _ = self.tx.send(Msg::Err(e)).await;
    }

    /// As [`fail`](Self::fail), from a thread outside the async runtime.
    pub fn blocking_fail(self, e: io::Error) {
        let _ = self.tx.blocking_send(Msg::Err(e));
    }
}

impl ChunkReceiver {
    fn map(&mut self, m: Option<Msg>) -> Option<io::Result<Vec<u8>>> {
        match m {
            Some(Msg::Data(d)) => Some(Ok(d)),
            Some(Msg::End) => {
                self.finished = true;
                None
            }
            Some(Msg::Err(e)) => {
                self.finished = true;
                Some(Err(e))
            }
            None => {
                self.finished = true;
                Some(Err(truncated()))
            }
        }
    }

    /// The next chunk; `None` at the clean end of the stream. A stream whose producer stopped
    /// without ending it yields an `UnexpectedEof` error. After the end or an error, `None`.
    pub async fn recv(&mut self) -> Option<io::Result<Vec<u8>>> {
        if self.finished {
            return None;
        }
        let m = self.rx.recv().await;
        self.map(m)
    }

    /// As [`recv`](Self::recv), from a thread outside the async runtime.
    pub fn blocking_recv(&mut self) -> Option<io::Result<Vec<u8>>> {
        if self.finished {
            return None;
        }
        let m = self.rx.blocking_recv();
        self.map(m)
    }

    fn poll_recv_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Vec<u8>>>> {
        if self.finished {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(m) => Poll::Ready(self.map(m)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Hands a spent buffer back to the pool.
    pub fn recycle(&self, buf: Vec<u8>) {
        self.pool.put(buf);
    }

    /// The pool buffers come from.
    pub fn pool(&self) -> &ChunkPool {
        &self.pool
    }

    /// The stream as an `AsyncRead` (one copy per byte), for destinations that take a reader.
    /// An error in the stream is returned by `poll_read` in order; a clean end reads as
    /// end-of-file.
    pub fn into_reader(self) -> ChunkReader {
        ChunkReader {
            rx: self,
            cur: Vec::new(),
            pos: 0,
        }
    }
}

/// An `AsyncRead` over a [`ChunkReceiver`].
#[derive(Debug)]
pub struct ChunkReader {
    rx: ChunkReceiver,
    cur: Vec<u8>,
    pos: usize,
}

impl AsyncRead for ChunkReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.pos < this.cur.len() {
                let n = (this.cur.len() - this.pos).min(buf.remaining());
                buf.put_slice(&this.cur[this.pos..this.pos + n]);
                this.pos += n;
                if this.pos == this.cur.len() {
                    this.rx.recycle(std::mem::take(&mut this.cur));
                    this.pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            match this.rx.poll_recv_chunk(cx) {
                Poll::Ready(Some(Ok(c))) => {
                    this.cur = c;
                    this.pos = 0;
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Reads `inner` to its end in a spawned task, as a chunk stream of `depth` chunks from `pool`.
/// An error of `inner` ends the stream with that error.
pub fn spawn_chunks<R>(mut inner: R, depth: usize, pool: ChunkPool) -> ChunkReceiver
where
    R: AsyncRead + Send + Unpin + 'static,
{
    let (tx, rx) = chunk_channel(depth, pool);
    tokio::spawn(async move { pump(&mut inner, tx).await });
    rx
}

/// Reads `inner` to its end into `tx`, one full chunk at a time (short reads are merged); the
/// stream ends with [`ChunkSender::finish`], or, after the bytes read before it, with the error
/// of `inner`. Stops early if the receiver is gone.
pub async fn pump<R: AsyncRead + Unpin + ?Sized>(inner: &mut R, tx: ChunkSender) {
    loop {
        let mut buf = tx.pool().get();
        let mut filled = 0;
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
                if tx.send(buf).await.is_err() {
                    return;
                }
                if eof {
                    tx.finish().await;
                    return;
                }
            }
            Err(e) => {
                if tx.send(buf).await.is_ok() {
                    tx.fail(e).await;
                }
                return;
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
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
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
    async fn chunks_pass_in_order_and_end_cleanly() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut rx = spawn_chunks(io::Cursor::new(data.clone()), 2, ChunkPool::new(4096, 4));
        let mut out = Vec::new();
        while let Some(c) = rx.recv().await {
            let c = c.unwrap();
            assert!(c.len() <= 4096);
            out.extend_from_slice(&c);
            rx.recycle(c);
        }
        assert_eq!(out, data);
        assert!(rx.recv().await.is_none(), "stays ended");
    }

    #[tokio::test]
    async fn a_vanished_producer_is_an_error_not_an_end() {
        let (tx, mut rx) = chunk_channel(2, ChunkPool::new(16, 2));
        tx.send(vec![1, 2, 3]).await.unwrap();
        drop(tx); // no end marker
        assert_eq!(rx.recv().await.unwrap().unwrap(), vec![1, 2, 3]);
        let e = rx.recv().await.unwrap().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(rx.recv().await.is_none());

        let (tx, rx) = chunk_channel(2, ChunkPool::new(16, 2));
        tx.send(vec![9; 5]).await.unwrap();
        drop(tx);
        let mut out = Vec::new();
        let e = rx.into_reader().read_to_end(&mut out).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(out, vec![9; 5]);
    }

    #[tokio::test]
    async fn errors_arrive_after_the_bytes_before_them() {
        let mut rx = spawn_chunks(Failing { left: 10_500 }, 2, ChunkPool::new(4096, 4));
        let mut n = 0;
        let e = loop {
            match rx.recv().await {
                Some(Ok(c)) => n += c.len(),
                Some(Err(e)) => break e,
                None => panic!("clean end after a failing reader"),
            }
        };
        assert_eq!(e.to_string(), "boom");
        assert_eq!(n, 10_500);
    }

    #[test]
    fn blocking_ends_work_from_plain_threads() {
        let (tx, mut rx) = chunk_channel(1, ChunkPool::new(8, 1));
        let t = std::thread::spawn(move || {
            for i in 0..10u8 {
                tx.blocking_send(vec![i; 3]).unwrap();
            }
            tx.blocking_send(Vec::new()).unwrap(); // empty chunks are not sent
            tx.blocking_finish();
        });
        let mut got = Vec::new();
        while let Some(c) = rx.blocking_recv() {
            got.push(c.unwrap()[0]);
        }
        t.join().unwrap();
        assert_eq!(got, (0..10).collect::<Vec<_>>());
        let (tx, rx) = chunk_channel(1, ChunkPool::new(8, 1));
        drop(rx);
        assert_eq!(tx.blocking_send(vec![1]), Err(Closed));
    }

    #[test]
    fn pool_recycles_up_to_its_limit() {
        let pool = ChunkPool::new(1024, 1);
        let mut a = pool.get();
        assert_eq!(a.len(), 1024);
        a[0] = 7;
        let ptr = a.as_ptr();
        pool.put(a);
        pool.put(vec![0; 1024]); // over the limit: dropped
        pool.put(Vec::with_capacity(10)); // too small: dropped
        let b = pool.get();
        assert_eq!(b.as_ptr(), ptr);
        assert_eq!(b.len(), 1024);
        assert_eq!(pool.get().len(), 1024);
    }
}

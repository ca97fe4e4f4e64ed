//! The writing half of a [`Connection`](super::Connection): frames batched into few writes.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::Result;
use crate::protocol::frame::{HEADER_LEN, encode_header};

/// Payloads up to this size are copied into the write buffer (one syscall for many frames);
/// larger ones are written from their own buffer with vectored writes, never copied.
///
/// Why 512 bytes (it was 4 KiB): a copy is one more copy of the payload *per connection*. A
/// broadcast queues one shared `Bytes` for every client; copied, each writer's batch held its
/// own copy of up to 256 KiB of broadcasts (`BATCH_BYTES`): 793 MiB of server memory for
/// 1,000 readers of 1 KiB broadcasts, 2.5–4.4 GiB for 10,000. Written by reference, a
/// payload costs its writer one 16-byte `iovec` and one 32-byte `Bytes`, and the kernel
/// copies it from the one shared buffer, warm in cache for the next reader. Below 512 bytes
/// the references weigh as much as the copy (a 64-byte payload and its header in two
/// `iovec`s would be 96 bytes of bookkeeping), so small payloads — the echo and sink paths'
/// 64-byte messages — are still gathered into one buffer and one `write`. The earlier
/// slowdown of by-reference 1 KiB frames (884 k against 1.28 M deliveries/s to 1,000 readers,
/// docs/benchmarks.md) came from the 64 `iovec`s per write, 32 frames: see [`MAX_IOVECS`].
const COPY_THRESHOLD: usize = 512;

/// At most this many buffers go into one vectored write: Linux's limit (`UIO_MAXIOV`), so
/// that a batch of frames written by reference (a header and a payload each: 512 frames of
/// 512 bytes, 256 KiB) goes out in one system call, as a copied batch does.
const MAX_IOVECS: usize = 1024;

/// Writes of at most this many buffers build their `iovec`s in a smaller array (a 16 KiB
/// array would be filled for every write, most of which have a few buffers).
const FEW_IOVECS: usize = 64;

/// A write buffer grown past this is given back when the connection has nothing more to
/// write ([`FrameWriter::release_idle`]); smaller ones are kept for the next batch.
const KEEP_BYTES: usize = 4 * 1024;

/// Writes frames to a byte stream, batching them.
///
/// [`push`](Self::push) only buffers; [`flush`](Self::flush) writes everything pushed so far
/// with as few system calls as it can. Writing one frame per system call is 25–60× slower
/// for small messages (one `write(2)` per 64-byte frame against 64 KiB batches, measured on
/// our 2-core machines), so callers push all they have and flush when there is nothing more
/// to write right now.
#[derive(Debug)]
pub struct FrameWriter<W> {
    io: W,
    max_frame: usize,
    /// Small frames (and the headers of large ones) gathered since the last seal.
    buf: BytesMut,
    /// Sealed buffers waiting to be written, in order.
    chunks: VecDeque<Bytes>,
    /// Bytes in `buf` and `chunks` together.
    pending: usize,
    /// Bytes copied into `buf` since the last complete flush.
    copied: usize,
    /// Bytes the last batch copied: what a released buffer is allocated at when it is needed
    /// again, at once rather than by doublings.
    last_copied: usize,
    /// The largest `buf` has been since it was last released (its allocation, roughly).
    grown: usize,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// Writes tutorial frames of at most `max_frame` bytes to `io`.
    pub fn new(io: W, max_frame: usize) -> Self {
        Self {
            io,
            max_frame,
            buf: BytesMut::new(),
            chunks: VecDeque::new(),
            pending: 0,
            copied: 0,
            last_copied: 0,
            grown: 0,
        }
    }

    /// Adds one frame to the pending output. Fails only for a payload over the maximum.
    #[inline]
    pub fn push(&mut self, payload: Bytes) -> Result<()> {
        self.push_parts(&[], payload)
    }

    /// Adds one frame whose payload is `head` followed by `body`: the small fixed fields of a
    /// typed frame and a body that, when large, is written from its own buffer.
    #[inline]
    pub fn push_parts(&mut self, head: &[u8], payload: Bytes) -> Result<()> {
        let header = encode_header(head.len() + payload.len(), self.max_frame)?;
        self.pending += HEADER_LEN + head.len() + payload.len();
        let copy = payload.len() <= COPY_THRESHOLD;
        let need = HEADER_LEN + head.len() + if copy { payload.len() } else { 0 };
        if self.buf.capacity() - self.buf.len() < need {
            // A released buffer comes back at the last batch's size in one allocation.
            self.buf
                .reserve(need.max(self.last_copied.min(MAX_RESERVE)));
        }
        self.buf.extend_from_slice(&header);
        self.buf.extend_from_slice(head);
        if copy {
            self.buf.extend_from_slice(&payload);
        } else {
            self.seal();
            self.chunks.push_back(payload);
        }
        Ok(())
    }

    /// Moves what `buf` gathered to `chunks`.
    fn seal(&mut self) {
        self.grown = self.grown.max(self.buf.len() + self.buf.capacity());
        self.copied += self.buf.len();
        self.chunks.push_back(self.buf.split().freeze());
    }

    /// Gives back the write buffer's memory if it grew large, when everything is written and
    /// the caller has nothing more to write right now.
    ///
    /// Kept, every connection would hold the largest batch it ever copied (up to 256 KiB)
    /// for as long as it lives: after a burst of broadcasts, clients × 256 KiB however idle
    /// they are again. Released, the buffer's memory follows the connections that are writing
    /// now; a connection under steady traffic reallocates it once per batch at the last
    /// batch's size (`last_copied`), an allocation the allocator serves from the buffer just
    /// freed. An idle connection keeps at most `KEEP_BYTES`.
    pub fn release_idle(&mut self) {
        if !self.buf.is_empty() || !self.chunks.is_empty() {
            return;
        }
        if self.grown > KEEP_BYTES {
            self.buf = BytesMut::new();
            self.grown = 0;
        }
        if self.chunks.capacity() > FEW_IOVECS {
            self.chunks = VecDeque::new();
        }
    }

    /// Bytes pushed but not yet written.
    #[inline]
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Writes every pushed frame, then flushes the stream.
    pub async fn flush(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_flush(cx)).await
    }

    /// [`flush`](Self::flush) by hand, for a caller that polls it among other things: a
    /// future that waits on several things holds no nested future for this one (the write
    /// loop's state is part of every connection's task, idle or not).
    pub fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.buf.is_empty() {
            self.seal();
        }
        if !self.chunks.is_empty() {
            while !self.chunks.is_empty() {
                // The slices are built on the stack at each poll rather than kept between
                // polls: kept, they would be part of every connection's future.
                let n = ready!(if self.chunks.len() <= FEW_IOVECS {
                    poll_write_chunks::<FEW_IOVECS, _>(&mut self.io, &self.chunks, cx)
                } else {
                    poll_write_chunks::<MAX_IOVECS, _>(&mut self.io, &self.chunks, cx)
                })?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pending -= n;
                self.consume(n);
            }
            // The batch is written (a later poll that only finishes the stream's flush is
            // not a batch of its own).
            self.last_copied = std::mem::take(&mut self.copied);
        }
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    /// Drops the first `n` written bytes from `chunks`.
    fn consume(&mut self, mut n: usize) {
        while n > 0 {
            let front = self
                .chunks
                .front_mut()
                .expect("wrote more than was pending");
            if n >= front.len() {
                n -= front.len();
                self.chunks.pop_front();
            } else {
                let _ = front.split_to(n);
                n = 0;
            }
        }
    }

    /// Changes the largest frame written from now on.
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.max_frame = max_frame;
    }

    /// Flushes, then shuts the write direction down (sends FIN).
    pub async fn shutdown(&mut self) -> io::Result<()> {
        self.flush().await?;
        self.io.shutdown().await
    }
}

/// The most a released buffer is allocated at in advance (a batch copies at most about
/// this much: `BATCH_BYTES` in `outbound.rs`).
const MAX_RESERVE: usize = 256 * 1024;

/// One vectored write of the first (at most `N`) chunks.
fn poll_write_chunks<const N: usize, W: AsyncWrite + Unpin>(
    io: &mut W,
    chunks: &VecDeque<Bytes>,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<io::Result<usize>> {
    let mut slices = [IoSlice::new(&[]); N];
    let mut count = 0;
    for (slot, chunk) in slices.iter_mut().zip(chunks.iter()) {
        *slot = IoSlice::new(chunk);
        count += 1;
    }
    std::pin::Pin::new(io).poll_write_vectored(cx, &slices[..count])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The frames of `payloads`, as the wire carries them.
    fn framed(payloads: &[Bytes]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in payloads {
            out.extend_from_slice(&(p.len() as u32).to_le_bytes());
            out.extend_from_slice(p);
        }
        out
    }

    #[tokio::test]
    async fn shared_payloads_are_written_by_reference_and_small_ones_copied() {
        let mut writer = FrameWriter::new(Vec::new(), 1 << 20);
        // A burst of one 1 KiB broadcast, 300 times: more buffers than one small write takes.
        let shared = Bytes::from(vec![7u8; 1024]);
        let burst = vec![shared.clone(); 300];
        for p in &burst {
            writer.push(p.clone()).unwrap();
        }
        // Only the headers were copied; every payload is the one buffer.
        assert_eq!(writer.copied + writer.buf.len(), 300 * HEADER_LEN);
        let payloads = writer.chunks.iter().filter(|c| c.len() == 1024);
        assert!(payloads.map(|c| c.as_ptr()).all(|p| p == shared.as_ptr()));
        writer.flush().await.unwrap();
        assert_eq!(writer.io, framed(&burst));
        assert_eq!(writer.pending(), 0);

        // Small payloads are gathered into the buffer: copied.
        writer.io.clear();
        let small: Vec<Bytes> = (0..1000u32)
            .map(|i| Bytes::from(vec![i as u8; 64]))
            .collect();
        for p in &small {
            writer.push(p.clone()).unwrap();
        }
        assert_eq!(writer.buf.len(), 1000 * (HEADER_LEN + 64));
        writer.flush().await.unwrap();
        assert_eq!(writer.io, framed(&small));
        assert_eq!(writer.last_copied, 1000 * (HEADER_LEN + 64));
    }

    #[tokio::test]
    async fn an_idle_writer_gives_its_buffers_back() {
        let mut writer = FrameWriter::new(Vec::new(), 1 << 20);
        let small: Vec<Bytes> = (0..1000u32)
            .map(|i| Bytes::from(vec![i as u8; 64]))
            .collect();
        for p in &small {
            writer.push(p.clone()).unwrap();
        }
        // Not while frames are pending.
        writer.release_idle();
        assert_eq!(writer.buf.len(), 1000 * (HEADER_LEN + 64));
        writer.flush().await.unwrap();
        writer.release_idle();
        assert_eq!(writer.buf.capacity(), 0);
        // The next batch starts at the last one's size: one allocation, no doublings.
        writer.push(small[0].clone()).unwrap();
        assert!(writer.buf.capacity() >= 1000 * (HEADER_LEN + 64));
        writer.flush().await.unwrap();
        // A small buffer is kept.
        writer.release_idle();
        assert_eq!(writer.grown, 0);
        writer.push(small[0].clone()).unwrap();
        writer.flush().await.unwrap();
        writer.release_idle();
        assert!(writer.grown > 0, "a small buffer is kept");

        // The list of chunks of a large by-reference batch goes too.
        let big = Bytes::from(vec![1u8; 1024]);
        for _ in 0..300 {
            writer.push(big.clone()).unwrap();
        }
        writer.flush().await.unwrap();
        assert!(writer.chunks.capacity() > FEW_IOVECS);
        writer.release_idle();
        assert!(writer.chunks.capacity() <= FEW_IOVECS);
    }
}

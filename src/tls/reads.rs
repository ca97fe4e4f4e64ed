//! Reading TLS streams fast: [`ReadAhead`], large socket reads under rustls, with a buffer
//! only while data flows.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How much one read from the socket asks for at first: four full TLS records (16 KiB of
/// plaintext each, plus headers and tags), as many bytes as a plain connection's reads
/// typically get.
const READ_AHEAD: usize = 64 * 1024;

/// How much a read asks for once the last one filled [`READ_AHEAD`]: a stream that keeps the
/// socket that full is a bulk transfer.
///
/// Measured with `sockframe bench --size 1MiB` over TLS against `serve --discard`, alternated
/// runs (`docs/benchmarks.md`, session 5): 64 KiB reads 1.5-2.3 GB/s, 128 KiB 1.8-2.4,
/// 256 KiB 2.2-2.6, 512 KiB 2.2-2.9; the server's CPU per GB 0.43-0.62 s with 64 KiB reads,
/// 0.34-0.37 s with 512 KiB. The reads themselves are only a little larger on average (65 ->
/// 78 KB); what fell is the server's context switches (29,626 -> 7,409 in 3 s) and its
/// migrations between CPUs (4,635 -> 5): with room for all that has arrived, its task more
/// often finds data and keeps running instead of sleeping and being woken elsewhere.
const BUSY_READ_AHEAD: usize = 512 * 1024;

/// Reads from the stream under a TLS session in large reads, and hands the TLS layer its
/// small ones from memory.
///
/// rustls asks its transport for at most 4 KiB beyond what it holds (never more than about
/// one record), so without this a TLS server receiving 1 MiB messages made about 69
/// `recvfrom` system calls per MiB; with it, at most 16 (up to 64 KiB each, or up to 512 KiB
/// once the stream is found busy), and rustls's reads are copies out
/// of a buffer still in cache. This did not show while the load
/// generator was the bottleneck (its plaintext copy, see [`RECORD_PLAINTEXT`]); once that
/// was fixed, the server's CPU per GB fell by about 10-25 % with it (see `docs/benchmarks.md`).
/// The copy out of this buffer into rustls's is, like rustls's own copies, exposed to the
/// 4K-aliasing slow path described at [`RECORD_PLAINTEXT`]; the distances measured under
/// `sockframe serve` (42, 84 and 126 bytes mod 4096) are outside it.
///
/// [`RECORD_PLAINTEXT`]: super::RECORD_PLAINTEXT
///
/// Written by hand rather than with [`tokio::io::BufReader`], which allocates its buffer up
/// front and keeps it for the stream's life: an idle TLS connection would hold 64 KiB.
/// Here the buffer is allocated when a read finds none, and freed as soon as it is drained
/// and the socket has nothing more (the read would block), so an idle connection holds no
/// buffer at all, a connection trickling messages at most 64 KiB, and only a connection
/// whose last read filled 64 KiB (a bulk transfer) up to 512 KiB. Reads at least as large as
/// the buffer bypass it. Writes pass straight through, vectored writes included.
#[derive(Debug)]
pub struct ReadAhead<S> {
    inner: S,
    /// Bytes read from `inner` and not yet handed out; no capacity while idle.
    buf: BytesMut,
    /// How much the next read from `inner` asks for: [`READ_AHEAD`], or [`BUSY_READ_AHEAD`]
    /// after a read that filled [`READ_AHEAD`].
    room: usize,
}

impl<S> ReadAhead<S> {
    /// Wraps `inner`; no buffer is allocated until the first read.
    pub fn new(inner: S) -> Self {
        ReadAhead {
            inner,
            buf: BytesMut::new(),
            room: READ_AHEAD,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// How many bytes the read buffer holds allocated (0 while idle).
    pub fn buffer_capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// How much the next read from the stream will ask for.
    #[cfg(test)]
    fn next_read(&self) -> usize {
        self.room
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buf.is_empty() {
            if out.remaining() >= this.room {
                // Nothing gained by copying through our buffer.
                this.buf = BytesMut::new();
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            // Takes back the space of the bytes handed out (the buffer is empty and not
            // shared, so nothing moves); allocates exactly `room` when there is no buffer or
            // a smaller one than a busy stream wants (`reserve` would keep the old capacity
            // on top).
            if !this.buf.try_reclaim(this.room) {
                this.buf = BytesMut::with_capacity(this.room);
            }
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.buf) {
                Poll::Pending => {
                    // Drained and nothing more to read: the connection may stay idle for
                    // long, so let the memory go, and start small again.
                    this.buf = BytesMut::new();
                    this.room = READ_AHEAD;
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => {
                    this.buf = BytesMut::new();
                    return Poll::Ready(Err(e));
                }
                // End of stream: `out` stays empty, which tells the caller.
                Poll::Ready(Ok(0)) => {
                    this.buf = BytesMut::new();
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Ok(n)) => {
                    // The socket had at least as much as a small read takes: a bulk transfer,
                    // which larger reads serve better. A shorter read ends it.
                    this.room = if n >= READ_AHEAD {
                        BUSY_READ_AHEAD
                    } else {
                        READ_AHEAD
                    };
                }
            }
        }
        let n = out.remaining().min(this.buf.len());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn small_reads_come_from_one_large_read() {
        let (mut far, near) = tokio::io::duplex(256 * 1024);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        far.write_all(&data).await.unwrap();
        drop(far);
        let mut reader = ReadAhead::new(near);
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = reader.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, data);
        assert_eq!(
            reader.buffer_capacity(),
            0,
            "freed at the end of the stream"
        );
    }

    #[tokio::test]
    async fn reads_grow_while_the_socket_stays_full_and_shrink_when_it_does_not() {
        let (mut far, near) = tokio::io::duplex(4 * BUSY_READ_AHEAD);
        let mut reader = ReadAhead::new(near);
        assert_eq!(reader.next_read(), READ_AHEAD);
        let data: Vec<u8> = (0..3 * BUSY_READ_AHEAD as u32)
            .map(|i| (i % 253) as u8)
            .collect();
        far.write_all(&data).await.unwrap();
        let mut got = vec![0u8; data.len()];
        let mut chunk = [0u8; 4096];
        // The first read fills 64 KiB: the next one asks for 512 KiB.
        let n = reader.read(&mut chunk).await.unwrap();
        got[..n].copy_from_slice(&chunk[..n]);
        assert!(reader.buffer_capacity() <= READ_AHEAD);
        assert_eq!(reader.next_read(), BUSY_READ_AHEAD);
        let mut at = n;
        while at < data.len() {
            let n = reader.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            got[at..at + n].copy_from_slice(&chunk[..n]);
            at += n;
            assert!(reader.buffer_capacity() <= BUSY_READ_AHEAD, "bounded");
        }
        assert_eq!(got, data);
        assert_eq!(reader.next_read(), BUSY_READ_AHEAD, "still busy");
        // Dry: the buffer goes and the next read starts small.
        assert!(reader.read(&mut chunk).now_or_never().is_none());
        assert_eq!(reader.buffer_capacity(), 0);
        assert_eq!(reader.next_read(), READ_AHEAD);

        // Busy again, then a short read: back to small reads.
        far.write_all(&data[..READ_AHEAD]).await.unwrap();
        for _ in 0..READ_AHEAD / chunk.len() {
            reader.read_exact(&mut chunk).await.unwrap();
        }
        assert_eq!(reader.next_read(), BUSY_READ_AHEAD);
        far.write_all(b"small").await.unwrap();
        let mut five = [0u8; 5];
        reader.read_exact(&mut five).await.unwrap();
        assert_eq!(&five, b"small");
        assert_eq!(reader.next_read(), READ_AHEAD);
    }

    #[tokio::test]
    async fn frees_the_buffer_when_the_socket_runs_dry() {
        let (mut far, near) = tokio::io::duplex(1024);
        let mut reader = ReadAhead::new(near);
        assert_eq!(reader.buffer_capacity(), 0);
        far.write_all(b"hello").await.unwrap();
        let mut two = [0u8; 2];
        reader.read_exact(&mut two).await.unwrap();
        assert_eq!(&two, b"he");
        assert!(reader.buffer_capacity() > 0, "holds the rest");
        let mut rest = [0u8; 3];
        reader.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"llo");
        // The next read finds nothing: the buffer goes while it waits.
        let mut one = [0u8; 1];
        assert!(
            reader.read(&mut one).now_or_never().is_none(),
            "nothing to read"
        );
        assert_eq!(reader.buffer_capacity(), 0);
        // Writes pass through.
        reader.write_all(b"back").await.unwrap();
        let mut back = [0u8; 4];
        far.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"back");
    }
}

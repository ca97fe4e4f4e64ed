//! A framed connection: buffered frames in and out over any byte stream.
//!
//! [`Connection`] owns the buffering and is generic over the stream, so plain TCP and
//! (later) TLS share all of this code. It splits into a [`FrameReader`], which hands out each
//! payload as a [`Bytes`] slice of one read buffer, and a [`FrameWriter`], which batches
//! many small frames into one write and sends large payloads without copying them.
//!
//! The server and the client both run a connection through [`drive`], which reads and writes
//! concurrently in a single task and implements the close rules shared by both sides.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use crate::Result;
use crate::codec::TutorialCodec;
use crate::outbox::OutboxReceiver;
use crate::protocol::frame::{HEADER_LEN, encode_header};
use crate::reason::DisconnectReason;

/// Payloads up to this size are copied into the write buffer (one syscall for many frames);
/// larger ones are written from their own buffer with vectored writes, never copied.
const COPY_THRESHOLD: usize = 4 * 1024;

/// Stop gathering queued frames and write once this many bytes are pending.
const BATCH_BYTES: usize = 256 * 1024;

/// At most this many buffers go into one vectored write.
const MAX_IOVECS: usize = 64;

/// Initial capacity of the read buffer.
const READ_BUFFER: usize = 8 * 1024;

/// A byte stream with tutorial framing on it.
#[derive(Debug)]
pub struct Connection<S> {
    stream: S,
    max_frame: usize,
}

impl<S: AsyncRead + AsyncWrite> Connection<S> {
    /// Wraps `stream`; frames longer than `max_frame` are refused in both directions.
    pub fn new(stream: S, max_frame: usize) -> Self {
        Self { stream, max_frame }
    }

    /// Splits into a reading and a writing half that can be used concurrently.
    pub fn split(self) -> (FrameReader<ReadHalf<S>>, FrameWriter<WriteHalf<S>>) {
        let (r, w) = tokio::io::split(self.stream);
        (
            FrameReader::new(r, self.max_frame),
            FrameWriter::new(w, self.max_frame),
        )
    }
}

/// Reads frames from a byte stream.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: FramedRead<R, TutorialCodec>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Reads tutorial frames of at most `max_frame` bytes from `io`.
    pub fn new(io: R, max_frame: usize) -> Self {
        Self {
            inner: FramedRead::with_capacity(
                io,
                TutorialCodec::with_max_frame(max_frame),
                READ_BUFFER,
            ),
        }
    }

    /// The next payload; `Ok(None)` at a clean end of stream (between frames).
    ///
    /// Cancel-safe: a partly received frame stays in the buffer for the next call.
    pub async fn read_frame(&mut self) -> Result<Option<Bytes>> {
        self.inner.next().await.transpose()
    }
}

/// Writes frames to a byte stream, batching them.
///
/// [`push`](Self::push) only buffers; [`flush`](Self::flush) writes everything pushed so far
/// with as few system calls as it can. Writing one frame per system call is 25–60× slower
/// for small messages (see `docs/benchmarks.md`), so callers push all they have and flush
/// when there is nothing more to write right now.
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
        }
    }

    /// Adds one frame to the pending output. Fails only for a payload over the maximum.
    pub fn push(&mut self, payload: Bytes) -> Result<()> {
        let header = encode_header(payload.len(), self.max_frame)?;
        self.pending += HEADER_LEN + payload.len();
        self.buf.extend_from_slice(&header);
        if payload.len() <= COPY_THRESHOLD {
            self.buf.extend_from_slice(&payload);
        } else {
            self.chunks.push_back(self.buf.split().freeze());
            self.chunks.push_back(payload);
        }
        Ok(())
    }

    /// Bytes pushed but not yet written.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Writes every pushed frame, then flushes the stream.
    pub async fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.chunks.push_back(self.buf.split().freeze());
        }
        while !self.chunks.is_empty() {
            let n = {
                let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
                let mut count = 0;
                for (slot, chunk) in slices.iter_mut().zip(self.chunks.iter()) {
                    *slot = IoSlice::new(chunk);
                    count += 1;
                }
                self.io.write_vectored(&slices[..count]).await?
            };
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.pending -= n;
            self.consume(n);
        }
        self.io.flush().await
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

    /// Flushes, then shuts the write direction down (sends FIN).
    pub async fn shutdown(&mut self) -> io::Result<()> {
        self.flush().await?;
        self.io.shutdown().await
    }
}

/// Message and byte counters of one connection, updated as frames pass.
#[derive(Debug, Default)]
pub(crate) struct Traffic {
    pub(crate) messages_in: AtomicU64,
    pub(crate) bytes_in: AtomicU64,
    pub(crate) messages_out: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
}

impl Traffic {
    fn add_in(&self, len: usize) {
        self.messages_in.fetch_add(1, Ordering::Relaxed);
        self.bytes_in.fetch_add(len as u64, Ordering::Relaxed);
    }

    fn add_out(&self, len: usize) {
        self.messages_out.fetch_add(1, Ordering::Relaxed);
        self.bytes_out.fetch_add(len as u64, Ordering::Relaxed);
    }
}

/// How a connection is closed once its close token fires.
#[derive(Debug, Clone)]
pub(crate) struct CloseOrder {
    /// The reason reported for the disconnect.
    pub(crate) reason: DisconnectReason,
    /// Deliver what is queued and wait for the peer's end of stream (bounded by the drain
    /// deadline), or drop the connection at once.
    pub(crate) graceful: bool,
}

/// What [`drive`] needs besides the stream.
pub(crate) struct Drive<'a, E, F, C> {
    pub(crate) max_frame: usize,
    pub(crate) outbox: &'a mut OutboxReceiver,
    pub(crate) events: &'a mpsc::Sender<E>,
    /// Wraps a received payload into the application's event type.
    pub(crate) to_event: F,
    pub(crate) traffic: &'a Traffic,
    /// Fired to close the connection; `close_order` then says how and why.
    pub(crate) close: &'a CancellationToken,
    pub(crate) close_order: C,
    /// Upper bound on delivering the queue and waiting for the peer after a graceful close.
    pub(crate) drain_deadline: Duration,
}

/// How a connection run by [`drive`] ended.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// Why it ended.
    pub(crate) reason: DisconnectReason,
    /// After a graceful close: whether everything queued was written and the write side shut
    /// down in time. `false` for every other ending.
    pub(crate) flushed: bool,
}

/// Runs one connection until it ends and returns why it ended.
///
/// Reading and writing run concurrently in the calling task (one task per connection, not
/// three). Received payloads go to `events` in order; when `events` is full, reading pauses,
/// so TCP flow control slows the peer instead of memory growing.
pub(crate) async fn drive<S, E, F, C>(stream: S, d: Drive<'_, E, F, C>) -> Outcome
where
    S: AsyncRead + AsyncWrite,
    F: Fn(Bytes) -> E,
    C: Fn() -> CloseOrder,
{
    let (mut reader, mut writer) = Connection::new(stream, d.max_frame).split();
    // A frame read but not yet handed to `events`; kept outside the read future so that
    // dropping that future never loses it.
    let mut held: Option<Bytes> = None;

    let first = {
        let read = read_loop(&mut reader, &mut held, d.events, &d.to_event, d.traffic);
        let write = write_loop(&mut writer, d.outbox, d.close, d.traffic);
        tokio::pin!(read, write);
        tokio::select! {
            reason = &mut read => Ended::Read(reason),
            res = &mut write => Ended::Write(res),
        }
    };

    let ended = |reason| Outcome {
        reason,
        flushed: false,
    };
    match first {
        Ended::Read(reason) => ended(reason),
        Ended::Write(Err(e)) => ended(DisconnectReason::from_io(&e)),
        Ended::Write(Ok(())) => {
            let order = (d.close_order)();
            let mut flushed = false;
            if order.graceful {
                let deadline = Instant::now() + d.drain_deadline;
                let finish = async {
                    // Keep reading while draining, so a peer that is blocked writing to us
                    // can make progress and read what we send.
                    let read = read_loop(&mut reader, &mut held, d.events, &d.to_event, d.traffic);
                    let drain = async {
                        drain(&mut writer, d.outbox, d.traffic).await?;
                        writer.shutdown().await
                    };
                    tokio::pin!(read);
                    tokio::select! {
                        _ = &mut read => return,
                        res = drain => match res {
                            Ok(()) => flushed = true,
                            Err(_) => return,
                        },
                    }
                    // Our side is done; wait for the peer to close theirs so that nothing
                    // we wrote is lost to a reset.
                    read.await;
                };
                let _ = tokio::time::timeout_at(deadline, finish).await;
            }
            Outcome {
                reason: order.reason,
                flushed,
            }
        }
    }
}

enum Ended {
    Read(DisconnectReason),
    Write(io::Result<()>),
}

/// Reads frames and hands them to `events` until the stream ends or breaks.
async fn read_loop<R, E, F>(
    reader: &mut FrameReader<R>,
    held: &mut Option<Bytes>,
    events: &mpsc::Sender<E>,
    to_event: &F,
    traffic: &Traffic,
) -> DisconnectReason
where
    R: AsyncRead + Unpin,
    F: Fn(Bytes) -> E,
{
    loop {
        if held.is_none() {
            match reader.read_frame().await {
                Ok(Some(frame)) => {
                    traffic.add_in(frame.len());
                    *held = Some(frame);
                }
                Ok(None) => return DisconnectReason::ClosedByPeer,
                Err(e) => return DisconnectReason::from_error(&e),
            }
        }
        let Ok(slot) = events.reserve().await else {
            // Nobody listens to events any more: discard, but keep the connection serviced.
            held.take();
            continue;
        };
        if let Some(frame) = held.take() {
            slot.send(to_event(frame));
        }
    }
}

/// Writes queued messages in batches until `close` fires (returns `Ok`) or a write fails.
async fn write_loop<W: AsyncWrite + Unpin>(
    writer: &mut FrameWriter<W>,
    outbox: &mut OutboxReceiver,
    close: &CancellationToken,
    traffic: &Traffic,
) -> io::Result<()> {
    loop {
        let first = tokio::select! {
            biased;
            _ = close.cancelled() => return Ok(()),
            msg = outbox.recv() => msg,
        };
        let Some(first) = first else {
            // Every sender is gone: nothing more will be queued; wait for the close order.
            close.cancelled().await;
            return Ok(());
        };
        push(writer, first, traffic)?;
        // Gather what is queued right now, then write it all at once.
        while writer.pending() < BATCH_BYTES {
            let Some(msg) = outbox.try_recv() else { break };
            push(writer, msg, traffic)?;
        }
        // A close interrupts a flush stuck on a peer that does not read; the frames stay
        // buffered in `writer`, and a graceful close carries on writing them.
        tokio::select! {
            res = writer.flush() => res?,
            _ = close.cancelled() => return Ok(()),
        }
    }
}

/// Writes everything queued right now.
async fn drain<W: AsyncWrite + Unpin>(
    writer: &mut FrameWriter<W>,
    outbox: &mut OutboxReceiver,
    traffic: &Traffic,
) -> io::Result<()> {
    while let Some(msg) = outbox.try_recv() {
        push(writer, msg, traffic)?;
        if writer.pending() >= BATCH_BYTES {
            writer.flush().await?;
        }
    }
    writer.flush().await
}

fn push<W: AsyncWrite + Unpin>(
    writer: &mut FrameWriter<W>,
    msg: Bytes,
    traffic: &Traffic,
) -> io::Result<()> {
    let len = msg.len();
    // Senders check the size first, so this only fails if a caller bypassed them.
    writer
        .push(msg)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    traffic.add_out(len);
    Ok(())
}

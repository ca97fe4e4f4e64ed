//! A framed connection: buffered frames in and out over any byte stream.
//!
//! [`Connection`] owns the buffering and is generic over the stream, so plain TCP and
//! TLS share all of this code. It splits into a [`FrameReader`], which hands out each
//! payload as a [`Bytes`] slice of one read buffer, and a [`FrameWriter`], which batches
//! many small frames into one write and sends large payloads without copying them.
//!
//! The server and the client both run a connection through `drive`, which reads and writes
//! concurrently in a single task and implements what both sides share: the typed frames of
//! the sockframe protocol, heartbeats, the idle timeout, requests, and the close rules.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::codec::{Decoder, FramedRead};
use tokio_util::sync::CancellationToken;

use crate::Result;
use crate::codec::TutorialCodec;
use crate::handler::Handler;
use crate::message::{Message, MessageKind, MessageRef};
use crate::outbox::{FullPolicy, OutboxReceiver, OutboxSender, Weigh};
use crate::outgoing::{FlushWaiter, Outgoing};
use crate::protocol::frame::{HEADER_LEN, check_header, encode_header};
use crate::protocol::message::{self as wire, Frame, Head, close_code};
use crate::reason::DisconnectReason;
use crate::request::{Pending, Request};
use crate::session::{Acks, Retained, Session};

/// Payloads up to this size are copied into the write buffer (one syscall for many frames);
/// larger ones are written from their own buffer with vectored writes, never copied.
const COPY_THRESHOLD: usize = 4 * 1024;

/// Stop gathering queued frames and write once this many bytes are pending.
const BATCH_BYTES: usize = 256 * 1024;

/// At most this many buffers go into one vectored write.
const MAX_IOVECS: usize = 64;

/// Initial capacity of the read buffer: none. The codec takes room once bytes arrive, so an
/// idle connection holds no read buffer.
const READ_BUFFER: usize = 0;

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

    /// Changes the largest frame accepted from now on.
    pub fn set_max_frame(&mut self, max_frame: usize) {
        *self.inner.decoder_mut() = TutorialCodec::with_max_frame(max_frame);
    }

    /// The next frame if it is already complete in the read buffer; never reads.
    pub fn try_frame(&mut self) -> Result<Option<Bytes>> {
        let mut codec = *self.inner.decoder();
        codec.decode(self.inner.read_buffer_mut())
    }

    /// Gives the read buffer's memory back if it holds nothing; the next bytes to arrive
    /// allocate it again. For a connection that may now stay quiet for long, such as one
    /// that has just finished its handshake: 8 KiB of its idle cost otherwise.
    pub(crate) fn release_buffer(&mut self) {
        if self.inner.read_buffer().is_empty() {
            *self.inner.read_buffer_mut() = BytesMut::new();
        }
    }

    /// Calls `f` with the payload of each complete frame in the read buffer, in order, while
    /// it says [`Step::Next`]; returns how many frames it took. The frames taken are
    /// consumed with one move of the buffer's start for all of them, and none is split off
    /// into a `Bytes` of its own. A frame whose header is wrong is left for
    /// [`try_frame`](Self::try_frame) to report.
    pub(crate) fn for_each_frame(&mut self, mut f: impl FnMut(&[u8]) -> Step) -> usize {
        let max = self.inner.decoder().max_frame();
        let buf = self.inner.read_buffer_mut();
        let (mut at, mut taken) = (0, 0);
        while let Ok(Some(len)) = check_header(&buf[at..], max) {
            let end = at + HEADER_LEN + len;
            if buf.len() < end {
                break;
            }
            let step = f(&buf[at + HEADER_LEN..end]);
            if step == Step::Leave {
                break;
            }
            taken += 1;
            at = end;
            if step == Step::Last {
                break;
            }
        }
        bytes::Buf::advance(buf, at);
        taken
    }

    /// Bytes received but not yet handed out (part of a frame still arriving).
    pub fn buffered(&self) -> usize {
        self.inner.read_buffer().len()
    }

    /// The next payload; `Ok(None)` at a clean end of stream (between frames).
    ///
    /// Cancel-safe: a partly received frame stays in the buffer for the next call.
    pub async fn read_frame(&mut self) -> Result<Option<Bytes>> {
        std::future::poll_fn(|cx| {
            let next = self.inner.poll_next_unpin(cx);
            if next.is_pending() {
                self.quiet();
            }
            next.map(Option::transpose)
        })
        .await
    }

    /// The stream has nothing more to read for now: a read buffer that a busy stream grew
    /// beyond the usual 8 KiB (see the codec's `decode`) is given back if it is empty, so that
    /// a connection that had a burst and went quiet costs what an idle one costs, not 64 KiB.
    /// The usual 8 KiB stays: a connection taking turns (a round trip at a time) goes quiet
    /// after every message, and would otherwise take a new buffer for each. Buffers grown for
    /// a large frame stay too, as they always have (a 1 MiB stream reuses its buffer).
    fn quiet(&mut self) {
        let room = self.inner.read_buffer().capacity();
        if room > crate::codec::READ_ROOM && room <= crate::codec::BUSY_ROOM {
            self.release_buffer();
        }
    }
}

/// What [`FrameReader::for_each_frame`] does after a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Take this frame and go on to the next.
    Next,
    /// Take this frame and stop.
    Last,
    /// Leave this frame in the buffer and stop.
    Leave,
}

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
        self.push_parts(&[], payload)
    }

    /// Adds one frame whose payload is `head` followed by `body`: the small fixed fields of a
    /// typed frame and a body that, when large, is written from its own buffer.
    pub fn push_parts(&mut self, head: &[u8], payload: Bytes) -> Result<()> {
        let header = encode_header(head.len() + payload.len(), self.max_frame)?;
        self.pending += HEADER_LEN + head.len() + payload.len();
        self.buf.extend_from_slice(&header);
        self.buf.extend_from_slice(head);
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
            let (io, chunks) = (&mut self.io, &self.chunks);
            // The slices are built on the stack at each poll rather than held across an
            // `.await`: held, their 1 KiB would be part of every connection's future, idle or
            // not (this future is nested in the connection's).
            let n = std::future::poll_fn(|cx| {
                let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
                let mut count = 0;
                for (slot, chunk) in slices.iter_mut().zip(chunks.iter()) {
                    *slot = IoSlice::new(chunk);
                    count += 1;
                }
                std::pin::Pin::new(&mut *io).poll_write_vectored(cx, &slices[..count])
            })
            .await?;
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

/// Room a typed frame needs beyond its body: `max_frame` bounds bodies, so frames of the
/// sockframe protocol may be this much longer (the largest head is 11 bytes).
pub(crate) const HEAD_ROOM: usize = 16;

/// Most events handed to the application in one batch. Events travel in batches of those
/// that one read produced: one channel operation and at most one wake-up per batch instead
/// of per message, which is most of the cost of small messages.
pub(crate) const MAX_BATCH: usize = 256;

/// Control frames waiting for the writer: a ping to send, a ping to answer, an
/// acknowledgement due.
///
/// Flags rather than a queue: at most one of each is ever worth sending (one pong proves us
/// alive whichever ping it answers, and an `ACK` carries the latest count), so a peer that
/// floods pings gets one pong per write, not a queue of them; and a channel's first block
/// cost 2 KiB per connection, idle or not. Both halves run in one task; atomics only
/// because the connection's future must be `Send`.
#[derive(Debug)]
struct Control<'a> {
    /// A ping to send, and its nonce.
    ping: std::sync::atomic::AtomicBool,
    ping_nonce: AtomicU64,
    /// A pong to send, and the nonce of the ping it answers.
    pong: std::sync::atomic::AtomicBool,
    pong_nonce: AtomicU64,
    /// Send an `ACK` now (sessions).
    ack: std::sync::atomic::AtomicBool,
    /// Wakes the writer.
    wake: tokio::sync::Notify,
    /// Wakes a reader waiting for the pending pong to be taken.
    pong_taken: tokio::sync::Notify,
    /// A handler's replies (not control frames, but handed over the same way). Owned by
    /// the caller: what is queued outlives the connection, for a session's next one.
    replies: &'a Replies,
}

impl<'a> Control<'a> {
    fn new(replies: &'a Replies) -> Self {
        Control {
            ping: Default::default(),
            ping_nonce: Default::default(),
            pong: Default::default(),
            pong_nonce: Default::default(),
            ack: Default::default(),
            wake: Default::default(),
            pong_taken: Default::default(),
            replies,
        }
    }

    fn ping(&self, nonce: u64) {
        self.ping_nonce.store(nonce, Ordering::Relaxed);
        self.ping.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    fn pong(&self, nonce: u64) {
        self.pong_nonce.store(nonce, Ordering::Relaxed);
        self.pong.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    fn ack(&self) {
        self.ack.store(true, Ordering::Release);
        self.wake.notify_one();
    }
}

/// A handler's replies on their way to the writer (see [`crate::handler`]).
///
/// Not the outbox: queueing into the outbox's channel wakes the writer's task, which here
/// is the queueing task itself, and the multi-threaded runtime treats a task that wakes
/// itself as yielding and wakes another worker for it. On a 2-core machine that made a
/// 64-byte round trip about 10 µs slower at the median than the baseline (35.5 against
/// 24.5 µs; with one worker thread 25 µs). Replies queue here without a wake-up instead,
/// and `drive` polls the writer right after the reader whenever the reader queued one.
/// Bounded like an outbox, by the connection's [`OutboxLimits`](crate::OutboxLimits).
#[derive(Debug)]
pub(crate) struct Replies {
    /// A mutex only to be `Sync`: both halves of one task use it, never at once.
    queue: std::sync::Mutex<VecDeque<Message>>,
    /// Payload bytes queued.
    bytes: std::sync::atomic::AtomicUsize,
    limits: crate::OutboxLimits,
    /// Wakes a reader waiting for room (only when the queue was full).
    room: tokio::sync::Notify,
}

impl Replies {
    /// An empty queue bounded by `limits`.
    pub(crate) fn new(limits: crate::OutboxLimits) -> Self {
        Replies {
            queue: Default::default(),
            bytes: Default::default(),
            limits,
            room: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Message>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `reply` if the bounds allow; gives it back if not. Like an outbox, an empty
    /// queue takes a reply of any size, so the largest legal frame can always be sent.
    fn try_push(&self, reply: Message) -> Result<(), Message> {
        let mut queue = self.lock();
        let bytes = self.bytes.load(Ordering::Relaxed);
        if !queue.is_empty()
            && (queue.len() >= self.limits.messages || bytes + reply.len() > self.limits.bytes)
        {
            return Err(reply);
        }
        self.bytes.store(bytes + reply.len(), Ordering::Relaxed);
        queue.push_back(reply);
        Ok(())
    }

    /// Queues `reply` whatever the bounds: a reply that was waiting for room when its
    /// connection ended, kept for the next connection of the session (one over the bound
    /// at most).
    fn keep(&self, reply: Message) {
        self.bytes.fetch_add(reply.len(), Ordering::Relaxed);
        self.lock().push_back(reply);
    }

    /// Takes the next reply.
    fn pop(&self) -> Option<Message> {
        let reply = self.lock().pop_front()?;
        self.bytes.fetch_sub(reply.len(), Ordering::Relaxed);
        // No permit is stored for a reader that is not waiting (it registers before it
        // checks, see `send_reply`).
        self.room.notify_waiters();
        Some(reply)
    }

    fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

/// How long a farewell `CLOSE` frame may take to write on an ungraceful close.
const FAREWELL: Duration = Duration::from_secs(1);

/// Which wire format a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The tutorial's plain framing: untyped payloads, nothing else.
    Tutorial,
    /// The sockframe protocol: typed frames after a hello / welcome handshake.
    Sockframe,
}

/// Heartbeat settings: ping every `interval`; a peer from which nothing at all arrives for
/// `misses` intervals in a row (checked once per interval, so within `misses + 1`) is
/// declared dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// Time between pings. Default 5 s.
    pub interval: Duration,
    /// Intervals without any frame from the peer before it is declared dead. Default 3.
    pub misses: u32,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat {
            interval: Duration::from_secs(5),
            misses: 3,
        }
    }
}

/// An inbound rate limit per connection: a token bucket of application messages (and
/// requests). Control frames (pings, pongs) do not count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Sustained messages per second.
    pub per_second: u32,
    /// Messages that may arrive at once above the sustained rate.
    pub burst: u32,
    /// What happens to a peer over the limit.
    pub action: RateAction,
}

/// What a [`RateLimit`] does to a peer that sends too fast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateAction {
    /// Stop reading until the bucket refills: TCP flow control slows the peer down.
    Delay,
    /// Disconnect it with reason `rate limited`.
    Disconnect,
}

/// The token bucket behind a [`RateLimit`].
#[derive(Debug)]
struct Bucket {
    limit: RateLimit,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(limit: RateLimit) -> Self {
        Bucket {
            limit,
            tokens: f64::from(limit.burst.max(1)),
            last: Instant::now(),
        }
    }

    /// Takes a token; otherwise says how long until one is there.
    fn take(&mut self) -> Result<(), Duration> {
        let now = Instant::now();
        let rate = f64::from(self.limit.per_second.max(1));
        let capacity = f64::from(self.limit.burst.max(1));
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * rate).min(capacity);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
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
    // One task at a time writes each direction (the connection's, and a session's next
    // connection only after it); others only read. A load and a store then count right
    // without a locked instruction, which per small message is a measurable part of the
    // receive path.
    fn add_in(&self, len: usize) {
        bump(&self.messages_in, 1);
        bump(&self.bytes_in, len as u64);
    }

    fn add_out(&self, len: usize) {
        bump(&self.messages_out, 1);
        bump(&self.bytes_out, len as u64);
    }
}

/// Adds `n` to a counter that only the calling task writes.
fn bump(counter: &AtomicU64, n: u64) {
    let v = counter.load(Ordering::Relaxed);
    counter.store(v.wrapping_add(n), Ordering::Relaxed);
}

/// What the peer has sent so far, counted as it arrives.
///
/// Counters rather than timestamps: reading the clock for every frame cost a fifth of the
/// time of small messages. The timers in `drive` read the clock once per tick and note when
/// the counts last moved ([`Heard`]).
#[derive(Debug, Default)]
struct Liveness {
    /// Frames of any kind.
    frames: AtomicU64,
    /// Application messages and requests.
    messages: AtomicU64,
    /// Reading is paused because the application's event stream is full: the peer's
    /// silence is then ours, and must not be taken for a dead or idle peer.
    paused: std::sync::atomic::AtomicBool,
}

impl Liveness {
    // One task writes these counters; a load and a store avoid a locked instruction.
    fn frame(&self) {
        bump(&self.frames, 1);
    }

    fn message(&self) {
        bump(&self.messages, 1);
    }

    fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }
}

/// When a [`Liveness`] counter was last seen to move (or reading was paused).
#[derive(Debug)]
struct Heard {
    count: u64,
    at: Instant,
}

impl Heard {
    fn new() -> Self {
        Heard {
            count: 0,
            at: Instant::now(),
        }
    }

    /// Notes the counter's value now; returns how long it has not moved.
    fn silence(&mut self, count: &AtomicU64, paused: bool) -> Duration {
        let now = Instant::now();
        let current = count.load(Ordering::Relaxed);
        if current != self.count || paused {
            self.count = current;
            self.at = now;
        }
        now.duration_since(self.at)
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

/// What `drive` needs besides the stream.
pub(crate) struct Drive<'a, E, M, R, C> {
    pub(crate) mode: Mode,
    /// Largest message body accepted (the frame limit has room for typed heads besides).
    pub(crate) max_body: usize,
    /// A tutorial connection classified by its silence: if its first frame turns out to be
    /// a hello after all, it was a slow sockframe client, and is closed rather than having
    /// its hello delivered as a message.
    pub(crate) refuse_late_hello: bool,
    pub(crate) outbox: &'a mut OutboxReceiver,
    /// A sender into `outbox`, handed to received requests for their answers.
    pub(crate) reply: &'a OutboxSender,
    /// This side's requests waiting for answers.
    pub(crate) pending: &'a Pending,
    /// Where received events go, in batches (see [`MAX_BATCH`]).
    pub(crate) events: &'a mpsc::Sender<Vec<E>>,
    /// Wraps a received message into the application's event type.
    pub(crate) on_message: M,
    /// Wraps a received request into the application's event type.
    pub(crate) on_request: R,
    pub(crate) traffic: &'a Traffic,
    /// Fired to close the connection; `close_order` then says how and why.
    pub(crate) close: &'a CancellationToken,
    pub(crate) close_order: C,
    /// Upper bound on delivering the queue and waiting for the peer after a graceful close.
    pub(crate) drain_deadline: Duration,
    /// Pings (sockframe mode only).
    pub(crate) heartbeat: Option<Heartbeat>,
    /// Close after this long without an application message.
    pub(crate) idle_timeout: Option<Duration>,
    /// A frame that has started must be complete within this long (slowloris).
    pub(crate) frame_timeout: Option<Duration>,
    /// Inbound message rate limit.
    pub(crate) rate_limit: Option<RateLimit>,
    /// The lossless session this connection carries, if any (sockframe mode only). Its
    /// retained frames are written first; its counts are updated as frames pass.
    pub(crate) session: Option<&'a mut Session>,
    /// Where file transfer frames go (sockframe mode); `None` makes them a protocol error.
    pub(crate) transfers: Option<&'a crate::transfer::Inbox>,
    /// Takes the messages instead of `events` (see [`crate::handler`]); what it returns is
    /// queued into `reply` under `reply_policy`.
    pub(crate) handler: Option<&'a mut dyn Handler>,
    /// What a handler's reply does when the replies waiting are at `reply_limits`.
    pub(crate) reply_policy: FullPolicy,
    /// A handler's replies waiting to be written, bounded by the outbox's limits. Owned by
    /// the caller so that, with a session, replies not yet written when the connection
    /// ends go out on the next one, first.
    pub(crate) replies: &'a Replies,
}

/// A connection's [`Handler`], and its reply while that waits for room in the outbox.
struct Handling<'h> {
    handler: &'h mut dyn Handler,
    /// [`Handler::borrows`], asked once.
    borrows: bool,
    /// Kept outside the read future, like a held frame, so that cancelling that future
    /// loses no reply: the next call sends it first.
    reply: Option<Message>,
    policy: FullPolicy,
}

impl Handling<'_> {
    /// Gives `message` to the handler, lent if it borrows (a message read alone, not in a
    /// run that [`Inbound::lend`] lends in place).
    fn call(&mut self, message: Message) -> Option<Message> {
        if self.borrows {
            self.handler.message_ref(MessageRef::from(&message))
        } else {
            self.handler.message(message)
        }
    }
}

/// How a connection run by `drive` ended.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// Why it ended.
    pub(crate) reason: DisconnectReason,
    /// After a graceful close: whether everything queued was written and the write side shut
    /// down in time. `false` for every other ending.
    pub(crate) flushed: bool,
    /// The peer said goodbye with a `CLOSE` frame: the end was on purpose, not a network
    /// failure, so a session ends with it rather than waiting to be resumed.
    pub(crate) farewell_received: bool,
    /// The stream ended in the middle of a frame (reported as a protocol error, but to a
    /// session it is a cut link like any other).
    pub(crate) truncated: bool,
}

impl Outcome {
    /// Whether the link failed (rather than being closed on purpose): a session survives it.
    pub(crate) fn link_failed(&self) -> bool {
        !self.farewell_received && (self.truncated || self.reason.is_network_failure())
    }
}

enum Ended {
    Read(DisconnectReason),
    Write(io::Result<()>),
    Timeout(DisconnectReason),
}

/// Runs one connection until it ends and returns why it ended.
///
/// Reading and writing run concurrently in the calling task (one task per connection, not
/// three). Received messages go to `events` in order; when `events` is full, reading pauses,
/// so TCP flow control slows the peer instead of memory growing. `held` is a first frame
/// already read (by protocol detection) and not yet delivered.
// On purpose not an `async fn`: see the comment in the body.
#[allow(clippy::manual_async_fn)]
pub(crate) fn drive<RD, WR, E, M, R, C>(
    mut reader: FrameReader<RD>,
    mut writer: FrameWriter<WR>,
    mut held: Option<Bytes>,
    d: Drive<'_, E, M, R, C>,
) -> impl Future<Output = Outcome>
where
    RD: AsyncRead + Unpin,
    WR: AsyncWrite + Unpin,
    M: Fn(Message) -> E,
    R: Fn(Request) -> E,
    C: Fn() -> CloseOrder,
{
    // Not an `async fn`: its arguments would be kept twice in the future (as arguments and
    // as the locals they are moved into), 392 bytes of every connection's task, idle or not.
    async move {
        let control = Control::new(d.replies);
        let liveness = Liveness::default();
        let (mut retained, received_slot) = match d.session {
            Some(session) if d.mode == Mode::Sockframe => {
                (Some(&mut session.retained), Some(&mut session.received))
            }
            _ => (None, None),
        };
        let acks = match (&retained, &received_slot) {
            (Some(r), Some(received)) => Some(Acks::new(r, **received)),
            _ => None,
        };
        let heartbeat = d.heartbeat.filter(|_| d.mode == Mode::Sockframe);
        let inbound = Inbound {
            mode: d.mode,
            max_body: d.max_body,
            refuse_late_hello: std::sync::atomic::AtomicBool::new(d.refuse_late_hello),
            bucket: d.rate_limit.map(|l| std::sync::Mutex::new(Bucket::new(l))),
            events: d.events,
            on_message: &d.on_message,
            on_request: &d.on_request,
            reply: d.reply,
            pending: d.pending,
            control: &control,
            traffic: d.traffic,
            liveness: &liveness,
            acks: acks.as_ref(),
            farewell: std::sync::atomic::AtomicBool::new(false),
            truncated: std::sync::atomic::AtomicBool::new(false),
            transfers: d.transfers,
            replied: std::sync::atomic::AtomicBool::new(false),
            batch_hint: std::sync::atomic::AtomicUsize::new(0),
        };

        // Events read but not yet handed over; outside the read future so that dropping that
        // future loses none of them.
        let mut batch: Vec<E> = Vec::new();
        let mut handling = d.handler.map(|handler| Handling {
            borrows: handler.borrows(),
            handler,
            reply: None,
            policy: d.reply_policy,
        });
        let mut clock = d.frame_timeout.map(FrameClock::new);
        let first = {
            let read = inbound.run(
                &mut reader,
                &mut held,
                &mut batch,
                &mut clock,
                &mut handling,
            );
            let write = write_loop(
                &mut writer,
                d.outbox,
                &control,
                d.close,
                d.traffic,
                d.mode,
                retained.as_deref_mut().zip(acks.as_ref()),
            );
            tokio::pin!(read, write);
            let mut ping = heartbeat
                .map(|hb| tokio::time::interval_at(Instant::now() + hb.interval, hb.interval));
            // The idle timeout is checked four times per period: a peer is closed after between
            // one and one and a quarter idle periods without a message.
            let mut idle_check = d.idle_timeout.map(|t| {
                let tick = (t / 4).max(Duration::from_millis(10));
                tokio::time::interval_at(Instant::now() + tick, tick)
            });
            let (mut heard_frame, mut heard_message) = (Heard::new(), Heard::new());
            let mut nonce = 0u64;
            let mut write_first = false;
            // Polled by hand rather than with `select!`, for one thing `select!` cannot do: when
            // the read side queues a handler's reply, poll the write side again in the same
            // pass, so the reply is written now. Left to the wake-up that queueing causes, it
            // would wait for the task to be scheduled again, which the multi-threaded runtime
            // does by waking another worker (a self-wake counts as a yield): that cost a
            // 64-byte round trip about 10 µs (35.5 against 27 µs at the median, measured).
            // Which side goes first alternates, as `select!`'s random start did, so neither
            // side can use up the task's cooperative budget every time and starve the other.
            std::future::poll_fn(|cx| {
                write_first = !write_first;
                if write_first && let Poll::Ready(res) = write.as_mut().poll(cx) {
                    return Poll::Ready(Ended::Write(res));
                }
                if let Poll::Ready(reason) = read.as_mut().poll(cx) {
                    return Poll::Ready(Ended::Read(reason));
                }
                if (!write_first || inbound.replied.swap(false, Ordering::Relaxed))
                    && let Poll::Ready(res) = write.as_mut().poll(cx)
                {
                    return Poll::Ready(Ended::Write(res));
                }
                if let Some(ping) = &mut ping {
                    while ping.poll_tick(cx).is_ready() {
                        let hb = heartbeat.expect("ping implies heartbeat");
                        // Checked once per interval, so a dead peer is declared after between
                        // `misses` and `misses + 1` silent intervals.
                        let silent = heard_frame.silence(&liveness.frames, liveness.is_paused());
                        if silent >= hb.interval * hb.misses {
                            return Poll::Ready(Ended::Timeout(DisconnectReason::HeartbeatTimeout));
                        }
                        nonce += 1;
                        control.ping(nonce);
                    }
                }
                if let Some(idle_check) = &mut idle_check {
                    while idle_check.poll_tick(cx).is_ready() {
                        let idle = d.idle_timeout.expect("idle_check implies idle timeout");
                        if heard_message.silence(&liveness.messages, liveness.is_paused()) >= idle {
                            return Poll::Ready(Ended::Timeout(DisconnectReason::IdleTimeout));
                        }
                    }
                }
                Poll::Pending
            })
            .await
        };

        let ended = |reason| Outcome {
            reason,
            flushed: false,
            farewell_received: false,
            truncated: false,
        };
        let outcome = match first {
            Ended::Read(reason) => {
                if matches!(reason, DisconnectReason::Protocol(_)) {
                    farewell(&mut writer, d.mode, &reason).await;
                }
                ended(reason)
            }
            Ended::Write(Err(e)) => ended(DisconnectReason::from_io(&e)),
            Ended::Timeout(reason) => {
                farewell(&mut writer, d.mode, &reason).await;
                ended(reason)
            }
            Ended::Write(Ok(())) => {
                let order = (d.close_order)();
                let mut flushed = false;
                if !order.graceful && acks.is_some() && order.reason != DisconnectReason::Replaced {
                    // Even a hasty close ends a session on purpose: say so, or the peer would
                    // keep it waiting to be resumed.
                    farewell(&mut writer, d.mode, &order.reason).await;
                }
                if order.graceful {
                    let deadline = Instant::now() + d.drain_deadline;
                    let finish = async {
                        // Keep reading while draining, so a peer that is blocked writing to us
                        // can make progress and read what we send.
                        let read = inbound.run(
                            &mut reader,
                            &mut held,
                            &mut batch,
                            &mut clock,
                            &mut handling,
                        );
                        let drain = async {
                            let session = retained.as_deref_mut().zip(acks.as_ref());
                            drain(
                                &mut writer,
                                d.outbox,
                                control.replies,
                                d.traffic,
                                d.mode,
                                session,
                            )
                            .await?;
                            if d.mode == Mode::Sockframe {
                                push_control(&mut writer, &close_frame(&order.reason))?;
                            }
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
                    farewell_received: false,
                    truncated: false,
                }
            }
        };
        let outcome = Outcome {
            farewell_received: inbound.farewell.load(Ordering::Relaxed),
            truncated: inbound.truncated.load(Ordering::Relaxed),
            ..outcome
        };
        // What was read is handed over before the caller reports the end; during a close, an
        // application that stopped reading events does not hold it up past the drain deadline.
        let last = inbound.flush(&mut batch);
        if d.close.is_cancelled() {
            let _ = tokio::time::timeout(d.drain_deadline, last).await;
        } else {
            last.await;
        }
        // A reply still waiting for room was counted with its message: it must not be lost
        // with this connection.
        if let Some(reply) = handling.and_then(|h| h.reply) {
            d.replies.keep(reply);
        }
        // The peer closed a session: tell it that everything it sent before its close is
        // here (its close is confirmed by this, not by our end of stream, which a cut link
        // can fake), then end our side. Bounded like a farewell.
        if outcome.farewell_received
            && let Some(acks) = &acks
        {
            let received = acks.received.load(Ordering::Relaxed);
            if push_control(&mut writer, &Frame::Ack(received)).is_ok() {
                let _ = tokio::time::timeout(FAREWELL, writer.shutdown()).await;
            }
        }
        // Only now: the count includes that last batch.
        if let (Some(acks), Some(slot)) = (&acks, received_slot) {
            *slot = acks.received.load(Ordering::Relaxed);
        }
        // Acknowledgements that arrived after the writer stopped (a close's, above all)
        // release their frames too: what is left is what the peer may lack.
        if let (Some(retained), Some(acks)) = (retained, &acks) {
            retained.release(acks.peer_acked.load(Ordering::Relaxed));
        }
        outcome
    }
}

/// Tells a sockframe peer why the connection is being closed, if that can be done quickly.
async fn farewell<W: AsyncWrite + Unpin>(
    writer: &mut FrameWriter<W>,
    mode: Mode,
    reason: &DisconnectReason,
) {
    if mode != Mode::Sockframe || push_control(writer, &close_frame(reason)).is_err() {
        return;
    }
    let _ = tokio::time::timeout(FAREWELL, writer.shutdown()).await;
}

/// The `CLOSE` frame that announces `reason`.
fn close_frame(reason: &DisconnectReason) -> Frame {
    let code = match reason {
        DisconnectReason::Kicked => close_code::KICKED,
        DisconnectReason::Shutdown => close_code::SHUTDOWN,
        DisconnectReason::HeartbeatTimeout => close_code::HEARTBEAT_TIMEOUT,
        DisconnectReason::IdleTimeout => close_code::IDLE_TIMEOUT,
        DisconnectReason::Protocol(_) => close_code::PROTOCOL_ERROR,
        DisconnectReason::SlowConsumer => close_code::SLOW_CONSUMER,
        DisconnectReason::RateLimited => close_code::RATE_LIMITED,
        _ => close_code::NORMAL,
    };
    Frame::Close {
        code,
        text: reason.to_string(),
    }
}

/// The frame timeout's timer: one per connection, reset every tick, rather than a new timer
/// registered for every read. (With the frame timeout on, 64-byte round trips measured about
/// 12 µs slower at the median than with it off, either way; see docs/benchmarks.md.)
struct FrameClock {
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
    tick: Duration,
    limit: Duration,
    /// When a partial frame was first seen in the buffer.
    started: Option<Instant>,
}

impl FrameClock {
    fn new(limit: Duration) -> Self {
        let tick = (limit / 4).max(Duration::from_millis(10));
        FrameClock {
            sleep: Box::pin(tokio::time::sleep(tick)),
            tick,
            limit,
            started: None,
        }
    }
}

/// The receiving half of `drive`: turns frames into events, answers pings, routes responses.
struct Inbound<'a, E, M, R> {
    mode: Mode,
    max_body: usize,
    /// See [`Drive::refuse_late_hello`]; cleared after the first frame.
    refuse_late_hello: std::sync::atomic::AtomicBool,
    /// The rate limit's state (a mutex only to be `Sync`: one task uses it).
    bucket: Option<std::sync::Mutex<Bucket>>,
    events: &'a mpsc::Sender<Vec<E>>,
    on_message: &'a M,
    on_request: &'a R,
    reply: &'a OutboxSender,
    pending: &'a Pending,
    control: &'a Control<'a>,
    traffic: &'a Traffic,
    liveness: &'a Liveness,
    /// The session's counters, when the connection carries one.
    acks: Option<&'a Acks>,
    /// Set when the peer's `CLOSE` frame arrives.
    farewell: std::sync::atomic::AtomicBool,
    /// Set when the stream ends in the middle of a frame.
    truncated: std::sync::atomic::AtomicBool,
    transfers: Option<&'a crate::transfer::Inbox>,
    /// Set when a handler's reply was queued: `drive` then polls the writer at once.
    replied: std::sync::atomic::AtomicBool,
    /// How many events the last batch held: the next one starts with room for as many, not
    /// growing (and copying) from 4 to 256 (see [`push_event`](Self::push_event)).
    batch_hint: std::sync::atomic::AtomicUsize,
}

impl<E, M, R> Inbound<'_, E, M, R>
where
    M: Fn(Message) -> E,
    R: Fn(Request) -> E,
{
    /// Reads until the stream ends or breaks the rules.
    ///
    /// Cancel-safe: a frame read but not yet handed on stays in `held` (outside this future)
    /// and is handled by the next call.
    async fn run<RD: AsyncRead + Unpin>(
        &self,
        reader: &mut FrameReader<RD>,
        held: &mut Option<Bytes>,
        batch: &mut Vec<E>,
        clock: &mut Option<FrameClock>,
        handling: &mut Option<Handling<'_>>,
    ) -> DisconnectReason {
        loop {
            if let Some(h) = handling.as_mut()
                && h.reply.is_some()
                && let Err(reason) = self.send_reply(h).await
            {
                return reason;
            }
            if held.is_none()
                && (handling.is_none() || batch.is_empty())
                && self.bucket.is_none()
                && !self.refuse_late_hello.load(Ordering::Relaxed)
            {
                if let Err(reason) = self.drain(reader, held, batch, handling.as_mut()) {
                    return reason;
                }
                if handling.as_ref().is_some_and(|h| h.reply.is_some()) {
                    continue;
                }
            }
            if held.is_none() {
                // Frames already complete in the buffer join the batch without waiting;
                // before waiting for more bytes, the batch is handed over.
                let next = match reader.try_frame() {
                    Ok(Some(frame)) => Ok(Some(frame)),
                    Ok(None) => {
                        self.flush(batch).await;
                        if self.acks.is_some_and(|a| a.ack_due()) {
                            self.control.ack();
                        }
                        self.read(reader, clock).await
                    }
                    Err(e) => Err(e),
                };
                match next {
                    Ok(Some(frame)) => {
                        self.liveness.frame();
                        *held = Some(frame);
                    }
                    Ok(None) => return DisconnectReason::ClosedByPeer,
                    Err(e) => {
                        if let crate::Error::Frame(crate::protocol::FrameError::Truncated {
                            ..
                        }) = e
                        {
                            self.truncated.store(true, Ordering::Relaxed);
                        }
                        return DisconnectReason::from_error(&e);
                    }
                }
            }
            let raw = held.as_ref().expect("held frame");
            // Loaded before it is cleared: a swap per frame would be a locked instruction.
            if self.refuse_late_hello.load(Ordering::Relaxed) {
                self.refuse_late_hello.store(false, Ordering::Relaxed);
                if wire::is_hello(raw) {
                    return DisconnectReason::Protocol(
                        "a hello arrived after the detection timeout; the connection had been \
                     taken for a tutorial client"
                            .into(),
                    );
                }
            }
            if self.mode == Mode::Tutorial {
                if let Some(h) = handling.as_mut() {
                    if let Err(reason) = self.handle(h, held, None, batch).await {
                        return reason;
                    }
                    continue;
                }
                if self.waits(batch) {
                    let (event, len) =
                        ((self.on_message)(Message::untyped(raw.clone())), raw.len());
                    if let Err(reason) = self.deliver(held, event, len, batch).await {
                        return reason;
                    }
                } else {
                    // Moved, not cloned: a clone and a drop are two atomic operations on the
                    // read buffer's reference count per message.
                    let frame = held.take().expect("held frame");
                    let len = frame.len();
                    self.accept(held, (self.on_message)(Message::untyped(frame)), len, batch);
                }
                continue;
            }
            // Messages, most of the traffic, take the frame by value instead of parsing a
            // second reference to it.
            let kind = wire::message_kind(raw);
            if let (Some(kind), Some(h)) = (kind, handling.as_mut()) {
                if let Err(reason) = self.handle(h, held, Some(kind), batch).await {
                    return reason;
                }
                continue;
            }
            if let Some(kind) = kind
                && !self.waits(batch)
            {
                let body = match self.message_body(held.take().expect("held frame"), kind) {
                    Ok(body) => body,
                    Err(reason) => return reason,
                };
                let len = body.len();
                self.accept(
                    held,
                    (self.on_message)(Message::from_wire(kind, body)),
                    len,
                    batch,
                );
                continue;
            }
            let parsed = wire::parse(raw);
            if let Ok(
                Frame::Message { body, .. }
                | Frame::Request { body, .. }
                | Frame::Response {
                    result: Ok((_, body)),
                    ..
                },
            ) = &parsed
                && body.len() > self.max_body
            {
                let e = crate::protocol::FrameError::TooLarge {
                    len: body.len(),
                    max: self.max_body,
                };
                return DisconnectReason::Protocol(e.to_string());
            }
            match parsed {
                Err(e) => return DisconnectReason::Protocol(e.to_string()),
                Ok(Frame::Message { kind, body }) => {
                    let len = body.len();
                    let event = (self.on_message)(Message::from_wire(kind, body));
                    if self.waits(batch) {
                        if let Err(reason) = self.deliver(held, event, len, batch).await {
                            return reason;
                        }
                    } else {
                        self.accept(held, event, len, batch);
                    }
                }
                Ok(Frame::Request { id, kind, body }) => {
                    let len = body.len();
                    let request =
                        Request::new(id, Message::from_wire(kind, body), self.reply.clone());
                    if let Err(reason) = self
                        .deliver(held, (self.on_request)(request), len, batch)
                        .await
                    {
                        return reason;
                    }
                }
                Ok(Frame::Response { id, result }) => {
                    if let Some(acks) = self.acks {
                        // Counted frames are in the application's hands, in order: the
                        // messages before this response go first.
                        self.flush(batch).await;
                        acks.received_one();
                    }
                    held.take();
                    self.pending.complete(
                        id,
                        result.map(|(kind, body)| Message::from_wire(kind, body)),
                    );
                }
                Ok(Frame::Ping(nonce)) => {
                    // One pong waiting is enough. While it waits (the peer does not read
                    // what we write), a peer that keeps pinging is not read either: TCP
                    // slows it down, and its silence ends in a heartbeat timeout.
                    while self.control.pong.load(Ordering::Acquire) {
                        self.control.pong_taken.notified().await;
                    }
                    held.take();
                    self.control.pong(nonce);
                }
                Ok(Frame::Pong(_) | Frame::Unknown(_)) => {
                    held.take();
                }
                Ok(Frame::Ack(n)) => {
                    let Some(acks) = self.acks else {
                        return DisconnectReason::Protocol(
                            "acknowledgement outside a session".into(),
                        );
                    };
                    if let Err(e) = acks.peer_ack(n) {
                        return DisconnectReason::Protocol(e);
                    }
                    held.take();
                }
                Ok(Frame::AckRequest) => {
                    if self.acks.is_none() {
                        return DisconnectReason::Protocol(
                            "acknowledgement request outside a session".into(),
                        );
                    }
                    held.take();
                    self.control.ack();
                }
                Ok(Frame::Close { code, text }) => {
                    self.farewell.store(true, Ordering::Relaxed);
                    return DisconnectReason::from_close(code, &text);
                }
                Ok(Frame::Transfer(frame)) => {
                    // Events read before a transfer frame are handed over first, so that an
                    // offer is never reported before a message sent ahead of it.
                    self.flush(batch).await;
                    let Some(inbox) = self.transfers else {
                        return DisconnectReason::Protocol(
                            "file transfer frame on a connection without file transfer".into(),
                        );
                    };
                    // Waiting here pauses reading: a receiver whose disk is behind slows
                    // the sender through TCP instead of buffering.
                    let Ok(slot) = inbox.reserve().await else {
                        return DisconnectReason::Closed;
                    };
                    held.take();
                    // Application frames: counted as traffic, and they keep a connection
                    // from going idle.
                    self.traffic.add_in(frame.weight());
                    self.liveness.message();
                    if let Some(acks) = self.acks {
                        // In the engine's hands: received, in order after the batch above.
                        acks.add_bytes(frame.weight());
                        acks.received_one();
                    }
                    slot.send(crate::transfer::Input::Frame(frame));
                }
                Ok(Frame::Welcome(_) | Frame::Reject { .. }) => {
                    return DisconnectReason::Protocol(
                        "handshake frame after the handshake".into(),
                    );
                }
            }
        }
    }

    /// The fast path for messages: every message already complete in the read buffer goes
    /// to the handler, or into the batch of events, in one synchronous loop, and the counters
    /// are added once for all of them.
    ///
    /// `run`'s loop is general (requests, control frames, waits at every step), and going
    /// round it once per message was, with small messages, as much work as the message
    /// itself. Here a message costs its decoding and the handler's call or its place in the
    /// batch (64-byte sink, one connection, with a handler: about 1.5x the messages per
    /// second of going round `run`'s loop, measured).
    ///
    /// Returns when the buffer holds no complete frame or the batch is nearly full (`run`
    /// hands it over); or leaves in `held` a frame that needs the general path (not a
    /// message, or a decoding error, which that path reports); or leaves in `h.reply` a
    /// reply that found the queue full (under `Wait`: `run` waits for room, reading nothing
    /// meanwhile). The caller checks that there is no rate limit and no late hello to watch
    /// for, and, with a handler, no event waiting in the batch, which this path does not
    /// handle.
    fn drain<RD: AsyncRead + Unpin>(
        &self,
        reader: &mut FrameReader<RD>,
        held: &mut Option<Bytes>,
        batch: &mut Vec<E>,
        mut handling: Option<&mut Handling<'_>>,
    ) -> Result<(), DisconnectReason> {
        if let Some(h) = handling.as_deref_mut()
            && h.borrows
        {
            return self.lend(reader, h);
        }
        let (mut frames, mut messages, mut bytes) = (0u64, 0u64, 0u64);
        let result = loop {
            if handling.is_none() && batch.len() + 1 >= MAX_BATCH {
                break Ok(());
            }
            let Ok(Some(frame)) = reader.try_frame() else {
                // No complete frame, or an error the general path reads again and reports.
                break Ok(());
            };
            frames += 1;
            let message = if self.mode == Mode::Tutorial {
                Message::untyped(frame)
            } else if let Some(kind) = wire::message_kind(&frame) {
                match self.message_body(frame, kind) {
                    Ok(body) => Message::from_wire(kind, body),
                    Err(reason) => break Err(reason),
                }
            } else {
                *held = Some(frame);
                break Ok(());
            };
            let len = message.len();
            messages += 1;
            bytes += len as u64;
            if let Some(acks) = self.acks {
                acks.add_bytes(len);
            }
            let Some(h) = handling.as_deref_mut() else {
                // A session counts these once the batch is handed over (`flush`).
                self.push_event(batch, (self.on_message)(message));
                continue;
            };
            let reply = h.call(message);
            if let Some(acks) = self.acks {
                acks.received_one();
            }
            h.reply = reply;
            match self.queue_reply(h) {
                Ok(true) => {}
                // Full: `run` waits for room.
                Ok(false) => break Ok(()),
                Err(reason) => break Err(reason),
            }
        };
        self.count_pass(frames, messages, bytes);
        result
    }

    /// [`drain`](Self::drain) for a handler that borrows: each message is lent to it where
    /// it lies in the read buffer, and the buffer moves on once for all of them. Leaves a
    /// frame that is not a message for the general path, as `drain` does.
    fn lend<RD: AsyncRead + Unpin>(
        &self,
        reader: &mut FrameReader<RD>,
        h: &mut Handling<'_>,
    ) -> Result<(), DisconnectReason> {
        let (mut messages, mut bytes) = (0u64, 0u64);
        let mut result = Ok(());
        let frames = reader.for_each_frame(|frame| {
            let message = if self.mode == Mode::Tutorial {
                MessageRef::new(MessageKind::Untyped, frame)
            } else if let Some(kind) = wire::message_kind(frame) {
                match self.checked_body(frame, kind) {
                    Ok(body) => MessageRef::new(kind.into(), body),
                    Err(reason) => {
                        result = Err(reason);
                        return Step::Last;
                    }
                }
            } else {
                return Step::Leave;
            };
            messages += 1;
            bytes += message.len() as u64;
            if let Some(acks) = self.acks {
                acks.add_bytes(message.len());
            }
            h.reply = h.handler.message_ref(message);
            if let Some(acks) = self.acks {
                acks.received_one();
            }
            match self.queue_reply(h) {
                Ok(true) => Step::Next,
                // Full: `run` waits for room.
                Ok(false) => Step::Last,
                Err(reason) => {
                    result = Err(reason);
                    Step::Last
                }
            }
        });
        self.count_pass(frames as u64, messages, bytes);
        result
    }

    /// Adds one pass's frames, messages and bytes to the counters, once per pass rather
    /// than once per message.
    fn count_pass(&self, frames: u64, messages: u64, bytes: u64) {
        bump(&self.liveness.frames, frames);
        bump(&self.liveness.messages, messages);
        bump(&self.traffic.messages_in, messages);
        bump(&self.traffic.bytes_in, bytes);
    }

    /// Reads the next frame; a frame that has started must finish within the frame timeout.
    ///
    /// Checked every quarter of the timeout: the reader's buffer holds bytes only while a
    /// frame is incomplete (complete ones are handed out first), so a buffer that stays
    /// non-empty across the timeout is a frame that does not finish.
    async fn read<RD: AsyncRead + Unpin>(
        &self,
        reader: &mut FrameReader<RD>,
        clock: &mut Option<FrameClock>,
    ) -> crate::Result<Option<Bytes>> {
        let Some(clock) = clock else {
            return reader.read_frame().await;
        };
        loop {
            tokio::select! {
                frame = reader.read_frame() => {
                    clock.started = None;
                    return frame;
                }
                () = clock.sleep.as_mut() => {
                    let now = Instant::now();
                    clock.sleep.as_mut().reset(now + clock.tick);
                    let partial = reader.buffered();
                    if partial == 0 {
                        clock.started = None;
                    } else if now - *clock.started.get_or_insert(now) + clock.tick > clock.limit {
                        return Err(crate::Error::FrameTimeout { limit: clock.limit, have: partial });
                    }
                }
            }
        }
    }

    /// The body of the message `frame` of `kind`, taken by value (see
    /// [`wire::into_message_body`]) and checked against the size limit.
    fn message_body(&self, frame: Bytes, kind: wire::Kind) -> Result<Bytes, DisconnectReason> {
        self.checked_body(&frame, kind)?;
        Ok(wire::into_message_body(frame))
    }

    /// The body of the message `frame` of `kind`, lent: checked (UTF-8 for text) and against
    /// the size limit.
    fn checked_body<'f>(
        &self,
        frame: &'f [u8],
        kind: wire::Kind,
    ) -> Result<&'f [u8], DisconnectReason> {
        let body = wire::message_body(frame, kind)
            .map_err(|e| DisconnectReason::Protocol(e.to_string()))?;
        if body.len() > self.max_body {
            let e = crate::protocol::FrameError::TooLarge {
                len: body.len(),
                max: self.max_body,
            };
            return Err(DisconnectReason::Protocol(e.to_string()));
        }
        Ok(body)
    }

    /// Gives the held message frame (of `kind`; `None` for the tutorial framing) to the
    /// connection's handler, after the rate limit and after the events read before it,
    /// then queues the handler's reply.
    async fn handle(
        &self,
        h: &mut Handling<'_>,
        held: &mut Option<Bytes>,
        kind: Option<wire::Kind>,
        batch: &mut Vec<E>,
    ) -> Result<(), DisconnectReason> {
        // (The checks around the calls keep the common case free of a future's setup.)
        // Requests read before this message reach the application first; a session's
        // count then stays in order too (it counts a frame once the application has it).
        if !batch.is_empty() {
            self.flush(batch).await;
        }
        // Last before the message is taken: no wait comes between a token taken from the
        // rate limit and the message it admits.
        if self.bucket.is_some() {
            self.limit(batch).await?;
        }
        let message = match kind {
            None => Message::untyped(held.take().expect("held frame")),
            Some(kind) => Message::from_wire(
                kind,
                self.message_body(held.take().expect("held frame"), kind)?,
            ),
        };
        self.count_in(message.len());
        h.reply = h.call(message);
        if let Some(acks) = self.acks {
            acks.received_one();
        }
        if h.reply.is_none() {
            return Ok(());
        }
        self.send_reply(h).await
    }

    /// Queues the handler's reply, if it has one, for this connection's writer.
    async fn send_reply(&self, h: &mut Handling<'_>) -> Result<(), DisconnectReason> {
        // A reply that finds no room stays in `h` while waiting, so that cancelling this
        // future loses nothing. Not reading meanwhile is the point: TCP slows the peer.
        while !self.queue_reply(h)? {
            // Only the writer makes room, and it runs in this task: nothing can change
            // between the failed push and this wait.
            let room = self.control.replies.room.notified();
            self.liveness.paused.store(true, Ordering::Relaxed);
            room.await;
            self.liveness.paused.store(false, Ordering::Relaxed);
            self.liveness.frame();
        }
        Ok(())
    }

    /// Queues the reply in `h`, if any, without waiting: `Ok(true)` when it is queued (or
    /// there was none), `Ok(false)` when the queue is full and the reply stays in `h`, and
    /// an error when a full queue disconnects the client.
    fn queue_reply(&self, h: &mut Handling<'_>) -> Result<bool, DisconnectReason> {
        let Some(reply) = h.reply.take() else {
            return Ok(true);
        };
        match self.control.replies.try_push(reply) {
            Ok(()) => {
                self.replied.store(true, Ordering::Relaxed);
                Ok(true)
            }
            Err(_) if h.policy == FullPolicy::Disconnect => Err(DisconnectReason::SlowConsumer),
            Err(reply) => {
                h.reply = Some(reply);
                Ok(false)
            }
        }
    }

    /// Waits as the rate limit says before the next message, handing over what came
    /// within the limit first; or fails when the limit disconnects.
    async fn limit(&self, batch: &mut Vec<E>) -> Result<(), DisconnectReason> {
        if let Some(bucket) = &self.bucket {
            loop {
                let (wait, action) = {
                    let mut bucket = bucket.lock().unwrap_or_else(|e| e.into_inner());
                    (bucket.take(), bucket.limit.action)
                };
                let Err(wait) = wait else { break };
                if action == RateAction::Disconnect {
                    return Err(DisconnectReason::RateLimited);
                }
                // What came within the limit goes out before the pause.
                self.flush(batch).await;
                // Not reading meanwhile is the point; the peer's silence is ours.
                self.liveness.paused.store(true, Ordering::Relaxed);
                tokio::time::sleep(wait).await;
                self.liveness.paused.store(false, Ordering::Relaxed);
                self.liveness.frame();
            }
        }
        Ok(())
    }

    /// Adds an application event to the batch, applying the rate limit first; then the
    /// held frame is done. A full batch is handed over at once.
    async fn deliver(
        &self,
        held: &mut Option<Bytes>,
        event: E,
        len: usize,
        batch: &mut Vec<E>,
    ) -> Result<(), DisconnectReason> {
        self.limit(batch).await?;
        self.accept(held, event, len, batch);
        if batch.len() >= MAX_BATCH {
            self.flush(batch).await;
        }
        Ok(())
    }

    /// Whether delivering the next event may wait (a rate limit, or a full batch); when it
    /// cannot, [`accept`](Self::accept) is used directly, without an `.await`.
    fn waits(&self, batch: &[E]) -> bool {
        self.bucket.is_some() || batch.len() + 1 >= MAX_BATCH
    }

    /// The held frame becomes an event in the batch.
    fn accept(&self, held: &mut Option<Bytes>, event: E, len: usize, batch: &mut Vec<E>) {
        held.take();
        self.count_in(len);
        self.push_event(batch, event);
    }

    /// Adds an event to the batch.
    fn push_event(&self, batch: &mut Vec<E>, event: E) {
        // A batch handed over leaves no buffer behind (an idle connection keeps none); the
        // next takes its room when its first event arrives.
        if batch.capacity() == 0 {
            batch.reserve_exact(self.batch_hint.load(Ordering::Relaxed).clamp(1, MAX_BATCH));
        }
        batch.push(event);
    }

    /// Counts an application message of `len` bytes taken in: traffic, liveness, and the
    /// session's unacknowledged bytes.
    fn count_in(&self, len: usize) {
        if let Some(acks) = self.acks {
            acks.add_bytes(len);
        }
        self.traffic.add_in(len);
        self.liveness.message();
    }

    /// Hands the batch to the application, waiting for room in the event stream.
    ///
    /// Cancel-safe: the batch is taken only once there is room for it.
    async fn flush(&self, batch: &mut Vec<E>) {
        if batch.is_empty() {
            return;
        }
        let slot = match self.events.try_reserve() {
            Ok(slot) => Ok(slot),
            Err(mpsc::error::TrySendError::Closed(())) => Err(()),
            Err(mpsc::error::TrySendError::Full(())) => {
                self.liveness.paused.store(true, Ordering::Relaxed);
                let slot = self.events.reserve().await.map_err(|_| ());
                self.liveness.paused.store(false, Ordering::Relaxed);
                // The peer had no chance to be heard meanwhile: its clocks restart now.
                self.liveness.frame();
                self.liveness.message();
                slot
            }
        };
        let count = batch.len() as u64;
        self.batch_hint.store(batch.len(), Ordering::Relaxed);
        match slot {
            Ok(slot) => slot.send(std::mem::take(batch)),
            // Without a listener events are discarded, but the connection is still served.
            Err(()) => batch.clear(),
        }
        // A session counts a frame as received once the application has it (in its event
        // stream); acknowledgements never run ahead of that.
        if let Some(acks) = self.acks {
            acks.received_many(count);
        }
    }
}

/// Writes queued frames in batches until `close` fires (returns `Ok`) or a write fails.
///
/// With a session, every application frame written is kept in `session`'s window until the
/// peer acknowledges it; the frames kept from an earlier connection are written first, and
/// a full window stops the loop from taking more from the outbox until acknowledgements
/// arrive.
async fn write_loop<W: AsyncWrite + Unpin>(
    writer: &mut FrameWriter<W>,
    outbox: &mut OutboxReceiver,
    control: &Control<'_>,
    close: &CancellationToken,
    traffic: &Traffic,
    mode: Mode,
    mut session: Option<(&mut Retained, &Acks)>,
) -> io::Result<()> {
    let mut lane = Lane {
        writer,
        traffic,
        mode,
        flushed: Vec::new(),
        ack_now: false,
    };
    if let Some((retained, _)) = &session
        && retained.unacked() > 0
    {
        for item in retained.frames() {
            lane.push(item.clone())?;
        }
        // Ask for an acknowledgement of the resent frames, which may be all there is to
        // send: the peer would otherwise acknowledge them only with its own traffic.
        push_control(lane.writer, &Frame::AckRequest)?;
        tokio::select! {
            res = lane.writer.flush() => res?,
            _ = close.cancelled() => return Ok(()),
        }
    }
    loop {
        // Acknowledgements free room in the window and finish flushes: the loop waits for
        // them when either is wanted (a flush of an idle connection would otherwise wait
        // for the next frame to write, such as a heartbeat's ping).
        let (room, wants_acks) = match &mut session {
            Some((retained, acks)) => {
                retained.release(acks.peer_acked.load(Ordering::Relaxed));
                (
                    retained.has_room(),
                    !retained.has_room() || retained.has_waiters(),
                )
            }
            None => (true, false),
        };
        tokio::select! {
            biased;
            _ = close.cancelled() => return Ok(()),
            _ = control.wake.notified() => lane.control(control)?,
            // No waker: `drive` polls this loop again whenever the reader queues a reply.
            () = std::future::poll_fn(|_| if control.replies.is_empty() { Poll::Pending } else { Poll::Ready(()) }), if room => {}
            item = outbox.recv(), if room => match item {
                Some(item) => lane.take(item, &mut session)?,
                None => {
                    // Every sender is gone: nothing more will be queued.
                    close.cancelled().await;
                    return Ok(());
                }
            },
            _ = async { session.as_ref().expect("waiting for acks implies a session").1.acked.notified().await }, if wants_acks => continue,
        }
        // Gather what is queued right now, then write it all at once: the handler's
        // replies first (they are already in order behind what was written), then the
        // outbox.
        while lane.writer.pending() < BATCH_BYTES {
            if session.as_ref().is_none_or(|(r, _)| r.has_room())
                && let Some(reply) = control.replies.pop()
            {
                lane.take(Outgoing::Message(reply), &mut session)?;
            } else if session.as_ref().is_none_or(|(r, _)| r.has_room())
                && let Some(item) = outbox.try_recv()
            {
                lane.take(item, &mut session)?;
            } else {
                break;
            }
        }
        lane.control(control)?;
        if let Some((retained, acks)) = &mut session {
            // Acknowledge what arrived with whatever goes out anyway (piggy-backing), and
            // ask for acknowledgements when a flush waits or the window fills.
            let received = acks.received.load(Ordering::Relaxed);
            if received != acks.ack_sent.load(Ordering::Relaxed) || lane.ack_now {
                push_control(lane.writer, &Frame::Ack(received))?;
                acks.ack_sent.store(received, Ordering::Relaxed);
                acks.unacked_bytes.store(0, Ordering::Relaxed);
            }
            lane.ack_now = false;
            if retained.wants_ack() {
                push_control(lane.writer, &Frame::AckRequest)?;
            }
        }
        // A close interrupts a flush stuck on a peer that does not read; the frames stay
        // buffered in `writer`, and a graceful close carries on writing them.
        tokio::select! {
            res = lane.writer.flush() => res?,
            _ = close.cancelled() => return Ok(()),
        }
        for waiter in lane.flushed.drain(..) {
            waiter.done();
        }
    }
}

/// The write loop's state besides the queues.
struct Lane<'a, W> {
    writer: &'a mut FrameWriter<W>,
    traffic: &'a Traffic,
    mode: Mode,
    /// Flushes (without a session) done once the current batch is written.
    flushed: Vec<FlushWaiter>,
    /// The peer asked for an acknowledgement, or enough arrived to send one.
    ack_now: bool,
}

impl<W: AsyncWrite + Unpin> Lane<'_, W> {
    fn push(&mut self, item: Outgoing) -> io::Result<bool> {
        push(self.writer, item, self.traffic, self.mode)
    }

    /// The control frames that are due; an acknowledgement only gets its count when the
    /// batch is complete.
    fn control(&mut self, control: &Control<'_>) -> io::Result<()> {
        if control.ping.swap(false, Ordering::Acquire) {
            push_control(
                self.writer,
                &Frame::Ping(control.ping_nonce.load(Ordering::Relaxed)),
            )?;
        }
        if control.pong.swap(false, Ordering::Acquire) {
            push_control(
                self.writer,
                &Frame::Pong(control.pong_nonce.load(Ordering::Relaxed)),
            )?;
            control.pong_taken.notify_one();
        }
        if control.ack.swap(false, Ordering::Acquire) {
            self.ack_now = true;
        }
        Ok(())
    }

    /// An item from the outbox: written, and kept until acknowledged in a session.
    fn take(
        &mut self,
        item: Outgoing,
        session: &mut Option<(&mut Retained, &Acks)>,
    ) -> io::Result<()> {
        match (item, session) {
            (Outgoing::Flush(waiter), Some((retained, _))) => retained.add_waiter(waiter),
            (Outgoing::Flush(waiter), None) => self.flushed.push(waiter),
            (item, Some((retained, acks))) => {
                push_retained(self.writer, item, self.traffic, self.mode, retained, acks)?;
            }
            (item, None) => {
                self.push(item)?;
            }
        }
        Ok(())
    }
}

/// Writes everything queued right now. In a session, what it writes is kept until
/// acknowledged like any other frame (a close cut short is resumed and finishes with them,
/// or counts them as undelivered), and it ends with an acknowledgement of all received, so
/// that the peer's close is confirmed too.
async fn drain<W: AsyncWrite + Unpin>(
    writer: &mut FrameWriter<W>,
    outbox: &mut OutboxReceiver,
    replies: &Replies,
    traffic: &Traffic,
    mode: Mode,
    mut session: Option<(&mut Retained, &Acks)>,
) -> io::Result<()> {
    while let Some(item) = replies
        .pop()
        .map(Outgoing::Message)
        .or_else(|| outbox.try_recv())
    {
        match (&mut session, item) {
            // Flushes waiting here are dropped unanswered: a closing connection confirms
            // nothing (`close` itself reports what was not delivered).
            (_, Outgoing::Flush(_)) => {}
            (Some((retained, acks)), item) => {
                push_retained(writer, item, traffic, mode, retained, acks)?;
            }
            (None, item) => {
                push(writer, item, traffic, mode)?;
            }
        }
        if writer.pending() >= BATCH_BYTES {
            writer.flush().await?;
        }
    }
    if let Some((_, acks)) = session {
        let received = acks.received.load(Ordering::Relaxed);
        push_control(writer, &Frame::Ack(received))?;
        acks.ack_sent.store(received, Ordering::Relaxed);
    }
    writer.flush().await
}

/// Encodes one queued item in a session and keeps it until acknowledged. Only frames that
/// went out count: one refused as too large for this peer was never numbered.
fn push_retained<W: AsyncWrite + Unpin>(
    writer: &mut FrameWriter<W>,
    item: Outgoing,
    traffic: &Traffic,
    mode: Mode,
    retained: &mut Retained,
    acks: &Acks,
) -> io::Result<()> {
    if push(writer, item.clone(), traffic, mode)? {
        retained.record(item);
        acks.sent.store(retained.sent, Ordering::Relaxed);
    }
    Ok(())
}

/// Encodes one queued item for the connection's mode; `false` if it was not written.
fn push<W: AsyncWrite + Unpin>(
    writer: &mut FrameWriter<W>,
    item: Outgoing,
    traffic: &Traffic,
    mode: Mode,
) -> io::Result<bool> {
    let len = item.weight();
    let res = match (mode, item) {
        (_, Outgoing::Flush(_)) => return Ok(false),
        (Mode::Tutorial, Outgoing::Message(m)) => writer.push(m.into_payload()),
        (Mode::Tutorial, _) => {
            // Senders refuse requests to tutorial peers; a response cannot arise either.
            tracing::debug!("request or response for a tutorial peer dropped");
            return Ok(false);
        }
        (Mode::Sockframe, Outgoing::Message(m)) => {
            writer.push_parts(Head::message(m.wire_kind()).as_slice(), m.into_payload())
        }
        (Mode::Sockframe, Outgoing::Request { id, message }) => writer.push_parts(
            Head::request(id, message.wire_kind()).as_slice(),
            message.into_payload(),
        ),
        (Mode::Sockframe, Outgoing::Response { id, result: Ok(m) }) => writer.push_parts(
            Head::response_ok(id, m.wire_kind()).as_slice(),
            m.into_payload(),
        ),
        (Mode::Sockframe, Outgoing::Response { id, result: Err(e) }) => {
            writer.push(wire::encode(&Frame::Response { id, result: Err(e) }))
        }
        (
            Mode::Sockframe,
            Outgoing::Transfer(crate::protocol::transfer::TransferFrame::Chunk {
                id,
                offset,
                data,
            }),
        ) => writer.push_parts(&crate::protocol::transfer::chunk_head(id, offset), data),
        (Mode::Sockframe, Outgoing::Transfer(frame)) => {
            writer.push(crate::protocol::transfer::encode(&frame))
        }
    };
    match res {
        Ok(()) => {
            traffic.add_out(len);
            Ok(true)
        }
        // Senders check the size against the peer's limit when queuing; this is a message
        // queued before a reconnect to a peer with a smaller limit. Dropping it (loudly)
        // keeps the connection and everything queued behind it.
        Err(e) => {
            tracing::warn!(error = %e, "message dropped: too large for this peer");
            Ok(false)
        }
    }
}

fn push_control<W: AsyncWrite + Unpin>(
    writer: &mut FrameWriter<W>,
    frame: &Frame,
) -> io::Result<()> {
    writer
        .push(wire::encode(frame))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::poll;
    use tokio::io::AsyncWriteExt;

    /// One tutorial frame of `len` bytes.
    fn frame(len: usize) -> Vec<u8> {
        [&(len as u32).to_le_bytes()[..], &vec![7u8; len]].concat()
    }

    /// A frame whose payload is `payload`.
    fn framed(payload: &[u8]) -> Vec<u8> {
        [&(payload.len() as u32).to_le_bytes()[..], payload].concat()
    }

    #[tokio::test]
    async fn frames_are_walked_in_place_and_stop_where_told() {
        let (mut peer, stream) = tokio::io::duplex(1 << 16);
        let mut reader = FrameReader::new(stream, 1024);
        let mut wire = Vec::new();
        for p in [&b"a"[..], b"z", b"", b"bc", b"stop", b"def", b"leave", b"g"] {
            wire.extend(framed(p));
        }
        wire.extend(2000u32.to_le_bytes()); // over the limit of 1024
        wire.extend(b"rest");
        peer.write_all(&wire).await.unwrap();
        // The first frames come the usual way (the very first read is a small one), and
        // the reads bring the rest along.
        assert_eq!(&reader.read_frame().await.unwrap().unwrap()[..], b"a");
        assert_eq!(&reader.read_frame().await.unwrap().unwrap()[..], b"z");

        let mut seen = Vec::new();
        let taken = reader.for_each_frame(|f| {
            seen.push(f.to_vec());
            if f == b"stop" { Step::Last } else { Step::Next }
        });
        assert_eq!(taken, 3);
        assert_eq!(seen, [&b""[..], b"bc", b"stop"]);

        seen.clear();
        let taken = reader.for_each_frame(|f| {
            seen.push(f.to_vec());
            if f == b"leave" {
                Step::Leave
            } else {
                Step::Next
            }
        });
        assert_eq!(taken, 1, "def taken, leave left");
        assert_eq!(seen, [&b"def"[..], b"leave"]);
        // What was left is still there, for the usual path.
        assert_eq!(&reader.try_frame().unwrap().unwrap()[..], b"leave");

        // A bad header stops the walk and is left for `try_frame` to report.
        seen.clear();
        assert_eq!(
            reader.for_each_frame(|f| {
                seen.push(f.to_vec());
                Step::Next
            }),
            1
        );
        assert_eq!(seen, [&b"g"[..]]);
        assert!(reader.try_frame().is_err());
    }

    #[tokio::test]
    async fn a_frame_still_arriving_is_not_walked() {
        let (mut peer, stream) = tokio::io::duplex(1 << 16);
        let mut reader = FrameReader::new(stream, 1024);
        let mut wire = framed(b"one");
        wire.extend(framed(b"1"));
        wire.extend(framed(b"two"));
        wire.extend(&framed(b"three")[..6]);
        peer.write_all(&wire).await.unwrap();
        assert_eq!(&reader.read_frame().await.unwrap().unwrap()[..], b"one");
        assert_eq!(&reader.read_frame().await.unwrap().unwrap()[..], b"1");
        let mut seen = Vec::new();
        assert_eq!(
            reader.for_each_frame(|f| {
                seen.push(f.to_vec());
                Step::Next
            }),
            1
        );
        assert_eq!(seen, [&b"two"[..]]);
        assert_eq!(reader.buffered(), 6, "the partial frame stays");
        peer.write_all(&framed(b"three")[6..]).await.unwrap();
        assert_eq!(&reader.read_frame().await.unwrap().unwrap()[..], b"three");
    }

    #[tokio::test]
    async fn a_grown_read_buffer_is_given_back_when_the_stream_goes_quiet() {
        let (mut peer, stream) = tokio::io::duplex(1 << 20);
        let mut reader = FrameReader::new(stream, 1024);

        // A burst: reads fill the buffer, which grows beyond 8 KiB.
        peer.write_all(&frame(64).repeat(4_000)).await.unwrap();
        for _ in 0..200 {
            assert_eq!(reader.read_frame().await.unwrap().unwrap().len(), 64);
        }
        assert!(reader.inner.read_buffer().capacity() > crate::codec::READ_ROOM);
        for _ in 200..4_000 {
            assert_eq!(reader.read_frame().await.unwrap().unwrap().len(), 64);
        }
        // Nothing more to read: the next read waits, and the buffer is given back.
        {
            let next = reader.read_frame();
            tokio::pin!(next);
            assert!(poll!(next).is_pending());
        }
        assert_eq!(reader.inner.read_buffer().capacity(), 0);

        // One message at a time: the usual 8 KiB buffer is kept while the stream waits.
        peer.write_all(&frame(64)).await.unwrap();
        assert_eq!(reader.read_frame().await.unwrap().unwrap().len(), 64);
        {
            let next = reader.read_frame();
            tokio::pin!(next);
            assert!(poll!(next).is_pending());
        }
        assert!(reader.inner.read_buffer().capacity() > 0);

        // And a frame still arriving keeps its buffer whatever its size.
        peer.write_all(&frame(64).repeat(2_000)).await.unwrap();
        peer.write_all(&frame(64)[..10]).await.unwrap();
        for _ in 0..2_000 {
            assert_eq!(reader.read_frame().await.unwrap().unwrap().len(), 64);
        }
        {
            let next = reader.read_frame();
            tokio::pin!(next);
            assert!(poll!(next).is_pending());
        }
        assert_eq!(reader.buffered(), 10);
        peer.write_all(&frame(64)[10..]).await.unwrap();
        assert_eq!(reader.read_frame().await.unwrap().unwrap().len(), 64);
    }
}

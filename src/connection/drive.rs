//! `drive`: one connection's reading and writing halves run together until it ends.

use std::io;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::batch::{Batch, MessageEvent};
use super::config::{Bucket, Heartbeat, Mode, RateLimit};
use super::control::{Control, Replies};
use super::delivery::Handling;
use super::inbound::Inbound;
use super::liveness::{FrameClock, Liveness, Timers, Traffic};
use super::outbound::{WriteLoop, drain, push_control};
use super::reader::FrameReader;
use super::writer::FrameWriter;
use crate::handler::Handler;
use crate::outbox::{FullPolicy, OutboxReceiver, OutboxSender};
use crate::protocol::message::{Frame, close_code};
use crate::reason::DisconnectReason;
use crate::request::{Pending, Request};
use crate::session::{Acks, Session};

/// How long a farewell `CLOSE` frame may take to write on an ungraceful close.
const FAREWELL: Duration = Duration::from_secs(1);

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
pub(crate) struct Drive<'a, E, R, C> {
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
    /// Where received events go, in batches (see [`MAX_BATCH`](super::batch::MAX_BATCH)).
    pub(crate) events: &'a mpsc::Sender<Batch<E>>,
    /// Whom received messages come from, for their events (see [`MessageEvent`]).
    pub(crate) message_tag: u64,
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
    /// After a graceful close of a session: the peer acknowledged after our `CLOSE`, so it
    /// had the close. A written `CLOSE` proves nothing: a link cut at that moment takes
    /// the write and loses it, and the peer would keep the session for its whole grace.
    pub(crate) close_confirmed: bool,
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
/// already read (by protocol detection) and not yet delivered. The reader, the writer and
/// `held` are lent by the caller, whose future owns them: moved in, they would take room in
/// both futures (176 bytes of every connection's task).
// On purpose not an `async fn`: see the comment in the body.
#[allow(clippy::manual_async_fn)]
pub(crate) fn drive<RD, WR, E, R, C>(
    reader: &mut FrameReader<RD>,
    writer: &mut FrameWriter<WR>,
    held: &mut Option<Bytes>,
    d: Drive<'_, E, R, C>,
) -> impl Future<Output = Outcome>
where
    RD: AsyncRead + Unpin,
    WR: AsyncWrite + Unpin,
    E: MessageEvent,
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
            // Boxed: 40 bytes that only a session's connection uses.
            (Some(r), Some(received)) => Some(Box::new(Acks::new(r, **received))),
            _ => None,
        };
        let heartbeat = d.heartbeat.filter(|_| d.mode == Mode::Sockframe);
        let inbound = Inbound {
            mode: d.mode,
            max_body: d.max_body,
            refuse_late_hello: std::sync::atomic::AtomicBool::new(d.refuse_late_hello),
            bucket: d.rate_limit.map(|l| std::sync::Mutex::new(Bucket::new(l))),
            events: d.events,
            message_tag: d.message_tag,
            on_request: &d.on_request,
            reply: d.reply,
            pending: d.pending,
            control: &control,
            traffic: d.traffic,
            liveness: &liveness,
            acks: acks.as_deref(),
            farewell: std::sync::atomic::AtomicBool::new(false),
            acks_read: std::sync::atomic::AtomicU64::new(0),
            truncated: std::sync::atomic::AtomicBool::new(false),
            transfers: d.transfers,
            batch_hint: std::sync::atomic::AtomicUsize::new(0),
        };

        // Events read but not yet handed over; outside the read future so that dropping that
        // future loses none of them.
        let mut batch: Batch<E> = Batch::default();
        let mut handling = d.handler.map(|handler| Handling {
            borrows: handler.borrows(),
            handler,
            reply: None,
            policy: d.reply_policy,
        });
        let mut clock = d.frame_timeout.map(FrameClock::new);
        let first = {
            let read = inbound.run(reader, held, &mut batch, &mut clock, &mut handling);
            let mut write = WriteLoop::new(
                writer,
                d.outbox,
                &control,
                d.traffic,
                d.mode,
                retained.as_deref_mut().zip(acks.as_deref()),
            );
            // The write loop's one waker from outside besides the outbox's (see `WriteLoop`).
            let close = d.close.cancelled();
            tokio::pin!(read, close);
            let mut timers = Timers::new(heartbeat, d.idle_timeout);
            let mut write_first = false;
            // Polled by hand rather than with `select!`, for one thing `select!` cannot do: when
            // the read side queues a handler's reply, poll the write side again in the same
            // pass, so the reply is written now. Left to the wake-up that queueing causes, it
            // would wait for the task to be scheduled again, which the multi-threaded runtime
            // does by waking another worker (a self-wake counts as a yield): that cost a
            // 64-byte round trip about 10 µs (35.5 against 27 µs at the median, measured).
            // Which side goes first alternates, as `select!`'s random start did, so neither
            // side can use up the task's cooperative budget every time and starve the other.
            // The same holds for everything the reader and the timers leave for the writer
            // (control frames, acknowledgements): the writer is polled again after them
            // whenever they did ([`Control::take_due`]), rather than woken.
            std::future::poll_fn(|cx| {
                write_first = !write_first;
                if write_first && let Poll::Ready(res) = write.poll(cx, close.as_mut()) {
                    return Poll::Ready(Ended::Write(res));
                }
                if let Poll::Ready(reason) = read.as_mut().poll(cx) {
                    return Poll::Ready(Ended::Read(reason));
                }
                if let Poll::Ready(reason) = timers.poll(cx, &liveness, &control) {
                    return Poll::Ready(Ended::Timeout(reason));
                }
                if (!write_first || control.take_due())
                    && let Poll::Ready(res) = write.poll(cx, close.as_mut())
                {
                    return Poll::Ready(Ended::Write(res));
                }
                Poll::Pending
            })
            .await
        };

        // What follows the connection, in a future of its own, awaited once: its locals
        // (several waits) would otherwise have room of their own in this future, beside the
        // connection's reading and writing, idle or not.
        async {
            let ended = |reason| Outcome {
                reason,
                flushed: false,
                farewell_received: false,
                truncated: false,
                close_confirmed: false,
            };
            let outcome = match first {
                Ended::Read(reason) => {
                    if matches!(reason, DisconnectReason::Protocol(_)) {
                        farewell(writer, d.mode, &reason).await;
                    }
                    ended(reason)
                }
                Ended::Write(Err(e)) => ended(DisconnectReason::from_io(&e)),
                Ended::Timeout(reason) => {
                    farewell(writer, d.mode, &reason).await;
                    ended(reason)
                }
                Ended::Write(Ok(())) => {
                    let order = (d.close_order)();
                    let mut flushed = false;
                    let mut close_confirmed = false;
                    if !order.graceful
                        && acks.is_some()
                        && order.reason != DisconnectReason::Replaced
                    {
                        // Even a hasty close ends a session on purpose: say so, or the peer would
                        // keep it waiting to be resumed.
                        farewell(writer, d.mode, &order.reason).await;
                    }
                    if order.graceful {
                        let deadline = Instant::now() + d.drain_deadline;
                        let finish = async {
                            // Keep reading while draining, so a peer that is blocked writing to us
                            // can make progress and read what we send.
                            let read =
                                inbound.run(reader, held, &mut batch, &mut clock, &mut handling);
                            let drain = async {
                                let session = retained.as_deref_mut().zip(acks.as_deref());
                                drain(
                                    writer,
                                    d.outbox,
                                    control.replies,
                                    d.traffic,
                                    d.mode,
                                    session,
                                )
                                .await?;
                                if d.mode == Mode::Sockframe {
                                    push_control(writer, &close_frame(&order.reason))?;
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
                            // (The peer answers a session's `CLOSE` with an `ACK`.)
                            let acks_before = inbound.acks_read.load(Ordering::Relaxed);
                            // Our side is done; wait for the peer to close theirs so that nothing
                            // we wrote is lost to a reset.
                            read.await;
                            close_confirmed =
                                inbound.acks_read.load(Ordering::Relaxed) > acks_before;
                        };
                        // Boxed: only a closing connection waits here, and its reads and writes
                        // together would otherwise size every connection's future.
                        let _ = Box::pin(tokio::time::timeout_at(deadline, finish)).await;
                    }
                    Outcome {
                        reason: order.reason,
                        flushed,
                        farewell_received: false,
                        truncated: false,
                        close_confirmed,
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
                if push_control(writer, &Frame::Ack(received)).is_ok() {
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
        .await
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

//! The sending half of `drive`: the write loop, the close's drain, and how queued items
//! are encoded.

use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use tokio::io::AsyncWrite;
use tokio_util::sync::WaitForCancellationFuture;

use super::config::Mode;
use super::control::{Control, Replies};
use super::liveness::Traffic;
use super::writer::FrameWriter;
use crate::outbox::{OutboxReceiver, Weigh};
use crate::outgoing::{FlushWaiter, Outgoing};
use crate::protocol::message::{self as wire, Frame, Head};
use crate::session::{Acks, Retained};

/// Stop gathering queued frames and write once this many bytes are pending.
///
/// What a batch costs in memory: only payloads up to 512 bytes are copied into it (larger
/// ones, such as a broadcast's shared buffer, are referenced: `FrameWriter::push_parts`), so
/// a connection that is writing holds at most this much of copies, plus 48 bytes per
/// referenced payload; once it has nothing more to write it gives the buffer back
/// (`FrameWriter::release_idle`, below), so idle connections hold at most 4 KiB of it
/// whatever their largest batch was. Measured: 10,000 readers of 1 KiB broadcasts, 512 in
/// flight, peaked at 5.5 GiB of server memory when each writer copied and kept its batch,
/// 414 MiB now (medians of three runs) (docs/benchmarks.md, "Broadcast memory: the writers' buffers").
const BATCH_BYTES: usize = 256 * 1024;

/// Writes queued frames in batches until `close` fires (returns `Ok`) or a write fails.
///
/// With a session, every application frame written is kept in `session`'s window until the
/// peer acknowledges it; the frames kept from an earlier connection are written first, and
/// a full window stops the loop from taking more from the outbox until acknowledgements
/// arrive.
///
/// Polled by hand ([`poll`](Self::poll)) rather than an `async fn` around a `select!`: it
/// waits on five things (the close token, control frames, a handler's replies, the outbox,
/// a session's acknowledgements), and as a future it held one nested future for each of
/// them and for its flushes, 512 bytes of every connection's task, idle or not. Here it is
/// its state alone: the close token's future is `drive`'s (its one waker from outside
/// besides the outbox's, which `poll_recv` parks without a future), and the reader's news
/// (control frames, replies, acknowledgements) needs no waker at all: the reader runs in
/// this task, and `drive` polls the writer again when the reader left something
/// ([`Control::take_due`]).
pub(super) struct WriteLoop<'a, 'c, W> {
    lane: Lane<'a, W>,
    outbox: &'a mut OutboxReceiver,
    control: &'a Control<'c>,
    session: Option<(&'a mut Retained, &'a Acks)>,
    stage: Stage,
    /// The last `poll_recv` left this task's waker in the outbox.
    parked: bool,
}

/// Where the write loop is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Not polled yet: a session's retained frames go first.
    Start,
    /// Writing a session's retained frames again.
    Resending,
    /// Waiting for something to write.
    Waiting,
    /// Writing a batch.
    Flushing,
    /// Every sender of the outbox is gone: nothing more will be queued; waits for the close.
    Senderless,
}

impl<'a, 'c, W: AsyncWrite + Unpin> WriteLoop<'a, 'c, W> {
    pub(super) fn new(
        writer: &'a mut FrameWriter<W>,
        outbox: &'a mut OutboxReceiver,
        control: &'a Control<'c>,
        traffic: &'a Traffic,
        mode: Mode,
        session: Option<(&'a mut Retained, &'a Acks)>,
    ) -> Self {
        WriteLoop {
            lane: Lane {
                writer,
                traffic,
                mode,
                flushed: Vec::new(),
                ack_now: false,
            },
            outbox,
            control,
            session,
            stage: Stage::Start,
            parked: false,
        }
    }

    /// Writes what there is to write; ready once `close` fires (`Ok`) or a write fails.
    /// Not to be polled again once ready.
    pub(super) fn poll(
        &mut self,
        cx: &mut Context<'_>,
        close: Pin<&mut WaitForCancellationFuture<'_>>,
    ) -> Poll<io::Result<()>> {
        if self.stage == Stage::Start {
            // A session's retained frames go first, even when the close has fired already:
            // pushed, they are written by a graceful close's drain.
            self.stage = Stage::Waiting;
            if let Some((retained, _)) = &self.session
                && retained.unacked() > 0
            {
                for item in retained.frames() {
                    self.lane.push(item.clone())?;
                }
                // Ask for an acknowledgement of the resent frames, which may be all there is
                // to send: the peer would otherwise acknowledge them only with its own
                // traffic.
                push_control(self.lane.writer, &Frame::AckRequest)?;
                self.stage = Stage::Resending;
            }
        }
        // The close goes first, whatever else is ready: it also interrupts a flush stuck on a
        // peer that does not read (the frames stay buffered in the writer, and a graceful
        // close carries on writing them).
        if close.poll(cx).is_ready() {
            return Poll::Ready(Ok(()));
        }
        // Whatever was left for the writer until now is looked at in this poll.
        self.control.take_due();
        loop {
            match self.stage {
                Stage::Resending => {
                    ready!(self.lane.writer.poll_flush(cx))?;
                    self.stage = Stage::Waiting;
                }
                Stage::Waiting => {
                    if !self.wait(cx)? {
                        return Poll::Pending;
                    }
                    self.gather()?;
                    self.stage = Stage::Flushing;
                }
                Stage::Flushing => {
                    ready!(self.lane.writer.poll_flush(cx))?;
                    for waiter in self.lane.flushed.drain(..) {
                        waiter.done();
                    }
                    // Nothing more to write right now: the connection may be idle for long,
                    // and must not keep the memory of its largest batch (see
                    // `FrameWriter::release_idle`).
                    if self.outbox.is_empty() && self.control.replies.is_empty() {
                        self.lane.writer.release_idle();
                    }
                    self.stage = Stage::Waiting;
                }
                Stage::Senderless => return Poll::Pending,
                Stage::Start => unreachable!("the write loop has started"),
            }
        }
    }

    /// Whether there is something to write now (with the first item taken): control frames
    /// due, a handler's reply, an item in the outbox, in that order. Acknowledgements free
    /// room in the window and finish flushes: the window is looked at again at every poll
    /// (`drive` polls this loop when the reader read one), so a flush of an idle connection
    /// does not wait for the next frame to write, such as a heartbeat's ping.
    fn wait(&mut self, cx: &mut Context<'_>) -> io::Result<bool> {
        let room = match &mut self.session {
            Some((retained, acks)) => {
                retained.release(acks.peer_acked.load(Ordering::Relaxed));
                retained.has_room()
            }
            None => true,
        };
        if self.control.any_due() {
            self.lane.control(self.control)?;
            return Ok(true);
        }
        if !room {
            return Ok(false);
        }
        if !self.control.replies.is_empty() {
            return Ok(true);
        }
        let polled = self.outbox.poll_recv(cx);
        self.parked = polled.is_pending();
        match polled {
            Poll::Ready(Some(item)) => {
                self.lane.take(item, &mut self.session)?;
                Ok(true)
            }
            Poll::Ready(None) => {
                self.stage = Stage::Senderless;
                Ok(false)
            }
            Poll::Pending => Ok(false),
        }
    }

    /// Gathers what is queued right now into one batch: the handler's replies first (they
    /// are already in order behind what was written), then the outbox; then the control
    /// frames due, and a session's acknowledgements.
    fn gather(&mut self) -> io::Result<()> {
        let (lane, session, control) = (&mut self.lane, &mut self.session, self.control);
        while lane.writer.pending() < BATCH_BYTES {
            if session.as_ref().is_none_or(|(r, _)| r.has_room())
                && let Some(reply) = control.replies.pop()
            {
                lane.take(Outgoing::Message(reply), session)?;
            } else if session.as_ref().is_none_or(|(r, _)| r.has_room())
                && let Some(item) = self.outbox.try_recv()
            {
                lane.take(item, session)?;
            } else {
                break;
            }
        }
        lane.control(control)?;
        if let Some((retained, acks)) = session {
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
        Ok(())
    }
}

impl<W> Drop for WriteLoop<'_, '_, W> {
    fn drop(&mut self) {
        // A waker parked in the outbox keeps this task allocated, and a session's outbox
        // outlives its connection (see `OutboxReceiver::recv`).
        if self.parked {
            self.outbox.unpark();
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
pub(super) async fn drain<W: AsyncWrite + Unpin>(
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

pub(super) fn push_control<W: AsyncWrite + Unpin>(
    writer: &mut FrameWriter<W>,
    frame: &Frame,
) -> io::Result<()> {
    writer
        .push(wire::encode(frame))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
}

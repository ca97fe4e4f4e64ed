//! The sending half of `drive`: the write loop, the close's drain, and how queued items
//! are encoded.

use std::io;
use std::sync::atomic::Ordering;
use std::task::Poll;

use tokio::io::AsyncWrite;
use tokio_util::sync::CancellationToken;

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
pub(super) async fn write_loop<W: AsyncWrite + Unpin>(
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
        // Nothing more to write right now: the connection may be idle for long, and must not
        // keep the memory of its largest batch (see `FrameWriter::release_idle`).
        if outbox.is_empty() && control.replies.is_empty() {
            lane.writer.release_idle();
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

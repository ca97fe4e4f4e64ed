//! The receiving half of `drive`: the general loop that reads and routes every kind of frame.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use tokio::io::AsyncRead;
use tokio::sync::mpsc;

use super::batch::{Batch, MAX_BATCH, MessageEvent};
use super::config::{Bucket, Mode};
use super::control::Control;
use super::delivery::Handling;
use super::liveness::{FrameClock, Liveness, Traffic};
use super::reader::FrameReader;
use crate::message::Message;
use crate::outbox::OutboxSender;
use crate::protocol::message::{self as wire, Frame};
use crate::reason::DisconnectReason;
use crate::request::{Pending, Request};
use crate::session::Acks;

/// The receiving half of `drive`: turns frames into events, answers pings, routes responses.
pub(super) struct Inbound<'a, E, R> {
    pub(super) mode: Mode,
    pub(super) max_body: usize,
    /// See [`Drive::refuse_late_hello`](super::Drive::refuse_late_hello); cleared after the
    /// first frame.
    pub(super) refuse_late_hello: std::sync::atomic::AtomicBool,
    /// The rate limit's state (a mutex only to be `Sync`: one task uses it).
    pub(super) bucket: Option<std::sync::Mutex<Bucket>>,
    pub(super) events: &'a mpsc::Sender<Batch<E>>,
    /// See [`Drive::message_tag`](super::Drive::message_tag).
    pub(super) message_tag: u64,
    pub(super) on_request: &'a R,
    pub(super) reply: &'a OutboxSender,
    pub(super) pending: &'a Pending,
    pub(super) control: &'a Control<'a>,
    pub(super) traffic: &'a Traffic,
    pub(super) liveness: &'a Liveness,
    /// The session's counters, when the connection carries one.
    pub(super) acks: Option<&'a Acks>,
    /// Set when the peer's `CLOSE` frame arrives.
    pub(super) farewell: std::sync::atomic::AtomicBool,
    /// `ACK` frames read: one arriving after our `CLOSE` confirms that the peer had it.
    pub(super) acks_read: std::sync::atomic::AtomicU64,
    /// Set when the stream ends in the middle of a frame.
    pub(super) truncated: std::sync::atomic::AtomicBool,
    pub(super) transfers: Option<&'a crate::transfer::Inbox>,
    /// How many events the last batch held: the next one starts with room for as many, not
    /// growing (and copying) from 4 to 256 (see [`push_event`](Self::push_event)).
    pub(super) batch_hint: std::sync::atomic::AtomicUsize,
}

/// What a frame waits for before it is handled (see [`Inbound::frame_now`]).
enum Wait {
    /// The rate limit's next token, this long from now.
    Throttle(std::time::Duration),
    /// Room in the event stream for the events read before it.
    Flush,
    /// The pong waiting to be written (a ping's).
    Pong,
    /// Room in the file transfer engine's inbox.
    Inbox,
}

impl<E, R> Inbound<'_, E, R>
where
    E: MessageEvent,
    R: Fn(Request) -> E,
{
    /// Reads until the stream ends or breaks the rules.
    ///
    /// Cancel-safe: a frame read but not yet handed on stays in `held` (outside this future)
    /// and is handled by the next call.
    pub(super) async fn run<RD: AsyncRead + Unpin>(
        &self,
        reader: &mut FrameReader<RD>,
        held: &mut Option<Bytes>,
        batch: &mut Batch<E>,
        clock: &mut Option<FrameClock>,
        handling: &mut Option<Handling<'_>>,
    ) -> DisconnectReason {
        loop {
            // A batch filled by the last frame is handed over at once, before anything else.
            if batch.len() >= MAX_BATCH {
                self.flush(batch).await;
            }
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
                if let Err(reason) = self.drain(reader, batch, handling.as_mut()) {
                    return reason;
                }
                if handling.as_ref().is_some_and(|h| h.reply.is_some()) {
                    continue;
                }
            }
            if held.is_none() {
                // Frames already complete in the buffer join the batch without waiting;
                // before waiting for more bytes, the batch is handed over.
                let mut next = reader.try_frame();
                if matches!(next, Ok(None)) {
                    // Moved out first: a value kept across the waits below would be kept in
                    // this future, idle or not.
                    drop(next);
                    self.flush(batch).await;
                    if self.acks.is_some_and(|a| a.ack_due()) {
                        self.control.ack();
                    }
                    next = self.read(reader, clock).await;
                }
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
                    // (Checked here: the common case needs no future set up.)
                    if (!batch.is_empty() || self.bucket.is_some())
                        && let Err(reason) = self.before_handler(batch).await
                    {
                        return reason;
                    }
                    if let Err(reason) = self.handle(h, held, None) {
                        return reason;
                    }
                    continue;
                }
                // The rate limit before the event is made: a wait holds no event.
                if self.bucket.is_some()
                    && let Err(reason) = self.limit(batch).await
                {
                    return reason;
                }
                // Moved, not cloned: a clone and a drop are two atomic operations on the read
                // buffer's reference count per message.
                let frame = held.take().expect("held frame");
                let len = frame.len();
                self.accept(
                    held,
                    E::message_event(self.message_tag, Message::untyped(frame)),
                    len,
                    batch,
                );
                continue;
            }
            // Messages, most of the traffic, take the frame by value instead of parsing a
            // second reference to it.
            let kind = wire::message_kind(raw);
            if let (Some(kind), Some(h)) = (kind, handling.as_mut()) {
                if (!batch.is_empty() || self.bucket.is_some())
                    && let Err(reason) = self.before_handler(batch).await
                {
                    return reason;
                }
                if let Err(reason) = self.handle(h, held, Some(kind)) {
                    return reason;
                }
                continue;
            }
            if let Some(kind) = kind {
                // Under a rate limit the message is checked first (a bad one is refused
                // before any wait), then waits for its token.
                let checked = self.bucket.is_some();
                if checked {
                    if let Err(reason) = self.checked_body(raw, kind) {
                        return reason;
                    }
                    if let Err(reason) = self.limit(batch).await {
                        return reason;
                    }
                }
                let frame = held.take().expect("held frame");
                let body = if checked {
                    wire::into_message_body(frame)
                } else {
                    match self.message_body(frame, kind) {
                        Ok(body) => body,
                        Err(reason) => return reason,
                    }
                };
                let len = body.len();
                self.accept(
                    held,
                    E::message_event(self.message_tag, Message::from_wire(kind, body)),
                    len,
                    batch,
                );
                continue;
            }
            // Every other frame: handled at once, unless it must wait first (a rate limit
            // over, a full event stream, a pong not yet written, a file transfer), which a
            // future of its own does, boxed: what a frame's handling keeps across its waits
            // would otherwise be kept in this loop's future beside the idle wait, in every
            // connection's task.
            let done = match self.frame_now(held, batch, false) {
                Ok(step) => step.is_none(),
                Err(reason) => return reason,
            };
            if !done && let Err(reason) = Box::pin(self.frame_after_wait(held, batch)).await {
                return reason;
            }
        }
    }

    /// The held frame, of any kind but the ones [`run`](Self::run) takes itself, handled if
    /// nothing must be waited for first: `Ok(None)` when it is done, else what to wait for
    /// (the frame stays held). `admitted`: a rate limit's token was taken for it already.
    fn frame_now(
        &self,
        held: &mut Option<Bytes>,
        batch: &mut Batch<E>,
        admitted: bool,
    ) -> Result<Option<Wait>, DisconnectReason> {
        let parsed = wire::parse(held.as_ref().expect("held frame"));
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
            return Err(DisconnectReason::Protocol(e.to_string()));
        }
        let limited = |this: &Self| match admitted {
            true => Ok(None),
            false => this.over_limit().map(|wait| wait.map(Wait::Throttle)),
        };
        match parsed {
            Err(e) => return Err(DisconnectReason::Protocol(e.to_string())),
            Ok(Frame::Message { kind, body }) => {
                if let Some(wait) = limited(self)? {
                    return Ok(Some(wait));
                }
                let len = body.len();
                let event = E::message_event(self.message_tag, Message::from_wire(kind, body));
                self.accept(held, event, len, batch);
            }
            Ok(Frame::Request { id, kind, body }) => {
                if let Some(wait) = limited(self)? {
                    return Ok(Some(wait));
                }
                let len = body.len();
                let request = Request::new(id, Message::from_wire(kind, body), self.reply.clone());
                self.accept(held, (self.on_request)(request), len, batch);
            }
            Ok(Frame::Response { id, result }) => {
                if let Some(acks) = self.acks {
                    // Counted frames are in the application's hands, in order: the messages
                    // before this response go first.
                    if !self.try_flush(batch) {
                        return Ok(Some(Wait::Flush));
                    }
                    acks.received_one();
                }
                held.take();
                self.pending.complete(
                    id,
                    result.map(|(kind, body)| Message::from_wire(kind, body)),
                );
            }
            Ok(Frame::Ping(nonce)) => {
                // One pong waiting is enough. While it waits (the peer does not read what we
                // write), a peer that keeps pinging is not read either: TCP slows it down,
                // and its silence ends in a heartbeat timeout.
                if self.control.pong.load(Ordering::Acquire) {
                    return Ok(Some(Wait::Pong));
                }
                held.take();
                self.control.pong(nonce);
            }
            Ok(Frame::Pong(_) | Frame::Unknown(_)) => {
                held.take();
            }
            Ok(Frame::Ack(n)) => {
                let Some(acks) = self.acks else {
                    return Err(DisconnectReason::Protocol(
                        "acknowledgement outside a session".into(),
                    ));
                };
                if let Err(e) = acks.peer_ack(n) {
                    return Err(DisconnectReason::Protocol(e));
                }
                self.acks_read.fetch_add(1, Ordering::Relaxed);
                // A writer whose window was full, or whose flush waits, looks again.
                self.control.wake_writer();
                held.take();
            }
            Ok(Frame::AckRequest) => {
                if self.acks.is_none() {
                    return Err(DisconnectReason::Protocol(
                        "acknowledgement request outside a session".into(),
                    ));
                }
                held.take();
                self.control.ack();
            }
            Ok(Frame::Close { code, text }) => {
                self.farewell.store(true, Ordering::Relaxed);
                return Err(DisconnectReason::from_close(code, &text));
            }
            Ok(Frame::Transfer(frame)) => {
                // Events read before a transfer frame are handed over first, so that an offer
                // is never reported before a message sent ahead of it.
                if !self.try_flush(batch) {
                    return Ok(Some(Wait::Flush));
                }
                let Some(inbox) = self.transfers else {
                    return Err(DisconnectReason::Protocol(
                        "file transfer frame on a connection without file transfer".into(),
                    ));
                };
                // Waiting for room pauses reading: a receiver whose disk is behind slows the
                // sender through TCP instead of buffering.
                match inbox.try_reserve() {
                    Ok(slot) => {
                        held.take();
                        self.transfer_in(frame, slot);
                    }
                    Err(mpsc::error::TrySendError::Full(())) => return Ok(Some(Wait::Inbox)),
                    Err(mpsc::error::TrySendError::Closed(())) => {
                        return Err(DisconnectReason::Closed);
                    }
                }
            }
            Ok(Frame::Welcome(_) | Frame::Reject { .. }) => {
                return Err(DisconnectReason::Protocol(
                    "handshake frame after the handshake".into(),
                ));
            }
        }
        Ok(None)
    }

    /// The held frame, after what [`frame_now`](Self::frame_now) found it must wait for.
    async fn frame_after_wait(
        &self,
        held: &mut Option<Bytes>,
        batch: &mut Batch<E>,
    ) -> Result<(), DisconnectReason> {
        let mut admitted = false;
        loop {
            let Some(wait) = self.frame_now(held, batch, admitted)? else {
                return Ok(());
            };
            match wait {
                Wait::Throttle(first) => {
                    self.throttle(batch, first).await?;
                    admitted = true;
                }
                Wait::Flush => self.flush(batch).await,
                Wait::Pong => self.control.pong_taken.notified().await,
                Wait::Inbox => {
                    let inbox = self.transfers.expect("a transfer frame waits for an inbox");
                    let Ok(slot) = inbox.reserve().await else {
                        return Err(DisconnectReason::Closed);
                    };
                    let Ok(Frame::Transfer(frame)) =
                        wire::parse(held.as_ref().expect("held frame"))
                    else {
                        unreachable!("the held frame was a transfer frame");
                    };
                    held.take();
                    self.transfer_in(frame, slot);
                    return Ok(());
                }
            }
        }
    }

    /// A file transfer frame goes to the transfer engine, into the room reserved for it.
    fn transfer_in(
        &self,
        frame: crate::protocol::transfer::TransferFrame,
        slot: mpsc::Permit<'_, crate::transfer::Input>,
    ) {
        // Application frames: counted as traffic, and they keep a connection from going
        // idle.
        self.traffic.add_in(frame.weight());
        self.liveness.message();
        if let Some(acks) = self.acks {
            // In the engine's hands: received, in order after the events handed over first.
            acks.add_bytes(frame.weight());
            acks.received_one();
        }
        slot.send(crate::transfer::Input::Frame(frame));
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
        std::future::poll_fn(|cx| {
            if let std::task::Poll::Ready(frame) = reader.poll_frame(cx) {
                clock.started = None;
                return std::task::Poll::Ready(frame);
            }
            clock.poll_expired(reader.buffered(), cx).map(Err)
        })
        .await
    }

    /// The body of the message `frame` of `kind`, taken by value (see
    /// [`wire::into_message_body`]) and checked against the size limit.
    pub(super) fn message_body(
        &self,
        frame: Bytes,
        kind: wire::Kind,
    ) -> Result<Bytes, DisconnectReason> {
        self.checked_body(&frame, kind)?;
        Ok(wire::into_message_body(frame))
    }

    /// The body of the message `frame` of `kind`, lent: checked (UTF-8 for text) and against
    /// the size limit.
    pub(super) fn checked_body<'f>(
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
}

//! The receiving half of `drive`: the general loop that reads and routes every kind of frame.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use tokio::io::AsyncRead;
use tokio::sync::mpsc;

use super::batch::{Batch, MessageEvent};
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
    /// Set when a handler's reply was queued: `drive` then polls the writer at once.
    pub(super) replied: std::sync::atomic::AtomicBool,
    /// How many events the last batch held: the next one starts with room for as many, not
    /// growing (and copying) from 4 to 256 (see [`push_event`](Self::push_event)).
    pub(super) batch_hint: std::sync::atomic::AtomicUsize,
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
                    let (event, len) = (
                        E::message_event(self.message_tag, Message::untyped(raw.clone())),
                        raw.len(),
                    );
                    if let Err(reason) = self.deliver(held, event, len, batch).await {
                        return reason;
                    }
                } else {
                    // Moved, not cloned: a clone and a drop are two atomic operations on the
                    // read buffer's reference count per message.
                    let frame = held.take().expect("held frame");
                    let len = frame.len();
                    self.accept(
                        held,
                        E::message_event(self.message_tag, Message::untyped(frame)),
                        len,
                        batch,
                    );
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
                    E::message_event(self.message_tag, Message::from_wire(kind, body)),
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
                    let event = E::message_event(self.message_tag, Message::from_wire(kind, body));
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
                    self.acks_read.fetch_add(1, Ordering::Relaxed);
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

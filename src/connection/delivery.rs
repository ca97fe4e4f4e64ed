//! How received messages reach the application: batches of events, or the connection's
//! handler and its replies, after the rate limit.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::batch::{Batch, MessageEvent};
use super::config::RateAction;
use super::inbound::Inbound;
use crate::handler::Handler;
use crate::message::{Message, MessageRef};
use crate::outbox::FullPolicy;
use crate::protocol::message as wire;
use crate::reason::DisconnectReason;
use crate::request::Request;

/// A connection's [`Handler`], and its reply while that waits for room in the outbox.
pub(super) struct Handling<'h> {
    pub(super) handler: &'h mut dyn Handler,
    /// [`Handler::borrows`], asked once.
    pub(super) borrows: bool,
    /// Kept outside the read future, like a held frame, so that cancelling that future
    /// loses no reply: the next call sends it first.
    pub(super) reply: Option<Message>,
    pub(super) policy: FullPolicy,
}

impl Handling<'_> {
    /// Gives `message` to the handler, lent if it borrows (a message read alone, not in a
    /// run that [`Inbound::lend`] lends in place).
    #[inline]
    pub(super) fn call(&mut self, message: Message) -> Option<Message> {
        if self.borrows {
            self.handler.message_ref(MessageRef::from(&message))
        } else {
            self.handler.message(message)
        }
    }
}

impl<E, R> Inbound<'_, E, R>
where
    E: MessageEvent,
    R: Fn(Request) -> E,
{
    /// What comes before a message goes to the connection's handler: the events read before
    /// it reach the application first (a session's count then stays in order too: it counts
    /// a frame once the application has it), then the rate limit. Last before the message is
    /// taken ([`handle`](Self::handle)): no wait comes between a token taken from the rate
    /// limit and the message it admits.
    pub(super) async fn before_handler(
        &self,
        batch: &mut Batch<E>,
    ) -> Result<(), DisconnectReason> {
        if !batch.is_empty() {
            self.flush(batch).await;
        }
        if self.bucket.is_some() {
            self.limit(batch).await?;
        }
        Ok(())
    }

    /// Gives the held message frame (of `kind`; `None` for the tutorial framing) to the
    /// connection's handler, after [`before_handler`](Self::before_handler). Its reply, if
    /// any, stays in `h`: [`run`](Self::run) queues it first thing in its next turn, so that
    /// no wait for room in the queue is part of this step.
    pub(super) fn handle(
        &self,
        h: &mut Handling<'_>,
        held: &mut Option<Bytes>,
        kind: Option<wire::Kind>,
    ) -> Result<(), DisconnectReason> {
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
        Ok(())
    }

    /// Queues the handler's reply, if it has one, for this connection's writer.
    pub(super) async fn send_reply(&self, h: &mut Handling<'_>) -> Result<(), DisconnectReason> {
        // A reply that finds no room stays in `h` while waiting, so that cancelling this
        // future loses nothing. Not reading meanwhile is the point: TCP slows the peer.
        while !self.queue_reply(h)? {
            // Only the writer makes room, and it runs in this task: nothing can change
            // between the failed push and this wait. Boxed, as the waits under pressure are
            // (see `flush`): only a full reply queue waits, and the wait would otherwise be
            // part of every connection's future.
            let room = Box::pin(self.control.replies.room.notified());
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
    pub(super) fn queue_reply(&self, h: &mut Handling<'_>) -> Result<bool, DisconnectReason> {
        let Some(reply) = h.reply.take() else {
            return Ok(true);
        };
        match self.control.replies.try_push(reply) {
            Ok(()) => {
                // The writer runs in this task: `drive` polls it again after this pass.
                self.control.wake_writer();
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
    ///
    /// The common case, a token at hand, does not wait: the wait is a future of its own,
    /// boxed when it happens (a pause's flush and sleep would otherwise be part of every
    /// connection's future, limited or not).
    pub(super) async fn limit(&self, batch: &mut Batch<E>) -> Result<(), DisconnectReason> {
        if let Some(wait) = self.over_limit()? {
            Box::pin(self.throttle(batch, wait)).await?;
        }
        Ok(())
    }

    /// Takes a token from the rate limit: `None` when there was one (or there is no limit),
    /// else how long to wait for the next; an error when the limit disconnects.
    pub(super) fn over_limit(&self) -> Result<Option<std::time::Duration>, DisconnectReason> {
        let Some(bucket) = &self.bucket else {
            return Ok(None);
        };
        let mut bucket = bucket.lock().unwrap_or_else(|e| e.into_inner());
        match bucket.take() {
            Ok(()) => Ok(None),
            Err(_) if bucket.limit.action == RateAction::Disconnect => {
                Err(DisconnectReason::RateLimited)
            }
            Err(wait) => Ok(Some(wait)),
        }
    }

    /// Pauses for the rate limit (`wait` first), until a token is taken.
    pub(super) async fn throttle(
        &self,
        batch: &mut Batch<E>,
        mut wait: std::time::Duration,
    ) -> Result<(), DisconnectReason> {
        loop {
            // What came within the limit goes out before the pause.
            self.flush(batch).await;
            // Not reading meanwhile is the point; the peer's silence is ours.
            self.liveness.paused.store(true, Ordering::Relaxed);
            tokio::time::sleep(wait).await;
            self.liveness.paused.store(false, Ordering::Relaxed);
            self.liveness.frame();
            match self.over_limit()? {
                None => return Ok(()),
                Some(next) => wait = next,
            }
        }
    }

    /// The held frame becomes an event in the batch.
    pub(super) fn accept(
        &self,
        held: &mut Option<Bytes>,
        event: E,
        len: usize,
        batch: &mut Batch<E>,
    ) {
        held.take();
        self.count_in(len);
        self.push_event(batch, event);
    }

    /// Adds an event to the batch.
    pub(super) fn push_event(&self, batch: &mut Batch<E>, event: E) {
        batch.push(event, &self.batch_hint);
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
    pub(super) async fn flush(&self, batch: &mut Batch<E>) {
        if self.try_flush(batch) {
            return;
        }
        self.liveness.paused.store(true, Ordering::Relaxed);
        // Boxed, here only: the wait's future (128 bytes) would otherwise be part of every
        // connection's task, idle or not.
        let slot = Box::pin(self.events.reserve()).await.map_err(|_| ());
        self.liveness.paused.store(false, Ordering::Relaxed);
        // The peer had no chance to be heard meanwhile: its clocks restart now.
        self.liveness.frame();
        self.liveness.message();
        self.hand_over(batch, slot.ok());
    }

    /// [`flush`](Self::flush) without waiting: `false` (and the batch kept) when the event
    /// stream is full.
    pub(super) fn try_flush(&self, batch: &mut Batch<E>) -> bool {
        if batch.is_empty() {
            return true;
        }
        match self.events.try_reserve() {
            Ok(slot) => self.hand_over(batch, Some(slot)),
            Err(mpsc::error::TrySendError::Closed(())) => self.hand_over(batch, None),
            Err(mpsc::error::TrySendError::Full(())) => return false,
        }
        true
    }

    /// Sends the batch into `slot`, or drops it when the event stream is closed.
    fn hand_over(&self, batch: &mut Batch<E>, slot: Option<mpsc::Permit<'_, Batch<E>>>) {
        let count = batch.len() as u64;
        batch.hint(&self.batch_hint);
        match slot {
            Some(slot) => slot.send(std::mem::take(batch)),
            // Without a listener events are discarded, but the connection is still served.
            None => batch.clear(),
        }
        // A session counts a frame as received once the application has it (in its event
        // stream); acknowledgements never run ahead of that.
        if let Some(acks) = self.acks {
            acks.received_many(count);
        }
    }
}

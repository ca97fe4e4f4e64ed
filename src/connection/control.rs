//! What the reading half hands the writing half: control frames due, and a handler's replies.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::message::Message;

/// Control frames waiting for the writer: a ping to send, a ping to answer, an
/// acknowledgement due.
///
/// Flags rather than a queue: at most one of each is ever worth sending (one pong proves us
/// alive whichever ping it answers, and an `ACK` carries the latest count), so a peer that
/// floods pings gets one pong per write, not a queue of them; and a channel's first block
/// cost 2 KiB per connection, idle or not. Both halves run in one task; atomics only
/// because the connection's future must be `Send`.
///
/// Nothing here wakes the task: whatever sets a flag (the reader, `drive`'s timers) runs in
/// the connection's own task, which `drive` is polling right then, and it sets [`due`] for
/// `drive` to poll the writer again before it gives the thread back. A waker (a `Notify`
/// and the future waiting on it) would cost every connection's task its size, idle or not,
/// and a self-wake would schedule the task once more for nothing.
///
/// [`due`]: Control::due
#[derive(Debug)]
pub(super) struct Control<'a> {
    /// A ping to send, and its nonce.
    pub(super) ping: std::sync::atomic::AtomicBool,
    pub(super) ping_nonce: AtomicU64,
    /// A pong to send, and the nonce of the ping it answers.
    pub(super) pong: std::sync::atomic::AtomicBool,
    pub(super) pong_nonce: AtomicU64,
    /// Send an `ACK` now (sessions).
    pub(super) ack: std::sync::atomic::AtomicBool,
    /// Something for the writer was left here (or a handler's reply queued, or an
    /// acknowledgement read): `drive` polls the writer again (see [`Control::take_due`]).
    pub(super) due: std::sync::atomic::AtomicBool,
    /// Wakes a reader waiting for the pending pong to be taken.
    pub(super) pong_taken: tokio::sync::Notify,
    /// A handler's replies (not control frames, but handed over the same way). Owned by
    /// the caller: what is queued outlives the connection, for a session's next one.
    pub(super) replies: &'a Replies,
}

impl<'a> Control<'a> {
    pub(super) fn new(replies: &'a Replies) -> Self {
        Control {
            ping: Default::default(),
            ping_nonce: Default::default(),
            pong: Default::default(),
            pong_nonce: Default::default(),
            ack: Default::default(),
            due: Default::default(),
            pong_taken: Default::default(),
            replies,
        }
    }

    pub(super) fn ping(&self, nonce: u64) {
        self.ping_nonce.store(nonce, Ordering::Relaxed);
        self.ping.store(true, Ordering::Release);
        self.wake_writer();
    }

    pub(super) fn pong(&self, nonce: u64) {
        self.pong_nonce.store(nonce, Ordering::Relaxed);
        self.pong.store(true, Ordering::Release);
        self.wake_writer();
    }

    /// Asks `drive` to poll the writer again, which has something new to look at.
    #[inline]
    pub(super) fn wake_writer(&self) {
        self.due.store(true, Ordering::Relaxed);
    }

    /// Whether the writer has something new to look at since the last call.
    #[inline]
    pub(super) fn take_due(&self) -> bool {
        // A load first: most passes find nothing, and a swap is a locked instruction.
        self.due.load(Ordering::Relaxed) && self.due.swap(false, Ordering::Relaxed)
    }

    /// Whether a control frame is due (the writer's check; it takes them with the flags).
    #[inline]
    pub(super) fn any_due(&self) -> bool {
        self.ping.load(Ordering::Acquire)
            || self.pong.load(Ordering::Acquire)
            || self.ack.load(Ordering::Acquire)
    }

    #[inline]
    pub(super) fn ack(&self) {
        self.ack.store(true, Ordering::Release);
        self.wake_writer();
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
    pub(super) room: tokio::sync::Notify,
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
    pub(super) fn try_push(&self, reply: Message) -> Result<(), Message> {
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
    pub(crate) fn keep(&self, reply: Message) {
        self.bytes.fetch_add(reply.len(), Ordering::Relaxed);
        self.lock().push_back(reply);
    }

    /// Takes the next reply.
    pub(crate) fn pop(&self) -> Option<Message> {
        let reply = self.lock().pop_front()?;
        self.bytes.fetch_sub(reply.len(), Ordering::Relaxed);
        // No permit is stored for a reader that is not waiting (it registers before it
        // checks, see `send_reply`).
        self.room.notify_waiters();
        Some(reply)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

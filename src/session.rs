//! Lossless sessions: numbering, acknowledging and resending application frames.
//!
//! A session outlives the TCP connections that carry it. Each side counts the application
//! frames it sends (messages, requests, responses) and the ones it receives; the receiver
//! acknowledges cumulatively with `ACK n` ("I have your first n frames"), and the sender
//! keeps every frame until it is acknowledged. When a connection drops, the client
//! reconnects and names the session and how many frames it has received; the server answers
//! with its own count; both resend exactly what the other lacks. So each direction is
//! delivered exactly once and in order for as long as both processes live.
//!
//! Sequence numbers are implicit, as in XMPP's stream management (XEP-0198): TCP already
//! keeps frames in order within a connection, so the n-th application frame of a session
//! *is* number n, and only the counts travel (in `ACK` frames and in the resume handshake).
//! Writing a number into every frame would cost 8 bytes a message (12 % of a 64-byte
//! message) and prove nothing TCP does not already guarantee.
//!
//! The retained frames are bounded in count and bytes ([`SessionLimits`]): when the window
//! is full, the connection stops taking from its outbox, the outbox fills, and senders
//! wait. Nothing is dropped to make room.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::outbox::Weigh;
use crate::outgoing::{FlushWaiter, Outgoing};
use crate::protocol::message::SessionToken;

/// Receiving this many application frames (or [`ACK_BYTES`]) without acknowledging them
/// makes the receiver send an `ACK` as soon as it has read all that is there. Smaller
/// counts are acknowledged with the next frame going the other way, or on request.
pub(crate) const ACK_EVERY: u64 = 64;

/// See [`ACK_EVERY`].
pub(crate) const ACK_BYTES: u64 = 256 * 1024;

/// Bounds on what a sender keeps until the peer acknowledges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// Most unacknowledged frames kept. Default 4,096.
    pub frames: usize,
    /// Most unacknowledged payload bytes kept (a larger single frame is still sent, alone).
    /// Default 16 MiB.
    pub bytes: usize,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            frames: 4096,
            bytes: 16 << 20,
        }
    }
}

/// One side of a session, between connections and during one.
#[derive(Debug)]
pub(crate) struct Session {
    /// The token the welcome gave.
    pub(crate) token: SessionToken,
    /// Frames sent and not yet acknowledged.
    pub(crate) retained: Retained,
    /// Application frames received from the peer in the whole session.
    pub(crate) received: u64,
}

impl Session {
    pub(crate) fn new(token: SessionToken, limits: SessionLimits) -> Self {
        Session {
            token,
            retained: Retained::new(limits),
            received: 0,
        }
    }
}

/// Draws a new session token for `id` from the operating system's random source.
pub(crate) fn new_token(id: u64) -> std::io::Result<SessionToken> {
    let mut secret = [0u8; 16];
    getrandom::fill(&mut secret).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(SessionToken::new(id, secret))
}

/// The sending side's window: frames sent and not yet acknowledged, in order.
#[derive(Debug)]
pub(crate) struct Retained {
    /// Frames `acked + 1 ..= sent`.
    frames: VecDeque<Outgoing>,
    /// Their payload bytes.
    bytes: usize,
    /// Application frames sent in the session.
    pub(crate) sent: u64,
    /// Application frames the peer has acknowledged.
    pub(crate) acked: u64,
    /// `sent` when an `ACK_REQUEST` was last sent, so the window asks once per half.
    requested: u64,
    /// An `ACK_REQUEST` is owed (a flush waits).
    request_now: bool,
    /// Flushes waiting for the frame count before them to be acknowledged.
    waiters: VecDeque<(u64, FlushWaiter)>,
    limits: SessionLimits,
}

impl Retained {
    fn new(limits: SessionLimits) -> Self {
        Retained {
            frames: VecDeque::new(),
            bytes: 0,
            sent: 0,
            acked: 0,
            requested: 0,
            request_now: false,
            waiters: VecDeque::new(),
            limits,
        }
    }

    /// A window carried over from another node (a session handed over): `sent` frames
    /// sent, `acked` of them acknowledged, `frames` the rest, oldest first.
    pub(crate) fn restore(
        limits: SessionLimits,
        sent: u64,
        acked: u64,
        frames: Vec<Outgoing>,
    ) -> Result<Self, String> {
        if sent.checked_sub(acked) != Some(frames.len() as u64) {
            return Err(format!(
                "{} retained frames for {sent} sent and {acked} acknowledged",
                frames.len()
            ));
        }
        let mut retained = Retained::new(limits);
        retained.bytes = frames.iter().map(Weigh::weight).sum();
        retained.frames = frames.into();
        retained.sent = sent;
        retained.acked = acked;
        retained.requested = acked;
        Ok(retained)
    }

    /// The unacknowledged frames, oldest first, taken out (the window is handed over);
    /// flushes still waiting are dropped, which tells them their frames may not be
    /// confirmed.
    pub(crate) fn take_frames(&mut self) -> Vec<Outgoing> {
        self.waiters.clear();
        self.bytes = 0;
        std::mem::take(&mut self.frames).into()
    }

    /// Whether another frame may be sent before acknowledgements arrive.
    pub(crate) fn has_room(&self) -> bool {
        // A frame larger than the byte bound is sent when the window is empty.
        self.frames.is_empty()
            || (self.frames.len() < self.limits.frames.max(1) && self.bytes < self.limits.bytes)
    }

    /// Keeps a frame that was just written; it is number `sent`.
    pub(crate) fn record(&mut self, item: Outgoing) {
        self.bytes += item.weight();
        self.frames.push_back(item);
        self.sent += 1;
    }

    /// Frames sent and not acknowledged.
    pub(crate) fn unacked(&self) -> u64 {
        self.sent - self.acked
    }

    /// The retained frames, oldest first, to be written again after a resume.
    pub(crate) fn frames(&self) -> impl Iterator<Item = &Outgoing> {
        self.frames.iter()
    }

    /// The peer has the first `upto` frames: forget them and wake the flushes they satisfy.
    /// `upto` was checked to be within `acked ..= sent`.
    pub(crate) fn release(&mut self, upto: u64) {
        while self.acked < upto {
            let item = self
                .frames
                .pop_front()
                .expect("acknowledged frames are retained");
            self.bytes -= item.weight();
            self.acked += 1;
        }
        while let Some((target, _)) = self.waiters.front() {
            if *target > self.acked {
                break;
            }
            let (_, waiter) = self.waiters.pop_front().expect("front exists");
            waiter.done();
        }
    }

    /// A resume: the peer says it has received `peer_received` frames of ours. Checks the
    /// count, forgets what it has, and leaves the rest to be written again.
    pub(crate) fn resume(&mut self, peer_received: u64) -> Result<(), String> {
        if peer_received < self.acked || peer_received > self.sent {
            return Err(format!(
                "the peer claims {peer_received} frames received; {} were acknowledged and \
                 {} sent",
                self.acked, self.sent
            ));
        }
        self.release(peer_received);
        // The resent frames will need acknowledging; ask again when the window fills.
        self.requested = self.acked;
        self.request_now = !self.waiters.is_empty();
        Ok(())
    }

    /// A flush: done when everything sent so far is acknowledged.
    pub(crate) fn add_waiter(&mut self, waiter: FlushWaiter) {
        if self.sent == self.acked {
            waiter.done();
        } else {
            self.waiters.push_back((self.sent, waiter));
            self.request_now = true;
        }
    }

    /// Whether to send an `ACK_REQUEST` now: a flush waits, or the window is half full and
    /// nothing was asked since it was half empty.
    pub(crate) fn wants_ack(&mut self) -> bool {
        let half_full = self.frames.len() * 2 >= self.limits.frames.max(1)
            || self.bytes * 2 >= self.limits.bytes;
        let due = self.request_now
            || (half_full && self.sent - self.requested >= (self.limits.frames as u64 / 2).max(1))
            || (half_full && self.bytes * 2 >= self.limits.bytes && self.sent > self.requested);
        if due {
            self.requested = self.sent;
            self.request_now = false;
        }
        due
    }
}

/// The counters a connection's reading and writing halves share while it runs a session.
///
/// Both halves run in one task; atomics (not `Cell`s) only because the connection's future
/// must be `Send`. Each counter has one writer.
#[derive(Debug, Default)]
pub(crate) struct Acks {
    /// Application frames received in the session (written by the reader).
    pub(crate) received: AtomicU64,
    /// Payload bytes received since the last `ACK` went out (reader adds, writer resets).
    pub(crate) unacked_bytes: AtomicU64,
    /// The count in the last `ACK` written (written by the writer).
    pub(crate) ack_sent: AtomicU64,
    /// The highest count the peer acknowledged (written by the reader).
    pub(crate) peer_acked: AtomicU64,
    /// Application frames sent in the session (written by the writer), to check acks.
    pub(crate) sent: AtomicU64,
}

impl Acks {
    pub(crate) fn new(retained: &Retained, received: u64) -> Self {
        Acks {
            received: received.into(),
            unacked_bytes: 0.into(),
            // The handshake told the peer our count.
            ack_sent: received.into(),
            peer_acked: retained.acked.into(),
            sent: retained.sent.into(),
        }
    }

    /// Counts a received application frame handed to the application (reader only).
    pub(crate) fn received_one(&self) {
        self.received_many(1);
    }

    /// Counts `n` received application frames handed to the application (reader only).
    pub(crate) fn received_many(&self, n: u64) {
        let r = self.received.load(Ordering::Relaxed);
        self.received.store(r + n, Ordering::Relaxed);
    }

    /// Counts payload bytes received (reader only).
    pub(crate) fn add_bytes(&self, len: usize) {
        let b = self.unacked_bytes.load(Ordering::Relaxed);
        self.unacked_bytes.store(b + len as u64, Ordering::Relaxed);
    }

    /// Whether enough arrived unacknowledged that an `ACK` should go out without waiting for
    /// other traffic.
    pub(crate) fn ack_due(&self) -> bool {
        let r = self.received.load(Ordering::Relaxed);
        r - self.ack_sent.load(Ordering::Relaxed) >= ACK_EVERY
            || (r != self.ack_sent.load(Ordering::Relaxed)
                && self.unacked_bytes.load(Ordering::Relaxed) >= ACK_BYTES)
    }

    /// The peer acknowledged `n` frames; an error if that is more than were sent or fewer
    /// than it acknowledged before.
    pub(crate) fn peer_ack(&self, n: u64) -> Result<(), String> {
        let before = self.peer_acked.load(Ordering::Relaxed);
        let sent = self.sent.load(Ordering::Relaxed);
        if n < before || n > sent {
            return Err(format!(
                "acknowledgement of {n} frames, after {before} acknowledged and {sent} sent"
            ));
        }
        // The reader calls this in the connection's task: it has the writer, which may wait
        // for this to free room in its window, polled next.
        self.peer_acked.store(n, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;

    fn msg(n: usize) -> Outgoing {
        Outgoing::Message(Message::from(vec![0u8; n]))
    }

    #[test]
    fn window_is_bounded_and_released_by_acks() {
        let mut r = Retained::new(SessionLimits {
            frames: 4,
            bytes: 100,
        });
        for _ in 0..4 {
            assert!(r.has_room());
            r.record(msg(10));
        }
        assert!(!r.has_room());
        r.release(2);
        assert_eq!((r.acked, r.sent, r.unacked()), (2, 4, 2));
        assert!(r.has_room());
        // Bytes bound: one 200-byte frame fits only into an empty window.
        r.release(4);
        r.record(msg(200));
        assert!(!r.has_room());
    }

    #[test]
    fn resume_checks_the_peers_count() {
        let mut r = Retained::new(SessionLimits::default());
        for _ in 0..5 {
            r.record(msg(1));
        }
        r.release(2);
        assert!(r.resume(1).is_err(), "below what was acknowledged");
        assert!(r.resume(6).is_err(), "more than was sent");
        r.resume(3).unwrap();
        assert_eq!(r.frames().count(), 2);
    }

    #[tokio::test]
    async fn flush_waits_for_the_acknowledgement() {
        let mut r = Retained::new(SessionLimits::default());
        let (w, rx) = FlushWaiter::new();
        r.add_waiter(w);
        rx.await.unwrap(); // nothing sent: done at once
        r.record(msg(1));
        let (w, mut rx) = FlushWaiter::new();
        r.add_waiter(w);
        assert!(r.wants_ack());
        assert!(rx.try_recv().is_err());
        r.release(1);
        rx.await.unwrap();
    }

    #[test]
    fn tokens_are_random() {
        let (a, b) = (new_token(1).unwrap(), new_token(1).unwrap());
        assert!(!a.matches(&b));
    }
}

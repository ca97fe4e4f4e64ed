//! How the peer is watched: counters updated as frames pass, and the clocks that read them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

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
    #[inline]
    pub(super) fn add_in(&self, len: usize) {
        bump(&self.messages_in, 1);
        bump(&self.bytes_in, len as u64);
    }

    #[inline]
    pub(super) fn add_out(&self, len: usize) {
        bump(&self.messages_out, 1);
        bump(&self.bytes_out, len as u64);
    }
}

/// Adds `n` to a counter that only the calling task writes.
#[inline]
pub(super) fn bump(counter: &AtomicU64, n: u64) {
    let v = counter.load(Ordering::Relaxed);
    counter.store(v.wrapping_add(n), Ordering::Relaxed);
}

/// What the peer has sent so far, counted as it arrives.
///
/// Counters rather than timestamps: reading the clock for every frame cost a fifth of the
/// time of small messages. The timers in `drive` read the clock once per tick and note when
/// the counts last moved ([`Heard`]).
#[derive(Debug, Default)]
pub(super) struct Liveness {
    /// Frames of any kind.
    pub(super) frames: AtomicU64,
    /// Application messages and requests.
    pub(super) messages: AtomicU64,
    /// Reading is paused because the application's event stream is full: the peer's
    /// silence is then ours, and must not be taken for a dead or idle peer.
    pub(super) paused: std::sync::atomic::AtomicBool,
}

impl Liveness {
    // One task writes these counters; a load and a store avoid a locked instruction.
    #[inline]
    pub(super) fn frame(&self) {
        bump(&self.frames, 1);
    }

    #[inline]
    pub(super) fn message(&self) {
        bump(&self.messages, 1);
    }

    pub(super) fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }
}

/// When a [`Liveness`] counter was last seen to move (or reading was paused).
#[derive(Debug)]
pub(super) struct Heard {
    count: u64,
    at: Instant,
}

impl Heard {
    pub(super) fn new() -> Self {
        Heard {
            count: 0,
            at: Instant::now(),
        }
    }

    /// Notes the counter's value now; returns how long it has not moved.
    pub(super) fn silence(&mut self, count: &AtomicU64, paused: bool) -> Duration {
        let now = Instant::now();
        let current = count.load(Ordering::Relaxed);
        if current != self.count || paused {
            self.count = current;
            self.at = now;
        }
        now.duration_since(self.at)
    }
}

/// The frame timeout's timer: one per connection, reset every tick, rather than a new timer
/// registered for every read. (With the frame timeout on, 64-byte round trips measured about
/// 12 µs slower at the median than with it off, either way; see docs/benchmarks.md.)
pub(super) struct FrameClock {
    pub(super) sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
    pub(super) tick: Duration,
    pub(super) limit: Duration,
    /// When a partial frame was first seen in the buffer.
    pub(super) started: Option<Instant>,
}

impl FrameClock {
    pub(super) fn new(limit: Duration) -> Self {
        let tick = (limit / 4).max(Duration::from_millis(10));
        FrameClock {
            sleep: Box::pin(tokio::time::sleep(tick)),
            tick,
            limit,
            started: None,
        }
    }
}

//! How the peer is watched: counters updated as frames pass, and the clocks that read them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::{Instant, Interval};

use super::config::Heartbeat;
use super::control::Control;
use crate::reason::DisconnectReason;

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
///
/// It runs only while a frame is partly read: an idle connection holds no timer, neither the
/// allocation (a boxed `Sleep`, 112 bytes) nor an entry in the runtime's timer wheel, and is
/// never woken by it. The timer is taken when bytes of a frame wait for the rest, kept while
/// frames keep arriving (a stream that often stops mid-frame does not register a timer per
/// read), and given back at the first tick that finds the buffer empty: after a burst, a
/// connection that goes quiet is woken once more, then holds nothing until its next frame.
pub(super) struct FrameClock {
    sleep: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    tick: Duration,
    limit: Duration,
    /// When a partial frame was first seen in the buffer.
    pub(super) started: Option<Instant>,
}

impl FrameClock {
    pub(super) fn new(limit: Duration) -> Self {
        FrameClock {
            sleep: None,
            tick: (limit / 4).max(Duration::from_millis(10)),
            limit,
            started: None,
        }
    }

    /// Called while the reader waits for bytes, with `partial` bytes of a frame in its
    /// buffer: ready with the error once a frame has been partial for longer than the limit.
    pub(super) fn poll_expired(
        &mut self,
        partial: usize,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<crate::Error> {
        use std::task::Poll;
        if partial == 0 {
            self.started = None;
        }
        let now = Instant::now();
        let sleep = match (&mut self.sleep, partial) {
            (Some(sleep), _) => sleep,
            // Nothing to time, and no timer held.
            (None, 0) => return Poll::Pending,
            (slot @ None, _) => {
                self.started = Some(now);
                slot.insert(Box::pin(tokio::time::sleep_until(now + self.tick)))
            }
        };
        // A loop, because a reset timer is registered only when it is polled again.
        while sleep.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            if partial == 0 {
                // A whole tick without a partial frame: the timer goes.
                self.sleep = None;
                return Poll::Pending;
            }
            sleep.as_mut().reset(now + self.tick);
            let started = *self.started.get_or_insert(now);
            if now - started + self.tick > self.limit {
                return Poll::Ready(crate::Error::FrameTimeout {
                    limit: self.limit,
                    have: partial,
                });
            }
        }
        Poll::Pending
    }
}

/// `drive`'s timers: the heartbeat's pings, and the idle timeout's checks.
pub(super) struct Timers {
    /// With `heartbeat`: a ping every interval, and the peer's silence checked.
    ping: Option<Interval>,
    heartbeat: Option<Heartbeat>,
    /// With `idle_timeout`: the peer's silence in messages checked.
    idle_check: Option<Interval>,
    idle_timeout: Option<Duration>,
    heard_frame: Heard,
    heard_message: Heard,
    nonce: u64,
}

impl Timers {
    pub(super) fn new(heartbeat: Option<Heartbeat>, idle_timeout: Option<Duration>) -> Self {
        let ping =
            heartbeat.map(|hb| tokio::time::interval_at(Instant::now() + hb.interval, hb.interval));
        // The idle timeout is checked four times per period: a peer is closed after between
        // one and one and a quarter idle periods without a message.
        let idle_check = idle_timeout.map(|t| {
            let tick = (t / 4).max(Duration::from_millis(10));
            tokio::time::interval_at(Instant::now() + tick, tick)
        });
        Timers {
            ping,
            heartbeat,
            idle_check,
            idle_timeout,
            heard_frame: Heard::new(),
            heard_message: Heard::new(),
            nonce: 0,
        }
    }

    /// Sends the pings that are due (to `control`), and is ready with the reason to close
    /// when the peer has been silent for too long.
    pub(super) fn poll(
        &mut self,
        cx: &mut std::task::Context<'_>,
        liveness: &Liveness,
        control: &Control<'_>,
    ) -> std::task::Poll<DisconnectReason> {
        use std::task::Poll;
        if let Some(ping) = &mut self.ping {
            while ping.poll_tick(cx).is_ready() {
                let hb = self.heartbeat.expect("ping implies heartbeat");
                // Checked once per interval, so a dead peer is declared after between
                // `misses` and `misses + 1` silent intervals.
                let silent = self
                    .heard_frame
                    .silence(&liveness.frames, liveness.is_paused());
                if silent >= hb.interval * hb.misses {
                    return Poll::Ready(DisconnectReason::HeartbeatTimeout);
                }
                self.nonce += 1;
                control.ping(self.nonce);
            }
        }
        if let Some(idle_check) = &mut self.idle_check {
            while idle_check.poll_tick(cx).is_ready() {
                let idle = self.idle_timeout.expect("idle_check implies idle timeout");
                if self
                    .heard_message
                    .silence(&liveness.messages, liveness.is_paused())
                    >= idle
                {
                    return Poll::Ready(DisconnectReason::IdleTimeout);
                }
            }
        }
        Poll::Pending
    }
}

//! A connection's settings: its wire format, heartbeat and inbound rate limit.

use std::time::Duration;

use tokio::time::Instant;

/// Which wire format a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The tutorial's plain framing: untyped payloads, nothing else.
    Tutorial,
    /// The sockframe protocol: typed frames after a hello / welcome handshake.
    Sockframe,
}

/// Heartbeat settings: ping every `interval`; a peer from which nothing at all arrives for
/// `misses` intervals in a row (checked once per interval, so within `misses + 1`) is
/// declared dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// Time between pings. Default 5 s.
    pub interval: Duration,
    /// Intervals without any frame from the peer before it is declared dead. Default 3.
    pub misses: u32,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat {
            interval: Duration::from_secs(5),
            misses: 3,
        }
    }
}

/// An inbound rate limit per connection: a token bucket of application messages (and
/// requests). Control frames (pings, pongs) do not count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Sustained messages per second.
    pub per_second: u32,
    /// Messages that may arrive at once above the sustained rate.
    pub burst: u32,
    /// What happens to a peer over the limit.
    pub action: RateAction,
}

/// What a [`RateLimit`] does to a peer that sends too fast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateAction {
    /// Stop reading until the bucket refills: TCP flow control slows the peer down.
    Delay,
    /// Disconnect it with reason `rate limited`.
    Disconnect,
}

/// The token bucket behind a [`RateLimit`].
#[derive(Debug)]
pub(super) struct Bucket {
    pub(super) limit: RateLimit,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    pub(super) fn new(limit: RateLimit) -> Self {
        Bucket {
            limit,
            tokens: f64::from(limit.burst.max(1)),
            last: Instant::now(),
        }
    }

    /// Takes a token; otherwise says how long until one is there.
    pub(super) fn take(&mut self) -> Result<(), Duration> {
        let now = Instant::now();
        let rate = f64::from(self.limit.per_second.max(1));
        let capacity = f64::from(self.limit.burst.max(1));
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * rate).min(capacity);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }
}

//! Exponential backoff with jitter, for connecting and reconnecting.
//!
//! Written by hand (twenty lines) rather than taken from a crate: what we need is one pure
//! function from attempt number to delay plus two stop conditions, and owning it keeps the
//! reconnect loop's cancellation and events in one readable place.

use std::time::Duration;

/// How a client spaces its connection attempts.
///
/// The delay after attempt `n` (from 1) is `initial * multiplier^(n-1)`, capped at `max`;
/// with `jitter`, a uniformly random value between half of that and all of it, so that many
/// clients dropped by one server restart do not all come back in the same instant.
#[derive(Debug, Clone, PartialEq)]
pub struct Backoff {
    /// Delay after the first failed attempt. Default 100 ms.
    pub initial: Duration,
    /// Largest delay. Default 5 s.
    pub max: Duration,
    /// Growth factor per attempt. Default 2.
    pub multiplier: f64,
    /// Randomise each delay within its upper half. Default on.
    pub jitter: bool,
    /// Give up after this many attempts. Default: no limit.
    pub max_attempts: Option<u32>,
    /// Give up once this much time has passed since the first attempt. Default 10 s
    /// (`ClientConfig::reconnect_backoff` sets none).
    pub deadline: Option<Duration>,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
            multiplier: 2.0,
            jitter: true,
            max_attempts: None,
            deadline: Some(Duration::from_secs(10)),
        }
    }
}

impl Backoff {
    /// The delay to wait after failed attempt number `attempt` (counted from 1).
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .multiplier
            .max(1.0)
            .powi(attempt.saturating_sub(1).min(64) as i32);
        let full = self.initial.as_secs_f64() * exp;
        let capped = full.min(self.max.as_secs_f64()).max(0.0);
        let secs = if self.jitter {
            capped * (0.5 + fastrand::f64() * 0.5)
        } else {
            capped
        };
        Duration::from_secs_f64(secs)
    }

    /// Whether attempt number `attempts` was the last one allowed by `max_attempts`.
    pub(crate) fn exhausted(&self, attempts: u32) -> bool {
        self.max_attempts.is_some_and(|max| attempts >= max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_then_caps() {
        let b = Backoff {
            jitter: false,
            ..Backoff::default()
        };
        assert_eq!(b.delay(1), Duration::from_millis(100));
        assert_eq!(b.delay(2), Duration::from_millis(200));
        assert_eq!(b.delay(4), Duration::from_millis(800));
        assert_eq!(b.delay(10), Duration::from_secs(5));
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(5));
    }

    #[test]
    fn jitter_stays_in_upper_half() {
        let b = Backoff::default();
        for attempt in 1..50 {
            let d = b.delay(attempt);
            let full = Backoff {
                jitter: false,
                ..b.clone()
            }
            .delay(attempt);
            assert!(d >= full / 2 && d <= full, "{d:?} vs {full:?}");
        }
    }
}

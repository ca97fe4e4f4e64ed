//! Per-second rates: the totals sampled once a second, the difference of the last two.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::server::Server;

/// Messages and bytes per second, each way, over the last second sampled.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Rate {
    /// Messages received per second.
    pub messages_in: f64,
    /// Payload bytes received per second.
    pub bytes_in: f64,
    /// Messages written per second.
    pub messages_out: f64,
    /// Payload bytes written per second.
    pub bytes_out: f64,
}

/// The latest [`Rate`], kept up to date by a task that samples [`Server::stats`].
#[derive(Debug, Clone, Default)]
pub(super) struct Rates(Arc<Mutex<Rate>>);

impl Rates {
    /// Starts sampling `server` once a second until `stop`.
    pub(super) fn start(server: Server, stop: CancellationToken, tasks: &TaskTracker) -> Rates {
        let rates = Rates::default();
        let shared = rates.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last: Option<(Instant, [u64; 4])> = None;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let s = server.stats();
                let now = (
                    Instant::now(),
                    [s.messages_in, s.bytes_in, s.messages_out, s.bytes_out],
                );
                if let Some((then, before)) = last {
                    let secs = now.0.duration_since(then).as_secs_f64().max(1e-6);
                    let per = |i: usize| now.1[i].saturating_sub(before[i]) as f64 / secs;
                    *shared.0.lock().unwrap_or_else(|e| e.into_inner()) = Rate {
                        messages_in: per(0),
                        bytes_in: per(1),
                        messages_out: per(2),
                        bytes_out: per(3),
                    };
                }
                last = Some(now);
            }
        });
        rates
    }

    /// The latest rates (zero until two samples were taken).
    pub(super) fn get(&self) -> Rate {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

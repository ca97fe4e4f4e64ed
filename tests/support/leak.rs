//! Helpers for leak checks: live tokio tasks. (Resident memory is [`super::rss_bytes`].)

use std::time::Duration;

/// Tasks alive on the current tokio runtime (spawned and not yet finished).
///
/// Exact right after a `TaskTracker::wait` on a current-thread runtime. On a multi-thread
/// runtime a task that just finished may still be counted for a moment (its future is
/// dropped, waking the waiter, before the runtime releases it): use [`settle_alive_tasks`].
pub fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Waits (at most `within`) until [`alive_tasks`] is at most `target`, and returns the last
/// count seen, for the caller to assert on. This waits on a condition; it does not stand in
/// for one: the count only lags the tasks' real end by the runtime's bookkeeping.
pub async fn settle_alive_tasks(target: usize, within: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let n = alive_tasks();
        if n <= target || tokio::time::Instant::now() >= deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

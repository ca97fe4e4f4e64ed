//! Parked sessions: the count of suspended sessions against
//! [`ServerConfig::max_suspended`](super::ServerConfig::max_suspended), the per-client
//! transfer engines, and the resumption of a parked session by a returning client.

use std::sync::Arc;

use super::registry::Parked;
use super::{ClientId, Inner};
use crate::protocol::message::SessionToken;

/// One session waiting for its client, counted against
/// [`ServerConfig::max_suspended`](super::ServerConfig::max_suspended) until dropped.
pub(super) struct Suspension(Arc<std::sync::atomic::AtomicUsize>);

impl Suspension {
    /// Counts one more suspended session, unless the limit is reached: then the session
    /// ends at once (its client is told `session expired` when it comes back), so that
    /// clients that connect and vanish cannot make the server keep sessions without bound.
    pub(super) fn take(inner: &Inner) -> Option<Suspension> {
        use std::sync::atomic::Ordering;
        let count = &inner.suspended;
        let n = count.fetch_add(1, Ordering::AcqRel);
        if n >= inner.config.max_suspended {
            count.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!(
                limit = inner.config.max_suspended,
                "too many suspended sessions; this one ends now"
            );
            return None;
        }
        Some(Suspension(count.clone()))
    }
}

impl Drop for Suspension {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// The file transfer engines of the clients, by id.
pub(super) fn lock_transfers(
    inner: &Inner,
) -> std::sync::MutexGuard<'_, std::collections::HashMap<ClientId, crate::transfer::Transfers>> {
    inner.transfers.lock().unwrap_or_else(|e| e.into_inner())
}

/// Stops a departed client's file transfers.
pub(super) fn end_transfers(inner: &Inner, client: ClientId) {
    let transfers = lock_transfers(inner).remove(&client);
    if let Some(transfers) = transfers {
        transfers.close();
    }
}

/// Finds the session a hello asks to resume and takes it over: at once if it is parked, or
/// after ending the connection that still carries it (the client noticed the drop before
/// the server did). Fails with a reason that is logged but, so as not to help a guesser,
/// sent to the client only as "session expired or unknown".
pub(super) async fn resume(
    inner: &Inner,
    token: &SessionToken,
    received: u64,
    principal: &[u8],
) -> std::result::Result<Parked, &'static str> {
    const UNKNOWN: &str = "session expired or unknown";
    let handle = inner.registry.get(ClientId(token.id)).ok_or(UNKNOWN)?;
    let key = handle.session.as_ref().ok_or(UNKNOWN)?;
    if !key.admits(token, principal) {
        tracing::warn!(%token, "resume with a wrong token or by another principal");
        return Err(UNKNOWN);
    }
    let deadline = tokio::time::Instant::now() + inner.config.handshake_timeout;
    let mut parked = loop {
        if let Some(parked) = handle.take_parked() {
            break parked;
        }
        if handle.close.is_cancelled() {
            return Err(UNKNOWN);
        }
        handle.take_over();
        if tokio::time::timeout_at(deadline, handle.on_park.notified())
            .await
            .is_err()
        {
            return Err("the session's old connection did not let go in time");
        }
    };
    handle.on_resume.notify_one();
    if let Err(e) = parked.session.retained.resume(received) {
        tracing::warn!(%token, error = %e, "resume with an impossible count");
        handle.park(parked);
        return Err(UNKNOWN);
    }
    inner.counters.resumed();
    Ok(parked)
}

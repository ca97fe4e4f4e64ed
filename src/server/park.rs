//! Parked sessions: the count of suspended sessions against
//! [`ServerConfig::max_suspended`](super::ServerConfig::max_suspended), the per-client
//! transfer engines, and the resumption of a parked session by a returning client.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;

use super::handover::SessionClaim;
use super::registry::{ClientHandle, Parked, Peer, SessionKey};
use super::{ClientId, Inner};
use crate::connection::Mode;
use crate::outbox::{Weigh, outbox};
use crate::outgoing::Outgoing;
use crate::protocol::message::SessionToken;
use crate::session::{Retained, Session};

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
    let handle = inner.registry.get(ClientId(token.id)).ok_or(UNKNOWN)?;
    let key = handle.session.as_ref().ok_or(UNKNOWN)?;
    if !key.admits(token, principal) {
        tracing::warn!(%token, "resume with a wrong token or by another principal");
        return Err(UNKNOWN);
    }
    let mut parked = take_parked(inner, &handle).await?;
    if let Err(e) = parked.session.retained.resume(received) {
        tracing::warn!(%token, error = %e, "resume with an impossible count");
        handle.unpark_failed(parked);
        return Err(UNKNOWN);
    }
    inner.counters.resumed();
    Ok(parked)
}

/// What a client is told when its session cannot be resumed, whatever the reason.
pub(super) const UNKNOWN: &str = "session expired or unknown";

/// Takes a client's session once it is parked, ending the connection that still carries
/// it if need be; waits at most the handshake timeout for that connection to let go.
pub(super) async fn take_parked(
    inner: &Inner,
    handle: &ClientHandle,
) -> std::result::Result<Parked, &'static str> {
    take_parked_within(handle, inner.config.handshake_timeout).await
}

/// [`take_parked`], waiting at most `within`.
pub(super) async fn take_parked_within(
    handle: &ClientHandle,
    within: std::time::Duration,
) -> std::result::Result<Parked, &'static str> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(parked) = handle.take_parked() {
            return Ok(parked);
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
    }
}

/// A resume of a session this node does not hold: asks the cluster's node that holds it to
/// hand it over (see [`super::handover`]), then registers the client here under its id,
/// as if its session had been parked here.
pub(super) async fn claim(
    inner: &Arc<Inner>,
    token: &SessionToken,
    received: u64,
    principal: &Bytes,
    addr: SocketAddr,
) -> std::result::Result<Parked, &'static str> {
    let peers = inner.config.cluster.as_ref().ok_or(UNKNOWN)?;
    let client = ClientId(token.id);
    // From now on the broadcasts fanned out here are kept for the client, until its session
    // arrives (see `fanout`); the claim says how far this node was.
    let capture = Capture { inner, client };
    let claim = SessionClaim {
        token: *token,
        principal: principal.clone(),
        positions: inner.fanout.start_capture(client),
    };
    let handed = match peers.take_session(claim).await {
        Ok(handed) if handed.token.matches(token) => handed,
        Ok(_) => return Err("another node handed over the wrong session"),
        Err(e) => {
            tracing::info!(%client, error = %e, "no node handed the session over");
            return Err(UNKNOWN);
        }
    };
    let config = &inner.config;
    let retained = Retained::restore(
        config.session_window,
        handed.sent,
        handed.acked,
        handed.retained,
    );
    let retained = match retained {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(%client, error = %e, "a handed session does not add up");
            return Err(UNKNOWN);
        }
    };
    let replies = crate::connection::Replies::new(config.outbox);
    for reply in handed.replies {
        replies.keep(reply);
    }
    let session = Session {
        token: *token,
        retained,
        received: handed.received,
    };
    let key = SessionKey {
        token: *token,
        principal: principal.clone(),
    };
    let peer = Peer {
        addr,
        mode: Mode::Sockframe,
        name: handed.name,
        detecting: false,
    };
    let queued = handed.queued;
    // Registered with what the old node had queued, then the broadcasts made meanwhile that
    // it lacks, in one step with no fan-out in between.
    let registered = inner.fanout.hand_in(client, &handed.watermarks, |lacking| {
        let items: Vec<Outgoing> = queued
            .into_iter()
            .chain(lacking.into_iter().map(Outgoing::Message))
            .collect();
        // The queue takes all of it even if that is more than its bounds.
        let limits = crate::OutboxLimits {
            messages: config.outbox.messages.max(items.len()),
            bytes: (config.outbox.bytes).max(items.iter().map(Weigh::weight).sum()),
        };
        let (outbox_tx, outbox) = outbox(limits);
        for item in items {
            outbox_tx
                .try_send(item)
                .map_err(|_| "the handed queue did not fit")?;
        }
        let registration = inner.registry.register_as(
            Some(client),
            peer,
            outbox_tx,
            inner.shutdown.child_token(),
            |_| Some(key),
        );
        Ok((registration, outbox))
    });
    drop(capture);
    let (registration, outbox) = match registered {
        Ok(Ok(registered)) => registered,
        Ok(Err(why)) | Err(why) => {
            tracing::warn!(%client, why, "a handed session could not be taken");
            return Err(UNKNOWN);
        }
    };
    let handler = inner.make_handler.as_ref().map(|make| make(client, addr));
    let mut parked = Parked {
        session,
        outbox,
        registration,
        handler,
        replies,
    };
    if let Err(e) = parked.session.retained.resume(received) {
        tracing::warn!(%client, error = %e, "resume with an impossible count");
        return Err(UNKNOWN);
    }
    inner.counters.resumed();
    tracing::info!(%client, "session taken over from another node");
    Ok(parked)
}

/// A claim's capture of broadcasts, dropped however the claim ends.
struct Capture<'a> {
    inner: &'a Inner,
    client: ClientId,
}

impl Drop for Capture<'_> {
    fn drop(&mut self) {
        self.inner.fanout.end_capture(self.client);
    }
}

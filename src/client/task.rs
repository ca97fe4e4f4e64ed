//! The client's background task: runs the connection, reconnects with backoff after a
//! failure (resuming the session when there is one), and closes gracefully or at once.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::connect::{Link, connect_with_backoff};
use super::{CLOSED, CONNECTED, ClientEvent, DISCONNECTED, Shared, lock};
use crate::connection::{Batch, CloseOrder, Drive, Mode, Traffic, drive};
use crate::outbox::{OutboxReceiver, OutboxSender};
use crate::protocol::message::{RejectCode, SessionGrant, SessionToken};
use crate::reason::DisconnectReason;
use crate::session::Session;
use crate::{Error, Result};

/// The background task: runs connections until closed or until reconnecting is over.
pub(super) async fn run(
    shared: Arc<Shared>,
    mut link: Link,
    mut outbox: OutboxReceiver,
    reply: OutboxSender,
    events: mpsc::Sender<Batch<ClientEvent>>,
    transfers: crate::transfer::Transfers,
) -> Result<()> {
    let config = &shared.config;
    let traffic = Traffic::default();
    let mut session: Option<Session> = None;
    let mut reconnected = false;
    let result = 'run: loop {
        let resumed = match link.grant {
            SessionGrant::None => {
                session = None;
                false
            }
            SessionGrant::New(token) => {
                session = Some(Session::new(token, config.session_window));
                false
            }
            SessionGrant::Resumed { received, .. } => {
                match session.as_mut().map(|s| s.retained.resume(received)) {
                    Some(Ok(())) => true,
                    other => {
                        // The server resumed a session we cannot continue: its count does
                        // not fit ours (or we had none). Never guess: end it loudly and
                        // start afresh.
                        let detail = match other {
                            Some(Err(e)) => e,
                            _ => "a session this client does not have".into(),
                        };
                        tracing::error!(detail, "the server's resume does not match; new session");
                        let undelivered = session.take().map_or(0, |s| s.retained.unacked());
                        shared.pending.fail_all();
                        let _ = events
                            .send(Batch::from(ClientEvent::SessionExpired { undelivered }))
                            .await;
                        if shared.close_deadline.get().is_some() {
                            // Resumed only to finish a close: it cannot be finished.
                            break 'run match undelivered as usize + outbox.len() {
                                0 => Ok(()),
                                n => Err(Error::Undelivered(n)),
                            };
                        }
                        drop(link);
                        match reconnect(&shared, &events, None).await {
                            Ok(next) => {
                                link = next;
                                continue 'run;
                            }
                            Err(end) => {
                                break 'run end.map_or_else(|| undelivered_in(&outbox), Err);
                            }
                        }
                    }
                }
            }
        };
        if let Some(id) = link.server_id {
            shared.server_id.store(id, Ordering::Release);
        }
        shared.send_limit.store(link.send_limit, Ordering::Release);
        transfers.set_frame_limit(link.send_limit);
        if reconnected && !resumed {
            // A new session knows nothing of our transfers: offer them again (a resumed
            // session carries them on by itself, frames and all).
            transfers.on_new_connection().await;
        }
        reconnected = true;
        // Mark connected before announcing it, so an application that sees `Connected` can
        // send at once; never overwrite CLOSED (close and drop race with this task).
        let _ = shared.state.compare_exchange(
            DISCONNECTED,
            CONNECTED,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        if let Some(addr) = link.addr {
            let event = if resumed {
                ClientEvent::Resumed { addr }
            } else {
                ClientEvent::Connected { addr }
            };
            let _ = events.send(Batch::from(event)).await;
        }
        // Unused (a client has no message handler), but `drive` takes one.
        let replies = crate::connection::Replies::new(config.outbox);
        let outcome = drive(
            &mut link.reader,
            &mut link.writer,
            &mut None,
            Drive {
                mode: config.protocol,
                max_body: config.max_frame,
                refuse_late_hello: false,
                outbox: &mut outbox,
                reply: &reply,
                pending: &shared.pending,
                events: &events,
                message_tag: 0,
                on_request: ClientEvent::Request,
                traffic: &traffic,
                close: &shared.close,
                close_order: || {
                    lock(&shared.order).clone().unwrap_or(CloseOrder {
                        reason: DisconnectReason::Closed,
                        graceful: true,
                    })
                },
                // A close resumed after a cut has what is left of its deadline.
                drain_deadline: shared
                    .close_deadline
                    .get()
                    .map_or(config.drain_deadline, |d| {
                        d.saturating_duration_since(Instant::now())
                    }),
                heartbeat: config.heartbeat,
                idle_timeout: config.idle_timeout,
                frame_timeout: config.frame_timeout,
                rate_limit: None,
                session: session.as_mut(),
                transfers: (config.protocol == Mode::Sockframe).then(|| transfers.inbox()),
                handler: None,
                reply_policy: crate::FullPolicy::Wait,
                replies: &replies,
            },
        )
        .await;
        // Ours was the close only if it ended the connection; a close that comes after the
        // server ended it finds nothing to flush and must not count what was written.
        let closed_by_us = outcome.reason == DisconnectReason::Closed;
        // A graceful close with a session ends when the server has acknowledged everything,
        // on this link or on a resumed one (see `finish_close`).
        let closing_session = session.is_some() && shared.close_deadline.get().is_some();
        let keep_session = closing_session
            || (session.is_some()
                && config.reconnect
                && outcome.link_failed()
                && !shared.close.is_cancelled());
        if !keep_session {
            session = None;
            shared.pending.fail_all();
        }
        let _ = shared.state.compare_exchange(
            CONNECTED,
            DISCONNECTED,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        tracing::debug!(reason = %outcome.reason, keep_session, "disconnected");
        let _ = events
            .send(Batch::from(ClientEvent::Disconnected {
                reason: outcome.reason.clone(),
            }))
            .await;
        if closing_session {
            // Whether our close ended this link and the server confirmed it had the close.
            let told = closed_by_us && outcome.flushed && outcome.close_confirmed;
            match finish_close(&shared, &events, session.as_ref(), &outbox, told).await {
                Ok(next) => {
                    link = next;
                    continue;
                }
                Err(result) => break result,
            }
        }
        if closed_by_us {
            let left = outbox.len();
            break if !outcome.flushed {
                Err(Error::Undelivered(left.max(1)))
            } else if left > 0 {
                Err(Error::Undelivered(left))
            } else {
                Ok(())
            };
        }
        if !config.reconnect || shared.close.is_cancelled() {
            break undelivered_in(&outbox);
        }
        let resume = session.as_ref().map(|s| (s.token, s.received));
        match reconnect(&shared, &events, resume).await {
            Ok(next) => link = next,
            // Closed while reconnecting: a session still finishes the close.
            Err(None) if shared.close_deadline.get().is_some() && session.is_some() => {
                match finish_close(&shared, &events, session.as_ref(), &outbox, false).await {
                    Ok(next) => link = next,
                    Err(result) => break result,
                }
            }
            Err(None) => break undelivered_in(&outbox),
            Err(Some(Error::Rejected {
                code: RejectCode::SessionUnknown,
                ..
            })) => {
                // The server no longer has the session: say how much may be lost, then go
                // on with a new one (the queue is kept: none of it was sent).
                let undelivered = session.take().map_or(0, |s| s.retained.unacked());
                shared.pending.fail_all();
                tracing::warn!(undelivered, "session expired");
                let _ = events
                    .send(Batch::from(ClientEvent::SessionExpired { undelivered }))
                    .await;
                match reconnect(&shared, &events, None).await {
                    Ok(next) => link = next,
                    Err(end) => break end.map_or_else(|| undelivered_in(&outbox), Err),
                }
            }
            Err(Some(e)) => break Err(e),
        }
    };
    shared.state.store(CLOSED, Ordering::Release);
    transfers.close();
    result
}

/// Reconnects per the reconnect backoff, resuming `resume` if given. `Err(None)` when the
/// client was closed meanwhile; `Err(Some(e))` when reconnecting failed for good.
pub(super) async fn reconnect(
    shared: &Shared,
    events: &mpsc::Sender<Batch<ClientEvent>>,
    resume: Option<(SessionToken, u64)>,
) -> std::result::Result<Link, Option<Error>> {
    let config = &shared.config;
    match connect_with_backoff(
        config,
        &config.reconnect_backoff,
        Some(events),
        &shared.close,
        resume,
    )
    .await
    {
        Ok(link) => Ok(link),
        Err(Error::Closed) => Err(None),
        Err(e) => {
            if !matches!(
                e,
                Error::Rejected {
                    code: RejectCode::SessionUnknown,
                    ..
                }
            ) {
                tracing::warn!(error = %e, "giving up reconnecting");
            }
            Err(Some(e))
        }
    }
}

/// A graceful close of a session whose link is gone (cut during the close, or before it):
/// `Err(result)` when the close is over, because the server acknowledged every frame and
/// was `told` of the close, or because the session could not be resumed before the
/// close's deadline; `Ok(link)`, a resumed link, to resend what the server lacks on and
/// close again.
///
/// Without this, a close cut short after writing everything (into a link that then dropped
/// it) would report success with frames lost, or report a loss when the server had
/// acknowledged all. And a server never told of the close would keep the session for its
/// whole grace period, reporting it expired only then: so even with nothing left to
/// deliver, the close resumes once (within its deadline) to say so.
pub(super) async fn finish_close(
    shared: &Shared,
    events: &mpsc::Sender<Batch<ClientEvent>>,
    session: Option<&Session>,
    outbox: &OutboxReceiver,
    told: bool,
) -> std::result::Result<Link, Result<()>> {
    let Some(session) = session else {
        return Err(undelivered_in(outbox));
    };
    let undelivered = session.retained.unacked() as usize + outbox.len();
    if undelivered == 0 && told {
        return Err(Ok(()));
    }
    // With nothing undelivered, failing to tell the server loses nothing: the close
    // succeeded, and the server ends the session when its grace runs out.
    let gave_up = || {
        if undelivered == 0 {
            Ok(())
        } else {
            Err(Error::Undelivered(undelivered))
        }
    };
    let Some(&deadline) = shared.close_deadline.get() else {
        return Err(gave_up());
    };
    let config = &shared.config;
    // Not `reconnect`: the close has fired, and it would stop at once. The deadline bounds
    // this instead.
    let never = CancellationToken::new();
    let attempt = connect_with_backoff(
        config,
        &config.reconnect_backoff,
        Some(events),
        &never,
        Some((session.token, session.received)),
    );
    match tokio::time::timeout_at(deadline, attempt).await {
        Ok(Ok(link)) => Ok(link),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, undelivered, "cannot resume to finish the close");
            Err(gave_up())
        }
        Err(_) => Err(gave_up()),
    }
}

pub(super) fn undelivered_in(outbox: &OutboxReceiver) -> Result<()> {
    match outbox.len() {
        0 => Ok(()),
        n => Err(Error::Undelivered(n)),
    }
}

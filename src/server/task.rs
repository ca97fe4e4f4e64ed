//! One client's task: from an accepted stream through admission, registration and the
//! `Connected` event, the connection itself, to the `Disconnected` event or the parking of
//! its session for the client to come back.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use super::accept::Slot;
use super::admit::{admit, reject, send_welcome, welcome};
use super::events::emit;
use super::park::{Suspension, claim, end_transfers, lock_transfers, resume};
use super::registry::{Parked, Peer, SessionKey};
use super::{ClientId, Inner, ProtocolMode, ServerEvent, registry};
use crate::connection::{
    Batch, Connection, Drive, FrameReader, FrameWriter, HEAD_ROOM, Mode, drive,
};
use crate::outbox::outbox;
use crate::protocol::message::{RejectCode, SessionGrant, SessionRequest};
use crate::reason::DisconnectReason;
use crate::session::Session;

/// Runs one client's connection: protocol detection and handshake, then registration (or
/// the resumption of a session), the `Connected` event, the connection itself, and the
/// `Disconnected` event. `cert_name` is the name in the client's TLS certificate (mutual
/// TLS), which wins over a hello's name.
pub(super) async fn serve_stream<S>(
    inner: Arc<Inner>,
    stream: S,
    addr: SocketAddr,
    events: mpsc::Sender<Batch<ServerEvent>>,
    permit: Slot,
    cert_name: Option<String>,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let config = &inner.config;
    let (mut reader, mut writer) = Connection::new(stream, config.max_frame).split();
    // In `auto` mode a connection is a client from its accept, so that sends and broadcasts
    // reach it while its protocol is detected (up to `detect_timeout` for a silent one).
    // They wait in its outbox: nothing is written to it before its protocol is known. It is
    // announced (`Connected`) only then, so that what never becomes a client (a port scan, a
    // refused hello, a session's new connection) never shows as one.
    let mut early =
        (config.effective_protocol() == ProtocolMode::Auto).then(|| Early::register(&inner, addr));
    let stop = match &early {
        // A close ordered meanwhile (a kick, a full queue under `Disconnect`) ends detection.
        Some(early) => early.registration.handle.close.clone(),
        None => inner.shutdown.clone(),
    };
    let admitted = match admit(&inner, &mut reader, &mut writer, &stop).await {
        Ok(admitted) => admitted,
        Err(why) => {
            // Never reported to the application: it was never connected. (A registration
            // made at accept ends with `early`, unannounced.)
            tracing::debug!(%addr, why, "connection not admitted");
            return;
        }
    };
    let mode = admitted.mode;
    if mode == Mode::Sockframe {
        // `max_frame` bounds bodies; typed frames carry a few bytes of head besides.
        reader.set_max_frame(config.max_frame + HEAD_ROOM);
        writer.set_max_frame(config.max_frame + HEAD_ROOM);
        // The hello made the reader take its working buffer; a client may stay quiet for
        // long after it (10,000 idle sockframe clients: 8 KiB each).
        reader.release_buffer();
    }
    // Who may resume this client's session: its certificate's name, else its token.
    let principal = match &cert_name {
        Some(name) => Bytes::from(name.clone()),
        None => admitted.token.clone(),
    };

    if let SessionRequest::Resume { token, received } = admitted.session {
        // The session has its id, under which it goes on: the registration made at accept
        // for this connection ends, unannounced. What it held were copies of broadcasts that
        // the session's own queue also got, or sends to an id that was never announced.
        drop(early.take());
        // A session another node of the cluster holds is handed over to this one.
        let here = inner.registry.get(ClientId(token.id)).is_some();
        let claimed = !here && inner.config.cluster.is_some();
        let parked = if claimed {
            claim(&inner, &token, received, &principal, addr).await
        } else {
            resume(&inner, &token, received, &principal).await
        };
        let parked = match parked {
            Ok(parked) => parked,
            Err(why) => {
                tracing::info!(%addr, %token, why, "session not resumed");
                reject(&mut writer, RejectCode::SessionUnknown, why).await;
                return;
            }
        };
        let handle = parked.registration.handle.clone();
        let welcome = welcome(
            config,
            handle.id,
            SessionGrant::Resumed {
                token,
                received: parked.session.received,
            },
        );
        if claimed {
            start_transfers(&inner, &handle, &events);
        }
        if let Err(e) = send_welcome(config, &mut writer, welcome).await {
            tracing::debug!(%addr, error = %e, "could not send the welcome");
            if claimed {
                // A session taken over from another node for a client that left again (it
                // gave up waiting, say): kept here for it to come back, like any other.
                let Some(grace) = config.session_grace else {
                    return;
                };
                let Some(_suspension) = Suspension::take(&inner) else {
                    return;
                };
                let parking = handle.park(parked);
                if let Some(reason) = watch_parked(&inner, &handle, parking, grace, &events).await {
                    departed(&inner, &events, &handle, reason).await;
                }
                return;
            }
            handle.unpark_failed(parked);
            return;
        }
        // The resume stands: the watch of the old connection's parking stops (it was waiting
        // to expire the session).
        handle.wake_watches();
        tracing::debug!(client = %handle.id, %addr, "session resumed");
        emit(
            &inner,
            &events,
            ServerEvent::Resumed {
                client: handle.id,
                addr,
            },
        )
        .await;
        let Parked {
            session,
            outbox,
            registration,
            handler,
            replies,
        } = parked;
        let link = Link {
            reader,
            writer,
            held: None,
            silent: false,
            addr,
        };
        let kept = Kept {
            registration,
            outbox,
            session: Some(session),
            handler,
            replies,
        };
        return run_client(inner, link, kept, events, permit).await;
    }

    let name = cert_name.unwrap_or(admitted.name);
    let wants_session = mode == Mode::Sockframe
        && admitted.session == SessionRequest::New
        && config.session_grace.is_some();
    let mut token_error = None;
    let session_key = |id: ClientId| {
        if !wants_session {
            return None;
        }
        match crate::session::new_token(id.0) {
            Ok(token) => Some(SessionKey { token, principal }),
            Err(e) => {
                token_error = Some(e);
                None
            }
        }
    };
    let peer = Peer {
        addr,
        mode,
        name,
        detecting: false,
    };
    let (registration, outbox_rx) = match early {
        // Detected as the tutorial client it was registered as: same id, and what was sent
        // to it meanwhile is written now, in the tutorial framing.
        Some(Early {
            registration,
            outbox,
        }) if mode == Mode::Tutorial => {
            inner.registry.settle(&registration.handle);
            (registration, outbox)
        }
        // A sockframe client: the same id, which its welcome carries, and what was sent to
        // it meanwhile follows the welcome as sockframe messages. It was never announced
        // as anything else, and the application may already have used the id; another id
        // would drop what was queued for this connection in its first moments.
        Some(Early {
            registration,
            outbox,
        }) => (
            inner.registry.promote(registration, peer, session_key),
            outbox,
        ),
        None => {
            let (outbox_tx, outbox_rx) = outbox(config.outbox);
            let close = inner.shutdown.child_token();
            let registration = inner.registry.register(peer, outbox_tx, close, session_key);
            (registration, outbox_rx)
        }
    };
    if let Some(e) = token_error {
        // Without randomness there is no safe token; go on without a session.
        tracing::error!(error = %e, "no random source for a session token; no session");
    }
    let handle = registration.handle.clone();
    let client = handle.id;
    let session = handle
        .session
        .as_ref()
        .map(|key| Session::new(key.token, config.session_window));
    if mode == Mode::Sockframe {
        let grant = match &session {
            Some(s) => SessionGrant::New(s.token),
            None => SessionGrant::None,
        };
        if let Err(e) = send_welcome(config, &mut writer, welcome(config, client, grant)).await {
            tracing::debug!(%addr, error = %e, "could not send the welcome");
            return;
        }
    }
    if mode == Mode::Sockframe {
        start_transfers(&inner, &handle, &events);
    }
    tracing::debug!(%client, %addr, ?mode, "connected");
    emit(&inner, &events, ServerEvent::Connected { client, addr }).await;
    if let Some(reason) = admitted.broken {
        drop(outbox_rx);
        drop(registration);
        drop(permit);
        departed(&inner, &events, &handle, reason).await;
        return;
    }
    let link = Link {
        reader,
        writer,
        held: admitted.held,
        silent: admitted.silent,
        addr,
    };
    let handler = inner.make_handler.as_ref().map(|make| make(client, addr));
    let kept = Kept {
        registration,
        outbox: outbox_rx,
        session,
        handler,
        replies: crate::connection::Replies::new(config.outbox),
    };
    run_client(inner, link, kept, events, permit).await;
}

/// Starts a sockframe client's file transfer engine, which lives as long as the client
/// does (across a session's connections).
fn start_transfers(
    inner: &Arc<Inner>,
    handle: &registry::ClientHandle,
    events: &mpsc::Sender<Batch<ServerEvent>>,
) {
    let config = &inner.config;
    let client = handle.id;
    // Weak: transfer tasks that outlive the connection must not keep the event stream
    // open after shutdown; their late events are dropped.
    let events = events.downgrade();
    // Weak: the engine lives in `inner`, which would otherwise never be freed.
    let counted = Arc::downgrade(inner);
    let emit: crate::transfer::Emit = Arc::new(move |event| {
        if let (crate::transfer::TransferEvent::Received(file), Some(inner)) =
            (&event, counted.upgrade())
        {
            inner.counters.file_received(file.size);
        }
        let events = events.upgrade();
        Box::pin(async move {
            if let Some(events) = events {
                let _ = events
                    .send(Batch::from(ServerEvent::transfer(client, event)))
                    .await;
            }
        })
    });
    let transfers = crate::transfer::Transfers::new(
        config.transfer.clone(),
        handle.outbox.clone(),
        emit,
        inner.transfer_locks.clone(),
        config.max_frame,
    );
    lock_transfers(inner).insert(client, transfers);
}

/// A client registered at accept, while its protocol is detected (`auto` mode), and the
/// receiving end of its outbox, where what is sent to it waits meanwhile.
struct Early {
    registration: registry::Registration,
    outbox: crate::outbox::OutboxReceiver,
}

impl Early {
    /// Registers the connection from `addr` as a tutorial client being detected.
    fn register(inner: &Inner, addr: SocketAddr) -> Early {
        let (outbox_tx, outbox) = outbox(inner.config.outbox);
        let peer = Peer {
            addr,
            mode: Mode::Tutorial,
            name: String::new(),
            detecting: true,
        };
        let close = inner.shutdown.child_token();
        let registration = inner.registry.register(peer, outbox_tx, close, |_| None);
        Early {
            registration,
            outbox,
        }
    }
}

/// What a registered client keeps from one connection to the next (of a session).
pub(super) struct Kept {
    registration: registry::Registration,
    outbox: crate::outbox::OutboxReceiver,
    session: Option<Session>,
    handler: Option<Box<dyn crate::Handler>>,
    /// The handler's replies not yet written (see [`Parked::replies`]).
    replies: crate::connection::Replies,
}

/// One connection of a client, after its handshake.
pub(super) struct Link<R, W> {
    reader: FrameReader<R>,
    writer: FrameWriter<W>,
    /// A first tutorial message already read, to be delivered.
    held: Option<Bytes>,
    /// See [`Admitted::silent`].
    silent: bool,
    addr: SocketAddr,
}

/// Runs a registered client's connection; afterwards either ends the client (the
/// `Disconnected` event) or, when a session survives a network failure, parks the session
/// and keeps it for [`ServerConfig::session_grace`] for the client to come back.
pub(super) async fn run_client<R, W>(
    inner: Arc<Inner>,
    link: Link<R, W>,
    kept: Kept,
    events: mpsc::Sender<Batch<ServerEvent>>,
    permit: Slot,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Kept {
        registration,
        outbox: mut outbox_rx,
        mut session,
        mut handler,
        replies,
    } = kept;
    let config = &inner.config;
    let handle = registration.handle.clone();
    let client = handle.id;
    let close = handle.new_link(link.addr);
    // The client's file transfers live as long as it does: across a session's connections.
    let transfers = lock_transfers(&inner).get(&client).cloned();
    let outcome = drive(
        link.reader,
        link.writer,
        link.held,
        Drive {
            mode: handle.mode,
            max_body: config.max_frame,
            refuse_late_hello: link.silent,
            outbox: &mut outbox_rx,
            reply: &handle.outbox,
            pending: &handle.pending,
            events: &events,
            message_tag: client.0,
            on_request: |request| ServerEvent::Request { client, request },
            traffic: &handle.traffic,
            close: &close,
            close_order: || handle.close_order(),
            drain_deadline: config.drain_deadline,
            heartbeat: config.heartbeat,
            idle_timeout: config.idle_timeout,
            frame_timeout: config.frame_timeout,
            rate_limit: config.rate_limit,
            session: session.as_mut(),
            transfers: transfers.as_ref().map(|t| t.inbox()),
            handler: handler.as_deref_mut().map(|h| h as &mut dyn crate::Handler),
            reply_policy: config.send_policy,
            replies: &replies,
        },
    )
    .await;
    drop(transfers);
    // Counts this session among the suspended ones while it waits.
    let mut suspension = None;
    let keep = session.is_some()
        && outcome.link_failed()
        && !handle.close.is_cancelled()
        && Suspension::take(&inner).is_some_and(|s| {
            suspension = Some(s);
            true
        });
    let mut reason = outcome.reason;
    // The connection slot is free whether or not the session lives on.
    drop(permit);
    if let (true, Some(session), Some(grace)) = (keep, session, config.session_grace) {
        tracing::debug!(%client, %reason, "connection lost; session kept");
        emit(
            &inner,
            &events,
            ServerEvent::Suspended {
                client,
                reason: reason.clone(),
            },
        )
        .await;
        let parking = handle.park(Parked {
            session,
            outbox: outbox_rx,
            registration,
            handler,
            replies,
        });
        match watch_parked(&inner, &handle, parking, grace, &events).await {
            Some(ended) => reason = ended,
            None => return,
        }
    } else {
        end_transfers(&inner, client);
        handle.pending.fail_all();
        // Fail sends still waiting for room in this client's queue now: an application
        // blocked in such a send may be the one that must read the event below.
        drop(outbox_rx);
        // Unregister before reporting, so that `clients()` never lists a client already
        // reported gone and a client may reconnect as soon as it is.
        drop(registration);
    }
    tracing::debug!(%client, %reason, "disconnected");
    departed(&inner, &events, &handle, reason).await;
}

/// Counts a client's departure and reports it (`Disconnected`).
async fn departed(
    inner: &Inner,
    events: &mpsc::Sender<Batch<ServerEvent>>,
    handle: &registry::ClientHandle,
    reason: DisconnectReason,
) {
    inner.counters.departed(&reason, handle.traffic_totals());
    let client = handle.id;
    emit(inner, events, ServerEvent::Disconnected { client, reason }).await;
}

/// Watches a parked session (parking number `parking`) for `grace`: `None` if it lives on
/// (a resumer took it, here or on another node, or a later parking's watch has it), else
/// the reason it ended here (expired, or closed meanwhile), with the client unregistered.
async fn watch_parked(
    inner: &Arc<Inner>,
    handle: &registry::ClientHandle,
    parking: u64,
    grace: std::time::Duration,
    events: &mpsc::Sender<Batch<ServerEvent>>,
) -> Option<DisconnectReason> {
    let client = handle.id;
    let expiry = tokio::time::sleep(grace);
    tokio::pin!(expiry);
    loop {
        tokio::select! {
            _ = handle.on_resume.notified() => {
                if handle.parking() != parking {
                    // Resumed and parked again since: that parking's watch has it.
                    return None;
                }
                if handle.handed_over() {
                    // Another node of the cluster carries the session now.
                    departed(inner, events, handle, DisconnectReason::HandedOver).await;
                    return None;
                }
                if !handle.is_parked() {
                    // A new connection carries the session now.
                    return None;
                }
            }
            _ = &mut expiry => break,
            _ = handle.close.cancelled() => break,
        }
    }
    if handle.parking() != parking {
        // Resumed and parked again: that parking's own watch expires it.
        return None;
    }
    let parked = handle.take_parked()?;
    end_transfers(inner, client);
    let reason = if handle.close.is_cancelled() {
        handle.close_order().reason
    } else {
        let undelivered = parked.session.retained.unacked() + parked.outbox.len() as u64;
        tracing::info!(%client, undelivered, "session expired");
        DisconnectReason::SessionExpired { undelivered }
    };
    handle.pending.fail_all();
    // Unregisters the client, before the event.
    drop(parked);
    Some(reason)
}

//! One client's task: from an accepted stream through admission, registration and the
//! `Connected` event, the connection itself, to the `Disconnected` event or the parking of
//! its session for the client to come back.
//!
//! # What an idle connection costs
//!
//! Issue 17 asks for at most 4 KiB of resident memory per idle tutorial connection. Where
//! it goes, measured on 2,000 idle connections (heaptrack's peak allocations by call site,
//! on a scratch server with the system allocator; future sizes from `cargo +nightly rustc
//! --release --lib -- -Zprint-type-sizes`), at main's `0045d3b`, after the first round of
//! this work (branch `idle`), and after the second (branch `idle2`):
//!
//! | what | `0045d3b` | `idle` | `idle2` | why it is what it is now |
//! |---|---|---|---|---|
//! | task: tokio's cell around the connection's future | 6,400 | 3,072 | 2,048 | [`serve_stream`], [`run_client`], `drive` |
//! | socket: tokio's I/O registration (`ScheduledIo`) | 256 | 256 | 256 | tokio's, one per socket |
//! | registry entry: the `ClientHandle` in its `Arc` | 440 | 440 | 440 | one allocation, its locks inside it |
//! | outbox: the queue's shared state | 176 | 176 | 176 | no queue buffer until a first message (`outbox.rs`) |
//! | timers: the frame timeout's `Sleep` | 112 | 0 | 0 | only while a frame is partial (`liveness.rs`) |
//! | the client's close token (a child of shutdown's) | 112 | 112 | 112 | what a kick or shutdown fires |
//! | the connection's own token (a child of that) | 112 | 0 | 0 | the close token itself without a session (`registry.rs`) |
//! | the stream's two halves (`tokio::io::split`) | 64 | 64 | 64 | |
//! | the handler (`serve --discard`'s counter) | 48 | 48 | 48 | the application's |
//! | registry map slot, shutdown's list of children | ≈ 50 | ≈ 40 | ≈ 40 | shared structures, per client |
//! | **allocated** | ≈ 7,800 | ≈ 4,200 | ≈ 3,200 | |
//!
//! Resident memory is more than what is allocated: mimalloc serves each size from a class
//! (the 6,400-byte task took a 7,168-byte block; 3,072 and 2,048 are classes of their own)
//! and keeps some pages of freed blocks. `bench/idle` measured 8,858 bytes per connection
//! at `0045d3b`, 4,995 after the first round and 3,444 after the second, at 19,000
//! connections (docs/benchmarks.md, *Idle connections*). The kernel's socket buffers are not
//! in that figure (nor in the process's resident memory).
//!
//! The task's future was the bulk: 6,168 bytes at first, of which 1,768 were
//! `serve_stream`'s around `run_client`, 1,472 `run_client`'s around `drive`, and 2,752
//! `drive`'s. What made it so, and what it is now:
//! - an `async fn` keeps every argument twice (the argument, and the local it is moved
//!   into): [`serve_stream`], [`run_client`], `drive` and `accept::serve_client` return
//!   `async move` blocks instead, which hold each captured value once;
//! - a future is as large as its largest stage, plus every local two stages share: the
//!   stages before the connection runs (detection, handshake, a session's resumption, the
//!   `Connected` event: 2,400 bytes) are [`setup`]'s future, boxed for those first moments
//!   only, and what follows the connection (`after_link`'s 1,432 bytes, the graceful
//!   close's reads and writes in `drive`) is boxed when the connection ends;
//! - values moved into a nested future stay in the outer one too: `drive` borrows the
//!   reader and the writer, and sessions' state (`Session`, 152 bytes) is boxed, as only
//!   sessions use it;
//! - waits that only happen under pressure (a full event stream, a rate limit over, a full
//!   reply queue, a full file transfer inbox) box their futures when they happen
//!   (`delivery.rs`, `inbound.rs`), rather than sizing every task for them.
//!
//! The second round took the future from 2,920 bytes to 1,808 (`drive`'s from 2,408 to
//! 1,312), the cell from 3,072 to 2,048 (the next class down), in `drive`'s two halves:
//! - the write loop `select!`ed over five waits (the close token, control frames, the
//!   handler's replies, the outbox, a session's acknowledgements), a future of 512 bytes. It
//!   is now a state machine polled by hand (`outbound::WriteLoop`, 88 bytes) with one wait
//!   of its own, the close token's (72): the outbox parks its waker without a future
//!   (`OutboxReceiver::poll_recv`), and what the reader leaves for the writer (control
//!   frames, replies, acknowledgements) needs no waker at all, as both halves run in this
//!   task: `drive` polls the writer again after the reader when there is something new
//!   (`Control::take_due`). `Control` lost its `Notify` (96 → 64 bytes), `Acks` its own
//!   (72 → 40);
//! - the read loop's future was as large as its largest stage (752 bytes: handing a
//!   message over, with the event, the parsed frame and the rate limit's wait in it). Its
//!   stages are now small (224): a message is handed to the handler without a nested
//!   future (its reply is queued at the loop's next turn), the rate limit's token is taken
//!   without one and only a wait for it is boxed, and frames other than messages are
//!   handled at once, or in a boxed future when they must wait (`Inbound::frame_now`);
//! - what follows the connection in `drive` (the farewell, the graceful close's drain,
//!   the last batch) is a future of its own, awaited once, so its locals no longer have room
//!   of their own beside the reading and writing.
//!
//! A test (`tests::an_idle_connections_task_stays_in_its_size_class`, below) keeps the
//! future under the bound of the 2,048-byte cell. The next class down (1,792) would take
//! about 130 bytes more; the rest of an idle connection is now the registry entry, the
//! socket's registration and the tokens (about 1,100 bytes together).

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
///
/// In two stages, for what an idle connection costs (every connection's task future is
/// allocated whole when it is spawned, and stays that size for its life): everything before
/// the connection runs ([`setup`]: detection, the handshake, registration, a session's
/// resumption or takeover, the `Connected` event) is a future of its own on the heap for
/// those first moments, and what stays is only [`run_client`]'s. As one `async fn` the task
/// was as large as its largest stage plus every local that two of its stages shared: 5,992
/// bytes, of which 1,768 around `run_client`'s 4,224 (`-Zprint-type-sizes`, 2026-12-07).
/// Not an `async fn` itself, for the reason given at [`run_client`].
pub(super) fn serve_stream<S>(
    inner: Arc<Inner>,
    stream: S,
    addr: SocketAddr,
    events: mpsc::Sender<Batch<ServerEvent>>,
    permit: Slot,
    cert_name: Option<String>,
) -> impl Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    // Boxed before the future is made, so that this one holds only the box (not the
    // arguments it takes); and what it gives back is taken apart in a `let … else`, whose
    // value ends with the statement, rather than kept whole (552 bytes) beside `run_client`.
    let setup = Box::pin(setup(
        inner.clone(),
        stream,
        addr,
        events.clone(),
        permit,
        cert_name,
    ));
    async move {
        let Some((link, kept, permit)) = setup.await else {
            return;
        };
        run_client(inner, link, kept, events, permit).await;
    }
}

/// A client ready to run: its connection, what it keeps across connections, and its slot.
type Started<S> = (
    Link<tokio::io::ReadHalf<S>, tokio::io::WriteHalf<S>>,
    Kept,
    Slot,
);

/// The first stage of [`serve_stream`]: admits and registers the client (or resumes its
/// session) and announces it; `None` when there is nothing to run (not admitted, refused,
/// or already gone and reported).
async fn setup<S>(
    inner: Arc<Inner>,
    stream: S,
    addr: SocketAddr,
    events: mpsc::Sender<Batch<ServerEvent>>,
    permit: Slot,
    cert_name: Option<String>,
) -> Option<Started<S>>
where
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
            return None;
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
                return None;
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
                let grace = config.session_grace?;
                let _suspension = Suspension::take(&inner)?;
                let parking = handle.park(parked);
                if let Some(reason) = watch_parked(&inner, &handle, parking, grace, &events).await {
                    departed(&inner, &events, &handle, reason).await;
                }
                return None;
            }
            handle.unpark_failed(parked);
            return None;
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
            close: handle.new_link(addr),
        };
        let kept = Kept {
            registration,
            outbox,
            session: Some(Box::new(session)),
            handler,
            replies,
        };
        return Some((link, kept, permit));
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
        .map(|key| Box::new(Session::new(key.token, config.session_window)));
    if mode == Mode::Sockframe {
        let grant = match &session {
            Some(s) => SessionGrant::New(s.token),
            None => SessionGrant::None,
        };
        if let Err(e) = send_welcome(config, &mut writer, welcome(config, client, grant)).await {
            tracing::debug!(%addr, error = %e, "could not send the welcome");
            return None;
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
        return None;
    }
    let link = Link {
        reader,
        writer,
        held: admitted.held,
        silent: admitted.silent,
        close: handle.new_link(addr),
    };
    let handler = inner.make_handler.as_ref().map(|make| make(client, addr));
    let kept = Kept {
        registration,
        outbox: outbox_rx,
        session,
        handler,
        replies: crate::connection::Replies::new(config.outbox),
    };
    Some((link, kept, permit))
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
    /// Boxed: 152 bytes, which only sockframe clients with a session use, beside every
    /// connection's [`drive`] for its whole life.
    session: Option<Box<Session>>,
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
    /// Fired to end this connection ([`ClientHandle::new_link`]), taken when it is made
    /// (rather than keeping its address until then: 32 bytes against 8).
    ///
    /// [`ClientHandle::new_link`]: registry::ClientHandle::new_link
    close: tokio_util::sync::CancellationToken,
}

/// Runs a registered client's connection; afterwards either ends the client (the
/// `Disconnected` event) or, when a session survives a network failure, parks the session
/// and keeps it for [`ServerConfig::session_grace`] for the client to come back.
///
/// Its future is most of what an idle connection's task holds, so it is kept small:
/// - not an `async fn`: an `async fn` keeps each argument twice in its future (as the
///   argument, and as the local it is moved into), and `link` and `kept` are 504 bytes;
/// - `kept` is used field by field, never destructured into new locals (a copy of each);
/// - the connection's reader and writer stay here, lent to [`drive`]'s future.
#[allow(clippy::manual_async_fn)]
pub(super) fn run_client<R, W>(
    inner: Arc<Inner>,
    mut link: Link<R, W>,
    mut kept: Kept,
    events: mpsc::Sender<Batch<ServerEvent>>,
    permit: Slot,
) -> impl Future<Output = ()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    async move {
        let config = &inner.config;
        let handle = kept.registration.handle.clone();
        let client = handle.id;
        // The client's file transfers live as long as it does: across a session's connections.
        let transfers = lock_transfers(&inner).get(&client).cloned();
        let outcome = drive(
            &mut link.reader,
            &mut link.writer,
            &mut link.held,
            Drive {
                mode: handle.mode,
                max_body: config.max_frame,
                refuse_late_hello: link.silent,
                outbox: &mut kept.outbox,
                reply: &handle.outbox,
                pending: &handle.pending,
                events: &events,
                message_tag: client.0,
                on_request: |request| ServerEvent::Request { client, request },
                traffic: &handle.traffic,
                close: &link.close,
                close_order: || handle.close_order(),
                drain_deadline: config.drain_deadline,
                heartbeat: config.heartbeat,
                idle_timeout: config.idle_timeout,
                frame_timeout: config.frame_timeout,
                rate_limit: config.rate_limit,
                session: kept.session.as_deref_mut(),
                transfers: transfers.as_ref().map(|t| t.inbox()),
                handler: kept
                    .handler
                    .as_deref_mut()
                    .map(|h| h as &mut dyn crate::Handler),
                reply_policy: config.send_policy,
                replies: &kept.replies,
            },
        )
        .await;
        drop(transfers);
        // In a future of its own, boxed when the connection has ended: its locals (several
        // waits, 1,432 bytes) would otherwise size the task beside `drive`'s future.
        Box::pin(after_link(&inner, &events, &handle, kept, permit, outcome)).await;
    }
}

/// What follows a client's connection: the client ends (the `Disconnected` event), or its
/// session is parked and watched for the client to come back.
async fn after_link(
    inner: &Arc<Inner>,
    events: &mpsc::Sender<Batch<ServerEvent>>,
    handle: &Arc<registry::ClientHandle>,
    kept: Kept,
    permit: Slot,
    outcome: crate::connection::Outcome,
) {
    let config = &inner.config;
    let client = handle.id;
    // Counts this session among the suspended ones while it waits.
    let mut suspension = None;
    let keep = kept.session.is_some()
        && outcome.link_failed()
        && !handle.close.is_cancelled()
        && Suspension::take(inner).is_some_and(|s| {
            suspension = Some(s);
            true
        });
    let mut reason = outcome.reason;
    // The connection slot is free whether or not the session lives on.
    drop(permit);
    if let (true, Some(session), Some(grace)) = (keep, kept.session, config.session_grace) {
        tracing::debug!(%client, %reason, "connection lost; session kept");
        emit(
            inner,
            events,
            ServerEvent::Suspended {
                client,
                reason: reason.clone(),
            },
        )
        .await;
        let parking = handle.park(Parked {
            session: *session,
            outbox: kept.outbox,
            registration: kept.registration,
            handler: kept.handler,
            replies: kept.replies,
        });
        match watch_parked(inner, handle, parking, grace, events).await {
            Some(ended) => reason = ended,
            None => return,
        }
    } else {
        end_transfers(inner, client);
        handle.pending.fail_all();
        // Fail sends still waiting for room in this client's queue now: an application
        // blocked in such a send may be the one that must read the event below.
        drop(kept.outbox);
        // Unregister before reporting, so that `clients()` never lists a client already
        // reported gone and a client may reconnect as soon as it is.
        drop(kept.registration);
    }
    tracing::debug!(%client, %reason, "disconnected");
    departed(inner, events, handle, reason).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The most an idle connection's task future may take (`serve_stream`'s, which
    /// `accept::serve_client` spawns): tokio's task cell adds 96 bytes (its header and
    /// trailer, and the scheduler's handle and task id), the task tracker's wrapper and
    /// `serve_client`'s `Either` 16 more, and rounds the cell up to 128 bytes; at 1,936 or
    /// less the cell is 2,048 bytes, mimalloc's class under 2,560. (Measured 1,808 when this
    /// was written, 2026-12-07: see the module's docs.)
    const MAX_TASK_FUTURE: usize = 1_936;

    #[tokio::test]
    async fn an_idle_connections_task_stays_in_its_size_class() {
        let mut config =
            super::super::ServerConfig::new("127.0.0.1:0".parse().expect("an address"));
        config.protocol = ProtocolMode::Tutorial;
        let (server, _events) = super::super::Server::bind(config).await.expect("bind");
        let (stream, _peer) = tokio::io::duplex(64);
        let (events, _rx) = mpsc::channel(1);
        let addr = "127.0.0.1:1".parse().expect("an address");
        let task = serve_stream(
            server.inner.clone(),
            stream,
            addr,
            events,
            Slot::for_test(),
            None,
        );
        let size = std::mem::size_of_val(&task);
        eprintln!("an idle connection's task future: {size} bytes");
        // Debug builds lay futures out differently (larger); the figure that counts is the
        // optimised build's, which the test suite runs (`cargo test --release`).
        if !cfg!(debug_assertions) {
            assert!(
                size <= MAX_TASK_FUTURE,
                "an idle connection's task future is {size} bytes, over {MAX_TASK_FUTURE}: \
                 its task cell no longer fits mimalloc's 2,048-byte class (see the docs of \
                 `server::task`)"
            );
        }
    }
}

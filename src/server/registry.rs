//! The registry of connected clients.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use crate::id::ClientId;

use crate::connection::{CloseOrder, Mode, Traffic};
use crate::outbox::{OutboxReceiver, OutboxSender};
use crate::protocol::message::SessionToken;
use crate::reason::DisconnectReason;
use crate::request::Pending;
use crate::session::Session;

/// A snapshot of one connected client.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientInfo {
    /// The client's id.
    pub id: ClientId,
    /// The client's address as the server sees it.
    pub addr: SocketAddr,
    /// When the connection was accepted.
    pub connected_at: SystemTime,
    /// Messages received from the client.
    pub messages_in: u64,
    /// Payload bytes received from the client.
    pub bytes_in: u64,
    /// Messages written to the client's socket.
    pub messages_out: u64,
    /// Payload bytes written to the client's socket.
    pub bytes_out: u64,
    /// The protocol the client speaks.
    pub protocol: Mode,
    /// The name a sockframe client gave in its hello (empty if none).
    pub name: String,
    /// Messages queued for the client, not yet written to its socket.
    pub queued: usize,
    /// Whether the client has a lossless session, and whether it is connected now.
    pub session: SessionState,
    /// The node of a cluster the client is connected to (`None` on a single server).
    pub node: Option<String>,
}

/// The state of a client's lossless session, in [`ClientInfo`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// No session (the tutorial framing, or a client that asked for none).
    None,
    /// A session, carried by a live connection.
    Connected,
    /// A session whose connection dropped, kept for the client to resume.
    Suspended,
}

impl SessionState {
    /// `"none"`, `"connected"` or `"suspended"`.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::None => "none",
            SessionState::Connected => "connected",
            SessionState::Suspended => "suspended",
        }
    }
}

/// What the server keeps for one connected client (for a client with a lossless session:
/// for the whole session, across its connections).
///
/// One allocation per client (its `Arc`, 440 bytes): the few locks it has are `std` mutexes
/// inside it (on Linux a futex word and a poison flag, no allocation of their own), each
/// around one small field that is rarely written (the address, the close order, the link,
/// a parked session), and the counters are atomics. The registry's map holds only the
/// pointer. Session-only state that is large is boxed ([`Parked`]).
#[derive(Debug)]
pub(crate) struct ClientHandle {
    pub(crate) id: ClientId,
    /// The address of the client's latest connection.
    addr: Mutex<SocketAddr>,
    pub(crate) connected_at: SystemTime,
    pub(crate) mode: Mode,
    pub(crate) name: String,
    pub(crate) traffic: Traffic,
    /// The server's requests to this client waiting for answers.
    pub(crate) pending: Pending,
    /// Queue of messages to this client.
    pub(crate) outbox: OutboxSender,
    /// Fired to end the client's connection and session (a child of the server's shutdown
    /// token).
    pub(crate) close: CancellationToken,
    /// Why `close` was fired; unset means shutdown.
    order: Mutex<Option<CloseOrder>>,
    /// The current connection's token, a child of `close`; fired alone when a resuming
    /// connection takes the session over.
    link: Mutex<CancellationToken>,
    /// The session's token and who may resume it, if the client has a session.
    pub(crate) session: Option<SessionKey>,
    /// The session's state while no connection carries it. Boxed: it is 184 bytes, only
    /// sessions ever park, and every connected client's handle would otherwise carry them.
    parked: Mutex<Option<Box<Parked>>>,
    /// Signalled when the session is parked (a resumer waiting for a takeover).
    pub(crate) on_park: Notify,
    /// Signalled when a resumer took the parked session (its expiry watch stops).
    pub(crate) on_resume: Notify,
    /// The session was handed over to another node of a cluster.
    handed_over: AtomicBool,
    /// How many times the session was parked (see [`ClientHandle::park`]).
    parkings: AtomicU64,
    /// Registered at accept, before its protocol is known (`auto` mode): what is sent to it
    /// waits in its outbox, and it has not been announced (`Connected`) yet. Shown as a
    /// tutorial client meanwhile, the protocol it defaults to.
    detecting: AtomicBool,
}

/// Who may resume a session.
#[derive(Debug)]
pub(crate) struct SessionKey {
    pub(crate) token: SessionToken,
    /// The credential the session was opened with: the hello's token, or the client
    /// certificate's name under mutual TLS. A resume must present the same one, so a
    /// session token alone does not let another principal in.
    pub(crate) principal: Bytes,
}

impl SessionKey {
    /// Whether `token` and `principal` may resume this session (constant time).
    pub(crate) fn admits(&self, token: &SessionToken, principal: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        let same_principal: bool = self.principal.as_ref().ct_eq(principal).into();
        // Both checks run whatever the first's result, so timing tells nothing of which
        // failed.
        self.token.matches(token) & same_principal
    }
}

/// A session with no connection: what the next connection takes over.
pub(crate) struct Parked {
    pub(crate) session: Session,
    pub(crate) outbox: OutboxReceiver,
    /// Keeps the client registered while it is away.
    pub(crate) registration: Registration,
    /// The client's message handler, kept with its state for the next connection.
    pub(crate) handler: Option<Box<dyn crate::handler::Handler>>,
    /// The handler's replies not yet written, which the next connection writes first.
    pub(crate) replies: crate::connection::Replies,
}

impl std::fmt::Debug for Parked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parked")
            .field("session", &self.session)
            .field("outbox", &self.outbox)
            .field("registration", &self.registration)
            .field("handler", &self.handler.is_some())
            .field("replies", &self.replies)
            .finish()
    }
}

impl ClientHandle {
    fn new(
        id: ClientId,
        peer: Peer,
        outbox: OutboxSender,
        close: CancellationToken,
        connected_at: SystemTime,
        session: Option<SessionKey>,
    ) -> ClientHandle {
        let link = link_token(&close, session.is_some());
        ClientHandle {
            id,
            addr: Mutex::new(peer.addr),
            connected_at,
            mode: peer.mode,
            name: peer.name,
            traffic: Traffic::default(),
            pending: Pending::default(),
            outbox,
            close,
            order: Mutex::new(None),
            link: Mutex::new(link),
            session,
            parked: Mutex::new(None),
            on_park: Notify::new(),
            on_resume: Notify::new(),
            handed_over: AtomicBool::new(false),
            parkings: AtomicU64::new(0),
            detecting: AtomicBool::new(peer.detecting),
        }
    }

    /// Closes the connection with `reason`; the first order wins.
    pub(crate) fn close_with(&self, reason: DisconnectReason, graceful: bool) {
        let mut order = lock(&self.order);
        if order.is_none() && !self.close.is_cancelled() {
            *order = Some(CloseOrder { reason, graceful });
        }
        drop(order);
        self.close.cancel();
    }

    /// How the connection is to be closed, once `close` (or its link) has fired.
    pub(crate) fn close_order(&self) -> CloseOrder {
        if let Some(order) = lock(&self.order).clone() {
            return order;
        }
        if self.close.is_cancelled() {
            CloseOrder {
                reason: DisconnectReason::Shutdown,
                graceful: true,
            }
        } else {
            // Only the link fired: a resume took the session over.
            CloseOrder {
                reason: DisconnectReason::Replaced,
                graceful: false,
            }
        }
    }

    /// A token for a new connection of this client (the old one's stays fired).
    pub(crate) fn new_link(&self, addr: SocketAddr) -> CancellationToken {
        let link = link_token(&self.close, self.session.is_some());
        *lock(&self.link) = link.clone();
        *lock(&self.addr) = addr;
        link
    }

    /// Ends the current connection so that a resuming one can take the session over.
    pub(crate) fn take_over(&self) {
        lock(&self.link).cancel();
    }

    /// Leaves the session for the next connection to take; returns the parking's number,
    /// which tells its watch (the task that expires it) from the watch of an earlier
    /// parking of the same session, still waking from its resume.
    pub(crate) fn park(&self, parked: Parked) -> u64 {
        let mut slot = lock(&self.parked);
        *slot = Some(Box::new(parked));
        let generation = self.parkings.fetch_add(1, Ordering::AcqRel) + 1;
        drop(slot);
        self.on_park.notify_one();
        generation
    }

    /// Puts back a session a resumer took but could not use, for the watch of its parking
    /// to go on watching.
    pub(crate) fn unpark_failed(&self, parked: Parked) {
        *lock(&self.parked) = Some(Box::new(parked));
        self.on_park.notify_one();
    }

    /// The number of the latest [`park`](Self::park).
    pub(crate) fn parking(&self) -> u64 {
        self.parkings.load(Ordering::Acquire)
    }

    /// Wakes every watch of a parked session: a resumer took it, or it left for another
    /// node. (Every one, and a permit for one not yet waiting: a session parked again soon
    /// after a resume has two watches, and the older must not sleep on until its expiry.)
    pub(crate) fn wake_watches(&self) {
        self.on_resume.notify_waiters();
        self.on_resume.notify_one();
    }

    /// Takes the parked session, if it is parked.
    pub(crate) fn take_parked(&self) -> Option<Parked> {
        lock(&self.parked).take().map(|parked| *parked)
    }

    /// Notes that the session went to another node (before `on_resume` wakes its watch).
    pub(crate) fn mark_handed_over(&self) {
        self.handed_over.store(true, Ordering::Release);
    }

    /// Whether the session went to another node.
    pub(crate) fn handed_over(&self) -> bool {
        self.handed_over.load(Ordering::Acquire)
    }

    pub(crate) fn is_parked(&self) -> bool {
        lock(&self.parked).is_some()
    }

    /// Whether the client's protocol is still being detected (see [`Peer::detecting`]).
    pub(crate) fn is_detecting(&self) -> bool {
        self.detecting.load(Ordering::Acquire)
    }

    /// The client being detected turned out to speak the tutorial framing, as registered.
    pub(crate) fn settle(&self) {
        self.detecting.store(false, Ordering::Release);
    }

    /// Messages in, bytes in, messages out, bytes out, so far.
    pub(crate) fn traffic_totals(&self) -> [u64; 4] {
        let t = &self.traffic;
        [&t.messages_in, &t.bytes_in, &t.messages_out, &t.bytes_out]
            .map(|c| c.load(Ordering::Relaxed))
    }

    pub(crate) fn info(&self) -> ClientInfo {
        let t = &self.traffic;
        ClientInfo {
            id: self.id,
            addr: *lock(&self.addr),
            connected_at: self.connected_at,
            messages_in: t.messages_in.load(Ordering::Relaxed),
            bytes_in: t.bytes_in.load(Ordering::Relaxed),
            messages_out: t.messages_out.load(Ordering::Relaxed),
            bytes_out: t.bytes_out.load(Ordering::Relaxed),
            protocol: self.mode,
            name: self.name.clone(),
            queued: self.outbox.len(),
            session: match (&self.session, lock(&self.parked).is_some()) {
                (None, _) => SessionState::None,
                (Some(_), false) => SessionState::Connected,
                (Some(_), true) => SessionState::Suspended,
            },
            node: None,
        }
    }
}

/// A token for one connection of a client whose own token is `close`: a child of it when the
/// client has a session, which a resuming connection takes over by firing the old one's link
/// alone; otherwise `close` itself, since nothing ever takes such a client over. A child token
/// is an allocation of its own (112 bytes) and an entry in its parent's list of children:
/// every idle client without a session would carry one for nothing.
fn link_token(close: &CancellationToken, session: bool) -> CancellationToken {
    if session {
        close.child_token()
    } else {
        close.clone()
    }
}

/// What is known of a client when it is registered.
#[derive(Debug)]
pub(crate) struct Peer {
    pub(crate) addr: SocketAddr,
    pub(crate) mode: Mode,
    pub(crate) name: String,
    /// Registered before its protocol is known: at accept in `auto` mode, as a tutorial
    /// client, so that sends and broadcasts reach it from the start. Detection then either
    /// [settles](ClientHandle::settle) it (tutorial) or [promotes](Registry::promote) it
    /// (a sockframe hello).
    pub(crate) detecting: bool,
}

/// Connected clients by id.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    next_id: AtomicU64,
    clients: Mutex<HashMap<ClientId, Arc<ClientHandle>>>,
    /// The cluster told of each client that joins and leaves.
    peers: Option<Arc<dyn super::Peers>>,
}

impl Registry {
    /// An empty registry; with `peers`, ids count from the node's base and the cluster
    /// hears of every client.
    pub(crate) fn new(peers: Option<Arc<dyn super::Peers>>) -> Registry {
        Registry {
            next_id: AtomicU64::new(peers.as_ref().map_or(0, |p| p.id_base())),
            clients: Mutex::default(),
            peers,
        }
    }

    /// Registers a new client; it stays registered until the returned guard drops.
    pub(crate) fn register(
        self: &Arc<Self>,
        peer: Peer,
        outbox: OutboxSender,
        close: CancellationToken,
        session: impl FnOnce(ClientId) -> Option<SessionKey>,
    ) -> Registration {
        self.register_as(None, peer, outbox, close, session)
    }

    /// Registers a client under `id` (a session handed over from another node keeps its
    /// id), or under a new id.
    pub(crate) fn register_as(
        self: &Arc<Self>,
        id: Option<ClientId>,
        peer: Peer,
        outbox: OutboxSender,
        close: CancellationToken,
        session: impl FnOnce(ClientId) -> Option<SessionKey>,
    ) -> Registration {
        let id = id.unwrap_or_else(|| ClientId(self.next_id.fetch_add(1, Ordering::Relaxed) + 1));
        let handle = ClientHandle::new(id, peer, outbox, close, SystemTime::now(), session(id));
        self.insert(handle)
    }

    /// Registers a client being detected again, under the same id, as what its hello says
    /// it is (`peer`, a sockframe client, with the session `session` gives). The outbox and
    /// the close token carry over, so what was sent to it meanwhile, queued in that outbox,
    /// goes to the new one in order, and a close ordered meanwhile stands.
    pub(crate) fn promote(
        self: &Arc<Self>,
        detected: Registration,
        peer: Peer,
        session: impl FnOnce(ClientId) -> Option<SessionKey>,
    ) -> Registration {
        let old = &detected.handle;
        let handle = ClientHandle::new(
            old.id,
            peer,
            old.outbox.clone(),
            old.close.clone(),
            old.connected_at,
            session(old.id),
        );
        *lock(&handle.order) = lock(&old.order).clone();
        // Replaces the old entry; the old guard, dropped below, finds the entry no longer its
        // own and leaves it.
        let promoted = self.insert(handle);
        drop(detected);
        promoted
    }

    fn insert(self: &Arc<Self>, handle: ClientHandle) -> Registration {
        let handle = Arc::new(handle);
        lock(&self.clients).insert(handle.id, handle.clone());
        // A connection being detected is not announced to the other nodes (a port scan
        // would cost a registry write and delete each): only once it is known.
        if let (Some(peers), false) = (&self.peers, handle.is_detecting()) {
            peers.joined(&handle.info());
        }
        Registration {
            registry: self.clone(),
            handle,
        }
    }

    /// A client being detected turned out to speak the tutorial framing, as registered:
    /// now it is announced to the other nodes too.
    pub(crate) fn settle(&self, handle: &ClientHandle) {
        handle.settle();
        if let Some(peers) = &self.peers {
            peers.joined(&handle.info());
        }
    }

    pub(crate) fn get(&self, id: ClientId) -> Option<Arc<ClientHandle>> {
        lock(&self.clients).get(&id).cloned()
    }

    /// Every connected client (a snapshot; the lock is not held while callers use it).
    pub(crate) fn all(&self) -> Vec<Arc<ClientHandle>> {
        lock(&self.clients).values().cloned().collect()
    }

    pub(crate) fn len(&self) -> usize {
        lock(&self.clients).len()
    }
}

/// Unregisters its client when dropped, whichever way the connection task ends.
#[derive(Debug)]
pub(crate) struct Registration {
    registry: Arc<Registry>,
    pub(crate) handle: Arc<ClientHandle>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut clients = lock(&self.registry.clients);
        // Only its own entry: a promoted registration has replaced it under the same id.
        let own = clients
            .get(&self.handle.id)
            .is_some_and(|h| Arc::ptr_eq(h, &self.handle));
        if !own {
            return;
        }
        clients.remove(&self.handle.id);
        drop(clients);
        if let (Some(peers), false) = (&self.registry.peers, self.handle.is_detecting()) {
            peers.left(self.handle.id);
        }
    }
}

/// Locks a mutex, ignoring poisoning: every critical section here is a single map or
/// option operation that leaves the data consistent even if a panic interrupted it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

//! The registry of connected clients.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;

use crate::connection::{CloseOrder, Mode, Traffic};
use crate::outbox::OutboxSender;
use crate::reason::DisconnectReason;
use crate::request::Pending;

/// A client's id: unique for the life of the server, never reused (the tutorial's
/// `Clients.Count` hands out the same id again after a disconnect). Ids start at 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(pub u64);

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A snapshot of one connected client.
#[derive(Debug, Clone, PartialEq, Eq)]
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
}

/// What the server keeps for one connected client.
#[derive(Debug)]
pub(crate) struct ClientHandle {
    pub(crate) id: ClientId,
    pub(crate) addr: SocketAddr,
    pub(crate) connected_at: SystemTime,
    pub(crate) mode: Mode,
    pub(crate) name: String,
    pub(crate) traffic: Traffic,
    /// The server's requests to this client waiting for answers.
    pub(crate) pending: Pending,
    /// Queue of messages to this client.
    pub(crate) outbox: OutboxSender,
    /// Fired to close the connection (a child of the server's shutdown token).
    pub(crate) close: CancellationToken,
    /// Why `close` was fired; unset means shutdown.
    order: Mutex<Option<CloseOrder>>,
}

impl ClientHandle {
    /// Closes the connection with `reason`; the first order wins.
    pub(crate) fn close_with(&self, reason: DisconnectReason, graceful: bool) {
        let mut order = lock(&self.order);
        if order.is_none() && !self.close.is_cancelled() {
            *order = Some(CloseOrder { reason, graceful });
        }
        drop(order);
        self.close.cancel();
    }

    /// How the connection is to be closed, once `close` has fired.
    pub(crate) fn close_order(&self) -> CloseOrder {
        lock(&self.order).clone().unwrap_or(CloseOrder {
            reason: DisconnectReason::Shutdown,
            graceful: true,
        })
    }

    pub(crate) fn info(&self) -> ClientInfo {
        let t = &self.traffic;
        ClientInfo {
            id: self.id,
            addr: self.addr,
            connected_at: self.connected_at,
            messages_in: t.messages_in.load(Ordering::Relaxed),
            bytes_in: t.bytes_in.load(Ordering::Relaxed),
            messages_out: t.messages_out.load(Ordering::Relaxed),
            bytes_out: t.bytes_out.load(Ordering::Relaxed),
            protocol: self.mode,
            name: self.name.clone(),
        }
    }
}

/// What is known of a client when it is registered.
#[derive(Debug)]
pub(crate) struct Peer {
    pub(crate) addr: SocketAddr,
    pub(crate) mode: Mode,
    pub(crate) name: String,
}

/// Connected clients by id.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    next_id: AtomicU64,
    clients: Mutex<HashMap<ClientId, Arc<ClientHandle>>>,
}

impl Registry {
    /// Registers a new client; it stays registered until the returned guard drops.
    pub(crate) fn register(
        self: &Arc<Self>,
        peer: Peer,
        outbox: OutboxSender,
        close: CancellationToken,
    ) -> Registration {
        let id = ClientId(self.next_id.fetch_add(1, Ordering::Relaxed) + 1);
        let handle = Arc::new(ClientHandle {
            id,
            addr: peer.addr,
            connected_at: SystemTime::now(),
            mode: peer.mode,
            name: peer.name,
            traffic: Traffic::default(),
            pending: Pending::default(),
            outbox,
            close,
            order: Mutex::new(None),
        });
        lock(&self.clients).insert(id, handle.clone());
        Registration {
            registry: self.clone(),
            handle,
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
        lock(&self.registry.clients).remove(&self.handle.id);
    }
}

/// Locks a mutex, ignoring poisoning: every critical section here is a single map or
/// option operation that leaves the data consistent even if a panic interrupted it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

//! The server: accepts clients, keeps a registry of them, and reports what they send as a
//! stream of [`ServerEvent`]s.
//!
//! ```no_run
//! use sockframe::server::{Server, ServerConfig, ServerEvent};
//!
//! # async fn run() -> sockframe::Result<()> {
//! let (server, mut events) = Server::bind(ServerConfig::default()).await?;
//! while let Some(event) = events.recv().await {
//!     if let ServerEvent::Message { client, message } = event {
//!         server.send(client, message).await?; // echo it back
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! Each connection runs in its own task; the accept loop never waits on a client. Per client
//! there is one bounded outgoing queue ([`OutboxLimits`](crate::OutboxLimits)), so a client
//! that stops reading costs at most its queue's bytes and never delays the others.
//!
//! # How the pieces meet
//!
//! - `mod.rs`: [`Server`], the handle API (send, broadcast, request, kick, list, stats,
//!   shutdown) over the shared `Inner`.
//! - `accept`: the listener, the accept loop and the connection limits; hands each stream,
//!   after TLS, to `task`.
//! - `task`: one client's life: `admit` (detection, handshake, `WELCOME`/`REJECT`), then
//!   registration in the `registry`, the connection's drive loop, and at the end either the
//!   `Disconnected` event or a parked session (`park`).
//! - `events`: [`ServerEvent`] and the batched [`ServerEvents`] stream.
//! - `config`, `registry`, `stats`: the settings, the id → client table, and the totals.
//! - `peers`, `handover`: the other nodes of a cluster as the server sees them ([`Peers`]),
//!   and a lossless session moving between nodes ([`Server::hand_over`]).
//!
//! No module here is imported by the connection or the layers below it; the admin endpoint
//! (`crate::admin`) uses only the public handle.

mod accept;
mod admit;
mod config;
mod events;
mod fanout;
mod handover;
mod park;
mod peers;
mod registry;
mod stats;
mod task;

use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::future::join_all;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{DEFAULT_PORT, ProtocolMode, ServerConfig};
pub use handover::{HandedSession, SessionClaim};
pub use peers::{BoxFuture, Peers, Stamp};
pub use registry::{ClientId, ClientInfo, SessionState};
pub use stats::{LATENCY_BUCKETS, Refusal, ServerStats};

use crate::connection::Mode;
use crate::message::Message;
use crate::outbox::{FullPolicy, TrySendError};
use crate::outgoing::Outgoing;
use crate::reason::DisconnectReason;
use crate::{Error, Result};
use registry::{ClientHandle, Registry};

use accept::{accept_loop, listen_on};
pub use events::{NextEvent, ServerEvent, ServerEvents};

/// A handle on a running server; cheap to clone. Dropping every handle does not stop the
/// server: call [`shutdown`](Self::shutdown).
#[derive(Debug, Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

struct Inner {
    config: ServerConfig,
    local_addr: SocketAddr,
    registry: Arc<Registry>,
    /// Fired by `shutdown`; each connection's close token is a child of it.
    shutdown: CancellationToken,
    /// Tracks the accept loop and every connection task.
    tasks: TaskTracker,
    /// The file transfer engine of each connected sockframe client.
    transfers: std::sync::Mutex<std::collections::HashMap<ClientId, crate::transfer::Transfers>>,
    /// One receive per file content at a time, across connections.
    transfer_locks: Arc<crate::transfer::Locks>,
    /// Sessions waiting for their client to come back (bounded by
    /// [`ServerConfig::max_suspended`]).
    suspended: Arc<std::sync::atomic::AtomicUsize>,
    /// Makes each client's message handler, when messages go to handlers.
    make_handler: Option<crate::handler::MakeHandler>,
    /// Totals counted per event (never per message), for [`Server::stats`].
    counters: stats::Counters,
    /// A cluster's numbered broadcasts, and the sessions moving between nodes.
    fanout: fanout::Fanout,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("config", &self.config)
            .field("local_addr", &self.local_addr)
            .field("registry", &self.registry)
            .field("handlers", &self.make_handler.is_some())
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Listens on `config.bind` and starts accepting clients.
    pub async fn bind(config: ServerConfig) -> Result<(Server, ServerEvents)> {
        let listener = listen_on(&config)?;
        Self::from_listener(listener, config)
    }

    /// Listens on `config.bind`, and hands each client's messages to a [`Handler`] that
    /// `make` returns for that client (given its id and address), called inside the
    /// client's connection task, instead of to the event stream. See [`crate::handler`]:
    /// the fastest way to serve many small messages.
    ///
    /// [`Handler`]: crate::Handler
    pub async fn bind_with_handler<F, H>(
        config: ServerConfig,
        make: F,
    ) -> Result<(Server, ServerEvents)>
    where
        F: Fn(ClientId, SocketAddr) -> H + Send + Sync + 'static,
        H: crate::Handler,
    {
        let listener = listen_on(&config)?;
        Self::from_listener_with_handler(listener, config, make)
    }

    /// Serves clients accepted from an existing listener (`config.bind` is ignored).
    pub fn from_listener(
        listener: TcpListener,
        config: ServerConfig,
    ) -> Result<(Server, ServerEvents)> {
        Self::start(listener, config, None)
    }

    /// [`from_listener`](Self::from_listener) with a message handler per client, as in
    /// [`bind_with_handler`](Self::bind_with_handler).
    pub fn from_listener_with_handler<F, H>(
        listener: TcpListener,
        config: ServerConfig,
        make: F,
    ) -> Result<(Server, ServerEvents)>
    where
        F: Fn(ClientId, SocketAddr) -> H + Send + Sync + 'static,
        H: crate::Handler,
    {
        let make: crate::handler::MakeHandler =
            Arc::new(move |client, addr| Box::new(make(client, addr)));
        Self::start(listener, config, Some(make))
    }

    fn start(
        listener: TcpListener,
        config: ServerConfig,
        make_handler: Option<crate::handler::MakeHandler>,
    ) -> Result<(Server, ServerEvents)> {
        let local_addr = listener.local_addr()?;
        let (events_tx, rx) = mpsc::channel(config.event_capacity.max(1));
        let fanout = fanout::Fanout::new(config.outbox);
        let inner = Arc::new(Inner {
            registry: Arc::new(Registry::new(config.cluster.clone())),
            config,
            local_addr,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            transfers: Default::default(),
            transfer_locks: Default::default(),
            suspended: Default::default(),
            make_handler,
            counters: Default::default(),
            fanout,
        });
        inner
            .tasks
            .spawn(accept_loop(inner.clone(), listener, events_tx));
        tracing::info!(addr = %local_addr, "listening");
        let server = Server { inner };
        if let Some(peers) = &server.inner.config.cluster {
            peers.start(server.clone());
        }
        Ok((server, ServerEvents::new(rx)))
    }

    /// The address the server listens on (useful after binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// The configuration the server runs with.
    pub fn config(&self) -> &ServerConfig {
        &self.inner.config
    }

    /// Queues `msg` for one client, following [`ServerConfig::send_policy`] when its queue
    /// is full. Returns once queued (not once written).
    pub async fn send(&self, client: ClientId, msg: impl Into<Message>) -> Result<()> {
        let msg = self.checked(msg.into())?;
        let handle = match self.inner.registry.get(client) {
            Some(handle) => handle,
            None => match &self.inner.config.cluster {
                Some(peers) => return peers.send(client, msg).await,
                None => return Err(Error::UnknownClient(client)),
            },
        };
        let policy = self.inner.config.send_policy;
        match (&self.inner.config.cluster, handle.session.is_some()) {
            // The client's session may be leaving for another node right now: its queue
            // then closes, and the cluster knows where it went.
            (Some(peers), true) => {
                match deliver(&handle, Outgoing::Message(msg.clone()), policy).await {
                    Err(Error::UnknownClient(_)) => peers.send(client, msg).await,
                    other => other,
                }
            }
            _ => deliver(&handle, Outgoing::Message(msg), policy).await,
        }
    }

    /// Waits until every message queued for `client` before this call is confirmed:
    /// acknowledged by the client when it has a lossless session (even across its
    /// reconnects), written to its socket otherwise. Fails with [`Error::Disconnected`] if
    /// that can no longer happen (the client left or its session expired).
    pub async fn flush(&self, client: ClientId) -> Result<()> {
        let handle = self.handle(client)?;
        let (waiter, done) = crate::outgoing::FlushWaiter::new();
        deliver(&handle, Outgoing::Flush(waiter), FullPolicy::Wait).await?;
        done.await.map_err(|_| Error::Disconnected)
    }

    /// Sends a request to a sockframe client and waits for its answer, up to
    /// [`ServerConfig::request_timeout`]. Fails with [`Error::NotSupported`] for a tutorial
    /// client, [`Error::Remote`] for an error answer, [`Error::Timeout`], or
    /// [`Error::Disconnected`]. Dropping the future cancels the request.
    pub async fn request(&self, client: ClientId, msg: impl Into<Message>) -> Result<Message> {
        let msg = self.checked(msg.into())?;
        let handle = match self.inner.registry.get(client) {
            Some(handle) => handle,
            None => match &self.inner.config.cluster {
                Some(peers) => return peers.request(client, msg).await,
                None => return Err(Error::UnknownClient(client)),
            },
        };
        if handle.mode != Mode::Sockframe {
            return Err(Error::NotSupported);
        }
        let started = std::time::Instant::now();
        let answer = crate::request::request(
            &handle.pending,
            &handle.outbox,
            msg,
            self.inner.config.request_timeout,
        )
        .await;
        self.inner.counters.request(started.elapsed());
        answer
    }

    /// Queues `msg` for every connected client; returns how many it was queued for.
    ///
    /// One buffer is shared by all recipients (no copy per client). A client whose queue is
    /// full is handled by [`ServerConfig::broadcast_policy`]; with `Wait`, the full ones are
    /// waited on together, after the others already have the message.
    ///
    /// In a cluster it reaches the clients of every node, each exactly once (also a client
    /// whose session is moving between nodes), in the order this node made its broadcasts:
    /// a node's broadcasts are numbered and made one at a time, so concurrent calls wait
    /// their turn.
    pub async fn broadcast(&self, msg: impl Into<Message>) -> Result<usize> {
        self.broadcast_filtered(msg.into(), None).await
    }

    /// Like [`broadcast`](Self::broadcast), to everyone except `except` (typically the
    /// sender of a chat line).
    pub async fn broadcast_except(
        &self,
        except: ClientId,
        msg: impl Into<Message>,
    ) -> Result<usize> {
        self.broadcast_filtered(msg.into(), Some(except)).await
    }

    async fn broadcast_filtered(&self, msg: Message, except: Option<ClientId>) -> Result<usize> {
        let msg = self.checked(msg)?;
        let Some(peers) = &self.inner.config.cluster else {
            return Ok(self.fan_out(msg, except, None).await);
        };
        // One at a time, so that this node's broadcasts are numbered, published and fanned
        // out here in the same order (see `fanout`).
        let mut turn = self.inner.fanout.turn.lock().await;
        *turn += 1;
        let stamp = Stamp {
            origin: peers.broadcast_origin(),
            seq: *turn,
        };
        // Other nodes first: one publish, and each fans out to its own clients while this
        // one does. A cluster that cannot publish fails the call: the local clients still
        // get the message, and the caller learns that the others did not.
        let remote = peers.broadcast(msg.clone(), except, stamp.seq).await;
        let delivered = self.fan_out(msg, except, Some(stamp)).await;
        drop(turn);
        remote.map(|()| delivered)
    }

    /// The local half of a broadcast: the clients of this node. Returns how many it was
    /// queued for. (In a cluster, a broadcast that another node made reaches this node's
    /// clients through [`broadcast_stamped`](Self::broadcast_stamped).)
    pub async fn broadcast_local(&self, msg: Message, except: Option<ClientId>) -> usize {
        self.fan_out(msg, except, None).await
    }

    /// The local half of broadcast `stamp` of a cluster, which another node made: what a
    /// [`Peers`] implementation calls, for each origin in the order of its numbers. A
    /// client whose session moved here from a node that had already given it this broadcast
    /// is skipped. Returns how many it was queued for.
    pub async fn broadcast_stamped(
        &self,
        msg: Message,
        except: Option<ClientId>,
        stamp: Stamp,
    ) -> usize {
        self.fan_out(msg, except, Some(stamp)).await
    }

    async fn fan_out(&self, msg: Message, except: Option<ClientId>, stamp: Option<Stamp>) -> usize {
        let fanout = &self.inner.fanout;
        let item = Outgoing::Message(msg.clone());
        let policy = self.inner.config.broadcast_policy;
        let mut delivered = 0;
        let mut waiting = Vec::new();
        {
            // A stamped broadcast's loop runs with no hand-over step in between.
            let begun = stamp.map(|s| fanout.begin(s, &msg, except));
            let skip = begun.as_ref().map_or(&[][..], |b| &b.skip[..]);
            for handle in self.inner.registry.all() {
                if Some(handle.id) == except || (!skip.is_empty() && skip.contains(&handle.id)) {
                    continue;
                }
                match handle.outbox.try_send(item.clone()) {
                    Ok(()) => delivered += 1,
                    Err(TrySendError::Closed) => {}
                    Err(TrySendError::Full) => match policy {
                        FullPolicy::Disconnect => slow_consumer(&handle),
                        FullPolicy::Wait => waiting.push(handle),
                    },
                }
            }
            if let (Some(begun), Some(stamp)) = (begun, stamp) {
                fanout.done(begun, stamp, &waiting);
            }
        }
        let waited = join_all(waiting.iter().map(|h| {
            let item = item.clone();
            let msg = &msg;
            async move {
                let queued = h.outbox.send(item).await.is_ok();
                if let Some(stamp) = stamp {
                    fanout.waited(stamp, h, queued, msg);
                }
                queued
            }
        }))
        .await;
        delivered += waited.iter().filter(|&&queued| queued).count();
        delivered
    }

    /// Queues `msg` for `client` only if it is connected to this node (what a cluster
    /// delivers for another node); fails with [`Error::UnknownClient`] otherwise.
    pub async fn send_local(&self, client: ClientId, msg: Message) -> Result<()> {
        let msg = self.checked(msg)?;
        let handle = self.handle(client)?;
        deliver(
            &handle,
            Outgoing::Message(msg),
            self.inner.config.send_policy,
        )
        .await
    }

    /// A request to `client` only if it is connected to this node (for a cluster).
    pub async fn request_local(&self, client: ClientId, msg: Message) -> Result<Message> {
        if self.inner.registry.get(client).is_none() {
            return Err(Error::UnknownClient(client));
        }
        self.request(client, msg).await
    }

    /// The clients connected to this node only, ordered by id ([`clients`](Self::clients)
    /// adds those of the other nodes of a cluster).
    pub fn local_clients(&self) -> Vec<ClientInfo> {
        let node = self
            .inner
            .config
            .cluster
            .as_ref()
            .map(|p| p.node().to_string());
        let mut all: Vec<_> = self
            .inner
            .registry
            .all()
            .iter()
            .map(|h| {
                let mut info = h.info();
                info.node = node.clone();
                info
            })
            .collect();
        all.sort_by_key(|c| c.id);
        all
    }

    /// Sends the file at `path` to a sockframe client: hashes it (BLAKE3), offers it, and
    /// streams it once accepted, interleaved with other messages. Returns once offered; the
    /// handle's [`finish`](crate::transfer::TransferHandle::finish) resolves when the client
    /// has verified it. Fails with [`Error::NotSupported`] for a tutorial client and
    /// [`Error::File`] when the file cannot be read.
    ///
    /// The transfer fails if the client disconnects; sending the same file again after it
    /// reconnects resumes from what it already has on disk.
    pub async fn send_file(
        &self,
        client: ClientId,
        path: impl AsRef<std::path::Path>,
    ) -> Result<crate::transfer::TransferHandle> {
        if self.inner.shutdown.is_cancelled() {
            return Err(Error::Closed);
        }
        let transfers = self
            .inner
            .transfers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&client)
            .cloned();
        match transfers {
            Some(transfers) => transfers.send_file(path.as_ref()).await,
            None if self.inner.registry.get(client).is_some() => Err(Error::NotSupported),
            None => Err(Error::UnknownClient(client)),
        }
    }

    /// Disconnects a client with reason `kicked`, after delivering what is already queued for
    /// it (bounded by [`ServerConfig::drain_deadline`]). Returns `false` if no such client.
    pub fn disconnect(&self, client: ClientId) -> bool {
        match self.inner.registry.get(client) {
            Some(handle) => {
                handle.close_with(DisconnectReason::Kicked, true);
                true
            }
            None => false,
        }
    }

    /// Every connected client, ordered by id; in a cluster, those of every node (the other
    /// nodes' as last heard through the cluster, with their node in [`ClientInfo::node`]).
    /// In `Auto` mode this includes connections whose protocol is still being detected (as
    /// tutorial clients, not yet reported [`Connected`](ServerEvent::Connected)).
    pub fn clients(&self) -> Vec<ClientInfo> {
        let mut all = self.local_clients();
        if let Some(peers) = &self.inner.config.cluster {
            all.extend(peers.remote_clients());
            all.sort_by_key(|c| c.id);
        }
        all
    }

    /// The files being sent to or received from clients right now, with the bytes done of
    /// each, ordered by client.
    pub fn transfers(&self) -> Vec<(ClientId, crate::transfer::TransferStatus)> {
        // Clone the engines out first: reading each one's board takes its own lock.
        let mut engines: Vec<_> = park::lock_transfers(&self.inner)
            .iter()
            .map(|(client, transfers)| (*client, transfers.clone()))
            .collect();
        engines.sort_by_key(|(client, _)| *client);
        engines
            .into_iter()
            .flat_map(|(client, t)| t.in_progress().into_iter().map(move |s| (client, s)))
            .collect()
    }

    /// The server's totals since it started: connections, disconnects by reason, refusals
    /// by limit, traffic (of the connected clients and of those gone), sessions, requests,
    /// files. Added up when called, from counters kept per connection and per event: a
    /// server that is never asked pays nothing per message. A client leaving during the
    /// call may be missed by it (or counted twice) until the next one.
    pub fn stats(&self) -> ServerStats {
        let mut s = self.inner.counters.snapshot();
        let mut by_mode = [0u64; 2];
        for h in self.inner.registry.all() {
            by_mode[usize::from(h.mode == Mode::Sockframe)] += 1;
            let [mi, bi, mo, bo] = h.traffic_totals();
            s.messages_in += mi;
            s.bytes_in += bi;
            s.messages_out += mo;
            s.bytes_out += bo;
        }
        s.connected = vec![(Mode::Tutorial, by_mode[0]), (Mode::Sockframe, by_mode[1])];
        s.sessions_suspended = self
            .inner
            .suspended
            .load(std::sync::atomic::Ordering::Relaxed) as u64;
        s
    }

    /// How many clients are connected right now.
    pub fn client_count(&self) -> usize {
        self.inner.registry.len()
    }

    /// One connected client.
    pub fn client(&self, client: ClientId) -> Option<ClientInfo> {
        self.inner.registry.get(client).map(|h| h.info())
    }

    /// Loads the TLS certificate and key files again; new connections use them, existing
    /// ones keep theirs. On error the previous pair stays in force. Does nothing without TLS.
    #[cfg(feature = "tls")]
    pub fn reload_tls(&self) -> Result<()> {
        match &self.inner.config.tls {
            Some(tls) => match tls.reload() {
                Ok(()) => {
                    tracing::info!("TLS certificate and key reloaded");
                    Ok(())
                }
                Err(e) => {
                    tracing::warn!(error = %e, "TLS reload failed; the old pair stays in force");
                    Err(e.into())
                }
            },
            None => Ok(()),
        }
    }

    /// Shuts down gracefully: stops accepting, delivers what is queued to each client
    /// (bounded by [`ServerConfig::drain_deadline`]), closes every connection with reason
    /// `shutdown`, and returns when every connection task has ended.
    pub async fn shutdown(&self) {
        if !self.inner.shutdown.is_cancelled() {
            tracing::info!(clients = self.inner.registry.len(), "shutting down");
        }
        self.inner.shutdown.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
        if let Some(peers) = &self.inner.config.cluster {
            peers.stop();
        }
        tracing::info!("shut down");
    }

    /// Whether [`shutdown`](Self::shutdown) has been called.
    pub fn is_shut_down(&self) -> bool {
        self.inner.shutdown.is_cancelled()
    }

    fn handle(&self, client: ClientId) -> Result<Arc<ClientHandle>> {
        self.inner
            .registry
            .get(client)
            .ok_or(Error::UnknownClient(client))
    }

    fn checked(&self, msg: Message) -> Result<Message> {
        if self.inner.shutdown.is_cancelled() {
            return Err(Error::Closed);
        }
        crate::protocol::encode_header(msg.len(), self.inner.config.max_frame)?;
        Ok(msg)
    }
}

/// Queues `msg` for one client under `policy`.
async fn deliver(handle: &ClientHandle, msg: Outgoing, policy: FullPolicy) -> Result<()> {
    match handle.outbox.send_with(msg, policy).await {
        Ok(()) => Ok(()),
        Err(TrySendError::Closed) => Err(Error::UnknownClient(handle.id)),
        Err(TrySendError::Full) => {
            slow_consumer(handle);
            Err(Error::SlowConsumer(handle.id))
        }
    }
}

fn slow_consumer(handle: &ClientHandle) {
    if handle.is_detecting() {
        // Not slow: nothing is written to it before its protocol is known. What does not fit
        // meanwhile is not queued for it (a broadcast skips it, a send fails), but it stays.
        tracing::debug!(client = %handle.id, "outgoing queue full while detecting its protocol");
        return;
    }
    tracing::warn!(client = %handle.id, "outgoing queue full; disconnecting slow client");
    handle.close_with(DisconnectReason::SlowConsumer, false);
}

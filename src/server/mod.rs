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

mod config;
mod registry;
mod stats;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{DEFAULT_PORT, ProtocolMode, ServerConfig};
pub use registry::{ClientId, ClientInfo};
pub use stats::{LATENCY_BUCKETS, Refusal, ServerStats};

use crate::connection::{Connection, Drive, FrameReader, FrameWriter, HEAD_ROOM, Mode, drive};
use crate::message::Message;
use crate::outbox::{FullPolicy, TrySendError, outbox};
use crate::outgoing::Outgoing;
use crate::protocol::message::{
    self as wire, Frame, Hello, RejectCode, SessionGrant, SessionRequest, SessionToken, Welcome,
};
use crate::reason::DisconnectReason;
use crate::request::Request;
use crate::session::Session;
use crate::{Error, Result};
use registry::{ClientHandle, Parked, Peer, Registry, SessionKey};

/// Something that happened on the server, in the order it happened per client: `Connected`
/// first, then that client's messages and requests in the order sent, then `Disconnected`.
#[derive(Debug, PartialEq)]
#[non_exhaustive]
pub enum ServerEvent {
    /// A client connected.
    Connected {
        /// Its id.
        client: ClientId,
        /// Its address.
        addr: SocketAddr,
    },
    /// A client sent a message.
    Message {
        /// The sender.
        client: ClientId,
        /// The message: text or binary (sockframe clients), untyped (tutorial clients).
        message: Message,
    },
    /// A sockframe client sent a request; answer it through the [`Request`] (dropping it
    /// unanswered sends the client an `unhandled` error).
    Request {
        /// The sender.
        client: ClientId,
        /// The request and its responder.
        request: Request,
    },
    /// The connection of a client with a lossless session dropped; the session is kept for
    /// [`ServerConfig::session_grace`], and sends to the client queue meanwhile. Next comes
    /// `Resumed` (nothing was lost) or `Disconnected` with
    /// [`DisconnectReason::SessionExpired`].
    Suspended {
        /// The client whose connection dropped.
        client: ClientId,
        /// Why the connection ended.
        reason: DisconnectReason,
    },
    /// A client came back and resumed its session: same id, and every message either way
    /// is delivered once, in order.
    Resumed {
        /// The client.
        client: ClientId,
        /// Its new address.
        addr: SocketAddr,
    },
    /// A client's connection ended (for a client with a session: the session ended).
    Disconnected {
        /// The client that left.
        client: ClientId,
        /// Why.
        reason: DisconnectReason,
    },
    /// A client offers a file (only with [`TransferConfig::save_dir`](crate::transfer::TransferConfig::save_dir)
    /// set, and once the name, size and existing files have been checked): accept or reject
    /// it through the [`FileOffer`](crate::transfer::FileOffer).
    FileOffer {
        /// The sender.
        client: ClientId,
        /// The offer.
        offer: crate::transfer::FileOffer,
    },
    /// A file from a client was received, verified and put in place.
    FileReceived {
        /// The sender.
        client: ClientId,
        /// The file.
        file: crate::transfer::ReceivedFile,
    },
    /// An accepted file from a client was not received.
    FileFailed {
        /// The sender.
        client: ClientId,
        /// The file and why.
        failure: crate::transfer::FileFailure,
    },
}

impl ServerEvent {
    /// A transfer engine's event, as a server event of `client`.
    fn transfer(client: ClientId, event: crate::transfer::TransferEvent) -> Self {
        use crate::transfer::TransferEvent;
        match event {
            TransferEvent::Offer(offer) => ServerEvent::FileOffer { client, offer },
            TransferEvent::Received(file) => ServerEvent::FileReceived { client, file },
            TransferEvent::Failed(failure) => ServerEvent::FileFailed { client, failure },
        }
    }
}

/// The stream of [`ServerEvent`]s. It ends (`recv` returns `None`) after a shutdown, once
/// every connection has ended.
///
/// Keep receiving: when the stream is full, connections stop reading from their sockets.
/// Dropping it is allowed; messages are then discarded.
///
/// Events travel from the connections in batches (all that one read produced, up to 256);
/// [`ServerConfig::event_capacity`] counts batches. The order per client is kept.
#[derive(Debug)]
pub struct ServerEvents {
    rx: mpsc::Receiver<Vec<ServerEvent>>,
    /// The rest of the batch received last, taken from its own buffer (moving a batch into a
    /// queue first copied every event once more: a fifth of the time of 64-byte messages).
    ready: std::vec::IntoIter<ServerEvent>,
}

impl ServerEvents {
    /// The next event; `None` once the server has shut down and every connection has ended.
    pub async fn recv(&mut self) -> Option<ServerEvent> {
        loop {
            if let Some(event) = self.ready.next() {
                return Some(event);
            }
            self.ready = self.rx.recv().await?.into_iter();
        }
    }

    /// The next event if one is ready now.
    pub fn try_recv(&mut self) -> Option<ServerEvent> {
        loop {
            if let Some(event) = self.ready.next() {
                return Some(event);
            }
            self.ready = self.rx.try_recv().ok()?.into_iter();
        }
    }
}

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
        let inner = Arc::new(Inner {
            config,
            local_addr,
            registry: Arc::default(),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            transfers: Default::default(),
            transfer_locks: Default::default(),
            suspended: Default::default(),
            make_handler,
            counters: Default::default(),
        });
        inner
            .tasks
            .spawn(accept_loop(inner.clone(), listener, events_tx));
        tracing::info!(addr = %local_addr, "listening");
        Ok((
            Server { inner },
            ServerEvents {
                rx,
                ready: Default::default(),
            },
        ))
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
        let handle = self.handle(client)?;
        deliver(
            &handle,
            Outgoing::Message(msg),
            self.inner.config.send_policy,
        )
        .await
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
        let handle = self.handle(client)?;
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
        let msg = Outgoing::Message(self.checked(msg)?);
        let policy = self.inner.config.broadcast_policy;
        let mut delivered = 0;
        let mut waiting = Vec::new();
        for handle in self.inner.registry.all() {
            if Some(handle.id) == except {
                continue;
            }
            match handle.outbox.try_send(msg.clone()) {
                Ok(()) => delivered += 1,
                Err(TrySendError::Closed) => {}
                Err(TrySendError::Full) => match policy {
                    FullPolicy::Disconnect => slow_consumer(&handle),
                    FullPolicy::Wait => waiting.push(handle),
                },
            }
        }
        let waited = join_all(waiting.iter().map(|h| h.outbox.send(msg.clone()))).await;
        delivered += waited.iter().filter(|r| r.is_ok()).count();
        Ok(delivered)
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

    /// Every connected client, ordered by id.
    pub fn clients(&self) -> Vec<ClientInfo> {
        let mut all: Vec<_> = self.inner.registry.all().iter().map(|h| h.info()).collect();
        all.sort_by_key(|c| c.id);
        all
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
            Some(tls) => Ok(tls.reload()?),
            None => Ok(()),
        }
    }

    /// Shuts down gracefully: stops accepting, delivers what is queued to each client
    /// (bounded by [`ServerConfig::drain_deadline`]), closes every connection with reason
    /// `shutdown`, and returns when every connection task has ended.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
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
    tracing::warn!(client = %handle.id, "outgoing queue full; disconnecting slow client");
    handle.close_with(DisconnectReason::SlowConsumer, false);
}

/// A listener with a backlog larger than `TcpListener::bind`'s 128.
fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // Lets a restarted server bind again while old connections sit in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Listens on `config.bind` with `config.backlog`, naming the address in the error.
fn listen_on(config: &ServerConfig) -> Result<TcpListener> {
    listen(config.bind, config.backlog).map_err(|source| Error::Bind {
        addr: config.bind.to_string(),
        source,
    })
}

async fn accept_loop(
    inner: Arc<Inner>,
    listener: TcpListener,
    events: mpsc::Sender<Vec<ServerEvent>>,
) {
    let limit = Arc::new(Semaphore::new(inner.config.max_connections));
    let per_ip = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    loop {
        let accepted = tokio::select! {
            _ = inner.shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, addr) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Out of file descriptors and the like: per-connection errors that clear
                // up. Pause briefly so the loop does not spin while they last.
                tracing::warn!(error = %e, "accept failed");
                tokio::select! {
                    _ = inner.shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                }
            }
        };
        if !inner.config.admits(addr.ip()) {
            tracing::debug!(%addr, "refused by the allow/deny lists");
            inner.counters.refused(stats::Refusal::Cidr);
            continue;
        }
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!(%addr, limit = inner.config.max_connections, "connection limit reached; refusing");
            inner.counters.refused(stats::Refusal::ConnectionLimit);
            drop(stream);
            continue;
        };
        let Some(per_ip) = PerIp::take(&per_ip, addr.ip(), inner.config.max_connections_per_ip)
        else {
            tracing::warn!(%addr, limit = inner.config.max_connections_per_ip, "per-address connection limit reached; refusing");
            inner.counters.refused(stats::Refusal::PerIp);
            continue;
        };
        inner.counters.accepted();
        let permit = Slot {
            _global: permit,
            _per_ip: per_ip,
        };
        inner.tasks.spawn(serve_client(
            inner.clone(),
            stream,
            addr,
            events.clone(),
            permit,
        ));
    }
    tracing::info!("stopped accepting");
}

/// A connection's place under the global and the per-address limits; freed on drop.
struct Slot {
    _global: OwnedSemaphorePermit,
    _per_ip: PerIp,
}

/// Connections per IP address.
type PerIpCounts = Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>;

/// One connection counted against its address; uncounted on drop.
struct PerIp {
    counts: PerIpCounts,
    ip: std::net::IpAddr,
}

impl PerIp {
    /// Counts a connection from `ip`, unless `max` are already open.
    fn take(counts: &PerIpCounts, ip: std::net::IpAddr, max: usize) -> Option<PerIp> {
        let ip = ip.to_canonical();
        let mut map = counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PerIp {
            counts: counts.clone(),
            ip,
        })
    }
}

impl Drop for PerIp {
    fn drop(&mut self) {
        let mut map = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// Runs one accepted TCP connection: the TLS handshake when configured, then the rest.
async fn serve_client(
    inner: Arc<Inner>,
    stream: TcpStream,
    addr: SocketAddr,
    events: mpsc::Sender<Vec<ServerEvent>>,
    permit: Slot,
) {
    // Our writes are batched already; Nagle's algorithm would only add latency.
    let _ = stream.set_nodelay(true);
    #[cfg(feature = "tls")]
    if inner.config.tls.is_some() {
        // Boxed: the TLS handshake's and a TLS stream's states are larger, and every plain
        // connection's future (the bulk of an idle connection's memory) would otherwise be
        // as large as a TLS one's.
        return Box::pin(serve_tls(inner, stream, addr, events, permit)).await;
    }
    serve_stream(inner, stream, addr, events, permit, None).await
}

/// Runs the TLS handshake, then the rest of the connection over TLS.
#[cfg(feature = "tls")]
async fn serve_tls(
    inner: Arc<Inner>,
    stream: TcpStream,
    addr: SocketAddr,
    events: mpsc::Sender<Vec<ServerEvent>>,
    permit: Slot,
) {
    let Some(tls) = &inner.config.tls else {
        return;
    };
    // Large socket reads under rustls's small ones: see `ReadAhead`.
    let accept = tls.acceptor().accept(crate::tls::ReadAhead::new(stream));
    let stream = match tokio::time::timeout(inner.config.handshake_timeout, accept).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::debug!(%addr, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%addr, "TLS handshake timed out");
            return;
        }
    };
    let cert_name = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(crate::tls::certificate_name);
    // Writes of whole records: see `RecordWrites` for why.
    let stream = crate::tls::RecordWrites(stream);
    serve_stream(inner, stream, addr, events, permit, cert_name).await
}

/// Runs one client's connection: protocol detection and handshake, then registration (or
/// the resumption of a session), the `Connected` event, the connection itself, and the
/// `Disconnected` event. `cert_name` is the name in the client's TLS certificate (mutual
/// TLS), which wins over a hello's name.
async fn serve_stream<S>(
    inner: Arc<Inner>,
    stream: S,
    addr: SocketAddr,
    events: mpsc::Sender<Vec<ServerEvent>>,
    permit: Slot,
    cert_name: Option<String>,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let config = &inner.config;
    let (mut reader, mut writer) = Connection::new(stream, config.max_frame).split();
    let admitted = match admit(&inner, &mut reader, &mut writer).await {
        Ok(admitted) => admitted,
        Err(why) => {
            // Never reported to the application: it was never connected.
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
        let parked = match resume(&inner, &token, received, &principal).await {
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
        if let Err(e) = send_welcome(config, &mut writer, welcome).await {
            tracing::debug!(%addr, error = %e, "could not send the welcome");
            handle.park(parked);
            return;
        }
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
    let (outbox_tx, outbox_rx) = outbox(config.outbox);
    let wants_session = mode == Mode::Sockframe
        && admitted.session == SessionRequest::New
        && config.session_grace.is_some();
    let mut token_error = None;
    let registration = inner.registry.register(
        Peer { addr, mode, name },
        outbox_tx,
        inner.shutdown.child_token(),
        |id| {
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
        },
    );
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
        // Weak: transfer tasks that outlive the connection must not keep the event stream
        // open after shutdown; their late events are dropped.
        let events = events.downgrade();
        // Weak: the engine lives in `inner`, which would otherwise never be freed.
        let counted = Arc::downgrade(&inner);
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
                        .send(vec![ServerEvent::transfer(client, event)])
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
        lock_transfers(&inner).insert(client, transfers);
    }
    tracing::debug!(%client, %addr, ?mode, "connected");
    emit(&inner, &events, ServerEvent::Connected { client, addr }).await;
    if let Some(reason) = admitted.broken {
        drop(outbox_rx);
        inner
            .counters
            .departed(&reason, registration.handle.traffic_totals());
        drop(registration);
        drop(permit);
        emit(
            &inner,
            &events,
            ServerEvent::Disconnected { client, reason },
        )
        .await;
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

/// What a registered client keeps from one connection to the next (of a session).
struct Kept {
    registration: registry::Registration,
    outbox: crate::outbox::OutboxReceiver,
    session: Option<Session>,
    handler: Option<Box<dyn crate::Handler>>,
    /// The handler's replies not yet written (see [`Parked::replies`]).
    replies: crate::connection::Replies,
}

/// One connection of a client, after its handshake.
struct Link<R, W> {
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
async fn run_client<R, W>(
    inner: Arc<Inner>,
    link: Link<R, W>,
    kept: Kept,
    events: mpsc::Sender<Vec<ServerEvent>>,
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
            on_message: |message| ServerEvent::Message { client, message },
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
        handle.park(Parked {
            session,
            outbox: outbox_rx,
            registration,
            handler,
            replies,
        });
        let expiry = tokio::time::sleep(grace);
        tokio::pin!(expiry);
        loop {
            tokio::select! {
                _ = handle.on_resume.notified() => {
                    if !handle.is_parked() {
                        // A new connection carries the session now.
                        return;
                    }
                }
                _ = &mut expiry => break,
                _ = handle.close.cancelled() => break,
            }
        }
        let Some(parked) = handle.take_parked() else {
            return;
        };
        end_transfers(&inner, client);
        reason = if handle.close.is_cancelled() {
            handle.close_order().reason
        } else {
            let undelivered = parked.session.retained.unacked() + parked.outbox.len() as u64;
            tracing::info!(%client, undelivered, "session expired");
            DisconnectReason::SessionExpired { undelivered }
        };
        handle.pending.fail_all();
        // Unregisters the client, before the event (see below).
        drop(parked);
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
    inner.counters.departed(&reason, handle.traffic_totals());
    emit(
        &inner,
        &events,
        ServerEvent::Disconnected { client, reason },
    )
    .await;
}

/// One session waiting for its client, counted against [`ServerConfig::max_suspended`]
/// until dropped.
struct Suspension(Arc<std::sync::atomic::AtomicUsize>);

impl Suspension {
    /// Counts one more suspended session, unless the limit is reached: then the session
    /// ends at once (its client is told `session expired` when it comes back), so that
    /// clients that connect and vanish cannot make the server keep sessions without bound.
    fn take(inner: &Inner) -> Option<Suspension> {
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
fn lock_transfers(
    inner: &Inner,
) -> std::sync::MutexGuard<'_, std::collections::HashMap<ClientId, crate::transfer::Transfers>> {
    inner.transfers.lock().unwrap_or_else(|e| e.into_inner())
}

/// Stops a departed client's file transfers.
fn end_transfers(inner: &Inner, client: ClientId) {
    let transfers = lock_transfers(inner).remove(&client);
    if let Some(transfers) = transfers {
        transfers.close();
    }
}

/// Finds the session a hello asks to resume and takes it over: at once if it is parked, or
/// after ending the connection that still carries it (the client noticed the drop before
/// the server did). Fails with a reason that is logged but, so as not to help a guesser,
/// sent to the client only as "session expired or unknown".
async fn resume(
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

/// The welcome for a client.
fn welcome(config: &ServerConfig, client: ClientId, session: SessionGrant) -> Frame {
    Frame::Welcome(Welcome {
        version: wire::VERSION,
        client_id: client.0,
        max_frame: config.max_frame.min(u32::MAX as usize) as u32,
        heartbeat_ms: config
            .heartbeat
            .map_or(0, |h| h.interval.as_millis().min(u32::MAX as u128) as u32),
        session,
    })
}

/// Writes the welcome within the handshake timeout.
async fn send_welcome<W: AsyncWrite + Unpin>(
    config: &ServerConfig,
    writer: &mut FrameWriter<W>,
    welcome: Frame,
) -> Result<()> {
    let sent = async {
        writer.push(wire::encode(&welcome))?;
        writer.flush().await.map_err(Error::from)
    };
    tokio::time::timeout(config.handshake_timeout, sent)
        .await
        .unwrap_or(Err(Error::Timeout(config.handshake_timeout)))
}

/// A connection that passed detection and, for sockframe clients, the handshake.
struct Admitted {
    mode: Mode,
    /// A first tutorial message already read, to be delivered.
    held: Option<Bytes>,
    /// The name from the hello.
    name: String,
    /// A tutorial connection whose first frame already broke the framing: it is reported
    /// (connected, then disconnected with this reason) but not run.
    broken: Option<DisconnectReason>,
    /// Classified as tutorial because it said nothing within the detection timeout.
    silent: bool,
    /// The hello's token (empty without one).
    token: Bytes,
    /// What the hello asked about sessions.
    session: SessionRequest,
}

impl Admitted {
    fn tutorial(held: Option<Bytes>) -> Self {
        Admitted {
            mode: Mode::Tutorial,
            held,
            name: String::new(),
            broken: None,
            silent: false,
            token: Bytes::new(),
            session: SessionRequest::None,
        }
    }
}

/// Decides the connection's protocol and, for sockframe clients, checks the hello.
///
/// Returns what was admitted, or why the connection is refused (a sockframe client is told,
/// in a `REJECT` frame, before the connection closes; refused connections are never
/// reported to the application, as they never joined).
async fn admit<R, W>(
    inner: &Inner,
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
) -> std::result::Result<Admitted, String>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let config = &inner.config;
    let mode = config.effective_protocol();
    let wait = match mode {
        ProtocolMode::Tutorial => return Ok(Admitted::tutorial(None)),
        ProtocolMode::Sockframe => {
            // Before the handshake only a hello may arrive, and it is small.
            reader.set_max_frame(wire::MAX_HELLO);
            config.handshake_timeout
        }
        ProtocolMode::Auto => config.detect_timeout,
    };
    let first = tokio::select! {
        _ = inner.shutdown.cancelled() => return Err("shutting down".into()),
        first = tokio::time::timeout(wait, reader.read_frame()) => first,
    };
    let first = match first {
        Err(_) if mode == ProtocolMode::Auto => {
            // A silent peer in auto mode: a tutorial client that waits to be spoken to.
            return Ok(Admitted {
                silent: true,
                ..Admitted::tutorial(None)
            });
        }
        Err(_) => return Err("no hello within the handshake timeout".into()),
        Ok(Ok(Some(frame))) => frame,
        Ok(Ok(None)) => return Err("closed before the handshake".into()),
        Ok(Err(e @ Error::Frame(_))) if mode == ProtocolMode::Auto => {
            // No hello can be that broken: a tutorial client breaking the framing, which the
            // application hears of like any other tutorial client's protocol error.
            return Ok(Admitted {
                broken: Some(DisconnectReason::from_error(&e)),
                ..Admitted::tutorial(None)
            });
        }
        Ok(Err(e)) => return Err(format!("before the handshake: {e}")),
    };
    if mode == ProtocolMode::Auto && !wire::is_hello(&first) {
        return Ok(Admitted::tutorial(Some(first)));
    }
    let hello = match wire::parse_hello(&first) {
        Ok(hello) => hello,
        Err(e) => {
            reject(writer, RejectCode::BadHello, &e.to_string()).await;
            return Err(format!("bad hello: {e}"));
        }
    };
    if wire::negotiate(&hello).is_none() {
        let text = format!(
            "this server speaks version {}; the client offers {}..={}",
            wire::VERSION,
            hello.min_version,
            hello.max_version
        );
        reject(writer, RejectCode::UnsupportedVersion, &text).await;
        return Err(text);
    }
    if !authorized(&config.tokens, &hello) {
        tracing::warn!(name = %hello.name, "client rejected: unauthorized");
        inner.counters.refused(stats::Refusal::Token);
        reject(writer, RejectCode::Unauthorized, "unauthorized").await;
        return Err("unauthorized".into());
    }
    Ok(Admitted {
        mode: Mode::Sockframe,
        held: None,
        name: hello.name,
        broken: None,
        silent: false,
        token: hello.token,
        session: hello.session,
    })
}

/// Whether the hello carries one of `tokens` (always, when none is required).
fn authorized(tokens: &[Bytes], hello: &Hello) -> bool {
    use subtle::ConstantTimeEq;
    if tokens.is_empty() {
        return true;
    }
    // Compare against every token without stopping early, so that timing tells nothing
    // about which token came close.
    let mut ok = subtle::Choice::from(0);
    for token in tokens {
        ok |= token.as_ref().ct_eq(hello.token.as_ref());
    }
    ok.into()
}

/// Sends a `REJECT` frame and closes, giving up quickly on a peer that does not read.
async fn reject<W: AsyncWrite + Unpin>(writer: &mut FrameWriter<W>, code: RejectCode, text: &str) {
    let frame = Frame::Reject {
        code,
        text: text.to_string(),
    };
    if writer.push(wire::encode(&frame)).is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(1), writer.shutdown()).await;
    }
}

/// Sends a connection event, waiting while the application catches up, but once a shutdown
/// has begun for at most the drain deadline: an application that stopped reading events must
/// not hold up shutdown forever.
async fn emit(inner: &Inner, events: &mpsc::Sender<Vec<ServerEvent>>, event: ServerEvent) {
    let give_up = async {
        inner.shutdown.cancelled().await;
        tokio::time::sleep(inner.config.drain_deadline).await;
    };
    tokio::select! {
        _ = events.send(vec![event]) => {}
        _ = give_up => tracing::debug!("event stream full during shutdown; event dropped"),
    }
}

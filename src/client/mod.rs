//! The client: connects with backoff, optionally reconnects, sends and receives messages.
//!
//! A [`Client`] owns one background task that holds the connection. Sends go through a
//! bounded queue ([`OutboxLimits`]); received messages and connection changes arrive as
//! [`ClientEvent`]s from [`Client::recv`]. While disconnected, sends wait in the queue for
//! the reconnect or fail at once, per [`OfflinePolicy`].

mod backoff;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use backoff::Backoff;

use crate::connection::{
    CloseOrder, Drive, FrameReader, FrameWriter, HEAD_ROOM, Heartbeat, Mode, Traffic, drive,
};
use crate::message::Message;
use crate::outbox::{OutboxLimits, OutboxReceiver, OutboxSender, outbox};
use crate::outgoing::{FlushWaiter, Outgoing};
use crate::protocol::DEFAULT_MAX_FRAME;
use crate::protocol::message::{
    self as wire, Frame, Hello, RejectCode, SessionGrant, SessionRequest, SessionToken,
};
use crate::reason::DisconnectReason;
use crate::request::{Pending, Request};
use crate::session::Session;
use crate::{Error, Result};

/// What a send does while the client is disconnected (between a drop and the reconnect).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OfflinePolicy {
    /// Queue it (within the outbox bounds; beyond them the send waits) and send it once
    /// reconnected.
    Queue,
    /// Fail at once with [`Error::NotConnected`].
    Fail,
}

/// Configuration of a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Server address as `host:port`; the name is resolved again on every attempt.
    pub addr: String,
    /// Largest payload sent or accepted. Default 16 MiB.
    pub max_frame: usize,
    /// Spacing and limits of the attempts to make the first connection
    /// ([`Client::connect`]). Default: 100 ms doubling to 5 s, with jitter, for up to 10 s.
    pub backoff: Backoff,
    /// Spacing and limits of the attempts to reconnect after a drop (with
    /// [`reconnect`](Self::reconnect) on); the limits count from the drop. Default: 100 ms
    /// doubling to 5 s, with jitter, with no limit: a client told to reconnect keeps trying
    /// until it is closed.
    pub reconnect_backoff: Backoff,
    /// Longest a single connection attempt may take. Default 5 s.
    pub connect_timeout: Duration,
    /// Reconnect automatically after the connection drops. Default off.
    pub reconnect: bool,
    /// Ask for a lossless session (sockframe protocol, with [`reconnect`](Self::reconnect)
    /// on): after a drop, the reconnect resumes the session under the same client id and
    /// nothing sent either way is lost, duplicated or reordered. Default on. (A client that
    /// does not reconnect could never resume, so it asks for none.)
    pub session: bool,
    /// Bounds on the frames kept until the server acknowledges them; when full, sends wait.
    /// Default 4,096 frames, 16 MiB.
    pub session_window: crate::SessionLimits,
    /// Bounds of the outgoing queue. Default 1,024 messages and 8 MiB.
    pub outbox: OutboxLimits,
    /// What sends do while disconnected. Default [`OfflinePolicy::Queue`].
    pub offline: OfflinePolicy,
    /// Capacity of the event stream, in batches of at most 256 events (what one read
    /// produced). Default 1,024; when full, reading pauses.
    pub event_capacity: usize,
    /// How long [`Client::close`] may spend delivering queued messages and waiting for the
    /// server to close its side. Default 5 s.
    pub drain_deadline: Duration,
    /// The protocol to speak. Default [`Mode::Sockframe`]; [`Mode::Tutorial`] talks to the
    /// tutorial's own server (no handshake, requests, heartbeats or authentication).
    pub protocol: Mode,
    /// Name sent in the hello, shown in the server's client list. Default empty.
    pub name: String,
    /// Token sent in the hello, for servers that require one. Default none.
    pub token: Option<Bytes>,
    /// Time for the server's welcome to arrive after connecting. Default 5 s.
    pub handshake_timeout: Duration,
    /// Pings (sockframe protocol only). Default every 5 s; dead after 3 to 4 silent
    /// intervals (checked once per interval).
    pub heartbeat: Option<Heartbeat>,
    /// Disconnect when the server sends no message for this long. Default off.
    pub idle_timeout: Option<Duration>,
    /// How long [`Client::request`] waits for an answer. Default 10 s.
    pub request_timeout: Duration,
    /// A frame from the server that has started must be complete within this long.
    /// Default 30 s.
    pub frame_timeout: Option<Duration>,
    /// TLS. Default none (plain TCP). The TLS handshake counts against
    /// `handshake_timeout`.
    #[cfg(feature = "tls")]
    pub tls: Option<crate::tls::ClientTls>,
    /// File transfer. Default: no save directory, so files the server pushes are refused;
    /// sending files works regardless.
    pub transfer: crate::transfer::TransferConfig,
}

impl ClientConfig {
    /// The default configuration for a server at `addr` (`host:port`).
    pub fn new(addr: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            max_frame: DEFAULT_MAX_FRAME,
            backoff: Backoff::default(),
            reconnect_backoff: Backoff {
                deadline: None,
                ..Backoff::default()
            },
            connect_timeout: Duration::from_secs(5),
            reconnect: false,
            session: true,
            session_window: crate::SessionLimits::default(),
            outbox: OutboxLimits::default(),
            offline: OfflinePolicy::Queue,
            event_capacity: 1024,
            drain_deadline: Duration::from_secs(5),
            protocol: Mode::Sockframe,
            name: String::new(),
            token: None,
            handshake_timeout: Duration::from_secs(5),
            heartbeat: Some(Heartbeat::default()),
            idle_timeout: None,
            request_timeout: Duration::from_secs(10),
            frame_timeout: Some(Duration::from_secs(30)),
            #[cfg(feature = "tls")]
            tls: None,
            transfer: crate::transfer::TransferConfig::default(),
        }
    }
}

/// Something that happened on a client.
#[derive(Debug, PartialEq)]
#[non_exhaustive]
pub enum ClientEvent {
    /// Connected (first connection, and each reconnect).
    Connected {
        /// The server's address.
        addr: SocketAddr,
    },
    /// A message from the server.
    Message(Message),
    /// A request from the server; answer it through the [`Request`].
    Request(Request),
    /// The connection ended.
    Disconnected {
        /// Why.
        reason: DisconnectReason,
    },
    /// Reconnected and resumed the lossless session: nothing was lost either way, and the
    /// server knows this client under the same id.
    Resumed {
        /// The server's address.
        addr: SocketAddr,
    },
    /// The server no longer had this client's session (it expired, or the server
    /// restarted): up to `undelivered` frames sent before may not have reached it. The
    /// client goes on with a new session (and id); `Connected` follows.
    SessionExpired {
        /// Frames sent in the old session that the server never acknowledged.
        undelivered: u64,
    },
    /// A reconnect attempt is about to be made after `delay`.
    Reconnecting {
        /// Attempt number, from 1, since the connection dropped.
        attempt: u32,
        /// How long the client waits before the attempt.
        delay: Duration,
    },
    /// The server offers a file (only with [`TransferConfig::save_dir`](crate::transfer::TransferConfig::save_dir)
    /// set): accept or reject it through the [`FileOffer`](crate::transfer::FileOffer).
    FileOffer(crate::transfer::FileOffer),
    /// A file from the server was received, verified and put in place.
    FileReceived(crate::transfer::ReceivedFile),
    /// An accepted file from the server was not received.
    FileFailed(crate::transfer::FileFailure),
}

impl From<crate::transfer::TransferEvent> for ClientEvent {
    fn from(event: crate::transfer::TransferEvent) -> Self {
        use crate::transfer::TransferEvent;
        match event {
            TransferEvent::Offer(offer) => ClientEvent::FileOffer(offer),
            TransferEvent::Received(file) => ClientEvent::FileReceived(file),
            TransferEvent::Failed(failure) => ClientEvent::FileFailed(failure),
        }
    }
}

const CONNECTED: u8 = 0;
const DISCONNECTED: u8 = 1;
const CLOSED: u8 = 2;

/// State shared between the handles and the background task.
#[derive(Debug)]
struct Shared {
    config: ClientConfig,
    state: AtomicU8,
    /// How to close once `close` fires; unset means a graceful [`Client::close`].
    order: Mutex<Option<CloseOrder>>,
    close: CancellationToken,
    /// When a graceful [`Client::close`] must be over: set by `close`, and the bound of
    /// resuming a session to finish a close that the link cut short.
    close_deadline: std::sync::OnceLock<Instant>,
    /// Requests to the server waiting for answers.
    pending: Pending,
    /// The id the server gave in its last welcome (0: none).
    server_id: std::sync::atomic::AtomicU64,
    /// Largest body the current server accepts: the smaller of its welcome's and ours.
    send_limit: std::sync::atomic::AtomicUsize,
}

/// A connected client. Dropping it closes the connection at once, discarding what is queued;
/// call [`close`](Self::close) to deliver it first.
#[derive(Debug)]
pub struct Client {
    sender: ClientSender,
    /// Events arrive in batches (all that one read produced, up to 256).
    events: mpsc::Receiver<Vec<ClientEvent>>,
    /// The rest of the batch received last.
    ready: std::collections::VecDeque<ClientEvent>,
    driver: Option<JoinHandle<Result<()>>>,
}

/// A cloneable handle that sends through a [`Client`]; use it from other tasks while one
/// task receives.
#[derive(Debug, Clone)]
pub struct ClientSender {
    outbox: OutboxSender,
    shared: Arc<Shared>,
    /// The file transfer engine; lives across reconnects.
    transfers: crate::transfer::Transfers,
}

impl Client {
    /// Connects, retrying per `config.backoff` (the first attempt is immediate), and starts
    /// the background task. Fails with [`Error::Connect`] once the backoff gives up.
    pub async fn connect(config: ClientConfig) -> Result<Client> {
        let close = CancellationToken::new();
        if let Some(token) = &config.token {
            Hello::new("", token.clone())
                .check()
                .map_err(|e| Error::Handshake {
                    addr: config.addr.clone(),
                    detail: e.to_string(),
                })?;
        }
        let link = connect_with_backoff(&config, &config.backoff, None, &close, None).await?;
        let (outbox_tx, outbox_rx) = outbox(config.outbox);
        let (events_tx, events) = mpsc::channel(config.event_capacity.max(1));
        let transfers = {
            // Weak: the event stream must end when the connection task does, even while
            // transfer tasks are still winding down; their late events are dropped.
            let events = events_tx.downgrade();
            let emit: crate::transfer::Emit = Arc::new(move |event| {
                let events = events.upgrade();
                Box::pin(async move {
                    if let Some(events) = events {
                        let _ = events.send(vec![ClientEvent::from(event)]).await;
                    }
                })
            });
            crate::transfer::Transfers::new(
                config.transfer.clone(),
                outbox_tx.clone(),
                emit,
                Arc::default(),
                link.send_limit,
            )
        };
        let shared = Arc::new(Shared {
            config,
            state: AtomicU8::new(CONNECTED),
            order: Mutex::new(None),
            close,
            close_deadline: std::sync::OnceLock::new(),
            pending: Pending::default(),
            server_id: Default::default(),
            send_limit: link.send_limit.into(),
        });
        let driver = tokio::spawn(run(
            shared.clone(),
            link,
            outbox_rx,
            outbox_tx.clone(),
            events_tx,
            transfers.clone(),
        ));
        Ok(Client {
            sender: ClientSender {
                outbox: outbox_tx,
                shared,
                transfers,
            },
            events,
            ready: Default::default(),
            driver: Some(driver),
        })
    }

    /// Queues `msg` for the server; see [`ClientSender::send`].
    pub async fn send(&self, msg: impl Into<Message>) -> Result<()> {
        self.sender.send(msg).await
    }

    /// Sends a file to the server; see [`ClientSender::send_file`].
    pub async fn send_file(
        &self,
        path: impl AsRef<std::path::Path>,
    ) -> Result<crate::transfer::TransferHandle> {
        self.sender.send_file(path).await
    }

    /// Sends a request and waits for the answer; see [`ClientSender::request`].
    pub async fn request(&self, msg: impl Into<Message>) -> Result<Message> {
        self.sender.request(msg).await
    }

    /// Waits until everything sent so far is confirmed; see [`ClientSender::flush`].
    pub async fn flush(&self) -> Result<()> {
        self.sender.flush().await
    }

    /// Like [`request`](Self::request) with its own timeout.
    pub async fn request_with_timeout(
        &self,
        msg: impl Into<Message>,
        timeout: Duration,
    ) -> Result<Message> {
        self.sender.request_with_timeout(msg, timeout).await
    }

    /// The id the server assigned in its welcome (sockframe protocol), if connected so far.
    pub fn server_assigned_id(&self) -> Option<u64> {
        match self.sender.shared.server_id.load(Ordering::Acquire) {
            0 => None,
            id => Some(id),
        }
    }

    /// A cloneable sending handle.
    pub fn sender(&self) -> ClientSender {
        self.sender.clone()
    }

    /// The next event; `None` once the client has closed for good (closed by the
    /// application, or disconnected without reconnect, or reconnecting gave up).
    pub async fn recv(&mut self) -> Option<ClientEvent> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Some(event);
            }
            self.ready.extend(self.events.recv().await?);
        }
    }

    /// Whether a connection is up right now.
    pub fn is_connected(&self) -> bool {
        self.sender.shared.state.load(Ordering::Acquire) == CONNECTED
    }

    /// Closes gracefully: new sends fail, what is queued is written, the write side is shut
    /// down and the server's close is awaited, all within [`ClientConfig::drain_deadline`].
    ///
    /// With a lossless session, `Ok` means the server acknowledged every message: its
    /// application has them. If the link drops during the close (or the close comes while
    /// the client is reconnecting), the session is resumed to finish it, within the same
    /// deadline; what the server has not acknowledged by then is reported as
    /// [`Error::Undelivered`] (it may have arrived: the acknowledgement may be what was
    /// lost). Without a session, `Ok` means every queued message was written to the socket,
    /// and the error counts those that were not.
    pub async fn close(mut self) -> Result<()> {
        let shared = &self.sender.shared;
        let _ = shared
            .close_deadline
            .set(Instant::now() + shared.config.drain_deadline);
        shared.state.store(CLOSED, Ordering::Release);
        shared.close.cancel();
        let driver = self
            .driver
            .take()
            .expect("driver present until close or drop");
        // Let the task finish; events produced meanwhile are discarded with the receiver.
        self.events.close();
        match driver.await {
            Ok(result) => result,
            Err(e) => Err(Error::Io(std::io::Error::other(e))),
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if self.driver.is_some() {
            let shared = &self.sender.shared;
            shared.state.store(CLOSED, Ordering::Release);
            *lock(&shared.order) = Some(CloseOrder {
                reason: DisconnectReason::Closed,
                graceful: false,
            });
            shared.close.cancel();
        }
    }
}

impl ClientSender {
    /// Queues `msg`; returns once it is queued, not once written. Waits while the queue is
    /// full. Fails with [`Error::Closed`] after close, with [`Error::NotConnected`] while
    /// disconnected under [`OfflinePolicy::Fail`], and with a protocol error for a payload
    /// over the maximum frame size.
    pub async fn send(&self, msg: impl Into<Message>) -> Result<()> {
        let msg = self.checked(msg.into())?;
        self.outbox
            .send(Outgoing::Message(msg))
            .await
            .map_err(|_| Error::Closed)
    }

    /// Waits until every message sent before this call is confirmed: acknowledged by the
    /// server when the client has a lossless session (the server's application has it in
    /// its event stream), written to the socket otherwise. Fails with
    /// [`Error::Disconnected`] if that can no longer happen (the session expired, or the
    /// connection dropped without a session), and with [`Error::Closed`] after close.
    pub async fn flush(&self) -> Result<()> {
        if self.shared.state.load(Ordering::Acquire) == CLOSED {
            return Err(Error::Closed);
        }
        let (waiter, done) = FlushWaiter::new();
        self.outbox
            .send(Outgoing::Flush(waiter))
            .await
            .map_err(|_| Error::Closed)?;
        done.await.map_err(|_| Error::Disconnected)
    }

    /// Sends a request and waits up to [`ClientConfig::request_timeout`] for the answer.
    /// Fails with [`Error::Remote`] for an error answer, [`Error::Timeout`],
    /// [`Error::Disconnected`] if the connection drops first, and [`Error::NotSupported`]
    /// over the tutorial framing. Dropping the future cancels the request.
    pub async fn request(&self, msg: impl Into<Message>) -> Result<Message> {
        let timeout = self.shared.config.request_timeout;
        self.request_with_timeout(msg, timeout).await
    }

    /// Like [`request`](Self::request) with its own timeout.
    pub async fn request_with_timeout(
        &self,
        msg: impl Into<Message>,
        timeout: Duration,
    ) -> Result<Message> {
        if self.shared.config.protocol == Mode::Tutorial {
            return Err(Error::NotSupported);
        }
        let msg = self.checked(msg.into())?;
        crate::request::request(&self.shared.pending, &self.outbox, msg, timeout).await
    }

    /// Sends the file at `path` to the server: hashes it (BLAKE3), offers it, and streams it
    /// once accepted, interleaved with other messages. Returns once offered; the handle's
    /// [`finish`](crate::transfer::TransferHandle::finish) resolves when the server has
    /// verified it. With [`ClientConfig::reconnect`] on, a transfer interrupted by a dropped
    /// connection is offered again after the reconnect and goes on from what the server
    /// already has. Fails with [`Error::NotSupported`] over the tutorial framing.
    pub async fn send_file(
        &self,
        path: impl AsRef<std::path::Path>,
    ) -> Result<crate::transfer::TransferHandle> {
        if self.shared.config.protocol == Mode::Tutorial {
            return Err(Error::NotSupported);
        }
        match self.shared.state.load(Ordering::Acquire) {
            CLOSED => return Err(Error::Closed),
            DISCONNECTED if self.shared.config.offline == OfflinePolicy::Fail => {
                return Err(Error::NotConnected);
            }
            _ => {}
        }
        self.transfers.send_file(path.as_ref()).await
    }

    fn checked(&self, msg: Message) -> Result<Message> {
        let shared = &self.shared;
        // The limit of the server we talk to now. (A message queued for a later connection
        // to a server with a smaller limit is dropped with a warning when its turn comes.)
        crate::protocol::encode_header(msg.len(), shared.send_limit.load(Ordering::Acquire))?;
        match shared.state.load(Ordering::Acquire) {
            CLOSED => Err(Error::Closed),
            DISCONNECTED if shared.config.offline == OfflinePolicy::Fail => {
                Err(Error::NotConnected)
            }
            _ => Ok(msg),
        }
    }
}

/// The reading half of a plain or TLS stream.
type ReadStream = Box<dyn AsyncRead + Send + Unpin>;
/// The writing half of a plain or TLS stream.
type WriteStream = Box<dyn AsyncWrite + Send + Unpin>;

/// An established connection: the two halves, after the handshake.
struct Link {
    reader: FrameReader<ReadStream>,
    writer: FrameWriter<WriteStream>,
    addr: Option<SocketAddr>,
    /// The server's id for us (sockframe protocol).
    server_id: Option<u64>,
    /// Largest body the server accepts (ours, unless its welcome says less).
    send_limit: usize,
    /// The session the welcome granted.
    grant: SessionGrant,
}

/// The background task: runs connections until closed or until reconnecting is over.
async fn run(
    shared: Arc<Shared>,
    mut link: Link,
    mut outbox: OutboxReceiver,
    reply: OutboxSender,
    events: mpsc::Sender<Vec<ClientEvent>>,
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
                            .send(vec![ClientEvent::SessionExpired { undelivered }])
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
            let _ = events.send(vec![event]).await;
        }
        // Unused (a client has no message handler), but `drive` takes one.
        let replies = crate::connection::Replies::new(config.outbox);
        let outcome = drive(
            link.reader,
            link.writer,
            None,
            Drive {
                mode: config.protocol,
                max_body: config.max_frame,
                refuse_late_hello: false,
                outbox: &mut outbox,
                reply: &reply,
                pending: &shared.pending,
                events: &events,
                on_message: ClientEvent::Message,
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
            .send(vec![ClientEvent::Disconnected {
                reason: outcome.reason.clone(),
            }])
            .await;
        if closing_session {
            match finish_close(&shared, &events, session.as_ref(), &outbox).await {
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
                match finish_close(&shared, &events, session.as_ref(), &outbox).await {
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
                    .send(vec![ClientEvent::SessionExpired { undelivered }])
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
async fn reconnect(
    shared: &Shared,
    events: &mpsc::Sender<Vec<ClientEvent>>,
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
/// `Err(result)` when the close is over, because the server acknowledged every frame or
/// because the session could not be resumed before the close's deadline; `Ok(link)`, a
/// resumed link, to resend what the server lacks on and close again.
///
/// Without this, a close cut short after writing everything (into a link that then dropped
/// it) would report success with frames lost, or report a loss when the server had
/// acknowledged all.
async fn finish_close(
    shared: &Shared,
    events: &mpsc::Sender<Vec<ClientEvent>>,
    session: Option<&Session>,
    outbox: &OutboxReceiver,
) -> std::result::Result<Link, Result<()>> {
    let Some(session) = session else {
        return Err(undelivered_in(outbox));
    };
    let undelivered = session.retained.unacked() as usize + outbox.len();
    if undelivered == 0 {
        return Err(Ok(()));
    }
    let Some(&deadline) = shared.close_deadline.get() else {
        return Err(Err(Error::Undelivered(undelivered)));
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
            Err(Err(Error::Undelivered(undelivered)))
        }
        Err(_) => Err(Err(Error::Undelivered(undelivered))),
    }
}

fn undelivered_in(outbox: &OutboxReceiver) -> Result<()> {
    match outbox.len() {
        0 => Ok(()),
        n => Err(Error::Undelivered(n)),
    }
}

/// Connects, retrying per the backoff. With `events`, this is a reconnect: each attempt is
/// announced and preceded by its delay; without, the first attempt is immediate.
async fn connect_with_backoff(
    config: &ClientConfig,
    backoff: &Backoff,
    events: Option<&mpsc::Sender<Vec<ClientEvent>>>,
    close: &CancellationToken,
    resume: Option<(SessionToken, u64)>,
) -> Result<Link> {
    let start = Instant::now();
    let deadline = backoff.deadline.map(|d| start + d);
    let mut attempt: u32 = 0;
    loop {
        attempt += 1;
        if let Some(events) = events {
            let mut delay = backoff.delay(attempt);
            if let Some(deadline) = deadline {
                delay = delay.min(deadline.saturating_duration_since(Instant::now()));
            }
            tracing::debug!(attempt, ?delay, "reconnecting");
            tokio::select! {
                _ = close.cancelled() => return Err(Error::Closed),
                _ = events.send(vec![ClientEvent::Reconnecting { attempt, delay }]) => {}
            }
            tokio::select! {
                _ = close.cancelled() => return Err(Error::Closed),
                _ = tokio::time::sleep(delay) => {}
            }
        }
        let mut limit = config.connect_timeout;
        if let Some(deadline) = deadline {
            limit = limit.min(deadline.saturating_duration_since(Instant::now()));
        }
        let error = tokio::select! {
            _ = close.cancelled() => return Err(Error::Closed),
            res = tokio::time::timeout(limit, TcpStream::connect(&config.addr)) => match res {
                Ok(Ok(stream)) => match handshake(config, stream, resume).await {
                    Ok(link) => return Ok(link),
                    // The same hello would be refused again: do not retry.
                    Err(e @ (Error::Rejected { .. } | Error::Certificate { .. })) => return Err(e),
                    Err(e) => {
                        tracing::debug!(attempt, error = %e, "handshake failed");
                        std::io::Error::other(e.to_string())
                    }
                },
                Ok(Err(e)) => e,
                Err(_) => std::io::ErrorKind::TimedOut.into(),
            },
        };
        tracing::debug!(attempt, error = %error, addr = %config.addr, "connect failed");
        let out_of_time = deadline.is_some_and(|d| Instant::now() >= d);
        if backoff.exhausted(attempt) || out_of_time {
            return Err(Error::Connect {
                addr: config.addr.clone(),
                attempts: attempt,
                source: error,
            });
        }
        if events.is_none() {
            let mut delay = backoff.delay(attempt);
            if let Some(deadline) = deadline {
                delay = delay.min(deadline.saturating_duration_since(Instant::now()));
            }
            tokio::select! {
                _ = close.cancelled() => return Err(Error::Closed),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }
}

/// Runs the TLS handshake when configured, and splits the stream.
async fn secure(config: &ClientConfig, stream: TcpStream) -> Result<(ReadStream, WriteStream)> {
    #[cfg(feature = "tls")]
    if let Some(tls) = &config.tls {
        let name = tls.server_name(&config.addr)?;
        let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
        let stream = tokio::time::timeout(
            config.handshake_timeout,
            connector.connect(name, crate::tls::ReadAhead::new(stream)),
        )
        .await
        .map_err(|_| Error::Handshake {
            addr: config.addr.clone(),
            detail: format!("no TLS handshake within {:?}", config.handshake_timeout),
        })?
        .map_err(|e| {
            let detail = crate::reason::plain_io_message(&e);
            // rustls reports certificate and protocol failures as invalid data; those
            // would fail the same way again. Other errors (reset, closed) may not.
            if e.kind() == std::io::ErrorKind::InvalidData {
                Error::Certificate {
                    addr: config.addr.clone(),
                    detail,
                }
            } else {
                Error::Handshake {
                    addr: config.addr.clone(),
                    detail: format!("TLS: {detail}"),
                }
            }
        })?;
        // Writes of whole records: see `RecordWrites` for why.
        let (r, w) = tokio::io::split(crate::tls::RecordWrites(stream));
        return Ok((Box::new(r), Box::new(w)));
    }
    let _ = config;
    let (r, w) = stream.into_split();
    Ok((Box::new(r), Box::new(w)))
}

/// Opens the protocol on a new TCP connection: for the sockframe protocol, sends the hello
/// and waits for the welcome.
async fn handshake(
    config: &ClientConfig,
    stream: TcpStream,
    resume: Option<(SessionToken, u64)>,
) -> Result<Link> {
    // Our writes are batched already; Nagle's algorithm would only add latency.
    let _ = stream.set_nodelay(true);
    let addr = stream.peer_addr().ok();
    let (r, w) = secure(config, stream).await?;
    let mut reader = FrameReader::new(r, config.max_frame);
    let mut writer = FrameWriter::new(w, config.max_frame);
    if config.protocol == Mode::Tutorial {
        return Ok(Link {
            reader,
            writer,
            addr,
            server_id: None,
            send_limit: config.max_frame,
            grant: SessionGrant::None,
        });
    }
    let failed = |detail: String| Error::Handshake {
        addr: config.addr.clone(),
        detail,
    };
    let hello = Hello {
        session: match resume {
            Some((token, received)) => SessionRequest::Resume { token, received },
            None if config.session && config.reconnect => SessionRequest::New,
            None => SessionRequest::None,
        },
        ..Hello::new(
            config.name.clone(),
            config.token.clone().unwrap_or_default(),
        )
    };
    let exchange = async {
        writer.push(wire::encode_hello(&hello))?;
        writer.flush().await?;
        // The answer is small; do not let a confused peer announce a large frame.
        reader.set_max_frame(wire::MAX_HELLO);
        let answer = reader.read_frame().await.map_err(|e| match e {
            Error::Frame(f) => failed(format!(
                "{f}: the server does not answer in the sockframe protocol \
                 (a TLS server? then connect with TLS)"
            )),
            other => other,
        })?;
        let Some(answer) = answer else {
            return Err(failed(
                "the server closed the connection during the handshake".into(),
            ));
        };
        match wire::parse(&answer) {
            Ok(Frame::Welcome(welcome)) => Ok(welcome),
            Ok(Frame::Reject { code, text }) => Err(Error::Rejected { code, text }),
            Ok(other) => Err(failed(format!("expected a welcome, got {other:?}"))),
            Err(e) => Err(failed(format!(
                "the server does not speak the sockframe protocol ({e}); \
                 is it a tutorial server? use the tutorial protocol"
            ))),
        }
    };
    let welcome = tokio::time::timeout(config.handshake_timeout, exchange)
        .await
        .map_err(|_| {
            failed(format!(
                "no welcome within {:?} (does the server speak the sockframe protocol?)",
                config.handshake_timeout
            ))
        })??;
    let send_limit = (welcome.max_frame as usize).min(config.max_frame);
    reader.set_max_frame(config.max_frame + HEAD_ROOM);
    writer.set_max_frame(send_limit + HEAD_ROOM);
    Ok(Link {
        reader,
        writer,
        addr,
        server_id: Some(welcome.client_id),
        send_limit,
        grant: welcome.session,
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

//! The client: connects with backoff, optionally reconnects, sends and receives messages.
//!
//! A [`Client`] owns one background task that holds the connection. Sends go through a
//! bounded queue ([`OutboxLimits`](crate::OutboxLimits)); received messages and connection changes arrive as
//! [`ClientEvent`]s from [`Client::recv`]. While disconnected, sends wait in the queue for
//! the reconnect or fail at once, per [`OfflinePolicy`].
//!
//! # How the pieces meet
//!
//! - `mod.rs`: the handles, [`Client`] and [`ClientSender`], and the state they share with
//!   the task; [`ClientEvent`].
//! - `config`: [`ClientConfig`] and [`OfflinePolicy`].
//! - `connect`: TCP with retries ([`Backoff`]), TLS, and the handshake; yields a `Link`.
//! - `task`: the background task that drives a `Link` through the connection layer,
//!   reconnects and resumes the session after a failure, and closes.

mod backoff;
mod config;
mod connect;
mod task;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use backoff::Backoff;

use crate::connection::{Batch, CloseOrder, Mode, Ready};
use crate::message::Message;
use crate::outbox::{OutboxSender, outbox};
use crate::outgoing::{FlushWaiter, Outgoing};
use crate::protocol::message::Hello;
use crate::reason::DisconnectReason;
use crate::request::{Pending, Request};
use crate::{Error, Result};

pub use config::{ClientConfig, OfflinePolicy};
use connect::connect_with_backoff;
use task::run;

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
    FileOffer(Box<crate::transfer::FileOffer>),
    /// A file from the server was received, verified and put in place.
    FileReceived(Box<crate::transfer::ReceivedFile>),
    /// An accepted file from the server was not received.
    FileFailed(Box<crate::transfer::FileFailure>),
}

impl crate::connection::MessageEvent for ClientEvent {
    #[inline]
    fn message_event(_: u64, message: Message) -> Self {
        ClientEvent::Message(message)
    }
}

impl From<crate::transfer::TransferEvent> for ClientEvent {
    fn from(event: crate::transfer::TransferEvent) -> Self {
        use crate::transfer::TransferEvent;
        match event {
            TransferEvent::Offer(offer) => ClientEvent::FileOffer(Box::new(offer)),
            TransferEvent::Received(file) => ClientEvent::FileReceived(Box::new(file)),
            TransferEvent::Failed(failure) => ClientEvent::FileFailed(Box::new(failure)),
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
    events: mpsc::Receiver<Batch<ClientEvent>>,
    /// The rest of the batch received last.
    ready: Ready<ClientEvent>,
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
                        let _ = events.send(Batch::from(ClientEvent::from(event))).await;
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
            if let Some(event) = self.ready.next() {
                return Some(event);
            }
            self.ready = self.events.recv().await?.into_ready();
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

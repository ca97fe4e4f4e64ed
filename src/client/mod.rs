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
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use backoff::Backoff;

use crate::connection::{CloseOrder, Drive, Traffic, drive};
use crate::outbox::{OutboxLimits, OutboxReceiver, OutboxSender, outbox};
use crate::protocol::DEFAULT_MAX_FRAME;
use crate::reason::DisconnectReason;
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
    /// Bounds of the outgoing queue. Default 1,024 messages and 8 MiB.
    pub outbox: OutboxLimits,
    /// What sends do while disconnected. Default [`OfflinePolicy::Queue`].
    pub offline: OfflinePolicy,
    /// Capacity of the event stream. Default 1,024; when full, reading pauses.
    pub event_capacity: usize,
    /// How long [`Client::close`] may spend delivering queued messages and waiting for the
    /// server to close its side. Default 5 s.
    pub drain_deadline: Duration,
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
            outbox: OutboxLimits::default(),
            offline: OfflinePolicy::Queue,
            event_capacity: 1024,
            drain_deadline: Duration::from_secs(5),
        }
    }
}

/// Something that happened on a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// Connected (first connection, and each reconnect).
    Connected {
        /// The server's address.
        addr: SocketAddr,
    },
    /// A message from the server.
    Message(Bytes),
    /// The connection ended.
    Disconnected {
        /// Why.
        reason: DisconnectReason,
    },
    /// A reconnect attempt is about to be made after `delay`.
    Reconnecting {
        /// Attempt number, from 1, since the connection dropped.
        attempt: u32,
        /// How long the client waits before the attempt.
        delay: Duration,
    },
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
}

/// A connected client. Dropping it closes the connection at once, discarding what is queued;
/// call [`close`](Self::close) to deliver it first.
#[derive(Debug)]
pub struct Client {
    sender: ClientSender,
    events: mpsc::Receiver<ClientEvent>,
    driver: Option<JoinHandle<Result<()>>>,
}

/// A cloneable handle that sends through a [`Client`]; use it from other tasks while one
/// task receives.
#[derive(Debug, Clone)]
pub struct ClientSender {
    outbox: OutboxSender,
    shared: Arc<Shared>,
}

impl Client {
    /// Connects, retrying per `config.backoff` (the first attempt is immediate), and starts
    /// the background task. Fails with [`Error::Connect`] once the backoff gives up.
    pub async fn connect(config: ClientConfig) -> Result<Client> {
        let close = CancellationToken::new();
        let stream = connect_with_backoff(&config, &config.backoff, None, &close).await?;
        let (outbox_tx, outbox_rx) = outbox(config.outbox);
        let (events_tx, events) = mpsc::channel(config.event_capacity.max(1));
        let shared = Arc::new(Shared {
            config,
            state: AtomicU8::new(CONNECTED),
            order: Mutex::new(None),
            close,
        });
        let driver = tokio::spawn(run(shared.clone(), stream, outbox_rx, events_tx));
        Ok(Client {
            sender: ClientSender {
                outbox: outbox_tx,
                shared,
            },
            events,
            driver: Some(driver),
        })
    }

    /// Queues `msg` for the server; see [`ClientSender::send`].
    pub async fn send(&self, msg: impl Into<Bytes>) -> Result<()> {
        self.sender.send(msg).await
    }

    /// A cloneable sending handle.
    pub fn sender(&self) -> ClientSender {
        self.sender.clone()
    }

    /// The next event; `None` once the client has closed for good (closed by the
    /// application, or disconnected without reconnect, or reconnecting gave up).
    pub async fn recv(&mut self) -> Option<ClientEvent> {
        self.events.recv().await
    }

    /// Whether a connection is up right now.
    pub fn is_connected(&self) -> bool {
        self.sender.shared.state.load(Ordering::Acquire) == CONNECTED
    }

    /// Closes gracefully: new sends fail, what is queued is written, the write side is shut
    /// down and the server's close is awaited (all within
    /// [`ClientConfig::drain_deadline`]). Returns an error if queued messages could not be
    /// written.
    pub async fn close(mut self) -> Result<()> {
        let shared = &self.sender.shared;
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
    pub async fn send(&self, msg: impl Into<Bytes>) -> Result<()> {
        let msg = msg.into();
        let shared = &self.shared;
        crate::protocol::encode_header(msg.len(), shared.config.max_frame)?;
        match shared.state.load(Ordering::Acquire) {
            CLOSED => return Err(Error::Closed),
            DISCONNECTED if shared.config.offline == OfflinePolicy::Fail => {
                return Err(Error::NotConnected);
            }
            _ => {}
        }
        self.outbox.send(msg).await.map_err(|_| Error::Closed)
    }
}

/// The background task: runs connections until closed or until reconnecting is over.
async fn run(
    shared: Arc<Shared>,
    mut stream: TcpStream,
    mut outbox: OutboxReceiver,
    events: mpsc::Sender<ClientEvent>,
) -> Result<()> {
    let config = &shared.config;
    let traffic = Traffic::default();
    let result = loop {
        let _ = stream.set_nodelay(true);
        // Mark connected before announcing it, so an application that sees `Connected` can
        // send at once; never overwrite CLOSED (close and drop race with this task).
        let _ = shared.state.compare_exchange(
            DISCONNECTED,
            CONNECTED,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        if let Ok(addr) = stream.peer_addr() {
            let _ = events.send(ClientEvent::Connected { addr }).await;
        }
        let outcome = drive(
            stream,
            Drive {
                max_frame: config.max_frame,
                outbox: &mut outbox,
                events: &events,
                to_event: ClientEvent::Message,
                traffic: &traffic,
                close: &shared.close,
                close_order: || {
                    lock(&shared.order).clone().unwrap_or(CloseOrder {
                        reason: DisconnectReason::Closed,
                        graceful: true,
                    })
                },
                drain_deadline: config.drain_deadline,
            },
        )
        .await;
        let _ = shared.state.compare_exchange(
            CONNECTED,
            DISCONNECTED,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        tracing::debug!(reason = %outcome.reason, "disconnected");
        let _ = events
            .send(ClientEvent::Disconnected {
                reason: outcome.reason.clone(),
            })
            .await;
        if shared.close.is_cancelled() {
            let left = outbox.len();
            break if !outcome.flushed {
                Err(Error::Undelivered(left.max(1)))
            } else if left > 0 {
                Err(Error::Undelivered(left))
            } else {
                Ok(())
            };
        }
        if !config.reconnect {
            break undelivered(&outbox);
        }
        match connect_with_backoff(
            config,
            &config.reconnect_backoff,
            Some(&events),
            &shared.close,
        )
        .await
        {
            Ok(s) => stream = s,
            Err(Error::Closed) => break undelivered(&outbox),
            Err(e) => {
                tracing::warn!(error = %e, "giving up reconnecting");
                break Err(e);
            }
        }
    };
    shared.state.store(CLOSED, Ordering::Release);
    result
}

fn undelivered(outbox: &OutboxReceiver) -> Result<()> {
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
    events: Option<&mpsc::Sender<ClientEvent>>,
    close: &CancellationToken,
) -> Result<TcpStream> {
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
                _ = events.send(ClientEvent::Reconnecting { attempt, delay }) => {}
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
                Ok(Ok(stream)) => return Ok(stream),
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

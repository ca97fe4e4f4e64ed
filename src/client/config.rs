//! How a client connects: [`ClientConfig`] and what happens to sends while offline
//! ([`OfflinePolicy`]).

use std::time::Duration;

use bytes::Bytes;

use super::Backoff;
use crate::connection::{Heartbeat, Mode};
use crate::outbox::OutboxLimits;
use crate::protocol::DEFAULT_MAX_FRAME;

/// What a send does while the client is disconnected (between a drop and the reconnect).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OfflinePolicy {
    /// Queue it (within the outbox bounds; beyond them the send waits) and send it once
    /// reconnected.
    Queue,
    /// Fail at once with [`Error::NotConnected`](crate::Error::NotConnected).
    Fail,
}

/// Configuration of a [`Client`](super::Client).
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Server address as `host:port`; the name is resolved again on every attempt.
    pub addr: String,
    /// Largest payload sent or accepted. Default 16 MiB.
    pub max_frame: usize,
    /// Spacing and limits of the attempts to make the first connection
    /// ([`Client::connect`](super::Client::connect)). Default: 100 ms doubling to 5 s, with jitter, for up to 10 s.
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
    /// How long [`Client::close`](super::Client::close) may spend delivering queued messages and waiting for the
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
    /// How long [`Client::request`](super::Client::request) waits for an answer. Default 10 s.
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

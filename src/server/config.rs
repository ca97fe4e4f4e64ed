//! [`ServerConfig`]: every limit and policy of a server, with its default.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;

use crate::connection::Heartbeat;
use crate::outbox::{FullPolicy, OutboxLimits};
use crate::protocol::DEFAULT_MAX_FRAME;

/// The tutorial's port.
pub const DEFAULT_PORT: u16 = 1234;

/// Which protocols a server accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolMode {
    /// Only the tutorial's plain framing: every frame is a message (a hello is too).
    Tutorial,
    /// Only the sockframe protocol: the first frame must be a hello.
    Sockframe,
    /// Both on one port: a connection whose first frame is a hello speaks the sockframe
    /// protocol; any other first frame, or none within
    /// [`detect_timeout`](ServerConfig::detect_timeout), makes it a tutorial connection.
    /// Off (treated as `Sockframe`) when tokens are required.
    Auto,
}

/// Configuration of a [`Server`](super::Server). Every field has a documented default
/// ([`ServerConfig::default`]); set the ones you need.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on. Default `127.0.0.1:1234` (this machine only); use `0.0.0.0:1234`
    /// or `[::]:1234` to be reachable from other machines; port 0 lets the OS choose.
    pub bind: SocketAddr,
    /// Largest payload accepted from or sent to a client. Default 16 MiB. A client announcing
    /// a longer frame is disconnected with a protocol error before any memory is reserved.
    pub max_frame: usize,
    /// Most clients connected at once. Default 10,000. A connection over the limit is closed
    /// as soon as it is accepted.
    pub max_connections: usize,
    /// Bounds of each client's outgoing queue. Default 1,024 messages and 8 MiB.
    pub outbox: OutboxLimits,
    /// What [`Server::send`](super::Server::send) does when the client's queue is full.
    /// Default [`FullPolicy::Wait`].
    pub send_policy: FullPolicy,
    /// What a broadcast does for a client whose queue is full. Default
    /// [`FullPolicy::Disconnect`]: one slow reader must not hold up everyone.
    pub broadcast_policy: FullPolicy,
    /// Capacity of the event stream, in batches (a batch is what one read of one connection
    /// produced, at most 256 events and one read buffer of payload). Default 1,024. When the
    /// application falls behind, connections stop reading (TCP pushes back on the peers)
    /// instead of buffering.
    pub event_capacity: usize,
    /// How long a graceful close (shutdown, kick) may spend delivering queued messages and
    /// waiting for the peer to close. Default 5 s.
    pub drain_deadline: Duration,
    /// Listen backlog. Default 1,024 (the OS default of 128 overflows under connect bursts).
    pub backlog: u32,
    /// Protocols accepted. Default [`ProtocolMode::Auto`].
    pub protocol: ProtocolMode,
    /// Tokens that admit a client; empty (the default) admits everyone. When set, a hello
    /// must carry one of them (compared in constant time), and tutorial connections, which
    /// cannot carry one, are refused.
    pub tokens: Vec<Bytes>,
    /// Time for a sockframe client to complete the handshake. Default 5 s.
    pub handshake_timeout: Duration,
    /// In `Auto` mode, how long to wait for a first frame before treating a silent peer as
    /// a tutorial client. Default 1 s. Until then nothing is written to it (a sockframe
    /// client must get the welcome first) and it is not reported connected, but it is
    /// registered from its accept: sends and broadcasts to it are queued, and written once
    /// its protocol is known (docs/protocol.md, *Telling the two apart on one port*).
    pub detect_timeout: Duration,
    /// Pings for sockframe clients. Default every 5 s; dead after 3 to 4 silent
    /// intervals (checked once per interval).
    /// (The tutorial framing has no pings: only `idle_timeout` applies there.)
    pub heartbeat: Option<Heartbeat>,
    /// Disconnect a client that sends no message for this long. Default off.
    pub idle_timeout: Option<Duration>,
    /// How long [`Server::request`](super::Server::request) waits for an answer. Default 10 s.
    pub request_timeout: Duration,
    /// A frame that has started arriving must be complete within this long, or the client is
    /// disconnected (a "slowloris" holds memory and a slot by sending a frame a byte at a
    /// time). Default 30 s: a 16 MiB frame at 5 Mbit/s. `None` turns it off.
    pub frame_timeout: Option<Duration>,
    /// Inbound message rate limit per client. Default none.
    pub rate_limit: Option<crate::connection::RateLimit>,
    /// Most connections at once from one IP address. Default 512.
    pub max_connections_per_ip: usize,
    /// If not empty, only clients from these networks are accepted. Default empty.
    pub allow: Vec<ipnet::IpNet>,
    /// Clients from these networks are refused (checked after `allow`). Default empty.
    pub deny: Vec<ipnet::IpNet>,
    /// How long a lossless session whose connection dropped is kept for its client to come
    /// back; `None` turns sessions off (clients asking for one get none). Messages sent to
    /// the client meanwhile queue within [`outbox`](Self::outbox). Default 60 s.
    pub session_grace: Option<Duration>,
    /// Most sessions kept waiting for their clients at once (each holds its queue and its
    /// unacknowledged frames); beyond it a dropped session ends at once. Default 10,000.
    pub max_suspended: usize,
    /// Bounds on the frames a session keeps until the client acknowledges them; when full,
    /// sends to that client wait. Default 4,096 frames, 16 MiB.
    pub session_window: crate::SessionLimits,
    /// TLS for every connection (both framings). Default none (plain TCP). The TLS handshake
    /// runs in the connection's task within `handshake_timeout`; it never stalls accepting.
    #[cfg(feature = "tls")]
    pub tls: Option<std::sync::Arc<crate::tls::ServerTls>>,
    /// File transfer (sockframe clients). Default: no save directory, so files offered by
    /// clients are refused; sending files to clients works regardless.
    pub transfer: crate::transfer::TransferConfig,
    /// The other nodes of a cluster (`sockframe::cluster`, feature `cluster`), for sends,
    /// requests and broadcasts that reach every client wherever it is connected, and ids
    /// unique across the nodes. Default: none, a single node.
    pub cluster: Option<std::sync::Arc<dyn super::Peers>>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)),
            max_frame: DEFAULT_MAX_FRAME,
            max_connections: 10_000,
            outbox: OutboxLimits::default(),
            send_policy: FullPolicy::Wait,
            broadcast_policy: FullPolicy::Disconnect,
            event_capacity: 1024,
            drain_deadline: Duration::from_secs(5),
            backlog: 1024,
            protocol: ProtocolMode::Auto,
            tokens: Vec::new(),
            handshake_timeout: Duration::from_secs(5),
            detect_timeout: Duration::from_secs(1),
            heartbeat: Some(Heartbeat::default()),
            idle_timeout: None,
            request_timeout: Duration::from_secs(10),
            frame_timeout: Some(Duration::from_secs(30)),
            rate_limit: None,
            max_connections_per_ip: 512,
            allow: Vec::new(),
            deny: Vec::new(),
            session_grace: Some(Duration::from_secs(60)),
            max_suspended: 10_000,
            session_window: crate::SessionLimits::default(),
            #[cfg(feature = "tls")]
            tls: None,
            transfer: crate::transfer::TransferConfig::default(),
            cluster: None,
        }
    }
}

impl ServerConfig {
    /// The protocol mode in force: `Auto` becomes `Sockframe` when tokens are required.
    pub fn effective_protocol(&self) -> ProtocolMode {
        match self.protocol {
            ProtocolMode::Auto if !self.tokens.is_empty() => ProtocolMode::Sockframe,
            mode => mode,
        }
    }

    /// Whether a client from `ip` may connect under the allow and deny lists.
    pub fn admits(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        (self.allow.is_empty() || self.allow.iter().any(|net| net.contains(&ip)))
            && !self.deny.iter().any(|net| net.contains(&ip))
    }

    /// The default configuration listening on `bind`.
    pub fn new(bind: SocketAddr) -> Self {
        Self {
            bind,
            ..Self::default()
        }
    }
}

//! [`DisconnectReason`]: why a connection ended, as both the server and the client report it.

use std::fmt;
use std::io;

/// Why a connection ended.
///
/// Reported by [`ServerEvent::Disconnected`](crate::server::ServerEvent::Disconnected) and
/// [`ClientEvent::Disconnected`](crate::client::ClientEvent::Disconnected). The `Display` form
/// is the short lower-case text the CLI prints (`closed by peer`, `protocol error: …`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DisconnectReason {
    /// The peer closed the connection cleanly (end of stream between frames).
    ClosedByPeer,
    /// The connection was reset or aborted by the peer or the network.
    Reset,
    /// The server application disconnected this client ([`Server::disconnect`](crate::server::Server::disconnect)).
    Kicked,
    /// The peer broke the framing rules; the text says how.
    Protocol(String),
    /// The server is shutting down.
    Shutdown,
    /// The client's outgoing queue was full and the policy says to disconnect slow readers.
    SlowConsumer,
    /// The local application closed the connection ([`Client::close`](crate::client::Client::close)).
    Closed,
    /// The peer stopped answering: nothing arrived for the configured number of heartbeat
    /// intervals.
    HeartbeatTimeout,
    /// No application message arrived within the idle timeout.
    IdleTimeout,
    /// The peer sent faster than its rate limit allows.
    RateLimited,
    /// Another I/O error; the text says which.
    Io(String),
    /// The session's client connected again on a new connection, which took the session
    /// over from this one (the old one had not yet been noticed dead).
    Replaced,
    /// The lossless session ended because its client did not come back within the grace
    /// period (server), or because the server no longer had it (client). `undelivered`
    /// messages and other frames may not have reached the peer.
    SessionExpired {
        /// Frames sent or queued that the peer never acknowledged.
        undelivered: u64,
    },
    /// The client's lossless session moved to another node of the cluster, where the
    /// client came back (server only): nothing was lost, it is served there now.
    HandedOver,
}

impl DisconnectReason {
    /// Every [`label`](Self::label), in declaration order: what a metrics exporter lists so
    /// that a reason never seen still shows as zero.
    pub const LABELS: [&'static str; 14] = [
        "closed_by_peer",
        "reset",
        "kicked",
        "protocol",
        "shutdown",
        "slow_consumer",
        "closed",
        "heartbeat_timeout",
        "idle_timeout",
        "rate_limited",
        "io",
        "replaced",
        "session_expired",
        "handed_over",
    ];

    /// A short, stable, snake-case name of the reason without its details (`protocol`, not
    /// the text of the broken rule): a metric label, a JSON field.
    pub fn label(&self) -> &'static str {
        Self::LABELS[self.index()]
    }

    /// The reason's position in [`LABELS`](Self::LABELS).
    pub(crate) fn index(&self) -> usize {
        match self {
            DisconnectReason::ClosedByPeer => 0,
            DisconnectReason::Reset => 1,
            DisconnectReason::Kicked => 2,
            DisconnectReason::Protocol(_) => 3,
            DisconnectReason::Shutdown => 4,
            DisconnectReason::SlowConsumer => 5,
            DisconnectReason::Closed => 6,
            DisconnectReason::HeartbeatTimeout => 7,
            DisconnectReason::IdleTimeout => 8,
            DisconnectReason::RateLimited => 9,
            DisconnectReason::Io(_) => 10,
            DisconnectReason::Replaced => 11,
            DisconnectReason::SessionExpired { .. } => 12,
            DisconnectReason::HandedOver => 13,
        }
    }

    /// Whether a session survives a connection that ended this way: the network failed
    /// (reset, end of stream without a `CLOSE`, silence), as opposed to an end on purpose
    /// (a close, a kick, a shutdown, a broken rule).
    pub(crate) fn is_network_failure(&self) -> bool {
        matches!(
            self,
            DisconnectReason::ClosedByPeer
                | DisconnectReason::Reset
                | DisconnectReason::Io(_)
                | DisconnectReason::HeartbeatTimeout
                | DisconnectReason::Replaced
        )
    }

    /// Classifies an I/O error from a socket.
    pub fn from_io(e: &io::Error) -> Self {
        use io::ErrorKind::*;
        match e.kind() {
            ConnectionReset | ConnectionAborted | BrokenPipe => DisconnectReason::Reset,
            UnexpectedEof => DisconnectReason::ClosedByPeer,
            _ => DisconnectReason::Io(plain_io_message(e)),
        }
    }

    /// The reason a peer gave in a `CLOSE` frame, seen from this side.
    pub(crate) fn from_close(code: u16, text: &str) -> Self {
        use crate::protocol::message::close_code::*;
        match code {
            SHUTDOWN => DisconnectReason::Shutdown,
            KICKED => DisconnectReason::Kicked,
            HEARTBEAT_TIMEOUT => DisconnectReason::HeartbeatTimeout,
            IDLE_TIMEOUT => DisconnectReason::IdleTimeout,
            SLOW_CONSUMER => DisconnectReason::SlowConsumer,
            RATE_LIMITED => DisconnectReason::RateLimited,
            PROTOCOL_ERROR => DisconnectReason::Protocol(format!("the peer reported: {text}")),
            _ => DisconnectReason::ClosedByPeer,
        }
    }

    /// A short machine-friendly name: `closed_by_peer`, `protocol_error`, …
    pub fn code(&self) -> &'static str {
        match self {
            DisconnectReason::ClosedByPeer => "closed_by_peer",
            DisconnectReason::Reset => "reset",
            DisconnectReason::Kicked => "kicked",
            DisconnectReason::Protocol(_) => "protocol_error",
            DisconnectReason::Shutdown => "shutdown",
            DisconnectReason::SlowConsumer => "slow_consumer",
            DisconnectReason::Closed => "closed",
            DisconnectReason::HeartbeatTimeout => "heartbeat_timeout",
            DisconnectReason::IdleTimeout => "idle_timeout",
            DisconnectReason::RateLimited => "rate_limited",
            DisconnectReason::Io(_) => "io_error",
            DisconnectReason::Replaced => "replaced",
            DisconnectReason::SessionExpired { .. } => "session_expired",
            DisconnectReason::HandedOver => "handed_over",
        }
    }
}

impl fmt::Display for DisconnectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DisconnectReason::ClosedByPeer => f.write_str("closed by peer"),
            DisconnectReason::Reset => f.write_str("reset"),
            DisconnectReason::Kicked => f.write_str("kicked"),
            DisconnectReason::Protocol(detail) => write!(f, "protocol error: {detail}"),
            DisconnectReason::Shutdown => f.write_str("shutdown"),
            DisconnectReason::SlowConsumer => f.write_str("slow consumer: outgoing queue full"),
            DisconnectReason::Closed => f.write_str("closed"),
            DisconnectReason::HeartbeatTimeout => f.write_str("heartbeat timeout"),
            DisconnectReason::IdleTimeout => f.write_str("idle timeout"),
            DisconnectReason::RateLimited => f.write_str("rate limited"),
            DisconnectReason::Io(detail) => write!(f, "i/o error: {detail}"),
            DisconnectReason::Replaced => f.write_str("replaced by a newer connection"),
            DisconnectReason::SessionExpired { undelivered } => write!(
                f,
                "session expired; {undelivered} frame(s) may not have been delivered"
            ),
            DisconnectReason::HandedOver => f.write_str("session handed over to another node"),
        }
    }
}

/// An I/O error's message without the `(os error N)` suffix, starting lower-case.
pub(crate) fn plain_io_message(e: &io::Error) -> String {
    let text = e.to_string();
    let text = match text.find(" (os error") {
        Some(i) => &text[..i],
        None => &text[..],
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

//! The library's error type.

use std::io;

use crate::id::ClientId;
use crate::protocol::FrameError;
use crate::reason::DisconnectReason;

/// Everything that can go wrong in the library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O error on a socket.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The peer broke the framing rules (oversized or negative length, truncated frame).
    #[error("protocol error: {0}")]
    Frame(#[from] FrameError),
    /// The client could not connect, after every attempt its backoff allowed.
    #[error("cannot connect to {addr}: {}", describe_connect_error(.source))]
    Connect {
        /// The address as given.
        addr: String,
        /// How many connection attempts were made.
        attempts: u32,
        /// The error of the last attempt.
        #[source]
        source: io::Error,
    },
    /// The server could not listen on its address.
    #[error("cannot listen on {addr}: {}", crate::reason::plain_io_message(.source))]
    Bind {
        /// The address to listen on.
        addr: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// A send was made while disconnected, and the client is configured to fail at once.
    #[error("not connected")]
    NotConnected,
    /// The client or server has been closed or shut down.
    #[error("closed")]
    Closed,
    /// No client with this id is connected.
    #[error("no connected client with id {0}")]
    UnknownClient(ClientId),
    /// The client's outgoing queue was full and the policy is to disconnect it.
    #[error("client {0} is not reading fast enough; its queue was full and it was disconnected")]
    SlowConsumer(ClientId),
    /// A frame that had started did not finish within the frame timeout.
    #[error("a frame was not completed within {limit:?} ({have} bytes of it arrived)")]
    FrameTimeout {
        /// The frame timeout.
        limit: std::time::Duration,
        /// Bytes of the frame that had arrived.
        have: usize,
    },
    /// The connection ended before the request was answered.
    #[error("the connection ended before an answer arrived")]
    Disconnected,
    /// The peer answered a request with an error.
    #[error("the peer answered with error {code}: {text}")]
    Remote {
        /// The error code (see `protocol::message::error_code`).
        code: u16,
        /// The peer's description.
        text: String,
    },
    /// The cluster could not do its part: Redis is unreachable, or the client's node did
    /// not answer in time.
    #[error("cluster: {0}")]
    Cluster(String),
    /// A request was not answered in time.
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
    /// The peer speaks the tutorial framing, which has no requests.
    #[error("the peer speaks the tutorial framing, which has no requests")]
    NotSupported,
    /// The server refused the handshake. Not retried: the same hello would be refused again.
    #[error("the server refused the connection: {code}{}", if .text.is_empty() { String::new() } else { format!(" ({})", .text) })]
    Rejected {
        /// Why.
        code: crate::protocol::message::RejectCode,
        /// The server's detail.
        text: String,
    },
    /// The handshake failed (timeout, unexpected frame); retried like a failed connect.
    #[error("handshake with {addr} failed: {detail}")]
    Handshake {
        /// The server address.
        addr: String,
        /// What went wrong.
        detail: String,
    },
    /// The TLS handshake failed on the certificates (not trusted, wrong name, no client
    /// certificate). Not retried: the same certificates would fail again.
    #[error("TLS with {addr} failed: {detail}")]
    Certificate {
        /// The server address.
        addr: String,
        /// What rustls reported.
        detail: String,
    },
    /// TLS could not be set up (a certificate or key file, a name).
    #[cfg(feature = "tls")]
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// Closing left queued messages that were never written to a connection.
    #[error("{0} queued message(s) were not sent before the connection closed")]
    Undelivered(usize),
    /// The receiver refused a file offer.
    #[error("the receiver refused the file: {text}")]
    Refused {
        /// A `protocol::transfer::refuse_code`.
        code: u16,
        /// The receiver's reason.
        text: String,
    },
    /// A file transfer failed after it was accepted (a digest mismatch, a full disk, a
    /// cancel); the text says how.
    #[error("file transfer failed: {0}")]
    TransferFailed(String),
    /// A local file could not be read.
    #[error("{}: {}", .path.display(), crate::reason::plain_io_message(.source))]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A person-readable reason for a failed connect, with a hint for the common case.
fn describe_connect_error(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => {
            "connection refused (is `sockframe serve` running?)".to_string()
        }
        io::ErrorKind::TimedOut => "timed out".to_string(),
        _ => crate::reason::plain_io_message(e),
    }
}

// Here rather than in `reason`, so that the reasons stay below the error type: a reason names
// no library error, and the error type may carry a reason.
impl DisconnectReason {
    /// Classifies a library error that ended a connection.
    pub(crate) fn from_error(e: &Error) -> Self {
        match e {
            Error::Io(io) => Self::from_io(io),
            Error::Frame(f) => DisconnectReason::Protocol(f.to_string()),
            e @ Error::FrameTimeout { .. } => DisconnectReason::Protocol(e.to_string()),
            other => DisconnectReason::Io(other.to_string()),
        }
    }
}

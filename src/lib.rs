//! # sockframe
//!
//! Asynchronous TCP messaging between one server and many clients, wire-compatible with the
//! framing of the C# "Asynchronous Socket" tutorial: each message is a 4-byte little-endian
//! length followed by that many bytes.
//!
//! ## Layout
//!
//! - [`protocol`]: the wire formats as pure functions over bytes (no I/O, no tokio): the
//!   tutorial framing, and the sockframe protocol's handshake and typed frames inside it.
//! - [`codec`]: [`TutorialCodec`](codec::TutorialCodec), the framing as a `tokio_util` codec.
//! - [`connection`]: [`Connection`](connection::Connection), buffered frames in and out over
//!   any async byte stream; batching of writes lives here.
//! - [`server`]: [`Server`](server::Server): accept loop, client registry, event stream,
//!   send / broadcast / disconnect, graceful shutdown.
//! - [`handler`]: [`Handler`]: per-client message handling inside the connection's task,
//!   for servers that answer or count small messages without a hop to the event stream.
//! - [`client`]: [`Client`](client::Client): connect with backoff, automatic reconnect,
//!   send and receive.
//! - `session` (internal): lossless sessions: application frames counted and acknowledged,
//!   kept until acknowledged within a [`SessionLimits`] window, resent after a resume; on by
//!   default for clients that reconnect (`ClientConfig::session`, `ServerConfig::session_grace`).
//! - [`transfer`]: file transfer in both directions: chunked with a bounded window,
//!   BLAKE3-verified, resumable, interleaved with messages.
//! - `tls` (feature `tls`, on by default): rustls configurations, PEM loading, reloading,
//!   and throw-away certificates for tests and first steps.
//! - [`Message`] (text, binary or untyped), [`Request`] (an incoming request and its
//!   responder), [`DisconnectReason`], [`OutboxLimits`], [`FullPolicy`], [`Heartbeat`],
//!   [`Mode`], [`Error`]: shared types.
//!
//! ## Example
//!
//! ```
//! use sockframe::client::{Client, ClientConfig, ClientEvent};
//! use sockframe::server::{Server, ServerConfig, ServerEvent};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> sockframe::Result<()> {
//! // A server on a port the OS picks, echoing every message to its sender.
//! let (server, mut events) = Server::bind(ServerConfig::new("127.0.0.1:0".parse().unwrap())).await?;
//! let echo = server.clone();
//! tokio::spawn(async move {
//!     while let Some(event) = events.recv().await {
//!         match event {
//!             ServerEvent::Message { client, message } => { let _ = echo.send(client, message).await; }
//!             ServerEvent::Request { request, .. } => {
//!                 let answer = format!("you asked: {}", request.message().as_text().unwrap_or("?"));
//!                 let _ = request.respond(answer).await;
//!             }
//!             _ => {}
//!         }
//!     }
//! });
//!
//! let mut client = Client::connect(ClientConfig::new(server.local_addr().to_string())).await?;
//! client.send("hello").await?;
//! assert_eq!(client.request("2 + 2?").await?, "you asked: 2 + 2?");
//! loop {
//!     match client.recv().await {
//!         Some(ClientEvent::Message(message)) => { assert_eq!(message.as_text(), Some("hello")); break; }
//!         Some(_) => continue, // connected / disconnected notices
//!         None => panic!("client closed"),
//!     }
//! }
//! client.close().await?;
//! server.shutdown().await;
//! # Ok(()) }
//! ```

#[cfg(feature = "admin")]
pub mod admin;
pub mod client;
#[cfg(feature = "cluster")]
pub mod cluster;
pub mod codec;
pub mod connection;
mod error;
pub mod handler;
mod id;
mod message;
mod outbox;
mod outgoing;
pub mod protocol;
mod reason;
mod request;
pub mod server;
mod session;
#[cfg(feature = "tls")]
pub mod tls;
pub mod transfer;

pub use connection::{Heartbeat, Mode, RateAction, RateLimit};
pub use error::Error;
pub use handler::Handler;
pub use message::{Message, MessageKind, MessageRef};
pub use outbox::{FullPolicy, OutboxLimits};
pub use reason::DisconnectReason;
pub use request::Request;
pub use session::SessionLimits;

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Compiles the README's library example as a doctest, so the README cannot drift.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

/// Compiles the example in docs/transfer.md as a doctest.
#[doc = include_str!("../docs/transfer.md")]
#[cfg(doctest)]
pub struct TransferDocDoctests;

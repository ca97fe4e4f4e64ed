//! [`Handler`]: application code run inside each client's connection task, for the messages
//! of servers whose work per message is small and does not wait (count, filter, answer).
//!
//! By default a server hands every message to its one [`ServerEvents`] stream, which the
//! application reads in a task of its own. That is simple and keeps every event in one
//! place, but each message then crosses from the connection's task to the application's:
//! a channel hop and, when the two tasks sit on different threads, a wake-up, which at
//! millions of small messages a second is most of the cost. A handler is called in the
//! connection's own task, in the loop that parses the frames, so a message is handled
//! where it was read, the way a hand-written `tokio` server with a task per connection
//! does it. `Connected`, `Disconnected`, requests, file offers and the other events still
//! come through [`ServerEvents`].
//!
//! A handler is made per client by the function given to
//! [`Server::bind_with_handler`](crate::server::Server::bind_with_handler), so it can keep
//! per-client state without locks. It lives as long as the client: across the connections
//! of a lossless session, and dropped when the client is gone.
//!
//! What a handler returns is sent back to the same client, in order. Replies wait for the
//! connection's writer in a queue of their own, bounded by the same limits as the client's
//! outgoing queue ([`ServerConfig::outbox`](crate::server::ServerConfig::outbox)); they
//! are written ahead of messages queued with `Server::send` meanwhile. When the replies
//! reach those bounds (the client does not read), the connection stops reading until there
//! is room (with [`FullPolicy::Wait`]), or the client is disconnected as a slow consumer
//! (with [`FullPolicy::Disconnect`]); see
//! [`ServerConfig::send_policy`](crate::server::ServerConfig::send_policy).
//!
//! One limit to know: with a lossless session and [`FullPolicy::Wait`], a reply waiting for
//! room while the session's window is full waits for acknowledgements that arrive behind
//! messages the connection is not reading; the same holds for an application's `send`
//! under `Wait`. A client that reads what it is sent and does not run a window's worth
//! of messages ahead never meets it; `FullPolicy::Disconnect` never waits.
//!
//! A handler that only looks at each message (counts it, filters it, parses it into types
//! of its own) can borrow it instead of taking it: [`Handler::borrows`] returns `true`, and
//! [`Handler::message_ref`] is then given each message as a [`MessageRef`], a view of the
//! connection's read buffer, with no allocation or reference count per message.
//!
//! ```
//! use sockframe::{Handler, Message, MessageRef};
//!
//! /// Counts messages and bytes without keeping any.
//! #[derive(Default)]
//! struct Count {
//!     messages: u64,
//!     bytes: u64,
//! }
//!
//! impl Handler for Count {
//!     fn message(&mut self, message: Message) -> Option<Message> {
//!         self.message_ref(MessageRef::from(&message))
//!     }
//!
//!     fn borrows(&self) -> bool {
//!         true
//!     }
//!
//!     fn message_ref(&mut self, message: MessageRef<'_>) -> Option<Message> {
//!         self.messages += 1;
//!         self.bytes += message.len() as u64;
//!         None
//!     }
//! }
//! ```
//!
//! A handler must not block: while it runs, its connection reads nothing. Work that waits
//! (a database, another client's queue) belongs on the event stream, or in a task the
//! handler hands the message to.
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use sockframe::Message;
//! use sockframe::server::{Server, ServerConfig};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> sockframe::Result<()> {
//! // Echo every message to its sender, and count them all.
//! let count = Arc::new(AtomicU64::new(0));
//! let counted = count.clone();
//! let config = ServerConfig::new("127.0.0.1:0".parse().unwrap());
//! let (server, _events) = Server::bind_with_handler(config, move |_client, _addr| {
//!     let count = counted.clone();
//!     move |message: Message| {
//!         count.fetch_add(1, Ordering::Relaxed);
//!         Some(message)
//!     }
//! })
//! .await?;
//! # server.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! [`ServerEvents`]: crate::server::ServerEvents
//! [`FullPolicy::Wait`]: crate::FullPolicy::Wait
//! [`FullPolicy::Disconnect`]: crate::FullPolicy::Disconnect

use std::net::SocketAddr;
use std::sync::Arc;

use crate::id::ClientId;
use crate::message::{Message, MessageRef};

/// Handles the messages of one client, in order, inside its connection's task (see the
/// [module docs](self)).
///
/// Implemented for every `FnMut(Message) -> Option<Message>` that is `Send + 'static`.
pub trait Handler: Send + 'static {
    /// Called for each message the client sends, in the order sent. The message returned,
    /// if any, is sent back to the client.
    fn message(&mut self, message: Message) -> Option<Message>;

    /// Whether this handler takes messages lent in place ([`message_ref`](Self::message_ref))
    /// instead of by value. Asked once per connection. Default `false`.
    ///
    /// A [`Message`] shares the connection's read buffer: making one and dropping it costs
    /// two atomic reference-count operations, most of the per-message cost left at
    /// millions of small messages a second. A handler that only looks at each message
    /// (counts, filters, parses it into its own types) can borrow it instead: with 64-byte
    /// messages on one connection that more than doubles the messages per second
    /// (`docs/benchmarks.md`).
    fn borrows(&self) -> bool {
        false
    }

    /// Called instead of [`message`](Self::message) when [`borrows`](Self::borrows) is
    /// true, with the message as the connection read it, valid for this call only. The
    /// message returned, if any, is sent back to the client. The default copies the
    /// message and calls [`message`](Self::message).
    fn message_ref(&mut self, message: MessageRef<'_>) -> Option<Message> {
        self.message(message.to_message())
    }
}

impl<F> Handler for F
where
    F: FnMut(Message) -> Option<Message> + Send + 'static,
{
    fn message(&mut self, message: Message) -> Option<Message> {
        self(message)
    }
}

/// Makes each client's handler, given its id and address.
pub(crate) type MakeHandler = Arc<dyn Fn(ClientId, SocketAddr) -> Box<dyn Handler> + Send + Sync>;

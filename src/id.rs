//! [`ClientId`], the name every layer uses for a connected client: a leaf, so the error type,
//! the handler and the connection can name a client without importing the server.

use std::fmt;

/// A client's id: unique for the life of the server, never reused (the tutorial's
/// `Clients.Count` hands out the same id again after a disconnect). Ids start at 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(pub u64);

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

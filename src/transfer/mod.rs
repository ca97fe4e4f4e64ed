//! File transfer over a sockframe connection, in both directions: streamed from disk in
//! chunks with a bounded window in flight, interleaved with ordinary messages, verified with
//! BLAKE3, resumable.
//!
//! - Sending: [`Server::send_file`](crate::server::Server::send_file) or
//!   [`Client::send_file`](crate::client::Client::send_file) hash the file, offer it, and
//!   return a [`TransferHandle`]; its [`finish`](TransferHandle::finish) resolves once the
//!   receiver has verified the digest and put the file in place.
//! - Receiving: an offer arrives as a `FileOffer` event holding a [`FileOffer`]; the
//!   application calls [`accept`](FileOffer::accept) or [`reject`](FileOffer::reject)
//!   (dropping it rejects). Files go to [`TransferConfig::save_dir`]; without one every
//!   offer is refused before the application hears of it. The outcome is a `FileReceived`
//!   or a `FileFailed` event.
//!
//! The wire format is [`crate::protocol::transfer`]; `docs/transfer.md` describes the
//! design, the safety rules and measured figures.
//!
//! ## Memory and fairness
//!
//! A sender has at most [`TransferConfig::window`] chunks of
//! [`TransferConfig::chunk_size`] bytes in flight beyond the receiver's last `PROGRESS`,
//! which the receiver sends only once the bytes are written to its disk. Memory therefore
//! stays flat whatever the file size, a slow disk slows the sender down, and a message
//! queued behind a transfer waits for at most one window per transfer, not for the file.
//!
//! ## Resume
//!
//! The receiver writes into `.sockframe-<digest>.part` in its save directory and keeps it
//! when a connection drops. A later offer of the same digest (same file content, any name)
//! is answered with `ACCEPT` at the partial file's length, and only the rest is sent. A
//! client that reconnects re-offers its unfinished transfers by itself
//! (the engine's `on_new_connection`); a re-run of the CLI after a crash does the same by
//! offering the file again.
//!
//! ## Where the pieces are
//!
//! - `mod.rs`: the settings ([`TransferConfig`]), [`Digest`], and what the engine reports to
//!   the application (`TransferEvent`, through `Emit`).
//! - `engine.rs`: the engine of one side of a connection (`Transfers`): its inbox from the
//!   connection, the dispatcher task that routes each frame by transfer id, and the routing
//!   table that the sending and receiving tasks share.
//! - `sender.rs`: the sending side: [`TransferHandle`], [`Progress`], [`FileReceipt`], and
//!   the task that offers a file, streams it within the window and waits for the verdict.
//! - `receiver.rs`: the receiving side: the checks on an incoming offer, [`FileOffer`] and
//!   the application's decision, the task that writes, confirms and verifies the chunks,
//!   and its outcomes [`ReceivedFile`] and [`FileFailure`].
//! - `name.rs`: which offered file names a receiver accepts ([`check_name`]).
//! - `source.rs`: the sender's disk side: hashing the file, reading it back in chunks.
//! - `store.rs`: the receiver's disk side: the partial file, verified and renamed into place.
//!
//! How they meet: a connection hands each transfer frame to the engine's `Inbox`; the
//! dispatcher gives a peer's offer to the receiving side, that transfer's later frames to
//! its receive task, and the replies to one of our offers (accept, progress, result) to
//! the sending task that made it. Both sides queue their frames on the connection's
//! outbox and tell the application through `Emit`; their disk I/O (`source`, `store`)
//! runs on tokio's blocking pool.

mod engine;
mod name;
mod progress;
mod receiver;
mod sender;
mod source;
mod store;

pub use name::{BadName, MAX_NAME_LEN, check_name};
pub use progress::{Direction, TransferStatus};
pub use receiver::{FileFailure, FileOffer, ReceivedFile};
pub use sender::{FileReceipt, Progress, TransferHandle};

pub(crate) use engine::{Inbox, Input, Locks, Transfers};

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::future::BoxFuture;

/// File transfer settings of a server or a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferConfig {
    /// Where received files go. Default none: every offer is refused (`not accepting`)
    /// without the application being asked.
    pub save_dir: Option<PathBuf>,
    /// Largest file accepted, in bytes. Default 64 GiB.
    pub max_file_size: u64,
    /// Replace an existing file of the offered name. Default `false`: such offers are
    /// refused (`exists`).
    pub overwrite: bool,
    /// Free space that must remain on the save directory's file system after the file is
    /// written, checked before accepting. Default 64 MiB.
    pub min_free_space: u64,
    /// Bytes of file data per chunk frame when sending. Default 128 KiB (cut to fit the
    /// peer's frame limit).
    pub chunk_size: usize,
    /// Chunks a sender may have in flight beyond the receiver's last confirmation. Default
    /// 8 (1 MiB with the default chunk size): enough to keep loopback and LAN links busy,
    /// small enough that a message queued behind it is delayed by about a millisecond.
    pub window: usize,
}

impl Default for TransferConfig {
    fn default() -> Self {
        TransferConfig {
            save_dir: None,
            max_file_size: 64 << 30,
            overwrite: false,
            min_free_space: 64 << 20,
            chunk_size: 128 << 10,
            window: 8,
        }
    }
}

impl TransferConfig {
    /// The default settings, receiving into `dir`.
    pub fn receive_into(dir: impl Into<PathBuf>) -> Self {
        TransferConfig {
            save_dir: Some(dir.into()),
            ..Self::default()
        }
    }
}

/// A BLAKE3 digest; shown as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(*blake3::hash(bytes).as_bytes())
    }

    /// The digest of the file at `path` (reads it whole; blocking).
    pub fn of_file(path: &Path) -> std::io::Result<Digest> {
        source::hash_file(path).map(|(_, digest)| digest)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

/// What the engine tells the application; the server and the client wrap it in their event
/// types.
#[derive(Debug)]
pub(crate) enum TransferEvent {
    Offer(FileOffer),
    Received(ReceivedFile),
    Failed(FileFailure),
}

/// Hands a [`TransferEvent`] to the application (waits while its event stream is full).
pub(crate) type Emit = Arc<dyn Fn(TransferEvent) -> BoxFuture<'static, ()> + Send + Sync>;

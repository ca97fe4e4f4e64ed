//! What a connection's writer is asked to send ([`Outgoing`]), and the two small types an
//! item carries back to whoever queued it: the [`Answer`] to a request and the
//! [`FlushWaiter`] of a flush.
//!
//! A leaf: it sits below the outbox, the session, requests, transfers and the connection,
//! which all queue or consume these items, so none of them needs to import another for it.

use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::message::Message;
use crate::protocol::transfer::TransferFrame;

/// An answer: the message, or an error code and text.
pub(crate) type Answer = std::result::Result<Message, (u16, String)>;

/// Someone waiting until everything queued before them is confirmed: acknowledged by the
/// peer in a session, written to the socket without one.
#[derive(Debug, Clone)]
pub(crate) struct FlushWaiter(Arc<Mutex<Option<oneshot::Sender<()>>>>);

impl FlushWaiter {
    pub(crate) fn new() -> (Self, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        (FlushWaiter(Arc::new(Mutex::new(Some(tx)))), rx)
    }

    /// Tells the waiter its messages are confirmed. (Dropping every clone unanswered tells
    /// it they may not be.)
    pub(crate) fn done(&self) {
        let tx = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(tx) = tx {
            let _ = tx.send(());
        }
    }
}

/// Something queued for a connection's writer.
#[derive(Debug, Clone)]
pub(crate) enum Outgoing {
    /// An application message.
    Message(Message),
    /// A request this side makes.
    Request { id: u64, message: Message },
    /// An answer to the peer's request.
    Response { id: u64, result: Answer },
    /// Not a frame: done once everything queued before it is confirmed (acknowledged by the
    /// peer in a session, written without one).
    Flush(FlushWaiter),
    /// A file transfer frame (sockframe protocol only).
    Transfer(TransferFrame),
}

//! The bounded outgoing queue of one connection.
//!
//! Bounded twice: by message count (the channel's capacity) and by bytes (a semaphore whose
//! permits are payload bytes). A peer that stops reading fills its outbox and then either
//! makes the sender wait or is disconnected, per [`FullPolicy`]; it never makes memory grow
//! without bound and never delays the outboxes of other peers.
//!
//! A message larger than the byte bound takes all of it: it waits until the outbox is empty
//! rather than being refused, so the largest legal frame can always be sent.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{Semaphore, mpsc};

/// An item whose size counts against an outbox's byte bound.
pub(crate) trait Weigh {
    /// Payload bytes this item stands for.
    fn weight(&self) -> usize;
}

impl Weigh for Bytes {
    fn weight(&self) -> usize {
        self.len()
    }
}

/// Size limits of an outgoing queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxLimits {
    /// Most messages queued at once. Default 1,024.
    pub messages: usize,
    /// Most payload bytes queued at once. Default 8 MiB.
    pub bytes: usize,
}

impl Default for OutboxLimits {
    fn default() -> Self {
        Self {
            messages: 1024,
            bytes: 8 * 1024 * 1024,
        }
    }
}

/// What a send does when the receiver's outgoing queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullPolicy {
    /// Wait until the queue has room (backpressure to the sender).
    Wait,
    /// Disconnect the slow receiver with reason `slow consumer` and fail the send.
    Disconnect,
}

/// Why a non-waiting send failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TrySendError {
    /// The queue is at one of its bounds.
    Full,
    /// The receiving side is gone.
    Closed,
}

/// Sending side; cheap to clone.
#[derive(Debug)]
pub(crate) struct OutboxSender<T = crate::connection::Outgoing> {
    tx: mpsc::Sender<T>,
    bytes: Arc<Semaphore>,
    max_bytes: u32,
}

impl<T> Clone for OutboxSender<T> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            bytes: self.bytes.clone(),
            max_bytes: self.max_bytes,
        }
    }
}

/// Receiving side, owned by the connection's writer.
#[derive(Debug)]
pub(crate) struct OutboxReceiver<T = crate::connection::Outgoing> {
    rx: mpsc::Receiver<T>,
    bytes: Arc<Semaphore>,
    max_bytes: u32,
}

/// A new outbox with the given limits.
pub(crate) fn outbox<T>(limits: OutboxLimits) -> (OutboxSender<T>, OutboxReceiver<T>) {
    let (tx, rx) = mpsc::channel(limits.messages.max(1));
    let max_bytes = limits
        .bytes
        .clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize)) as u32;
    let bytes = Arc::new(Semaphore::new(max_bytes as usize));
    (
        OutboxSender {
            tx,
            bytes: bytes.clone(),
            max_bytes,
        },
        OutboxReceiver {
            rx,
            bytes,
            max_bytes,
        },
    )
}

/// Byte permits a payload takes (at most the whole budget, see the module docs).
fn permits(len: usize, max: u32) -> u32 {
    len.min(max as usize) as u32
}

impl<T: Weigh> OutboxSender<T> {
    /// Queues `msg`, waiting for room. Fails only when the receiver is gone.
    pub(crate) async fn send(&self, msg: T) -> Result<(), TrySendError> {
        let n = permits(msg.weight(), self.max_bytes);
        let permit = self
            .bytes
            .acquire_many(n)
            .await
            .map_err(|_| TrySendError::Closed)?;
        let slot = self.tx.reserve().await.map_err(|_| TrySendError::Closed)?;
        // The receiver returns the permits when it takes the message out.
        permit.forget();
        slot.send(msg);
        Ok(())
    }

    /// Queues `msg` if both bounds allow it right now.
    pub(crate) fn try_send(&self, msg: T) -> Result<(), TrySendError> {
        let n = permits(msg.weight(), self.max_bytes);
        let permit = self.bytes.try_acquire_many(n).map_err(|e| match e {
            tokio::sync::TryAcquireError::Closed => TrySendError::Closed,
            tokio::sync::TryAcquireError::NoPermits => TrySendError::Full,
        })?;
        let slot = self.tx.try_reserve().map_err(|e| match e {
            mpsc::error::TrySendError::Full(()) => TrySendError::Full,
            mpsc::error::TrySendError::Closed(()) => TrySendError::Closed,
        })?;
        permit.forget();
        slot.send(msg);
        Ok(())
    }

    /// Sends with the given policy; `Full` is only returned under [`FullPolicy::Disconnect`].
    pub(crate) async fn send_with(&self, msg: T, policy: FullPolicy) -> Result<(), TrySendError> {
        match policy {
            FullPolicy::Wait => self.send(msg).await,
            FullPolicy::Disconnect => self.try_send(msg),
        }
    }
}

impl<T: Weigh> OutboxReceiver<T> {
    /// The next message, waiting for one; `None` once every sender is gone.
    pub(crate) async fn recv(&mut self) -> Option<T> {
        let msg = self.rx.recv().await?;
        self.release(&msg);
        Some(msg)
    }

    /// The next message if one is queued right now.
    pub(crate) fn try_recv(&mut self) -> Option<T> {
        let msg = self.rx.try_recv().ok()?;
        self.release(&msg);
        Some(msg)
    }

    /// Messages queued right now.
    pub(crate) fn len(&self) -> usize {
        self.rx.len()
    }

    fn release(&self, msg: &T) {
        self.bytes
            .add_permits(permits(msg.weight(), self.max_bytes) as usize);
    }
}

impl<T> Drop for OutboxReceiver<T> {
    fn drop(&mut self) {
        // Wake senders waiting for byte permits: nobody will ever return them.
        self.bytes.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bounded_by_count_and_bytes() {
        let (tx, mut rx) = outbox::<Bytes>(OutboxLimits {
            messages: 3,
            bytes: 10,
        });
        tx.try_send(Bytes::from_static(b"1234")).unwrap();
        tx.try_send(Bytes::from_static(b"1234")).unwrap();
        // 8 of 10 bytes used: a 4-byte message does not fit, a 2-byte one does.
        assert_eq!(
            tx.try_send(Bytes::from_static(b"1234")),
            Err(TrySendError::Full)
        );
        tx.try_send(Bytes::from_static(b"12")).unwrap();
        // Bytes are full and so is the count.
        assert_eq!(tx.try_send(Bytes::new()), Err(TrySendError::Full));
        assert_eq!(rx.recv().await.unwrap(), "1234");
        tx.try_send(Bytes::from_static(b"1234")).unwrap();
        assert_eq!(rx.len(), 3);
    }

    #[tokio::test]
    async fn oversized_message_takes_the_whole_budget() {
        let (tx, mut rx) = outbox::<Bytes>(OutboxLimits {
            messages: 8,
            bytes: 4,
        });
        tx.try_send(Bytes::from_static(b"too long for the budget"))
            .unwrap();
        assert_eq!(
            tx.try_send(Bytes::from_static(b"x")),
            Err(TrySendError::Full)
        );
        rx.recv().await.unwrap();
        tx.try_send(Bytes::from_static(b"x")).unwrap();
    }

    #[tokio::test]
    async fn waiting_sender_fails_when_receiver_drops() {
        let (tx, rx) = outbox::<Bytes>(OutboxLimits {
            messages: 1,
            bytes: 100,
        });
        tx.try_send(Bytes::from_static(b"a")).unwrap();
        let waiting = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(Bytes::from_static(b"b")).await }
        });
        drop(rx);
        assert_eq!(waiting.await.unwrap(), Err(TrySendError::Closed));
    }
}

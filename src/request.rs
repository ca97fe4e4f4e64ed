//! Request/response over the sockframe protocol, in both directions.
//!
//! The requester picks a correlation id, remembers it in its [`Pending`] table and sends a
//! `REQUEST` frame; the responder's application gets a [`Request`] and answers it once. A
//! `RESPONSE` with an id nobody waits for (unknown, expired, cancelled) is counted and
//! dropped. A [`Request`] dropped without an answer sends an `unhandled` error response,
//! so the requester never waits in silence.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::message::Message;
use crate::outbox::OutboxSender;
use crate::outgoing::{Answer, Outgoing};
use crate::protocol::message::error_code;
use crate::{Error, Result};

/// Requests this side sent and is waiting on.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    waiting: Mutex<HashMap<u64, oneshot::Sender<Answer>>>,
    next_id: AtomicU64,
    /// Responses that matched no waiting request.
    pub(crate) unmatched: AtomicU64,
}

impl Pending {
    /// Hands a response to whoever waits for `id`; counts it if nobody does.
    pub(crate) fn complete(&self, id: u64, answer: Answer) {
        let waiter = lock(&self.waiting).remove(&id);
        match waiter {
            Some(tx) => {
                // The requester may have given up between the lookup and now; that is fine.
                let _ = tx.send(answer);
            }
            None => {
                self.unmatched.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(id, "response to an unknown or expired request; ignored");
            }
        }
    }

    /// Fails every waiting request (the connection ended).
    pub(crate) fn fail_all(&self) {
        lock(&self.waiting).clear();
    }
}

/// Removes a waiting request from the table when its future is dropped or times out.
struct Waiting<'a> {
    pending: &'a Pending,
    id: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        lock(&self.pending.waiting).remove(&self.id);
    }
}

/// Sends `message` as a request through `outbox` and waits up to `timeout` for the answer.
/// Dropping the returned future cancels the request (a late answer is then ignored).
pub(crate) async fn request(
    pending: &Pending,
    outbox: &OutboxSender,
    message: Message,
    timeout: Duration,
) -> Result<Message> {
    let id = pending.next_id.fetch_add(1, Ordering::Relaxed) + 1;
    let (tx, rx) = oneshot::channel();
    lock(&pending.waiting).insert(id, tx);
    let _waiting = Waiting { pending, id };
    let exchange = async {
        outbox
            .send(Outgoing::Request { id, message })
            .await
            .map_err(|_| Error::Disconnected)?;
        match rx.await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err((code, text))) => Err(Error::Remote { code, text }),
            Err(_) => Err(Error::Disconnected),
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| Error::Timeout(timeout))?
}

/// A request received from the peer. Answer it with [`respond`](Self::respond) or
/// [`respond_error`](Self::respond_error); dropping it unanswered sends the error
/// `unhandled` to the requester.
///
/// One pointer in size: it travels inside every event enum, beside each message, and
/// its 56 bytes inline made every event that much larger to move.
#[derive(Debug)]
pub struct Request(Box<Inner>);

#[derive(Debug)]
struct Inner {
    id: u64,
    message: Message,
    /// Where the answer goes; `None` once answered.
    reply: Option<OutboxSender>,
}

impl Request {
    pub(crate) fn new(id: u64, message: Message, reply: OutboxSender) -> Self {
        Request(Box::new(Inner {
            id,
            message,
            reply: Some(reply),
        }))
    }

    /// The request's message.
    pub fn message(&self) -> &Message {
        &self.0.message
    }

    /// The correlation id (unique per connection and direction).
    pub fn id(&self) -> u64 {
        self.0.id
    }

    /// Answers with `message`; waits while the peer's outgoing queue is full.
    pub async fn respond(mut self, message: impl Into<Message>) -> Result<()> {
        self.answer(Ok(message.into())).await
    }

    /// Answers with an application error (code `2`, "application") and `text`.
    pub async fn respond_error(mut self, text: impl Into<String>) -> Result<()> {
        self.answer(Err((error_code::APPLICATION, text.into())))
            .await
    }

    async fn answer(&mut self, result: Answer) -> Result<()> {
        let reply = self.0.reply.take().expect("a request is answered once");
        reply
            .send(Outgoing::Response {
                id: self.0.id,
                result,
            })
            .await
            .map_err(|_| Error::Disconnected)
    }
}

/// Two requests are equal when they have the same id and message (for tests and logs).
impl PartialEq for Request {
    fn eq(&self, other: &Self) -> bool {
        self.0.id == other.0.id && self.0.message == other.0.message
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        let Some(reply) = self.0.reply.take() else {
            return;
        };
        let response = Outgoing::Response {
            id: self.0.id,
            result: Err((error_code::UNHANDLED, "the request was not answered".into())),
        };
        // Drop cannot wait: queue the error now if there is room, else from a task.
        if let Err(crate::outbox::TrySendError::Full) = reply.try_send(response.clone())
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move {
                let _ = reply.send(response).await;
            });
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

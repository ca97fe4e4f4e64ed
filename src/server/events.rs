//! What the server reports to the application: [`ServerEvent`]s, received in batches
//! through [`ServerEvents`], and `emit`, which sends the connection events.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::Poll;

use tokio::sync::mpsc;

use crate::connection::{Batch, Ready};

use super::{ClientId, Inner};
use crate::message::Message;
use crate::reason::DisconnectReason;
use crate::request::Request;

/// Something that happened on the server, in the order it happened per client: `Connected`
/// first, then that client's messages and requests in the order sent, then `Disconnected`.
#[derive(Debug, PartialEq)]
#[non_exhaustive]
pub enum ServerEvent {
    /// A client connected: its protocol is known (in `Auto` mode, once its first frame
    /// arrived or [`detect_timeout`](super::ServerConfig::detect_timeout) passed). Its id
    /// may be older: in `Auto` mode a connection is registered from its accept, and what
    /// was sent to it since is written now.
    Connected {
        /// Its id.
        client: ClientId,
        /// Its address.
        addr: SocketAddr,
    },
    /// A client sent a message.
    Message {
        /// The sender.
        client: ClientId,
        /// The message: text or binary (sockframe clients), untyped (tutorial clients).
        message: Message,
    },
    /// A sockframe client sent a request; answer it through the [`Request`] (dropping it
    /// unanswered sends the client an `unhandled` error).
    Request {
        /// The sender.
        client: ClientId,
        /// The request and its responder.
        request: Request,
    },
    /// The connection of a client with a lossless session dropped; the session is kept for
    /// [`ServerConfig::session_grace`](super::ServerConfig::session_grace), and sends to the client queue meanwhile. Next comes
    /// `Resumed` (nothing was lost) or `Disconnected` with
    /// [`DisconnectReason::SessionExpired`].
    Suspended {
        /// The client whose connection dropped.
        client: ClientId,
        /// Why the connection ended.
        reason: DisconnectReason,
    },
    /// A client came back and resumed its session: same id, and every message either way
    /// is delivered once, in order.
    Resumed {
        /// The client.
        client: ClientId,
        /// Its new address.
        addr: SocketAddr,
    },
    /// A client's connection ended (for a client with a session: the session ended).
    Disconnected {
        /// The client that left.
        client: ClientId,
        /// Why.
        reason: DisconnectReason,
    },
    /// A client offers a file (only with [`TransferConfig::save_dir`](crate::transfer::TransferConfig::save_dir)
    /// set, and once the name, size and existing files have been checked): accept or reject
    /// it through the [`FileOffer`](crate::transfer::FileOffer).
    FileOffer {
        /// The sender.
        client: ClientId,
        /// The offer.
        offer: Box<crate::transfer::FileOffer>,
    },
    /// A file from a client was received, verified and put in place.
    FileReceived {
        /// The sender.
        client: ClientId,
        /// The file.
        file: Box<crate::transfer::ReceivedFile>,
    },
    /// An accepted file from a client was not received.
    FileFailed {
        /// The sender.
        client: ClientId,
        /// The file and why.
        failure: Box<crate::transfer::FileFailure>,
    },
}

impl crate::connection::MessageEvent for ServerEvent {
    #[inline]
    fn message_event(client: u64, message: Message) -> Self {
        ServerEvent::Message {
            client: ClientId(client),
            message,
        }
    }
}

impl ServerEvent {
    /// A transfer engine's event, as a server event of `client`.
    pub(super) fn transfer(client: ClientId, event: crate::transfer::TransferEvent) -> Self {
        use crate::transfer::TransferEvent;
        match event {
            TransferEvent::Offer(offer) => ServerEvent::FileOffer {
                client,
                offer: Box::new(offer),
            },
            TransferEvent::Received(file) => ServerEvent::FileReceived {
                client,
                file: Box::new(file),
            },
            TransferEvent::Failed(failure) => ServerEvent::FileFailed {
                client,
                failure: Box::new(failure),
            },
        }
    }
}

/// The stream of [`ServerEvent`]s. It ends (`recv` returns `None`) after a shutdown, once
/// every connection has ended.
///
/// Keep receiving: when the stream is full, connections stop reading from their sockets.
/// Dropping it is allowed; messages are then discarded.
///
/// Events travel from the connections in batches (all that one read produced, up to 256);
/// [`ServerConfig::event_capacity`](super::ServerConfig::event_capacity) counts batches. The order per client is kept.
///
/// A loop that handles floods of small messages, and nothing that waits, can take what is
/// ready with [`try_recv`](Self::try_recv) after each `recv().await`, as `sockframe serve`
/// does: with 64-byte messages that cost about 10 ns less per message than one
/// `recv().await` each (docs/benchmarks.md, *Where #17 stands*). Keep such a loop bounded
/// (`serve` takes at most 256 at a time) so the task still yields to others.
#[derive(Debug)]
pub struct ServerEvents {
    rx: mpsc::Receiver<Batch<ServerEvent>>,
    /// The rest of the batch received last, taken from its own buffer (moving a batch into a
    /// queue first copied every event once more: a fifth of the time of 64-byte messages);
    /// the messages of a run are made into events here, on the application's thread.
    ready: Ready<ServerEvent>,
}

impl ServerEvents {
    /// The stream of the batches that the connections send on `rx`.
    pub(super) fn new(rx: mpsc::Receiver<Batch<ServerEvent>>) -> Self {
        ServerEvents {
            rx,
            ready: Default::default(),
        }
    }

    /// The next event; `None` once the server has shut down and every connection has ended.
    /// Cancel-safe: an event is taken only when the future returns it.
    pub fn recv(&mut self) -> NextEvent<'_> {
        NextEvent { events: self }
    }

    /// [`recv`](Self::recv)'s wait, once the batch received last is used up: the next batch.
    #[inline(never)]
    fn poll_batch(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Option<ServerEvent>> {
        loop {
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(batch)) => self.ready = batch.into_ready(),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
            if let Some(event) = self.ready.next() {
                return Poll::Ready(Some(event));
            }
        }
    }

    /// The next event if one is ready now.
    pub fn try_recv(&mut self) -> Option<ServerEvent> {
        loop {
            if let Some(event) = self.ready.next() {
                return Some(event);
            }
            self.ready = self.rx.try_recv().ok()?.into_ready();
        }
    }
}

/// The future of [`ServerEvents::recv`]: the next event.
///
/// A future of its own rather than an `async fn`: its `poll` is small and inlined into the
/// application's loop, and while the batch received last has events it hands the next one
/// out without the steps of an `async fn`'s state machine, each of which moved the event
/// once more. With 64-byte messages from 16 connections, the README's loop took about 6 %
/// less CPU time per message (medians of 7 alternated runs, docs/benchmarks.md).
#[derive(Debug)]
#[must_use = "futures do nothing unless polled"]
pub struct NextEvent<'a> {
    events: &'a mut ServerEvents,
}

impl Future for NextEvent<'_> {
    type Output = Option<ServerEvent>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Option<ServerEvent>> {
        let events = &mut *self.get_mut().events;
        if let Some(event) = events.ready.next() {
            return Poll::Ready(Some(event));
        }
        events.poll_batch(cx)
    }
}

/// Sends a connection event, waiting while the application catches up, but once a shutdown
/// has begun for at most the drain deadline: an application that stopped reading events must
/// not hold up shutdown forever.
pub(super) async fn emit(
    inner: &Inner,
    events: &mpsc::Sender<Batch<ServerEvent>>,
    event: ServerEvent,
) {
    let give_up = async {
        inner.shutdown.cancelled().await;
        tokio::time::sleep(inner.config.drain_deadline).await;
    };
    tokio::select! {
        _ = events.send(Batch::from(event)) => {}
        _ = give_up => tracing::debug!("event stream full during shutdown; event dropped"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every message travels as an event, moved a few times on its way to the application:
    /// the rare large variants (file transfers) are boxed, and a `Request` is one pointer, so
    /// that a message's event is 48 bytes (a message and its sender), not the 104 it was.
    #[test]
    fn an_event_stays_small() {
        assert!(std::mem::size_of::<ServerEvent>() <= 48);
        assert!(std::mem::size_of::<crate::client::ClientEvent>() <= 40);
    }
}

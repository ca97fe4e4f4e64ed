//! The other servers this one acts as one with: the [`Peers`] a cluster implements.
//!
//! The server knows a cluster only through this trait (`crate::cluster` implements it over
//! Redis and imports the server, never the other way round). Without one
//! ([`ServerConfig::cluster`](super::ServerConfig::cluster) unset, the default), every
//! method below is simply never called: a single node runs nothing extra.

use std::future::Future;
use std::pin::Pin;

use super::{ClientId, ClientInfo, HandedSession, Server, SessionClaim};
use crate::Result;
use crate::message::Message;

/// A boxed future, as trait objects return them.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The rest of a cluster, as one server sees it.
///
/// The server calls [`start`](Self::start) once it listens, tells of each local client
/// that joins or leaves, and hands over what it cannot do alone: a send, a request to a
/// client that is not its own, and the remote half of a broadcast.
pub trait Peers: Send + Sync + std::fmt::Debug + 'static {
    /// This node's name, shown with its clients.
    fn node(&self) -> &str;
    /// The first client id of this node minus one: local ids count up from it, so that the
    /// ids of different nodes never collide (for example the node's number in the high
    /// bits).
    fn id_base(&self) -> u64;
    /// The server is listening: start delivering what other nodes send to its clients.
    fn start(&self, server: Server);
    /// The server is shutting down: stop, and let go of the server handle.
    fn stop(&self);
    /// A client of this node joined.
    fn joined(&self, client: &ClientInfo);
    /// A client of this node left (or its session ended).
    fn left(&self, client: ClientId);
    /// Delivers `msg` to `client`, which is not connected to this node; fails with
    /// [`Error::UnknownClient`](crate::Error::UnknownClient) if no node has it.
    fn send(&self, client: ClientId, msg: Message) -> BoxFuture<'_, Result<()>>;
    /// Sends a request to `client` on another node and returns its answer.
    fn request(&self, client: ClientId, msg: Message) -> BoxFuture<'_, Result<Message>>;
    /// The origin this node's broadcasts are stamped with ([`Stamp::origin`]): the same
    /// number on every node for them.
    fn broadcast_origin(&self) -> u64;
    /// Sends `msg` to the clients of every other node (but `except`), once per node. `seq`
    /// is its number among this node's broadcasts (1, 2, ...: the server numbers them, and
    /// calls this in that order): each node fans it out with
    /// [`Server::broadcast_stamped`], stamped `(broadcast_origin(), seq)`.
    fn broadcast(
        &self,
        msg: Message,
        except: Option<ClientId>,
        seq: u64,
    ) -> BoxFuture<'_, Result<()>>;
    /// The clients of the other nodes, as last heard (no I/O).
    fn remote_clients(&self) -> Vec<ClientInfo>;
    /// A client came back to this node with a session this node does not hold: fetch it
    /// from the node that does, which answers through its [`Server::hand_over`]. Fails
    /// (typically [`Error::UnknownClient`](crate::Error::UnknownClient)) if no node hands
    /// it over; the client is then told its session expired. The claim must reach the
    /// holding node after every broadcast this node had fanned out when it asked (a
    /// broadcast, then the claim, in the order they were sent): the hand-over counts on it
    /// to give the client each broadcast exactly once. The default hands nothing over.
    fn take_session(&self, claim: SessionClaim) -> BoxFuture<'_, Result<HandedSession>> {
        Box::pin(async move { Err(crate::Error::UnknownClient(claim.client())) })
    }
}

/// A broadcast's place in a cluster: the node it was made on and its number among that
/// node's broadcasts. Each node fans the broadcasts of one origin out in this order, and
/// a session handed over between nodes carries, per origin, the last one its client had
/// (see `server::fanout` in the source): each broadcast reaches it exactly once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Stamp {
    /// The node the broadcast was made on ([`Peers::broadcast_origin`]).
    pub origin: u64,
    /// Its number among that node's broadcasts, from 1.
    pub seq: u64,
}

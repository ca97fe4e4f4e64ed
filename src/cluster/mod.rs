//! Several servers acting as one, over Redis (feature `cluster`).
//!
//! ```no_run
//! use sockframe::cluster::{Cluster, ClusterConfig};
//! use sockframe::server::{Server, ServerConfig};
//!
//! # async fn run() -> sockframe::Result<()> {
//! let cluster = Cluster::connect(ClusterConfig::new("redis://127.0.0.1:6379")).await?;
//! let mut config = ServerConfig::default();
//! config.cluster = Some(cluster);
//! let (server, _events) = Server::bind(config).await?;
//! // `server.send(id, msg)` now reaches a client on any node; `broadcast` reaches them all.
//! # Ok(()) }
//! ```
//!
//! A [`Cluster`] implements [`Peers`], the server's view of the other nodes; the server
//! never imports this module. How the pieces meet:
//!
//! - `mod.rs`: [`Cluster`]: joins (a node number from `INCR`), publishes, and waits for the
//!   other nodes' answers.
//! - `wire`: the packets nodes exchange (send, ack, broadcast, request, response), a pure
//!   encoding.
//! - `registry`: this node's clients in a Redis hash with a TTL, kept by a heartbeat, and
//!   the other nodes' clients as last read.
//! - `inbox`: the task that takes what Redis pushes to this node and delivers it to the
//!   local clients through the server's handle; it also hands sessions over
//!   ([`Server::hand_over`]) and passes packets for a client that moved on to its node.
//!
//! A lossless session follows its client to another node: the node it comes back to asks
//! the one that holds it (`Claim`), which answers with the whole session (`Handed`); see
//! `docs/cluster.md` and `server::handover`.
//!
//! Redis: one connection per node (redis-rs's `ConnectionManager`, which reconnects with
//! backoff and, over RESP3, subscribes again after a reconnect), used for commands and for
//! the node's two subscriptions: its own channel and the broadcast channel. Keys and
//! channels (`P` is [`ClusterConfig::prefix`]):
//!
//! | key / channel | what |
//! |---|---|
//! | `P:node-seq` | `INCR`ed by each node that joins: its number, never reused |
//! | `P:clients:N` | hash: client id → JSON of node N's client; expires after the TTL unless refreshed |
//! | `P:to:N` (channel) | packets for node N: sends, requests, their answers |
//! | `P:broadcast` (channel) | broadcasts, one publish each, for every node |
//!
//! A client's id carries its node's number in the high bits ([`NODE_SHIFT`]), so a send
//! knows where to go without asking Redis, and ids never collide. Per-client traffic never
//! crosses Redis unless it is addressed to a client of another node.
//!
//! Chosen crate: `redis` (redis-rs), the most used Redis client for Rust, maintained by the
//! Redis organisation, with a tokio connection manager and RESP3 push messages; `fred` is
//! as capable but heavier, and this needs only publish, subscribe and a few commands.

mod inbox;
mod registry;
mod wire;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::message::Message;
use crate::server::{BoxFuture, ClientId, ClientInfo, HandedSession, Peers, Server, SessionClaim};
use crate::{Error, Result};
use wire::{Failure, Packet};

/// A client id's node number starts at this bit: 2^40 ids per node, 2^24 nodes.
pub const NODE_SHIFT: u32 = 40;

/// How a node joins a cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// The Redis server: `redis://HOST:PORT[/DB]`.
    pub url: String,
    /// This node's name, shown with its clients. Default: `node-N`, N its number.
    pub node: Option<String>,
    /// Prefix of every key and channel, to share one Redis among clusters. Default
    /// `sockframe`.
    pub prefix: String,
    /// How often this node refreshes its registry entry and reads the others'. Default 1 s.
    pub heartbeat: Duration,
    /// How long a node's registry entry outlives its last heartbeat: a dead node's clients
    /// vanish after this. Default 5 s.
    pub ttl: Duration,
    /// How long a send or request to another node waits for that node's answer. Default 5 s.
    pub timeout: Duration,
}

impl ClusterConfig {
    /// The defaults, with Redis at `url`.
    pub fn new(url: impl Into<String>) -> ClusterConfig {
        ClusterConfig {
            url: url.into(),
            node: None,
            prefix: "sockframe".into(),
            heartbeat: Duration::from_secs(1),
            ttl: Duration::from_secs(5),
            timeout: Duration::from_secs(5),
        }
    }
}

/// This node's membership of a cluster: give it to [`ServerConfig::cluster`].
///
/// [`ServerConfig::cluster`]: crate::server::ServerConfig::cluster
#[derive(Debug)]
pub struct Cluster {
    shared: Arc<Shared>,
}

/// What the cluster's handle and its tasks share.
pub(crate) struct Shared {
    pub(crate) config: ClusterConfig,
    pub(crate) name: String,
    pub(crate) number: u64,
    pub(crate) redis: ConnectionManager,
    /// The server, from `start` to `stop`.
    pub(crate) server: Mutex<Option<Server>>,
    /// Sends and requests waiting for the other node's answer, by correlation id.
    pending: Mutex<HashMap<u64, oneshot::Sender<Packet>>>,
    next_corr: AtomicU64,
    pub(crate) registry: registry::Registry,
    /// Whether the last Redis command succeeded (to log an outage once, and its end).
    up: AtomicBool,
    /// Redis commands that failed.
    pub(crate) errors: AtomicU64,
    pub(crate) stop: CancellationToken,
    pub(crate) tasks: TaskTracker,
    /// What to publish, in order, for the publisher task (bounded: callers wait when full).
    publisher: tokio::sync::mpsc::Sender<Publish>,
    /// The publisher's end, until its task starts.
    publishes: Mutex<Option<tokio::sync::mpsc::Receiver<Publish>>>,
    /// The pushes Redis sends this node, until the inbox task starts.
    pushes: Mutex<Option<inbox::Pushes>>,
    /// Clients whose sessions this node handed over, and where to (with when): sends that
    /// reach this node for them are forwarded there until every node's registry says so.
    moved: Mutex<HashMap<ClientId, (u64, Instant)>>,
    /// Clients whose sessions this node is taking over right now (since when): a send for
    /// one is answered "moving, ask again" instead of "unknown".
    claiming: Mutex<HashMap<ClientId, Instant>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.name)
            .field("number", &self.number)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Connects to Redis, takes a node number and subscribes to this node's channels.
    /// Fails if Redis cannot be reached now (later outages are survived).
    pub async fn connect(config: ClusterConfig) -> Result<Arc<Cluster>> {
        let fail = |what: &str, e: redis::RedisError| Error::Cluster(format!("{what}: {e}"));
        // RESP3: subscriptions share the command connection and are renewed after a
        // reconnect (`set_automatic_resubscription`).
        let sep = if config.url.contains('?') { '&' } else { '?' };
        let url = format!("{}{sep}protocol=resp3", config.url);
        let client = redis::Client::open(url.as_str())
            .map_err(|e| fail(&format!("bad Redis URL {}", config.url), e))?;
        let (push_tx, push_rx) = inbox::queue();
        let (publisher, publishes) = tokio::sync::mpsc::channel(PUBLISH_QUEUE);
        let manager_config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_max_delay(Duration::from_secs(2))
            .set_push_sender(push_tx)
            .set_automatic_resubscription();
        let mut redis = ConnectionManager::new_with_config(client, manager_config)
            .await
            .map_err(|e| fail(&format!("cannot reach Redis at {}", config.url), e))?;
        let number: u64 = redis
            .incr(format!("{}:node-seq", config.prefix), 1)
            .await
            .map_err(|e| fail("cannot take a node number", e))?;
        if number >= 1 << (64 - NODE_SHIFT) {
            return Err(Error::Cluster(format!(
                "node number {number} is out of range"
            )));
        }
        redis
            .subscribe(&[
                node_channel(&config.prefix, number),
                broadcast_channel(&config.prefix),
            ])
            .await
            .map_err(|e| fail("cannot subscribe", e))?;
        let name = config
            .node
            .clone()
            .unwrap_or_else(|| format!("node-{number}"));
        tracing::info!(node = %name, number, "joined the cluster");
        let shared = Arc::new(Shared {
            registry: registry::Registry::new(&config.prefix, number),
            config,
            name,
            number,
            redis,
            server: Mutex::new(None),
            pending: Mutex::default(),
            next_corr: AtomicU64::new(0),
            up: AtomicBool::new(true),
            errors: AtomicU64::new(0),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
            pushes: Mutex::new(Some(push_rx)),
            publisher,
            publishes: Mutex::new(Some(publishes)),
            moved: Mutex::default(),
            claiming: Mutex::default(),
        });
        Ok(Arc::new(Cluster { shared }))
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.shared.name
    }

    /// This node's number (the high bits of its clients' ids).
    pub fn node_number(&self) -> u64 {
        self.shared.number
    }

    /// Redis commands that failed since the node joined (outages and timeouts).
    pub fn redis_errors(&self) -> u64 {
        self.shared.errors.load(Ordering::Relaxed)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shared.stop.cancel();
    }
}

/// The node number in a client id.
pub(crate) fn node_of(client: ClientId) -> u64 {
    client.0 >> NODE_SHIFT
}

fn node_channel(prefix: &str, node: u64) -> String {
    format!("{prefix}:to:{node}")
}

fn broadcast_channel(prefix: &str) -> String {
    format!("{prefix}:broadcast")
}

impl Shared {
    /// Notes a Redis command's outcome: logs an outage once when it starts and once when
    /// it ends, and counts failures.
    pub(crate) fn redis_result<T>(&self, result: redis::RedisResult<T>) -> Result<T> {
        match result {
            Ok(v) => {
                if !self.up.swap(true, Ordering::Relaxed) {
                    tracing::info!(node = %self.name, "Redis reachable again");
                }
                Ok(v)
            }
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                if self.up.swap(false, Ordering::Relaxed) {
                    tracing::warn!(node = %self.name, error = %e, "Redis unreachable; serving local clients only");
                }
                Err(Error::Cluster(format!("Redis unreachable: {e}")))
            }
        }
    }

    /// Publishes `packet` on `channel` through the publisher; returns how many nodes heard
    /// it.
    pub(crate) async fn publish(&self, channel: String, packet: &Packet) -> Result<usize> {
        let (tx, rx) = oneshot::channel();
        self.publisher
            .send(Publish {
                channel,
                bytes: packet.encode(),
                heard: Some(tx),
            })
            .await
            .map_err(|_| Error::Cluster("the cluster stopped".into()))?;
        rx.await
            .map_err(|_| Error::Cluster("the cluster stopped".into()))?
    }

    /// Queues `packet` for publishing on `channel` without waiting for Redis's reply (a
    /// broadcast needs no count). Fails at once while Redis is known to be unreachable.
    pub(crate) async fn publish_unconfirmed(&self, channel: String, packet: &Packet) -> Result<()> {
        if !self.up.load(Ordering::Relaxed) {
            return Err(Error::Cluster("Redis unreachable".into()));
        }
        self.publisher
            .send(Publish {
                channel,
                bytes: packet.encode(),
                heard: None,
            })
            .await
            .map_err(|_| Error::Cluster("the cluster stopped".into()))
    }

    /// Sends `make(corr)` to `node` and waits for its answer.
    async fn ask(
        &self,
        node: u64,
        client: ClientId,
        make: impl FnOnce(u64) -> Packet,
    ) -> Result<Packet> {
        let corr = self.next_corr.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(corr, tx);
        // Removes the entry however this ends (answer, timeout, error, cancellation).
        let _forget = Forget { shared: self, corr };
        let heard = self
            .publish(node_channel(&self.config.prefix, node), &make(corr))
            .await?;
        if heard == 0 {
            // No node subscribes to that channel: the node is gone, and its clients too.
            return Err(Error::UnknownClient(client));
        }
        match tokio::time::timeout(self.config.timeout, rx).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(Error::Cluster("the cluster stopped".into())),
            Err(_) => Err(Error::Cluster(format!(
                "node {node} did not answer within {:?}",
                self.config.timeout
            ))),
        }
    }

    /// Sends `make(corr)` to the node that holds `client` and waits for its answer, asking
    /// again (with a short, growing pause) while that node answers that the client is
    /// moving to it, until the timeout.
    async fn ask_holder(&self, client: ClientId, make: impl Fn(u64) -> Packet) -> Result<Packet> {
        let deadline = Instant::now() + self.config.timeout;
        let mut pause = Duration::from_millis(2);
        loop {
            let node = self.route(client);
            if node == self.number || node == 0 {
                return Err(Error::UnknownClient(client));
            }
            let answer = self.ask(node, client, &make).await?;
            let moving = matches!(
                answer,
                Packet::Ack {
                    outcome: Err(Failure::Moving),
                    ..
                } | Packet::Response {
                    outcome: Err(Failure::Moving),
                    ..
                } | Packet::Handed {
                    outcome: Err(Failure::Moving),
                    ..
                }
            );
            if !moving || Instant::now() + pause > deadline {
                return Ok(answer);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// The node to ask for `client`: where this node handed it, else where the registry
    /// lists it away from home, else the node its id names.
    pub(crate) fn route(&self, client: ClientId) -> u64 {
        self.moved_away(client).unwrap_or_else(|| node_of(client))
    }

    /// Where `client` went, if it left the node its id names: where this node handed its
    /// session lately, else where the registry lists it.
    pub(crate) fn moved_away(&self, client: ClientId) -> Option<u64> {
        let handed = lock(&self.moved).get(&client).map(|(node, _)| *node);
        handed.or_else(|| self.registry.moved_to(client))
    }

    /// Notes that `client` moved to `node` (`None`: it did not after all); returns the
    /// entry it replaces. Entries older than a few registry lifetimes are dropped here: by
    /// then every node's registry lists the client where it is.
    pub(crate) fn set_moved(
        &self,
        client: ClientId,
        node: Option<(u64, Instant)>,
    ) -> Option<(u64, Instant)> {
        let mut moved = lock(&self.moved);
        let keep = self.config.ttl * 3 + self.config.heartbeat * 3;
        moved.retain(|_, (_, at)| at.elapsed() < keep);
        match node {
            Some(entry) => moved.insert(client, entry),
            None => moved.remove(&client),
        }
    }

    /// Whether this node is taking `client`'s session over right now.
    pub(crate) fn is_claiming(&self, client: ClientId) -> bool {
        // An entry left by a claim whose registration never came is stale after this.
        let stale = self.config.timeout * 2;
        lock(&self.claiming)
            .get(&client)
            .is_some_and(|since| since.elapsed() < stale)
    }

    /// Hands an answer to the send or request waiting for it (late answers are dropped).
    pub(crate) fn answered(&self, corr: u64, packet: Packet) {
        if let Some(tx) = lock(&self.pending).remove(&corr) {
            let _ = tx.send(packet);
        }
    }

    pub(crate) fn server(&self) -> Option<Server> {
        lock(&self.server).clone()
    }
}

/// Publishes queued at most; a caller waits for room beyond.
const PUBLISH_QUEUE: usize = 1024;
/// Publishes sent in one pipeline at most.
const PUBLISH_BATCH: usize = 256;

/// One publish for the publisher task.
pub(crate) struct Publish {
    channel: String,
    bytes: Vec<u8>,
    /// Where to say how many nodes heard it (or the error), if anyone waits.
    heard: Option<oneshot::Sender<Result<usize>>>,
}

/// Sends the queued publishes in order, as many as are ready in one pipeline: one round
/// trip to Redis for a burst of broadcasts instead of one each.
async fn publisher(shared: Arc<Shared>, mut queue: tokio::sync::mpsc::Receiver<Publish>) {
    let mut batch = Vec::with_capacity(PUBLISH_BATCH);
    loop {
        let n = tokio::select! {
            _ = shared.stop.cancelled() => return,
            n = queue.recv_many(&mut batch, PUBLISH_BATCH) => n,
        };
        if n == 0 {
            return;
        }
        let mut pipe = redis::pipe();
        for p in &batch {
            pipe.publish(&p.channel, &p.bytes);
        }
        let mut redis = shared.redis.clone();
        let result: redis::RedisResult<Vec<usize>> = pipe.query_async(&mut redis).await;
        match shared.redis_result(result) {
            Ok(heard) => {
                for (p, h) in batch.drain(..).zip(heard) {
                    if let Some(tx) = p.heard {
                        let _ = tx.send(Ok(h));
                    }
                }
            }
            Err(e) => {
                let text = e.to_string();
                for p in batch.drain(..) {
                    if let Some(tx) = p.heard {
                        let _ = tx.send(Err(Error::Cluster(
                            text.trim_start_matches("cluster: ").to_string(),
                        )));
                    } else {
                        tracing::warn!(node = %shared.name, channel = %p.channel, "broadcast not published: Redis unreachable");
                    }
                }
            }
        }
    }
}

/// Removes a pending answer's entry on drop.
struct Forget<'a> {
    shared: &'a Shared,
    corr: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        lock(&self.shared.pending).remove(&self.corr);
    }
}

/// A failure from another node as this node's error.
fn failure_error(client: ClientId, failure: Failure) -> Error {
    match failure {
        Failure::Unknown => Error::UnknownClient(client),
        Failure::NotSupported => Error::NotSupported,
        Failure::Remote { code, text } => Error::Remote { code, text },
        Failure::Other(text) => Error::Cluster(text),
        Failure::Moving => Error::Cluster(format!(
            "client {client} is moving between nodes; try again"
        )),
    }
}

impl Peers for Cluster {
    fn node(&self) -> &str {
        &self.shared.name
    }

    fn id_base(&self) -> u64 {
        self.shared.number << NODE_SHIFT
    }

    fn start(&self, server: Server) {
        *lock(&self.shared.server) = Some(server);
        if let Some(pushes) = lock(&self.shared.pushes).take() {
            let shared = self.shared.clone();
            self.shared.tasks.spawn(inbox::run(shared, pushes));
        }
        if let Some(publishes) = lock(&self.shared.publishes).take() {
            let shared = self.shared.clone();
            self.shared.tasks.spawn(publisher(shared, publishes));
        }
        let shared = self.shared.clone();
        self.shared.tasks.spawn(registry::heartbeat(shared));
    }

    fn stop(&self) {
        self.shared.stop.cancel();
        lock(&self.shared.server).take();
    }

    fn joined(&self, client: &ClientInfo) {
        // A session taken over (or a client back home): it is here now.
        lock(&self.shared.claiming).remove(&client.id);
        self.shared.set_moved(client.id, None);
        self.shared.registry.joined(client, &self.shared.name);
    }

    fn left(&self, client: ClientId) {
        self.shared.registry.left(client);
    }

    fn send(&self, client: ClientId, msg: Message) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let from = self.shared.number;
            let answer = self
                .shared
                .ask_holder(client, |corr| Packet::Send {
                    from,
                    corr,
                    client: client.0,
                    msg: msg.clone(),
                })
                .await?;
            match answer {
                Packet::Ack {
                    outcome: Ok(()), ..
                } => Ok(()),
                Packet::Ack {
                    outcome: Err(f), ..
                } => Err(failure_error(client, f)),
                other => Err(Error::Cluster(format!("unexpected answer {other:?}"))),
            }
        })
    }

    fn request(&self, client: ClientId, msg: Message) -> BoxFuture<'_, Result<Message>> {
        Box::pin(async move {
            let from = self.shared.number;
            let answer = self
                .shared
                .ask_holder(client, |corr| Packet::Request {
                    from,
                    corr,
                    client: client.0,
                    msg: msg.clone(),
                })
                .await?;
            match answer {
                Packet::Response { outcome, .. } => outcome.map_err(|f| failure_error(client, f)),
                other => Err(Error::Cluster(format!("unexpected answer {other:?}"))),
            }
        })
    }

    fn broadcast_origin(&self) -> u64 {
        self.shared.number
    }

    fn broadcast(
        &self,
        msg: Message,
        except: Option<ClientId>,
        seq: u64,
    ) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let packet = Packet::Broadcast {
                from: self.shared.number,
                seq,
                except: except.map(|c| c.0),
                msg,
            };
            self.shared
                .publish_unconfirmed(broadcast_channel(&self.shared.config.prefix), &packet)
                .await
        })
    }

    fn remote_clients(&self) -> Vec<ClientInfo> {
        self.shared.registry.remote()
    }

    fn take_session(&self, claim: SessionClaim) -> BoxFuture<'_, Result<HandedSession>> {
        Box::pin(async move {
            let client = claim.client();
            // Until the server registers the client here (`joined`), sends that reach this
            // node for it are told to ask again rather than that it is unknown.
            lock(&self.shared.claiming).insert(client, Instant::now());
            let from = self.shared.number;
            let bytes = claim.to_bytes();
            let answer = self
                .shared
                .ask_holder(client, |corr| Packet::Claim {
                    from,
                    corr,
                    client: client.0,
                    claim: bytes.clone(),
                })
                .await;
            let handed = match answer {
                Ok(Packet::Handed {
                    outcome: Ok(bytes), ..
                }) => HandedSession::from_bytes(bytes),
                Ok(Packet::Handed {
                    outcome: Err(f), ..
                }) => Err(failure_error(client, f)),
                Ok(other) => Err(Error::Cluster(format!("unexpected answer {other:?}"))),
                Err(e) => Err(e),
            };
            if handed.is_err() {
                lock(&self.shared.claiming).remove(&client);
            }
            handed
        })
    }
}

/// Locks a mutex, ignoring poisoning (every critical section is one map operation).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

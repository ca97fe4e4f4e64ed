//! What Redis pushes to this node (its own channel and the broadcast channel), delivered to
//! the local clients through the server's handle.
//!
//! One task takes the pushes in order, so that the messages one node sends to one client
//! arrive in the order sent; a request (which waits for the client's answer) runs in a task
//! of its own. The pushes wait in a bounded queue: Redis's reader must never block, so a
//! push that finds the queue full is dropped and counted, and the node that sent it learns
//! of it as a timeout (a send or request) — an explicit failure, not a silent one — while a
//! dropped broadcast is logged.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use bytes::Bytes;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc;

use super::wire::{Failure, Packet};
use super::{Shared, node_channel};
use std::time::Instant;

use crate::Error;
use crate::server::{ClientId, SessionClaim, Stamp};

/// Bytes of pushes queued at most.
pub(crate) const MAX_QUEUED_BYTES: usize = 32 << 20;

/// The pushes waiting for the inbox task, counted in bytes.
pub(crate) struct Queue {
    tx: mpsc::UnboundedSender<(PushInfo, usize)>,
    bytes: Arc<AtomicUsize>,
    dropped: Arc<AtomicU64>,
}

/// The inbox task's end of the [`Queue`].
pub(crate) struct Pushes {
    rx: mpsc::UnboundedReceiver<(PushInfo, usize)>,
    bytes: Arc<AtomicUsize>,
}

/// A queue of pushes bounded by [`MAX_QUEUED_BYTES`].
pub(crate) fn queue() -> (Queue, Pushes) {
    let (tx, rx) = mpsc::unbounded_channel();
    let bytes = Arc::new(AtomicUsize::new(0));
    (
        Queue {
            tx,
            bytes: bytes.clone(),
            dropped: Arc::default(),
        },
        Pushes { rx, bytes },
    )
}

/// The size a push counts for: its payloads plus a little for the rest.
fn weight(info: &PushInfo) -> usize {
    64 + info
        .data
        .iter()
        .map(|v| match v {
            Value::BulkString(b) => b.len(),
            _ => 16,
        })
        .sum::<usize>()
}

impl redis::aio::AsyncPushSender for Queue {
    fn send(&self, info: PushInfo) -> Result<(), redis::aio::SendError> {
        let weight = weight(&info);
        if self.bytes.fetch_add(weight, Ordering::Relaxed) + weight > MAX_QUEUED_BYTES {
            self.bytes.fetch_sub(weight, Ordering::Relaxed);
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(dropped = n, "cluster inbox full; packets dropped");
            }
            return Ok(());
        }
        self.tx
            .send((info, weight))
            .map_err(|_| redis::aio::SendError)
    }
}

/// Takes pushes until the cluster stops.
pub(crate) async fn run(shared: Arc<Shared>, mut pushes: Pushes) {
    loop {
        let push = tokio::select! {
            _ = shared.stop.cancelled() => return,
            push = pushes.rx.recv() => match push {
                Some((push, weight)) => {
                    pushes.bytes.fetch_sub(weight, Ordering::Relaxed);
                    push
                }
                None => return,
            },
        };
        match push.kind {
            PushKind::Message => {}
            PushKind::Disconnection => {
                tracing::debug!(node = %shared.name, "Redis connection lost; reconnecting");
                continue;
            }
            _ => continue,
        }
        // A message push is [channel, payload].
        let Some(Value::BulkString(payload)) = push.data.into_iter().nth(1) else {
            continue;
        };
        match Packet::decode(Bytes::from(payload)) {
            Ok(packet) => handle(&shared, packet).await,
            Err(e) => tracing::warn!(node = %shared.name, error = %e, "bad cluster packet ignored"),
        }
    }
}

/// How many times a packet may be passed on after a client that moved (a chain of
/// hand-overs faster than the registry); beyond, the client counts as unknown.
const MAX_HOPS: u8 = 4;

async fn handle(shared: &Arc<Shared>, packet: Packet) {
    let Some(server) = shared.server() else {
        return;
    };
    let (packet, hops) = match packet {
        Packet::Forward { hops, packet } => (*packet, hops),
        packet => (packet, 0),
    };
    match packet {
        Packet::Send {
            from,
            corr,
            client,
            msg,
        } => {
            let outcome = match server.send_local(ClientId(client), msg.clone()).await {
                Ok(()) => Ok(()),
                Err(Error::UnknownClient(id)) => {
                    let packet = Packet::Send {
                        from,
                        corr,
                        client,
                        msg,
                    };
                    match elsewhere(shared, id, hops, packet).await {
                        Some(failure) => Err(failure),
                        None => return, // passed on: that node answers
                    }
                }
                Err(e) => Err(failure(e)),
            };
            let ack = Packet::Ack { corr, outcome };
            let _ = shared
                .publish(node_channel(&shared.config.prefix, from), &ack)
                .await;
        }
        Packet::Broadcast {
            from,
            seq,
            except,
            msg,
        } => {
            // Each origin's broadcasts in their order (this task takes them one at a time).
            if from != shared.number {
                let stamp = Stamp { origin: from, seq };
                server
                    .broadcast_stamped(msg, except.map(ClientId), stamp)
                    .await;
            }
        }
        Packet::Request {
            from,
            corr,
            client,
            msg,
        } => {
            let shared = shared.clone();
            shared.tasks.clone().spawn(async move {
                let outcome = match server.request_local(ClientId(client), msg.clone()).await {
                    Err(Error::UnknownClient(id)) => {
                        let packet = Packet::Request {
                            from,
                            corr,
                            client,
                            msg,
                        };
                        match elsewhere(&shared, id, hops, packet).await {
                            Some(failure) => Err(failure),
                            None => return,
                        }
                    }
                    outcome => outcome.map_err(failure),
                };
                let response = Packet::Response { corr, outcome };
                let _ = shared
                    .publish(node_channel(&shared.config.prefix, from), &response)
                    .await;
            });
        }
        Packet::Claim {
            from,
            corr,
            client,
            claim,
        } => {
            // Waits for the session's connection to let go: not in the inbox's own task.
            let shared = shared.clone();
            shared.tasks.clone().spawn(async move {
                let id = ClientId(client);
                let outcome = if server.client(id).is_some() {
                    hand_over(&shared, &server, id, from, claim).await
                } else {
                    let packet = Packet::Claim {
                        from,
                        corr,
                        client,
                        claim,
                    };
                    match elsewhere(&shared, id, hops, packet).await {
                        Some(failure) => Err(failure),
                        None => return,
                    }
                };
                let handed = Packet::Handed { corr, outcome };
                let _ = shared
                    .publish(node_channel(&shared.config.prefix, from), &handed)
                    .await;
            });
        }
        packet @ (Packet::Ack { corr, .. }
        | Packet::Response { corr, .. }
        | Packet::Handed { corr, .. }) => {
            shared.answered(corr, packet);
        }
        // Decoding never nests a forward in a forward.
        Packet::Forward { .. } => {}
    }
}

/// Hands the session of local `client` over to node `to`.
async fn hand_over(
    shared: &Shared,
    server: &crate::server::Server,
    client: ClientId,
    to: u64,
    claim: Bytes,
) -> Result<Bytes, Failure> {
    // Noted before the hand-over starts: a send that finds the client's queue closed
    // meanwhile is passed on to `to`, which answers "moving" until it has the session.
    let before = shared.set_moved(client, Some((to, Instant::now())));
    let outcome = match SessionClaim::from_bytes(claim) {
        // Half the asker's wait: the session must leave while the asker still waits.
        Ok(claim) => server.hand_over(claim, shared.config.timeout / 2).await,
        Err(e) => Err(e),
    };
    match outcome {
        Ok(handed) => Ok(handed.to_bytes()),
        Err(e) => {
            shared.set_moved(client, before);
            Err(failure(e))
        }
    }
}

/// A packet for a client this node does not hold: passed on to the node it moved to
/// (`None`: that node answers the asker), or the failure to answer with.
async fn elsewhere(shared: &Shared, client: ClientId, hops: u8, packet: Packet) -> Option<Failure> {
    if shared.is_claiming(client) {
        return Some(Failure::Moving);
    }
    let to = shared.moved_away(client).filter(|&n| n != shared.number);
    let Some(to) = to else {
        return Some(Failure::Unknown);
    };
    if hops >= MAX_HOPS {
        tracing::warn!(%client, "a packet for a moved client passed on too often; dropped as unknown");
        return Some(Failure::Unknown);
    }
    let forward = Packet::Forward {
        hops: hops + 1,
        packet: Box::new(packet),
    };
    match shared
        .publish(node_channel(&shared.config.prefix, to), &forward)
        .await
    {
        Ok(0) => Some(Failure::Unknown), // that node is gone
        Ok(_) => None,
        Err(e) => Some(Failure::Other(e.to_string())),
    }
}

/// A local error as a failure to report to the asking node.
fn failure(e: Error) -> Failure {
    match e {
        Error::UnknownClient(_) => Failure::Unknown,
        Error::NotSupported => Failure::NotSupported,
        Error::Remote { code, text } => Failure::Remote { code, text },
        e => Failure::Other(e.to_string()),
    }
}

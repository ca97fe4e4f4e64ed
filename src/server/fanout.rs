//! Numbered broadcasts in a cluster, so that a session moving between nodes gets each
//! broadcast exactly once, in order per origin.
//!
//! Every broadcast of a cluster carries a [`Stamp`]: the node it was made on (its origin) and
//! its number among that node's broadcasts. Each node fans the broadcasts of one origin out
//! one at a time, in their order (this node's own ones under [`Fanout::turn`], the others'
//! in the order the cluster delivers them), and notes for each origin the last one whose
//! fan-out is done (its *position*).
//!
//! A fan-out's loop over the clients runs under a read lock (`gate`); the few steps of a
//! hand-over that must not fall in the middle of one take it for writing:
//!
//! - **The new node** (taking a session over) starts a *capture* for the client and notes its
//!   positions, which its claim carries; every fan-out from then on is also kept in the
//!   capture. When the session arrives, it registers the client and, in the same step,
//!   queues what the capture holds past the session's *watermarks*, and skips the client in
//!   later fan-outs up to them (where it is behind the old node).
//! - **The old node** (handing the session over) first makes sure it has fanned out what the
//!   claim's positions name (the other origins' reached it before the claim did; its own it
//!   may still be fanning out), then closes the client's queue and notes, per origin, the last broadcast the client has
//!   had from it: its *watermarks*, which the handed session carries. A broadcast that was
//!   waiting for room in the client's full queue (under [`FullPolicy::Wait`]) and finds it
//!   closed is added to the handed queue, after the rest.
//!
//! So the client has each broadcast up to the watermark from the old node, each after it
//! from the new one, and nothing twice. Nothing here runs, and nothing is kept, on a server
//! without a cluster.
//!
//! [`FullPolicy::Wait`]: crate::FullPolicy::Wait

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::ClientId;
use super::peers::Stamp;
use super::registry::ClientHandle;
use crate::OutboxLimits;
use crate::message::Message;

/// How long a handed-in client is skipped for broadcasts this node has not had yet, at most
/// (a broadcast the old node had and this one never gets: lost on the way to it).
const SKIP_LIFETIME: Duration = Duration::from_secs(60);

/// This node's positions in the broadcasts of every origin, and the hand-overs in progress.
#[derive(Debug)]
pub(super) struct Fanout {
    /// Read by each stamped fan-out's loop; written by the hand-over's steps.
    gate: RwLock<()>,
    state: Mutex<State>,
    /// Signalled when a position moves or a waiting send ends.
    changed: Notify,
    /// This node's own broadcasts, one at a time: the last number given.
    pub(super) turn: tokio::sync::Mutex<u64>,
    /// Bounds a capture: what would not fit the client's queue.
    limits: OutboxLimits,
}

#[derive(Debug, Default)]
struct State {
    /// Per origin, the number of the last broadcast whose loop over the clients is done.
    done: HashMap<u64, u64>,
    /// Sessions being taken over, by client: the broadcasts fanned out meanwhile.
    captures: HashMap<ClientId, Capture>,
    /// Clients handed in whose old node was ahead: per origin, the last broadcast they had.
    skips: HashMap<ClientId, (Instant, HashMap<u64, u64>)>,
    /// Per origin, the broadcast waiting for room in full queues, and whose.
    waiting: HashMap<u64, Waiting>,
    /// Broadcasts a handed-over client's waiting send found closed, for its hand-over.
    missed: HashMap<ClientId, Vec<Message>>,
}

#[derive(Debug, Default)]
struct Capture {
    items: Vec<(Stamp, Message, Option<ClientId>)>,
    bytes: usize,
    /// More than the client's queue holds: the hand-over fails rather than lose them.
    overflow: bool,
}

#[derive(Debug)]
struct Waiting {
    seq: u64,
    clients: Vec<ClientId>,
}

/// A stamped fan-out's loop in progress (it holds the gate open for reading).
pub(super) struct Begun<'a> {
    _gate: RwLockReadGuard<'a, ()>,
    /// Clients that already have this broadcast (handed in from a node that was ahead).
    pub(super) skip: Vec<ClientId>,
}

impl Fanout {
    pub(super) fn new(limits: OutboxLimits) -> Fanout {
        Fanout {
            gate: RwLock::new(()),
            state: Mutex::default(),
            changed: Notify::new(),
            turn: tokio::sync::Mutex::new(0),
            limits,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.gate.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the loop of broadcast `stamp` over the clients: captures it for the sessions
    /// being taken over, and says whom to skip.
    pub(super) fn begin(&self, stamp: Stamp, msg: &Message, except: Option<ClientId>) -> Begun<'_> {
        let gate = self.gate.read().unwrap_or_else(|e| e.into_inner());
        let mut state = self.state();
        for capture in state.captures.values_mut() {
            capture.keep(stamp, msg, except, self.limits);
        }
        let skip = state
            .skips
            .iter()
            .filter(|(_, (_, marks))| marks.get(&stamp.origin).is_some_and(|&m| stamp.seq <= m))
            .map(|(client, _)| *client)
            .collect();
        Begun { _gate: gate, skip }
    }

    /// Ends the loop of `stamp` (`begun`): its origin's position moves to it. `waiting`:
    /// the clients whose queues were full, which the broadcast now waits for.
    pub(super) fn done(
        &self,
        begun: Begun<'_>,
        stamp: Stamp,
        waiting: &[std::sync::Arc<ClientHandle>],
    ) {
        let mut state = self.state();
        let position = state.done.entry(stamp.origin).or_insert(0);
        *position = (*position).max(stamp.seq);
        if !state.skips.is_empty() {
            state.skips.retain(|_, (since, marks)| {
                if marks.get(&stamp.origin).is_some_and(|&m| m <= stamp.seq) {
                    marks.remove(&stamp.origin);
                }
                !marks.is_empty() && since.elapsed() < SKIP_LIFETIME
            });
        }
        if !waiting.is_empty() {
            let clients = waiting.iter().map(|h| h.id).collect();
            state.waiting.insert(
                stamp.origin,
                Waiting {
                    seq: stamp.seq,
                    clients,
                },
            );
        }
        drop(state);
        drop(begun);
        self.changed.notify_waiters();
    }

    /// A waiting send of broadcast `stamp` to `client` ended (`queued` or not).
    pub(super) fn waited(&self, stamp: Stamp, client: &ClientHandle, queued: bool, msg: &Message) {
        let mut state = self.state();
        if let Some(w) = state.waiting.get_mut(&stamp.origin) {
            if w.seq == stamp.seq {
                w.clients.retain(|c| *c != client.id);
                if w.clients.is_empty() {
                    state.waiting.remove(&stamp.origin);
                }
            }
        }
        if !queued && client.handed_over() {
            state.missed.entry(client.id).or_default().push(msg.clone());
        }
        drop(state);
        self.changed.notify_waiters();
    }

    /// This node's positions, and a capture started for `client`, whose session this node
    /// is about to claim.
    pub(super) fn start_capture(&self, client: ClientId) -> Vec<Stamp> {
        let _gate = self.write();
        let mut state = self.state();
        state.captures.insert(client, Capture::default());
        stamps(&state.done)
    }

    /// Drops `client`'s capture (its claim failed).
    pub(super) fn end_capture(&self, client: ClientId) {
        self.state().captures.remove(&client);
    }

    /// The session of `client` arrived with `watermarks`: in one step, with no fan-out in
    /// between, `register` runs with the captured broadcasts the client lacks (oldest
    /// first), and the client is skipped by later fan-outs up to its watermarks.
    pub(super) fn hand_in<T>(
        &self,
        client: ClientId,
        watermarks: &[Stamp],
        register: impl FnOnce(Vec<Message>) -> T,
    ) -> Result<T, &'static str> {
        let _gate = self.write();
        let mut state = self.state();
        let capture = state
            .captures
            .remove(&client)
            .ok_or("no capture for a claimed session")?;
        if capture.overflow {
            return Err("the broadcasts made during the hand-over overflowed the client's queue");
        }
        let mark = |origin: u64| {
            watermarks
                .iter()
                .find(|w| w.origin == origin)
                .map_or(0, |w| w.seq)
        };
        let lacking = capture
            .items
            .into_iter()
            .filter(|(stamp, _, except)| *except != Some(client) && stamp.seq > mark(stamp.origin))
            .map(|(_, msg, _)| msg)
            .collect();
        let behind: HashMap<u64, u64> = watermarks
            .iter()
            .filter(|w| state.done.get(&w.origin).copied().unwrap_or(0) < w.seq)
            .map(|w| (w.origin, w.seq))
            .collect();
        state
            .skips
            .retain(|_, (since, _)| since.elapsed() < SKIP_LIFETIME);
        if behind.is_empty() {
            state.skips.remove(&client);
        } else {
            state.skips.insert(client, (Instant::now(), behind));
        }
        drop(state);
        Ok(register(lacking))
    }

    /// Waits until this node's own broadcasts up to the one `positions` (another node's)
    /// names are fanned out here, at most until `deadline`; whether they are.
    ///
    /// Only its own: a [`Peers`](super::Peers) implementation delivers a claim after the
    /// broadcasts the claiming node had seen when it asked (Redis pushes in the order it
    /// executes publishes), so another origin's that this node will ever fan out are done by
    /// then. Its own it publishes before its local fan-out ends.
    pub(super) async fn settle(
        &self,
        own: u64,
        positions: &[Stamp],
        deadline: tokio::time::Instant,
    ) -> bool {
        let Some(wanted) = positions.iter().find(|p| p.origin == own).map(|p| p.seq) else {
            return true;
        };
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let done = self.state().done.get(&own).copied().unwrap_or(0);
            // No broadcast of this node in progress: one it numbered and never fanned out
            // (its caller gave up) reached none of its clients.
            if done >= wanted || self.turn.try_lock().is_ok() {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return false;
            }
        }
    }

    /// Closes `client`'s queue (`close` does), with no fan-out in progress: returns what
    /// `close` returns, the client's watermarks, and whether a broadcast waits for room in
    /// its queue (then see [`missed`](Self::missed)).
    pub(super) fn close<T>(
        &self,
        client: &ClientHandle,
        close: impl FnOnce() -> T,
    ) -> (T, Vec<Stamp>, bool) {
        let _gate = self.write();
        let closed = close();
        let mut state = self.state();
        state.missed.remove(&client.id);
        let mut marks = state.done.clone();
        if let Some((_, ahead)) = state.skips.get(&client.id) {
            for (&origin, &seq) in ahead {
                let mark = marks.entry(origin).or_insert(0);
                *mark = (*mark).max(seq);
            }
        }
        let waiting = state
            .waiting
            .values()
            .any(|w| w.clients.contains(&client.id));
        (closed, stamps(&marks), waiting)
    }

    /// After [`close`](Self::close) found `client` waited for: waits (until `deadline`) for
    /// those sends to end, and returns the broadcasts they could not queue, in order.
    pub(super) async fn missed(
        &self,
        client: ClientId,
        deadline: tokio::time::Instant,
    ) -> Vec<Message> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let waiting = self
                .state()
                .waiting
                .values()
                .any(|w| w.clients.contains(&client));
            if !waiting {
                break;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                tracing::warn!(%client, "a broadcast waiting for the client's queue did not end in time");
                break;
            }
        }
        self.state().missed.remove(&client).unwrap_or_default()
    }
}

impl Capture {
    fn keep(
        &mut self,
        stamp: Stamp,
        msg: &Message,
        except: Option<ClientId>,
        limits: OutboxLimits,
    ) {
        if self.overflow {
            return;
        }
        self.bytes += msg.len();
        if self.items.len() >= limits.messages || self.bytes > limits.bytes {
            self.overflow = true;
            self.items = Vec::new();
            return;
        }
        self.items.push((stamp, msg.clone(), except));
    }
}

fn stamps(positions: &HashMap<u64, u64>) -> Vec<Stamp> {
    positions
        .iter()
        .map(|(&origin, &seq)| Stamp { origin, seq })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(origin: u64, seq: u64) -> Stamp {
        Stamp { origin, seq }
    }

    /// One stamped fan-out's bookkeeping (no clients): whom it would skip.
    fn fan_out(f: &Fanout, origin: u64, seq: u64) -> Vec<ClientId> {
        let begun = f.begin(
            stamp(origin, seq),
            &Message::text(format!("{origin}:{seq}")),
            None,
        );
        let skip = begun.skip.clone();
        f.done(begun, stamp(origin, seq), &[]);
        skip
    }

    #[test]
    fn a_claimed_session_gets_the_captured_broadcasts_past_its_watermarks_and_skips_the_rest() {
        let f = Fanout::new(OutboxLimits::default());
        let x = ClientId(7);
        fan_out(&f, 1, 1);
        fan_out(&f, 2, 5);
        let mut positions = f.start_capture(x);
        positions.sort_by_key(|s| s.origin);
        assert_eq!(positions, [stamp(1, 1), stamp(2, 5)]);
        // Fanned out while the claim is on its way: 1:2, 1:3, 2:6, and one that skips x.
        fan_out(&f, 1, 2);
        fan_out(&f, 2, 6);
        fan_out(&f, 1, 3);
        let begun = f.begin(stamp(3, 1), &Message::text("3:1"), Some(x));
        f.done(begun, stamp(3, 1), &[]);
        // The old node had given it up to 1:2 and 2:9 (ahead of this node for origin 2).
        let lacking = f
            .hand_in(x, &[stamp(1, 2), stamp(2, 9)], |lacking| lacking)
            .unwrap();
        let texts: Vec<_> = lacking.iter().map(|m| m.as_text().unwrap()).collect();
        assert_eq!(texts, ["1:3"]);
        // Origin 2's broadcasts up to 9 skip it; then nothing does, and no skip is left.
        assert_eq!(fan_out(&f, 2, 7), [x]);
        assert_eq!(fan_out(&f, 1, 4), []);
        assert_eq!(fan_out(&f, 2, 9), [x]);
        assert_eq!(fan_out(&f, 2, 10), []);
        assert!(f.state().skips.is_empty());
        assert!(f.state().captures.is_empty());
    }

    #[test]
    fn a_capture_that_outgrows_the_queue_fails_the_claim() {
        let f = Fanout::new(OutboxLimits {
            messages: 2,
            bytes: 1 << 20,
        });
        let x = ClientId(7);
        f.start_capture(x);
        for seq in 1..=3 {
            fan_out(&f, 1, seq);
        }
        assert!(f.hand_in(x, &[], |_| ()).is_err());
        assert!(f.state().captures.is_empty());
    }

    #[tokio::test]
    async fn the_old_node_waits_for_its_own_broadcast_in_progress() {
        let f = std::sync::Arc::new(Fanout::new(OutboxLimits::default()));
        fan_out(&f, 1, 1);
        let soon = tokio::time::Instant::now() + Duration::from_millis(50);
        // Another origin's position is not waited for (it reached this node first or never).
        assert!(f.settle(1, &[stamp(1, 1), stamp(2, 99)], soon).await);
        // Its own broadcast 2 is numbered (the turn is held) and not fanned out yet.
        let turn = f.turn.lock().await;
        assert!(!f.settle(1, &[stamp(1, 2)], soon).await);
        let waiter = {
            let f = f.clone();
            tokio::spawn(async move {
                let later = tokio::time::Instant::now() + Duration::from_secs(10);
                f.settle(1, &[stamp(1, 2)], later).await
            })
        };
        tokio::task::yield_now().await;
        fan_out(&f, 1, 2);
        drop(turn);
        assert!(waiter.await.unwrap());
    }
}

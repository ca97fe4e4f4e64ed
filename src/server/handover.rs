//! Session hand-over between the nodes of a cluster.
//!
//! A client with a lossless session whose connection drops may come back through a load
//! balancer to another node. That node does not hold the session, so it asks the cluster
//! ([`Peers::take_session`](super::Peers::take_session)) with a [`SessionClaim`]: the
//! session's token and the principal that presents it. The node that holds the session
//! checks both exactly as a local resume does ([`Server::hand_over`]), waits for the old
//! connection to let go, closes the client's queue and takes everything in it, and answers
//! with a [`HandedSession`]: the counters of both directions, the frames sent and not yet
//! acknowledged, the frames queued and not yet sent, and the handler's unwritten replies.
//! It then forgets the client (its application hears `Disconnected` with
//! [`DisconnectReason::HandedOver`]). The new node registers the client under the same
//! id, and the resume goes on as if the session had been parked there: nothing lost,
//! duplicated or reordered.
//!
//! What does not travel, and why:
//! - a flush waiting on the old node ([`Server::flush`]) fails: its confirmation would come
//!   to another node;
//! - a request the old node's application made and is still waiting on fails with
//!   [`Error::Disconnected`]; its frame is still delivered, and the client's answer,
//!   arriving at the new node, is counted there as unmatched;
//! - file transfers in progress with the client stop on the old node, as when a session
//!   expires; the transfer protocol's own resume takes them up again;
//! - a message handler's own state: the new node makes the client a new handler.
//!
//! Both structures are plain bytes for the cluster to carry (this module is the only
//! place that reads them). The session secret travels inside them: the cluster's
//! transport (Redis) must be as trusted as the nodes themselves.

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::park::{self, end_transfers};
use super::peers::Stamp;
use super::registry::Parked;
use super::{ClientId, Server};
use crate::message::Message;
use crate::outgoing::Outgoing;
use crate::protocol::message::{self as wire, Frame, SessionToken};
use crate::{Error, Result};

/// Version byte in front of both encodings (2: with broadcast positions and watermarks).
const FORMAT: u8 = 2;

/// A request to hand a session over: who asks, with what.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionClaim {
    pub(super) token: SessionToken,
    /// The credential the resuming connection presents (hello token or certificate name).
    pub(super) principal: Bytes,
    /// The asking node's broadcast positions when it asked (see `fanout`): the node that
    /// hands the session over has fanned these out first.
    pub(super) positions: Vec<Stamp>,
}

impl std::fmt::Debug for SessionClaim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Neither the secret nor the principal: both are credentials.
        write!(f, "SessionClaim({})", self.client())
    }
}

impl SessionClaim {
    /// The client whose session is claimed (the id it keeps on its new node).
    pub fn client(&self) -> ClientId {
        ClientId(self.token.id)
    }

    /// The claim as bytes, for a cluster to carry.
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(
            1 + SessionToken::LEN + 4 + 16 * self.positions.len() + self.principal.len(),
        );
        b.put_u8(FORMAT);
        self.token.put(&mut b);
        put_stamps(&mut b, &self.positions);
        b.put_slice(&self.principal);
        b.freeze()
    }

    /// A claim from [`to_bytes`](Self::to_bytes)'s output.
    pub fn from_bytes(mut b: Bytes) -> Result<SessionClaim> {
        if b.len() < 1 + SessionToken::LEN || b.get_u8() != FORMAT {
            return Err(bad("session claim"));
        }
        let token =
            SessionToken::from_bytes(&b.split_to(SessionToken::LEN)[..].try_into().expect("24"));
        let positions = get_stamps(&mut b).ok_or_else(|| bad("session claim"))?;
        Ok(SessionClaim {
            token,
            principal: b,
            positions,
        })
    }
}

/// A session on its way from the node that held it to the node its client came back to.
pub struct HandedSession {
    pub(super) token: SessionToken,
    pub(super) principal: Bytes,
    pub(super) name: String,
    /// Application frames received from the client in the whole session.
    pub(super) received: u64,
    /// Application frames sent to the client, and how many it acknowledged.
    pub(super) sent: u64,
    pub(super) acked: u64,
    /// Frames `acked + 1 ..= sent`, oldest first.
    pub(super) retained: Vec<Outgoing>,
    /// Frames queued and not yet sent, oldest first.
    pub(super) queued: Vec<Outgoing>,
    /// The handler's replies not yet written.
    pub(super) replies: Vec<Message>,
    /// Per origin of broadcasts, the last one the client has had (see `fanout`).
    pub(super) watermarks: Vec<Stamp>,
}

impl std::fmt::Debug for HandedSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandedSession")
            .field("client", &self.token.id)
            .field("received", &self.received)
            .field("sent", &self.sent)
            .field("acked", &self.acked)
            .field("queued", &self.queued.len())
            .field("replies", &self.replies.len())
            .finish_non_exhaustive()
    }
}

impl HandedSession {
    /// The client the session belongs to.
    pub fn client(&self) -> ClientId {
        ClientId(self.token.id)
    }

    /// The session as bytes: a header of counts, then every frame as the sockframe
    /// protocol writes it, each behind a `u32` length.
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(FORMAT);
        self.token.put(&mut b);
        put_chunk(&mut b, &self.principal);
        put_chunk(&mut b, self.name.as_bytes());
        for n in [self.received, self.sent, self.acked] {
            b.put_u64_le(n);
        }
        let queued: Vec<Bytes> = self.queued.iter().filter_map(encode).collect();
        for list in [self.retained.iter().filter_map(encode).collect(), queued] {
            b.put_u32_le(list.len() as u32);
            for frame in list {
                put_chunk(&mut b, &frame);
            }
        }
        b.put_u32_le(self.replies.len() as u32);
        for reply in &self.replies {
            put_chunk(
                &mut b,
                &encode(&Outgoing::Message(reply.clone())).expect("a message"),
            );
        }
        put_stamps(&mut b, &self.watermarks);
        b.freeze()
    }

    /// A session from [`to_bytes`](Self::to_bytes)'s output; an error if the bytes are
    /// not one (they come from another process).
    pub fn from_bytes(mut b: Bytes) -> Result<HandedSession> {
        let r = &mut b;
        if r.len() < 1 + SessionToken::LEN || r.get_u8() != FORMAT {
            return Err(bad("handed session"));
        }
        let token =
            SessionToken::from_bytes(&r.split_to(SessionToken::LEN)[..].try_into().expect("24"));
        let principal = chunk(r)?;
        let name = String::from_utf8(chunk(r)?.to_vec()).map_err(|_| bad("client name"))?;
        if r.len() < 24 {
            return Err(bad("handed session counters"));
        }
        let (received, sent, acked) = (r.get_u64_le(), r.get_u64_le(), r.get_u64_le());
        let retained = frames(r)?;
        let queued = frames(r)?;
        let replies = frames(r)?
            .into_iter()
            .map(|f| match f {
                Outgoing::Message(m) => Ok(m),
                _ => Err(bad("handler reply")),
            })
            .collect::<Result<_>>()?;
        let watermarks = get_stamps(r).ok_or_else(|| bad("handed session"))?;
        if sent.checked_sub(acked) != Some(retained.len() as u64) {
            return Err(bad("handed session counters"));
        }
        Ok(HandedSession {
            token,
            principal,
            name,
            received,
            sent,
            acked,
            retained,
            queued,
            replies,
            watermarks,
        })
    }
}

/// A list of stamps: a `u32` count, then each as two `u64`s.
fn put_stamps(b: &mut BytesMut, stamps: &[Stamp]) {
    b.put_u32_le(stamps.len() as u32);
    for s in stamps {
        b.put_u64_le(s.origin);
        b.put_u64_le(s.seq);
    }
}

fn get_stamps(b: &mut Bytes) -> Option<Vec<Stamp>> {
    if b.len() < 4 {
        return None;
    }
    let n = b.get_u32_le() as usize;
    if b.len() / 16 < n {
        return None;
    }
    Some(
        (0..n)
            .map(|_| Stamp {
                origin: b.get_u64_le(),
                seq: b.get_u64_le(),
            })
            .collect(),
    )
}

fn bad(what: &str) -> Error {
    Error::Cluster(format!("malformed {what} from another node"))
}

fn put_chunk(b: &mut BytesMut, bytes: &[u8]) {
    b.put_u32_le(bytes.len() as u32);
    b.put_slice(bytes);
}

fn chunk(b: &mut Bytes) -> Result<Bytes> {
    if b.len() < 4 {
        return Err(bad("handed session"));
    }
    let n = b.get_u32_le() as usize;
    if b.len() < n {
        return Err(bad("handed session"));
    }
    Ok(b.split_to(n))
}

/// A list of frames: a `u32` count, then each frame.
fn frames(b: &mut Bytes) -> Result<Vec<Outgoing>> {
    if b.len() < 4 {
        return Err(bad("handed session"));
    }
    let n = b.get_u32_le() as usize;
    // Each frame takes 4 bytes at least: a count beyond that is a lie, not a reservation.
    let mut out = Vec::with_capacity(n.min(b.len() / 4));
    for _ in 0..n {
        out.push(decode(chunk(b)?)?);
    }
    Ok(out)
}

/// A frame as the sockframe protocol writes it; `None` for a flush (not a frame).
fn encode(item: &Outgoing) -> Option<Bytes> {
    let frame = match item {
        Outgoing::Message(m) => Frame::Message {
            kind: m.wire_kind(),
            body: m.payload().clone(),
        },
        Outgoing::Request { id, message } => Frame::Request {
            id: *id,
            kind: message.wire_kind(),
            body: message.payload().clone(),
        },
        Outgoing::Response { id, result } => Frame::Response {
            id: *id,
            result: result
                .as_ref()
                .map(|m| (m.wire_kind(), m.payload().clone()))
                .map_err(Clone::clone),
        },
        Outgoing::Transfer(t) => Frame::Transfer(t.clone()),
        Outgoing::Flush(_) => return None,
    };
    Some(wire::encode(&frame))
}

fn decode(bytes: Bytes) -> Result<Outgoing> {
    Ok(
        match wire::parse(&bytes).map_err(|_| bad("frame in a handed session"))? {
            Frame::Message { kind, body } => Outgoing::Message(Message::from_wire(kind, body)),
            Frame::Request { id, kind, body } => Outgoing::Request {
                id,
                message: Message::from_wire(kind, body),
            },
            Frame::Response { id, result } => Outgoing::Response {
                id,
                result: result.map(|(kind, body)| Message::from_wire(kind, body)),
            },
            Frame::Transfer(t) => Outgoing::Transfer(t),
            _ => return Err(bad("frame in a handed session")),
        },
    )
}

impl Server {
    /// Hands the session that `claim` names over to another node of the cluster, and
    /// forgets the client here: what a [`Peers`](super::Peers) implementation calls when
    /// another node asks for a session this node holds (see the module docs of
    /// `server::handover` in the source for what travels and what does not).
    ///
    /// Fails with [`Error::UnknownClient`] if this node has no such session or the token
    /// or principal does not match (logged here, never told apart to the asker), and with
    /// [`Error::Timeout`] if the session's connection does not let go `within` (at most the
    /// handshake timeout): the asker must still be waiting when the session leaves, or it
    /// would be lost on the way, so give it less than the asker's own timeout.
    pub async fn hand_over(&self, claim: SessionClaim, within: Duration) -> Result<HandedSession> {
        let inner = &self.inner;
        let client = claim.client();
        let unknown = || Error::UnknownClient(client);
        let handle = inner.registry.get(client).ok_or_else(unknown)?;
        let key = handle.session.as_ref().ok_or_else(unknown)?;
        if !key.admits(&claim.token, &claim.principal) {
            tracing::warn!(%client, "hand-over asked with a wrong token or by another principal");
            return Err(unknown());
        }
        let within = within.min(inner.config.handshake_timeout);
        let deadline = tokio::time::Instant::now() + within;
        // The broadcasts the asker had fanned out when it asked are fanned out here first
        // (they reached this node before the claim did; this node's own may be in the
        // middle of their fan-out), so that the client has each from one node or the other.
        let own = inner.config.cluster.as_ref().map(|p| p.broadcast_origin());
        let settled = match own {
            Some(own) => inner.fanout.settle(own, &claim.positions, deadline).await,
            None => true,
        };
        if !settled {
            tracing::warn!(%client, "hand-over: this node's broadcast did not end in time");
            return Err(Error::Timeout(within));
        }
        let Parked {
            mut session,
            mut outbox,
            registration,
            handler,
            replies,
        } = park::take_parked_within(
            &handle,
            deadline.saturating_duration_since(tokio::time::Instant::now()),
        )
        .await
        .map_err(|_| Error::Timeout(within))?;
        // The old node's watch over the parked session reports the departure.
        handle.mark_handed_over();
        handle.wake_watches();
        // Closed first, then emptied: a send that races this fails (and a cluster forwards
        // it to the new node) instead of landing in a queue nobody reads. With no broadcast
        // in the middle of its fan-out: the watermarks say what the client has had.
        let (queued, watermarks, waited) = inner.fanout.close(&handle, || outbox.close_and_drain());
        let mut queued: Vec<Outgoing> = queued.into();
        if waited {
            // A broadcast was waiting for room in the full queue: it goes last.
            let missed = inner.fanout.missed(client, deadline).await;
            queued.extend(missed.into_iter().map(Outgoing::Message));
        }
        let retained = session.retained.take_frames();
        let mut unwritten = Vec::new();
        while let Some(reply) = replies.pop() {
            unwritten.push(reply);
        }
        handle.pending.fail_all();
        end_transfers(inner, client);
        drop(handler);
        let handed = HandedSession {
            token: session.token,
            principal: key.principal.clone(),
            name: handle.name.clone(),
            received: session.received,
            sent: session.retained.sent,
            acked: session.retained.acked,
            retained,
            queued,
            replies: unwritten,
            watermarks,
        };
        tracing::info!(%client, sent = handed.sent, acked = handed.acked, queued = handed.queued.len(), "session handed over to another node");
        // Unregisters the client here; the cluster hears it left.
        drop(registration);
        Ok(handed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handed_session_round_trips_and_garbage_is_an_error() {
        let token = SessionToken::new(7 << 40 | 3, [9; 16]);
        let handed = HandedSession {
            token,
            principal: Bytes::from_static(b"who"),
            name: "n".into(),
            received: 10,
            sent: 5,
            acked: 3,
            retained: vec![
                Outgoing::Message(Message::text("a")),
                Outgoing::Request {
                    id: 4,
                    message: Message::binary(vec![1u8, 2]),
                },
            ],
            queued: vec![Outgoing::Response {
                id: 2,
                result: Err((3, "no".into())),
            }],
            replies: vec![Message::text("r")],
            watermarks: vec![Stamp { origin: 2, seq: 9 }, Stamp { origin: 5, seq: 1 }],
        };
        let back = HandedSession::from_bytes(handed.to_bytes()).unwrap();
        assert!(back.token.matches(&token));
        assert_eq!((back.received, back.sent, back.acked), (10, 5, 3));
        assert_eq!(back.principal, handed.principal);
        assert_eq!(
            format!("{:?}", back.retained),
            format!("{:?}", handed.retained)
        );
        assert_eq!(format!("{:?}", back.queued), format!("{:?}", handed.queued));
        assert_eq!(back.replies, handed.replies);
        assert_eq!(back.watermarks, handed.watermarks);
        let bytes = handed.to_bytes();
        for n in 0..bytes.len() {
            assert!(HandedSession::from_bytes(bytes.slice(..n)).is_err(), "{n}");
        }
        let claim = SessionClaim {
            token,
            principal: Bytes::from_static(b"p"),
            positions: vec![Stamp { origin: 1, seq: 40 }],
        };
        assert_eq!(SessionClaim::from_bytes(claim.to_bytes()).unwrap(), claim);
        assert!(SessionClaim::from_bytes(Bytes::from_static(b"\x01short")).is_err());
        assert!(!format!("{claim:?}").contains('p'));
    }
}

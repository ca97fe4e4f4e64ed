//! What `sockframe bench` puts on the wire and how it reads what comes back, for both
//! framings: frames are built into the caller's buffer and parsed in place in the read
//! buffer, so the generator does no allocation and no copy per message.
//!
//! The typed frames of the sockframe protocol come from the library's pure functions
//! (`Head` for the fixed fields, `encode_hello`, `encode`, `parse`); only the two hot frame
//! types (messages and responses) are read here by their fixed offsets, and every other
//! frame goes through `parse`.

use anyhow::{Result, bail};
use bytes::{Buf, Bytes, BytesMut};
use sockframe::protocol::message::{
    self, Frame, Head, Hello, Kind, SessionGrant, SessionRequest, frame_type,
};

use crate::peer::Protocol;

/// How many bytes a request's or response's fixed fields take (type, id, status, kind):
/// the largest head a body gets in front of it.
const MAX_HEAD: usize = 11;

/// One incoming frame, as the load loops see it.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A message (tutorial frame, or typed text or binary message) with a body this long.
    Message(usize),
    /// A successful response to request `id` with a body this long.
    Response {
        /// The request's correlation id.
        id: u64,
        /// Body length.
        len: usize,
    },
    /// A ping, to be answered with a pong of the same nonce.
    Ping(u64),
    /// In a session: the server has received this many of our application frames.
    Ack(u64),
    /// In a session: the server asks for an `ACK` of what we have received.
    AckRequest,
    /// Anything else that needs no answer (a pong, an extension frame).
    Ignored,
}

/// The framing a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wire {
    /// Tutorial framing, or the sockframe protocol.
    pub protocol: Protocol,
    /// Whether connections ask for a lossless session (sockframe protocol only) and
    /// acknowledge what they receive.
    pub session: bool,
}

impl Wire {
    /// Appends one message frame with a body of `body.len()` bytes: a tutorial frame, or a
    /// typed binary message.
    pub fn put_message(self, out: &mut Vec<u8>, body: &[u8]) {
        match self.protocol {
            Protocol::Tutorial => {
                out.extend_from_slice(&(body.len() as u32).to_le_bytes());
            }
            Protocol::Sockframe => {
                let head = Head::message(Kind::Binary);
                let head = head.as_slice();
                out.extend_from_slice(&((head.len() + body.len()) as u32).to_le_bytes());
                out.extend_from_slice(head);
            }
        }
        out.extend_from_slice(body);
    }

    /// Appends a request frame (sockframe protocol only) with correlation id `id`.
    pub fn put_request(self, out: &mut Vec<u8>, id: u64, body: &[u8]) {
        let head = Head::request(id, Kind::Binary);
        let head = head.as_slice();
        out.extend_from_slice(&((head.len() + body.len()) as u32).to_le_bytes());
        out.extend_from_slice(head);
        out.extend_from_slice(body);
    }

    /// Bytes a message frame with a `size`-byte body takes on the wire.
    pub fn message_len(self, size: usize) -> usize {
        match self.protocol {
            Protocol::Tutorial => 4 + size,
            Protocol::Sockframe => 4 + Head::message(Kind::Binary).as_slice().len() + size,
        }
    }

    /// Removes every complete frame at the start of `buf` and calls `each` with it and, for a
    /// message or a response, its body (empty for other frames); returns how many frames
    /// were taken. Reserves room for a partly received frame.
    pub fn take_frames(
        self,
        buf: &mut BytesMut,
        mut each: impl FnMut(Incoming, &[u8]) -> Result<()>,
    ) -> Result<u64> {
        let mut n = 0;
        let mut at = 0;
        while let Some(header) = buf[at..].first_chunk::<4>() {
            let len = u32::from_le_bytes(*header) as usize;
            // Not a frame of either framing (the top bit is a negative length to the
            // tutorial): refuse it rather than reserve gigabytes for it.
            if len > i32::MAX as usize {
                bail!(
                    "the server sent a frame length of {len}: is it speaking this framing (and TLS only with --tls)?"
                );
            }
            let Some(payload) = buf.get(at + 4..at + 4 + len) else {
                break;
            };
            let incoming = match self.protocol {
                Protocol::Tutorial => Incoming::Message(len),
                Protocol::Sockframe => typed(payload)?,
            };
            let body = match incoming {
                Incoming::Message(len) | Incoming::Response { len, .. } => {
                    &payload[payload.len() - len..]
                }
                _ => &[],
            };
            each(incoming, body)?;
            at += 4 + len;
            n += 1;
        }
        buf.advance(at);
        if let Some(header) = buf.first_chunk::<4>() {
            let want = 4 + u32::from_le_bytes(*header) as usize;
            buf.reserve(want.saturating_sub(buf.len()));
        }
        Ok(n)
    }

    /// Appends a pong answering `nonce`.
    pub fn put_pong(self, out: &mut Vec<u8>, nonce: u64) {
        put_frame(out, &message::encode(&Frame::Pong(nonce)));
    }
}

/// Appends `ACK count`. Built by hand (13 bytes, no allocation): it goes out with most
/// writes of a session; `acks_match_the_library` checks it against `message::encode`.
pub fn put_ack(out: &mut Vec<u8>, count: u64) {
    out.extend_from_slice(&9u32.to_le_bytes());
    out.push(frame_type::ACK);
    out.extend_from_slice(&count.to_le_bytes());
}

/// The acknowledging side of a lossless session, for a load loop: counts the application
/// frames received (messages and responses), and says when an `ACK` is due. Without a
/// session it counts nothing and never asks for an `ACK`.
#[derive(Debug, Default)]
pub struct Acks {
    /// Whether the connection is in a session.
    on: bool,
    /// Application frames received in the session.
    received: u64,
    /// The count last sent in an `ACK`.
    sent: u64,
    /// The server asked for an `ACK` (`ACK_REQUEST`) that is not sent yet.
    requested: bool,
    /// The highest count the server has acknowledged (they never go backwards).
    peer_acked: u64,
}

impl Acks {
    /// Acknowledgements for a connection in a session (`on`), or none.
    pub fn new(on: bool) -> Self {
        Acks {
            on,
            ..Acks::default()
        }
    }

    /// Takes one incoming frame into account: counts messages and responses, remembers an
    /// `ACK_REQUEST`, and checks the server's `ACK`s (cumulative: never backwards). Returns
    /// whether the frame was a session frame, which needs nothing more.
    #[inline]
    pub fn see(&mut self, incoming: &Incoming) -> Result<bool> {
        match *incoming {
            Incoming::Message(_) | Incoming::Response { .. } => {
                self.received += 1;
                Ok(false)
            }
            Incoming::AckRequest if self.on => {
                self.requested = true;
                Ok(true)
            }
            Incoming::Ack(n) if self.on => {
                if n < self.peer_acked {
                    bail!(
                        "the server's acknowledgement went backwards ({n} after {})",
                        self.peer_acked
                    );
                }
                self.peer_acked = n;
                Ok(true)
            }
            Incoming::Ack(_) | Incoming::AckRequest => {
                bail!("the server sent a session frame outside a session")
            }
            _ => Ok(false),
        }
    }

    /// Appends an `ACK` when one is due: asked for, or (`piggy_back`: something else goes
    /// out in the same write) when the count moved since the last one.
    #[inline]
    pub fn put_due(&mut self, out: &mut Vec<u8>, piggy_back: bool) {
        if self.on && (self.requested || (piggy_back && self.received != self.sent)) {
            put_ack(out, self.received);
            self.sent = self.received;
            self.requested = false;
        }
    }

    /// Whether the server asked for an `ACK` since the last call (for a writer elsewhere
    /// to send it).
    pub fn take_requested(&mut self) -> bool {
        std::mem::take(&mut self.requested)
    }

    /// The highest count of our frames the server has acknowledged.
    pub fn peer_acked(&self) -> u64 {
        self.peer_acked
    }

    /// Application frames received so far.
    pub fn received(&self) -> u64 {
        self.received
    }
}

/// Appends `payload` as one tutorial frame.
pub fn put_frame(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Reads a typed frame: messages and responses by their fixed offsets (the hot path), the
/// rest with the library's parser.
fn typed(payload: &[u8]) -> Result<Incoming> {
    match payload {
        [frame_type::BINARY | frame_type::TEXT, body @ ..] => Ok(Incoming::Message(body.len())),
        // Session frames come often (every 64 frames, on request): no parser, no copy.
        [frame_type::ACK, count @ ..] if count.len() == 8 => Ok(Incoming::Ack(u64::from_le_bytes(
            count.try_into().expect("8 bytes"),
        ))),
        [frame_type::ACK_REQUEST] => Ok(Incoming::AckRequest),
        // A successful response: id u64, status 0, body kind, body. (Errors go to `parse`.)
        [frame_type::RESPONSE, rest @ ..] if rest.len() >= MAX_HEAD - 1 && rest[8] == 0 => {
            Ok(Incoming::Response {
                id: u64::from_le_bytes(rest[..8].try_into().expect("8 bytes")),
                len: rest.len() - (MAX_HEAD - 1),
            })
        }
        _ => match message::parse(&Bytes::copy_from_slice(payload))? {
            Frame::Ping(nonce) => Ok(Incoming::Ping(nonce)),
            Frame::Pong(_) | Frame::Unknown(_) => Ok(Incoming::Ignored),
            Frame::Close { code, text } => {
                bail!("the server closed the connection (code {code}): {text}")
            }
            Frame::Response {
                id,
                result: Err((code, text)),
            } => bail!("request {id} failed (code {code}): {text}; is the server echoing?"),
            other => bail!("unexpected frame from the server: {other:?}"),
        },
    }
}

/// The hello this generator opens a sockframe connection with, asking for a new lossless
/// session if `session`.
pub fn hello(token: Option<&str>, session: bool) -> Result<Vec<u8>> {
    let mut hello = Hello::new(
        "sockframe-bench",
        token
            .map(|t| Bytes::copy_from_slice(t.as_bytes()))
            .unwrap_or_default(),
    );
    if session {
        hello.session = SessionRequest::New;
    }
    hello.check()?;
    let mut out = Vec::new();
    put_frame(&mut out, &message::encode_hello(&hello));
    Ok(out)
}

/// Takes the server's answer to the hello from the start of `buf`: `Ok(None)` while it is
/// incomplete, the welcome's heartbeat interval (ms) once accepted, an error when rejected
/// or when a session was asked for (`session`) and not granted.
pub fn take_welcome(buf: &mut BytesMut, session: bool) -> Result<Option<u32>> {
    let Some(header) = buf.first_chunk::<4>() else {
        return Ok(None);
    };
    let len = u32::from_le_bytes(*header) as usize;
    if len > message::MAX_HELLO {
        bail!(
            "the server's answer to the hello is {len} bytes: is it speaking the sockframe protocol?"
        );
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    buf.advance(4);
    let payload = buf.split_to(len).freeze();
    match message::parse(&payload) {
        Ok(Frame::Welcome(w)) => match w.session {
            SessionGrant::New(_) => Ok(Some(w.heartbeat_ms)),
            // Not granted: the server has sessions off (`serve --session-grace 0s`).
            SessionGrant::None if session => {
                bail!("the server granted no session (are sessions off on the server?)")
            }
            SessionGrant::None => Ok(Some(w.heartbeat_ms)),
            SessionGrant::Resumed { .. } => bail!("the server resumed a session never asked for"),
        },
        Ok(Frame::Reject { code, text }) => bail!("the server rejected the hello: {code}: {text}"),
        Ok(other) => bail!("expected a welcome, got {other:?}"),
        Err(e) => bail!(
            "the server's answer to the hello is no welcome ({e}): is it speaking the sockframe protocol?"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SF: Wire = Wire {
        protocol: Protocol::Sockframe,
        session: false,
    };
    const TUT: Wire = Wire {
        protocol: Protocol::Tutorial,
        session: false,
    };

    fn take(wire: Wire, buf: &mut BytesMut) -> Vec<Incoming> {
        let mut got = Vec::new();
        wire.take_frames(buf, |i, body| {
            if let Incoming::Message(len) | Incoming::Response { len, .. } = i {
                assert_eq!(body.len(), len);
            }
            got.push(i);
            Ok(())
        })
        .unwrap();
        got
    }

    #[test]
    fn tutorial_frames_are_taken_in_place() {
        let mut out = Vec::new();
        TUT.put_message(&mut out, b"abc");
        TUT.put_message(&mut out, b"");
        assert_eq!(&out[..7], b"\x03\x00\x00\x00abc");
        assert_eq!(out.len(), TUT.message_len(3) + TUT.message_len(0));
        let mut buf = BytesMut::from(&out[..]);
        buf.extend_from_slice(&out[..6]);
        assert_eq!(
            take(TUT, &mut buf),
            [Incoming::Message(3), Incoming::Message(0)]
        );
        assert_eq!(buf.len(), 6);
        assert!(buf.capacity() >= 7);
    }

    #[test]
    fn typed_frames_match_the_library() {
        let mut out = Vec::new();
        SF.put_message(&mut out, b"hi");
        assert_eq!(out.len(), SF.message_len(2));
        assert_eq!(
            message::parse(&Bytes::copy_from_slice(&out[4..])).unwrap(),
            Frame::Message {
                kind: Kind::Binary,
                body: Bytes::from_static(b"hi")
            }
        );
        let mut req = Vec::new();
        SF.put_request(&mut req, 7, b"xyz");
        assert_eq!(
            message::parse(&Bytes::copy_from_slice(&req[4..])).unwrap(),
            Frame::Request {
                id: 7,
                kind: Kind::Binary,
                body: Bytes::from_static(b"xyz")
            }
        );
    }

    #[test]
    fn responses_pings_and_closes() {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for frame in [
            Frame::Response {
                id: 9,
                result: Ok((Kind::Binary, Bytes::from_static(b"abcd"))),
            },
            Frame::Response {
                id: 10,
                result: Ok((Kind::Text, Bytes::new())),
            },
            Frame::Ping(5),
            Frame::Pong(5),
            Frame::Unknown(0x90),
        ] {
            put_frame(&mut out, &message::encode(&frame));
        }
        SF.put_message(&mut out, b"m");
        buf.extend_from_slice(&out);
        assert_eq!(
            take(SF, &mut buf),
            [
                Incoming::Response { id: 9, len: 4 },
                Incoming::Response { id: 10, len: 0 },
                Incoming::Ping(5),
                Incoming::Ignored,
                Incoming::Ignored,
                Incoming::Message(1),
            ]
        );
        let mut pong = Vec::new();
        SF.put_pong(&mut pong, 5);
        assert_eq!(
            message::parse(&Bytes::copy_from_slice(&pong[4..])).unwrap(),
            Frame::Pong(5)
        );

        let mut close = Vec::new();
        put_frame(
            &mut close,
            &message::encode(&Frame::Close {
                code: 5,
                text: "bye".into(),
            }),
        );
        let mut buf = BytesMut::from(&close[..]);
        let err = SF.take_frames(&mut buf, |_, _| Ok(())).unwrap_err();
        assert!(err.to_string().contains("bye"), "{err}");

        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 0][..]);
        assert!(TUT.take_frames(&mut buf, |_, _| Ok(())).is_err());
    }

    #[test]
    fn handshake_answers() {
        let hello = hello(Some("t0k"), false).unwrap();
        assert!(message::is_hello(&hello[4..]));
        assert_eq!(
            message::parse_hello(&hello[4..]).unwrap().token,
            Bytes::from_static(b"t0k")
        );
        let mut welcome = Vec::new();
        put_frame(
            &mut welcome,
            &message::encode(&Frame::Welcome(message::Welcome {
                version: 1,
                client_id: 1,
                max_frame: 1 << 20,
                heartbeat_ms: 5000,
                session: message::SessionGrant::None,
            })),
        );
        let mut buf = BytesMut::from(&welcome[..welcome.len() - 1]);
        assert_eq!(take_welcome(&mut buf, false).unwrap(), None);
        buf.extend_from_slice(&welcome[welcome.len() - 1..]);
        buf.extend_from_slice(b"rest");
        assert_eq!(take_welcome(&mut buf, false).unwrap(), Some(5000));
        assert_eq!(&buf[..], b"rest");
        // Asked for a session, granted none.
        let err = take_welcome(&mut BytesMut::from(&welcome[..]), true).unwrap_err();
        assert!(err.to_string().contains("no session"), "{err}");

        let mut reject = Vec::new();
        put_frame(
            &mut reject,
            &message::encode(&Frame::Reject {
                code: message::RejectCode::Unauthorized,
                text: "no".into(),
            }),
        );
        let err = take_welcome(&mut BytesMut::from(&reject[..]), false).unwrap_err();
        assert!(err.to_string().contains("unauthorized"), "{err}");
    }

    #[test]
    fn sessions_ask_and_are_granted() {
        let hello = hello(None, true).unwrap();
        assert_eq!(
            message::parse_hello(&hello[4..]).unwrap().session,
            SessionRequest::New
        );
        let mut welcome = Vec::new();
        put_frame(
            &mut welcome,
            &message::encode(&Frame::Welcome(message::Welcome {
                version: 1,
                client_id: 7,
                max_frame: 1 << 20,
                heartbeat_ms: 5000,
                session: SessionGrant::New(message::SessionToken::new(7, [1; 16])),
            })),
        );
        let mut buf = BytesMut::from(&welcome[..]);
        assert_eq!(take_welcome(&mut buf, true).unwrap(), Some(5000));
    }

    #[test]
    fn acks_match_the_library() {
        let mut out = Vec::new();
        put_ack(&mut out, 258);
        let mut lib = Vec::new();
        put_frame(&mut lib, &message::encode(&Frame::Ack(258)));
        assert_eq!(out, lib);

        let mut buf = BytesMut::new();
        put_frame(&mut out, &message::encode(&Frame::AckRequest));
        SF.put_message(&mut out, b"m");
        buf.extend_from_slice(&out);
        assert_eq!(
            take(SF, &mut buf),
            [
                Incoming::Ack(258),
                Incoming::AckRequest,
                Incoming::Message(1)
            ]
        );
    }

    #[test]
    fn acks_count_answer_and_piggy_back() {
        let mut acks = Acks::new(true);
        let mut out = Vec::new();
        assert!(!acks.see(&Incoming::Message(3)).unwrap());
        assert!(!acks.see(&Incoming::Response { id: 1, len: 0 }).unwrap());
        assert!(!acks.see(&Incoming::Ping(1)).unwrap());
        assert_eq!(acks.received(), 2);
        // Nothing asked and nothing else going out: no ACK.
        acks.put_due(&mut out, false);
        assert!(out.is_empty());
        // With a write going out anyway, the moved count rides along once.
        acks.put_due(&mut out, true);
        acks.put_due(&mut out, true);
        let mut want = Vec::new();
        put_ack(&mut want, 2);
        assert_eq!(out, want);
        // Asked for: sent even when the count did not move.
        assert!(acks.see(&Incoming::AckRequest).unwrap());
        acks.put_due(&mut out, false);
        assert_eq!(out.len(), 2 * want.len());
        // The server's ACKs are checked.
        assert!(acks.see(&Incoming::Ack(5)).unwrap());
        assert_eq!(acks.peer_acked(), 5);
        assert!(acks.see(&Incoming::Ack(4)).is_err());
        // Outside a session, session frames are errors and nothing is ever due.
        let mut none = Acks::new(false);
        assert!(none.see(&Incoming::AckRequest).is_err());
        none.see(&Incoming::Message(1)).unwrap();
        none.put_due(&mut out, true);
        assert_eq!(out.len(), 2 * want.len());
    }
}

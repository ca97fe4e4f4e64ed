//! The server's side of a connection as a state machine over the pure protocol functions,
//! with no I/O: the bytes a peer sends (hellos, typed frames, arbitrary payloads and broken
//! framing, in any order, cut into arbitrary reads) go through `TutorialCodec` with the
//! limits the server applies at each stage, and each frame is handled as the server handles
//! it: the first one is classified (`is_hello`), parsed (`parse_hello`), negotiated
//! (`negotiate`) and authorized; later ones are parsed (`parse`) and dispatched.
//!
//! Checks: no panic; a connection is established only by a hello that parses, negotiates
//! the one version and carries a listed token (when tokens are required); every frame the
//! server writes in answer (welcome, reject, pong, close) parses back to itself on the
//! client's side; every message or request handed to the application is exactly the bytes
//! that arrived (head + body, as the zero-copy writer would send them again); a tutorial
//! connection hands over every frame unchanged.
#![no_main]

use arbitrary::Arbitrary;
use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use sockframe::codec::TutorialCodec;
use sockframe::protocol::message::{
    self as wire, Frame, Head, Hello, Kind, MAX_HELLO, RejectCode, VERSION, Welcome, close_code,
};
use tokio_util::codec::Decoder;

/// Room typed frames have beyond `max_frame` for their heads (the server's `HEAD_ROOM`).
const HEAD_ROOM: usize = 16;

#[derive(Arbitrary, Debug)]
struct Session {
    mode: ModeSel,
    /// Tokens the server requires (none: everyone is admitted).
    tokens: Vec<Vec<u8>>,
    /// The server's body limit (small, so "too large" is reachable).
    max_frame: u16,
    /// Sizes of the successive reads (cycled); 0 stands for 1.
    cuts: Vec<u8>,
    steps: Vec<Step>,
}

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq)]
enum ModeSel {
    Auto,
    Sockframe,
    Tutorial,
}

#[derive(Arbitrary, Debug)]
enum Step {
    /// A hello, well-formed or not (versions may be anything, `extra` is appended).
    Hello {
        min: u16,
        max: u16,
        name: String,
        token: Vec<u8>,
        extra: Vec<u8>,
    },
    /// A typed frame encoded by our encoder.
    Frame(ArbFrame),
    /// An arbitrary payload in a well-formed tutorial frame.
    Payload(Vec<u8>),
    /// Bytes outside any frame: breaks the framing.
    Wire(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum ArbFrame {
    Welcome(u16, u64, u32, u32),
    Reject(u16, String),
    Text(String),
    Binary(Vec<u8>),
    Request(u64, Body),
    ResponseOk(u64, Body),
    ResponseErr(u64, u16, String),
    Ping(u64),
    Pong(u64),
    Close(u16, String),
    Type(u8, Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Body {
    Text(String),
    Binary(Vec<u8>),
}

impl Body {
    fn into_parts(self) -> (Kind, Bytes) {
        match self {
            Body::Text(s) => (Kind::Text, Bytes::from(s)),
            Body::Binary(b) => (Kind::Binary, Bytes::from(b)),
        }
    }
}

impl ArbFrame {
    fn payload(self) -> Bytes {
        let frame = match self {
            ArbFrame::Welcome(version, client_id, max_frame, heartbeat_ms) => {
                Frame::Welcome(Welcome {
                    version,
                    client_id,
                    max_frame,
                    heartbeat_ms,
                })
            }
            ArbFrame::Reject(code, text) => Frame::Reject {
                code: RejectCode::from_u16(code),
                text,
            },
            ArbFrame::Text(s) => Frame::Message {
                kind: Kind::Text,
                body: Bytes::from(s),
            },
            ArbFrame::Binary(b) => Frame::Message {
                kind: Kind::Binary,
                body: Bytes::from(b),
            },
            ArbFrame::Request(id, body) => {
                let (kind, body) = body.into_parts();
                Frame::Request { id, kind, body }
            }
            ArbFrame::ResponseOk(id, body) => Frame::Response {
                id,
                result: Ok(body.into_parts()),
            },
            ArbFrame::ResponseErr(id, code, text) => Frame::Response {
                id,
                result: Err((code, text)),
            },
            ArbFrame::Ping(n) => Frame::Ping(n),
            ArbFrame::Pong(n) => Frame::Pong(n),
            ArbFrame::Close(code, text) => Frame::Close { code, text },
            ArbFrame::Type(t, rest) => {
                let mut b = vec![t];
                b.extend_from_slice(&rest);
                return Bytes::from(b);
            }
        };
        let wire = wire::encode(&frame);
        // Our own encoder's output always parses back (the property the parser target
        // checks from the other side).
        assert_eq!(wire::parse(&wire).as_ref(), Ok(&frame));
        wire
    }
}

/// Where the connection stands.
#[derive(Debug, PartialEq)]
enum State {
    /// Waiting for the first frame.
    Detect,
    /// The tutorial framing: every frame is a message.
    Tutorial,
    /// The sockframe protocol, after the welcome.
    Established,
    /// Ended (rejected, protocol error, close frame, end of stream).
    Ended,
}

/// Checks that a frame the server writes parses back to itself on the client's side.
fn written(frame: Frame) {
    let wire = wire::encode(&frame);
    assert_eq!(wire::parse(&wire), Ok(frame));
}

fuzz_target!(|session: Session| {
    // The wire the peer sends.
    let mut bytes = Vec::new();
    for step in session.steps {
        let payload = match step {
            Step::Hello {
                min,
                max,
                name,
                token,
                extra,
            } => {
                let hello = Hello {
                    min_version: min,
                    max_version: max,
                    name,
                    token: Bytes::from(token),
                };
                if hello.check().is_err() {
                    continue; // the client refuses to send it
                }
                let mut b = wire::encode_hello(&hello).to_vec();
                b.extend_from_slice(&extra);
                b
            }
            Step::Frame(f) => f.payload().to_vec(),
            Step::Payload(p) => p,
            Step::Wire(w) => {
                bytes.extend_from_slice(&w);
                continue;
            }
        };
        bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&payload);
    }
    if bytes.len() > 256 * 1024 {
        return;
    }

    let tokens: Vec<Bytes> = session.tokens.into_iter().map(Bytes::from).collect();
    let max_body = session.max_frame as usize;
    // `Auto` becomes `Sockframe` when tokens are required (ServerConfig::effective_protocol).
    let mode = match session.mode {
        ModeSel::Auto if !tokens.is_empty() => ModeSel::Sockframe,
        m => m,
    };
    let mut codec = TutorialCodec::with_max_frame(match mode {
        // Before the handshake only a hello may arrive, and it is small.
        ModeSel::Sockframe => MAX_HELLO,
        _ => max_body,
    });
    let mut state = match mode {
        ModeSel::Tutorial => State::Tutorial,
        _ => State::Detect,
    };

    let mut buf = BytesMut::new();
    let mut fed = 0;
    let mut cut = 0;
    let mut delivered = 0usize;
    while state != State::Ended {
        let frame = match codec.decode(&mut buf) {
            Ok(Some(frame)) => frame,
            Ok(None) if fed < bytes.len() => {
                let step = session.cuts.get(cut % session.cuts.len().max(1)).copied();
                let step = (step.unwrap_or(0) as usize).max(1).min(bytes.len() - fed);
                cut += 1;
                buf.extend_from_slice(&bytes[fed..fed + step]);
                fed += step;
                continue;
            }
            Ok(None) => match codec.decode_eof(&mut buf) {
                Ok(Some(frame)) => frame,
                // End of stream: a clean close, or a truncated frame (a protocol error).
                Ok(None) | Err(_) => break,
            },
            Err(e) => {
                // A framing error: protocol error; the sockframe side says so in a CLOSE.
                if state == State::Established {
                    written(Frame::Close {
                        code: close_code::PROTOCOL_ERROR,
                        text: format!("protocol error: {e}"),
                    });
                }
                break;
            }
        };
        match state {
            State::Detect => {
                if mode == ModeSel::Auto && !wire::is_hello(&frame) {
                    // A tutorial client; this frame is its first message.
                    state = State::Tutorial;
                    delivered += frame.len();
                    continue;
                }
                let hello = match wire::parse_hello(&frame) {
                    Ok(hello) => hello,
                    Err(e) => {
                        written(Frame::Reject {
                            code: RejectCode::BadHello,
                            text: e.to_string(),
                        });
                        state = State::Ended;
                        continue;
                    }
                };
                let Some(version) = wire::negotiate(&hello) else {
                    assert!(hello.min_version > VERSION || hello.max_version < VERSION);
                    written(Frame::Reject {
                        code: RejectCode::UnsupportedVersion,
                        text: "unsupported version".into(),
                    });
                    state = State::Ended;
                    continue;
                };
                assert_eq!(version, VERSION);
                assert!(hello.min_version <= VERSION && VERSION <= hello.max_version);
                if !tokens.is_empty() && !tokens.contains(&hello.token) {
                    written(Frame::Reject {
                        code: RejectCode::Unauthorized,
                        text: "unauthorized".into(),
                    });
                    state = State::Ended;
                    continue;
                }
                // Established: the welcome parses back on the client's side.
                written(Frame::Welcome(Welcome {
                    version,
                    client_id: 1,
                    max_frame: max_body as u32,
                    heartbeat_ms: 5000,
                }));
                codec = TutorialCodec::with_max_frame(max_body + HEAD_ROOM);
                state = State::Established;
            }
            State::Tutorial => delivered += frame.len(),
            State::Established => {
                let parsed = match wire::parse(&frame) {
                    Ok(parsed) => parsed,
                    Err(e) => {
                        let _ = e.to_string();
                        state = State::Ended;
                        continue;
                    }
                };
                // Bodies are bounded by max_frame; the frame limit only leaves room for heads.
                let head = match &parsed {
                    Frame::Message { kind, body } => Some((Head::message(*kind), body)),
                    Frame::Request { id, kind, body } => Some((Head::request(*id, *kind), body)),
                    Frame::Response {
                        id,
                        result: Ok((kind, body)),
                    } => Some((Head::response_ok(*id, *kind), body)),
                    _ => None,
                };
                if let Some((head, body)) = head {
                    if body.len() > max_body {
                        state = State::Ended;
                        continue;
                    }
                    // What is handed over is exactly what arrived.
                    let mut again = head.as_slice().to_vec();
                    again.extend_from_slice(body);
                    assert_eq!(&again[..], &frame[..]);
                    delivered += body.len();
                }
                match parsed {
                    Frame::Ping(nonce) => written(Frame::Pong(nonce)),
                    Frame::Close { .. } | Frame::Welcome(_) | Frame::Reject { .. } => {
                        state = State::Ended
                    }
                    _ => {}
                }
            }
            State::Ended => unreachable!(),
        }
    }
    assert!(delivered <= bytes.len());
});

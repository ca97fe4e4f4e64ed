//! The sockframe protocol: typed frames carried inside tutorial frames.
//!
//! Every frame of our protocol is one tutorial frame (`[u32 LE length][payload]`) whose
//! payload starts with a one-byte type. The connection opens with a [`Hello`] (which starts
//! with an 8-byte magic instead of a type byte), answered by a `Welcome` or a `Reject`.
//!
//! ```text
//! tutorial frame:  [len u32 LE][ type u8 | type-specific fields | body ]
//! ```
//!
//! All integers are little-endian, like the tutorial's length. Strings are UTF-8 with a
//! `u16` length in front, except where a field runs to the end of the frame. The full table
//! of types, with hex vectors, is in `docs/protocol.md`; the tests below pin those vectors.

use bytes::{BufMut, Bytes, BytesMut};
use std::fmt;

pub use super::token::SessionToken;

/// The first eight bytes of a hello: `89 53 46 52 4d 0d 0a 1a` (`\x89SFRM\r\n\x1a`).
///
/// Like PNG's signature, the first byte is not ASCII and cannot start a UTF-8 string, so no
/// tutorial *text* message is ever mistaken for a hello; a binary tutorial message is
/// mistaken only if its first eight bytes are exactly these (1 in 2^64 for random data) and
/// the rest parses as a hello.
pub const MAGIC: [u8; 8] = *b"\x89SFRM\r\n\x1a";

/// The protocol version this implementation speaks.
pub const VERSION: u16 = 1;

/// Largest hello accepted, in bytes: before the handshake a peer may send nothing bigger.
pub const MAX_HELLO: usize = 4096;

/// Frame type bytes. Types `0x80..=0xff` are extensions a receiver that does not know them
/// must skip; an unknown type below `0x80` is a protocol error.
pub mod frame_type {
    /// Server → client: the handshake succeeded.
    pub const WELCOME: u8 = 0x01;
    /// Server → client: the handshake failed; the connection closes.
    pub const REJECT: u8 = 0x02;
    /// An application message whose body is UTF-8 text.
    pub const TEXT: u8 = 0x10;
    /// An application message whose body is bytes.
    pub const BINARY: u8 = 0x11;
    /// A request: correlation id, body kind, body.
    pub const REQUEST: u8 = 0x12;
    /// A response to a request.
    pub const RESPONSE: u8 = 0x13;
    /// Liveness probe; answered by `PONG` with the same nonce.
    pub const PING: u8 = 0x14;
    /// Answer to `PING`.
    pub const PONG: u8 = 0x15;
    /// Orderly close with a code and a reason.
    pub const CLOSE: u8 = 0x16;
    /// Session acknowledgement: how many application frames of the peer have been received
    /// (cumulative, for the whole session).
    pub const ACK: u8 = 0x20;
    /// Session: "send me an `ACK` now" (a sender that waits for confirmation, or whose window
    /// of unacknowledged frames is filling up).
    pub const ACK_REQUEST: u8 = 0x21;
    /// First type reserved for further session frames (up to `0x2f`).
    pub const RESERVED_SESSION: u8 = 0x22;
    /// First type reserved for file transfer (offers, chunks, digests).
    pub const RESERVED_TRANSFER: u8 = 0x30;
    /// Types from here on may be ignored by receivers that do not know them.
    pub const FIRST_IGNORABLE: u8 = 0x80;
}

/// Whether a message body is text or bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// UTF-8 text (checked on receipt).
    Text,
    /// Arbitrary bytes.
    Binary,
}

impl Kind {
    fn to_byte(self) -> u8 {
        match self {
            Kind::Text => 0,
            Kind::Binary => 1,
        }
    }

    fn from_byte(b: u8) -> Result<Self, ParseError> {
        match b {
            0 => Ok(Kind::Text),
            1 => Ok(Kind::Binary),
            other => Err(ParseError::BadField("body kind", other as u64)),
        }
    }
}

/// Why a handshake was refused (in a `Reject`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RejectCode {
    /// No protocol version in common.
    UnsupportedVersion,
    /// Missing or wrong token.
    Unauthorized,
    /// The server is at its connection limit.
    ServerFull,
    /// The hello could not be parsed.
    BadHello,
    /// The hello asked to resume a session the server does not have: it expired, it never
    /// existed, or the token belongs to someone else. Connect again without resuming.
    SessionUnknown,
    /// A code this version does not know.
    Other(u16),
}

impl RejectCode {
    /// The code on the wire.
    pub fn to_u16(self) -> u16 {
        match self {
            RejectCode::UnsupportedVersion => 1,
            RejectCode::Unauthorized => 2,
            RejectCode::ServerFull => 3,
            RejectCode::BadHello => 4,
            RejectCode::SessionUnknown => 5,
            RejectCode::Other(c) => c,
        }
    }

    /// The code from the wire.
    pub fn from_u16(c: u16) -> Self {
        match c {
            1 => RejectCode::UnsupportedVersion,
            2 => RejectCode::Unauthorized,
            3 => RejectCode::ServerFull,
            4 => RejectCode::BadHello,
            5 => RejectCode::SessionUnknown,
            c => RejectCode::Other(c),
        }
    }
}

impl fmt::Display for RejectCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RejectCode::UnsupportedVersion => f.write_str("unsupported version"),
            RejectCode::Unauthorized => f.write_str("unauthorized"),
            RejectCode::ServerFull => f.write_str("server full"),
            RejectCode::BadHello => f.write_str("bad hello"),
            RejectCode::SessionUnknown => f.write_str("session expired or unknown"),
            RejectCode::Other(c) => write!(f, "rejected (code {c})"),
        }
    }
}

/// Close codes (in a `CLOSE` frame).
pub mod close_code {
    /// Normal close by the application.
    pub const NORMAL: u16 = 0;
    /// The peer broke the protocol.
    pub const PROTOCOL_ERROR: u16 = 1;
    /// The peer stopped answering pings.
    pub const HEARTBEAT_TIMEOUT: u16 = 2;
    /// No application message for the idle timeout.
    pub const IDLE_TIMEOUT: u16 = 3;
    /// The server application disconnected the client.
    pub const KICKED: u16 = 4;
    /// The server is shutting down.
    pub const SHUTDOWN: u16 = 5;
    /// The peer did not read fast enough.
    pub const SLOW_CONSUMER: u16 = 6;
    /// The peer sent faster than its rate limit allows.
    pub const RATE_LIMITED: u16 = 7;
}

/// Error codes of an error response.
pub mod error_code {
    /// The application did not answer the request.
    pub const UNHANDLED: u16 = 1;
    /// The application answered with an error.
    pub const APPLICATION: u16 = 2;
    /// The peer does not accept requests.
    pub const NOT_SUPPORTED: u16 = 3;
    /// The connection ended or the server shut down before an answer.
    pub const UNAVAILABLE: u16 = 4;
}

/// The client's opening frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Lowest protocol version the client speaks.
    pub min_version: u16,
    /// Highest protocol version the client speaks.
    pub max_version: u16,
    /// Optional client name (UTF-8, at most 255 bytes), shown in the server's registry.
    pub name: String,
    /// Optional credential; empty when none.
    pub token: Bytes,
    /// Whether the client wants a lossless session, a new one or one to resume. Encoded
    /// after the token; a hello that ends at the token asks for none.
    pub session: SessionRequest,
}

/// What a hello asks for about sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionRequest {
    /// No session: frames are not numbered or acknowledged (wire byte 0, or absent).
    None,
    /// A new session (wire byte 1).
    New,
    /// Resume a session (wire byte 2), after which come the token and how many application
    /// frames of the server the client has received in the session.
    Resume {
        /// The token the welcome gave.
        token: SessionToken,
        /// Application frames received from the server, in the whole session.
        received: u64,
    },
}

/// What a welcome grants about sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionGrant {
    /// No session (wire byte 0, or absent).
    None,
    /// A new session (wire byte 1) with this token; counting starts at 0 both ways.
    New(SessionToken),
    /// The session the hello named was resumed (wire byte 2); the server has received
    /// `received` application frames of the client, and the client resends what follows.
    Resumed {
        /// The session's token (unchanged).
        token: SessionToken,
        /// Application frames received from the client, in the whole session.
        received: u64,
    },
}

/// The server's positive answer to a hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// Negotiated version.
    pub version: u16,
    /// The id the server assigned to this client.
    pub client_id: u64,
    /// Largest frame payload the server accepts.
    pub max_frame: u32,
    /// The server's ping interval in milliseconds (0: none).
    pub heartbeat_ms: u32,
    /// The session granted, if any. Encoded after the heartbeat interval; a welcome that
    /// ends there grants none.
    pub session: SessionGrant,
}

/// A parsed frame of the sockframe protocol (after the hello).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Handshake accepted.
    Welcome(Welcome),
    /// Handshake refused.
    Reject {
        /// Why.
        code: RejectCode,
        /// Human-readable detail.
        text: String,
    },
    /// An application message.
    Message {
        /// Text or binary.
        kind: Kind,
        /// The body (for `Text`, valid UTF-8).
        body: Bytes,
    },
    /// A request.
    Request {
        /// Correlation id chosen by the requester.
        id: u64,
        /// Text or binary.
        kind: Kind,
        /// The body.
        body: Bytes,
    },
    /// A response.
    Response {
        /// The request's correlation id.
        id: u64,
        /// The answer, or an error code and text.
        result: Result<(Kind, Bytes), (u16, String)>,
    },
    /// Liveness probe.
    Ping(u64),
    /// Answer to a ping.
    Pong(u64),
    /// Orderly close.
    Close {
        /// A [`close_code`].
        code: u16,
        /// Detail.
        text: String,
    },
    /// Session acknowledgement: application frames received so far in the session.
    Ack(u64),
    /// Session: asks the peer for an `ACK` now.
    AckRequest,
    /// An ignorable frame type (`>= 0x80`) this version does not know.
    Unknown(u8),
    /// A file transfer frame (types `0x30..=0x3f`, see [`super::transfer`]).
    Transfer(super::transfer::TransferFrame),
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ParseError {
    /// The frame is shorter than its fields.
    Short(&'static str),
    /// An empty frame (no type byte).
    Empty,
    /// A type below `0x80` that this version does not define.
    UnknownType(u8),
    /// A field has a value this version does not allow.
    BadField(&'static str, u64),
    /// Text that is not UTF-8.
    NotUtf8(&'static str),
    /// A hello without the magic.
    NoMagic,
    /// A hello larger than [`MAX_HELLO`].
    HelloTooLarge(usize),
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::Short(what) => write!(f, "frame too short for its {what}"),
            ParseError::Empty => f.write_str("empty frame (no type byte)"),
            ParseError::UnknownType(t) => {
                write!(
                    f,
                    "unknown frame type 0x{t:02x} for protocol version {VERSION}"
                )
            }
            ParseError::BadField(what, v) => write!(f, "invalid {what}: {v}"),
            ParseError::NotUtf8(what) => write!(f, "{what} is not valid UTF-8"),
            ParseError::NoMagic => f.write_str("hello does not start with the sockframe magic"),
            ParseError::HelloTooLarge(n) => {
                write!(f, "hello of {n} bytes exceeds the limit of {MAX_HELLO}")
            }
        }
    }
}

impl std::error::Error for ParseError {}

/// Whether a first frame is a hello (starts with [`MAGIC`]).
pub fn is_hello(payload: &[u8]) -> bool {
    payload.starts_with(&MAGIC)
}

/// A cursor over a frame's bytes; every read checks the length first. (Shared with the
/// file transfer frames.)
pub(super) struct Reader<'a> {
    buf: &'a [u8],
    /// The next byte to read.
    pub(super) pos: usize,
}

impl<'a> Reader<'a> {
    pub(super) fn new(buf: &'a [u8], pos: usize) -> Self {
        Reader { buf, pos }
    }
    pub(super) fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ParseError> {
        let end = self.pos.checked_add(n).ok_or(ParseError::Short(what))?;
        let s = self.buf.get(self.pos..end).ok_or(ParseError::Short(what))?;
        self.pos = end;
        Ok(s)
    }
    pub(super) fn u8(&mut self, what: &'static str) -> Result<u8, ParseError> {
        Ok(self.take(1, what)?[0])
    }
    pub(super) fn u16(&mut self, what: &'static str) -> Result<u16, ParseError> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().unwrap()))
    }
    pub(super) fn u32(&mut self, what: &'static str) -> Result<u32, ParseError> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    pub(super) fn u64(&mut self, what: &'static str) -> Result<u64, ParseError> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    pub(super) fn rest_str(&mut self, what: &'static str) -> Result<String, ParseError> {
        let raw = &self.buf[self.pos..];
        self.pos = self.buf.len();
        String::from_utf8(raw.to_vec()).map_err(|_| ParseError::NotUtf8(what))
    }
}

/// Parses a hello (the first frame of a sockframe connection).
pub fn parse_hello(payload: &[u8]) -> Result<Hello, ParseError> {
    if payload.len() > MAX_HELLO {
        return Err(ParseError::HelloTooLarge(payload.len()));
    }
    if !is_hello(payload) {
        return Err(ParseError::NoMagic);
    }
    let mut r = Reader {
        buf: payload,
        pos: MAGIC.len(),
    };
    let min_version = r.u16("minimum version")?;
    let max_version = r.u16("maximum version")?;
    if min_version > max_version || min_version == 0 {
        return Err(ParseError::BadField("version range", min_version as u64));
    }
    let name_len = r.u8("name")? as usize;
    let name = String::from_utf8(r.take(name_len, "name")?.to_vec())
        .map_err(|_| ParseError::NotUtf8("name"))?;
    let token_len = r.u16("token")? as usize;
    let token = Bytes::copy_from_slice(r.take(token_len, "token")?);
    // Fields appended to the first version's hello are optional: older clients end here.
    let session = if r.pos == payload.len() {
        SessionRequest::None
    } else {
        match r.u8("session request")? {
            0 => SessionRequest::None,
            1 => SessionRequest::New,
            2 => SessionRequest::Resume {
                token: SessionToken::read(&mut r)?,
                received: r.u64("frames received")?,
            },
            other => return Err(ParseError::BadField("session request", other as u64)),
        }
    };
    // Later versions may append fields; this one ignores what follows.
    Ok(Hello {
        min_version,
        max_version,
        name,
        token,
        session,
    })
}

/// Encodes a hello. Names longer than 255 bytes are cut at a character boundary; tokens
/// longer than 1,024 bytes are an error of the caller (checked by [`Hello::check`]).
pub fn encode_hello(hello: &Hello) -> Bytes {
    let mut name = hello.name.as_str();
    while name.len() > 255 {
        let mut cut = 255.min(name.len() - 1);
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        name = &name[..cut];
    }
    let mut b = BytesMut::with_capacity(MAGIC.len() + 7 + name.len() + hello.token.len());
    b.put_slice(&MAGIC);
    b.put_u16_le(hello.min_version);
    b.put_u16_le(hello.max_version);
    b.put_u8(name.len() as u8);
    b.put_slice(name.as_bytes());
    b.put_u16_le(hello.token.len() as u16);
    b.put_slice(&hello.token);
    match hello.session {
        // Omitted rather than 0: the hello stays byte-for-byte the first version's.
        SessionRequest::None => {}
        SessionRequest::New => b.put_u8(1),
        SessionRequest::Resume { token, received } => {
            b.put_u8(2);
            token.put(&mut b);
            b.put_u64_le(received);
        }
    }
    b.freeze()
}

/// Longest token a hello can carry.
pub const MAX_TOKEN: usize = 1024;

impl Hello {
    /// A version-1 hello with a name and a token.
    pub fn new(name: impl Into<String>, token: impl Into<Bytes>) -> Self {
        Hello {
            min_version: VERSION,
            max_version: VERSION,
            name: name.into(),
            token: token.into(),
            session: SessionRequest::None,
        }
    }

    /// Checks the limits that [`encode_hello`] cannot represent.
    pub fn check(&self) -> Result<(), ParseError> {
        if self.token.len() > MAX_TOKEN {
            return Err(ParseError::BadField(
                "token length",
                self.token.len() as u64,
            ));
        }
        Ok(())
    }
}

/// Picks the version to speak with a client: the highest both sides support.
pub fn negotiate(hello: &Hello) -> Option<u16> {
    (hello.min_version <= VERSION && VERSION <= hello.max_version).then_some(VERSION)
}

/// Parses one frame of an established connection.
///
/// Bodies are returned as slices of `payload` (no copy). Text bodies are checked to be
/// UTF-8.
pub fn parse(payload: &Bytes) -> Result<Frame, ParseError> {
    use frame_type::*;
    let Some(&ty) = payload.first() else {
        return Err(ParseError::Empty);
    };
    let mut r = Reader {
        buf: payload,
        pos: 1,
    };
    let frame = match ty {
        WELCOME => Frame::Welcome(Welcome {
            version: r.u16("version")?,
            client_id: r.u64("client id")?,
            max_frame: r.u32("max frame")?,
            heartbeat_ms: r.u32("heartbeat interval")?,
            session: if r.pos == payload.len() {
                SessionGrant::None
            } else {
                match r.u8("session grant")? {
                    0 => SessionGrant::None,
                    1 => {
                        let token = SessionToken::read(&mut r)?;
                        r.u64("frames received")?;
                        SessionGrant::New(token)
                    }
                    2 => SessionGrant::Resumed {
                        token: SessionToken::read(&mut r)?,
                        received: r.u64("frames received")?,
                    },
                    other => return Err(ParseError::BadField("session grant", other as u64)),
                }
            },
        }),
        REJECT => Frame::Reject {
            code: RejectCode::from_u16(r.u16("reject code")?),
            text: r.rest_str("reject reason")?,
        },
        TEXT | BINARY => {
            let kind = if ty == TEXT { Kind::Text } else { Kind::Binary };
            Frame::Message {
                kind,
                body: body(payload, 1, kind)?,
            }
        }
        REQUEST => {
            let id = r.u64("request id")?;
            let kind = Kind::from_byte(r.u8("body kind")?)?;
            Frame::Request {
                id,
                kind,
                body: body(payload, r.pos, kind)?,
            }
        }
        RESPONSE => {
            let id = r.u64("request id")?;
            let result = match r.u8("response status")? {
                0 => {
                    let kind = Kind::from_byte(r.u8("body kind")?)?;
                    Ok((kind, body(payload, r.pos, kind)?))
                }
                1 => Err((r.u16("error code")?, r.rest_str("error text")?)),
                other => return Err(ParseError::BadField("response status", other as u64)),
            };
            Frame::Response { id, result }
        }
        PING => Frame::Ping(r.u64("ping nonce")?),
        PONG => Frame::Pong(r.u64("pong nonce")?),
        ACK => Frame::Ack(r.u64("acknowledged count")?),
        ACK_REQUEST => Frame::AckRequest,
        CLOSE => Frame::Close {
            code: r.u16("close code")?,
            text: r.rest_str("close reason")?,
        },
        t if super::transfer::is_transfer_type(t) => {
            Frame::Transfer(super::transfer::parse(payload)?)
        }
        t if t >= FIRST_IGNORABLE => Frame::Unknown(t),
        t => return Err(ParseError::UnknownType(t)),
    };
    Ok(frame)
}

/// The kind of a text or binary message frame; `None` for every other frame.
pub fn message_kind(payload: &[u8]) -> Option<Kind> {
    match payload.first() {
        Some(&frame_type::TEXT) => Some(Kind::Text),
        Some(&frame_type::BINARY) => Some(Kind::Binary),
        _ => None,
    }
}

/// The body of a message frame of `kind` (see [`message_kind`]), lent: the frame after its
/// type byte, checked for UTF-8 when it is text (what [`parse`] checks).
pub fn message_body(payload: &[u8], kind: Kind) -> Result<&[u8], ParseError> {
    let body = payload.get(1..).unwrap_or_default();
    if kind == Kind::Text && std::str::from_utf8(body).is_err() {
        return Err(ParseError::NotUtf8("text body"));
    }
    Ok(body)
}

/// The body of a message frame already checked with [`message_body`], taking the frame by
/// value: the same as [`parse`] gives, without a second reference to the frame's buffer
/// (two atomic operations per message, which show at millions of messages a second).
pub fn into_message_body(mut payload: Bytes) -> Bytes {
    let skip = payload.len().min(1);
    bytes::Buf::advance(&mut payload, skip);
    payload
}

/// The body from `start` to the end, checked for UTF-8 when it is text.
fn body(payload: &Bytes, start: usize, kind: Kind) -> Result<Bytes, ParseError> {
    let body = payload.slice(start..);
    if kind == Kind::Text && std::str::from_utf8(&body).is_err() {
        return Err(ParseError::NotUtf8("text body"));
    }
    Ok(body)
}

/// The bytes that precede a body in a frame: the type byte and the fixed fields.
///
/// Returned separately from the body so that a large body is written from its own buffer,
/// not copied (see `FrameWriter::push_parts`).
#[derive(Debug, Clone, Copy)]
pub struct Head {
    bytes: [u8; 16],
    len: u8,
}

impl Head {
    fn new() -> Self {
        Head {
            bytes: [0; 16],
            len: 0,
        }
    }
    fn put(mut self, s: &[u8]) -> Self {
        let start = self.len as usize;
        self.bytes[start..start + s.len()].copy_from_slice(s);
        self.len += s.len() as u8;
        self
    }

    /// The head's bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    /// Head of a text or binary message.
    pub fn message(kind: Kind) -> Self {
        Head::new().put(&[match kind {
            Kind::Text => frame_type::TEXT,
            Kind::Binary => frame_type::BINARY,
        }])
    }

    /// Head of a request.
    pub fn request(id: u64, kind: Kind) -> Self {
        Head::new()
            .put(&[frame_type::REQUEST])
            .put(&id.to_le_bytes())
            .put(&[kind.to_byte()])
    }

    /// Head of a successful response.
    pub fn response_ok(id: u64, kind: Kind) -> Self {
        Head::new()
            .put(&[frame_type::RESPONSE])
            .put(&id.to_le_bytes())
            .put(&[0, kind.to_byte()])
    }
}

/// Encodes a control or handshake frame (everything but bodies that may be large).
pub fn encode(frame: &Frame) -> Bytes {
    let mut b = BytesMut::new();
    match frame {
        Frame::Welcome(w) => {
            b.put_u8(frame_type::WELCOME);
            b.put_u16_le(w.version);
            b.put_u64_le(w.client_id);
            b.put_u32_le(w.max_frame);
            b.put_u32_le(w.heartbeat_ms);
            match w.session {
                SessionGrant::None => {}
                SessionGrant::New(token) => {
                    b.put_u8(1);
                    token.put(&mut b);
                    b.put_u64_le(0);
                }
                SessionGrant::Resumed { token, received } => {
                    b.put_u8(2);
                    token.put(&mut b);
                    b.put_u64_le(received);
                }
            }
        }
        Frame::Reject { code, text } => {
            b.put_u8(frame_type::REJECT);
            b.put_u16_le(code.to_u16());
            b.put_slice(text.as_bytes());
        }
        Frame::Message { kind, body } => {
            b.put_slice(Head::message(*kind).as_slice());
            b.put_slice(body);
        }
        Frame::Request { id, kind, body } => {
            b.put_slice(Head::request(*id, *kind).as_slice());
            b.put_slice(body);
        }
        Frame::Response { id, result } => match result {
            Ok((kind, body)) => {
                b.put_slice(Head::response_ok(*id, *kind).as_slice());
                b.put_slice(body);
            }
            Err((code, text)) => {
                b.put_u8(frame_type::RESPONSE);
                b.put_u64_le(*id);
                b.put_u8(1);
                b.put_u16_le(*code);
                b.put_slice(text.as_bytes());
            }
        },
        Frame::Ping(n) => {
            b.put_u8(frame_type::PING);
            b.put_u64_le(*n);
        }
        Frame::Pong(n) => {
            b.put_u8(frame_type::PONG);
            b.put_u64_le(*n);
        }
        Frame::Close { code, text } => {
            b.put_u8(frame_type::CLOSE);
            b.put_u16_le(*code);
            b.put_slice(text.as_bytes());
        }
        Frame::Ack(n) => {
            b.put_u8(frame_type::ACK);
            b.put_u64_le(*n);
        }
        Frame::AckRequest => b.put_u8(frame_type::ACK_REQUEST),
        Frame::Unknown(t) => b.put_u8(*t),
        Frame::Transfer(t) => return super::transfer::encode(t),
    }
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        s.split_whitespace()
            .map(|h| u8::from_str_radix(h, 16).unwrap())
            .collect()
    }

    #[test]
    fn hello_vector() {
        let hello = Hello::new("cli", Bytes::from_static(b"s3cret"));
        let wire = encode_hello(&hello);
        assert_eq!(
            &wire[..],
            &hex("89 53 46 52 4d 0d 0a 1a 01 00 01 00 03 63 6c 69 06 00 73 33 63 72 65 74")[..]
        );
        assert_eq!(parse_hello(&wire).unwrap(), hello);
        assert_eq!(negotiate(&hello), Some(1));
    }

    #[test]
    fn session_hello_vectors() {
        let new = Hello {
            session: SessionRequest::New,
            ..Hello::new("", Bytes::new())
        };
        let wire = encode_hello(&new);
        assert_eq!(
            &wire[..],
            &hex("89 53 46 52 4d 0d 0a 1a 01 00 01 00 00 00 00 01")[..]
        );
        assert_eq!(parse_hello(&wire).unwrap(), new);
        let resume = Hello {
            session: SessionRequest::Resume {
                token: SessionToken::new(7, [0xab; 16]),
                received: 2,
            },
            ..Hello::new("", Bytes::new())
        };
        let wire = encode_hello(&resume);
        assert_eq!(
            &wire[..],
            &hex("89 53 46 52 4d 0d 0a 1a 01 00 01 00 00 00 00 02 \
                  07 00 00 00 00 00 00 00 ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab \
                  02 00 00 00 00 00 00 00")[..]
        );
        assert_eq!(parse_hello(&wire).unwrap(), resume);
        // A truncated resume is an error, not a new session.
        assert!(parse_hello(&wire[..wire.len() - 1]).is_err());
    }

    #[test]
    fn session_tokens_hide_their_secret() {
        let token = SessionToken::new(9, [0x5a; 16]);
        let shown = format!("{token} {token:?}");
        assert!(!shown.contains("5a") && !shown.contains("90"), "{shown}");
        assert!(token.matches(&SessionToken::new(9, [0x5a; 16])));
        assert!(!token.matches(&SessionToken::new(9, [0x5b; 16])));
        assert!(!token.matches(&SessionToken::new(8, [0x5a; 16])));
    }

    #[test]
    fn vectors_round_trip() {
        let cases: Vec<(Frame, &str)> = vec![
            (
                Frame::Welcome(Welcome {
                    version: 1,
                    client_id: 7,
                    max_frame: 16 << 20,
                    heartbeat_ms: 5000,
                    session: SessionGrant::None,
                }),
                "01 01 00 07 00 00 00 00 00 00 00 00 00 00 01 88 13 00 00",
            ),
            (
                Frame::Welcome(Welcome {
                    version: 1,
                    client_id: 7,
                    max_frame: 16 << 20,
                    heartbeat_ms: 5000,
                    session: SessionGrant::New(SessionToken::new(7, [0xab; 16])),
                }),
                "01 01 00 07 00 00 00 00 00 00 00 00 00 00 01 88 13 00 00 \
                 01 07 00 00 00 00 00 00 00 ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab \
                 00 00 00 00 00 00 00 00",
            ),
            (
                Frame::Welcome(Welcome {
                    version: 1,
                    client_id: 7,
                    max_frame: 16 << 20,
                    heartbeat_ms: 5000,
                    session: SessionGrant::Resumed {
                        token: SessionToken::new(7, [0xab; 16]),
                        received: 3,
                    },
                }),
                "01 01 00 07 00 00 00 00 00 00 00 00 00 00 01 88 13 00 00 \
                 02 07 00 00 00 00 00 00 00 ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab \
                 03 00 00 00 00 00 00 00",
            ),
            (Frame::Ack(258), "20 02 01 00 00 00 00 00 00"),
            (Frame::AckRequest, "21"),
            (
                Frame::Reject {
                    code: RejectCode::Unauthorized,
                    text: "unauthorized".into(),
                },
                "02 02 00 75 6e 61 75 74 68 6f 72 69 7a 65 64",
            ),
            (
                Frame::Message {
                    kind: Kind::Text,
                    body: Bytes::from_static(b"hi"),
                },
                "10 68 69",
            ),
            (
                Frame::Message {
                    kind: Kind::Binary,
                    body: Bytes::from_static(&[0xff]),
                },
                "11 ff",
            ),
            (
                Frame::Request {
                    id: 1,
                    kind: Kind::Text,
                    body: Bytes::from_static(b"hi"),
                },
                "12 01 00 00 00 00 00 00 00 00 68 69",
            ),
            (
                Frame::Response {
                    id: 1,
                    result: Ok((Kind::Text, Bytes::from_static(b"ok"))),
                },
                "13 01 00 00 00 00 00 00 00 00 00 6f 6b",
            ),
            (
                Frame::Response {
                    id: 1,
                    result: Err((error_code::UNHANDLED, "no".into())),
                },
                "13 01 00 00 00 00 00 00 00 01 01 00 6e 6f",
            ),
            (Frame::Ping(2), "14 02 00 00 00 00 00 00 00"),
            (Frame::Pong(2), "15 02 00 00 00 00 00 00 00"),
            (
                Frame::Close {
                    code: close_code::SHUTDOWN,
                    text: "bye".into(),
                },
                "16 05 00 62 79 65",
            ),
        ];
        for (frame, vector) in cases {
            let wire = encode(&frame);
            assert_eq!(&wire[..], &hex(vector)[..], "{frame:?}");
            assert_eq!(parse(&wire).unwrap(), frame);
        }
    }

    #[test]
    fn unknown_types_follow_the_extension_rule() {
        assert_eq!(
            parse(&Bytes::from_static(&[0x90, 1, 2])),
            Ok(Frame::Unknown(0x90))
        );
        assert_eq!(
            parse(&Bytes::from_static(&[0x22])),
            Err(ParseError::UnknownType(0x22))
        );
        assert_eq!(parse(&Bytes::new()), Err(ParseError::Empty));
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        for bad in [
            &[0x12u8, 1, 2][..],
            &[0x13, 0, 0, 0, 0, 0, 0, 0, 0, 7],
            &[0x10, 0xff],
            &[0x14, 1],
            &[0x01, 1],
        ] {
            assert!(parse(&Bytes::copy_from_slice(bad)).is_err(), "{bad:?}");
        }
        assert_eq!(parse_hello(b"hello"), Err(ParseError::NoMagic));
        assert!(parse_hello(&MAGIC).is_err());
        assert!(matches!(
            parse_hello(&vec![0; MAX_HELLO + 1]),
            Err(ParseError::HelloTooLarge(_))
        ));
    }
}

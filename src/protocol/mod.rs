//! The wire formats, as pure functions over bytes.
//!
//! Nothing in this module does I/O or knows about tokio: it turns byte slices into frame
//! boundaries and frames into bytes, so it can be tested exhaustively without sockets and
//! could become its own crate unchanged. The async side ([`crate::codec`],
//! [`crate::connection`]) is a thin adapter around it.
//!
//! - [`frame`]: the *tutorial framing*, a 4-byte little-endian length and the payload. Every
//!   byte on a sockframe connection is inside such frames.
//! - [`message`]: the *sockframe protocol* carried in those frames: the hello / welcome
//!   handshake and typed frames (text, binary, request, response, ping, pong, close).
//! - [`transfer`]: the file transfer frames of the sockframe protocol (offer, accept,
//!   chunk, progress, done, result, cancel).
//!
//! See `docs/protocol.md` for byte diagrams and hex vectors.

pub mod frame;
pub mod message;
mod token;
pub mod transfer;

pub use frame::{
    DEFAULT_MAX_FRAME, FrameError, HEADER_LEN, check_header, encode_header, frame_len,
};

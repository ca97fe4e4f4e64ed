//! The wire format, as pure functions over bytes.
//!
//! Nothing in this module does I/O or knows about tokio: it turns byte slices into frame
//! boundaries and frames into bytes, so it can be tested exhaustively without sockets and
//! could become its own crate unchanged. The async side ([`crate::codec`],
//! [`crate::connection`]) is a thin adapter around it.
//!
//! Today there is one format, the *tutorial framing* of [`frame`]: a 4-byte little-endian
//! length followed by that many payload bytes. See `docs/protocol.md` for the byte diagram.

pub mod frame;

pub use frame::{
    DEFAULT_MAX_FRAME, FrameError, HEADER_LEN, check_header, encode_header, frame_len,
};

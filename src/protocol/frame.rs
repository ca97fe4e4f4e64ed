//! Tutorial framing: `[len: u32 little-endian][len bytes of payload]`.
//!
//! ```text
//!  0        1        2        3        4 ...              4+len
//! +--------+--------+--------+--------+-------------------+
//! | len (u32, little-endian)          | payload (len B)   |
//! +--------+--------+--------+--------+-------------------+
//! ```
//!
//! This is the format of the C# "Asynchronous Socket" tutorial this project grew out of
//! (`BitConverter.GetBytes(int)` on a little-endian machine, then the bytes). The tutorial
//! reads the length as a signed `Int32`, so a length with the top bit set is negative there;
//! we reject it, as we reject any length above the configured maximum, *before* reserving
//! memory for the payload.
//!
//! Decoding is split the way mini-redis splits it: [`check_header`] looks at the first four
//! bytes and says how long the whole frame is (or that more bytes are needed, which is not an
//! error); the caller then slices the payload out of its own buffer without copying.

use std::fmt;

/// Length of the frame header: a `u32` in little-endian byte order.
pub const HEADER_LEN: usize = 4;

/// Default maximum payload length: 16 MiB.
///
/// Large enough for any chat-sized or document-sized message, small enough that a hostile
/// length cannot make a peer reserve much memory.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

/// Why a frame cannot be decoded. Each variant is a protocol error for the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The length has its top bit set: a negative `Int32` for the tutorial's C# code.
    NegativeLength {
        /// The raw header value.
        raw: u32,
    },
    /// The length is larger than the configured maximum.
    TooLarge {
        /// The announced payload length.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The stream ended in the middle of a frame.
    Truncated {
        /// Bytes of the frame (header included) that had arrived.
        have: usize,
        /// Bytes the frame needed, header included; `None` when the header itself was cut.
        need: Option<usize>,
    },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::NegativeLength { raw } => write!(
                f,
                "frame length 0x{raw:08x} has the top bit set (negative as a C# Int32)"
            ),
            FrameError::TooLarge { len, max } => {
                write!(f, "frame length {len} exceeds the maximum of {max} bytes")
            }
            FrameError::Truncated {
                have,
                need: Some(need),
            } => write!(
                f,
                "connection closed mid-frame ({have} of {need} bytes received)"
            ),
            FrameError::Truncated { have, need: None } => write!(
                f,
                "connection closed mid-header ({have} of {HEADER_LEN} header bytes received)"
            ),
        }
    }
}

impl std::error::Error for FrameError {}

/// Inspects the start of `buf` and returns the payload length of the frame that begins there.
///
/// Returns `Ok(None)` when fewer than [`HEADER_LEN`] bytes are available: that is "not yet",
/// not an error. Returns an error for a negative length or one above `max`, without looking
/// at (or waiting for) any payload byte.
///
/// ```
/// use sockframe::protocol::check_header;
/// assert_eq!(check_header(&[5, 0, 0, 0, b'h'], 16), Ok(Some(5)));
/// assert_eq!(check_header(&[5, 0], 16), Ok(None));
/// assert!(check_header(&[0xff, 0xff, 0xff, 0xff], 16).is_err());
/// ```
pub fn check_header(buf: &[u8], max: usize) -> Result<Option<usize>, FrameError> {
    let Some(header) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let raw = u32::from_le_bytes(*header);
    if raw & 0x8000_0000 != 0 {
        return Err(FrameError::NegativeLength { raw });
    }
    let len = raw as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(Some(len))
}

/// The header for a payload of `len` bytes, or an error when `len` is above `max` or cannot
/// be represented as a non-negative `Int32`.
pub fn encode_header(len: usize, max: usize) -> Result<[u8; HEADER_LEN], FrameError> {
    if len > max || len > i32::MAX as usize {
        return Err(FrameError::TooLarge {
            len,
            max: max.min(i32::MAX as usize),
        });
    }
    Ok((len as u32).to_le_bytes())
}

/// Total bytes on the wire for a payload of `len` bytes.
pub const fn frame_len(len: usize) -> usize {
    HEADER_LEN + len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_needs_four_bytes() {
        for n in 0..HEADER_LEN {
            assert_eq!(check_header(&[1, 0, 0, 0][..n], 10), Ok(None));
        }
    }

    #[test]
    fn zero_and_maximum_are_legal() {
        assert_eq!(check_header(&[0, 0, 0, 0], 10), Ok(Some(0)));
        assert_eq!(check_header(&[10, 0, 0, 0], 10), Ok(Some(10)));
        assert_eq!(
            check_header(&[11, 0, 0, 0], 10),
            Err(FrameError::TooLarge { len: 11, max: 10 })
        );
    }

    #[test]
    fn top_bit_is_negative_even_when_max_is_huge() {
        assert_eq!(
            check_header(&[0, 0, 0, 0x80], usize::MAX),
            Err(FrameError::NegativeLength { raw: 0x8000_0000 })
        );
        assert_eq!(
            check_header(&[0xff; 4], usize::MAX),
            Err(FrameError::NegativeLength { raw: 0xffff_ffff })
        );
    }

    #[test]
    fn encode_is_little_endian_and_bounded() {
        assert_eq!(encode_header(0x0102_0304, usize::MAX), Ok([4, 3, 2, 1]));
        assert!(encode_header(11, 10).is_err());
        assert!(encode_header(i32::MAX as usize + 1, usize::MAX).is_err());
    }

    #[test]
    fn errors_read_well() {
        let e = FrameError::Truncated {
            have: 6,
            need: Some(9),
        };
        assert_eq!(
            e.to_string(),
            "connection closed mid-frame (6 of 9 bytes received)"
        );
    }
}

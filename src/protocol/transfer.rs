//! File transfer frames (types `0x30..=0x3f`): the wire format only, no I/O.
//!
//! A transfer moves one file from a *sender* to a *receiver* on one sockframe connection, in
//! either direction, interleaved with every other frame. The sender picks the transfer id
//! (unique per direction for the life of its side of the connection) and speaks first:
//!
//! ```text
//! sender                                       receiver
//!   OFFER   {id, size, digest, name}   ──▶
//!                                      ◀──  ACCEPT {id, offset}   (or REFUSE {id, code, text})
//!   CHUNK   {id, offset, data}         ──▶     (at most a window beyond the last PROGRESS)
//!                                      ◀──  PROGRESS {id, offset} (bytes safely written)
//!   DONE    {id}                       ──▶
//!                                      ◀──  RESULT {id, ok | error text} (after the digest)
//!   CANCEL  {id, text}                 ──▶  the sender gives up
//! ```
//!
//! Every type travels in one direction only, so the id alone says which transfer a frame
//! belongs to even when both sides send files at once: `OFFER`, `CHUNK`, `DONE` and
//! `CANCEL` go from sender to receiver; `ACCEPT`, `REFUSE`, `PROGRESS` and `RESULT` from
//! receiver to sender. A receiver that gives up mid-way (disk full, bad chunk) says so with
//! an error `RESULT`.
//!
//! All integers are little-endian. The digest is BLAKE3 (32 bytes) of the whole file. The
//! name is a `u16` length and UTF-8 bytes; texts and chunk data run to the end of the frame.
//! Byte layouts with hex vectors are in `docs/transfer.md`; the tests below pin them.

use bytes::{BufMut, Bytes, BytesMut};

use super::message::{ParseError, Reader};

/// Transfer frame types.
pub mod transfer_type {
    /// Sender → receiver: a file is on offer.
    pub const OFFER: u8 = 0x30;
    /// Receiver → sender: send from this offset.
    pub const ACCEPT: u8 = 0x31;
    /// Receiver → sender: not wanted (a [`refuse_code`](super::refuse_code) and a text).
    pub const REFUSE: u8 = 0x32;
    /// Sender → receiver: file bytes at an offset.
    pub const CHUNK: u8 = 0x33;
    /// Receiver → sender: bytes up to this offset are written; flow control and resume point.
    pub const PROGRESS: u8 = 0x34;
    /// Sender → receiver: every byte has been sent.
    pub const DONE: u8 = 0x35;
    /// Receiver → sender: the digest matched and the file is in place, or why not.
    pub const RESULT: u8 = 0x36;
    /// Sender → receiver: the transfer is abandoned.
    pub const CANCEL: u8 = 0x37;
    /// Last type of the range reserved for file transfer.
    pub const LAST: u8 = 0x3f;
}

/// Why a receiver refused an offer (in a `REFUSE`).
pub mod refuse_code {
    /// The receiver accepts no files (no save directory).
    pub const NOT_ACCEPTING: u16 = 1;
    /// The receiving application said no.
    pub const REJECTED: u16 = 2;
    /// The name is not a plain, safe file name.
    pub const BAD_NAME: u16 = 3;
    /// Larger than the receiver's maximum file size.
    pub const TOO_LARGE: u16 = 4;
    /// A file of that name exists and the receiver does not overwrite.
    pub const EXISTS: u16 = 5;
    /// Not enough free disk space.
    pub const NO_SPACE: u16 = 6;
    /// The receiver could not prepare the file (an I/O error).
    pub const IO: u16 = 7;
    /// The offer itself is malformed or reuses a live id.
    pub const BAD_OFFER: u16 = 8;
}

/// Longest file name an offer may carry, in bytes (most file systems allow 255).
pub const MAX_NAME: usize = 255;

/// Bytes of a `CHUNK` frame before its data: type, id, offset.
pub const CHUNK_HEAD_LEN: usize = 17;

/// One file transfer frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransferFrame {
    /// A file is on offer.
    Offer {
        /// Transfer id chosen by the sender.
        id: u64,
        /// File size in bytes.
        size: u64,
        /// BLAKE3 of the whole file.
        digest: [u8; 32],
        /// The sender's name for it (checked by the receiver; never trusted as a path).
        name: String,
    },
    /// Send from `offset` (0, or what a partial file from an earlier attempt already holds).
    Accept {
        /// Transfer id.
        id: u64,
        /// First byte wanted.
        offset: u64,
    },
    /// Not wanted.
    Refuse {
        /// Transfer id.
        id: u64,
        /// A [`refuse_code`].
        code: u16,
        /// Detail for people.
        text: String,
    },
    /// File bytes.
    Chunk {
        /// Transfer id.
        id: u64,
        /// Position of `data` in the file.
        offset: u64,
        /// The bytes.
        data: Bytes,
    },
    /// Bytes up to `offset` are written to the receiver's disk.
    Progress {
        /// Transfer id.
        id: u64,
        /// End of what is written.
        offset: u64,
    },
    /// Every byte has been sent.
    Done {
        /// Transfer id.
        id: u64,
    },
    /// The outcome: `Ok` once the digest matched and the file is in place.
    Result {
        /// Transfer id.
        id: u64,
        /// `Err` carries the reason.
        result: Result<(), String>,
    },
    /// Abandoned by the sender.
    Cancel {
        /// Transfer id.
        id: u64,
        /// Why.
        text: String,
    },
}

impl TransferFrame {
    /// The transfer this frame belongs to.
    pub fn id(&self) -> u64 {
        match self {
            TransferFrame::Offer { id, .. }
            | TransferFrame::Accept { id, .. }
            | TransferFrame::Refuse { id, .. }
            | TransferFrame::Chunk { id, .. }
            | TransferFrame::Progress { id, .. }
            | TransferFrame::Done { id }
            | TransferFrame::Result { id, .. }
            | TransferFrame::Cancel { id, .. } => *id,
        }
    }

    /// Bytes of payload this frame carries (chunk data; a nominal size for the rest).
    pub fn weight(&self) -> usize {
        match self {
            TransferFrame::Chunk { data, .. } => data.len(),
            TransferFrame::Offer { name, .. } => 50 + name.len(),
            TransferFrame::Refuse { text, .. }
            | TransferFrame::Cancel { text, .. }
            | TransferFrame::Result {
                result: Err(text), ..
            } => 16 + text.len(),
            _ => 16,
        }
    }
}

/// Whether `ty` is in the range reserved for file transfer.
pub fn is_transfer_type(ty: u8) -> bool {
    (transfer_type::OFFER..=transfer_type::LAST).contains(&ty)
}

/// Parses a frame whose type byte (`payload[0]`) is in the transfer range.
///
/// Chunk data is returned as a slice of `payload` (no copy).
pub fn parse(payload: &Bytes) -> Result<TransferFrame, ParseError> {
    use transfer_type::*;
    let Some(&ty) = payload.first() else {
        return Err(ParseError::Empty);
    };
    let mut r = Reader::new(payload, 1);
    let frame = match ty {
        OFFER => {
            let id = r.u64("transfer id")?;
            let size = r.u64("file size")?;
            let digest = r.take(32, "digest")?.try_into().unwrap();
            let len = r.u16("file name")? as usize;
            if len > MAX_NAME {
                return Err(ParseError::BadField("file name length", len as u64));
            }
            let name = String::from_utf8(r.take(len, "file name")?.to_vec())
                .map_err(|_| ParseError::NotUtf8("file name"))?;
            // Later versions may append fields; this one ignores what follows.
            TransferFrame::Offer {
                id,
                size,
                digest,
                name,
            }
        }
        ACCEPT => TransferFrame::Accept {
            id: r.u64("transfer id")?,
            offset: r.u64("offset")?,
        },
        REFUSE => TransferFrame::Refuse {
            id: r.u64("transfer id")?,
            code: r.u16("refuse code")?,
            text: r.rest_str("refuse reason")?,
        },
        CHUNK => {
            let id = r.u64("transfer id")?;
            let offset = r.u64("offset")?;
            TransferFrame::Chunk {
                id,
                offset,
                data: payload.slice(r.pos..),
            }
        }
        PROGRESS => TransferFrame::Progress {
            id: r.u64("transfer id")?,
            offset: r.u64("offset")?,
        },
        DONE => TransferFrame::Done {
            id: r.u64("transfer id")?,
        },
        RESULT => {
            let id = r.u64("transfer id")?;
            let result = match r.u8("result status")? {
                0 => Ok(()),
                1 => Err(r.rest_str("result error")?),
                other => return Err(ParseError::BadField("result status", other as u64)),
            };
            TransferFrame::Result { id, result }
        }
        CANCEL => TransferFrame::Cancel {
            id: r.u64("transfer id")?,
            text: r.rest_str("cancel reason")?,
        },
        t => return Err(ParseError::UnknownType(t)),
    };
    Ok(frame)
}

/// The head of a `CHUNK` frame (type, id, offset), written before the data so that the data
/// goes out from its own buffer without a copy.
pub fn chunk_head(id: u64, offset: u64) -> [u8; CHUNK_HEAD_LEN] {
    let mut head = [0u8; CHUNK_HEAD_LEN];
    head[0] = transfer_type::CHUNK;
    head[1..9].copy_from_slice(&id.to_le_bytes());
    head[9..17].copy_from_slice(&offset.to_le_bytes());
    head
}

/// Encodes a transfer frame (a chunk's data is copied; see [`chunk_head`] to avoid that).
///
/// Names longer than [`MAX_NAME`] bytes are an error of the caller; they are cut at a
/// character boundary so the frame stays parseable.
pub fn encode(frame: &TransferFrame) -> Bytes {
    use transfer_type::*;
    let mut b = BytesMut::with_capacity(32 + frame.weight());
    match frame {
        TransferFrame::Offer {
            id,
            size,
            digest,
            name,
        } => {
            let mut cut = name.len().min(MAX_NAME);
            while !name.is_char_boundary(cut) {
                cut -= 1;
            }
            b.put_u8(OFFER);
            b.put_u64_le(*id);
            b.put_u64_le(*size);
            b.put_slice(digest);
            b.put_u16_le(cut as u16);
            b.put_slice(&name.as_bytes()[..cut]);
        }
        TransferFrame::Accept { id, offset } => {
            b.put_u8(ACCEPT);
            b.put_u64_le(*id);
            b.put_u64_le(*offset);
        }
        TransferFrame::Refuse { id, code, text } => {
            b.put_u8(REFUSE);
            b.put_u64_le(*id);
            b.put_u16_le(*code);
            b.put_slice(text.as_bytes());
        }
        TransferFrame::Chunk { id, offset, data } => {
            b.put_slice(&chunk_head(*id, *offset));
            b.put_slice(data);
        }
        TransferFrame::Progress { id, offset } => {
            b.put_u8(PROGRESS);
            b.put_u64_le(*id);
            b.put_u64_le(*offset);
        }
        TransferFrame::Done { id } => {
            b.put_u8(DONE);
            b.put_u64_le(*id);
        }
        TransferFrame::Result { id, result } => {
            b.put_u8(RESULT);
            b.put_u64_le(*id);
            match result {
                Ok(()) => b.put_u8(0),
                Err(text) => {
                    b.put_u8(1);
                    b.put_slice(text.as_bytes());
                }
            }
        }
        TransferFrame::Cancel { id, text } => {
            b.put_u8(CANCEL);
            b.put_u64_le(*id);
            b.put_slice(text.as_bytes());
        }
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
    fn vectors_round_trip() {
        let digest = [0xab; 32];
        let cases: Vec<(TransferFrame, String)> = vec![
            (
                TransferFrame::Offer {
                    id: 1,
                    size: 5,
                    digest,
                    name: "a.txt".into(),
                },
                format!(
                    "30 01 00 00 00 00 00 00 00 05 00 00 00 00 00 00 00 {} 05 00 61 2e 74 78 74",
                    "ab ".repeat(32)
                ),
            ),
            (
                TransferFrame::Accept { id: 1, offset: 2 },
                "31 01 00 00 00 00 00 00 00 02 00 00 00 00 00 00 00".into(),
            ),
            (
                TransferFrame::Refuse {
                    id: 1,
                    code: refuse_code::EXISTS,
                    text: "no".into(),
                },
                "32 01 00 00 00 00 00 00 00 05 00 6e 6f".into(),
            ),
            (
                TransferFrame::Chunk {
                    id: 1,
                    offset: 2,
                    data: Bytes::from_static(b"hi"),
                },
                "33 01 00 00 00 00 00 00 00 02 00 00 00 00 00 00 00 68 69".into(),
            ),
            (
                TransferFrame::Progress { id: 1, offset: 4 },
                "34 01 00 00 00 00 00 00 00 04 00 00 00 00 00 00 00".into(),
            ),
            (
                TransferFrame::Done { id: 1 },
                "35 01 00 00 00 00 00 00 00".into(),
            ),
            (
                TransferFrame::Result {
                    id: 1,
                    result: Ok(()),
                },
                "36 01 00 00 00 00 00 00 00 00".into(),
            ),
            (
                TransferFrame::Result {
                    id: 1,
                    result: Err("bad".into()),
                },
                "36 01 00 00 00 00 00 00 00 01 62 61 64".into(),
            ),
            (
                TransferFrame::Cancel {
                    id: 1,
                    text: "x".into(),
                },
                "37 01 00 00 00 00 00 00 00 78".into(),
            ),
        ];
        for (frame, vector) in cases {
            let wire = encode(&frame);
            assert_eq!(&wire[..], &hex(&vector)[..], "{frame:?}");
            assert_eq!(parse(&wire).unwrap(), frame);
            assert!(is_transfer_type(wire[0]));
        }
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        for bad in [
            &[0x30u8, 1, 2][..],
            &[0x31, 1, 0, 0, 0, 0, 0, 0, 0],
            &[0x36, 1, 0, 0, 0, 0, 0, 0, 0, 7],
            &[0x36, 1, 0, 0, 0, 0, 0, 0, 0],
            &[0x3f, 1],
            &[0x37, 1, 0, 0, 0, 0, 0, 0, 0, 0xff],
        ] {
            assert!(parse(&Bytes::copy_from_slice(bad)).is_err(), "{bad:?}");
        }
        // A name longer than the limit is refused before it is copied.
        let mut offer = vec![0x30];
        offer.extend_from_slice(&[0; 48]);
        offer.extend_from_slice(&300u16.to_le_bytes());
        offer.extend_from_slice(&[b'a'; 300]);
        assert!(parse(&Bytes::from(offer)).is_err());
    }

    #[test]
    fn chunk_head_matches_encode() {
        let frame = TransferFrame::Chunk {
            id: 9,
            offset: 1 << 40,
            data: Bytes::from_static(b"data"),
        };
        assert_eq!(&encode(&frame)[..CHUNK_HEAD_LEN], &chunk_head(9, 1 << 40));
    }
}

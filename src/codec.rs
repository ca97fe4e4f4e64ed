//! [`TutorialCodec`]: the tutorial framing as a `tokio_util::codec` `Decoder` and `Encoder`.
//!
//! A thin adapter over the pure functions of [`crate::protocol::frame`]. It is public so that
//! an application can put it on any byte stream with `tokio_util::codec::Framed`:
//!
//! ```
//! use bytes::{Bytes, BytesMut};
//! use sockframe::codec::TutorialCodec;
//! use tokio_util::codec::{Decoder, Encoder};
//!
//! let mut codec = TutorialCodec::new();
//! let mut wire = BytesMut::new();
//! codec.encode(Bytes::from_static(b"hi"), &mut wire).unwrap();
//! assert_eq!(&wire[..], b"\x02\x00\x00\x00hi");
//! assert_eq!(codec.decode(&mut wire).unwrap().unwrap(), "hi");
//! ```

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::Error;
use crate::protocol::frame::{
    DEFAULT_MAX_FRAME, FrameError, HEADER_LEN, check_header, encode_header,
};

/// Most the read buffer grows by at once while a frame is arriving: 1 MiB plus a header, so
/// a 1 MiB message still needs only one reservation.
const RESERVE_STEP: usize = 1024 * 1024 + HEADER_LEN;

/// The read buffer's size once data flows (see `decode`).
pub(crate) const READ_ROOM: usize = 8 * 1024;

/// The read buffer's size once a read has filled it: the peer is sending faster than we
/// read (see `grow_if_filled`). A connection holds this much only while busy: the reader
/// gives it back when the stream goes quiet with the buffer empty.
///
/// 256 KiB rather than 64: against 64 KiB, 64-byte messages took about a quarter less CPU
/// time each with 16 connections and a borrowing handler, a tenth less with a handler taking
/// them by value (medians of 5 alternated runs, docs/benchmarks.md). Fewer reads, and fewer
/// wake-ups of the sender as its socket buffer drains.
pub(crate) const BUSY_ROOM: usize = 256 * 1024;

/// A buffer smaller than this that holds bytes is one the first read made (see `decode`).
const FIRST_READ: usize = 64;

/// Spare room below which the buffer grows again while a frame arrives.
const LOW_WATER: usize = 64 * 1024;

/// Decodes and encodes tutorial frames (`[u32 LE length][payload]`).
///
/// Decoding yields each payload as a [`Bytes`] slice of the read buffer (no copy). A length
/// above [`max_frame`](Self::max_frame) or with the top bit set is an error before any memory
/// is reserved for the payload; once a valid header is seen, the buffer reserves room for the
/// rest of the frame (in steps of at most 1 MiB) so it is read with few system calls.
#[derive(Debug, Clone, Copy)]
pub struct TutorialCodec {
    /// Largest payload accepted when decoding and allowed when encoding.
    max_frame: usize,
    /// The next bytes are a stream's first (or its first since the reader gave its buffer
    /// back): they may sit in the few bytes of room an empty buffer takes for a read, which
    /// `decode` replaces (see there). Only then: the part of a frame left at the end of a
    /// filled buffer is small too, and replacing that too made every busy buffer an 8 KiB
    /// one again after each read, which the next read filled and which was then copied into
    /// a larger one: with 16 connections of 64-byte messages, 3 % of the server's time in
    /// that copy and reads of 8 KiB (README's loop: a fifth less CPU per message without it).
    first_read: bool,
}

impl TutorialCodec {
    /// A codec with the default maximum payload of 16 MiB ([`DEFAULT_MAX_FRAME`]).
    pub fn new() -> Self {
        Self::with_max_frame(DEFAULT_MAX_FRAME)
    }

    /// A codec that accepts and produces payloads of at most `max_frame` bytes (both
    /// directions). Values above `i32::MAX` are clamped: the tutorial's peers read an `Int32`.
    pub fn with_max_frame(max_frame: usize) -> Self {
        Self {
            max_frame: max_frame.min(i32::MAX as usize),
            first_read: true,
        }
    }

    /// Changes the largest payload accepted from now on.
    pub(crate) fn set_max_frame(&mut self, max_frame: usize) {
        self.max_frame = max_frame.min(i32::MAX as usize);
    }

    /// The reader gave its buffer back: the next bytes are read as a stream's first.
    pub(crate) fn expect_first_read(&mut self) {
        self.first_read = true;
    }

    /// The largest payload this codec accepts.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }
}

impl Default for TutorialCodec {
    fn default() -> Self {
        Self::new()
    }
}

/// Grows a buffer that the last read filled to [`BUSY_ROOM`], once its complete frames have
/// been taken (so `src` holds at most part of one frame).
///
/// A read that filled the whole buffer left more waiting in the socket: a busy stream then
/// reads [`BUSY_ROOM`] at a time instead of 8 KiB, so a system call, and a wake-up of the
/// sender as its socket buffer drains, serve many times as many small messages. Taking the
/// frames out of a buffer moves its start and its end of room alike, so `len == capacity`
/// still tells that the read filled it. Growing only now copies the part of a frame left,
/// not the whole read (growing at the first frame copied the frames behind it too).
/// (Not an empty buffer: that is an idle connection's, which must stay empty.)
///
/// A buffer whose frames have all been dropped, and whose allocation already holds
/// [`BUSY_ROOM`] (a busy stream's, or one grown for a large frame), is used again: the part
/// of a frame is moved to its start, with no allocation.
fn grow_if_filled(src: &mut BytesMut) {
    if !src.is_empty() && src.len() == src.capacity() && src.capacity() < BUSY_ROOM {
        // `try_reclaim` never allocates: it succeeds only on a buffer that nothing else
        // holds and whose allocation has the room.
        if src.try_reclaim(BUSY_ROOM - src.len()) {
            return;
        }
        // A new buffer of exactly that size, not `reserve`: on a buffer no frame holds,
        // `reserve` grows the allocation in place, the room before its start included, and
        // the reader gives back only buffers of at most `BUSY_ROOM`.
        let mut fresh = BytesMut::with_capacity(BUSY_ROOM);
        fresh.extend_from_slice(src);
        *src = fresh;
    }
}

impl Decoder for TutorialCodec {
    type Item = Bytes;
    type Error = Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, Error> {
        // The read buffer gets its working size with the first bytes rather than up front:
        // an idle connection then holds none (8 KiB each, resident, measured with 10,000
        // idle connections). The first read lands in a buffer of a few bytes (the reader
        // asks for room for one); replacing that buffer (not `reserve`) makes 8 KiB the size
        // later reallocations start from. From then on the buffer is replaced only when a
        // read fills it (`grow_if_filled`) or a frame needs more room (below).
        if self.first_read && !src.is_empty() {
            self.first_read = false;
            if src.capacity() < FIRST_READ {
                let mut fresh = BytesMut::with_capacity(READ_ROOM.max(src.len()));
                fresh.extend_from_slice(src);
                *src = fresh;
            }
        }
        let Some(len) = check_header(src, self.max_frame)? else {
            grow_if_filled(src);
            return Ok(None);
        };
        let total = HEADER_LEN + len;
        if src.len() < total {
            // A frame that fits in the busy size: grow a filled buffer to it. A larger one
            // gets room for itself below, in one allocation. Growing to the busy size first
            // and then to the frame's made a stream of 1 MiB messages allocate and copy twice
            // per message, and under glibc (the README's loop) took six times the CPU time
            // per message, most of it page faults on memory the allocator had just given
            // back to the kernel (docs/benchmarks.md).
            if total <= BUSY_ROOM {
                grow_if_filled(src);
            }
            // Reserve for the rest of the frame so it is read with few system calls, but in
            // steps: a peer that announces a large frame and then stalls gets address space
            // only as its bytes actually arrive.
            // Only when the spare room runs low: `reserve` asks for room beyond what is
            // held, so calling it on every read would double the buffer each time.
            if src.capacity() - src.len() < LOW_WATER {
                src.reserve((total - src.len()).min(RESERVE_STEP));
            }
            return Ok(None);
        }
        src.advance(HEADER_LEN);
        Ok(Some(src.split_to(len).freeze()))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, Error> {
        if let Some(frame) = self.decode(src)? {
            return Ok(Some(frame));
        }
        if src.is_empty() {
            return Ok(None);
        }
        let need = check_header(src, self.max_frame)?.map(|len| HEADER_LEN + len);
        Err(FrameError::Truncated {
            have: src.len(),
            need,
        }
        .into())
    }
}

impl Encoder<Bytes> for TutorialCodec {
    type Error = Error;

    fn encode(&mut self, item: Bytes, dst: &mut BytesMut) -> Result<(), Error> {
        self.encode(&item[..], dst)
    }
}

impl Encoder<&[u8]> for TutorialCodec {
    type Error = Error;

    fn encode(&mut self, item: &[u8], dst: &mut BytesMut) -> Result<(), Error> {
        let header = encode_header(item.len(), self.max_frame)?;
        dst.reserve(HEADER_LEN + item.len());
        dst.put_slice(&header);
        dst.put_slice(item);
        Ok(())
    }
}

//! A framed connection: buffered frames in and out over any byte stream.
//!
//! [`Connection`] owns the buffering and is generic over the stream, so plain TCP and
//! TLS share all of this code. It splits into a [`FrameReader`], which hands out each
//! payload as a [`Bytes`](bytes::Bytes) slice of one read buffer, and a [`FrameWriter`],
//! which batches many small frames into one write and sends large payloads without copying
//! them.
//!
//! The server and the client both run a connection through `drive`, which reads and writes
//! concurrently in a single task and implements what both sides share: the typed frames of
//! the sockframe protocol, heartbeats, the idle timeout, requests, and the close rules.
//!
//! The files:
//! - `reader.rs`: [`FrameReader`], and `Step`, what its in-place walk does after a frame.
//! - `writer.rs`: [`FrameWriter`], batching frames into vectored writes.
//! - `config.rs`: the settings [`Mode`], [`Heartbeat`], [`RateLimit`] and [`RateAction`],
//!   and `Bucket`, the token bucket behind a rate limit.
//! - `drive.rs`: `drive` and what it is given (`Drive`, `CloseOrder`) and returns
//!   (`Outcome`); the farewell `CLOSE` frame.
//! - `inbound.rs`: `Inbound`, the receiving half: the general loop over every kind of frame.
//! - `fast_path.rs`: `Inbound`'s fast path for runs of messages already in the read buffer.
//! - `delivery.rs`: `Inbound`'s way to the application: batches of events, or the
//!   connection's handler (`Handling`) and its replies, after the rate limit.
//! - `batch.rs`: `Batch`, what travels to the event stream (`MAX_BATCH` events; a run of
//!   messages as one slice of the read buffer, its whole frames), and `Ready`, which walks
//!   the run and makes its events on the application's side.
//! - `outbound.rs`: the sending half: the write loop, the close's drain, the encoding of
//!   queued items.
//! - `control.rs`: `Control`, the control frames the reader leaves for the writer, and
//!   `Replies`, a handler's replies on their way to it.
//! - `liveness.rs`: `Traffic` and `Liveness`, counters updated as frames pass, and the
//!   clocks that watch them (`Heard`, `FrameClock`).
//!
//! How they meet: `drive` splits the work between an `Inbound` (reading from a
//! [`FrameReader`]) and the write loop of `outbound.rs` (writing to a [`FrameWriter`]),
//! polled by hand in one task. The two halves share a `Control` (and its `Replies`), which
//! the reader fills and the writer empties, and the counters of `liveness.rs`, which the
//! reader moves and `drive`'s timers read.

use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};

mod batch;
mod config;
mod control;
mod delivery;
mod drive;
mod fast_path;
mod inbound;
mod liveness;
mod outbound;
mod reader;
mod writer;

pub(crate) use batch::{Batch, MessageEvent, Ready};
pub use config::{Heartbeat, Mode, RateAction, RateLimit};
pub(crate) use control::Replies;
pub(crate) use drive::{CloseOrder, Drive, Outcome, drive};
pub(crate) use liveness::Traffic;
pub use reader::FrameReader;
pub use writer::FrameWriter;

/// Room a typed frame needs beyond its body: `max_frame` bounds bodies, so frames of the
/// sockframe protocol may be this much longer (the largest head is 11 bytes).
pub(crate) const HEAD_ROOM: usize = 16;

/// A byte stream with tutorial framing on it.
#[derive(Debug)]
pub struct Connection<S> {
    stream: S,
    max_frame: usize,
}

impl<S: AsyncRead + AsyncWrite> Connection<S> {
    /// Wraps `stream`; frames longer than `max_frame` are refused in both directions.
    pub fn new(stream: S, max_frame: usize) -> Self {
        Self { stream, max_frame }
    }

    /// Splits into a reading and a writing half that can be used concurrently.
    pub fn split(self) -> (FrameReader<ReadHalf<S>>, FrameWriter<WriteHalf<S>>) {
        let (r, w) = tokio::io::split(self.stream);
        (
            FrameReader::new(r, self.max_frame),
            FrameWriter::new(w, self.max_frame),
        )
    }
}

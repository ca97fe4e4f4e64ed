//! The receiving half's fast path: runs of messages taken from the read buffer in one pass.

use tokio::io::AsyncRead;

use super::batch::{Batch, Framing, MAX_BATCH, MessageEvent};
use super::config::Mode;
use super::delivery::Handling;
use super::inbound::Inbound;
use super::liveness::bump;
use super::reader::{FrameReader, Step};
use crate::message::{Message, MessageKind, MessageRef};
use crate::protocol::message as wire;
use crate::reason::DisconnectReason;
use crate::request::Request;

/// Most messages a handler taking them by value gets from one run of the read buffer (see
/// `hand`): their places take 6 KiB of stack.
const HAND_RUN: usize = 256;

impl<E, R> Inbound<'_, E, R>
where
    E: MessageEvent,
    R: Fn(Request) -> E,
{
    /// The fast path for messages: every message already complete in the read buffer goes
    /// to the handler, or into the batch of events, in one synchronous loop, and the counters
    /// are added once for all of them.
    ///
    /// `run`'s loop is general (requests, control frames, waits at every step), and going
    /// round it once per message was, with small messages, as much work as the message
    /// itself. Here a message costs its decoding and the handler's call or its place in the
    /// batch (64-byte sink, one connection, with a handler: about 1.5x the messages per
    /// second of going round `run`'s loop, measured).
    ///
    /// Returns when the buffer holds no complete frame or the batch is nearly full (`run`
    /// hands it over); or leaves a frame that needs the general path (not a message) in the
    /// read buffer; or fails on a message that breaks the rules; or leaves in `h.reply` a
    /// reply that found the queue full (under `Wait`: `run` waits for room, reading nothing
    /// meanwhile). The caller checks that there is no rate limit and no late hello to watch
    /// for, and, with a handler, no event waiting in the batch, which this path does not
    /// handle.
    pub(super) fn drain<RD: AsyncRead + Unpin>(
        &self,
        reader: &mut FrameReader<RD>,
        batch: &mut Batch<E>,
        handling: Option<&mut Handling<'_>>,
    ) -> Result<(), DisconnectReason> {
        match handling {
            None => self.gather(reader, batch),
            Some(h) if h.borrows => self.lend(reader, h),
            Some(h) => self.hand(reader, h),
        }
    }

    /// [`drain`](Self::drain) without a handler: the messages join the batch as one run,
    /// split off the read buffer at once (see [`Batch`] for why). Leaves a frame that is not
    /// a message in the buffer for the general path, and stops before the batch is full.
    fn gather<RD: AsyncRead + Unpin>(
        &self,
        reader: &mut FrameReader<RD>,
        batch: &mut Batch<E>,
    ) -> Result<(), DisconnectReason> {
        let room = MAX_BATCH.saturating_sub(batch.len() + 1);
        if room == 0 {
            return Ok(());
        }
        let framing = if self.mode == Mode::Tutorial {
            Framing::Tutorial
        } else {
            Framing::Typed
        };
        let (mut bytes, mut result, mut count) = (0u64, Ok(()), 0);
        let (frames, buffer) = reader.take_frames(|_, frame| {
            let len = if framing == Framing::Tutorial {
                frame.len()
            } else if let Some(kind) = wire::message_kind(frame) {
                match self.checked_body(frame, kind) {
                    Ok(body) => body.len(),
                    Err(reason) => {
                        result = Err(reason);
                        return Step::Leave;
                    }
                }
            } else {
                return Step::Leave;
            };
            bytes += len as u64;
            if let Some(acks) = self.acks {
                acks.add_bytes(len);
            }
            count += 1;
            if count >= room {
                Step::Last
            } else {
                Step::Next
            }
        });
        // A session counts these once the batch is handed over (`flush`).
        batch.push_run(buffer, frames, framing, self.message_tag, &self.batch_hint);
        self.count_pass(frames as u64, frames as u64, bytes);
        result
    }

    /// [`drain`](Self::drain) for a handler that takes messages by value: the complete
    /// messages are split off the read buffer at once, and each is a slice of that run.
    /// Splitting each frame off the buffer on its own (the codec's way) cost about a tenth
    /// more CPU time per 64-byte message, in the buffer's bookkeeping (medians of 5
    /// alternated runs, docs/benchmarks.md). Should the handler's replies
    /// find the queue full partway, the run's rest goes back to the read buffer (a copy,
    /// only under backpressure).
    fn hand<RD: AsyncRead + Unpin>(
        &self,
        reader: &mut FrameReader<RD>,
        h: &mut Handling<'_>,
    ) -> Result<(), DisconnectReason> {
        let (mut messages, mut bytes) = (0u64, 0u64);
        let mut result = Ok(());
        // Runs of at most `HAND_RUN` messages, their places on the stack: a `Vec` grown to
        // the thousand messages of a 64 KiB read was reallocated nine times per read.
        'runs: loop {
            let mut spans = [(MessageKind::Untyped, 0usize, 0usize); HAND_RUN];
            let mut count = 0;
            let (_, run) = reader.take_frames(|at, frame| {
                let (kind, start, len) = if self.mode == Mode::Tutorial {
                    (MessageKind::Untyped, at, frame.len())
                } else if let Some(kind) = wire::message_kind(frame) {
                    match self.checked_body(frame, kind) {
                        // The body is the frame's tail.
                        Ok(body) => (kind.into(), at + frame.len() - body.len(), body.len()),
                        Err(reason) => {
                            result = Err(reason);
                            return Step::Leave;
                        }
                    }
                } else {
                    return Step::Leave;
                };
                spans[count] = (kind, start, len);
                count += 1;
                if count == HAND_RUN {
                    Step::Last
                } else {
                    Step::Next
                }
            });
            for &(kind, start, len) in &spans[..count] {
                messages += 1;
                bytes += len as u64;
                if let Some(acks) = self.acks {
                    acks.add_bytes(len);
                }
                let message = Message::from_parts(kind, run.slice(start..start + len));
                h.reply = h.call(message);
                if let Some(acks) = self.acks {
                    acks.received_one();
                }
                match self.queue_reply(h) {
                    Ok(true) => {}
                    // Full: `run` waits for room, and reads the rest again after it (a frame
                    // that failed its check above is still in the buffer behind the rest, and
                    // is reported in its turn).
                    Ok(false) => {
                        reader.unread(&run[start + len..]);
                        result = Ok(());
                        break 'runs;
                    }
                    Err(reason) => {
                        result = Err(reason);
                        break 'runs;
                    }
                }
            }
            // A short run ended at the buffer's end or before a frame for the general path.
            if count < HAND_RUN || result.is_err() {
                break;
            }
        }
        self.count_pass(messages, messages, bytes);
        result
    }

    /// [`drain`](Self::drain) for a handler that borrows: each message is lent to it where
    /// it lies in the read buffer, and the buffer moves on once for all of them. Leaves a
    /// frame that is not a message for the general path, as `drain` does.
    fn lend<RD: AsyncRead + Unpin>(
        &self,
        reader: &mut FrameReader<RD>,
        h: &mut Handling<'_>,
    ) -> Result<(), DisconnectReason> {
        let (mut messages, mut bytes) = (0u64, 0u64);
        let mut result = Ok(());
        let frames = reader.for_each_frame(|frame| {
            let message = if self.mode == Mode::Tutorial {
                MessageRef::new(MessageKind::Untyped, frame)
            } else if let Some(kind) = wire::message_kind(frame) {
                match self.checked_body(frame, kind) {
                    Ok(body) => MessageRef::new(kind.into(), body),
                    Err(reason) => {
                        result = Err(reason);
                        return Step::Last;
                    }
                }
            } else {
                return Step::Leave;
            };
            messages += 1;
            bytes += message.len() as u64;
            if let Some(acks) = self.acks {
                acks.add_bytes(message.len());
            }
            h.reply = h.handler.message_ref(message);
            if let Some(acks) = self.acks {
                acks.received_one();
            }
            match self.queue_reply(h) {
                Ok(true) => Step::Next,
                // Full: `run` waits for room.
                Ok(false) => Step::Last,
                Err(reason) => {
                    result = Err(reason);
                    Step::Last
                }
            }
        });
        self.count_pass(frames as u64, messages, bytes);
        result
    }

    /// Adds one pass's frames, messages and bytes to the counters, once per pass rather
    /// than once per message.
    fn count_pass(&self, frames: u64, messages: u64, bytes: u64) {
        bump(&self.liveness.frames, frames);
        bump(&self.liveness.messages, messages);
        bump(&self.traffic.messages_in, messages);
        bump(&self.traffic.bytes_in, bytes);
    }
}

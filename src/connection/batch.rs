//! What travels from a connection to its application's event stream: a [`Batch`] of events,
//! in which a run of messages read together is one slice of the read buffer, made into
//! events on the application's side ([`Ready`]).
//!
//! Why not one event per message, made by the connection: every message is then a `Bytes`
//! split from the read buffer, and all of them share the buffer's reference count. The
//! connection's thread raised that count once per message and the application's thread
//! lowered it once per message, so the count's cache line moved between the two cores
//! twice per message; and each event (104 bytes) was written on one core and read on the
//! other. That was most of the cost of the event stream with small messages: below the
//! hand-written tokio baseline (0.95x at 64 B, docs/benchmarks.md). Here the connection
//! splits the buffer once per run, and the application's side walks the run's frames and
//! makes each message, raising and lowering a count that only its own thread touches until
//! the run is done.
//!
//! A batch takes no allocation of its own in the usual case, one run or one event: its first
//! entry is kept inline, and the run's frames are walked again rather than listed. Memory
//! that one thread allocates and another frees is what the system allocator (glibc's) does
//! worst: with a list of places per run and a `Vec` of entries per batch, the connections'
//! allocations waited on the arena lock that the application's frees held, and 16
//! connections of 64-byte messages made 20,000 `futex` calls a second (the README's loop,
//! docs/benchmarks.md).

use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;

use crate::message::{Message, MessageKind};
use crate::protocol::frame::HEADER_LEN;
use crate::protocol::message::frame_type;

/// Most events handed to the application in one batch. Events travel in batches of those
/// that one read produced: one channel operation and at most one wake-up per batch instead
/// of per message, which is most of the cost of small messages.
pub(crate) const MAX_BATCH: usize = 256;

/// Largest message of a run copied into a buffer of its own, rather than sliced from the
/// run's buffer, when the event stream makes its event.
///
/// A slice raises the buffer's reference count, and dropping it lowers the count: two
/// atomic operations per message. A small copy costs an allocation and a free on the
/// application's thread, which the allocator does without an atomic operation: 64-byte
/// messages on the event stream took about 5 % less CPU time per message copied (median of
/// 5 alternated runs). Larger messages stay zero-copy. (Not so for a handler taking
/// messages by value in the connection's task: there the copy measured slower than the
/// count, which no other thread touches.)
pub(crate) const COPY_MAX: usize = 256;

/// An event type that carries received messages: how a message received from `tag` (the
/// server's client id) becomes an event. A trait rather than a closure in the connection, so
/// that the event stream makes the events of a run itself, on the application's side, and
/// the compiler inlines it there.
pub(crate) trait MessageEvent: Sized {
    /// The event of `message`, received from `tag`.
    fn message_event(tag: u64, message: Message) -> Self;
}

/// How a run's frames carry their messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// Tutorial frames: the payload is the message, untyped.
    Tutorial,
    /// Sockframe message frames: a type byte (text or binary), then the body.
    Typed,
}

/// One entry of a batch: an event, or a run of messages.
enum Item<E> {
    Event(E),
    Run(Run),
}

/// Messages read together: whole frames, each a message that the connection has checked
/// (type, UTF-8 of text, size), one after the other in one buffer.
struct Run {
    frames: Bytes,
    framing: Framing,
    /// Whom they came from (see [`MessageEvent`]).
    tag: u64,
}

/// Events of one connection, in the order they happened, on their way to the application.
pub(crate) struct Batch<E> {
    /// The first entry, kept here so that a batch of one run or one event (most of them)
    /// allocates nothing.
    first: Option<Item<E>>,
    /// The entries after the first.
    rest: Vec<Item<E>>,
    /// Events in all: one per event, one per message of a run.
    len: usize,
}

impl<E> Default for Batch<E> {
    fn default() -> Self {
        Batch {
            first: None,
            rest: Vec::new(),
            len: 0,
        }
    }
}

impl<E> From<E> for Batch<E> {
    /// A batch of one event.
    fn from(event: E) -> Self {
        Batch {
            first: Some(Item::Event(event)),
            rest: Vec::new(),
            len: 1,
        }
    }
}

impl<E> Batch<E> {
    /// Events in the batch.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no event.
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn push_item(&mut self, item: Item<E>, hint: &AtomicUsize) {
        if self.first.is_none() {
            self.first = Some(item);
            return;
        }
        // A batch handed over leaves no buffer behind (an idle connection keeps none); the
        // next takes room for as many entries as the last one had when its second arrives,
        // rather than growing (and copying) from 4 to 256.
        if self.rest.capacity() == 0 {
            self.rest
                .reserve_exact(hint.load(Ordering::Relaxed).clamp(1, MAX_BATCH));
        }
        self.rest.push(item);
    }

    /// Adds an event.
    pub(crate) fn push(&mut self, event: E, hint: &AtomicUsize) {
        self.push_item(Item::Event(event), hint);
        self.len += 1;
    }

    /// Adds a run of `count` messages: `frames` holds exactly their whole frames (header
    /// included), in order, each checked as a message of `framing`.
    pub(crate) fn push_run(
        &mut self,
        frames: Bytes,
        count: usize,
        framing: Framing,
        tag: u64,
        hint: &AtomicUsize,
    ) {
        if count == 0 {
            return;
        }
        self.push_item(
            Item::Run(Run {
                frames,
                framing,
                tag,
            }),
            hint,
        );
        self.len += count;
    }

    /// Remembers this batch's size in `hint`, for the next one.
    pub(crate) fn hint(&self, hint: &AtomicUsize) {
        hint.store(self.rest.len(), Ordering::Relaxed);
    }

    /// Drops every event.
    pub(crate) fn clear(&mut self) {
        *self = Batch::default();
    }

    /// The events, in order.
    pub(crate) fn into_ready(self) -> Ready<E> {
        Ready {
            first: self.first,
            rest: self.rest.into_iter(),
            run: None,
        }
    }
}

/// The events of a batch, in order; a run's messages are made here, on the application's
/// thread, which also drops them.
pub(crate) struct Ready<E> {
    first: Option<Item<E>>,
    rest: std::vec::IntoIter<Item<E>>,
    /// The run being handed out, and where its next frame starts.
    run: Option<(Run, usize)>,
}

impl<E> Default for Ready<E> {
    fn default() -> Self {
        Batch::default().into_ready()
    }
}

impl<E: MessageEvent> Iterator for Ready<E> {
    type Item = E;

    #[inline]
    fn next(&mut self) -> Option<E> {
        loop {
            if let Some((run, at)) = &mut self.run {
                if let Some(message) = next_message(run, at) {
                    return Some(E::message_event(run.tag, message));
                }
                self.run = None;
            }
            let item = match self.first.take() {
                Some(item) => item,
                None => self.rest.next()?,
            };
            match item {
                Item::Event(event) => return Some(event),
                Item::Run(run) => self.run = Some((run, 0)),
            }
        }
    }
}

/// The message of the run's frame at `at`, and `at` moved past it; `None` at the run's end.
/// (The connection checked every frame: a frame that does not fit ends the run rather than
/// panicking, and cannot happen.)
#[inline]
fn next_message(run: &Run, at: &mut usize) -> Option<Message> {
    let frames = &run.frames[..];
    let header = frames.get(*at..)?.first_chunk::<HEADER_LEN>()?;
    let start = *at + HEADER_LEN;
    let end = start.checked_add(u32::from_le_bytes(*header) as usize)?;
    let frame = frames.get(start..end)?;
    *at = end;
    let (kind, start) = match run.framing {
        Framing::Tutorial => (MessageKind::Untyped, start),
        Framing::Typed => match frame.first()? {
            &frame_type::TEXT => (MessageKind::Text, start + 1),
            _ => (MessageKind::Binary, start + 1),
        },
    };
    let len = end - start;
    let payload = if len <= COPY_MAX {
        Bytes::copy_from_slice(&frames[start..end])
    } else {
        run.frames.slice(start..end)
    };
    Some(Message::from_parts(kind, payload))
}

impl<E> std::fmt::Debug for Ready<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ready")
            .field(
                "entries",
                &(self.rest.len() + usize::from(self.first.is_some())),
            )
            .field("in_run", &self.run.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl MessageEvent for (u64, Message) {
        fn message_event(tag: u64, message: Message) -> Self {
            (tag, message)
        }
    }

    /// Whole frames: each payload after its 4-byte little-endian length.
    fn frames(payloads: &[&[u8]]) -> Bytes {
        let mut out = Vec::new();
        for p in payloads {
            out.extend_from_slice(&(p.len() as u32).to_le_bytes());
            out.extend_from_slice(p);
        }
        Bytes::from(out)
    }

    #[test]
    fn events_and_runs_come_out_in_order() {
        let hint = AtomicUsize::new(0);
        let mut batch = Batch::from((1, Message::untyped("first")));
        batch.push_run(frames(&[b"ab", b"cde"]), 2, Framing::Tutorial, 7, &hint);
        batch.push((2, Message::untyped("between")), &hint);
        let typed = frames(&[&[frame_type::TEXT, b'h', b'i'], &[frame_type::BINARY, 9]]);
        batch.push_run(typed, 2, Framing::Typed, 8, &hint);
        // An empty run adds nothing.
        batch.push_run(Bytes::new(), 0, Framing::Tutorial, 7, &hint);
        assert_eq!(batch.len(), 6);
        let events: Vec<_> = batch.into_ready().collect();
        assert_eq!(
            events,
            vec![
                (1, Message::untyped("first")),
                (7, Message::untyped("ab")),
                (7, Message::untyped("cde")),
                (2, Message::untyped("between")),
                (8, Message::text("hi")),
                (8, Message::binary(vec![9u8])),
            ]
        );
    }

    #[test]
    fn a_batch_of_one_run_or_one_event_allocates_no_list() {
        let hint = AtomicUsize::new(100);
        let mut batch: Batch<(u64, Message)> = Batch::default();
        batch.push_run(frames(&[b"x"]), 1, Framing::Tutorial, 1, &hint);
        assert_eq!(batch.rest.capacity(), 0);
        assert_eq!(Batch::from((1, Message::untyped("e"))).rest.capacity(), 0);
    }

    #[test]
    fn large_messages_are_slices_of_the_run_and_small_ones_copies() {
        let big = vec![5u8; COPY_MAX + 1];
        let run = frames(&[b"small", &big]);
        let mut batch: Batch<(u64, Message)> = Batch::default();
        batch.push_run(run.clone(), 2, Framing::Tutorial, 3, &AtomicUsize::new(0));
        let events: Vec<_> = batch.into_ready().collect();
        let inside = |m: &Message| run.as_ptr_range().contains(&m.payload().as_ptr());
        assert!(!inside(&events[0].1));
        assert!(inside(&events[1].1));
        assert_eq!(events[1].1.payload().len(), COPY_MAX + 1);
    }

    #[test]
    fn a_run_cut_short_ends_without_a_panic() {
        // Cannot come from a connection (it checks every frame); the walk stops anyway.
        let mut cut = frames(&[b"whole", b"cut off"]).to_vec();
        cut.truncate(cut.len() - 3);
        let mut batch: Batch<(u64, Message)> = Batch::default();
        batch.push_run(
            Bytes::from(cut),
            2,
            Framing::Tutorial,
            3,
            &AtomicUsize::new(0),
        );
        let events: Vec<_> = batch.into_ready().collect();
        assert_eq!(events, vec![(3, Message::untyped("whole"))]);
    }
}

//! What travels from a connection to its application's event stream: a [`Batch`] of events,
//! in which a run of messages read together is one slice of the read buffer and a list of
//! where each message lies in it, made into events on the application's side ([`Ready`]).
//!
//! Why not one event per message, made by the connection: every message is then a `Bytes`
//! split from the read buffer, and all of them share the buffer's reference count. The
//! connection's thread raised that count once per message and the application's thread
//! lowered it once per message, so the count's cache line moved between the two cores
//! twice per message; and each event (104 bytes) was written on one core and read on the
//! other. That was most of the cost of the event stream with small messages: below the
//! hand-written tokio baseline (0.95x at 64 B, docs/benchmarks.md). Here the connection
//! splits the buffer once per run and writes 12 bytes per message; the application's side
//! slices each message from the run, raising and lowering a count that only its own thread
//! touches until the run is done.

use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;

use crate::message::{Message, MessageKind};

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

/// Where one message of a run lies in the run's buffer.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: u32,
    len: u32,
    kind: MessageKind,
}

/// One entry of a batch: an event, or a run of messages in one buffer.
enum Item<E> {
    Event(E),
    Run {
        buffer: Bytes,
        /// The run's messages are the batch's spans from the previous run's `end` to this.
        end: u32,
        /// Whom they came from (see [`MessageEvent`]).
        tag: u64,
    },
}

/// Events of one connection, in the order they happened, on their way to the application.
pub(crate) struct Batch<E> {
    items: Vec<Item<E>>,
    /// The messages of every run, in order.
    spans: Vec<Span>,
    /// Events in all: one per event item, one per message of a run.
    len: usize,
}

impl<E> Default for Batch<E> {
    fn default() -> Self {
        Batch {
            items: Vec::new(),
            spans: Vec::new(),
            len: 0,
        }
    }
}

impl<E> From<E> for Batch<E> {
    /// A batch of one event.
    fn from(event: E) -> Self {
        Batch {
            items: vec![Item::Event(event)],
            spans: Vec::new(),
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

    /// Adds an event. A batch handed over leaves no buffer behind (an idle connection keeps
    /// none); the next takes room for `hint` entries when its first arrives, rather than
    /// growing (and copying) from 4 to 256.
    pub(crate) fn push(&mut self, event: E, hint: &AtomicUsize) {
        if self.items.capacity() == 0 {
            self.items
                .reserve_exact(hint.load(Ordering::Relaxed).clamp(1, MAX_BATCH));
        }
        self.items.push(Item::Event(event));
        self.len += 1;
    }

    /// Starts adding a run: room for `hint` messages.
    pub(crate) fn run(&mut self, hint: &AtomicUsize) -> RunBuilder<'_, E> {
        if self.spans.capacity() == 0 {
            self.spans
                .reserve_exact(hint.load(Ordering::Relaxed).clamp(1, MAX_BATCH));
        }
        let first = self.spans.len();
        RunBuilder { batch: self, first }
    }

    /// Remembers this batch's size in `hint`, for the next one.
    pub(crate) fn hint(&self, hint: &AtomicUsize) {
        let size = if self.spans.is_empty() {
            self.items.len()
        } else {
            self.spans.len()
        };
        hint.store(size, Ordering::Relaxed);
    }

    /// Drops every event.
    pub(crate) fn clear(&mut self) {
        *self = Batch::default();
    }

    /// The events, in order.
    pub(crate) fn into_ready(self) -> Ready<E> {
        Ready {
            items: self.items.into_iter(),
            spans: self.spans,
            next: 0,
            run: None,
        }
    }
}

/// A run of messages being added to a [`Batch`]: [`push`](Self::push) each message's place
/// in the read buffer, then [`finish`](Self::finish) with the buffer.
pub(crate) struct RunBuilder<'b, E> {
    batch: &'b mut Batch<E>,
    /// The batch's first span of this run.
    first: usize,
}

impl<E> RunBuilder<'_, E> {
    /// Messages added so far.
    pub(crate) fn len(&self) -> usize {
        self.batch.spans.len() - self.first
    }

    /// Adds a message of `kind` at `start..start + len` of the run's buffer; `false` (and
    /// nothing added) when that does not fit the run's 32-bit offsets.
    #[inline]
    pub(crate) fn push(&mut self, kind: MessageKind, start: usize, len: usize) -> bool {
        let (Ok(start), Ok(len)) = (u32::try_from(start), u32::try_from(len)) else {
            return false;
        };
        if start.checked_add(len).is_none() {
            return false;
        }
        self.batch.spans.push(Span { start, len, kind });
        true
    }

    /// Ends the run with its buffer, which the spans pushed index into.
    pub(crate) fn finish(self, buffer: Bytes, tag: u64) {
        let count = self.len();
        if count == 0 {
            return;
        }
        // Fits: the spans' count is bounded by the batch's size.
        let end = self.batch.spans.len() as u32;
        self.batch.items.push(Item::Run { buffer, end, tag });
        self.batch.len += count;
    }
}

/// The events of a batch, in order; a run's messages are sliced from its buffer here.
pub(crate) struct Ready<E> {
    items: std::vec::IntoIter<Item<E>>,
    spans: Vec<Span>,
    /// The next span to hand out.
    next: usize,
    /// The run being handed out: its buffer, end and tag.
    run: Option<(Bytes, usize, u64)>,
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
            if let Some((buffer, end, tag)) = &self.run {
                if self.next < *end {
                    let span = self.spans[self.next];
                    self.next += 1;
                    let (start, len) = (span.start as usize, span.len as usize);
                    // Made here, on the application's thread, which also drops it.
                    let payload = if len <= COPY_MAX {
                        Bytes::copy_from_slice(&buffer[start..start + len])
                    } else {
                        buffer.slice(start..start + len)
                    };
                    let message = Message::from_parts(span.kind, payload);
                    return Some(E::message_event(*tag, message));
                }
                self.run = None;
            }
            match self.items.next()? {
                Item::Event(event) => return Some(event),
                Item::Run { buffer, end, tag } => self.run = Some((buffer, end as usize, tag)),
            }
        }
    }
}

impl<E> std::fmt::Debug for Ready<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ready")
            .field("items", &self.items.len())
            .field("spans", &(self.spans.len() - self.next))
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

    #[test]
    fn events_and_runs_come_out_in_order() {
        let hint = AtomicUsize::new(0);
        let mut batch = Batch::from((1, Message::untyped("first")));
        let mut run = batch.run(&hint);
        assert!(run.push(MessageKind::Untyped, 0, 2));
        assert!(run.push(MessageKind::Text, 2, 3));
        run.finish(Bytes::from_static(b"abcde"), 7);
        batch.push((2, Message::untyped("between")), &hint);
        let mut run = batch.run(&hint);
        assert!(run.push(MessageKind::Binary, 1, 1));
        run.finish(Bytes::from_static(b"xyz"), 7);
        // An empty run adds nothing.
        batch.run(&hint).finish(Bytes::from_static(b"unused"), 7);
        assert_eq!(batch.len(), 5);
        let events: Vec<_> = batch.into_ready().collect();
        assert_eq!(
            events,
            vec![
                (1, Message::untyped("first")),
                (7, Message::untyped("ab")),
                (
                    7,
                    Message::from_parts(MessageKind::Text, Bytes::from("cde"))
                ),
                (2, Message::untyped("between")),
                (
                    7,
                    Message::from_parts(MessageKind::Binary, Bytes::from("y"))
                ),
            ]
        );
    }

    #[test]
    fn a_span_beyond_32_bits_is_refused() {
        let hint = AtomicUsize::new(0);
        let mut batch: Batch<(u64, Message)> = Batch::default();
        let mut run = batch.run(&hint);
        assert!(!run.push(MessageKind::Untyped, 1 << 32, 1));
        assert!(!run.push(MessageKind::Untyped, u32::MAX as usize, 1));
        assert_eq!(run.len(), 0);
    }
}

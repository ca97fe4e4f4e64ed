//! The bounded outgoing queue of one connection.
//!
//! Bounded twice: by message count and by bytes (two semaphores whose permits are queue slots
//! and payload bytes). A peer that stops reading fills its outbox and then either makes the
//! sender wait or is disconnected, per [`FullPolicy`]; it never makes memory grow without
//! bound and never delays the outboxes of other peers.
//!
//! A message larger than the byte bound takes all of it: it waits until the outbox is empty
//! rather than being refused, so the largest legal frame can always be sent.
//!
//! The queue itself is a `VecDeque` behind a mutex rather than a `tokio::sync::mpsc` channel:
//! the channel allocates its first block (32 slots, about 1.8 KB with our items) when it is
//! created, so every idle connection paid for it; an empty queue allocates nothing until the
//! first message, and what a burst grew is given back as it drains (see [`Blocks`]). The waiting is still tokio's: senders wait in the semaphores (fair, and
//! cancel-safe: an abandoned `acquire` returns what it took), and the one receiver parks its
//! waker in the queue's state under the same lock the senders push under, so no wake-up is
//! lost.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;

use crate::outgoing::Outgoing;
use tokio::sync::{Semaphore, TryAcquireError};

/// An item whose size counts against an outbox's byte bound.
pub(crate) trait Weigh {
    /// Payload bytes this item stands for.
    fn weight(&self) -> usize;
}

impl Weigh for Bytes {
    fn weight(&self) -> usize {
        self.len()
    }
}

/// Size limits of an outgoing queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxLimits {
    /// Most messages queued at once. Default 1,024.
    pub messages: usize,
    /// Most payload bytes queued at once. Default 8 MiB.
    pub bytes: usize,
}

impl Default for OutboxLimits {
    fn default() -> Self {
        Self {
            messages: 1024,
            bytes: 8 * 1024 * 1024,
        }
    }
}

/// What a send does when the receiver's outgoing queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullPolicy {
    /// Wait until the queue has room (backpressure to the sender).
    Wait,
    /// Disconnect the slow receiver with reason `slow consumer` and fail the send.
    Disconnect,
}

/// Why a non-waiting send failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TrySendError {
    /// The queue is at one of its bounds.
    Full,
    /// The receiving side is gone.
    Closed,
}

/// Items per block of a queue ([`Blocks`]): 16 × 56-byte `Outgoing`s, 896 bytes, an
/// allocation of the allocator's small size classes.
const BLOCK: usize = 16;

/// Items in the first block of a queue that was empty: most queues hold one or two items at
/// a time (a reply, one broadcast in flight). With a block of 16 for each, one broadcast at a
/// time to 10,000 readers peaked at 90–95 MiB; with this, 74 MiB (docs/benchmarks.md, *Where
/// #17 stands*). A queue that grows past it goes on in blocks of [`BLOCK`].
const FIRST_BLOCK: usize = 2;

/// A FIFO queue held in blocks of [`BLOCK`] items: memory follows what is queued right now,
/// block by block, and a queue that empties holds nothing.
///
/// Why not one `VecDeque`: a burst grows a `VecDeque` by doubling (to 512 items, 28 KB, for a
/// broadcast window of 512; 1,024 at most) and it keeps that capacity until something shrinks
/// it. Kept, every connection that ever had a burst holds its peak; shrunk when the queue
/// empties (an earlier design kept 64 slots), every burst grew it again, and with 10,000
/// readers of broadcasts those regrowths were the server's main cost: 27 % of its CPU
/// zeroing the fresh pages of 28 KB reallocations (`perf`, docs/benchmarks.md, "Broadcast to
/// 10,000 clients"), plus each reallocation's copy. Blocks of 896 bytes come from and go back
/// to the allocator's per-thread free lists (the blocks a connection frees are the next
/// connection's, warm), nothing is ever copied to grow, and a drained queue has freed them
/// all: an idle connection's queue holds no heap memory, however large its last burst was.
#[derive(Debug)]
struct Blocks<T> {
    /// Oldest block first; only the last one is pushed to, only the first popped from.
    blocks: VecDeque<VecDeque<T>>,
    len: usize,
}

impl<T> Blocks<T> {
    const fn new() -> Self {
        Self {
            blocks: VecDeque::new(),
            len: 0,
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn push_back(&mut self, item: T) {
        match self.blocks.back_mut() {
            // Full at its capacity: the first block is smaller than the others.
            Some(block) if block.len() < block.capacity() => block.push_back(item),
            _ => {
                let size = if self.blocks.is_empty() {
                    // The list too starts with room for one block, not four.
                    self.blocks.reserve_exact(1);
                    FIRST_BLOCK
                } else {
                    BLOCK
                };
                let mut block = VecDeque::with_capacity(size);
                block.push_back(item);
                self.blocks.push_back(block);
            }
        }
        self.len += 1;
    }

    fn pop_front(&mut self) -> Option<T> {
        let front = self.blocks.front_mut()?;
        let item = front.pop_front()?;
        self.len -= 1;
        if front.is_empty() {
            self.blocks.pop_front();
            if self.blocks.is_empty() {
                // Drained: the list of blocks goes too (a burst of 1,024 items grew it to 64
                // entries, 2 KB).
                self.blocks = VecDeque::new();
            }
        }
        Some(item)
    }

    /// Heap bytes held (blocks at their capacity, and the list of them).
    #[cfg(test)]
    fn heap_bytes(&self) -> usize {
        self.blocks.capacity() * size_of::<VecDeque<T>>()
            + self
                .blocks
                .iter()
                .map(|b| b.capacity() * size_of::<T>())
                .sum::<usize>()
    }

    /// Everything queued, oldest first.
    fn take_all(&mut self) -> VecDeque<T> {
        self.len = 0;
        std::mem::take(&mut self.blocks)
            .into_iter()
            .flatten()
            .collect()
    }
}

/// What senders and the receiver share.
#[derive(Debug)]
struct Shared<T> {
    state: Mutex<State<T>>,
    /// Free queue slots (the count bound).
    slots: Semaphore,
    /// Free payload bytes (the byte bound).
    bytes: Semaphore,
    /// Live senders; the receiver sees the end of the queue when the last one is gone.
    senders: AtomicUsize,
    max_bytes: u32,
}

#[derive(Debug)]
struct State<T> {
    queue: Blocks<T>,
    /// The receiver, parked on an empty queue.
    waker: Option<Waker>,
    /// The receiver is gone: nothing is queued any more.
    closed: bool,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Nothing panics while holding the lock, but a poisoned queue is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `msg` whose permits are taken; fails if the receiver is gone.
    fn push(&self, msg: T) -> Result<(), TrySendError> {
        let mut state = self.lock();
        if state.closed {
            return Err(TrySendError::Closed);
        }
        state.queue.push_back(msg);
        let waker = state.waker.take();
        drop(state);
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }
}

/// Sending side; cheap to clone.
#[derive(Debug)]
pub(crate) struct OutboxSender<T = Outgoing> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for OutboxSender<T> {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::Relaxed);
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for OutboxSender<T> {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The last sender: a receiver parked on the empty queue must see the end. Taking
            // the lock orders this after any check the receiver made under it.
            let waker = self.shared.lock().waker.take();
            if let Some(waker) = waker {
                waker.wake();
            }
        }
    }
}

/// Receiving side, owned by the connection's writer.
#[derive(Debug)]
pub(crate) struct OutboxReceiver<T = Outgoing> {
    shared: Arc<Shared<T>>,
}

/// A new outbox with the given limits.
pub(crate) fn outbox<T>(limits: OutboxLimits) -> (OutboxSender<T>, OutboxReceiver<T>) {
    let max_bytes = limits
        .bytes
        .clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize)) as u32;
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: Blocks::new(),
            waker: None,
            closed: false,
        }),
        slots: Semaphore::new(limits.messages.clamp(1, Semaphore::MAX_PERMITS)),
        bytes: Semaphore::new(max_bytes as usize),
        senders: AtomicUsize::new(1),
        max_bytes,
    });
    (
        OutboxSender {
            shared: shared.clone(),
        },
        OutboxReceiver { shared },
    )
}

/// Byte permits a payload takes (at most the whole budget, see the module docs).
fn permits(len: usize, max: u32) -> u32 {
    len.min(max as usize) as u32
}

impl<T: Weigh> OutboxSender<T> {
    /// Messages queued right now (for an operator's view; takes the queue's lock).
    pub(crate) fn len(&self) -> usize {
        self.shared.lock().queue.len()
    }

    /// Queues `msg`, waiting for room. Fails only when the receiver is gone.
    ///
    /// Cancel-safe: dropped while waiting, it has queued nothing and holds no room.
    pub(crate) async fn send(&self, msg: T) -> Result<(), TrySendError> {
        let s = &*self.shared;
        let n = permits(msg.weight(), s.max_bytes);
        let bytes = s
            .bytes
            .acquire_many(n)
            .await
            .map_err(|_| TrySendError::Closed)?;
        let slot = s.slots.acquire().await.map_err(|_| TrySendError::Closed)?;
        // The receiver returns the permits when it takes the message out.
        bytes.forget();
        slot.forget();
        s.push(msg)
    }

    /// Queues `msg` if both bounds allow it right now.
    pub(crate) fn try_send(&self, msg: T) -> Result<(), TrySendError> {
        let s = &*self.shared;
        let full = |e| match e {
            TryAcquireError::Closed => TrySendError::Closed,
            TryAcquireError::NoPermits => TrySendError::Full,
        };
        let bytes = s
            .bytes
            .try_acquire_many(permits(msg.weight(), s.max_bytes))
            .map_err(full)?;
        let slot = s.slots.try_acquire().map_err(full)?;
        bytes.forget();
        slot.forget();
        s.push(msg)
    }

    /// Sends with the given policy; `Full` is only returned under [`FullPolicy::Disconnect`].
    pub(crate) async fn send_with(&self, msg: T, policy: FullPolicy) -> Result<(), TrySendError> {
        match policy {
            FullPolicy::Wait => self.send(msg).await,
            FullPolicy::Disconnect => self.try_send(msg),
        }
    }
}

impl<T: Weigh> OutboxReceiver<T> {
    /// The next message, waiting for one; `None` once every sender is gone.
    ///
    /// Cancel-safe: a message is only taken out when it is returned. (The connection's
    /// writer polls [`poll_recv`](Self::poll_recv) by hand; this is the tests' way.)
    #[cfg(test)]
    pub(crate) async fn recv(&mut self) -> Option<T> {
        let mut parked = Waiting {
            shared: &self.shared,
            waiting: false,
        };
        std::future::poll_fn(|cx| {
            let polled = poll_recv(parked.shared, cx);
            parked.waiting = polled.is_pending();
            polled
        })
        .await
    }

    /// [`recv`](Self::recv) by hand, for a caller that polls it among other things (the
    /// write loop, which holds no future for it). A caller that stops polling while the
    /// receiver is parked (the last poll was pending) calls [`unpark`](Self::unpark), as
    /// `recv`'s future does when dropped.
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        poll_recv(&self.shared, cx)
    }

    /// Takes back a waker that [`poll_recv`](Self::poll_recv) left parked.
    pub(crate) fn unpark(&mut self) {
        self.shared.lock().waker = None;
    }

    /// The next message if one is queued right now.
    pub(crate) fn try_recv(&mut self) -> Option<T> {
        let msg = pop(&mut self.shared.lock())?;
        release(&self.shared, &msg);
        Some(msg)
    }

    /// Messages queued right now.
    pub(crate) fn len(&self) -> usize {
        self.shared.lock().queue.len()
    }

    /// Nothing is queued right now.
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Takes the oldest message out.
fn pop<T>(state: &mut State<T>) -> Option<T> {
    state.queue.pop_front()
}

/// Returns a taken message's room to the senders.
fn release<T: Weigh>(shared: &Shared<T>, msg: &T) {
    shared
        .bytes
        .add_permits(permits(msg.weight(), shared.max_bytes) as usize);
    shared.slots.add_permits(1);
}

/// One poll for the next message: parks the receiver's waker on an empty queue (see
/// [`OutboxReceiver::poll_recv`]).
fn poll_recv<T: Weigh>(shared: &Shared<T>, cx: &mut Context<'_>) -> Poll<Option<T>> {
    let mut state = shared.lock();
    if let Some(msg) = pop(&mut state) {
        // A waker left by an earlier poll is not needed any more.
        state.waker = None;
        drop(state);
        release(shared, &msg);
        return Poll::Ready(Some(msg));
    }
    if shared.senders.load(Ordering::Acquire) == 0 {
        state.waker = None;
        return Poll::Ready(None);
    }
    match &mut state.waker {
        Some(w) if w.will_wake(cx.waker()) => {}
        w => *w = Some(cx.waker().clone()),
    }
    Poll::Pending
}

/// A `recv` in progress. Dropped while its waker is parked in the queue (a `select!` that
/// took another branch, a task that ended), it takes the waker back: a parked waker keeps
/// its whole task allocated, and a receiver that outlives its task (a session's outbox,
/// parked while the client is away) would otherwise keep the ended task's memory.
#[cfg(test)]
struct Waiting<'a, T> {
    shared: &'a Shared<T>,
    waiting: bool,
}

#[cfg(test)]
impl<T> Drop for Waiting<'_, T> {
    fn drop(&mut self) {
        if self.waiting {
            self.shared.lock().waker = None;
        }
    }
}

impl<T> OutboxReceiver<T> {
    /// Closes the queue and takes everything in it, oldest first: a send after this fails
    /// (`Closed`), so nothing queued can be lost between the taking and the closing (a
    /// session handed over to another node carries these along).
    pub(crate) fn close_and_drain(&mut self) -> VecDeque<T> {
        // Wake senders waiting for room: nobody will ever return it.
        self.shared.bytes.close();
        self.shared.slots.close();
        let mut state = self.shared.lock();
        state.closed = true;
        state.waker = None;
        state.queue.take_all()
    }
}

impl<T> Drop for OutboxReceiver<T> {
    fn drop(&mut self) {
        // Dropped outside the lock: an item's drop may wake others (a flush waiter).
        drop(self.close_and_drain());
    }
}

impl Weigh for Outgoing {
    fn weight(&self) -> usize {
        match self {
            Outgoing::Message(m) | Outgoing::Request { message: m, .. } => m.len(),
            Outgoing::Response { result: Ok(m), .. } => m.len(),
            Outgoing::Response {
                result: Err((_, t)),
                ..
            } => t.len(),
            Outgoing::Flush(_) => 0,
            Outgoing::Transfer(frame) => frame.weight(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;
    use std::sync::atomic::AtomicBool;
    use std::task::{Context, Wake};

    /// A waker that records whether it was woken, to check wake-ups without timing.
    #[derive(Default)]
    struct Woken(AtomicBool);

    impl Wake for Woken {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    impl Woken {
        fn take(&self) -> bool {
            self.0.swap(false, Ordering::SeqCst)
        }
    }

    fn poll<F: Future>(f: std::pin::Pin<&mut F>, woken: &Arc<Woken>) -> Poll<F::Output> {
        f.poll(&mut Context::from_waker(&Waker::from(woken.clone())))
    }

    impl Weigh for Arc<()> {
        fn weight(&self) -> usize {
            0
        }
    }

    fn limits(messages: usize, bytes: usize) -> OutboxLimits {
        OutboxLimits { messages, bytes }
    }

    #[tokio::test]
    async fn bounded_by_count_and_bytes() {
        let (tx, mut rx) = outbox::<Bytes>(OutboxLimits {
            messages: 3,
            bytes: 10,
        });
        tx.try_send(Bytes::from_static(b"1234")).unwrap();
        tx.try_send(Bytes::from_static(b"1234")).unwrap();
        // 8 of 10 bytes used: a 4-byte message does not fit, a 2-byte one does.
        assert_eq!(
            tx.try_send(Bytes::from_static(b"1234")),
            Err(TrySendError::Full)
        );
        tx.try_send(Bytes::from_static(b"12")).unwrap();
        // Bytes are full and so is the count.
        assert_eq!(tx.try_send(Bytes::new()), Err(TrySendError::Full));
        assert_eq!(rx.recv().await.unwrap(), "1234");
        tx.try_send(Bytes::from_static(b"1234")).unwrap();
        assert_eq!(rx.len(), 3);
    }

    #[tokio::test]
    async fn oversized_message_takes_the_whole_budget() {
        let (tx, mut rx) = outbox::<Bytes>(OutboxLimits {
            messages: 8,
            bytes: 4,
        });
        tx.try_send(Bytes::from_static(b"too long for the budget"))
            .unwrap();
        assert_eq!(
            tx.try_send(Bytes::from_static(b"x")),
            Err(TrySendError::Full)
        );
        rx.recv().await.unwrap();
        tx.try_send(Bytes::from_static(b"x")).unwrap();
    }

    #[tokio::test]
    async fn waiting_sender_fails_when_receiver_drops() {
        let (tx, rx) = outbox::<Bytes>(OutboxLimits {
            messages: 1,
            bytes: 100,
        });
        tx.try_send(Bytes::from_static(b"a")).unwrap();
        let waiting = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(Bytes::from_static(b"b")).await }
        });
        drop(rx);
        assert_eq!(waiting.await.unwrap(), Err(TrySendError::Closed));
    }

    #[test]
    fn parked_receiver_is_woken_by_a_send() {
        let (tx, mut rx) = outbox::<Bytes>(limits(4, 100));
        let woken = Arc::new(Woken::default());
        let mut recv = pin!(rx.recv());
        assert!(poll(recv.as_mut(), &woken).is_pending());
        assert!(!woken.take());
        tx.try_send(Bytes::from_static(b"a")).unwrap();
        assert!(woken.take());
        assert_eq!(
            poll(recv.as_mut(), &woken),
            Poll::Ready(Some(Bytes::from_static(b"a")))
        );
        // The send took the waker: nothing holds it any more.
        assert_eq!(Arc::strong_count(&woken), 1);
    }

    #[test]
    fn parked_receiver_sees_the_end_when_the_last_sender_drops() {
        let (tx, mut rx) = outbox::<Bytes>(limits(4, 100));
        let other = tx.clone();
        tx.try_send(Bytes::from_static(b"a")).unwrap();
        assert_eq!(rx.try_recv().unwrap(), "a");
        let woken = Arc::new(Woken::default());
        let mut recv = pin!(rx.recv());
        assert!(poll(recv.as_mut(), &woken).is_pending());
        drop(tx);
        // Another sender is left: no end yet.
        assert!(!woken.take());
        assert!(poll(recv.as_mut(), &woken).is_pending());
        drop(other);
        assert!(woken.take());
        assert_eq!(poll(recv.as_mut(), &woken), Poll::Ready(None));
    }

    #[test]
    fn an_abandoned_recv_leaves_no_waker_behind() {
        let (tx, mut rx) = outbox::<Bytes>(limits(4, 100));
        let woken = Arc::new(Woken::default());
        {
            let mut recv = pin!(rx.recv());
            assert!(poll(recv.as_mut(), &woken).is_pending());
        }
        // Only the test holds the waker's task now.
        assert_eq!(Arc::strong_count(&woken), 1);
        tx.try_send(Bytes::from_static(b"a")).unwrap();
        assert!(!woken.take());
        let mut recv = pin!(rx.recv());
        assert_eq!(
            poll(recv.as_mut(), &woken),
            Poll::Ready(Some(Bytes::from_static(b"a")))
        );
        assert_eq!(Arc::strong_count(&woken), 1);
    }

    #[test]
    fn queued_messages_outlive_the_senders() {
        let (tx, mut rx) = outbox::<Bytes>(limits(4, 100));
        tx.try_send(Bytes::from_static(b"a")).unwrap();
        drop(tx);
        assert_eq!(rx.try_recv().unwrap(), "a");
        assert_eq!(rx.try_recv(), None);
    }

    #[test]
    fn waiting_senders_are_woken_by_room_of_either_kind() {
        // Full by count.
        let (tx, mut rx) = outbox::<Bytes>(limits(1, 100));
        tx.try_send(Bytes::from_static(b"a")).unwrap();
        let woken = Arc::new(Woken::default());
        let mut send = pin!(tx.send(Bytes::from_static(b"b")));
        assert!(poll(send.as_mut(), &woken).is_pending());
        assert_eq!(rx.try_recv().unwrap(), "a");
        assert!(woken.take());
        assert_eq!(poll(send.as_mut(), &woken), Poll::Ready(Ok(())));
        assert_eq!(rx.try_recv().unwrap(), "b");

        // Full by bytes.
        let (tx, mut rx) = outbox::<Bytes>(limits(8, 4));
        tx.try_send(Bytes::from_static(b"abc")).unwrap();
        let mut send = pin!(tx.send(Bytes::from_static(b"de")));
        assert!(poll(send.as_mut(), &woken).is_pending());
        assert_eq!(rx.try_recv().unwrap(), "abc");
        assert!(woken.take());
        assert_eq!(poll(send.as_mut(), &woken), Poll::Ready(Ok(())));
        assert_eq!(rx.len(), 1);
    }

    #[test]
    fn an_abandoned_send_keeps_no_room() {
        let woken = Arc::new(Woken::default());
        // Waiting for bytes, then waiting for a slot while holding its bytes: either way,
        // dropped (as a send losing a `select!` is), it gives back all it took.
        for (first, budget) in [(&b"abcd"[..], 4), (&b"abcd"[..], 8)] {
            let (tx, mut rx) = outbox::<Bytes>(limits(1, budget));
            tx.try_send(Bytes::from_static(first)).unwrap();
            {
                let mut send = pin!(tx.send(Bytes::from_static(b"ab")));
                assert!(poll(send.as_mut(), &woken).is_pending());
            }
            assert_eq!(rx.try_recv().unwrap(), "abcd");
            assert_eq!(rx.try_recv(), None);
            tx.try_send(Bytes::from(vec![0; budget])).unwrap();
            assert_eq!(rx.len(), 1);
        }
    }

    #[test]
    fn a_dropped_receiver_fails_sends_and_drops_what_was_queued() {
        let (tx, rx) = outbox::<Arc<()>>(limits(4, 100));
        let item = Arc::new(());
        tx.try_send(item.clone()).unwrap();
        drop(rx);
        assert_eq!(Arc::strong_count(&item), 1);
        assert_eq!(tx.try_send(item.clone()), Err(TrySendError::Closed));
        let woken = Arc::new(Woken::default());
        let mut send = pin!(tx.send(item.clone()));
        assert_eq!(
            poll(send.as_mut(), &woken),
            Poll::Ready(Err(TrySendError::Closed))
        );
    }

    #[test]
    fn a_drained_queue_gives_its_memory_back() {
        let (tx, mut rx) = outbox::<Bytes>(limits(1024, 1 << 20));
        for round in 0..3 {
            for i in 0..1000 {
                tx.try_send(Bytes::from(format!("{round}.{i}"))).unwrap();
            }
            // Memory follows what is queued: 1,000 items in 63 blocks.
            let held = rx.shared.lock().queue.heap_bytes();
            assert!(held >= 1000 * size_of::<Bytes>());
            assert!(held <= 1024 * size_of::<Bytes>() + 64 * size_of::<VecDeque<Bytes>>());
            for i in 0..500 {
                assert_eq!(rx.try_recv().unwrap(), format!("{round}.{i}"));
            }
            // Half drained, half the blocks freed (the list of them stays until drained).
            let list = 64 * size_of::<VecDeque<Bytes>>();
            assert!(
                rx.shared.lock().queue.heap_bytes() < held / 2 + BLOCK * size_of::<Bytes>() + list
            );
            for i in 500..1000 {
                assert_eq!(rx.try_recv().unwrap(), format!("{round}.{i}"));
            }
            assert_eq!(rx.try_recv(), None);
            // Drained: nothing kept.
            assert_eq!(rx.shared.lock().queue.heap_bytes(), 0);
        }
        // Interleaved pushes and pops keep the order across blocks.
        for i in 0..100 {
            tx.try_send(Bytes::from(format!("{i}"))).unwrap();
            if i % 3 == 0 {
                rx.try_recv().unwrap();
            }
        }
        assert_eq!(rx.len(), 100 - 34);
        let rest: Vec<_> = std::iter::from_fn(|| rx.try_recv()).collect();
        let want: Vec<_> = (34..100).map(|i| Bytes::from(format!("{i}"))).collect();
        assert_eq!(rest, want);
        // One item at a time takes a small block and a list of one.
        tx.try_send(Bytes::from("one")).unwrap();
        assert_eq!(
            rx.shared.lock().queue.heap_bytes(),
            size_of::<VecDeque<Bytes>>() + FIRST_BLOCK * size_of::<Bytes>()
        );
        assert_eq!(rx.try_recv().unwrap(), "one");
        assert_eq!(rx.shared.lock().queue.heap_bytes(), 0);
        // An outbox that never held a message holds no queue memory.
        let (_tx, rx) = outbox::<Bytes>(OutboxLimits::default());
        assert_eq!(rx.shared.lock().queue.heap_bytes(), 0);
    }

    #[test]
    fn close_and_drain_takes_everything_in_order() {
        let (tx, mut rx) = outbox::<Bytes>(limits(1024, 1 << 20));
        for i in 0..40 {
            tx.try_send(Bytes::from(format!("{i}"))).unwrap();
        }
        rx.try_recv().unwrap();
        let all: Vec<_> = rx.close_and_drain().into_iter().collect();
        let want: Vec<_> = (1..40).map(|i| Bytes::from(format!("{i}"))).collect();
        assert_eq!(all, want);
        assert_eq!(tx.try_send(Bytes::new()), Err(TrySendError::Closed));
    }
}

//! The engine of one side of a connection: [`Transfers`], the [`Inbox`] a connection puts
//! transfer frames in, the dispatcher task that routes each frame by transfer id, and the
//! routing table ([`State`]) that the sending and receiving tasks share through [`Shared`].
//! What the tasks do is in `sender.rs` and `receiver.rs`.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use tokio::sync::{OwnedMutexGuard, mpsc};

use super::receiver::offer;
use super::{Digest, Emit, TransferConfig};
use crate::outbox::OutboxSender;
use crate::outgoing::Outgoing;
use crate::protocol::transfer::{CHUNK_HEAD_LEN, TransferFrame};

/// What a connection hands the engine.
#[derive(Debug)]
pub(crate) enum Input {
    /// A transfer frame from the peer.
    Frame(TransferFrame),
    /// See [`Transfers::on_new_connection`]; in band, so that frames of the old connection
    /// still queued are handled first.
    NewConnection,
}

/// The engine's input, held by the connection (see `Drive::transfers`): a channel to the
/// engine's dispatcher task, both made with the first input.
///
/// Made lazily because most connections never transfer a file, and the channel's first block
/// and the task were 5.5 KB of every idle sockframe connection (5,000 idle clients: 14.7 KB
/// each with them made up front, 9.3 KB without).
pub(crate) struct Inbox {
    shared: Arc<Shared>,
    tx: std::sync::OnceLock<mpsc::Sender<Input>>,
}

impl Inbox {
    /// The channel to the dispatcher, starting both the first time.
    fn sender(&self) -> &mpsc::Sender<Input> {
        self.tx.get_or_init(|| {
            let (tx, rx) = mpsc::channel(INBOX_CAPACITY);
            tokio::spawn(dispatch(self.shared.clone(), rx));
            tx
        })
    }

    /// Waits for room for one input (reading pauses meanwhile); fails once the engine has
    /// stopped.
    pub(crate) async fn reserve(
        &self,
    ) -> std::result::Result<mpsc::Permit<'_, Input>, mpsc::error::SendError<()>> {
        self.sender().reserve().await
    }

    /// Room for one input if there is some right now (the reader tries this first: only a
    /// full inbox makes it wait, in a future of its own).
    pub(crate) fn try_reserve(
        &self,
    ) -> std::result::Result<mpsc::Permit<'_, Input>, mpsc::error::TrySendError<()>> {
        self.sender().try_reserve()
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        // With a dispatcher, dropping the channel ends it, and it closes the engine once the
        // inputs still queued are handled. Without one, nothing is queued: close now.
        if self.tx.get().is_none() {
            self.shared.close();
        }
    }
}

/// Frames queued from the connection to the engine before reading pauses.
const INBOX_CAPACITY: usize = 64;

/// One receive per file content at a time, across all connections of a server: an
/// offer resumed on a new connection waits until the dropped connection's receive of the
/// same partial file has let go of it.
#[derive(Debug, Default)]
pub(crate) struct Locks {
    map: Mutex<HashMap<Digest, Weak<tokio::sync::Mutex<()>>>>,
}

impl Locks {
    pub(super) async fn lock(&self, digest: Digest) -> OwnedMutexGuard<()> {
        let mutex = {
            let mut map = lock(&self.map);
            map.retain(|_, m| m.strong_count() > 0);
            match map.get(&digest).and_then(Weak::upgrade) {
                Some(m) => m,
                None => {
                    let m = Arc::new(tokio::sync::Mutex::new(()));
                    map.insert(digest, Arc::downgrade(&m));
                    m
                }
            }
        };
        mutex.lock_owned().await
    }
}

/// The transfer engine of one side of a connection (a client keeps its one across
/// reconnects). Cheap to clone.
#[derive(Clone)]
pub(crate) struct Transfers {
    pub(super) shared: Arc<Shared>,
    /// Shared by the clones: the engine closes when the last one is dropped.
    inbox: Arc<Inbox>,
}

impl fmt::Debug for Transfers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transfers").finish_non_exhaustive()
    }
}

/// What the engine's clones, its dispatcher and its sending and receiving tasks share.
pub(super) struct Shared {
    pub(super) config: TransferConfig,
    outbox: OutboxSender,
    pub(super) emit: Emit,
    pub(super) locks: Arc<Locks>,
    /// Ids of our offers; a fresh one for every offer, re-offers included, so that frames
    /// of an abandoned attempt can never be taken for the current one.
    pub(super) next_id: AtomicU64,
    /// Tokens telling the peer's offers apart across resets (ids may repeat).
    pub(super) next_token: AtomicU64,
    /// Largest frame body the peer accepts.
    frame_limit: AtomicUsize,
    pub(super) closed: AtomicBool,
    pub(super) state: Mutex<State>,
    /// The transfers in progress, for [`Transfers::in_progress`].
    pub(super) board: super::progress::Board,
}

#[derive(Default)]
pub(super) struct State {
    /// Our transfers, by the id of their current offer.
    pub(super) outgoing: HashMap<u64, mpsc::Sender<Reply>>,
    /// The peer's transfers, by its id.
    pub(super) incoming: HashMap<u64, Incoming>,
}

pub(super) enum Incoming {
    /// Waiting for the application's decision.
    Offered(u64),
    /// Accepted: chunks go to the receive task.
    Receiving(u64, mpsc::Sender<TransferFrame>),
}

/// What a sending task hears.
#[derive(Debug)]
pub(super) enum Reply {
    Frame(TransferFrame),
    /// A new connection without the old one's state: offer again.
    Restart,
    /// The connection ended for good.
    Closed,
}

impl Transfers {
    /// A new engine sending through `outbox`, reporting through `emit`; its dispatcher task
    /// starts with the first input (see [`Inbox`]) and runs until every clone
    /// is dropped (or [`close`](Self::close)).
    pub(crate) fn new(
        config: TransferConfig,
        outbox: OutboxSender,
        emit: Emit,
        locks: Arc<Locks>,
        frame_limit: usize,
    ) -> Transfers {
        let shared = Arc::new(Shared {
            config,
            outbox,
            emit,
            locks,
            next_id: AtomicU64::new(0),
            next_token: AtomicU64::new(0),
            frame_limit: AtomicUsize::new(frame_limit),
            closed: AtomicBool::new(false),
            state: Mutex::new(State::default()),
            board: Default::default(),
        });
        let inbox = Arc::new(Inbox {
            shared: shared.clone(),
            tx: std::sync::OnceLock::new(),
        });
        Transfers { shared, inbox }
    }

    /// The files this engine is sending or receiving right now.
    pub(crate) fn in_progress(&self) -> Vec<super::TransferStatus> {
        self.shared.board.statuses()
    }

    /// Where the connection puts the transfer frames it reads.
    pub(crate) fn inbox(&self) -> &Inbox {
        &self.inbox
    }

    /// The peer's frame limit changed (a client reconnected to a server).
    pub(crate) fn set_frame_limit(&self, limit: usize) {
        self.shared.frame_limit.store(limit, Ordering::Relaxed);
    }

    /// The connection is new and its peer has none of the old connection's transfer state:
    /// incoming transfers from before are abandoned (their partial files stay, so a new
    /// offer resumes them) and every unfinished outgoing transfer is offered again, to go
    /// on from what the receiver already has on disk.
    ///
    /// Not to be called when a session was resumed and the old connection's frames are
    /// retransmitted: the transfers then simply continue.
    pub(crate) async fn on_new_connection(&self) {
        match self.inbox.tx.get() {
            Some(tx) => {
                let _ = tx.send(Input::NewConnection).await;
            }
            // No input yet, so none queued to come first: no dispatcher is needed for this.
            None => self.shared.reset(),
        }
    }

    /// Ends for good: outgoing transfers fail with
    /// [`Error::Disconnected`](crate::Error::Disconnected), incoming ones stop (keeping their
    /// partial files).
    pub(crate) fn close(&self) {
        self.shared.close();
    }

    // `send_file` is in `sender.rs`, with the rest of the sending side.
}

impl Shared {
    /// Queues a frame for the peer; `false` once the connection is gone for good.
    #[inline]
    pub(super) async fn send_frame(&self, frame: TransferFrame) -> bool {
        self.outbox.send(Outgoing::Transfer(frame)).await.is_ok()
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let mut state = lock(&self.state);
        // A sending task whose queue is full (a flooding peer) sees the queue closed instead,
        // which ends it the same way.
        for (_, tx) in state.outgoing.drain() {
            let _ = tx.try_send(Reply::Closed);
        }
        // Dropping the receive tasks' senders ends them; they keep their partial files.
        state.incoming.clear();
    }

    fn reset(&self) {
        let mut state = lock(&self.state);
        for (_, tx) in state.outgoing.drain() {
            let _ = tx.try_send(Reply::Restart);
        }
        state.incoming.clear();
    }

    /// Forgets the peer's transfer `id` if it is still the one with `token`.
    pub(super) fn forget(&self, id: u64, token: u64) {
        let mut state = lock(&self.state);
        let current = match state.incoming.get(&id) {
            Some(Incoming::Offered(t) | Incoming::Receiving(t, _)) => *t,
            None => return,
        };
        if current == token {
            state.incoming.remove(&id);
        }
    }

    /// Bytes of file data per chunk: the configured size, cut to fit the peer's frames.
    pub(super) fn chunk_size(&self) -> usize {
        let limit = self.frame_limit.load(Ordering::Relaxed);
        self.config
            .chunk_size
            .min(limit.saturating_sub(CHUNK_HEAD_LEN + 64))
            .max(1)
    }
}

/// Routes what the connection hands over until every sender of the inbox is gone.
async fn dispatch(shared: Arc<Shared>, mut rx: mpsc::Receiver<Input>) {
    while let Some(input) = rx.recv().await {
        match input {
            Input::NewConnection => shared.reset(),
            Input::Frame(frame) => route(&shared, frame).await,
        }
    }
    shared.close();
}

async fn route(shared: &Arc<Shared>, frame: TransferFrame) {
    if shared.closed.load(Ordering::Acquire) {
        // Frames still queued when the connection ended: the application has been told
        // of the disconnect and must hear nothing more of this connection.
        return;
    }
    match frame {
        TransferFrame::Offer {
            id,
            size,
            digest,
            name,
        } => offer(shared, id, size, Digest(digest), name).await,
        TransferFrame::Chunk { id, .. }
        | TransferFrame::Done { id }
        | TransferFrame::Cancel { id, .. } => {
            let tx = match lock(&shared.state).incoming.get(&id) {
                Some(Incoming::Receiving(_, tx)) => tx.clone(),
                // A frame of an attempt abandoned with its connection, or of an offer not
                // accepted: nothing to do with it.
                _ => {
                    tracing::debug!(id, "transfer frame for no active receive; ignored");
                    return;
                }
            };
            // Waits while the disk is behind, so reading pauses and TCP slows the sender.
            // A sender that keeps to its window never fills this queue.
            let _ = tx.send(frame).await;
        }
        TransferFrame::Accept { id, .. }
        | TransferFrame::Refuse { id, .. }
        | TransferFrame::Progress { id, .. }
        | TransferFrame::Result { id, .. } => {
            if let Some(tx) = lock(&shared.state).outgoing.get(&id) {
                let _ = tx.try_send(Reply::Frame(frame));
            }
        }
    }
}

/// Locks a mutex, ignoring poisoning: every critical section here is a single map
/// operation that leaves the data consistent even if a panic interrupted it.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

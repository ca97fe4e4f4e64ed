//! File transfer over a sockframe connection, in both directions: streamed from disk in
//! chunks with a bounded window in flight, interleaved with ordinary messages, verified with
//! BLAKE3, resumable.
//!
//! - Sending: [`Server::send_file`](crate::server::Server::send_file) or
//!   [`Client::send_file`](crate::client::Client::send_file) hash the file, offer it, and
//!   return a [`TransferHandle`]; its [`finish`](TransferHandle::finish) resolves once the
//!   receiver has verified the digest and put the file in place.
//! - Receiving: an offer arrives as a `FileOffer` event holding a [`FileOffer`]; the
//!   application calls [`accept`](FileOffer::accept) or [`reject`](FileOffer::reject)
//!   (dropping it rejects). Files go to [`TransferConfig::save_dir`]; without one every
//!   offer is refused before the application hears of it. The outcome is a `FileReceived`
//!   or a `FileFailed` event.
//!
//! The wire format is [`crate::protocol::transfer`]; `docs/transfer.md` describes the
//! design, the safety rules and measured figures.
//!
//! ## Memory and fairness
//!
//! A sender has at most [`TransferConfig::window`] chunks of
//! [`TransferConfig::chunk_size`] bytes in flight beyond the receiver's last `PROGRESS`,
//! which the receiver sends only once the bytes are written to its disk. Memory therefore
//! stays flat whatever the file size, a slow disk slows the sender down, and a message
//! queued behind a transfer waits for at most one window per transfer, not for the file.
//!
//! ## Resume
//!
//! The receiver writes into `.sockframe-<digest>.part` in its save directory and keeps it
//! when a connection drops. A later offer of the same digest (same file content, any name)
//! is answered with `ACCEPT` at the partial file's length, and only the rest is sent. A
//! client that reconnects re-offers its unfinished transfers by itself
//! (the engine's `on_new_connection`); a re-run of the CLI after a crash does the same by
//! offering the file again.

mod name;
mod source;
mod store;

pub use name::{BadName, MAX_NAME_LEN, check_name};

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::{OwnedMutexGuard, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::outbox::OutboxSender;
use crate::outgoing::Outgoing;
use crate::protocol::transfer::{CHUNK_HEAD_LEN, TransferFrame, refuse_code};
use crate::{Error, Result};
use store::{FinishError, PartFile};

/// How long an accepted offer waits for another receive of the same file (typically the
/// one its own dropped connection left behind, still winding down) before it is refused.
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// File transfer settings of a server or a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferConfig {
    /// Where received files go. Default none: every offer is refused (`not accepting`)
    /// without the application being asked.
    pub save_dir: Option<PathBuf>,
    /// Largest file accepted, in bytes. Default 64 GiB.
    pub max_file_size: u64,
    /// Replace an existing file of the offered name. Default `false`: such offers are
    /// refused (`exists`).
    pub overwrite: bool,
    /// Free space that must remain on the save directory's file system after the file is
    /// written, checked before accepting. Default 64 MiB.
    pub min_free_space: u64,
    /// Bytes of file data per chunk frame when sending. Default 128 KiB (cut to fit the
    /// peer's frame limit).
    pub chunk_size: usize,
    /// Chunks a sender may have in flight beyond the receiver's last confirmation. Default
    /// 8 (1 MiB with the default chunk size): enough to keep loopback and LAN links busy,
    /// small enough that a message queued behind it is delayed by about a millisecond.
    pub window: usize,
}

impl Default for TransferConfig {
    fn default() -> Self {
        TransferConfig {
            save_dir: None,
            max_file_size: 64 << 30,
            overwrite: false,
            min_free_space: 64 << 20,
            chunk_size: 128 << 10,
            window: 8,
        }
    }
}

impl TransferConfig {
    /// The default settings, receiving into `dir`.
    pub fn receive_into(dir: impl Into<PathBuf>) -> Self {
        TransferConfig {
            save_dir: Some(dir.into()),
            ..Self::default()
        }
    }
}

/// A BLAKE3 digest; shown as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(*blake3::hash(bytes).as_bytes())
    }

    /// The digest of the file at `path` (reads it whole; blocking).
    pub fn of_file(path: &Path) -> std::io::Result<Digest> {
        source::hash_file(path).map(|(_, digest)| digest)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

/// A file the peer offers. Decide with [`accept`](Self::accept) or
/// [`reject`](Self::reject); dropping it rejects it.
#[derive(Debug)]
pub struct FileOffer {
    name: String,
    size: u64,
    digest: Digest,
    resume_from: u64,
    decision: Option<oneshot::Sender<Decision>>,
}

#[derive(Debug)]
enum Decision {
    Accept,
    Reject(String),
}

impl FileOffer {
    /// The offered name (already checked to be a plain, safe file name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// BLAKE3 of the whole file, as the sender computed it.
    pub fn digest(&self) -> Digest {
        self.digest
    }

    /// Bytes a partial file from an earlier attempt already holds (0 for a fresh transfer);
    /// accepting resumes from there.
    pub fn resume_from(&self) -> u64 {
        self.resume_from
    }

    /// Accepts: the file is received into the save directory. Checks that need the disk
    /// (free space, a file created meanwhile) still follow; their failure is reported to
    /// both sides.
    pub fn accept(mut self) {
        if let Some(tx) = self.decision.take() {
            let _ = tx.send(Decision::Accept);
        }
    }

    /// Refuses the offer; the sender's transfer fails with `reason`.
    pub fn reject(mut self, reason: impl Into<String>) {
        if let Some(tx) = self.decision.take() {
            let _ = tx.send(Decision::Reject(reason.into()));
        }
    }
}

impl PartialEq for FileOffer {
    fn eq(&self, other: &Self) -> bool {
        (&self.name, self.size, self.digest) == (&other.name, other.size, other.digest)
    }
}

/// A file received, verified and in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedFile {
    /// The name it was offered (and saved) under.
    pub name: String,
    /// Where it is now.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// Its BLAKE3 digest, checked against the offer.
    pub digest: Digest,
    /// Bytes that an earlier, interrupted attempt had already written (0 if none).
    pub resumed_from: u64,
}

/// A file that was accepted but not received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileFailure {
    /// The offered name.
    pub name: String,
    /// What went wrong.
    pub reason: String,
    /// Whether a partial file stays in the save directory, from which an offer of the same
    /// file resumes.
    pub resumable: bool,
}

/// What the sender learns when the receiver has verified a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileReceipt {
    /// The name it was offered under.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// BLAKE3 of the file, now verified by the receiver.
    pub digest: Digest,
    /// Where the last attempt started: bytes the receiver already had (0 if none).
    pub resumed_from: u64,
    /// How many times the file was offered (more than 1 after reconnects).
    pub attempts: u32,
}

/// Bytes of a transfer the receiver has confirmed written, out of the total.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes confirmed written by the receiver.
    pub confirmed: u64,
    /// File size.
    pub total: u64,
}

/// A file being sent. Dropping the handle does not stop the transfer; [`cancel`](Self::cancel)
/// (Self::cancel) does.
#[derive(Debug)]
pub struct TransferHandle {
    state: Arc<SendState>,
    task: JoinHandle<Result<FileReceipt>>,
}

impl TransferHandle {
    /// The name the file is offered under.
    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// The file's BLAKE3 digest.
    pub fn digest(&self) -> Digest {
        self.state.digest
    }

    /// Bytes confirmed written by the receiver, and the total.
    pub fn progress(&self) -> Progress {
        Progress {
            confirmed: self.state.confirmed.load(Ordering::Relaxed),
            total: self.state.size,
        }
    }

    /// A reader of [`progress`](Self::progress) that outlives a borrow of the handle: to
    /// show progress while [`finish`](Self::finish) is being awaited.
    pub fn progress_reader(&self) -> impl Fn() -> Progress + Send + Sync + 'static {
        let state = self.state.clone();
        move || Progress {
            confirmed: state.confirmed.load(Ordering::Relaxed),
            total: state.size,
        }
    }

    /// Stops the transfer: the receiver is told and deletes its partial file, and
    /// [`finish`](Self::finish) fails.
    pub fn cancel(&self) {
        self.state.cancel.cancel();
    }

    /// Waits until the receiver has verified the digest and put the file in place. Fails
    /// with [`Error::Refused`] when the offer is refused, [`Error::TransferFailed`] when the
    /// receiver reports an error (a digest mismatch, a full disk), [`Error::File`] when the
    /// file cannot be read, and [`Error::Disconnected`] when the connection ends for good.
    pub async fn finish(self) -> Result<FileReceipt> {
        match self.task.await {
            Ok(result) => result,
            Err(e) => Err(Error::Io(std::io::Error::other(e))),
        }
    }
}

/// What the engine tells the application; the server and the client wrap it in their event
/// types.
#[derive(Debug)]
pub(crate) enum TransferEvent {
    Offer(FileOffer),
    Received(ReceivedFile),
    Failed(FileFailure),
}

/// Hands a [`TransferEvent`] to the application (waits while its event stream is full).
pub(crate) type Emit = Arc<dyn Fn(TransferEvent) -> BoxFuture<'static, ()> + Send + Sync>;

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
    async fn lock(&self, digest: Digest) -> OwnedMutexGuard<()> {
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
    shared: Arc<Shared>,
    /// Shared by the clones: the engine closes when the last one is dropped.
    inbox: Arc<Inbox>,
}

impl fmt::Debug for Transfers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transfers").finish_non_exhaustive()
    }
}

struct Shared {
    config: TransferConfig,
    outbox: OutboxSender,
    emit: Emit,
    locks: Arc<Locks>,
    /// Ids of our offers; a fresh one for every offer, re-offers included, so that frames
    /// of an abandoned attempt can never be taken for the current one.
    next_id: AtomicU64,
    /// Tokens telling the peer's offers apart across resets (ids may repeat).
    next_token: AtomicU64,
    /// Largest frame body the peer accepts.
    frame_limit: AtomicUsize,
    closed: AtomicBool,
    state: Mutex<State>,
}

/// Replies queued for one sending task. An honest receiver has at most a window of
/// `PROGRESS` frames and a `RESULT` outstanding; beyond this, replies are dropped, so a
/// flood of them costs nothing (a dropped `PROGRESS` is superseded by the next one).
const REPLY_CAPACITY: usize = 64;

#[derive(Default)]
struct State {
    /// Our transfers, by the id of their current offer.
    outgoing: HashMap<u64, mpsc::Sender<Reply>>,
    /// The peer's transfers, by its id.
    incoming: HashMap<u64, Incoming>,
}

enum Incoming {
    /// Waiting for the application's decision.
    Offered(u64),
    /// Accepted: chunks go to the receive task.
    Receiving(u64, mpsc::Sender<TransferFrame>),
}

/// What a sending task hears.
#[derive(Debug)]
enum Reply {
    Frame(TransferFrame),
    /// A new connection without the old one's state: offer again.
    Restart,
    /// The connection ended for good.
    Closed,
}

/// The state of one file being sent, shared with its handle.
#[derive(Debug)]
struct SendState {
    name: String,
    path: PathBuf,
    size: u64,
    digest: Digest,
    confirmed: AtomicU64,
    cancel: CancellationToken,
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
        });
        let inbox = Arc::new(Inbox {
            shared: shared.clone(),
            tx: std::sync::OnceLock::new(),
        });
        Transfers { shared, inbox }
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

    /// Ends for good: outgoing transfers fail with [`Error::Disconnected`], incoming ones
    /// stop (keeping their partial files).
    pub(crate) fn close(&self) {
        self.shared.close();
    }

    /// Hashes the file at `path`, offers it, and streams it once accepted.
    pub(crate) async fn send_file(&self, path: &Path) -> Result<TransferHandle> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        let file_error = |source: std::io::Error| Error::File {
            path: path.to_owned(),
            source,
        };
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| {
                file_error(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "the file name is missing or not valid UTF-8",
                ))
            })?
            .to_string();
        check_name(&name).map_err(|e| {
            file_error(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("a receiver would refuse this name: {e}"),
            ))
        })?;
        let owned = path.to_owned();
        let (size, digest) = tokio::task::spawn_blocking(move || source::hash_file(&owned))
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e)))?
            .map_err(file_error)?;
        let state = Arc::new(SendState {
            name,
            path: path.to_owned(),
            size,
            digest,
            confirmed: AtomicU64::new(0),
            cancel: CancellationToken::new(),
        });
        let task = tokio::spawn(send(self.shared.clone(), state.clone()));
        Ok(TransferHandle { state, task })
    }
}

impl Shared {
    /// Queues a frame for the peer; `false` once the connection is gone for good.
    async fn send_frame(&self, frame: TransferFrame) -> bool {
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
    fn forget(&self, id: u64, token: u64) {
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
    fn chunk_size(&self) -> usize {
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

/// The checks that need no decision, then the offer goes to the application.
async fn offer(shared: &Arc<Shared>, id: u64, size: u64, digest: Digest, name: String) {
    let config = &shared.config;
    let refusal = if lock(&shared.state).incoming.contains_key(&id) {
        Some((
            refuse_code::BAD_OFFER,
            "transfer id already in use".to_string(),
        ))
    } else if let Some(dir) = &config.save_dir {
        if let Err(e) = check_name(&name) {
            Some((refuse_code::BAD_NAME, format!("unsafe file name: {e}")))
        } else if size > config.max_file_size {
            Some((
                refuse_code::TOO_LARGE,
                format!(
                    "{size} bytes is more than the limit of {}",
                    config.max_file_size
                ),
            ))
        } else if !config.overwrite && std::fs::symlink_metadata(dir.join(&name)).is_ok() {
            Some((refuse_code::EXISTS, format!("{name} already exists")))
        } else {
            None
        }
    } else {
        Some((
            refuse_code::NOT_ACCEPTING,
            "this peer does not accept files".to_string(),
        ))
    };
    if let Some((code, text)) = refusal {
        tracing::debug!(id, name, code, text, "offer refused");
        shared
            .send_frame(TransferFrame::Refuse { id, code, text })
            .await;
        return;
    }
    let dir = config.save_dir.clone().expect("checked above");
    let resume_from = store::existing_len(&dir, &digest).min(size);
    let token = shared.next_token.fetch_add(1, Ordering::Relaxed);
    lock(&shared.state)
        .incoming
        .insert(id, Incoming::Offered(token));
    let (tx, rx) = oneshot::channel();
    let offer = FileOffer {
        name: name.clone(),
        size,
        digest,
        resume_from,
        decision: Some(tx),
    };
    let info = Offered {
        id,
        token,
        name,
        size,
        digest,
        dir,
    };
    tokio::spawn(decide(shared.clone(), info, rx));
    (shared.emit)(TransferEvent::Offer(offer)).await;
}

/// An offer that passed the checks.
struct Offered {
    id: u64,
    token: u64,
    name: String,
    size: u64,
    digest: Digest,
    dir: PathBuf,
}

async fn decide(shared: Arc<Shared>, offer: Offered, decision: oneshot::Receiver<Decision>) {
    let text = match decision.await {
        Ok(Decision::Accept) => return receive(shared, offer).await,
        Ok(Decision::Reject(text)) => text,
        Err(_) => "not accepted by the application".to_string(),
    };
    shared.forget(offer.id, offer.token);
    shared
        .send_frame(TransferFrame::Refuse {
            id: offer.id,
            code: refuse_code::REJECTED,
            text,
        })
        .await;
}

/// Receives an accepted file into its partial file, verifies it, and puts it in place.
async fn receive(shared: Arc<Shared>, offer: Offered) {
    let Offered {
        id,
        token,
        name,
        size,
        digest,
        dir,
    } = offer;
    let config = &shared.config;
    let refuse = |code: u16, text: String| {
        let shared = shared.clone();
        async move {
            shared.forget(id, token);
            shared
                .send_frame(TransferFrame::Refuse { id, code, text })
                .await;
        }
    };
    let Ok(_guard) = tokio::time::timeout(LOCK_WAIT, shared.locks.lock(digest)).await else {
        return refuse(
            refuse_code::IO,
            "the same file is being received already".into(),
        )
        .await;
    };
    let target = dir.join(&name);
    if !config.overwrite && std::fs::symlink_metadata(&target).is_ok() {
        return refuse(refuse_code::EXISTS, format!("{name} already exists")).await;
    }
    let open_dir = dir.clone();
    let part =
        match tokio::task::spawn_blocking(move || PartFile::open(&open_dir, &digest, size)).await {
            Ok(Ok(part)) => part,
            Ok(Err(e)) => {
                return refuse(refuse_code::IO, format!("cannot create the file: {e}")).await;
            }
            Err(e) => return refuse(refuse_code::IO, e.to_string()).await,
        };
    let offset = part.written();
    match fs4::available_space(&dir) {
        Ok(free) if free < (size - offset).saturating_add(config.min_free_space) => {
            return refuse(
                refuse_code::NO_SPACE,
                format!(
                    "not enough free disk space: {} more bytes needed, {free} free \
                     (keeping {} free)",
                    size - offset,
                    config.min_free_space
                ),
            )
            .await;
        }
        Ok(_) => {}
        Err(e) => {
            return refuse(
                refuse_code::IO,
                format!("cannot check the free disk space: {e}"),
            )
            .await;
        }
    }
    // Room for a full window and the frames that follow it.
    let (tx, mut rx) = mpsc::channel(config.window.max(1) + 4);
    {
        let mut state = lock(&shared.state);
        match state.incoming.get(&id) {
            Some(Incoming::Offered(t)) if *t == token => {
                state.incoming.insert(id, Incoming::Receiving(token, tx));
            }
            // The connection was replaced or closed while the application decided.
            _ => return,
        }
    }
    if !shared
        .send_frame(TransferFrame::Accept { id, offset })
        .await
    {
        return;
    }
    let mut receiving = Receiving {
        shared: &shared,
        id,
        token,
        name: &name,
        size,
        part: Some(part),
    };
    receiving.run(&mut rx, offset, &digest, &target).await;
    shared.forget(id, token);
}

/// One accepted incoming transfer.
struct Receiving<'a> {
    shared: &'a Arc<Shared>,
    id: u64,
    token: u64,
    name: &'a str,
    size: u64,
    /// `None` only while it is being written on the blocking pool.
    part: Option<PartFile>,
}

impl Receiving<'_> {
    async fn run(
        &mut self,
        rx: &mut mpsc::Receiver<TransferFrame>,
        resumed_from: u64,
        digest: &Digest,
        target: &Path,
    ) {
        let mut next = None;
        loop {
            let frame = match next.take() {
                Some(frame) => frame,
                None => match rx.recv().await {
                    Some(frame) => frame,
                    None => {
                        let written = self.part.as_ref().map_or(0, PartFile::written);
                        if let Some(part) = self.part.take() {
                            // Kept for a resume: make what it holds durable first.
                            let _ = tokio::task::spawn_blocking(move || part.sync()).await;
                        }
                        return self
                            .failed(
                                format!(
                                    "the connection ended after {written} of {} bytes",
                                    self.size
                                ),
                                true,
                            )
                            .await;
                    }
                },
            };
            match frame {
                TransferFrame::Chunk { offset, data, .. } => {
                    // Chunks already queued are written together, with one confirmation.
                    let mut chunks = vec![(offset, data)];
                    while let Ok(more) = rx.try_recv() {
                        match more {
                            TransferFrame::Chunk { offset, data, .. } => {
                                chunks.push((offset, data))
                            }
                            other => {
                                next = Some(other);
                                break;
                            }
                        }
                    }
                    if let Err(text) = self.write(chunks).await {
                        return self.abort(text).await;
                    }
                    let written = self.part.as_ref().expect("part").written();
                    self.shared
                        .send_frame(TransferFrame::Progress {
                            id: self.id,
                            offset: written,
                        })
                        .await;
                }
                TransferFrame::Done { .. } => {
                    let part = self.part.take().expect("part");
                    if part.written() != self.size {
                        let text = format!(
                            "the sender finished after {} of {} bytes",
                            part.written(),
                            self.size
                        );
                        self.part = Some(part);
                        return self.abort(text).await;
                    }
                    let (digest, target2) = (*digest, target.to_owned());
                    let overwrite = self.shared.config.overwrite;
                    let finished = tokio::task::spawn_blocking(move || {
                        part.finish(&digest, &target2, overwrite)
                    })
                    .await
                    .unwrap_or_else(|e| Err(FinishError::Io(std::io::Error::other(e))));
                    let (text, resumable) = match finished {
                        Ok(()) => {
                            self.shared
                                .send_frame(TransferFrame::Result {
                                    id: self.id,
                                    result: Ok(()),
                                })
                                .await;
                            let file = ReceivedFile {
                                name: self.name.to_string(),
                                path: target.to_owned(),
                                size: self.size,
                                digest,
                                resumed_from,
                            };
                            (self.shared.emit)(TransferEvent::Received(file)).await;
                            return;
                        }
                        Err(FinishError::Mismatch(actual)) => (
                            format!(
                                "digest mismatch: the offer said {digest}, the bytes received \
                                 hash to {actual}; the partial file was deleted"
                            ),
                            false,
                        ),
                        Err(FinishError::Exists) => (
                            format!("{} appeared meanwhile and is not overwritten", self.name),
                            true,
                        ),
                        Err(FinishError::Io(e)) => {
                            (format!("cannot put the file in place: {e}"), true)
                        }
                    };
                    self.shared
                        .send_frame(TransferFrame::Result {
                            id: self.id,
                            result: Err(text.clone()),
                        })
                        .await;
                    return self.failed(text, resumable).await;
                }
                TransferFrame::Cancel { text, .. } => {
                    if let Some(part) = self.part.take() {
                        let _ = tokio::task::spawn_blocking(move || part.discard()).await;
                    }
                    return self
                        .failed(format!("cancelled by the sender: {text}"), false)
                        .await;
                }
                _ => {}
            }
        }
    }

    /// Writes `chunks` (which must continue the file exactly) on the blocking pool.
    async fn write(&mut self, chunks: Vec<(u64, bytes::Bytes)>) -> Result<(), String> {
        let mut part = self.part.take().expect("part");
        let size = self.size;
        let (part, result) = tokio::task::spawn_blocking(move || {
            for (offset, data) in chunks {
                if offset != part.written() {
                    let text = format!(
                        "a chunk at offset {offset} arrived where {} was expected",
                        part.written()
                    );
                    return (part, Err(text));
                }
                if part.written() + data.len() as u64 > size {
                    return (part, Err(format!("more than the offered {size} bytes")));
                }
                if let Err(e) = part.write(&data) {
                    return (part, Err(format!("cannot write the file: {e}")));
                }
            }
            (part, Ok(()))
        })
        .await
        .map_err(|e| e.to_string())?;
        self.part = Some(part);
        result
    }

    /// Gives up: tells the sender, keeps the partial file for a later attempt.
    async fn abort(&mut self, text: String) {
        self.shared.forget(self.id, self.token);
        self.shared
            .send_frame(TransferFrame::Result {
                id: self.id,
                result: Err(text.clone()),
            })
            .await;
        self.failed(text, true).await;
    }

    async fn failed(&mut self, reason: String, resumable: bool) {
        tracing::debug!(name = self.name, reason, "file not received");
        let failure = FileFailure {
            name: self.name.to_string(),
            reason,
            resumable,
        };
        (self.shared.emit)(TransferEvent::Failed(failure)).await;
    }
}

/// What to do after a reply while sending.
enum Flow {
    Go,
    Restart,
    Stop(Result<FileReceipt>),
}

/// Offers the file, streams it, and waits for the receiver's verdict; offers again after a
/// reconnect.
async fn send(shared: Arc<Shared>, state: Arc<SendState>) -> Result<FileReceipt> {
    let file_error = |source: std::io::Error| Error::File {
        path: state.path.clone(),
        source,
    };
    let path = state.path.clone();
    let mut source = tokio::task::spawn_blocking(move || source::Source::open(&path))
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e)))?
        .map_err(file_error)?;
    let mut attempts = 0;
    'attempt: loop {
        attempts += 1;
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, mut rx) = mpsc::channel(REPLY_CAPACITY);
        {
            let mut st = lock(&shared.state);
            if shared.closed.load(Ordering::Acquire) {
                return Err(Error::Disconnected);
            }
            st.outgoing.insert(id, tx);
        }
        let _registered = Registered {
            shared: &shared,
            id,
        };
        let offer = TransferFrame::Offer {
            id,
            size: state.size,
            digest: state.digest.0,
            name: state.name.clone(),
        };
        if !shared.send_frame(offer).await {
            return Err(Error::Closed);
        }
        // Each reply is handled by `on` below; it returns what to do next.
        let mut accepted: Option<u64> = None;
        let mut confirmed = 0u64;
        let on = |reply: Option<Reply>, accepted: &mut Option<u64>, confirmed: &mut u64| match reply
        {
            Some(Reply::Frame(TransferFrame::Accept { offset, .. })) if accepted.is_none() => {
                *accepted = Some(offset);
                *confirmed = offset;
                state.confirmed.store(offset, Ordering::Relaxed);
                Flow::Go
            }
            Some(Reply::Frame(TransferFrame::Progress { offset, .. })) => {
                if offset > *confirmed {
                    *confirmed = offset;
                    state.confirmed.store(offset, Ordering::Relaxed);
                }
                Flow::Go
            }
            Some(Reply::Frame(TransferFrame::Refuse { code, text, .. })) => {
                Flow::Stop(Err(Error::Refused { code, text }))
            }
            Some(Reply::Frame(TransferFrame::Result { result, .. })) => Flow::Stop(match result {
                Ok(()) => Ok(FileReceipt {
                    name: state.name.clone(),
                    size: state.size,
                    digest: state.digest,
                    resumed_from: accepted.unwrap_or(0),
                    attempts,
                }),
                Err(text) => Err(Error::TransferFailed(text)),
            }),
            Some(Reply::Frame(_)) => Flow::Go,
            Some(Reply::Restart) => Flow::Restart,
            Some(Reply::Closed) | None => Flow::Stop(Err(Error::Disconnected)),
        };
        macro_rules! handle {
            ($reply:expr) => {
                match on($reply, &mut accepted, &mut confirmed) {
                    Flow::Go => {}
                    Flow::Restart => continue 'attempt,
                    Flow::Stop(result) => return result,
                }
            };
        }
        // Waits for the next reply, or for a cancel from the handle.
        macro_rules! next {
            () => {
                tokio::select! {
                    reply = rx.recv() => reply,
                    () = state.cancel.cancelled() => {
                        shared.send_frame(TransferFrame::Cancel { id, text: "cancelled".into() }).await;
                        return Err(Error::TransferFailed("cancelled".into()));
                    }
                }
            };
        }
        while accepted.is_none() {
            handle!(next!());
        }
        let mut sent = accepted.expect("accepted");
        if sent > state.size {
            let text = format!(
                "the receiver asked for offset {sent} of a {}-byte file",
                state.size
            );
            shared
                .send_frame(TransferFrame::Cancel {
                    id,
                    text: text.clone(),
                })
                .await;
            return Err(Error::TransferFailed(text));
        }
        let chunk = shared.chunk_size();
        let window = (shared.config.window.max(1) * chunk) as u64;
        while sent < state.size {
            // Saturating: a receiver may claim more than was sent; that only opens the window.
            while sent.saturating_sub(confirmed) >= window {
                handle!(next!());
            }
            // Replies that came meanwhile (a restart, a failure) are seen before more is sent.
            while let Ok(reply) = rx.try_recv() {
                handle!(Some(reply));
            }
            if state.cancel.is_cancelled() {
                handle!(next!());
            }
            let len = chunk.min((state.size - sent) as usize);
            let at = sent;
            let (back, data) = tokio::task::spawn_blocking(move || {
                let data = source.read_at(at, len);
                (source, data)
            })
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e)))?;
            source = back;
            let data = match data {
                Ok(data) => data,
                Err(e) => {
                    shared
                        .send_frame(TransferFrame::Cancel {
                            id,
                            text: format!("the sender cannot read the file: {e}"),
                        })
                        .await;
                    return Err(file_error(e));
                }
            };
            if !shared
                .send_frame(TransferFrame::Chunk {
                    id,
                    offset: at,
                    data,
                })
                .await
            {
                return Err(Error::Closed);
            }
            sent += len as u64;
        }
        if !shared.send_frame(TransferFrame::Done { id }).await {
            return Err(Error::Closed);
        }
        loop {
            handle!(next!());
        }
    }
}

/// Removes a sending attempt's id from the routing table when the attempt ends.
struct Registered<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        lock(&self.shared.state).outgoing.remove(&self.id);
    }
}

/// Locks a mutex, ignoring poisoning: every critical section here is a single map
/// operation that leaves the data consistent even if a panic interrupted it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

//! The sending side: [`TransferHandle`] and its [`Progress`], and the task that offers a
//! file, streams it with at most a window of chunks beyond the receiver's confirmation,
//! waits for the verdict ([`FileReceipt`]), and offers it again after a reconnect.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::engine::{Reply, Shared, Transfers, lock};
use super::{Digest, check_name, source};
use crate::protocol::transfer::TransferFrame;
use crate::{Error, Result};

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

/// Replies queued for one sending task. An honest receiver has at most a window of
/// `PROGRESS` frames and a `RESULT` outstanding; beyond this, replies are dropped, so a
/// flood of them costs nothing (a dropped `PROGRESS` is superseded by the next one).
const REPLY_CAPACITY: usize = 64;

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
    let watch = shared
        .board
        .watch(&state.name, state.size, super::progress::Direction::Sending);
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
                watch.set(offset);
                Flow::Go
            }
            Some(Reply::Frame(TransferFrame::Progress { offset, .. })) => {
                if offset > *confirmed {
                    *confirmed = offset;
                    state.confirmed.store(offset, Ordering::Relaxed);
                    watch.set(offset);
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

//! The receiving side: the checks on an incoming offer, the [`FileOffer`] the application
//! decides on, and the task that writes an accepted file's chunks into its partial file,
//! confirms them with `PROGRESS`, verifies the digest and puts the file in place, ending
//! in a [`ReceivedFile`] or a [`FileFailure`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::engine::{Incoming, Shared, lock};
use super::store::{self, FinishError, PartFile};
use super::{Digest, TransferEvent, check_name};
use crate::protocol::transfer::{TransferFrame, refuse_code};

/// How long an accepted offer waits for another receive of the same file (typically the
/// one its own dropped connection left behind, still winding down) before it is refused.
const LOCK_WAIT: Duration = Duration::from_secs(10);

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

/// The checks that need no decision, then the offer goes to the application.
pub(super) async fn offer(shared: &Arc<Shared>, id: u64, size: u64, digest: Digest, name: String) {
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
    let watch = shared
        .board
        .watch(&name, size, super::progress::Direction::Receiving);
    watch.set(offset);
    let mut receiving = Receiving {
        watch,
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
    /// This transfer on the engine's board of transfers in progress.
    watch: super::progress::Watch<'a>,
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
        self.watch.set(part.written());
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

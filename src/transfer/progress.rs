//! Transfers in progress, for an operator to watch: the name, size and bytes done of each
//! file that a connection is sending or receiving right now ([`Transfers::in_progress`]).
//!
//! Each sending or receiving task registers a [`Meter`] on its engine's [`Board`] for as long
//! as it runs (a [`Watch`], removed on drop) and moves the meter's count as chunks are
//! written or confirmed: one relaxed store per chunk batch, read only when someone asks.
//!
//! [`Transfers::in_progress`]: super::engine::Transfers::in_progress

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::engine::lock;

/// Which way a file is going, seen from this end of the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The peer sends it; we write it.
    Receiving,
    /// We send it; the peer confirms what it wrote.
    Sending,
}

impl Direction {
    /// `"receiving"` or `"sending"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Receiving => "receiving",
            Direction::Sending => "sending",
        }
    }
}

/// One transfer in progress, as it stood when asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferStatus {
    /// The file's name.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Bytes written (receiving) or confirmed written by the peer (sending).
    pub done: u64,
    /// Which way it goes.
    pub direction: Direction,
}

/// The count of one transfer.
pub(super) struct Meter {
    name: String,
    size: u64,
    direction: Direction,
    done: AtomicU64,
}

/// The transfers of one engine in progress.
#[derive(Default)]
pub(super) struct Board {
    next: AtomicU64,
    meters: Mutex<HashMap<u64, Arc<Meter>>>,
}

impl Board {
    /// Registers a transfer until the returned [`Watch`] is dropped.
    pub(super) fn watch(&self, name: &str, size: u64, direction: Direction) -> Watch<'_> {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let meter = Arc::new(Meter {
            name: name.to_string(),
            size,
            direction,
            done: AtomicU64::new(0),
        });
        lock(&self.meters).insert(key, meter.clone());
        Watch {
            board: self,
            key,
            meter,
        }
    }

    /// What each registered transfer has done, oldest first.
    pub(super) fn statuses(&self) -> Vec<TransferStatus> {
        let meters = lock(&self.meters);
        let mut keyed: Vec<_> = meters.iter().collect();
        keyed.sort_by_key(|(key, _)| **key);
        keyed
            .into_iter()
            .map(|(_, m)| TransferStatus {
                name: m.name.clone(),
                size: m.size,
                done: m.done.load(Ordering::Relaxed),
                direction: m.direction,
            })
            .collect()
    }
}

/// A transfer's place on the board, removed on drop.
pub(super) struct Watch<'a> {
    board: &'a Board,
    key: u64,
    meter: Arc<Meter>,
}

impl Watch<'_> {
    /// Sets the bytes done.
    pub(super) fn set(&self, done: u64) {
        self.meter.done.store(done, Ordering::Relaxed);
    }
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        lock(&self.board.meters).remove(&self.key);
    }
}

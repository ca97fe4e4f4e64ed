//! What `--discard`, `--echo` and `--fanout` do with messages instead of printing them:
//! count them, with a message handler in each connection ([`Counter`], the library's fast
//! path) or on the event stream ([`Load`], with `--events` and always for `--fanout`), and
//! print the rate and the totals on stderr.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sockframe::Message;
use sockframe::server::{Server, ServerEvent, ServerEvents};

use super::Args;

/// What `--discard`, `--echo` and `--fanout` do with messages instead of printing them.
#[derive(Debug, Clone, Copy)]
pub(super) enum LoadMode {
    Discard,
    Echo,
    Fanout,
}

/// Messages and bytes received by a benchmark target.
#[derive(Debug, Default)]
pub(super) struct Counts {
    messages: AtomicU64,
    bytes: AtomicU64,
}

impl Counts {
    fn add(&self, messages: u64, bytes: u64) {
        self.messages.fetch_add(messages, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// The message handler of one connection under `--discard` or `--echo`: counts at the
/// application's end of the library, as an application's own handler sees the messages.
/// It adds to the shared counts in steps, because 16 connections adding every message to
/// one cache line would measure that line's contention instead of the library.
pub(super) struct Counter {
    counts: Arc<Counts>,
    echo: bool,
    /// Counts messages lent in place (`message_ref`) rather than owned ones.
    borrows: bool,
    messages: u64,
    bytes: u64,
}

/// Messages a [`Counter`] counts before adding them to the shared counts.
const COUNT_STEP: u64 = 256;

impl Counter {
    pub(super) fn new(counts: Arc<Counts>, echo: bool, borrows: bool) -> Self {
        Counter {
            counts,
            echo,
            borrows,
            messages: 0,
            bytes: 0,
        }
    }

    fn count(&mut self, len: usize) {
        self.messages += 1;
        self.bytes += len as u64;
        if self.messages == COUNT_STEP {
            self.counts.add(self.messages, self.bytes);
            (self.messages, self.bytes) = (0, 0);
        }
    }
}

impl sockframe::Handler for Counter {
    fn message(&mut self, message: Message) -> Option<Message> {
        self.count(message.len());
        self.echo.then_some(message)
    }

    fn borrows(&self) -> bool {
        self.borrows
    }

    fn message_ref(&mut self, message: sockframe::MessageRef<'_>) -> Option<Message> {
        self.count(message.len());
        self.echo.then(|| message.to_message())
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        self.counts.add(self.messages, self.bytes);
    }
}

/// Message counts of a benchmark target. Counted at the application: by a handler in each
/// connection (see [`Counter`]), or on the events the application receives (`--events`,
/// and always for `--fanout`), so they include the library's whole receive path.
#[derive(Debug)]
pub(super) struct Load {
    /// `None` when serving normally.
    pub(super) mode: Option<LoadMode>,
    /// What the handlers count (without `--events`).
    pub(super) counts: Arc<Counts>,
    /// What this loop counts on the event stream: plain numbers, as an application counts
    /// what it receives; the rate and totals read them in the same task.
    seen: (u64, u64),
    /// The counts at the last rate line.
    reported: (u64, u64),
    /// When the last rate line was printed.
    since: tokio::time::Instant,
}

impl Load {
    pub(super) fn new(args: &Args) -> Self {
        let mode = match (args.discard, args.echo, args.fanout) {
            (true, _, _) => Some(LoadMode::Discard),
            (_, true, _) => Some(LoadMode::Echo),
            (_, _, true) => Some(LoadMode::Fanout),
            _ => None,
        };
        Self {
            mode,
            counts: Arc::default(),
            seen: (0, 0),
            reported: (0, 0),
            since: tokio::time::Instant::now(),
        }
    }

    /// Counts a message under `--discard` without a future: gives back every other event,
    /// for [`take`](Self::take). (The main loop's `.await` on `take` moved each event into
    /// the future's state and out again: a sixth of the loop's time with 64-byte messages.)
    #[inline]
    pub(super) fn discard(&mut self, event: ServerEvent) -> Option<ServerEvent> {
        match (self.mode, event) {
            (Some(LoadMode::Discard), ServerEvent::Message { message, .. }) => {
                self.seen.0 += 1;
                self.seen.1 += message.len() as u64;
                None
            }
            (_, event) => Some(event),
        }
    }

    /// Takes the events ready in `events` while `taken` is below `limit`, counting those that
    /// [`discard`](Self::discard) counts, and gives back the first other one. `None` once
    /// nothing is ready or the limit is reached.
    #[inline]
    pub(super) fn discard_ready(
        &mut self,
        events: &mut ServerEvents,
        taken: &mut usize,
        limit: usize,
    ) -> Option<ServerEvent> {
        while *taken < limit {
            let event = events.try_recv()?;
            *taken += 1;
            if let Some(event) = self.discard(event) {
                return Some(event);
            }
        }
        None
    }

    /// Handles a message in a benchmark mode; gives back every other event (and every event
    /// when serving normally) to be printed.
    #[inline]
    pub(super) async fn take(
        &mut self,
        server: &Server,
        event: ServerEvent,
    ) -> Option<ServerEvent> {
        let (Some(mode), ServerEvent::Message { client, message }) = (self.mode, &event) else {
            return Some(event);
        };
        self.seen.0 += 1;
        self.seen.1 += message.len() as u64;
        match mode {
            LoadMode::Discard => {}
            // A client that left meanwhile is no error for a benchmark target.
            LoadMode::Echo => drop(server.send(*client, message.clone()).await),
            LoadMode::Fanout => drop(server.broadcast_except(*client, message.clone()).await),
        }
        None
    }

    /// After an event is printed: `--echo` answers a request with its own payload. (Without
    /// `--echo`, dropping the request answers it with the error `unhandled`.)
    #[inline]
    pub(super) async fn answer(&self, event: ServerEvent) {
        if let (Some(LoadMode::Echo), ServerEvent::Request { request, .. }) = (self.mode, event) {
            let answer = request.message().clone();
            let _ = request.respond(answer).await;
        }
    }

    /// One line on stderr with the rate since the last one, unless nothing arrived.
    pub(super) fn print_rate(&mut self) {
        let now = tokio::time::Instant::now();
        let secs = (now - self.since).as_secs_f64().max(1e-9);
        let total = self.totals();
        let (messages, bytes) = (total.0 - self.reported.0, total.1 - self.reported.1);
        if messages > 0 {
            eprintln!(
                "{:.0} messages/s, {:.1} MB/s",
                messages as f64 / secs,
                bytes as f64 / secs / 1e6
            );
        }
        self.reported = total;
        self.since = now;
    }

    /// The totals, on stderr, when the server stops.
    pub(super) fn print_totals(&self) {
        if self.mode.is_some() {
            let (messages, bytes) = self.totals();
            eprintln!("total: {messages} messages, {bytes} bytes");
        }
    }

    /// Messages and bytes counted so far.
    fn totals(&self) -> (u64, u64) {
        (
            self.counts.messages.load(Ordering::Relaxed) + self.seen.0,
            self.counts.bytes.load(Ordering::Relaxed) + self.seen.1,
        )
    }
}

//! The server's running totals, and the snapshot of them that [`Server::stats`] returns.
//!
//! What is counted per *message* is already counted per connection (each client's
//! `Traffic`, written only by its own task); this module never adds a shared atomic per
//! message. It counts per *event*: an accept, a refusal, a disconnect, a resume, a request,
//! a received file. A snapshot adds the connected clients' own counters to what the clients
//! that left had counted, so the totals are exact and cost the hot path nothing.
//!
//! [`Server::stats`]: super::Server::stats

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::connection::Mode;
use crate::reason::DisconnectReason;

/// Why the server refused a connection before it became a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Refusal {
    /// `max_connections` were already open.
    ConnectionLimit,
    /// `max_connections_per_ip` were already open from the peer's address.
    PerIp,
    /// The peer's address is not admitted by the allow / deny lists.
    Cidr,
    /// A sockframe hello without an accepted token (or a resume by another principal).
    Token,
    /// Cut for sending faster than its rate limit.
    Rate,
}

impl Refusal {
    /// Every refusal, in declaration order.
    pub const ALL: [Refusal; 5] = [
        Refusal::ConnectionLimit,
        Refusal::PerIp,
        Refusal::Cidr,
        Refusal::Token,
        Refusal::Rate,
    ];

    /// A short snake-case name: a metric label, a JSON key.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::ConnectionLimit => "connection_limit",
            Refusal::PerIp => "per_ip",
            Refusal::Cidr => "cidr",
            Refusal::Token => "token",
            Refusal::Rate => "rate",
        }
    }
}

/// Upper bounds (seconds) of the request latency histogram's buckets: 100 µs to 10 s.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.0, 10.0,
];

/// The counters the server keeps beside its clients' own.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    accepted: AtomicU64,
    disconnects: [AtomicU64; DisconnectReason::LABELS.len()],
    refused: [AtomicU64; Refusal::ALL.len()],
    resumed: AtomicU64,
    requests: AtomicU64,
    /// Per bucket of [`LATENCY_BUCKETS`], plus one for above the last.
    latency: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    latency_micros: AtomicU64,
    files_received: AtomicU64,
    file_bytes_received: AtomicU64,
    /// The traffic of clients that have left (their own counters went with them).
    departed: [AtomicU64; 4],
}

impl Counters {
    pub(crate) fn accepted(&self) {
        self.accepted.fetch_add(1, Relaxed);
    }

    pub(crate) fn refused(&self, why: Refusal) {
        self.refused[why as usize].fetch_add(1, Relaxed);
    }

    pub(crate) fn resumed(&self) {
        self.resumed.fetch_add(1, Relaxed);
    }

    pub(crate) fn file_received(&self, bytes: u64) {
        self.files_received.fetch_add(1, Relaxed);
        self.file_bytes_received.fetch_add(bytes, Relaxed);
    }

    /// A request the server sent to a client, answered (or failed) after `took`.
    pub(crate) fn request(&self, took: Duration) {
        self.requests.fetch_add(1, Relaxed);
        let secs = took.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.latency[bucket].fetch_add(1, Relaxed);
        self.latency_micros
            .fetch_add(took.as_micros().min(u64::MAX as u128) as u64, Relaxed);
    }

    /// A client left for `reason`, having moved `traffic` (messages in, bytes in, messages
    /// out, bytes out) over its whole stay.
    pub(crate) fn departed(&self, reason: &DisconnectReason, traffic: [u64; 4]) {
        self.disconnects[reason.index()].fetch_add(1, Relaxed);
        if *reason == DisconnectReason::RateLimited {
            self.refused(Refusal::Rate);
        }
        for (total, n) in self.departed.iter().zip(traffic) {
            total.fetch_add(n, Relaxed);
        }
    }

    /// The totals, to which the caller adds the connected clients' own counters.
    pub(crate) fn snapshot(&self) -> ServerStats {
        let load = |a: &AtomicU64| a.load(Relaxed);
        let [messages_in, bytes_in, messages_out, bytes_out] = self.departed.each_ref().map(load);
        ServerStats {
            accepted: load(&self.accepted),
            connected: Vec::new(),
            sessions_suspended: 0,
            disconnects: DisconnectReason::LABELS
                .iter()
                .zip(&self.disconnects)
                .map(|(l, n)| (*l, load(n)))
                .collect(),
            refused: Refusal::ALL
                .iter()
                .zip(&self.refused)
                .map(|(r, n)| (*r, load(n)))
                .collect(),
            sessions_resumed: load(&self.resumed),
            requests: load(&self.requests),
            request_latency: LATENCY_BUCKETS
                .iter()
                .copied()
                .chain([f64::INFINITY])
                .zip(&self.latency)
                .map(|(b, n)| (b, load(n)))
                .collect(),
            request_latency_sum: Duration::from_micros(load(&self.latency_micros)),
            files_received: load(&self.files_received),
            file_bytes_received: load(&self.file_bytes_received),
            messages_in,
            bytes_in,
            messages_out,
            bytes_out,
        }
    }
}

/// The server's totals since it started, at one moment ([`Server::stats`]).
///
/// [`Server::stats`]: super::Server::stats
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ServerStats {
    /// Connections accepted (past the address lists and the connection limits).
    pub accepted: u64,
    /// Clients connected now, by protocol (both protocols listed, zero included).
    pub connected: Vec<(Mode, u64)>,
    /// Clients whose lossless session waits for them to reconnect.
    pub sessions_suspended: u64,
    /// Clients that left, by [`DisconnectReason::label`] (every label listed).
    pub disconnects: Vec<(&'static str, u64)>,
    /// Connections refused or cut by a limit, by kind (every kind listed).
    pub refused: Vec<(Refusal, u64)>,
    /// Sessions resumed by a reconnecting client.
    pub sessions_resumed: u64,
    /// Requests the server sent to clients ([`Server::request`]), answered or not.
    ///
    /// [`Server::request`]: super::Server::request
    pub requests: u64,
    /// How long those requests took, as (bucket upper bound in seconds, count in that
    /// bucket alone); the last bound is infinity.
    pub request_latency: Vec<(f64, u64)>,
    /// The requests' durations added up.
    pub request_latency_sum: Duration,
    /// Files received from clients and verified.
    pub files_received: u64,
    /// Bytes of those files.
    pub file_bytes_received: u64,
    /// Messages received from clients (connected or gone).
    pub messages_in: u64,
    /// Payload bytes received from clients.
    pub bytes_in: u64,
    /// Messages written to clients.
    pub messages_out: u64,
    /// Payload bytes written to clients.
    pub bytes_out: u64,
}

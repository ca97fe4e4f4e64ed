//! `GET /metrics`: a [`ServerStats`] snapshot in the Prometheus text exposition format.
//!
//! The registry is built at each scrape from the snapshot, so the server keeps no metric
//! objects of its own and pays nothing per message (see [`crate::server::ServerStats`]).
//! Every metric is listed in `docs/operations.md`.

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use crate::connection::Mode;
use crate::server::ServerStats;

/// The content type of the Prometheus text format 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Protocol {
    protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Limit {
    limit: &'static str,
}

/// A histogram already counted elsewhere (the server's fixed buckets).
#[derive(Debug)]
struct Counted {
    sum: f64,
    count: u64,
    buckets: Vec<(f64, u64)>,
}

impl EncodeMetric for Counted {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<NoLabelSet>(self.sum, self.count, &self.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

fn counter(value: u64) -> Counter {
    let c = Counter::default();
    c.inc_by(value);
    c
}

fn gauge(value: u64) -> Gauge {
    let g = Gauge::default();
    g.set(i64::try_from(value).unwrap_or(i64::MAX));
    g
}

/// The name of a protocol as a label value.
pub fn protocol_label(mode: Mode) -> &'static str {
    match mode {
        Mode::Tutorial => "tutorial",
        Mode::Sockframe => "sockframe",
    }
}

/// Renders `stats` as Prometheus text exposition.
pub fn render(stats: &ServerStats) -> String {
    let mut r = Registry::with_prefix("sockframe");

    let connected = Family::<Protocol, Gauge>::default();
    for (mode, n) in &stats.connected {
        connected
            .get_or_create(&Protocol {
                protocol: protocol_label(*mode),
            })
            .set(i64::try_from(*n).unwrap_or(i64::MAX));
    }
    r.register("clients_connected", "Clients connected now", connected);
    r.register(
        "connections_accepted",
        "Connections accepted past the address lists and limits",
        counter(stats.accepted),
    );
    let disconnects = Family::<Reason, Counter>::default();
    for (reason, n) in &stats.disconnects {
        disconnects.get_or_create(&Reason { reason }).inc_by(*n);
    }
    r.register("disconnects", "Clients that left, by reason", disconnects);
    let refused = Family::<Limit, Counter>::default();
    for (why, n) in &stats.refused {
        refused
            .get_or_create(&Limit { limit: why.label() })
            .inc_by(*n);
    }
    r.register(
        "rejected",
        "Connections refused or cut by a limit, by limit",
        refused,
    );
    r.register(
        "messages_received",
        "Messages received from clients",
        counter(stats.messages_in),
    );
    r.register(
        "messages_sent",
        "Messages written to clients",
        counter(stats.messages_out),
    );
    r.register(
        "bytes_received",
        "Payload bytes received from clients",
        counter(stats.bytes_in),
    );
    r.register(
        "bytes_sent",
        "Payload bytes written to clients",
        counter(stats.bytes_out),
    );
    r.register(
        "sessions_suspended",
        "Lossless sessions waiting for their client to reconnect",
        gauge(stats.sessions_suspended),
    );
    r.register(
        "sessions_resumed",
        "Sessions resumed by a reconnecting client",
        counter(stats.sessions_resumed),
    );
    r.register(
        "requests",
        "Requests the server sent to clients",
        counter(stats.requests),
    );
    r.register_with_unit(
        "request_duration",
        "Time from sending a request to a client to its answer or failure",
        Unit::Seconds,
        Counted {
            sum: stats.request_latency_sum.as_secs_f64(),
            count: stats.requests,
            buckets: stats.request_latency.clone(),
        },
    );
    r.register(
        "files_received",
        "Files received from clients and verified",
        counter(stats.files_received),
    );
    r.register(
        "file_bytes_received",
        "Bytes of files received from clients and verified",
        counter(stats.file_bytes_received),
    );

    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, &r)
        .expect("writing to a String does not fail");
    text
}

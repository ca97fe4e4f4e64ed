//! `sockframe bench`: a load generator for any server speaking the tutorial framing or the
//! sockframe protocol, over TCP or TLS.
//!
//! It is written with raw tokio streams and frames built by hand (typed frames with the
//! library's pure encoders), batched into large writes and parsed in place, not with the
//! sockframe client: what it measures is the server.
//!
//! Modes:
//!
//! - `throughput`: every connection writes messages as fast as it can; reports the messages
//!   and payload bytes the generator wrote per second. Meant for sink servers
//!   (`sockframe serve --discard`), which print their own count on stderr too.
//! - `pingpong`: every connection keeps `--window` messages in flight against an echo server
//!   (`sockframe serve --echo`) and measures each round trip; reports latency percentiles
//!   and round trips per second.
//! - `request` (sockframe protocol only): like `pingpong`, with requests and their responses
//!   matched by correlation id.
//! - `broadcast`: `--conns` readers and one extra sender against a fan-out server
//!   (`sockframe serve --fanout`), which sends every message to every other client; reports
//!   deliveries (messages received by the readers) per second, and the time from the
//!   sender's write of each broadcast to its last delivery (p50, p99, max; `last_*_us` in
//!   JSON) and to each delivery (`p50_us` …). The sender stamps every body with a sequence
//!   number and the time its batch is written (the first 16 bytes; smaller bodies are not
//!   timed), and the readers, in this process and on its clock, count each broadcast's
//!   deliveries in a ring of [`load::BROADCAST_AHEAD`] × 4 counters: the one that
//!   completes the count times the last delivery. The sender stays at most `--window`
//!   broadcasts (default and most [`load::BROADCAST_AHEAD`], and
//!   [`load::BROADCAST_AHEAD_BYTES`] of payload) ahead of the slowest reader, so no server
//!   queue overflows; under that default the time to last delivery is mostly
//!   the wait in the queues, and `--window 1` times each broadcast alone.
//! - `idle`: opens `--conns` connections, sends nothing for `--duration`, then closes them;
//!   for measuring what an idle connection costs the server.
//!
//! In the sockframe protocol every connection opens with a hello (and `--token`), and
//! answers the server's pings. With `--session` the hello asks for a lossless session, and
//! every connection counts the application frames it receives and acknowledges them: with
//! each write it makes anyway when the count moved (piggy-backed, as the library does), and
//! at once when the server sends `ACK_REQUEST`. It keeps no copy of what it sends (it never
//! resumes), so it needs no window of its own; the server's `ACK`s are only checked. `--size` takes a list (`64,1KiB,1MiB`) to run one measurement
//! per size (a sweep). Counting starts after `--warmup`. A progress line is shown on stderr
//! while running when stderr is a terminal; `--json` prints each result as one JSON object
//! per line on stdout; `--plot FILE.svg` draws the latency distribution (round-trip modes)
//! or, for a sweep, the results by size.

mod conn;
mod load;
mod plot;
mod wire;

use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use serde_json::Value;
use tokio::task::JoinSet;
use tokio::time::Instant;

use self::conn::{Conn, Connector, TlsArgs};
use self::load::Shared;
use self::wire::Wire;
use crate::output::json_object;
use crate::parse;
use crate::peer::Protocol;

/// `broadcast`: bytes of read buffer the readers grow by, shared out among them (64 KiB
/// each up to 1,000 readers, down to 8 KiB each from 8,000 on).
const BROADCAST_READ_BUDGET: usize = 64 * 1024 * 1024;

/// Connections opened concurrently while connecting (keeps connect bursts under the
/// server's listen backlog).
const CONNECT_CONCURRENCY: usize = 64;

/// Arguments of `sockframe bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Address of the server to load, as HOST:PORT
    #[arg(value_name = "ADDR")]
    addr: String,
    /// What to measure
    #[arg(long, value_enum, default_value_t = Mode::Throughput)]
    mode: Mode,
    /// Protocol to speak: the tutorial framing, or the sockframe protocol (hello/welcome
    /// handshake, typed binary messages, pongs to the server's pings)
    #[arg(long, value_enum, default_value_t = Protocol::Tutorial)]
    protocol: Protocol,
    /// Token for the hello (sockframe protocol), for a server that requires one
    #[arg(
        long,
        env = "SOCKFRAME_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    token: Option<String>,
    /// Ask for a lossless session (sockframe protocol): count the application frames
    /// received and acknowledge them (with every write, and whenever the server asks)
    #[arg(long)]
    session: bool,
    /// Connect with TLS, verifying the server against the system's roots and --ca
    #[arg(long)]
    tls: bool,
    /// Also trust this CA certificate (PEM); implies --tls
    #[arg(long, value_name = "PEM")]
    ca: Option<PathBuf>,
    /// Verify the server's certificate against this name instead of the address's host;
    /// implies --tls
    #[arg(long, value_name = "NAME")]
    server_name: Option<String>,
    /// Do not verify the server's certificate (throw-away certificates only); implies --tls
    #[arg(long)]
    insecure: bool,
    /// Connections to open (in `broadcast` mode: receiving connections, plus one sender)
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..))]
    conns: u64,
    /// Payload size of each message, in bytes, optionally with a suffix: KiB, MiB (1024-based)
    /// or KB, MB (1000-based). A comma-separated list runs one measurement per size
    #[arg(long, value_name = "BYTES", default_value = "64", value_parser = payload_size,
          value_delimiter = ',')]
    size: Vec<usize>,
    /// How long to measure, after the warm-up (`idle`: how long to hold the connections)
    #[arg(long, value_name = "TIME", default_value = "5s", value_parser = parse::duration)]
    duration: Duration,
    /// How long to run before counting starts
    #[arg(long, value_name = "TIME", default_value = "1s", value_parser = parse::duration)]
    warmup: Duration,
    /// `pingpong`, `request`: messages in flight per connection [default: 1]. `broadcast`:
    /// broadcasts the sender may have written that the slowest reader has not received yet
    /// [default and most: 512, and 4 MiB of payload]; 1 times each broadcast alone
    #[arg(long, value_name = "W",
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    window: Option<u64>,
    /// Print each result as one JSON object per line on stdout
    #[arg(long)]
    json: bool,
    /// Draw an SVG: the latency distribution (`pingpong`, `request`), or the results by
    /// size when `--size` lists several
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
}

/// `--mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    /// Write as fast as possible; count what was written
    Throughput,
    /// Keep `--window` messages in flight against an echo server; measure round trips
    Pingpong,
    /// Keep `--window` requests in flight (sockframe protocol); measure round trips
    Request,
    /// N readers and one sender against a fan-out server; count deliveries
    Broadcast,
    /// Hold N connections open without traffic
    Idle,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Throughput => "throughput",
            Mode::Pingpong => "pingpong",
            Mode::Request => "request",
            Mode::Broadcast => "broadcast",
            Mode::Idle => "idle",
        }
    }

    /// Whether the mode measures round trips (and so has latencies).
    fn round_trips(self) -> bool {
        matches!(self, Mode::Pingpong | Mode::Request)
    }
}

impl Args {
    /// `--window`, or the mode's default: 1 round trip in flight, [`load::BROADCAST_AHEAD`]
    /// broadcasts ahead.
    fn window(&self) -> u64 {
        match (self.window, self.mode) {
            (Some(w), _) => w,
            (None, Mode::Broadcast) => load::BROADCAST_AHEAD,
            (None, _) => 1,
        }
    }
}

fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tutorial => "tutorial",
        Protocol::Sockframe => "sockframe",
    }
}

/// `--size`: a payload the tutorial's signed 32-bit length can express (with room for the
/// fixed fields of a typed frame).
fn payload_size(s: &str) -> Result<usize, String> {
    match parse::size(s)? {
        n if n > i32::MAX as usize - 16 => Err(format!(
            "{n} bytes is more than a frame can hold (at most {})",
            i32::MAX - 16
        )),
        n => Ok(n),
    }
}

/// The body of every message of `size` bytes.
fn body(size: usize) -> Arc<[u8]> {
    (0..size).map(|i| b'a' + (i % 26) as u8).collect()
}

/// The result of measuring one size.
pub struct Outcome {
    /// Payload size.
    pub size: usize,
    /// How long counting ran.
    pub elapsed: Duration,
    /// Messages, round trips or deliveries counted.
    pub messages: u64,
    /// Latencies in nanoseconds: of round trips, or (`broadcast`) from the sender's write to
    /// each delivery; empty for other modes.
    pub latency: Histogram<u64>,
    /// `broadcast`: nanoseconds from the sender's write of each broadcast to its last
    /// delivery (empty for other modes, and for bodies too small to be stamped).
    pub last: Histogram<u64>,
}

impl Outcome {
    /// Counted per second.
    pub fn rate(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Payload megabytes (10^6) per second.
    pub fn mb_per_s(&self) -> f64 {
        self.rate() * self.size as f64 / 1e6
    }

    /// Latency at quantile `q`, in microseconds.
    pub fn us(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1e3
    }

    /// Time to the last delivery of a broadcast at quantile `q`, in microseconds.
    pub fn last_us(&self, q: f64) -> f64 {
        self.last.value_at_quantile(q) as f64 / 1e3
    }
}

/// Runs the benchmark and prints its result.
pub async fn run(args: Args) -> Result<()> {
    if args.mode == Mode::Request && args.protocol != Protocol::Sockframe {
        bail!("--mode request needs --protocol sockframe: the tutorial framing has no requests");
    }
    if args.mode == Mode::Broadcast && args.window() > load::BROADCAST_AHEAD {
        bail!(
            "--window {} is more than a broadcast may run ahead (at most {}: the server queues \
             1,024 messages per client by default)",
            args.window(),
            load::BROADCAST_AHEAD
        );
    }
    if args.plot.is_some() && !args.mode.round_trips() && args.size.len() < 2 {
        bail!(
            "--plot draws latencies (--mode pingpong or request) or a sweep (several --size \
             values); {} with one size has nothing to draw",
            args.mode.name()
        );
    }
    let tls = TlsArgs {
        enabled: args.tls || args.ca.is_some() || args.insecure || args.server_name.is_some(),
        ca: args.ca.clone(),
        insecure: args.insecure,
        server_name: args.server_name.clone(),
    };
    if args.insecure {
        eprintln!("warning: --insecure: the server's certificate is not verified");
    }
    // `broadcast` opens one more connection than `--conns`: the sender.
    raise_nofile(args.conns.saturating_add(1));
    let wire = connector_wire(&args);
    let connector = Connector::new(&args.addr, wire, args.token.as_deref(), &tls)?;
    if args.mode == Mode::Idle {
        return idle(&args, &connector).await;
    }
    let mut outcomes = Vec::with_capacity(args.size.len());
    for &size in &args.size {
        let outcome = run_size(&args, &connector, size).await?;
        report(&args, &outcome)?;
        outcomes.push(outcome);
    }
    if let Some(path) = &args.plot {
        let title = title(&args);
        if outcomes.len() > 1 {
            plot::sweep(path, &title, args.mode.round_trips(), &outcomes)?;
        } else {
            plot::latency(path, &title, &outcomes[0])?;
        }
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// Descriptors the generator uses besides its connections (standard streams, the
/// runtime's epoll and wake-ups, a plot file).
const NOFILE_RESERVE: u64 = 32;

/// Raises the soft limit on open files to the hard one when `conns` connections need more
/// than it (it is often 1,024; 10,000 readers need 10,000), and warns on stderr when even
/// the hard limit is short: connecting would then fail part way with "too many open files".
#[cfg(unix)]
fn raise_nofile(conns: u64) {
    use rlimit::Resource;
    let need = conns.saturating_add(NOFILE_RESERVE);
    let Ok((soft, hard)) = Resource::NOFILE.get() else {
        return;
    };
    if soft >= need {
        return;
    }
    // As far as the connections need, clamped to what the hard limit and the kernel allow.
    let now = rlimit::increase_nofile_limit(need).unwrap_or(soft);
    if now < need {
        eprintln!(
            "warning: the open file limit ({now}, hard limit {hard}) is too low for {conns} \
             connections plus {NOFILE_RESERVE}: connecting will fail part way; raise the hard \
             limit (ulimit -Hn)"
        );
    }
}

#[cfg(not(unix))]
fn raise_nofile(_conns: u64) {}

/// What a plot says it shows.
fn title(args: &Args) -> String {
    format!(
        "sockframe bench --mode {} --protocol {}{}{} --conns {}{}",
        args.mode.name(),
        protocol_name(args.protocol),
        if args.session { " --session" } else { "" },
        if args.tls || args.ca.is_some() || args.insecure {
            " --tls"
        } else {
            ""
        },
        args.conns,
        if args.mode.round_trips() {
            format!(" --window {}", args.window())
        } else {
            String::new()
        }
    )
}

/// `idle`: holds the connections (answering pings) for `--duration`.
async fn idle(args: &Args, connector: &Connector) -> Result<()> {
    let (conns, connect_time) = connect(args, connector, args.conns).await?;
    let shared = Arc::new(Shared::default());
    let mut tasks = JoinSet::new();
    let held = Instant::now();
    for conn in conns {
        let shared = shared.clone();
        let mine = Arc::new(AtomicU64::new(0));
        // A small read buffer: only pings arrive.
        tasks.spawn(load::receive(
            conn,
            connector_wire(args),
            mine,
            shared,
            64,
            None,
        ));
    }
    tokio::time::sleep(args.duration).await;
    let held = held.elapsed();
    shared.stop.cancel();
    while let Some(joined) = tasks.join_next().await {
        joined.context("an idle connection task failed")??;
    }
    let result = json_object(&[
        ("mode", "idle".into()),
        ("protocol", protocol_name(args.protocol).into()),
        ("session", args.session.into()),
        ("addr", args.addr.clone().into()),
        ("conns", args.conns.into()),
        ("connect_s", connect_time.as_secs_f64().into()),
        ("held_s", held.as_secs_f64().into()),
    ]);
    print_result(
        args.json,
        &result,
        &format!(
            "idle: held {} connection(s) for {:.1} s (connecting took {:.2} s)",
            args.conns,
            held.as_secs_f64(),
            connect_time.as_secs_f64()
        ),
    )
}

fn connector_wire(args: &Args) -> Wire {
    Wire {
        protocol: args.protocol,
        session: args.session,
    }
}

/// Opens `n` connections and says how long it took.
async fn connect(args: &Args, connector: &Connector, n: u64) -> Result<(Vec<Conn>, Duration)> {
    conn::raise_nofile(n);
    let n = usize::try_from(n).unwrap_or(usize::MAX);
    let started = Instant::now();
    let conns = connect_all(connector, n).await?;
    let took = started.elapsed();
    eprintln!(
        "connected {} connection(s) to {} in {:.2} s",
        conns.len(),
        args.addr,
        took.as_secs_f64()
    );
    Ok((conns, took))
}

/// Measures one payload size on fresh connections.
async fn run_size(args: &Args, connector: &Connector, size: usize) -> Result<Outcome> {
    let wire = connector_wire(args);
    // Broadcast: the readers first, so they are all registered before the sender starts.
    let (conns, _) = connect(args, connector, args.conns).await?;
    let shared = Arc::new(Shared::default());
    let mut tasks: JoinSet<Result<Option<Histogram<u64>>>> = JoinSet::new();
    let body = body(size);
    // Broadcasts are timed when their bodies can carry the stamp.
    let timing = (args.mode == Mode::Broadcast && size >= load::STAMP_LEN)
        .then(|| Arc::new(load::Timing::new(args.conns)));
    match args.mode {
        Mode::Throughput => {
            for conn in conns {
                let (shared, body) = (shared.clone(), body.clone());
                tasks.spawn(async move {
                    load::flat_out(conn, wire, body, shared)
                        .await
                        .map(|()| None)
                });
            }
        }
        Mode::Pingpong | Mode::Request => {
            let window = usize::try_from(args.window()).unwrap_or(usize::MAX);
            let requests = args.mode == Mode::Request;
            for conn in conns {
                let (shared, body) = (shared.clone(), body.clone());
                tasks.spawn(async move {
                    load::round_trips(conn, wire, body, window, requests, shared)
                        .await
                        .map(Some)
                });
            }
        }
        Mode::Broadcast => {
            let mut received = Vec::with_capacity(conns.len());
            let readers = conns.len();
            let chunk = (BROADCAST_READ_BUDGET / readers).clamp(8 * 1024, 64 * 1024);
            for (i, conn) in conns.into_iter().enumerate() {
                let mine = Arc::new(AtomicU64::new(0));
                received.push(mine.clone());
                let shared = shared.clone();
                let timer = timing.clone().map(|t| load::Timer::new(t, i));
                tasks.spawn(async move {
                    load::receive(conn, wire, mine, shared, chunk, timer)
                        .await
                        .map(|()| None)
                });
            }
            let sender = connector.connect().await?;
            let (stop, timing) = (shared.stop.clone(), timing.clone());
            let ahead = load::broadcast_ahead(args.window(), size);
            tasks.spawn(async move {
                load::send_paced(sender, wire, body, received, ahead, timing, stop)
                    .await
                    .map(|()| None)
            });
        }
        Mode::Idle => unreachable!("idle runs by itself"),
    }

    let measured = measure(args, &shared, &mut tasks).await;
    shared.stop.cancel();
    shared.recording.store(false, Ordering::Relaxed);
    let (elapsed, messages) = measured?;

    // Collect the per-connection histograms (round trips); stop the rest.
    let mut latency = load::histogram();
    let deadline = tokio::time::sleep(Duration::from_secs(5));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                Some(Ok(Ok(Some(h)))) => latency.add(&h).context("merging latency histograms")?,
                Some(Ok(Ok(None))) => {}
                Some(Ok(Err(e))) => return Err(e),
                Some(Err(e)) if e.is_panic() => bail!("a connection task panicked: {e}"),
                Some(Err(_)) => {}
                None => break,
            },
            () = &mut deadline => {
                tasks.abort_all();
                break;
            }
        }
    }
    let mut last = load::histogram();
    if let Some(timing) = timing {
        (latency, last) = timing.histograms()?;
    }
    Ok(Outcome {
        size,
        elapsed,
        messages,
        latency,
        last,
    })
}

/// Waits out the warm-up, then counts for `--duration`, showing progress on a terminal.
/// Fails early if a connection task fails.
async fn measure(
    args: &Args,
    shared: &Shared,
    tasks: &mut JoinSet<Result<Option<Histogram<u64>>>>,
) -> Result<(Duration, u64)> {
    let progress = io::stderr().is_terminal();
    let fail_early = async {
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(Err(e)) => return Err(e),
                Err(e) if e.is_panic() => bail!("a connection task panicked: {e}"),
                _ => {}
            }
        }
        bail!("every connection ended before the measurement was over")
    };
    let count = async {
        tokio::time::sleep(args.warmup).await;
        shared.recording.store(true, Ordering::Relaxed);
        let start = Instant::now();
        let base = shared.messages.load(Ordering::Relaxed);
        let end = start + args.duration;
        let mut last = (start, base);
        loop {
            let now = Instant::now();
            if now >= end {
                break;
            }
            tokio::time::sleep_until(end.min(now + Duration::from_secs(1))).await;
            if progress {
                let now = Instant::now();
                let total = shared.messages.load(Ordering::Relaxed);
                let rate = (total - last.1) as f64 / (now - last.0).as_secs_f64().max(1e-9);
                eprint!(
                    "\r\x1b[K{:5.1} s  {} {}/s",
                    (now - start).as_secs_f64(),
                    human(rate),
                    unit(args.mode)
                );
                last = (now, total);
            }
        }
        let messages = shared.messages.load(Ordering::Relaxed) - base;
        let elapsed = start.elapsed();
        if progress {
            eprint!("\r\x1b[K");
        }
        Ok((elapsed, messages))
    };
    tokio::select! {
        result = count => result,
        failed = fail_early => failed,
    }
}

/// What is counted, per mode, for the progress line.
fn unit(mode: Mode) -> &'static str {
    match mode {
        Mode::Throughput => "messages",
        Mode::Pingpong | Mode::Request => "round trips",
        Mode::Broadcast => "deliveries",
        Mode::Idle => "",
    }
}

/// A rate with a k/M/G suffix.
fn human(x: f64) -> String {
    match x {
        x if x >= 1e9 => format!("{:.2} G", x / 1e9),
        x if x >= 1e6 => format!("{:.2} M", x / 1e6),
        x if x >= 1e3 => format!("{:.1} k", x / 1e3),
        x => format!("{x:.0}"),
    }
}

/// Prints the result of one measured size.
fn report(args: &Args, o: &Outcome) -> Result<()> {
    let secs = o.elapsed.as_secs_f64();
    let (rate, mb, messages, size) = (o.rate(), o.mb_per_s(), o.messages, o.size);
    let tls = args.tls || args.ca.is_some() || args.insecure || args.server_name.is_some();
    let mut fields: Vec<(&str, Value)> = vec![
        ("mode", args.mode.name().into()),
        ("protocol", protocol_name(args.protocol).into()),
        ("session", args.session.into()),
        ("tls", tls.into()),
        ("addr", args.addr.clone().into()),
        ("conns", args.conns.into()),
        ("size", size.into()),
        ("duration_s", secs.into()),
    ];
    let text = match args.mode {
        Mode::Throughput => {
            fields.extend([
                ("messages", messages.into()),
                ("bytes", (messages * size as u64).into()),
                ("messages_per_s", rate.into()),
                ("mb_per_s", mb.into()),
            ]);
            format!(
                "throughput: {} messages/s, {mb:.1} MB/s of payload ({messages} messages of {size} B in {secs:.2} s over {} connection(s))",
                human(rate),
                args.conns
            )
        }
        Mode::Pingpong | Mode::Request => {
            let (p50, p90, p99, p999) = (o.us(0.5), o.us(0.9), o.us(0.99), o.us(0.999));
            let max = o.latency.max() as f64 / 1e3;
            let min = o.latency.min() as f64 / 1e3;
            let mean = o.latency.mean() / 1e3;
            fields.extend([
                ("window", args.window().into()),
                ("round_trips", messages.into()),
                ("round_trips_per_s", rate.into()),
                ("mb_per_s", mb.into()),
                ("min_us", min.into()),
                ("p50_us", p50.into()),
                ("p90_us", p90.into()),
                ("p99_us", p99.into()),
                ("p999_us", p999.into()),
                ("max_us", max.into()),
                ("mean_us", mean.into()),
            ]);
            format!(
                "{}: {} round trips/s ({messages} in {secs:.2} s, {} connection(s), window {}, {size} B)\n\
                 latency: p50 {p50:.1} µs, p99 {p99:.1} µs, p99.9 {p999:.1} µs, max {max:.1} µs, mean {mean:.1} µs",
                args.mode.name(),
                human(rate),
                args.conns,
                args.window(),
            )
        }
        Mode::Broadcast => {
            let window = load::broadcast_ahead(args.window(), size);
            fields.extend([
                ("window", window.into()),
                ("deliveries", messages.into()),
                ("deliveries_per_s", rate.into()),
                ("mb_per_s", mb.into()),
            ]);
            let mut text = format!(
                "broadcast: {} deliveries/s, {mb:.1} MB/s of payload ({messages} deliveries of {size} B in {secs:.2} s to {} reader(s), window {window})",
                human(rate),
                args.conns,
            );
            if o.last.is_empty() {
                text.push_str(&format!(
                    "\nlatency: not measured ({})",
                    if size < load::STAMP_LEN {
                        "bodies under 16 B carry no stamp"
                    } else {
                        "no broadcast reached every reader while counting"
                    }
                ));
            } else {
                let (l50, l99, lmax) = (o.last_us(0.5), o.last_us(0.99), o.last.max() as f64 / 1e3);
                let (p50, p99, pmax) = (o.us(0.5), o.us(0.99), o.latency.max() as f64 / 1e3);
                let broadcasts = o.last.len();
                fields.extend([
                    ("broadcasts", broadcasts.into()),
                    ("last_p50_us", l50.into()),
                    ("last_p90_us", o.last_us(0.9).into()),
                    ("last_p99_us", l99.into()),
                    ("last_max_us", lmax.into()),
                    ("last_mean_us", (o.last.mean() / 1e3).into()),
                    ("p50_us", p50.into()),
                    ("p90_us", o.us(0.9).into()),
                    ("p99_us", p99.into()),
                    ("p999_us", o.us(0.999).into()),
                    ("max_us", pmax.into()),
                    ("mean_us", (o.latency.mean() / 1e3).into()),
                ]);
                text.push_str(&format!(
                    "\ntime to last delivery: p50 {l50:.1} µs, p99 {l99:.1} µs, max {lmax:.1} µs ({broadcasts} broadcasts)\n\
                     per delivery: p50 {p50:.1} µs, p99 {p99:.1} µs, max {pmax:.1} µs"
                ));
            }
            text
        }
        Mode::Idle => unreachable!("idle reports by itself"),
    };
    print_result(args.json, &json_object(&fields), &text)
}

fn print_result(json: bool, json_line: &str, text: &str) -> Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "{}", if json { json_line } else { text })?;
    out.flush()?;
    Ok(())
}

/// Opens `n` connections, a bounded number at a time, in order.
async fn connect_all(connector: &Connector, n: usize) -> Result<Vec<Conn>> {
    let mut conns = Vec::with_capacity(n);
    while conns.len() < n {
        let batch = CONNECT_CONCURRENCY.min(n - conns.len());
        let mut set = JoinSet::new();
        for i in 0..batch {
            let connector = connector.clone();
            set.spawn(async move { (i, connector.connect().await) });
        }
        let mut got: Vec<_> = set.join_all().await;
        got.sort_by_key(|(i, _)| *i);
        for (_, conn) in got {
            let conn =
                conn.with_context(|| format!("connection {} of {n} failed", conns.len() + 1))?;
            conns.push(conn);
        }
    }
    Ok(conns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_fit_a_signed_length() {
        assert_eq!(payload_size("1MiB"), Ok(1 << 20));
        assert!(payload_size("2GiB").is_err());
        assert_eq!(&body(3)[..], b"abc");
    }
}

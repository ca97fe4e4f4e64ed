//! `sockframe bench`: a load generator for any server speaking the tutorial framing.
//!
//! It is written with raw tokio `TcpStream`s and frames built by hand, batched into large
//! writes, not with the sockframe client: what it measures is the server.
//!
//! Modes:
//!
//! - `throughput`: every connection writes frames as fast as it can; reports the messages
//!   and payload bytes the generator wrote per second. Meant for sink servers
//!   (`sockframe serve --discard`), which print their own count on stderr too.
//! - `pingpong`: every connection keeps `--window` frames in flight against an echo server
//!   (`sockframe serve --echo`) and measures each round trip; reports latency percentiles
//!   and round trips per second.
//! - `broadcast`: `--conns` readers and one extra sender against a fan-out server
//!   (`sockframe serve --fanout`), which sends every message to every other client; reports
//!   deliveries (messages received by the readers) per second. The sender stays at most
//!   [`BROADCAST_AHEAD`] messages ahead of the slowest reader, so no server queue overflows.
//! - `idle`: opens `--conns` connections, sends nothing for `--duration`, then closes them;
//!   for measuring what an idle connection costs the server.
//!
//! Counting starts after `--warmup`. A progress line is shown on stderr while running when
//! stderr is a terminal; `--json` prints the result as one JSON object on stdout.

use std::collections::VecDeque;
use std::io::{self, IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::{Buf, BytesMut};
use hdrhistogram::Histogram;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::output::json_object;
use crate::parse;

/// Frames for small messages are batched into writes of about this many bytes.
const WRITE_BATCH: usize = 256 * 1024;

/// `broadcast`: most messages the sender may have sent that the slowest reader has not yet
/// received (well under the server's default queue of 1,024 messages per client).
const BROADCAST_AHEAD: u64 = 512;

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
    /// Connections to open (in `broadcast` mode: receiving connections, plus one sender)
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..))]
    conns: u64,
    /// Payload size of each message, in bytes, optionally with a suffix: KiB, MiB (1024-based)
    /// or KB, MB (1000-based)
    #[arg(long, value_name = "BYTES", default_value = "64", value_parser = payload_size)]
    size: usize,
    /// How long to measure, after the warm-up (`idle`: how long to hold the connections)
    #[arg(long, value_name = "TIME", default_value = "5s", value_parser = parse::duration)]
    duration: Duration,
    /// How long to run before counting starts
    #[arg(long, value_name = "TIME", default_value = "1s", value_parser = parse::duration)]
    warmup: Duration,
    /// `pingpong`: messages in flight per connection
    #[arg(long, value_name = "W", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    window: u64,
    /// Print the result as one JSON object on stdout
    #[arg(long)]
    json: bool,
}

/// `--mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    /// Write as fast as possible; count what was written
    Throughput,
    /// Keep `--window` messages in flight against an echo server; measure round trips
    Pingpong,
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
            Mode::Broadcast => "broadcast",
            Mode::Idle => "idle",
        }
    }
}

/// `--size`: a payload the tutorial's signed 32-bit length can express.
fn payload_size(s: &str) -> Result<usize, String> {
    match parse::size(s)? {
        n if n > i32::MAX as usize => Err(format!(
            "{n} bytes is more than a frame can hold (at most {})",
            i32::MAX
        )),
        n => Ok(n),
    }
}

/// One frame with a payload of `size` bytes.
fn frame(size: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + size);
    v.extend_from_slice(&(size as u32).to_le_bytes());
    v.extend((0..size).map(|i| b'a' + (i % 26) as u8));
    v
}

/// Counters shared by the connection tasks and the sampler.
#[derive(Debug, Default)]
struct Counters {
    /// Messages written (`throughput`), echoed back (`pingpong`) or received (`broadcast`).
    messages: AtomicU64,
}

/// Runs the benchmark and prints its result.
pub async fn run(args: Args) -> Result<()> {
    let conns = usize::try_from(args.conns).unwrap_or(usize::MAX);
    let connect_started = Instant::now();
    // Broadcast: the readers first, so they are all registered before the sender starts.
    let streams = connect_all(&args.addr, conns).await?;
    let connect_time = connect_started.elapsed();
    eprintln!(
        "connected {} connection(s) to {} in {:.2} s",
        streams.len(),
        args.addr,
        connect_time.as_secs_f64()
    );

    let counters = Arc::new(Counters::default());
    let stop = CancellationToken::new();
    let recording = Arc::new(AtomicBool::new(false));
    let mut tasks: JoinSet<Result<Option<Histogram<u64>>>> = JoinSet::new();
    let one = frame(args.size);

    match args.mode {
        Mode::Throughput => {
            for stream in streams {
                let (c, s, one) = (counters.clone(), stop.clone(), one.clone());
                tasks.spawn(async move { write_flat_out(stream, one, c, s).await.map(|()| None) });
            }
        }
        Mode::Pingpong => {
            for stream in streams {
                let (c, s, r, one) = (
                    counters.clone(),
                    stop.clone(),
                    recording.clone(),
                    one.clone(),
                );
                let window = args.window as usize;
                tasks.spawn(async move { pingpong(stream, one, window, c, r, s).await.map(Some) });
            }
        }
        Mode::Broadcast => {
            let mut received = Vec::with_capacity(streams.len());
            for stream in streams {
                let mine = Arc::new(AtomicU64::new(0));
                received.push(mine.clone());
                let (c, s) = (counters.clone(), stop.clone());
                tasks.spawn(async move { count_frames(stream, mine, c, s).await.map(|()| None) });
            }
            let sender = connect_one(&args.addr).await?;
            let s = stop.clone();
            tasks.spawn(async move { send_paced(sender, one, received, s).await.map(|()| None) });
        }
        Mode::Idle => {
            let held = Instant::now();
            tokio::time::sleep(args.duration).await;
            let held = held.elapsed();
            drop(streams);
            let result = json_object(&[
                ("mode", "idle".into()),
                ("addr", args.addr.clone().into()),
                ("conns", args.conns.into()),
                ("connect_s", connect_time.as_secs_f64().into()),
                ("held_s", held.as_secs_f64().into()),
            ]);
            return print_result(
                args.json,
                &result,
                &format!(
                    "idle: held {} connection(s) for {:.1} s (connecting took {:.2} s)",
                    args.conns,
                    held.as_secs_f64(),
                    connect_time.as_secs_f64()
                ),
            );
        }
    }

    let measured = measure(&args, &counters, &recording, &mut tasks).await;
    stop.cancel();
    recording.store(false, Ordering::Relaxed);
    let (elapsed, messages) = measured?;

    // Collect the per-connection histograms (pingpong); stop the rest.
    let mut latency = histogram();
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

    report(&args, elapsed, messages, &latency)
}

/// Waits out the warm-up, then counts for `--duration`, showing progress on a terminal.
/// Fails early if a connection task fails.
async fn measure(
    args: &Args,
    counters: &Counters,
    recording: &AtomicBool,
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
        recording.store(true, Ordering::Relaxed);
        let start = Instant::now();
        let base = counters.messages.load(Ordering::Relaxed);
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
                let total = counters.messages.load(Ordering::Relaxed);
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
        let messages = counters.messages.load(Ordering::Relaxed) - base;
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
        Mode::Pingpong => "round trips",
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

/// Prints the result of a measured mode.
fn report(args: &Args, elapsed: Duration, messages: u64, latency: &Histogram<u64>) -> Result<()> {
    let secs = elapsed.as_secs_f64();
    let rate = messages as f64 / secs;
    let mb = rate * args.size as f64 / 1e6;
    let mut fields: Vec<(&str, Value)> = vec![
        ("mode", args.mode.name().into()),
        ("addr", args.addr.clone().into()),
        ("conns", args.conns.into()),
        ("size", args.size.into()),
        ("duration_s", secs.into()),
    ];
    let text = match args.mode {
        Mode::Throughput => {
            fields.extend([
                ("messages", messages.into()),
                ("bytes", (messages * args.size as u64).into()),
                ("messages_per_s", rate.into()),
                ("mb_per_s", mb.into()),
            ]);
            format!(
                "throughput: {} messages/s, {mb:.1} MB/s of payload ({messages} messages of {} B in {secs:.2} s over {} connection(s))",
                human(rate),
                args.size,
                args.conns
            )
        }
        Mode::Pingpong => {
            let us = |q: f64| latency.value_at_quantile(q) as f64 / 1e3;
            let (p50, p99, p999) = (us(0.5), us(0.99), us(0.999));
            let max = latency.max() as f64 / 1e3;
            let mean = latency.mean() / 1e3;
            fields.extend([
                ("window", args.window.into()),
                ("round_trips", messages.into()),
                ("round_trips_per_s", rate.into()),
                ("p50_us", p50.into()),
                ("p99_us", p99.into()),
                ("p999_us", p999.into()),
                ("max_us", max.into()),
                ("mean_us", mean.into()),
            ]);
            format!(
                "pingpong: {} round trips/s ({messages} in {secs:.2} s, {} connection(s), window {}, {} B)\n\
                 latency: p50 {p50:.1} µs, p99 {p99:.1} µs, p99.9 {p999:.1} µs, max {max:.1} µs, mean {mean:.1} µs",
                human(rate),
                args.conns,
                args.window,
                args.size
            )
        }
        Mode::Broadcast => {
            fields.extend([
                ("deliveries", messages.into()),
                ("deliveries_per_s", rate.into()),
                ("mb_per_s", mb.into()),
            ]);
            format!(
                "broadcast: {} deliveries/s, {mb:.1} MB/s of payload ({messages} deliveries of {} B in {secs:.2} s to {} reader(s))",
                human(rate),
                args.size,
                args.conns
            )
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
async fn connect_all(addr: &str, n: usize) -> Result<Vec<TcpStream>> {
    let mut streams = Vec::with_capacity(n);
    while streams.len() < n {
        let batch = CONNECT_CONCURRENCY.min(n - streams.len());
        let mut set = JoinSet::new();
        for i in 0..batch {
            let addr = addr.to_string();
            set.spawn(async move { (i, connect_one(&addr).await) });
        }
        let mut got: Vec<_> = set.join_all().await;
        got.sort_by_key(|(i, _)| *i);
        for (_, stream) in got {
            let stream = stream
                .with_context(|| format!("connection {} of {n} failed", streams.len() + 1))?;
            streams.push(stream);
        }
    }
    Ok(streams)
}

async fn connect_one(addr: &str) -> Result<TcpStream> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Writes frames as fast as the connection takes them, in batches of about [`WRITE_BATCH`]
/// bytes, counting each batch once written. Whatever the server sends back is read and
/// dropped, so an echo server cannot stall the writer.
async fn write_flat_out(
    stream: TcpStream,
    one: Vec<u8>,
    counters: Arc<Counters>,
    stop: CancellationToken,
) -> Result<()> {
    let per_batch = (WRITE_BATCH / one.len()).max(1);
    let batch = one.repeat(per_batch);
    let (mut rd, mut wr) = stream.into_split();
    let drain = async {
        let mut buf = vec![0; 64 * 1024];
        while rd.read(&mut buf).await? > 0 {}
        // The server closed its side; keep writing until our write fails or we stop.
        std::future::pending::<io::Result<()>>().await
    };
    let write = async {
        loop {
            wr.write_all(&batch).await?;
            counters
                .messages
                .fetch_add(per_batch as u64, Ordering::Relaxed);
        }
    };
    let result: io::Result<()> = tokio::select! {
        () = stop.cancelled() => Ok(()),
        r = drain => r,
        r = write => r,
    };
    match result {
        Ok(()) => Ok(()),
        // The measurement was over when the server went away.
        Err(_) if stop.is_cancelled() => Ok(()),
        Err(e) => Err(e).context("writing to the server failed"),
    }
}

/// Sends frames in batches, staying at most [`BROADCAST_AHEAD`] messages ahead of the reader
/// that has received the fewest (`received`: one count per reader).
async fn send_paced(
    mut stream: TcpStream,
    one: Vec<u8>,
    received: Vec<Arc<AtomicU64>>,
    stop: CancellationToken,
) -> Result<()> {
    let per_batch = (WRITE_BATCH / one.len()).clamp(1, BROADCAST_AHEAD as usize / 4) as u64;
    let batch = one.repeat(per_batch as usize);
    let mut sent = 0u64;
    let send = async {
        // The server registers a connection a little after its TCP handshake, and a reader
        // not yet registered misses what is sent meanwhile, which pacing against it would
        // wait for forever. So probe, one frame at a time, until every reader gets them.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !received.iter().all(|r| r.load(Ordering::Relaxed) > 0) {
            if Instant::now() > deadline {
                return Err(io::Error::other(
                    "not every reader receives the broadcasts (is the server fanning out?)",
                ));
            }
            stream.write_all(&one).await?;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Pace from here on, against what each reader has received since.
        let base: Vec<u64> = received.iter().map(|r| r.load(Ordering::Relaxed)).collect();
        loop {
            loop {
                let slowest = received
                    .iter()
                    .zip(&base)
                    .map(|(r, b)| r.load(Ordering::Relaxed) - b)
                    .min()
                    .unwrap_or(sent);
                if sent + per_batch <= slowest + BROADCAST_AHEAD {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            stream.write_all(&batch).await?;
            sent += per_batch;
        }
    };
    let result: io::Result<()> = tokio::select! {
        () = stop.cancelled() => Ok(()),
        r = send => r,
    };
    match result {
        Err(e) if !stop.is_cancelled() => Err(e).context("writing to the server failed"),
        _ => Ok(()),
    }
}

/// Reads frames and counts them (in `mine` and in `counters`), parsing the length prefixes
/// in place.
async fn count_frames(
    mut stream: TcpStream,
    mine: Arc<AtomicU64>,
    counters: Arc<Counters>,
    stop: CancellationToken,
) -> Result<()> {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let read = async {
        loop {
            if stream.read_buf(&mut buf).await? == 0 {
                bail!("the server closed the connection");
            }
            let n = take_frames(&mut buf, |_| Ok(()))?;
            mine.fetch_add(n, Ordering::Relaxed);
            counters.messages.fetch_add(n, Ordering::Relaxed);
            if buf.capacity() - buf.len() < 4096 {
                buf.reserve(64 * 1024);
            }
        }
    };
    tokio::select! {
        () = stop.cancelled() => Ok(()),
        r = read => r,
    }
}

/// Removes every complete frame at the start of `buf`, calling `each` with its payload
/// length; returns how many. Reserves room for a partly received frame.
fn take_frames(buf: &mut BytesMut, mut each: impl FnMut(usize) -> Result<()>) -> Result<u64> {
    let mut n = 0;
    while let Some(header) = buf.first_chunk::<4>() {
        let len = u32::from_le_bytes(*header) as usize;
        if buf.len() < 4 + len {
            buf.reserve(4 + len - buf.len());
            break;
        }
        buf.advance(4 + len);
        each(len)?;
        n += 1;
    }
    Ok(n)
}

/// A latency histogram: nanoseconds from 1 ns to 10 minutes (longer ones count as 10 minutes),
/// 3 significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("valid histogram bounds")
}

/// Keeps `window` frames in flight and records the round trip of each (from when it was
/// queued for writing until its echo was read) once `recording` is set.
///
/// One task reads and writes with non-blocking calls, so a large window cannot deadlock
/// against a server that stops reading while its writes are blocked.
async fn pingpong(
    stream: TcpStream,
    one: Vec<u8>,
    window: usize,
    counters: Arc<Counters>,
    recording: Arc<AtomicBool>,
    stop: CancellationToken,
) -> Result<Histogram<u64>> {
    let size = one.len() - 4;
    let mut hist = histogram();
    let mut sent_at = VecDeque::with_capacity(window);
    let mut out = Vec::with_capacity(one.len() * window);
    let mut written = 0;
    let mut inbuf = BytesMut::with_capacity(64 * 1024);
    let now = Instant::now();
    for _ in 0..window {
        out.extend_from_slice(&one);
        sent_at.push_back(now);
    }
    loop {
        while written < out.len() {
            match stream.try_write(&out[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e).context("writing to the server failed"),
            }
        }
        if written == out.len() {
            out.clear();
            written = 0;
        }
        let interest = if out.is_empty() {
            Interest::READABLE
        } else {
            Interest::READABLE | Interest::WRITABLE
        };
        let ready = tokio::select! {
            () = stop.cancelled() => return Ok(hist),
            ready = stream.ready(interest) => ready?,
        };
        if !ready.is_readable() {
            continue;
        }
        match stream.try_read_buf(&mut inbuf) {
            Ok(0) => bail!("the server closed the connection"),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e).context("reading from the server failed"),
        }
        let now = Instant::now();
        let record = recording.load(Ordering::Relaxed);
        let n = take_frames(&mut inbuf, |len| {
            if len != size {
                bail!("got a {len}-byte message back, expected {size}: is the server echoing?");
            }
            let Some(t0) = sent_at.pop_front() else {
                bail!("got more messages back than were sent: is the server echoing?");
            };
            if record {
                let ns = u64::try_from((now - t0).as_nanos()).unwrap_or(u64::MAX);
                hist.saturating_record(ns.max(1));
            }
            out.extend_from_slice(&one);
            sent_at.push_back(now);
            Ok(())
        })?;
        if record {
            counters.messages.fetch_add(n, Ordering::Relaxed);
        }
        if inbuf.capacity() - inbuf.len() < 4096 {
            inbuf.reserve(64 * 1024);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_taken_in_place() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&frame(3));
        buf.extend_from_slice(&frame(0));
        buf.extend_from_slice(&frame(5)[..6]);
        let mut lens = Vec::new();
        let n = take_frames(&mut buf, |len| {
            lens.push(len);
            Ok(())
        })
        .unwrap();
        assert_eq!(n, 2);
        assert_eq!(lens, [3, 0]);
        assert_eq!(buf.len(), 6);
        assert!(buf.capacity() >= 9);
    }

    #[test]
    fn sizes_fit_a_signed_length() {
        assert_eq!(payload_size("1MiB"), Ok(1 << 20));
        assert!(payload_size("2GiB").is_err());
        assert_eq!(&frame(2)[..], b"\x02\x00\x00\x00ab");
    }
}

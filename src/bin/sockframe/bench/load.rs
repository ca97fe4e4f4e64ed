//! The per-connection load loops of `sockframe bench`.
//!
//! Every loop writes in batches and parses what it reads in place (see `wire`); the
//! round-trip loops read and write from one task with non-blocking polls, so a large window
//! cannot deadlock against a server that stops reading while its writes are blocked.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::BytesMut;
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::conn::{Conn, Stream};
use super::wire::{self, Acks, Incoming, Wire};
use crate::peer::Protocol;

/// Frames for small messages are batched into writes of about this many bytes.
const WRITE_BATCH: usize = 256 * 1024;

/// `broadcast`: most messages the sender may have sent that the slowest reader has not yet
/// received (well under the server's default queue of 1,024 messages per client).
pub const BROADCAST_AHEAD: u64 = 512;

/// `broadcast`: most payload bytes the sender may be ahead of the slowest reader (half the
/// server's default queue of 8 MiB per client): large messages run fewer than
/// [`BROADCAST_AHEAD`] ahead.
pub const BROADCAST_AHEAD_BYTES: u64 = 4 << 20;

/// `broadcast`: how many messages of `size` bytes the sender may run ahead, for `--window`
/// `asked`: at most [`BROADCAST_AHEAD`] and [`BROADCAST_AHEAD_BYTES`], at least one.
pub fn broadcast_ahead(asked: u64, size: usize) -> u64 {
    let by_bytes = BROADCAST_AHEAD_BYTES / (size as u64).max(1);
    asked.min(BROADCAST_AHEAD).min(by_bytes).max(1)
}

/// Read buffers of busy connections grow by this much when they run low.
const READ_CHUNK: usize = 64 * 1024;

/// `broadcast`: the bytes at the start of each message's body that say which broadcast it
/// is and when it was written: a sequence number and the nanoseconds since
/// [`Timing::epoch`], both u64 little-endian. Smaller bodies are not timed.
pub const STAMP_LEN: usize = 16;

/// `broadcast`: the sequence number of the probes sent before pacing starts, which are not
/// timed (the readers not yet registered miss them).
const PROBE: u64 = u64::MAX;

/// `broadcast`: slots in [`Timing`]'s ring of delivery counts, one per sequence number
/// modulo this. Several times what the sender may have in flight ([`BROADCAST_AHEAD`]), so
/// that every reader has had broadcast `seq` before anyone gets `seq + RING`, which counts
/// in the same slot.
const RING: u64 = 4 * BROADCAST_AHEAD;

/// `broadcast`: histograms of per-delivery latency, each for a share of the readers, who
/// record into theirs under its lock once per read (a lock per reader would cost a
/// histogram of some 200 KB each: 2 GB for 10,000 readers).
const SHARDS: usize = 16;

/// What the connection tasks share with the sampler.
#[derive(Debug, Default)]
pub struct Shared {
    /// Messages written (`throughput`), round trips (`pingpong`, `request`) or deliveries
    /// (`broadcast`).
    pub messages: AtomicU64,
    /// Set after the warm-up: round trips are recorded from then on.
    pub recording: AtomicBool,
    /// Cancelled when the measurement is over.
    pub stop: CancellationToken,
}

/// A latency histogram: nanoseconds from 1 ns to 10 minutes (longer ones count as 10
/// minutes), 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("valid histogram bounds")
}

/// Writes what `out` holds (from `*written` on) as far as the socket takes it, then reads
/// into `inbuf`; returns once something was read (0: end of stream). Like `try_write` and
/// `try_read` on a `TcpStream`, but for TLS as well.
async fn exchange(
    stream: &mut Stream,
    out: &mut Vec<u8>,
    written: &mut usize,
    inbuf: &mut BytesMut,
    chunk: usize,
) -> io::Result<usize> {
    poll_fn(|cx| {
        while *written < out.len() {
            match Pin::new(&mut *stream).poll_write(cx, &out[*written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => *written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => break,
            }
        }
        if *written == out.len() {
            out.clear();
            *written = 0;
        }
        // TLS may hold back what the socket did not take; this pushes it on (a no-op for
        // TCP).
        if let Poll::Ready(Err(e)) = Pin::new(&mut *stream).poll_flush(cx) {
            return Poll::Ready(Err(e));
        }
        if inbuf.capacity() - inbuf.len() < chunk / 16 + 1 {
            inbuf.reserve(chunk);
        }
        // A fresh `read_buf` future per poll: it holds no state between polls, and this
        // reads into the spare capacity without initializing it first.
        std::pin::pin!(stream.read_buf(&mut *inbuf)).poll(cx)
    })
    .await
}

/// `pingpong` and `request`: keeps `window` messages (or requests) in flight and records the
/// round trip of each, from when it was queued for writing until its echo (or response) was
/// parsed, once recording has started.
pub async fn round_trips(
    conn: Conn,
    wire: Wire,
    body: Arc<[u8]>,
    window: usize,
    requests: bool,
    shared: Arc<Shared>,
) -> Result<Histogram<u64>> {
    let Conn {
        mut stream,
        mut inbuf,
    } = conn;
    let size = body.len();
    let mut hist = histogram();
    // (request id, queued at); ids are 0 for pingpong, where echoes come back in order.
    let mut in_flight: VecDeque<(u64, Instant)> = VecDeque::with_capacity(window);
    let mut next_id = 0u64;
    let mut out = Vec::with_capacity(window.min(4096) * (wire.message_len(size) + 16));
    let mut written = 0;
    let mut acks = Acks::new(wire.session);
    let mut queue = |out: &mut Vec<u8>, in_flight: &mut VecDeque<(u64, Instant)>, now| {
        if requests {
            wire.put_request(out, next_id, &body);
            in_flight.push_back((next_id, now));
            next_id += 1;
        } else {
            wire.put_message(out, &body);
            in_flight.push_back((0, now));
        }
    };
    let now = Instant::now();
    for _ in 0..window {
        queue(&mut out, &mut in_flight, now);
    }
    // Frames queued so far: the server cannot acknowledge more.
    let mut queued = window as u64;
    loop {
        // What the handshake left over (or the previous read) is parsed first.
        let now = Instant::now();
        let record = shared.recording.load(Ordering::Relaxed);
        let mut done = 0;
        wire.take_frames(&mut inbuf, |incoming, _| {
            if acks.see(&incoming)? {
                return Ok(());
            }
            let t0 = match incoming {
                Incoming::Message(len) if !requests => {
                    if len != size {
                        bail!(
                            "got a {len}-byte message back, expected {size}: is the server echoing?"
                        );
                    }
                    let Some((_, t0)) = in_flight.pop_front() else {
                        bail!("got more messages back than were sent: is the server echoing?");
                    };
                    t0
                }
                Incoming::Response { id, len } if requests => {
                    if len != size {
                        bail!("got a {len}-byte response, expected {size}: is the server echoing?");
                    }
                    // Responses normally come in order; look further only when not.
                    let at = match in_flight.front() {
                        Some((first, _)) if *first == id => 0,
                        _ => in_flight
                            .iter()
                            .position(|(i, _)| *i == id)
                            .with_context(|| {
                                format!("a response to request {id}, which is not in flight")
                            })?,
                    };
                    in_flight.remove(at).expect("in flight").1
                }
                Incoming::Ping(nonce) => {
                    wire.put_pong(&mut out, nonce);
                    return Ok(());
                }
                Incoming::Ignored | Incoming::Ack(_) | Incoming::AckRequest => return Ok(()),
                Incoming::Message(_) => bail!("got a message while waiting for responses"),
                Incoming::Response { .. } => bail!("got a response to a request never sent"),
            };
            if record {
                let ns = u64::try_from((now - t0).as_nanos()).unwrap_or(u64::MAX);
                hist.saturating_record(ns.max(1));
            }
            done += 1;
            queue(&mut out, &mut in_flight, now);
            Ok(())
        })?;
        if record {
            shared.messages.fetch_add(done, Ordering::Relaxed);
        }
        queued += done;
        if acks.peer_acked() > queued {
            bail!(
                "the server acknowledged {} frames, {queued} were sent",
                acks.peer_acked()
            );
        }
        // The next frames are going out anyway: the acknowledgement rides along.
        let busy = !out.is_empty();
        acks.put_due(&mut out, busy);
        let read = tokio::select! {
            () = shared.stop.cancelled() => return Ok(hist),
            read = exchange(&mut stream, &mut out, &mut written, &mut inbuf, READ_CHUNK) => read,
        };
        match read {
            Ok(0) => bail!("the server closed the connection"),
            Ok(_) => {}
            Err(e) => return Err(e).context("the connection to the server failed"),
        }
    }
}

/// `throughput`: writes frames as fast as the connection takes them, in batches of about
/// [`WRITE_BATCH`] bytes, counting each batch once written. Whatever the server sends back is
/// read and dropped (pings are answered), so an echo server cannot stall the writer.
pub async fn flat_out(conn: Conn, wire: Wire, body: Arc<[u8]>, shared: Arc<Shared>) -> Result<()> {
    let per_batch = (WRITE_BATCH / wire.message_len(body.len())).max(1);
    let mut batch = Vec::with_capacity(per_batch * wire.message_len(body.len()));
    for _ in 0..per_batch {
        wire.put_message(&mut batch, &body);
    }
    let Conn { stream, mut inbuf } = conn;
    let (mut rd, mut wr) = tokio::io::split(stream);
    // The reader asks the writer for a pong: the nonce, and whether one is due.
    let pong = (AtomicBool::new(false), AtomicU64::new(0));
    // In a session, the reader tells the writer what it has received and whether the
    // server asked for an acknowledgement; the writer sends it after its next batch.
    let ack = (AtomicBool::new(false), AtomicU64::new(0));
    let mut acks = Acks::new(wire.session);
    let drain = async {
        match wire.protocol {
            // Nothing to answer: read and drop without parsing.
            Protocol::Tutorial => {
                let mut buf = vec![0; READ_CHUNK];
                while rd.read(&mut buf).await? > 0 {}
            }
            Protocol::Sockframe => loop {
                if inbuf.capacity() - inbuf.len() < 4096 {
                    inbuf.reserve(READ_CHUNK);
                }
                wire.take_frames(&mut inbuf, |incoming, _| {
                    acks.see(&incoming)?;
                    if let Incoming::Ping(nonce) = incoming {
                        pong.1.store(nonce, Ordering::Relaxed);
                        pong.0.store(true, Ordering::Relaxed);
                    }
                    Ok(())
                })?;
                if wire.session {
                    ack.1.store(acks.received(), Ordering::Relaxed);
                    if acks.take_requested() {
                        ack.0.store(true, Ordering::Release);
                    }
                }
                if rd.read_buf(&mut inbuf).await? == 0 {
                    break;
                }
            },
        }
        // The server closed its side; keep writing until our write fails or we stop.
        std::future::pending::<Result<()>>().await
    };
    let write = write_batches(
        &mut wr,
        wire,
        &batch,
        per_batch as u64,
        &pong,
        &ack,
        &shared,
    );
    let result: Result<()> = tokio::select! {
        () = shared.stop.cancelled() => Ok(()),
        r = drain => r,
        r = write => r.map_err(anyhow::Error::from),
    };
    match result {
        Ok(()) => Ok(()),
        // The measurement was over when the server went away.
        Err(_) if shared.stop.is_cancelled() => Ok(()),
        Err(e) => Err(e).context("writing to the server failed"),
    }
}

/// The writing half of [`flat_out`]: `batch` (holding `per_batch` messages) again and again,
/// and after a batch a pong when the reader saw a ping and, in a session, an `ACK` when the
/// reader's count moved or the server asked for one (`ack`: asked, count).
async fn write_batches(
    wr: &mut (impl AsyncWrite + Unpin),
    wire: Wire,
    batch: &[u8],
    per_batch: u64,
    pong: &(AtomicBool, AtomicU64),
    ack: &(AtomicBool, AtomicU64),
    shared: &Shared,
) -> io::Result<()> {
    let mut extra = Vec::new();
    let mut acked = 0;
    loop {
        wr.write_all(batch).await?;
        shared.messages.fetch_add(per_batch, Ordering::Relaxed);
        extra.clear();
        if pong.0.swap(false, Ordering::Relaxed) {
            wire.put_pong(&mut extra, pong.1.load(Ordering::Relaxed));
        }
        if wire.session {
            // The flag first: the reader stores the count before raising it, so the count
            // read after it is at least the one the request was answered for.
            let asked = ack.0.swap(false, Ordering::Acquire);
            let received = ack.1.load(Ordering::Relaxed);
            if asked || received != acked {
                wire::put_ack(&mut extra, received);
                acked = received;
            }
        }
        if !extra.is_empty() {
            wr.write_all(&extra).await?;
        }
    }
}

/// `broadcast`: how long broadcasts take to reach the readers, measured by the readers from
/// the stamp the sender wrote into each body (see [`STAMP_LEN`]) on the one clock of this
/// process. Its memory is bounded whatever the number of readers and broadcasts: a ring of
/// [`RING`] counters and [`SHARDS`] + 1 histograms.
#[derive(Debug)]
pub struct Timing {
    /// The clock's zero: stamps are nanoseconds since then.
    epoch: Instant,
    /// Readers, each of which receives every broadcast after the probes.
    readers: u64,
    /// Deliveries counted per broadcast in slot `seq % RING`, cumulative over the ring's
    /// laps: broadcast `seq` has reached every reader when its slot holds
    /// `readers × (seq / RING + 1)`, and the reader that makes it so times the last delivery.
    ring: Box<[AtomicU64]>,
    /// Per delivery: from the sender's write to a reader's parse, sharded by reader.
    delivery: Box<[Mutex<Histogram<u64>>]>,
    /// Per broadcast: from the sender's write to the parse in the last reader to get it.
    last: Mutex<Histogram<u64>>,
}

impl Timing {
    /// Timing for `readers` readers.
    pub fn new(readers: u64) -> Self {
        Timing {
            epoch: Instant::now(),
            readers,
            ring: (0..RING).map(|_| AtomicU64::new(0)).collect(),
            delivery: (0..SHARDS).map(|_| Mutex::new(histogram())).collect(),
            last: Mutex::new(histogram()),
        }
    }

    /// Whether broadcast `seq` has reached every reader (valid while no broadcast `RING` or
    /// more after it has been sent).
    fn complete(&self, seq: u64) -> bool {
        self.ring[(seq % RING) as usize].load(Ordering::Acquire) >= self.readers * (seq / RING + 1)
    }

    /// Nanoseconds since the epoch.
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The histograms once the readers are done: per delivery, and per broadcast until its
    /// last delivery.
    pub fn histograms(&self) -> Result<(Histogram<u64>, Histogram<u64>)> {
        let mut delivery = histogram();
        for shard in &self.delivery {
            delivery
                .add(&*shard.lock().unwrap_or_else(PoisonError::into_inner))
                .context("merging latency histograms")?;
        }
        let last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        Ok((delivery, last.clone()))
    }
}

/// What one `broadcast` reader times: its share of [`Timing`], and the latencies of the
/// current read, recorded under one lock.
#[derive(Debug)]
pub struct Timer {
    timing: Arc<Timing>,
    shard: usize,
    batch: Vec<u64>,
}

impl Timer {
    /// The timer of reader number `reader`.
    pub fn new(timing: Arc<Timing>, reader: usize) -> Self {
        Timer {
            timing,
            shard: reader % SHARDS,
            batch: Vec::new(),
        }
    }

    /// One delivery of `body`, parsed at `now`; its latency is kept if `record`.
    fn delivered(&mut self, body: &[u8], now: u64, record: bool) {
        let Some((seq, rest)) = body.split_first_chunk::<8>() else {
            return;
        };
        let (seq, Some((sent, _))) = (u64::from_le_bytes(*seq), rest.split_first_chunk::<8>())
        else {
            return;
        };
        if seq == PROBE {
            return;
        }
        let ns = now.saturating_sub(u64::from_le_bytes(*sent)).max(1);
        if record {
            self.batch.push(ns);
        }
        let slot = &self.timing.ring[(seq % RING) as usize];
        let last =
            slot.fetch_add(1, Ordering::AcqRel) + 1 == self.timing.readers * (seq / RING + 1);
        if last && record {
            let mut hist = self
                .timing
                .last
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            hist.saturating_record(ns);
        }
    }

    /// Records the latencies of this read.
    fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let mut hist = self.timing.delivery[self.shard]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for ns in self.batch.drain(..) {
            hist.saturating_record(ns);
        }
    }
}

/// `broadcast`: sends frames in batches, staying at most `ahead` messages (see
/// [`broadcast_ahead`]) ahead of the reader that has received the fewest (`received`: one
/// count per reader). With `timing`, stamps each body with its sequence number and the
/// time its batch is written.
pub async fn send_paced(
    conn: Conn,
    wire: Wire,
    body: Arc<[u8]>,
    received: Vec<Arc<AtomicU64>>,
    ahead: u64,
    timing: Option<Arc<Timing>>,
    stop: CancellationToken,
) -> Result<()> {
    let mut stream = conn.stream;
    let mut one = Vec::new();
    wire.put_message(&mut one, &body);
    // Where the body starts in a frame.
    let at = one.len() - body.len();
    if timing.is_some() {
        one[at..at + 8].copy_from_slice(&PROBE.to_le_bytes());
    }
    let ahead = broadcast_ahead(ahead, body.len());
    let per_batch = (WRITE_BATCH / one.len()).clamp(1, (ahead as usize / 4).max(1)) as u64;
    let mut batch = one.repeat(per_batch as usize);
    let mut sent = 0u64;
    let send = async {
        // The server registers a connection a little after its TCP handshake, and a reader
        // not yet registered misses what is sent meanwhile, which pacing against it would
        // wait for forever. So probe, one frame at a time, until every reader gets them; the
        // next probe only once every reader that had something when the last one went out
        // has got more since, so that probes do not pile up in the server's queues while
        // it registers thousands of readers.
        let readers = received.len() as u64;
        let deadline = Instant::now() + Duration::from_secs(10) + Duration::from_millis(readers);
        let counts = || received.iter().map(|r| r.load(Ordering::Relaxed));
        while !counts().all(|n| n > 0) {
            let before: Vec<u64> = counts().collect();
            stream.write_all(&one).await?;
            stream.flush().await?;
            loop {
                tokio::time::sleep(Duration::from_millis(5)).await;
                if Instant::now() > deadline {
                    return Err(io::Error::other(
                        "not every reader receives the broadcasts (is the server fanning out?)",
                    ));
                }
                if counts().zip(&before).all(|(n, b)| *b == 0 || n > *b) {
                    break;
                }
            }
        }
        // Pace from here on: timed, against the broadcasts every reader has had (in order,
        // from the ring: probes still on their way do not count); untimed, against what each
        // reader has received since.
        let base: Vec<u64> = counts().collect();
        let mut done = 0u64;
        loop {
            loop {
                let slowest = match &timing {
                    Some(timing) => {
                        while done < sent && timing.complete(done) {
                            done += 1;
                        }
                        done
                    }
                    None => counts()
                        .zip(&base)
                        .map(|(n, b)| n - b)
                        .min()
                        .unwrap_or(sent),
                };
                if sent + per_batch <= slowest + ahead {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            if let Some(timing) = &timing {
                let now = timing.now().to_le_bytes();
                for (i, frame) in batch.chunks_exact_mut(one.len()).enumerate() {
                    let stamp = &mut frame[at..at + STAMP_LEN];
                    stamp[..8].copy_from_slice(&(sent + i as u64).to_le_bytes());
                    stamp[8..].copy_from_slice(&now);
                }
            }
            stream.write_all(&batch).await?;
            stream.flush().await?;
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

/// `broadcast` readers (and `idle` connections, with a small buffer): read frames and count
/// the messages (in `mine` and in `shared`), answering pings, until stopped. With a
/// `timer`, time each stamped message (once recording has started).
pub async fn receive(
    conn: Conn,
    wire: Wire,
    mine: Arc<AtomicU64>,
    shared: Arc<Shared>,
    chunk: usize,
    mut timer: Option<Timer>,
) -> Result<()> {
    let Conn {
        mut stream,
        mut inbuf,
    } = conn;
    let mut out = Vec::new();
    let mut written = 0;
    let mut acks = Acks::new(wire.session);
    loop {
        let mut n = 0;
        // One time for every frame of a read: they arrived together.
        let now = timer.as_ref().map_or(0, |t| t.timing.now());
        let record = shared.recording.load(Ordering::Relaxed);
        wire.take_frames(&mut inbuf, |incoming, body| {
            acks.see(&incoming)?;
            match incoming {
                Incoming::Message(_) => {
                    n += 1;
                    if let Some(timer) = &mut timer {
                        timer.delivered(body, now, record);
                    }
                }
                Incoming::Ping(nonce) => wire.put_pong(&mut out, nonce),
                _ => {}
            }
            Ok(())
        })?;
        if n > 0 {
            mine.fetch_add(n, Ordering::Relaxed);
            shared.messages.fetch_add(n, Ordering::Relaxed);
            if let Some(timer) = &mut timer {
                timer.flush();
            }
        }
        // Readers write only pongs: they acknowledge when asked, or with a pong.
        let busy = !out.is_empty();
        acks.put_due(&mut out, busy);
        let read = tokio::select! {
            () = shared.stop.cancelled() => return Ok(()),
            read = exchange(&mut stream, &mut out, &mut written, &mut inbuf, chunk) => read,
        };
        match read {
            Ok(0) => bail!("the server closed the connection"),
            Ok(_) => {}
            Err(e) => return Err(e).context("reading from the server failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body stamped as broadcast `seq`, written at `sent` ns.
    fn stamped(seq: u64, sent: u64) -> [u8; 24] {
        let mut body = [b'x'; 24];
        body[..8].copy_from_slice(&seq.to_le_bytes());
        body[8..16].copy_from_slice(&sent.to_le_bytes());
        body
    }

    #[test]
    fn the_last_reader_of_each_broadcast_times_it() {
        let timing = Arc::new(Timing::new(2));
        let (mut a, mut b) = (Timer::new(timing.clone(), 0), Timer::new(timing.clone(), 1));
        // Probes and bodies too short for a stamp are not timed.
        a.delivered(&stamped(PROBE, 0), 50, true);
        a.delivered(&[0; STAMP_LEN - 1], 50, true);
        // The same slot of the ring, lap after lap; the first lap before recording started
        // is counted all the same.
        for lap in 0..4 {
            let seq = 3 + lap * RING;
            a.delivered(&stamped(seq, 1_000), 1_100, lap > 0);
            b.delivered(&stamped(seq, 1_000), 1_300, lap > 0);
        }
        a.flush();
        b.flush();
        let (delivery, last) = timing.histograms().unwrap();
        assert_eq!(delivery.len(), 6);
        assert!(delivery.equivalent(delivery.min(), 100));
        assert_eq!(last.len(), 3);
        assert!(last.equivalent(last.min(), 300) && last.equivalent(last.max(), 300));
    }

    #[test]
    fn large_messages_run_fewer_ahead() {
        assert_eq!(broadcast_ahead(BROADCAST_AHEAD, 1024), BROADCAST_AHEAD);
        assert_eq!(broadcast_ahead(1, 1024), 1);
        assert_eq!(broadcast_ahead(BROADCAST_AHEAD, 64 * 1024), 64);
        assert_eq!(broadcast_ahead(BROADCAST_AHEAD, 16 << 20), 1);
    }
}

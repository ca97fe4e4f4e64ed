//! ZeroMQ beside the baseline (issue 17): the peer that `bench/compare` and `bench/zmq` run
//! against `sockframe serve` under equivalent loads.
//!
//! ```sh
//! zmq-peer sink 127.0.0.1:0      # PULL: count and drop; prints `listening on ADDR` on stderr
//! zmq-peer echo 127.0.0.1:0      # REP: send every message back
//! zmq-peer bench ADDR --mode sink --size 64 --duration 3s --warmup 1s
//! zmq-peer bench ADDR --mode pingpong --size 64 --duration 3s --warmup 1s
//! ```
//!
//! `bench` prints one JSON line shaped like `sockframe bench --json`: `messages_per_s` for the
//! sink (PUSH, default high-water mark, messages counted as `send` takes them, as `sockframe
//! bench` counts the frames it writes), `round_trips_per_s` and `p50_us`/`p99_us` for the
//! round trip (REQ/REP: one request in flight, like `--mode pingpong --window 1`; each round
//! trip timed from just before `send` to the reply received). One connection, one context
//! with ZeroMQ's default single I/O thread. Counting starts after the warm-up.
//!
//! Keep it plain, like `examples/baseline.rs`: ZeroMQ as its documentation shows it used.

use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("sink") => serve(zmq::PULL, args.get(1), false),
        Some("echo") => serve(zmq::REP, args.get(1), true),
        Some("bench") => bench(&args[1..]),
        _ => Err("usage: zmq-peer sink|echo [ADDR] | bench ADDR --mode sink|pingpong [--size N] [--duration 3s] [--warmup 1s]".into()),
    };
    if let Err(e) = result {
        eprintln!("zmq-peer: {e}");
        std::process::exit(1);
    }
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// A PULL sink or a REP echo bound to `addr` (`HOST:PORT`, port 0 for any free one).
fn serve(kind: zmq::SocketType, addr: Option<&String>, echo: bool) -> Result<()> {
    let addr = addr.map_or("127.0.0.1:0", String::as_str);
    let (host, port) = addr.rsplit_once(':').ok_or("ADDR is HOST:PORT")?;
    let port = if port == "0" { "*" } else { port };
    let ctx = zmq::Context::new();
    let socket = ctx.socket(kind)?;
    socket.bind(&format!("tcp://{host}:{port}"))?;
    let bound = socket
        .get_last_endpoint()?
        .map_err(|_| "endpoint is not UTF-8")?;
    eprintln!("listening on {}", bound.trim_start_matches("tcp://"));

    let mut msg = zmq::Message::new();
    let (mut count, mut last, mut tick) = (0u64, 0u64, Instant::now());
    loop {
        socket.recv(&mut msg, 0)?;
        count += 1;
        if echo {
            socket.send(&*msg, 0)?;
        }
        // Cheap enough per message next to a `recv`, and only ever read once a second.
        if count % 1024 == 0 && tick.elapsed() >= Duration::from_secs(1) {
            eprintln!("{} messages/s", count - last);
            (last, tick) = (count, Instant::now());
        }
    }
}

struct Load {
    addr: String,
    pingpong: bool,
    size: usize,
    duration: Duration,
    warmup: Duration,
}

fn bench(args: &[String]) -> Result<()> {
    let mut load = Load {
        addr: String::new(),
        pingpong: false,
        size: 64,
        duration: Duration::from_secs(3),
        warmup: Duration::from_secs(1),
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--mode" => {
                load.pingpong = match value()?.as_str() {
                    "sink" | "throughput" => false,
                    "pingpong" => true,
                    other => return Err(format!("unknown mode {other:?}").into()),
                }
            }
            "--size" => load.size = value()?.parse()?,
            "--duration" => load.duration = duration(value()?)?,
            "--warmup" => load.warmup = duration(value()?)?,
            "--json" => {}
            a if a.starts_with("--") => return Err(format!("unknown option {a}").into()),
            a => load.addr = a.to_string(),
        }
    }
    if load.addr.is_empty() {
        return Err("bench needs the server's ADDR".into());
    }
    let ctx = zmq::Context::new();
    let socket = ctx.socket(if load.pingpong { zmq::REQ } else { zmq::PUSH })?;
    // Messages still queued at the end are dropped, not flushed: counting is over by then.
    socket.set_linger(0)?;
    socket.connect(&format!("tcp://{}", load.addr))?;
    let line = if load.pingpong {
        pingpong(&socket, &load)?
    } else {
        sink(&socket, &load)?
    };
    println!("{line}");
    Ok(())
}

/// PUSH as fast as `send` takes messages; the rate over `duration` after `warmup`.
fn sink(socket: &zmq::Socket, load: &Load) -> Result<String> {
    let payload = vec![0x5a_u8; load.size];
    let send_for = |d: Duration| -> Result<(u64, Duration)> {
        let start = Instant::now();
        let mut n = 0u64;
        loop {
            for _ in 0..256 {
                socket.send(&payload[..], 0)?;
            }
            n += 256;
            let elapsed = start.elapsed();
            if elapsed >= d {
                return Ok((n, elapsed));
            }
        }
    };
    send_for(load.warmup)?;
    let (messages, elapsed) = send_for(load.duration)?;
    let secs = elapsed.as_secs_f64();
    let rate = messages as f64 / secs;
    Ok(format!(
        "{{\"mode\":\"sink\",\"peer\":\"zeromq\",\"pattern\":\"push-pull\",\"addr\":\"{}\",\"conns\":1,\"size\":{},\"duration_s\":{secs},\"messages\":{messages},\"bytes\":{},\"messages_per_s\":{rate},\"mb_per_s\":{}}}",
        load.addr,
        load.size,
        messages * load.size as u64,
        rate * load.size as f64 / 1e6,
    ))
}

/// REQ/REP, one request in flight; each round trip timed.
fn pingpong(socket: &zmq::Socket, load: &Load) -> Result<String> {
    let payload = vec![0x5a_u8; load.size];
    let mut reply = zmq::Message::new();
    let mut round_trip = |latencies: Option<&mut Vec<u64>>| -> Result<()> {
        let sent = Instant::now();
        socket.send(&payload[..], 0)?;
        socket.recv(&mut reply, 0)?;
        let took = sent.elapsed();
        if reply.len() != load.size {
            return Err(format!("reply of {} bytes, sent {}", reply.len(), load.size).into());
        }
        if let Some(l) = latencies {
            l.push(took.as_nanos() as u64);
        }
        Ok(())
    };
    let start = Instant::now();
    while start.elapsed() < load.warmup {
        round_trip(None)?;
    }
    let mut latencies = Vec::with_capacity(1 << 16);
    let start = Instant::now();
    while start.elapsed() < load.duration {
        round_trip(Some(&mut latencies))?;
    }
    let secs = start.elapsed().as_secs_f64();
    if latencies.is_empty() {
        return Err("no round trip completed".into());
    }
    latencies.sort_unstable();
    let us = |q: f64| {
        let i = ((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i] as f64 / 1e3
    };
    let n = latencies.len() as u64;
    let rate = n as f64 / secs;
    let mean = latencies.iter().sum::<u64>() as f64 / n as f64 / 1e3;
    Ok(format!(
        "{{\"mode\":\"pingpong\",\"peer\":\"zeromq\",\"pattern\":\"req-rep\",\"addr\":\"{}\",\"conns\":1,\"size\":{},\"duration_s\":{secs},\"window\":1,\"round_trips\":{n},\"round_trips_per_s\":{rate},\"min_us\":{},\"p50_us\":{},\"p90_us\":{},\"p99_us\":{},\"p999_us\":{},\"max_us\":{},\"mean_us\":{mean}}}",
        load.addr,
        load.size,
        us(0.0),
        us(0.5),
        us(0.9),
        us(0.99),
        us(0.999),
        us(1.0),
    ))
}

/// `3s`, `500ms`, `1.5s`.
fn duration(s: &str) -> Result<Duration> {
    let (number, unit) = s
        .find(|c: char| c.is_ascii_alphabetic())
        .map_or((s, "s"), |i| s.split_at(i));
    let x: f64 = number.parse()?;
    let secs = match unit {
        "s" => x,
        "ms" => x / 1e3,
        "m" => x * 60.0,
        _ => return Err(format!("bad duration {s:?}: use 3s or 500ms").into()),
    };
    Ok(Duration::from_secs_f64(secs))
}

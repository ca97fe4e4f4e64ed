//! Runs the real `sockframe bench` briefly against a real `sockframe serve` on 127.0.0.1
//! (port 0) in the sockframe protocol, with requests, tokens, TLS, sessions, size sweeps and
//! plots, and checks that its JSON makes sense. These check behaviour, not speed: no figure is compared
//! with a target.
//!
//! Every child process is owned by a [`Proc`], which kills and reaps it when dropped (also
//! when a test panics), and every wait is bounded by [`WAIT`].

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Upper bound for any single wait: generous for a loaded machine, but a hang still fails.
const WAIT: Duration = Duration::from_secs(30);

/// A short measurement: these tests check behaviour, not speed.
const SHORT: [&str; 4] = ["--duration", "300ms", "--warmup", "100ms"];

/// A running `sockframe` process with its output read by threads; killed and reaped on drop.
struct Proc {
    name: String,
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
    /// stderr lines seen so far, for failure messages.
    seen: Vec<String>,
}

/// Sends each line of `stream` to the returned channel, from a thread.
fn lines(stream: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

impl Proc {
    /// Starts `sockframe args...` with stdout and stderr piped and no stdin.
    fn start(args: &[&str]) -> Proc {
        let name = format!("sockframe {}", args.join(" "));
        let mut child = Command::new(env!("CARGO_BIN_EXE_sockframe"))
            .args(args)
            .env_remove("RUST_LOG")
            .env_remove("SOCKFRAME_TOKEN")
            .env_remove("SOCKFRAME_TOKENS")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Proc {
            stdout: lines(child.stdout.take().unwrap()),
            stderr: lines(child.stderr.take().unwrap()),
            child,
            name,
            seen: Vec::new(),
        }
    }

    /// The next stderr line starting with `prefix`; panics after [`WAIT`] or at its end.
    fn stderr_prefix(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(line) => self.seen.push(line),
                Err(e) => panic!(
                    "{}: no stderr line starting with {prefix:?} ({e}); seen: {:#?}",
                    self.name, self.seen
                ),
            }
        }
    }

    /// Waits for the exit (bounded by [`WAIT`]) and returns the status with every stdout
    /// and stderr line.
    fn finish(mut self) -> (ExitStatus, Vec<String>, Vec<String>) {
        let deadline = Instant::now() + WAIT;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {WAIT:?}",
                self.name
            );
            // std has no wait-with-timeout; poll for the exit.
            thread::sleep(Duration::from_millis(10));
        };
        // The pipes close at exit, so these end; still bounded.
        let drain = |rx: &mpsc::Receiver<String>| {
            let mut all = Vec::new();
            while let Ok(line) = rx.recv_timeout(WAIT) {
                all.push(line);
            }
            all
        };
        let out = drain(&self.stdout);
        let mut err = std::mem::take(&mut self.seen);
        err.extend(drain(&self.stderr));
        (status, out, err)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `sockframe serve --bind 127.0.0.1:0 extra...` and returns it with its address.
fn serve(extra: &[&str]) -> (Proc, SocketAddr) {
    let mut args = vec!["serve", "--bind", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let mut server = Proc::start(&args);
    let line = server.stderr_prefix("listening on ");
    let addr = line["listening on ".len()..]
        .parse()
        .unwrap_or_else(|e| panic!("bad address in {line:?}: {e}"));
    (server, addr)
}

/// Runs `sockframe bench ADDR --json args...` to completion; returns one JSON object per
/// stdout line and the stderr lines.
fn bench(addr: SocketAddr, args: &[&str]) -> (Vec<Value>, Vec<String>) {
    let addr = addr.to_string();
    let mut all = vec!["bench", &addr, "--json"];
    all.extend_from_slice(args);
    let (status, out, err) = Proc::start(&all).finish();
    assert!(
        status.success(),
        "bench {args:?} failed ({status}): {err:#?}"
    );
    let results = out
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    (results, err)
}

/// Runs `sockframe bench ADDR args...`, expecting it to fail; returns its `error:` line.
fn bench_error(addr: &str, args: &[&str]) -> String {
    let mut all = vec!["bench", addr];
    all.extend_from_slice(args);
    let (status, _, err) = Proc::start(&all).finish();
    assert!(!status.success(), "bench {args:?} should have failed");
    err.into_iter()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line from bench {args:?}"))
}

/// A fresh directory for one test's files, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("sockframe-bench-cli-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    fn path(&self, file: &str) -> String {
        self.0.join(file).to_str().expect("UTF-8 path").to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A field as a number, with the whole object in the failure message.
fn num(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("no number {key:?} in {v}"))
}

/// Round-trip results: something was measured, and the percentiles are in order.
fn assert_latencies(v: &Value) {
    assert!(num(v, "round_trips") > 0.0, "{v}");
    assert!(num(v, "round_trips_per_s") > 0.0, "{v}");
    let order = ["min_us", "p50_us", "p90_us", "p99_us", "p999_us", "max_us"];
    for pair in order.windows(2) {
        assert!(
            num(v, pair[0]) <= num(v, pair[1]),
            "{} > {}: {v}",
            pair[0],
            pair[1]
        );
    }
    assert!(num(v, "min_us") > 0.0, "{v}");
    assert!(num(v, "min_us") <= num(v, "mean_us") && num(v, "mean_us") <= num(v, "max_us"));
}

/// The file is an SVG document with something drawn in it.
fn assert_svg(path: &str) {
    let svg = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    assert!(svg.trim_start().starts_with("<svg"), "{path}: {svg:.200}");
    assert!(svg.trim_end().ends_with("</svg>"), "{path}");
    assert!(svg.contains("<polyline"), "{path}: no line drawn");
}

#[test]
fn request_mode_matches_responses_and_plots_latency() {
    let (_server, addr) = serve(&["--protocol", "sockframe", "--echo"]);
    let dir = TempDir::new("request");
    let plot = dir.path("latency.svg");
    let mut args = vec![
        "--protocol",
        "sockframe",
        "--mode",
        "request",
        "--window",
        "4",
        "--conns",
        "2",
        "--plot",
        &plot,
    ];
    args.extend_from_slice(&SHORT);
    let (results, err) = bench(addr, &args);
    assert_eq!(results.len(), 1, "{results:?}");
    let r = &results[0];
    assert_eq!(r["mode"], "request", "{r}");
    assert_eq!(r["protocol"], "sockframe", "{r}");
    assert_eq!(r["window"], 4, "{r}");
    assert_latencies(r);
    assert_svg(&plot);
    assert!(err.iter().any(|l| l.starts_with("wrote ")), "{err:?}");
}

#[test]
fn sockframe_pingpong_and_tutorial_pingpong() {
    let (_server, addr) = serve(&["--protocol", "sockframe", "--echo"]);
    let mut args = vec!["--protocol", "sockframe", "--mode", "pingpong"];
    args.extend_from_slice(&SHORT);
    let (results, _) = bench(addr, &args);
    assert_eq!(results[0]["protocol"], "sockframe");
    assert_latencies(&results[0]);

    // The default is still the tutorial framing, which a sockframe-only server refuses.
    let mut args = vec!["--mode", "pingpong"];
    args.extend_from_slice(&SHORT);
    let error = bench_error(&addr.to_string(), &args);
    assert!(error.contains("server"), "{error}");
}

#[test]
fn throughput_sweep_with_a_token_plots_by_size() {
    let dir = TempDir::new("sweep");
    let tokens = dir.path("tokens");
    std::fs::write(&tokens, "s3cret\n").unwrap();
    let (_server, addr) = serve(&[
        "--protocol",
        "sockframe",
        "--discard",
        "--token-file",
        &tokens,
    ]);
    let plot = dir.path("sweep.svg");
    let mut args = vec![
        "--protocol",
        "sockframe",
        "--token",
        "s3cret",
        "--size",
        "16,1KiB",
        "--plot",
        &plot,
    ];
    args.extend_from_slice(&SHORT);
    let (results, _) = bench(addr, &args);
    assert_eq!(results.len(), 2, "one result per size: {results:?}");
    for (r, size) in results.iter().zip([16, 1024]) {
        assert_eq!(r["mode"], "throughput", "{r}");
        assert_eq!(r["size"], size, "{r}");
        let messages = r["messages"].as_u64().unwrap();
        assert!(messages > 0, "{r}");
        assert_eq!(r["bytes"].as_u64().unwrap(), messages * size, "{r}");
    }
    assert_svg(&plot);

    // A wrong token is refused in the handshake, and bench says so.
    let mut args = vec!["--protocol", "sockframe", "--token", "wrong"];
    args.extend_from_slice(&SHORT);
    let error = bench_error(&addr.to_string(), &args);
    assert!(error.contains("unauthorized"), "{error}");
}

#[test]
fn tls_throughput_with_a_throwaway_certificate() {
    let dir = TempDir::new("tls");
    let certs = dir.path("certs");
    let (status, _, err) = Proc::start(&["cert", "--out", &certs]).finish();
    assert!(status.success(), "cert failed: {err:?}");
    let (cert, key, ca) = (
        format!("{certs}/server.pem"),
        format!("{certs}/server-key.pem"),
        format!("{certs}/ca.pem"),
    );
    let (_server, addr) = serve(&[
        "--protocol",
        "sockframe",
        "--discard",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ]);
    let mut args = vec![
        "--protocol",
        "sockframe",
        "--tls",
        "--ca",
        &ca,
        "--size",
        "64KiB",
    ];
    args.extend_from_slice(&SHORT);
    let (results, _) = bench(addr, &args);
    let r = &results[0];
    assert_eq!(r["tls"], true, "{r}");
    assert!(r["messages"].as_u64().unwrap() > 0, "{r}");

    // Without --ca the throw-away certificate is not trusted.
    let mut args = vec!["--protocol", "sockframe", "--tls"];
    args.extend_from_slice(&SHORT);
    let error = bench_error(&addr.to_string(), &args);
    assert!(error.contains("TLS"), "{error}");
    assert!(Path::new(&ca).exists());
}

#[test]
fn pings_are_answered_while_idle() {
    // Pings every 100 ms: a client that does not answer is dead after 3 to 4 intervals,
    // well within the second it is held here.
    let (_server, addr) = serve(&["--protocol", "sockframe", "--heartbeat", "100ms"]);
    let (results, _) = bench(
        addr,
        &[
            "--protocol",
            "sockframe",
            "--mode",
            "idle",
            "--conns",
            "3",
            "--duration",
            "1s",
        ],
    );
    assert_eq!(results[0]["mode"], "idle");
    assert_eq!(results[0]["conns"], 3);
}

#[test]
fn broadcast_in_the_sockframe_protocol() {
    let (_server, addr) = serve(&["--protocol", "sockframe", "--fanout"]);
    let mut args = vec![
        "--protocol",
        "sockframe",
        "--mode",
        "broadcast",
        "--conns",
        "3",
        "--size",
        "1KiB",
    ];
    args.extend_from_slice(&SHORT);
    let (results, _) = bench(addr, &args);
    let r = &results[0];
    assert_eq!(r["mode"], "broadcast", "{r}");
    assert!(r["deliveries"].as_u64().unwrap() > 0, "{r}");
    // Every broadcast is timed to its last delivery, and each delivery on the way.
    assert!(r["broadcasts"].as_u64().unwrap() > 0, "{r}");
    let us = |key: &str| r[key].as_f64().unwrap();
    assert!(us("last_p50_us") > 0.0, "{r}");
    assert!(us("last_p50_us") <= us("last_p99_us") && us("last_p99_us") <= us("last_max_us"));
    assert!(us("p50_us") > 0.0 && us("p50_us") <= us("p99_us") && us("p99_us") <= us("max_us"));
}

/// The server's default session window: a generator that never acknowledged would get at
/// most this many application frames from it, then none.
const SERVER_WINDOW: u64 = 4096;

/// One second with no warm-up, so that every frame the server sent is counted.
const ONE_SECOND: [&str; 4] = ["--duration", "1s", "--warmup", "0s"];

#[test]
fn sessions_are_acknowledged_in_pingpong() {
    let (_server, addr) = serve(&["--protocol", "sockframe", "--echo"]);
    let mut args = vec![
        "--protocol",
        "sockframe",
        "--session",
        "--mode",
        "pingpong",
        "--window",
        "64",
    ];
    args.extend_from_slice(&ONE_SECOND);
    let (results, _) = bench(addr, &args);
    let r = &results[0];
    assert_eq!(r["session"], true, "{r}");
    assert_latencies(r);
    // Past the window: the server got our ACKs (piggy-backed on the pingpong's writes) and
    // kept echoing. Without them it stops after 4,096 echoes. (At 64 in flight, even a
    // heavily loaded machine does several times that in a second.)
    let round_trips = r["round_trips"].as_u64().unwrap();
    assert!(round_trips > 2 * SERVER_WINDOW, "stalled? {r}");
}

#[test]
fn sessions_in_sink_and_broadcast_modes() {
    let (_server, addr) = serve(&["--protocol", "sockframe", "--discard"]);
    let mut args = vec!["--protocol", "sockframe", "--session", "--conns", "2"];
    args.extend_from_slice(&SHORT);
    let (results, _) = bench(addr, &args);
    let r = &results[0];
    assert_eq!(
        (&r["mode"], &r["session"]),
        (&"throughput".into(), &true.into())
    );
    assert!(r["messages"].as_u64().unwrap() > 0, "{r}");
    drop(_server);

    // Readers write nothing but pongs, so they acknowledge when the server asks
    // (ACK_REQUEST at half its window). Each reader is within 512 messages of the others;
    // more than this many deliveries means every reader got past the window.
    let (_server, addr) = serve(&["--protocol", "sockframe", "--fanout"]);
    let mut args = vec![
        "--protocol",
        "sockframe",
        "--session",
        "--mode",
        "broadcast",
        "--conns",
        "3",
    ];
    args.extend_from_slice(&ONE_SECOND);
    let (results, _) = bench(addr, &args);
    let r = &results[0];
    assert_eq!(r["session"], true, "{r}");
    let deliveries = r["deliveries"].as_u64().unwrap();
    assert!(deliveries > 3 * (SERVER_WINDOW + 1024), "stalled? {r}");
}

#[test]
fn sessions_need_the_protocol_and_a_server_that_grants_them() {
    let error = bench_error("127.0.0.1:9", &["--session"]);
    assert!(error.contains("--protocol sockframe"), "{error}");
    let (_server, addr) = serve(&[
        "--protocol",
        "sockframe",
        "--discard",
        "--session-grace",
        "0s",
    ]);
    let mut args = vec!["--protocol", "sockframe", "--session"];
    args.extend_from_slice(&SHORT);
    let error = bench_error(&addr.to_string(), &args);
    assert!(error.contains("no session"), "{error}");
}

#[test]
fn bad_combinations_are_refused() {
    let error = bench_error("127.0.0.1:9", &["--mode", "request"]);
    assert!(error.contains("--protocol sockframe"), "{error}");
    let error = bench_error("127.0.0.1:9", &["--plot", "x.svg"]);
    assert!(error.contains("nothing to draw"), "{error}");
    let error = bench_error("127.0.0.1:9", &["--token", "t"]);
    assert!(error.contains("--protocol sockframe"), "{error}");
}

//! Runs the real `sockframe` binary: `serve`, `connect` and `send` against each other and
//! against raw TCP peers, always on 127.0.0.1 with OS-picked ports.
//!
//! Every child process is owned by a [`Proc`], which kills and reaps it when dropped (also
//! when a test panics), and every wait is bounded by [`WAIT`]. Tests never sleep to let
//! something happen: they wait for the output line that proves it did.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use serde_json::Value;

mod support;

use support::WAIT;
use support::process::{Proc, serve, serve_env};

/// A tutorial frame built by hand.
fn frame(payload: &[u8]) -> Vec<u8> {
    let mut v = (payload.len() as u32).to_le_bytes().to_vec();
    v.extend_from_slice(payload);
    v
}

/// A raw TCP peer with bounded reads.
fn raw_client(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect raw client");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream
}

/// Reads one frame from a raw peer.
fn read_frame(stream: &mut TcpStream) -> Vec<u8> {
    let mut header = [0; 4];
    stream.read_exact(&mut header).expect("read frame header");
    let mut payload = vec![0; u32::from_le_bytes(header) as usize];
    stream.read_exact(&mut payload).expect("read frame payload");
    payload
}

/// Asserts that the server closed the raw peer's connection (end of stream, no more data).
fn assert_closed(stream: &mut TcpStream) {
    let mut buf = [0; 1];
    match stream.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected the connection to be closed, got {other:?}"),
    }
}

#[test]
fn send_reaches_serve_json() {
    let (mut server, addr) = serve(&["--json"]);
    let addr = addr.to_string();
    let mut send = Proc::start(&["send", &addr, "hello wörld", "tab\there"]);
    assert!(
        send.wait().success(),
        "send failed: {:?}",
        send.stderr.rest()
    );
    assert_eq!(send.stdout.rest(), Vec::<String>::new());

    let connected = server.stdout.next_json();
    assert_eq!(connected["event"], "connected");
    assert_eq!(connected["client"], 1);
    assert!(
        connected["addr"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{connected}"
    );
    let first = server.stdout.next_json();
    assert_eq!(first["event"], "message");
    assert_eq!(first["client"], 1);
    assert_eq!(first["text"], "hello wörld");
    assert_eq!(server.stdout.next_json()["text"], "tab\there");
    let gone = server.stdout.next_json();
    assert_eq!(gone["event"], "disconnected");
    assert_eq!(gone["client"], 1);
    assert_eq!(gone["reason"], "closed by peer");
    assert_eq!(gone["reason_code"], "closed_by_peer");
}

#[test]
fn binary_payloads_are_hex() {
    // JSON mode: `data_hex` instead of `text`, and `list` as JSON.
    let (mut server, addr) = serve(&["--json"]);
    let mut peer = raw_client(addr);
    peer.write_all(&frame(&[0xff, 0x00])).unwrap();
    assert_eq!(server.stdout.next_json()["event"], "connected");
    let message = server.stdout.next_json();
    assert_eq!(message["event"], "message");
    assert_eq!(message["data_hex"], "ff00");
    assert!(message.get("text").is_none(), "{message}");
    server.send_line("list");
    let listed = server.stdout.next_json();
    assert_eq!(listed["event"], "client");
    assert_eq!(listed["client"], 1);
    assert_eq!(listed["addr"], peer.local_addr().unwrap().to_string());
    assert_eq!(listed["messages_in"], 1);
    assert_eq!(listed["bytes_in"], 2);
    assert!(listed["connected_at"].as_u64().unwrap() > 0, "{listed}");

    // Text mode: `hex:`, and text with control characters escaped onto one line.
    let (mut server, addr) = serve(&[]);
    let mut peer = raw_client(addr);
    peer.write_all(&frame(&[0xff, 0x00])).unwrap();
    peer.write_all(&frame(b"a\nb\\c\x1b[0m")).unwrap();
    server.stdout.wait_prefix("connected 1 127.0.0.1:");
    assert_eq!(server.stdout.wait_prefix("message"), "message 1 hex:ff00");
    assert_eq!(
        server.stdout.wait_prefix("message"),
        r"message 1 a\nb\\c\u{1b}[0m"
    );
}

#[cfg(unix)]
#[test]
fn send_passes_non_utf8_arguments_through() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;

    let (mut server, addr) = serve(&[]);
    let addr = addr.to_string();
    let mut send = Proc::start(&[
        OsStr::new("send"),
        OsStr::new(&addr),
        OsStr::from_bytes(b"\xff\xfe"),
    ]);
    assert!(
        send.wait().success(),
        "send failed: {:?}",
        send.stderr.rest()
    );
    assert_eq!(server.stdout.wait_prefix("message"), "message 1 hex:fffe");
}

#[test]
fn send_to_closed_port_fails_within_timeout() {
    // A port that was just free: bind, note it, release it.
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let started = Instant::now();
    let mut send = Proc::start(&["send", &addr.to_string(), "hi", "--timeout", "500ms"]);
    let status = send.wait();
    let elapsed = started.elapsed();
    let stderr = send.stderr.rest();
    assert_eq!(status.code(), Some(1), "stderr: {stderr:?}");
    let error = stderr
        .iter()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line in {stderr:?}"));
    assert!(
        error.contains(&format!("cannot connect to {addr}")),
        "{error}"
    );
    assert!(error.contains("connection refused"), "{error}");
    assert_eq!(
        *error,
        format!(
            "error: cannot connect to {addr}: connection refused (is `sockframe serve` running?)"
        )
    );
    // It kept trying until the deadline, and stopped there (the default would be 5 s).
    assert!(
        elapsed >= Duration::from_millis(450),
        "gave up after {elapsed:?}"
    );
    assert!(elapsed < Duration::from_secs(4), "took {elapsed:?}");
}

#[test]
fn connect_relays_both_ways() {
    let (mut server, addr) = serve(&[]);
    let mut client = Proc::start(&["connect", &addr.to_string()]);
    client.stderr.wait_prefix(&format!("connected to {addr}"));
    server.stdout.wait_prefix("connected 1 ");

    client.send_line("hello from connect");
    client.send_line("windows line\r");
    assert_eq!(
        server.stdout.wait_prefix("message"),
        "message 1 hello from connect"
    );
    assert_eq!(
        server.stdout.wait_prefix("message"),
        "message 1 windows line"
    );

    server.send_line("send 1 hi there");
    assert_eq!(client.stdout.wait_for("a line", |_| true), "hi there");

    client.close_stdin();
    let status = client.wait();
    assert!(
        status.success(),
        "connect: {status}; {:?}",
        client.stderr.rest()
    );
    assert_eq!(
        server.stdout.wait_prefix("disconnected"),
        "disconnected 1 closed by peer"
    );
}

#[test]
fn serve_commands_list_broadcast_kick() {
    let (mut server, addr) = serve(&[]);
    let mut one = raw_client(addr);
    server.stdout.wait_prefix("connected 1 ");
    let mut two = raw_client(addr);
    server.stdout.wait_prefix("connected 2 ");

    server.send_line("list");
    let listed = server.stdout.wait_prefix("client 1 ");
    assert!(
        listed.starts_with(&format!(
            "client 1 {} connected_at=",
            one.local_addr().unwrap()
        )),
        "{listed}"
    );
    assert!(
        listed.ends_with("messages_in=0 bytes_in=0 messages_out=0 bytes_out=0"),
        "{listed}"
    );
    server.stdout.wait_prefix("client 2 ");
    server.stderr.wait_prefix("2 client(s) connected");

    server.send_line("broadcast to all");
    assert_eq!(read_frame(&mut one), b"to all");
    assert_eq!(read_frame(&mut two), b"to all");
    server.stderr.wait_prefix("broadcast to 2 client(s)");

    server.send_line("send 2 just two");
    assert_eq!(read_frame(&mut two), b"just two");

    server.send_line("kick 1");
    // A kick is graceful: the server closes its side, then waits for the peer to close its
    // own before reporting the disconnection.
    assert_closed(&mut one);
    drop(one);
    assert_eq!(
        server.stdout.wait_prefix("disconnected"),
        "disconnected 1 kicked"
    );

    // Mistakes are reported on stderr and the server carries on.
    server.send_line("kick 1");
    server
        .stderr
        .wait_prefix("error: no connected client with id 1");
    server.send_line("send nine hi");
    server.stderr.wait_prefix("error: bad client id `nine`");
    server.send_line("frobnicate");
    server
        .stderr
        .wait_prefix("error: unknown command `frobnicate`");
    server.send_line("send 7 hi");
    server.stderr.wait_prefix("error: cannot send to client 7");
    server.send_line("list");
    let listed = server.stdout.wait_prefix("client ");
    assert!(listed.starts_with("client 2 "), "{listed}");
    assert!(listed.ends_with("messages_out=2 bytes_out=14"), "{listed}");
    server.stderr.wait_prefix("1 client(s) connected");

    // End of stdin does not stop the server.
    server.close_stdin();
    let mut three = raw_client(addr);
    server.stdout.wait_prefix("connected 3 ");
    three.write_all(&frame(b"still here")).unwrap();
    assert_eq!(server.stdout.wait_prefix("message"), "message 3 still here");
}

#[test]
fn sigterm_shuts_down_gracefully() {
    let (mut server, addr) = serve(&[]);
    let mut raw = raw_client(addr);
    server.stdout.wait_prefix("connected 1 ");
    let mut client = Proc::start(&["connect", &addr.to_string()]);
    client.stderr.wait_prefix("connected to ");
    server.stdout.wait_prefix("connected 2 ");

    server.terminate();
    // The raw peer sees the end of the stream and closes its side, as a polite peer does.
    assert_closed(&mut raw);
    let _ = raw.shutdown(Shutdown::Both);
    drop(raw);
    let status = server.wait();
    assert!(status.success(), "serve: {status}");
    let mut rest = server.stdout.rest();
    rest.sort();
    assert_eq!(rest, ["disconnected 1 shutdown", "disconnected 2 shutdown"]);

    // `connect` notices, and keeps trying to reconnect until its input ends.
    client.stderr.wait_prefix("disconnected: ");
    client.stderr.wait_prefix("reconnecting (attempt 1, in ");
    client.close_stdin();
    let status = client.wait();
    assert!(
        status.success(),
        "connect: {status}; {:?}",
        client.stderr.rest()
    );
}

#[test]
fn max_frame_is_enforced() {
    let (mut server, addr) = serve(&["--max-frame", "4"]);
    let mut peer = raw_client(addr);
    peer.write_all(&frame(b"four")).unwrap();
    peer.write_all(&frame(b"fives")).unwrap();
    assert_eq!(server.stdout.wait_prefix("message"), "message 1 four");
    let gone = server.stdout.wait_prefix("disconnected");
    assert!(
        gone.starts_with("disconnected 1 protocol error: "),
        "{gone}"
    );
    assert_closed(&mut peer);

    let mut bad = Proc::start(&["serve", "--bind", "127.0.0.1:0", "--max-frame", "16M"]);
    assert_eq!(bad.wait().code(), Some(2), "a usage error");
    let stderr = bad.stderr.rest().join("\n");
    assert!(stderr.contains("`16M` is not a size"), "{stderr}");
}

#[test]
fn serve_reports_address_in_use() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut server = Proc::start(&["serve", "--bind", &addr]);
    assert_eq!(server.wait().code(), Some(1));
    let stderr = server.stderr.rest();
    assert_eq!(stderr.len(), 1, "{stderr:?}");
    assert!(
        stderr[0].starts_with(&format!("error: cannot listen on {addr}: ")),
        "{stderr:?}"
    );
    // The cause is said once, not once by the library's message and again as its source.
    assert!(stderr[0].matches("(os error").count() <= 1, "{stderr:?}");
}

#[test]
fn request_is_answered_by_serve_echo() {
    let (mut server, addr) = serve(&["--json", "--echo"]);
    let addr = addr.to_string();
    let mut request = Proc::start(&["request", &addr, "what time is it?"]);
    assert!(
        request.wait().success(),
        "request failed: {:?}",
        request.stderr.rest()
    );
    assert_eq!(request.stdout.rest(), vec!["what time is it?".to_string()]);
    assert_eq!(server.stdout.next_json()["event"], "connected");
    let asked = server.stdout.next_json();
    assert_eq!(asked["event"], "request");
    assert_eq!(asked["text"], "what time is it?");
    assert_eq!(asked["kind"], "text");
}

#[test]
fn unanswered_request_exits_non_zero() {
    // Without --echo nobody answers: the server sends the error "unhandled" instead of
    // leaving the requester waiting, and `request` reports it.
    let (_server, addr) = serve(&[]);
    let mut request = Proc::start(&["request", &addr.to_string(), "anyone?"]);
    assert!(!request.wait().success());
    let err = request.stderr.rest().join("\n");
    assert!(err.contains("error 1"), "{err}");
    assert!(err.contains("not answered"), "{err}");
}

#[test]
fn request_times_out_against_a_tutorial_only_server() {
    // A tutorial-only server takes the hello for a message and never welcomes: the
    // handshake fails within the timeout with an explanation.
    let (_server, addr) = serve(&["--protocol", "tutorial"]);
    let mut request = Proc::start(&["request", &addr.to_string(), "x", "--timeout", "1s"]);
    assert!(!request.wait().success());
    let err = request.stderr.rest().join("\n");
    assert!(err.contains("error: "), "{err}");
}

#[test]
fn tokens_from_the_environment_admit_only_their_holders() {
    let (mut server, addr) = serve_env(&["--json"], &[("SOCKFRAME_TOKENS", "alpha, beta")]);
    let addr = addr.to_string();

    let mut stranger = Proc::start(&["send", &addr, "let me in"]);
    assert!(!stranger.wait().success());
    let err = stranger.stderr.rest().join("\n");
    assert!(err.contains("unauthorized"), "{err}");

    let mut wrong = Proc::start_env(&["send", &addr, "me too"], &[("SOCKFRAME_TOKEN", "gamma")]);
    assert!(!wrong.wait().success());

    let mut friend = Proc::start_env(&["send", &addr, "hello"], &[("SOCKFRAME_TOKEN", "beta")]);
    assert!(
        friend.wait().success(),
        "send failed: {:?}",
        friend.stderr.rest()
    );
    // The rejected clients never appear: the first event is the friend's connection.
    let connected = server.stdout.next_json();
    assert_eq!(connected["event"], "connected");
    let message = server.stdout.next_json();
    assert_eq!(message["event"], "message");
    assert_eq!(message["text"], "hello");
}

#[test]
fn token_file_is_read_and_tutorial_clients_are_refused() {
    let dir = std::env::temp_dir().join(format!("sockframe-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tokens");
    std::fs::write(&file, "\nfirst\n  second  \n").unwrap();
    let (mut server, addr) = serve(&["--json", "--token-file", file.to_str().unwrap()]);
    let addr = addr.to_string();

    let mut tutorial = Proc::start(&["send", "--protocol", "tutorial", &addr, "raw"]);
    // The tutorial framing cannot carry a token; its frame is refused as a bad hello. The
    // client may or may not notice (the tutorial framing has no answer to wait for), but
    // the server must deliver nothing.
    let _ = tutorial.wait();
    let mut ok = Proc::start(&["send", "--token", "second", &addr, "in"]);
    assert!(ok.wait().success(), "send failed: {:?}", ok.stderr.rest());
    assert_eq!(server.stdout.next_json()["event"], "connected");
    assert_eq!(server.stdout.next_json()["text"], "in");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tutorial_protocol_talks_to_a_tutorial_only_server() {
    let (mut server, addr) = serve(&["--protocol", "tutorial"]);
    let mut send = Proc::start(&["send", "--protocol", "tutorial", &addr.to_string(), "plain"]);
    assert!(
        send.wait().success(),
        "send failed: {:?}",
        send.stderr.rest()
    );
    assert!(server.stdout.next_line().starts_with("connected 1 "));
    assert_eq!(server.stdout.next_line(), "message 1 plain");
}

#[test]
fn three_commands_to_an_encrypted_connection() {
    let dir = std::env::temp_dir().join(format!("sockframe-cli-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = dir.to_str().unwrap();
    let mut cert = Proc::start(&["cert", "--out", out]);
    assert!(
        cert.wait().success(),
        "cert failed: {:?}",
        cert.stderr.rest()
    );
    // Refuses to overwrite without --force.
    let mut again = Proc::start(&["cert", "--out", out]);
    assert!(!again.wait().success());

    let (cert_pem, key_pem, ca_pem) = (
        format!("{out}/server.pem"),
        format!("{out}/server-key.pem"),
        format!("{out}/ca.pem"),
    );
    let (_server, addr) = serve(&["--echo", "--tls-cert", &cert_pem, "--tls-key", &key_pem]);
    let addr = addr.to_string();
    let mut request = Proc::start(&["request", "--ca", &ca_pem, &addr, "secret"]);
    assert!(
        request.wait().success(),
        "request failed: {:?}",
        request.stderr.rest()
    );
    assert_eq!(request.stdout.rest(), vec!["secret".to_string()]);

    // Without the CA the server is not trusted.
    let mut untrusted = Proc::start(&["request", "--tls", &addr, "x", "--timeout", "2s"]);
    assert!(!untrusted.wait().success());
    let err = untrusted.stderr.rest().join("\n");
    assert!(
        err.contains("certificate") || err.contains("no trusted roots"),
        "{err}"
    );

    // --insecure works, and says so.
    let mut insecure = Proc::start(&["request", "--insecure", &addr, "risky"]);
    assert!(insecure.wait().success());
    assert!(
        insecure
            .stderr
            .rest()
            .join("\n")
            .contains("warning: --insecure")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `sockframe bench ADDR args... --json` to completion and returns its result.
fn bench(addr: SocketAddr, args: &[&str]) -> Value {
    let addr = addr.to_string();
    let mut all = vec!["bench", &addr, "--json"];
    all.extend_from_slice(args);
    let mut bench = Proc::start(&all);
    let status = bench.wait();
    assert!(
        status.success(),
        "bench failed ({status}): {:?}",
        bench.stderr.rest()
    );
    bench.stdout.next_json()
}

/// Stops a benchmark target with SIGTERM and returns the message total it prints.
fn total_messages(server: &mut Proc) -> u64 {
    server.terminate();
    let line = server.stderr.wait_prefix("total: ");
    assert!(server.wait().success(), "serve failed: {line}");
    // "total: N messages, B bytes"
    line["total: ".len()..]
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("bad totals line {line:?}"))
}

#[test]
fn bench_throughput_against_serve_discard() {
    let (mut server, addr) = serve(&["--protocol", "tutorial", "--discard"]);
    let result = bench(
        addr,
        &["--conns", "2", "--duration", "1s", "--warmup", "100ms"],
    );
    assert_eq!(result["mode"], "throughput", "{result}");
    assert_eq!(result["conns"], 2);
    assert_eq!(result["size"], 64);
    let messages = result["messages"].as_u64().unwrap();
    assert!(messages > 0, "{result}");
    assert_eq!(result["bytes"].as_u64().unwrap(), messages * 64);
    assert!(result["messages_per_s"].as_f64().unwrap() > 0.0, "{result}");
    // Messages are counted, not printed; connection events still are.
    server.stdout.wait_prefix("connected 1 ");
    assert!(total_messages(&mut server) > 0);
    assert!(
        !server.stdout.seen.iter().any(|l| l.starts_with("message")),
        "{:?}",
        server.stdout.seen
    );
}

/// `serve --discard` counts every message exactly, with handlers (the default) and from the
/// event stream (`--events`).
#[test]
fn serve_discard_counts_exactly_with_and_without_handlers() {
    let messages: Vec<String> = (0..200).map(|i| format!("message {i:03}")).collect();
    let bytes: usize = messages.iter().map(String::len).sum();
    for events in [false, true] {
        let mut args = vec!["--discard"];
        if events {
            args.push("--events");
        }
        let (mut server, addr) = serve(&args);
        let addr = addr.to_string();
        let mut all = vec!["send", &addr];
        all.extend(messages.iter().map(String::as_str));
        assert!(
            Proc::start(&all).wait().success(),
            "send (events: {events})"
        );
        server.terminate();
        let line = server.stderr.wait_prefix("total: ");
        assert!(server.wait().success());
        assert_eq!(
            line,
            format!("total: {} messages, {bytes} bytes", messages.len()),
            "events: {events}"
        );
    }
}

#[test]
fn bench_pingpong_against_serve_echo() {
    for events in [false, true] {
        bench_pingpong_against(events);
    }
}

/// Pingpong against `serve --echo`, echoing with handlers or (`events`) from the event stream.
fn bench_pingpong_against(events: bool) {
    let mut args = vec!["--protocol", "tutorial", "--echo"];
    if events {
        args.push("--events");
    }
    let (mut server, addr) = serve(&args);
    let result = bench(
        addr,
        &[
            "--mode",
            "pingpong",
            "--window",
            "4",
            "--size",
            "1KiB",
            "--duration",
            "1s",
            "--warmup",
            "100ms",
        ],
    );
    assert_eq!(result["mode"], "pingpong", "{result}");
    assert_eq!(result["window"], 4);
    assert!(result["round_trips"].as_u64().unwrap() > 0, "{result}");
    let us = |key: &str| result[key].as_f64().unwrap();
    assert!(us("p50_us") > 0.0, "{result}");
    assert!(us("p50_us") <= us("p99_us") && us("p99_us") <= us("p999_us"));
    assert!(us("p999_us") <= us("max_us"), "{result}");
    assert!(total_messages(&mut server) > 0);
}

#[test]
fn bench_broadcast_against_serve_fanout() {
    let (mut server, addr) = serve(&["--protocol", "tutorial", "--fanout"]);
    let result = bench(
        addr,
        &[
            "--mode",
            "broadcast",
            "--conns",
            "3",
            "--size",
            "100",
            "--duration",
            "1s",
            "--warmup",
            "200ms",
        ],
    );
    assert_eq!(result["mode"], "broadcast", "{result}");
    assert!(result["deliveries"].as_u64().unwrap() > 0, "{result}");
    // The sender's messages are what the server counts.
    assert!(total_messages(&mut server) > 0);
}

#[test]
fn bench_idle_holds_connections() {
    let (mut server, addr) = serve(&["--protocol", "tutorial"]);
    let result = bench(
        addr,
        &["--mode", "idle", "--conns", "5", "--duration", "200ms"],
    );
    assert_eq!(result["mode"], "idle", "{result}");
    assert_eq!(result["conns"], 5);
    for _ in 0..5 {
        server.stdout.wait_prefix("connected ");
    }
    for _ in 0..5 {
        server.stdout.wait_prefix("disconnected ");
    }
}

#[test]
fn bench_reports_unreachable_server() {
    // A port nobody listens on: bind one, note it, close it.
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let mut bench = Proc::start(&["bench", &addr, "--duration", "1s"]);
    assert!(!bench.wait().success());
    let error = bench.stderr.wait_prefix("error: ");
    assert!(
        error.contains(&format!("cannot connect to {addr}")),
        "{error}"
    );
}

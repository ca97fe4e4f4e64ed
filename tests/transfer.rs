//! File transfer over real loopback connections: round trips (1 GiB with flat memory),
//! resume after a cut, hostile names and a corrupting peer spoken to in raw frames, many
//! clients at once, messages during a transfer, server → client, refusals, and the CLI.
//!
//! Files live in per-test directories under the system temp dir, removed when the test
//! ends (also when it fails). Every wait is bounded by [`WAIT`].

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use sockframe::Error;
use sockframe::client::{Client, ClientConfig, ClientEvent};
use sockframe::protocol::message::{self as wire, Frame, Hello};
use sockframe::protocol::transfer::{self, TransferFrame, refuse_code};
use sockframe::server::{ClientId, Server, ServerEvent};
use sockframe::transfer::{Digest, TransferConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use support::transfer::*;
use support::{WAIT, frame, start_server_with};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_resumes_after_the_connection_is_cut_halfway() {
    let dir = TempDir::new("resume");
    let (src, save) = (dir.sub("src"), dir.sub("save"));
    let size = 128u64 << 20;
    let digest = generate(&src.join("half.bin"), size, 2);

    let mut config = server_config(Some(&save));
    // Small chunks and window: slower, so the cut lands near the middle.
    config.transfer.chunk_size = 32 << 10;
    config.transfer.window = 2;
    let (server, events) = start_server_with(config).await;
    let mut events = accept_all(events);
    let mut cc = client_config(&server);
    cc.reconnect = true;
    cc.reconnect_backoff.initial = Duration::from_millis(10);
    cc.transfer.chunk_size = 32 << 10;
    cc.transfer.window = 2;
    let client = Client::connect(cc).await.unwrap();
    let first = server.clients()[0].id;

    let handle = client.send_file(src.join("half.bin")).await.unwrap();
    let progress = handle.progress_reader();
    timeout(WAIT, async {
        while progress().confirmed < size / 2 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("half of the file within the wait");
    let cut_at = progress().confirmed;
    assert!(cut_at < size, "finished before the cut");
    assert!(server.disconnect(first));

    let receipt = timeout(WAIT, handle.finish()).await.unwrap().unwrap();
    assert_eq!(receipt.digest, digest);
    assert!(receipt.attempts >= 2, "{receipt:?}");
    assert!(
        receipt.resumed_from >= size / 4,
        "resumed from {} after a cut at {cut_at}",
        receipt.resumed_from
    );
    // The first connection's receive reports the loss; the second one completes.
    let failed = wait_for(&mut events, |e| matches!(e, ServerEvent::FileFailed { .. })).await;
    let ServerEvent::FileFailed { failure, .. } = failed else {
        unreachable!()
    };
    assert!(failure.resumable, "{failure:?}");
    let ServerEvent::FileReceived {
        file,
        client: second,
    } = wait_for(&mut events, is_received).await
    else {
        unreachable!()
    };
    assert_ne!(second, first);
    assert_eq!(file.resumed_from, receipt.resumed_from);
    let path = file.path.clone();
    let on_disk = tokio::task::spawn_blocking(move || Digest::of_file(&path).unwrap())
        .await
        .unwrap();
    assert_eq!(on_disk, digest);
    assert_eq!(TempDir::list(&save), ["half.bin"]);
    client.close().await.unwrap();
    server.shutdown().await;
}

/// A sockframe peer speaking raw frames, built with the library's pure encoders.
struct RawPeer {
    stream: TcpStream,
}

impl RawPeer {
    async fn connect(server: &Server) -> RawPeer {
        let mut stream = TcpStream::connect(server.local_addr()).await.unwrap();
        stream
            .write_all(&frame(&wire::encode_hello(&Hello::new(
                "raw",
                Bytes::new(),
            ))))
            .await
            .unwrap();
        let mut peer = RawPeer { stream };
        assert!(matches!(peer.next().await, Frame::Welcome(_)));
        peer
    }

    async fn send(&mut self, frame_: TransferFrame) {
        let payload = transfer::encode(&frame_);
        self.stream.write_all(&frame(&payload)).await.unwrap();
    }

    /// The next frame that is not a ping.
    async fn next(&mut self) -> Frame {
        timeout(WAIT, async {
            loop {
                let mut header = [0u8; 4];
                self.stream.read_exact(&mut header).await.unwrap();
                let mut payload = vec![0u8; u32::from_le_bytes(header) as usize];
                self.stream.read_exact(&mut payload).await.unwrap();
                match wire::parse(&Bytes::from(payload)).unwrap() {
                    Frame::Ping(_) => continue,
                    other => return other,
                }
            }
        })
        .await
        .expect("timed out waiting for a frame")
    }

    async fn next_transfer(&mut self) -> TransferFrame {
        match self.next().await {
            Frame::Transfer(t) => t,
            other => panic!("expected a transfer frame, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn hostile_names_are_refused_and_never_write_outside_the_save_dir() {
    let dir = TempDir::new("names");
    let save = dir.sub("a/b/save");
    let (server, events) = start_server_with(server_config(Some(&save))).await;
    let mut events = accept_all(events);
    let mut peer = RawPeer::connect(&server).await;
    let hostile = [
        "../../x",
        "../x",
        "/etc/passwd",
        "/tmp/x",
        "C:\\x",
        "C:x",
        "a/b",
        "a\\b",
        "..",
        ".",
        "",
        "x\0y",
        "x\ny",
        "CON.txt",
        "nul",
        "LPT1",
        ".sockframe-0.part",
    ];
    for (i, name) in hostile.iter().enumerate() {
        let id = i as u64 + 1;
        peer.send(TransferFrame::Offer {
            id,
            size: 3,
            digest: Digest::of(b"abc").0,
            name: name.to_string(),
        })
        .await;
        match peer.next_transfer().await {
            TransferFrame::Refuse { id: got, code, .. } => {
                assert_eq!((got, code), (id, refuse_code::BAD_NAME), "{name:?}");
            }
            other => panic!("{name:?}: expected a refusal, got {other:?}"),
        }
        // Chunks and a DONE for the refused offer are ignored, not written anywhere.
        peer.send(TransferFrame::Chunk {
            id,
            offset: 0,
            data: Bytes::from_static(b"abc"),
        })
        .await;
        peer.send(TransferFrame::Done { id }).await;
    }
    // The connection is still fine: a good name goes through.
    peer.send(TransferFrame::Offer {
        id: 100,
        size: 3,
        digest: Digest::of(b"abc").0,
        name: "fine.txt".into(),
    })
    .await;
    assert_eq!(
        peer.next_transfer().await,
        TransferFrame::Accept { id: 100, offset: 0 }
    );
    peer.send(TransferFrame::Chunk {
        id: 100,
        offset: 0,
        data: Bytes::from_static(b"abc"),
    })
    .await;
    peer.send(TransferFrame::Done { id: 100 }).await;
    loop {
        match peer.next_transfer().await {
            TransferFrame::Progress { .. } => continue,
            other => {
                assert_eq!(
                    other,
                    TransferFrame::Result {
                        id: 100,
                        result: Ok(())
                    }
                );
                break;
            }
        }
    }
    wait_for(&mut events, is_received).await;
    assert_eq!(TempDir::list(&save), ["fine.txt"]);
    // Nothing anywhere else in the tree above the save directory.
    assert_eq!(TempDir::list(dir.path()), ["a"]);
    assert_eq!(TempDir::list(&dir.path().join("a")), ["b"]);
    assert_eq!(TempDir::list(&dir.path().join("a/b")), ["save"]);
    server.shutdown().await;
}

#[tokio::test]
async fn a_corrupted_chunk_fails_the_digest_and_leaves_nothing() {
    let dir = TempDir::new("corrupt");
    let save = dir.sub("save");
    let (server, events) = start_server_with(server_config(Some(&save))).await;
    let mut events = accept_all(events);
    let mut peer = RawPeer::connect(&server).await;
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    peer.send(TransferFrame::Offer {
        id: 7,
        size: data.len() as u64,
        digest: Digest::of(&data).0,
        name: "good.bin".into(),
    })
    .await;
    assert_eq!(
        peer.next_transfer().await,
        TransferFrame::Accept { id: 7, offset: 0 }
    );
    for (i, chunk) in data.chunks(100_000).enumerate() {
        let mut chunk = chunk.to_vec();
        if i == 1 {
            chunk[500] ^= 0x01; // one flipped bit in the middle chunk
        }
        peer.send(TransferFrame::Chunk {
            id: 7,
            offset: i as u64 * 100_000,
            data: chunk.into(),
        })
        .await;
    }
    peer.send(TransferFrame::Done { id: 7 }).await;
    let result = loop {
        match peer.next_transfer().await {
            TransferFrame::Progress { .. } => continue,
            other => break other,
        }
    };
    match result {
        TransferFrame::Result {
            id: 7,
            result: Err(text),
        } => assert!(text.contains("digest mismatch"), "{text}"),
        other => panic!("expected an error result, got {other:?}"),
    }
    let failed = wait_for(&mut events, |e| matches!(e, ServerEvent::FileFailed { .. })).await;
    let ServerEvent::FileFailed { failure, .. } = failed else {
        unreachable!()
    };
    assert!(failure.reason.contains("digest mismatch"));
    assert!(!failure.resumable);
    // Neither the final name nor a partial file.
    assert!(
        TempDir::list(&save).is_empty(),
        "{:?}",
        TempDir::list(&save)
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_clients_send_at_once() {
    let dir = TempDir::new("ten");
    let (src, save) = (dir.sub("src"), dir.sub("save"));
    let (server, events) = start_server_with(server_config(Some(&save))).await;
    let mut events = accept_all(events);
    let mut tasks = Vec::new();
    for i in 0..10u64 {
        let path = src.join(format!("file-{i}.bin"));
        let digest = generate(&path, (4 << 20) + i * 1000, 100 + i);
        let config = client_config(&server);
        tasks.push(tokio::spawn(async move {
            let client = Client::connect(config).await.unwrap();
            let receipt = client.send_file(&path).await.unwrap().finish().await;
            client.close().await.unwrap();
            (receipt.unwrap(), digest)
        }));
    }
    for task in tasks {
        let (receipt, digest) = timeout(WAIT, task).await.unwrap().unwrap();
        assert_eq!(receipt.digest, digest);
    }
    for _ in 0..10 {
        wait_for(&mut events, is_received).await;
    }
    for i in 0..10u64 {
        let name = format!("file-{i}.bin");
        assert_eq!(
            Digest::of_file(&save.join(&name)).unwrap(),
            Digest::of_file(&src.join(&name)).unwrap()
        );
    }
    assert_eq!(TempDir::list(&save).len(), 10);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_sent_during_a_large_transfer_arrives_before_it_ends() {
    let dir = TempDir::new("interleave");
    let (src, save) = (dir.sub("src"), dir.sub("save"));
    let size = 256u64 << 20;
    generate(&src.join("large.bin"), size, 3);
    let (server, events) = start_server_with(server_config(Some(&save))).await;
    let mut events = accept_all(events);
    let client = Client::connect(client_config(&server)).await.unwrap();
    let handle = client.send_file(src.join("large.bin")).await.unwrap();
    let progress = handle.progress_reader();
    timeout(WAIT, async {
        while progress().confirmed == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .unwrap();
    let sent_at = Instant::now();
    let confirmed_then = progress().confirmed;
    client.send("chat during the transfer").await.unwrap();
    let event = wait_for(&mut events, |e| {
        is_received(e)
            || matches!(e, ServerEvent::Message { message, .. } if message.as_text() == Some("chat during the transfer"))
    })
    .await;
    let latency = sent_at.elapsed();
    let confirmed_on_arrival = progress().confirmed;
    assert!(
        matches!(event, ServerEvent::Message { .. }),
        "the file finished before the message: {event:?}"
    );
    assert!(
        confirmed_on_arrival < size,
        "the message arrived only at the end of the file"
    );
    eprintln!(
        "message latency during the transfer: {latency:?} (file at {} → {} MiB of 256)",
        confirmed_then >> 20,
        confirmed_on_arrival >> 20
    );
    timeout(WAIT, handle.finish()).await.unwrap().unwrap();
    client.close().await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn the_server_pushes_a_file_to_a_client() {
    let dir = TempDir::new("push");
    let (src, save) = (dir.sub("src"), dir.sub("save"));
    let digest = generate(&src.join("pushed.bin"), 3 << 20, 4);
    let (server, mut events) = start_server_with(server_config(None)).await;
    let mut config = client_config(&server);
    config.transfer = TransferConfig::receive_into(&save);
    let mut client = Client::connect(config).await.unwrap();
    let id = support::next_connected(&mut events).await;
    let handle = server.send_file(id, src.join("pushed.bin")).await.unwrap();
    let received = timeout(WAIT, async {
        loop {
            match client.recv().await.expect("client events") {
                ClientEvent::FileOffer(offer) => {
                    assert_eq!((offer.name(), offer.size()), ("pushed.bin", 3 << 20));
                    assert_eq!(offer.digest(), digest);
                    offer.accept();
                }
                ClientEvent::FileReceived(file) => return file,
                ClientEvent::FileFailed(f) => panic!("{f:?}"),
                _ => {}
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(received.digest, digest);
    assert_eq!(Digest::of_file(&save.join("pushed.bin")).unwrap(), digest);
    let receipt = timeout(WAIT, handle.finish()).await.unwrap().unwrap();
    assert_eq!(receipt.digest, digest);
    // A tutorial client cannot receive files; an unknown one is an error too.
    assert!(matches!(
        server
            .send_file(ClientId(999), src.join("pushed.bin"))
            .await,
        Err(Error::UnknownClient(_))
    ));
    client.close().await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn refusals_reach_the_sender() {
    let dir = TempDir::new("refuse");
    let (src, save) = (dir.sub("src"), dir.sub("save"));
    generate(&src.join("reject-me.bin"), 1000, 5);
    generate(&src.join("exists.txt"), 1000, 6);
    generate(&src.join("huge.bin"), 5000, 7);
    std::fs::write(save.join("exists.txt"), b"keep me").unwrap();

    // No save directory: refused without the application being asked.
    let (plain, mut plain_events) = start_server_with(server_config(None)).await;
    let client = Client::connect(client_config(&plain)).await.unwrap();
    let refused = client
        .send_file(src.join("exists.txt"))
        .await
        .unwrap()
        .finish()
        .await;
    assert!(
        matches!(
            refused,
            Err(Error::Refused {
                code: refuse_code::NOT_ACCEPTING,
                ..
            })
        ),
        "{refused:?}"
    );
    client.close().await.unwrap();
    plain.shutdown().await;
    while let Some(event) = plain_events.recv().await {
        assert!(!matches!(event, ServerEvent::FileOffer { .. }), "{event:?}");
    }

    let mut config = server_config(Some(&save));
    config.transfer.max_file_size = 4096;
    let (server, events) = start_server_with(config).await;
    let _events = accept_all(events);
    let client = Client::connect(client_config(&server)).await.unwrap();
    let send = |name: &str| {
        let path = src.join(name);
        let client = &client;
        async move { client.send_file(path).await.unwrap().finish().await }
    };
    match send("reject-me.bin").await {
        Err(Error::Refused { code, text }) => {
            assert_eq!(
                (code, text.as_str()),
                (refuse_code::REJECTED, "not that one")
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        send("exists.txt").await,
        Err(Error::Refused {
            code: refuse_code::EXISTS,
            ..
        })
    ));
    assert_eq!(std::fs::read(save.join("exists.txt")).unwrap(), b"keep me");
    assert!(matches!(
        send("huge.bin").await,
        Err(Error::Refused {
            code: refuse_code::TOO_LARGE,
            ..
        })
    ));
    // Unreadable and unsafe local files fail before anything is offered.
    assert!(matches!(
        client.send_file(src.join("missing")).await,
        Err(Error::File { .. })
    ));
    assert_eq!(TempDir::list(&save), ["exists.txt"]);
    client.close().await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn an_offer_of_an_existing_file_is_replaced_only_when_configured() {
    let dir = TempDir::new("overwrite");
    let (src, save) = (dir.sub("src"), dir.sub("save"));
    let digest = generate(&src.join("same.txt"), 10_000, 8);
    std::fs::write(save.join("same.txt"), b"old").unwrap();
    let mut config = server_config(Some(&save));
    config.transfer.overwrite = true;
    let (server, events) = start_server_with(config).await;
    let _events = accept_all(events);
    let client = Client::connect(client_config(&server)).await.unwrap();
    let receipt = client
        .send_file(src.join("same.txt"))
        .await
        .unwrap()
        .finish()
        .await
        .unwrap();
    assert_eq!(receipt.digest, digest);
    assert_eq!(Digest::of_file(&save.join("same.txt")).unwrap(), digest);
    client.close().await.unwrap();
    server.shutdown().await;
}

/// A child process of the real binary, killed and reaped when dropped (also when the test
/// panics), with its stdout and stderr lines read by threads.
struct Proc {
    child: std::process::Child,
    /// `(true, line)` from stdout, `(false, line)` from stderr.
    lines: std::sync::mpsc::Receiver<(bool, String)>,
    /// Every line so far, for failure messages.
    seen: Vec<String>,
}

impl Proc {
    fn spawn(args: &[&std::ffi::OsStr]) -> Proc {
        use std::io::{BufRead, BufReader};
        use std::process::{Command, Stdio};
        let mut child = Command::new(env!("CARGO_BIN_EXE_sockframe"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        let out: Box<dyn std::io::Read + Send> = Box::new(child.stdout.take().unwrap());
        let err: Box<dyn std::io::Read + Send> = Box::new(child.stderr.take().unwrap());
        for (is_out, stream) in [(true, out), (false, err)] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    if tx.send((is_out, line)).is_err() {
                        break;
                    }
                }
            });
        }
        Proc {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The next line of stdout (`out`) or stderr for which `pred` holds; fails after [`WAIT`].
    fn wait_line(&mut self, out: bool, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((is_out, line)) => {
                    self.seen.push(line.clone());
                    if is_out == out && pred(&line) {
                        return line;
                    }
                }
                Err(e) => panic!("no such line ({e}); lines so far: {:#?}", self.seen),
            }
        }
    }

    fn command(&mut self, line: &str) {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `serve --save-dir DIR` on an OS-picked port, and its address.
fn serve_saving_into(save: &Path) -> (Proc, String) {
    let mut serve = Proc::spawn(&[
        "serve".as_ref(),
        "--bind".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--save-dir".as_ref(),
        save.as_os_str(),
    ]);
    let listening = serve.wait_line(false, |l| l.starts_with("listening on "));
    let addr = listening.trim_start_matches("listening on ").to_string();
    (serve, addr)
}

/// The real binary: `serve --save-dir` and `send-file`, with the exit code.
#[test]
fn cli_send_file_end_to_end() {
    use std::process::Command;
    let dir = TempDir::new("cli");
    let (src, save) = (dir.sub("src"), dir.path().join("save"));
    let d1 = generate(&src.join("one.bin"), 3 << 20, 9);
    let d2 = generate(&src.join("two words.txt"), 12345, 10);
    let bin = env!("CARGO_BIN_EXE_sockframe");
    let (mut serve, addr) = serve_saving_into(&save);

    let out = Command::new(bin)
        .args(["send-file", &addr])
        .arg(src.join("one.bin"))
        .arg(src.join("two words.txt"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains(&format!("sent one.bin {} {d1}", 3 << 20)),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("sent two words.txt 12345 {d2}")),
        "{stdout}"
    );
    let line = serve.wait_line(true, |l| l.starts_with("file ") && l.contains("one.bin"));
    assert!(
        line.ends_with(&format!("one.bin {} {d1}", 3 << 20)),
        "{line}"
    );
    assert_eq!(Digest::of_file(&save.join("one.bin")).unwrap(), d1);
    assert_eq!(Digest::of_file(&save.join("two words.txt")).unwrap(), d2);

    // Sending again: the files exist, the server refuses, the exit code says so.
    let out = Command::new(bin)
        .args(["send-file", "--quiet", &addr])
        .arg(src.join("one.bin"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("already exists"), "{stderr}");
}

/// The real binary: `serve`'s stdin command `send-file <id> <path>` pushes a file to
/// `connect --save-dir`.
#[test]
fn cli_serve_pushes_a_file_to_connect() {
    let dir = TempDir::new("clipush");
    let (src, server_save, client_save) = (dir.sub("src"), dir.sub("ss"), dir.path().join("cs"));
    let digest = generate(&src.join("pushed.bin"), 2 << 20, 13);
    let (mut serve, addr) = serve_saving_into(&server_save);
    let mut connect = Proc::spawn(&[
        "connect".as_ref(),
        addr.as_ref(),
        "--save-dir".as_ref(),
        client_save.as_os_str(),
    ]);
    connect.wait_line(false, |l| l.starts_with("connected to"));
    let connected = serve.wait_line(true, |l| l.starts_with("connected "));
    let id = connected.split(' ').nth(1).unwrap().to_string();
    serve.command(&format!(
        "send-file {id} {}",
        src.join("pushed.bin").display()
    ));
    let saved = connect.wait_line(false, |l| l.starts_with("file pushed.bin"));
    assert!(saved.contains(&digest.to_string()), "{saved}");
    serve.wait_line(false, |l| {
        l.contains("sent to client") && l.contains("verified")
    });
    assert_eq!(
        Digest::of_file(&client_save.join("pushed.bin")).unwrap(),
        digest
    );
}

/// A TCP proxy to `target` that cuts its first connection (both directions, at once) after
/// `cut_after` bytes from the client; later connections are forwarded untouched.
async fn cutting_proxy(target: std::net::SocketAddr, cut_after: u64) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((inbound, _)) = listener.accept().await {
            let Ok(outbound) = TcpStream::connect(target).await else {
                continue;
            };
            let limit = if first { cut_after } else { u64::MAX };
            first = false;
            tokio::spawn(async move {
                let (mut ci, mut co) = inbound.into_split();
                let (mut si, mut so) = outbound.into_split();
                let up = async {
                    let mut buf = vec![0u8; 64 << 10];
                    let mut passed = 0u64;
                    loop {
                        let n = match ci.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if passed + n as u64 >= limit {
                            return; // the cut: both sockets are dropped below
                        }
                        passed += n as u64;
                        if so.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                };
                let down = tokio::io::copy(&mut si, &mut co);
                tokio::select! {
                    _ = up => {}
                    _ = down => {}
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_resumes_after_an_abrupt_cut_in_the_network() {
    // With a lossless session (the default for a reconnecting client) the transfer simply
    // goes on: the session resends what the cut lost, so it is one attempt. Without one, the
    // sender offers the file again and the receiver answers with what it has on disk.
    for session in [true, false] {
        let dir = TempDir::new("proxy");
        let (src, save) = (dir.sub("src"), dir.sub("save"));
        let size = 32u64 << 20;
        let digest = generate(&src.join("cut.bin"), size, 11);
        let (server, events) = start_server_with(server_config(Some(&save))).await;
        let mut events = accept_all(events);
        let proxy = cutting_proxy(server.local_addr(), size / 2).await;
        let mut config = ClientConfig::new(proxy.to_string());
        config.reconnect = true;
        config.session = session;
        config.reconnect_backoff.initial = Duration::from_millis(10);
        let mut client = Client::connect(config).await.unwrap();
        let handle = client.send_file(src.join("cut.bin")).await.unwrap();
        let receipt = timeout(WAIT, handle.finish()).await.unwrap().unwrap();
        assert_eq!(receipt.digest, digest);
        if session {
            assert_eq!(receipt.attempts, 1, "{receipt:?}");
            // The cut happened, and the session was resumed rather than started anew.
            let mut seen = (false, false);
            while let Some(event) = client.recv().now_or_never().flatten() {
                match event {
                    ClientEvent::Disconnected { .. } => seen.0 = true,
                    ClientEvent::Resumed { .. } => seen.1 = true,
                    _ => {}
                }
            }
            assert_eq!(seen, (true, true), "a cut and a resume");
        } else {
            assert!(receipt.attempts >= 2, "{receipt:?}");
            assert!(receipt.resumed_from > 0, "{receipt:?}");
            assert!(receipt.resumed_from <= size / 2, "{receipt:?}");
        }
        wait_for(&mut events, is_received).await;
        assert_eq!(Digest::of_file(&save.join("cut.bin")).unwrap(), digest);
        assert_eq!(TempDir::list(&save), ["cut.bin"]);
        client.close().await.unwrap();
        server.shutdown().await;
    }
}

/// What a sender that crashed leaves behind is a partial file named after the digest; a
/// new run offering the same file (any connection, any name) goes on from there.
#[tokio::test]
async fn a_new_offer_resumes_from_a_partial_file_left_behind() {
    let dir = TempDir::new("rerun");
    let (src, save) = (dir.sub("src"), dir.sub("save"));
    let size = 5u64 << 20;
    let digest = generate(&src.join("again.bin"), size, 12);
    let data = std::fs::read(src.join("again.bin")).unwrap();
    let part = save.join(format!(".sockframe-{digest}.part"));
    std::fs::write(&part, &data[..3 << 20]).unwrap();

    let (server, events) = start_server_with(server_config(Some(&save))).await;
    let mut events = accept_all(events);
    let client = Client::connect(client_config(&server)).await.unwrap();
    let receipt = client
        .send_file(src.join("again.bin"))
        .await
        .unwrap()
        .finish()
        .await
        .unwrap();
    assert_eq!(receipt.resumed_from, 3 << 20);
    assert_eq!(receipt.attempts, 1);
    // The application was told how much was there already.
    let offer = wait_for(&mut events, |e| matches!(e, ServerEvent::Message { .. })).await;
    let ServerEvent::Message { message, .. } = offer else {
        unreachable!()
    };
    assert_eq!(
        message.as_text(),
        Some(&*format!("offer again.bin {size} {}", 3 << 20))
    );
    wait_for(&mut events, is_received).await;
    assert_eq!(std::fs::read(save.join("again.bin")).unwrap(), data);
    assert!(!part.exists());
    client.close().await.unwrap();
    server.shutdown().await;
}

/// Several transfers on one connection at once, in both directions: ids of the two
/// directions never mix, and each file arrives whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_transfers_share_one_connection_both_ways() {
    let dir = TempDir::new("both");
    let (src, server_save, client_save) = (dir.sub("src"), dir.sub("ss"), dir.sub("cs"));
    let mut digests = Vec::new();
    for i in 0..4u64 {
        digests.push(generate(
            &src.join(format!("f{i}.bin")),
            (2 << 20) + i,
            20 + i,
        ));
    }
    let (server, mut events) = start_server_with(server_config(Some(&server_save))).await;
    let mut config = client_config(&server);
    config.transfer = TransferConfig::receive_into(&client_save);
    let mut client = Client::connect(config).await.unwrap();
    let id = support::next_connected(&mut events).await;
    let mut events = accept_all(events);

    // The server pushes f3 while the client sends f0..f2.
    let push = server.send_file(id, src.join("f3.bin")).await.unwrap();
    let mut sends = Vec::new();
    for i in 0..3 {
        sends.push(
            client
                .send_file(src.join(format!("f{i}.bin")))
                .await
                .unwrap(),
        );
    }
    let pushed = timeout(WAIT, async {
        loop {
            match client.recv().await.expect("client events") {
                ClientEvent::FileOffer(offer) => offer.accept(),
                ClientEvent::FileReceived(file) => return file,
                ClientEvent::FileFailed(f) => panic!("{f:?}"),
                _ => {}
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(pushed.digest, digests[3]);
    for (i, send) in sends.into_iter().enumerate() {
        let receipt = timeout(WAIT, send.finish()).await.unwrap().unwrap();
        assert_eq!(receipt.digest, digests[i]);
    }
    assert_eq!(
        timeout(WAIT, push.finish()).await.unwrap().unwrap().digest,
        digests[3]
    );
    for _ in 0..3 {
        wait_for(&mut events, is_received).await;
    }
    assert_eq!(TempDir::list(&server_save), ["f0.bin", "f1.bin", "f2.bin"]);
    assert_eq!(TempDir::list(&client_save), ["f3.bin"]);
    client.close().await.unwrap();
    server.shutdown().await;
}

/// The real binary: `serve --json --max-file-size` reports files as JSON and refuses larger
/// ones; `send-file --json` reports each verified file as JSON.
#[test]
fn cli_json_and_max_file_size() {
    use std::process::Command;
    let dir = TempDir::new("clijson");
    let (src, save) = (dir.sub("src"), dir.sub("save"));
    let small = generate(&src.join("small.bin"), 1000, 14);
    generate(&src.join("large.bin"), 3000, 15);
    let mut serve = Proc::spawn(&[
        "serve".as_ref(),
        "--bind".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--json".as_ref(),
        "--max-file-size".as_ref(),
        "2KiB".as_ref(),
        "--save-dir".as_ref(),
        save.as_os_str(),
    ]);
    let listening = serve.wait_line(false, |l| l.starts_with("listening on "));
    let addr = listening.trim_start_matches("listening on ");
    let out = Command::new(env!("CARGO_BIN_EXE_sockframe"))
        .args(["send-file", "--json", addr])
        .arg(src.join("small.bin"))
        .arg(src.join("large.bin"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let sent: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v["event"] == "sent")
        .collect();
    assert_eq!(sent.len(), 1, "{stdout}");
    assert_eq!(sent[0]["name"], "small.bin");
    assert_eq!(sent[0]["digest"], small.to_string());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("large.bin") && stderr.contains("limit"),
        "{stderr}"
    );
    let line = serve.wait_line(true, |l| l.contains("\"event\":\"file\""));
    let file: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(file["name"], "small.bin");
    assert_eq!(file["bytes"], 1000);
    assert_eq!(file["digest"], small.to_string());
    assert_eq!(TempDir::list(&save), ["small.bin"]);
}

/// `TransferHandle::cancel`: the sender's `finish` fails, the receiver reports it and
/// deletes its partial file (nobody will resume a cancelled transfer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_transfer_leaves_nothing_behind() {
    let dir = TempDir::new("cancel");
    let (src, save) = (dir.sub("src"), dir.sub("save"));
    generate(&src.join("cancel.bin"), 128 << 20, 16);
    let mut config = server_config(Some(&save));
    config.transfer.window = 2;
    let (server, events) = start_server_with(config).await;
    let mut events = accept_all(events);
    let mut cc = client_config(&server);
    cc.transfer.window = 2;
    let client = Client::connect(cc).await.unwrap();
    let handle = client.send_file(src.join("cancel.bin")).await.unwrap();
    let progress = handle.progress_reader();
    timeout(WAIT, async {
        while progress().confirmed == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .unwrap();
    handle.cancel();
    match timeout(WAIT, handle.finish()).await.unwrap() {
        Err(Error::TransferFailed(text)) => assert!(text.contains("cancelled"), "{text}"),
        other => panic!("expected a cancelled transfer, got {other:?}"),
    }
    let failed = wait_for(&mut events, |e| matches!(e, ServerEvent::FileFailed { .. })).await;
    let ServerEvent::FileFailed { failure, .. } = failed else {
        unreachable!()
    };
    assert!(failure.reason.contains("cancelled"), "{failure:?}");
    assert!(!failure.resumable);
    assert!(
        TempDir::list(&save).is_empty(),
        "{:?}",
        TempDir::list(&save)
    );
    client.close().await.unwrap();
    server.shutdown().await;
}

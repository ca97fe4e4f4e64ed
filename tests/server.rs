//! The server against raw TCP clients: many clients at once, targeted sends and broadcasts,
//! slow readers, protocol violations, disconnect detection, graceful shutdown, the connection
//! limit, kicking, and the client registry.
//!
//! Clients are plain `tokio::net::TcpStream`s that frame by hand, so a bug shared by the
//! library's encoder and decoder cannot hide here. The servers speak only the tutorial
//! framing (`support::tutorial_config`), so a raw client is reported connected at once;
//! `tests/wire.rs` covers raw clients under the default `Auto` protocol detection.
//!
//! Tests that measure the process's resident memory take [`MEMORY`] exclusively; every other
//! test takes it shared, so no other test allocates while a measurement runs.

mod support;

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use sockframe::server::{ClientId, Server, ServerEvent, ServerEvents};
use sockframe::{DisconnectReason, Error, FullPolicy, Message, MessageKind, Mode, OutboxLimits};
use support::{WAIT, next_event, rss_bytes, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard, watch};
use tokio::time::timeout;

const MIB: u64 = 1024 * 1024;

static MEMORY: RwLock<()> = RwLock::const_new(());

/// For tests that do not measure memory.
async fn shared() -> RwLockReadGuard<'static, ()> {
    MEMORY.read().await
}

/// For tests that measure memory: no other test runs meanwhile.
async fn exclusive() -> RwLockWriteGuard<'static, ()> {
    MEMORY.write().await
}

// ---------------------------------------------------------------------------------------
// Raw-client helpers
// ---------------------------------------------------------------------------------------

async fn connect(addr: SocketAddr) -> TcpStream {
    timeout(WAIT, TcpStream::connect(addr))
        .await
        .expect("connect timed out")
        .expect("connect")
}

/// Connects `n` raw clients and returns them in connect order with the id the server gave
/// each (matched through the address in the `Connected` event).
async fn connect_many(
    server: &Server,
    events: &mut ServerEvents,
    n: usize,
) -> Vec<(ClientId, TcpStream)> {
    let mut streams = Vec::with_capacity(n);
    for _ in 0..n {
        streams.push(connect(server.local_addr()).await);
    }
    let mut ids = HashMap::new();
    for _ in 0..n {
        match next_event(events).await {
            ServerEvent::Connected { client, addr } => {
                assert!(ids.insert(addr, client).is_none(), "{addr} connected twice");
            }
            other => panic!("expected Connected, got {other:?}"),
        }
    }
    streams
        .into_iter()
        .map(|s| {
            let addr = s.local_addr().unwrap();
            let id = *ids
                .get(&addr)
                .unwrap_or_else(|| panic!("no Connected event for {addr}"));
            (id, s)
        })
        .collect()
}

/// Connects one raw client and returns its id.
async fn connect_one(server: &Server, events: &mut ServerEvents) -> (ClientId, TcpStream) {
    connect_many(server, events, 1).await.pop().unwrap()
}

fn frame(payload: &[u8]) -> Vec<u8> {
    support::frame(payload)
}

async fn write_bytes(stream: &mut TcpStream, bytes: &[u8]) {
    timeout(WAIT, stream.write_all(bytes))
        .await
        .expect("write timed out")
        .expect("write");
}

async fn send_frame(stream: &mut TcpStream, payload: &[u8]) {
    write_bytes(stream, &frame(payload)).await;
}

async fn try_read_frame(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).await?;
    let len = u32::from_le_bytes(header) as usize;
    assert!(len <= 64 * MIB as usize, "absurd frame length {len}");
    let mut payload = vec![0; len];
    stream.read_exact(&mut payload).await?;
    Ok(payload)
}

/// The next frame the server sent on `stream`.
async fn read_frame(stream: &mut TcpStream) -> Vec<u8> {
    timeout(WAIT, try_read_frame(stream))
        .await
        .expect("timed out reading a frame")
        .expect("read a frame")
}

/// Waits until the server closes `stream` (end of stream or reset); fails if data arrives.
async fn read_closed(stream: &mut TcpStream) {
    let mut buf = [0u8; 64];
    match timeout(WAIT, stream.read(&mut buf))
        .await
        .expect("timed out waiting for the server to close the connection")
    {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("expected the connection closed, got {n} bytes"),
    }
}

/// Waits for the `Disconnected` event of `id` and returns the reason. Skips `Connected` and
/// `Message` events; the `Disconnected` of any other client fails the test.
async fn disconnected(events: &mut ServerEvents, id: ClientId) -> DisconnectReason {
    match wait_for(events, |e| match e {
        ServerEvent::Disconnected { client, .. } if *client == id => true,
        ServerEvent::Disconnected { .. } => panic!("waiting for {id} to leave, got {e:?}"),
        _ => false,
    })
    .await
    {
        ServerEvent::Disconnected { reason, .. } => reason,
        _ => unreachable!(),
    }
}

/// The next event must be a message from `from` (untyped: raw clients speak the tutorial
/// framing); returns it.
async fn next_message_from(events: &mut ServerEvents, from: ClientId) -> Message {
    match next_event(events).await {
        ServerEvent::Message { client, message } if client == from => {
            assert_eq!(message.kind(), MessageKind::Untyped, "{message:?}");
            message
        }
        other => panic!("expected a message from {from}, got {other:?}"),
    }
}

/// Client → server → client round trip on a connection that should be unaffected.
async fn round_trip(
    server: &Server,
    events: &mut ServerEvents,
    id: ClientId,
    stream: &mut TcpStream,
) {
    send_frame(stream, b"ping").await;
    assert_eq!(next_message_from(events, id).await, "ping");
    timeout(WAIT, server.send(id, "pong"))
        .await
        .expect("send timed out")
        .expect("send");
    assert_eq!(read_frame(stream).await, b"pong");
}

/// Closes the given client streams, then shuts the server down (a graceful shutdown would
/// otherwise wait up to the drain deadline for clients to close).
async fn finish(server: Server, streams: impl IntoIterator<Item = TcpStream>) {
    drop(streams.into_iter().collect::<Vec<_>>());
    timeout(WAIT, server.shutdown())
        .await
        .expect("shutdown timed out");
}

/// Polls `cond` until it holds; for state that no event reports. Bounded by [`WAIT`].
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

// ---------------------------------------------------------------------------------------
// (a) Many clients at once
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_clients_hundred_messages_each_arrive_once_in_order() {
    const CLIENTS: usize = 100;
    const MESSAGES: usize = 100;
    let _guard = shared().await;
    let (server, mut events) = support::start_tutorial_server().await;
    let clients = connect_many(&server, &mut events, CLIENTS).await;
    assert_eq!(server.client_count(), CLIENTS);

    let index_of: HashMap<ClientId, usize> = clients
        .iter()
        .enumerate()
        .map(|(i, (id, _))| (*id, i))
        .collect();
    assert_eq!(index_of.len(), CLIENTS, "ids are distinct");

    let mut writers = tokio::task::JoinSet::new();
    for (i, (_, mut stream)) in clients.into_iter().enumerate() {
        writers.spawn(async move {
            if i % 2 == 0 {
                // One write per message.
                for m in 0..MESSAGES {
                    send_frame(&mut stream, format!("c{i} m{m}").as_bytes()).await;
                }
            } else {
                // All messages in a single write.
                let wire: Vec<u8> = (0..MESSAGES)
                    .flat_map(|m| frame(format!("c{i} m{m}").as_bytes()))
                    .collect();
                write_bytes(&mut stream, &wire).await;
            }
            stream
        });
    }

    let mut next = [0usize; CLIENTS];
    timeout(WAIT, async {
        for _ in 0..CLIENTS * MESSAGES {
            match events.recv().await.expect("event stream ended") {
                ServerEvent::Message { client, message } => {
                    assert_eq!(message.kind(), MessageKind::Untyped, "{message:?}");
                    let text = std::str::from_utf8(&message).expect("utf-8 payload");
                    let (c, m) = text
                        .strip_prefix('c')
                        .and_then(|t| t.split_once(" m"))
                        .unwrap_or_else(|| panic!("malformed payload {text:?}"));
                    let (c, m): (usize, usize) = (c.parse().unwrap(), m.parse().unwrap());
                    assert_eq!(
                        index_of[&client], c,
                        "{text:?} attributed to client {client}"
                    );
                    assert_eq!(m, next[c], "client {c} out of order or duplicated");
                    next[c] += 1;
                }
                other => panic!("unexpected event {other:?}"),
            }
        }
    })
    .await
    .expect("timed out receiving 10,000 messages");
    assert!(next.iter().all(|&n| n == MESSAGES), "{next:?}");

    let mut streams = Vec::new();
    while let Some(stream) = writers.join_next().await {
        streams.push(stream.unwrap());
    }
    // Nothing beyond the 10,000: counters agree, and no event is pending.
    for info in server.clients() {
        assert_eq!(info.messages_in, MESSAGES as u64, "client {}", info.id);
    }
    assert!(events.try_recv().is_none());
    finish(server, streams).await;
}

// ---------------------------------------------------------------------------------------
// (b) Send to one, broadcast, broadcast_except
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_reaches_one_client_and_broadcast_reaches_each_once() {
    let _guard = shared().await;
    let (server, mut events) = support::start_tutorial_server().await;
    let mut clients = connect_many(&server, &mut events, 100).await;

    let (target, _) = clients[17];
    server.send(target, "just for you").await.unwrap();
    assert_eq!(read_frame(&mut clients[17].1).await, b"just for you");

    assert_eq!(server.broadcast("to everyone").await.unwrap(), 100);
    // Exactly once: each client's next frame after the broadcast is the marker, so neither
    // the targeted message nor the broadcast came twice, or to the wrong client.
    assert_eq!(server.broadcast("marker").await.unwrap(), 100);
    for (id, stream) in &mut clients {
        assert_eq!(read_frame(stream).await, b"to everyone", "client {id}");
        assert_eq!(read_frame(stream).await, b"marker", "client {id}");
    }
    finish(server, clients.into_iter().map(|(_, s)| s)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_except_skips_exactly_the_excluded_client() {
    let _guard = shared().await;
    let (server, mut events) = support::start_tutorial_server().await;
    let mut clients = connect_many(&server, &mut events, 20).await;
    let excluded = clients[3].0;

    assert_eq!(
        server
            .broadcast_except(excluded, "not for 3")
            .await
            .unwrap(),
        19
    );
    assert_eq!(server.broadcast("marker").await.unwrap(), 20);
    for (id, stream) in &mut clients {
        if *id == excluded {
            // Its first frame is the later marker: it got nothing before.
            assert_eq!(read_frame(stream).await, b"marker");
        } else {
            assert_eq!(read_frame(stream).await, b"not for 3", "client {id}");
            assert_eq!(read_frame(stream).await, b"marker", "client {id}");
        }
    }
    // Excluding an id that is not connected excludes nobody.
    assert_eq!(
        server
            .broadcast_except(ClientId(u64::MAX), "all")
            .await
            .unwrap(),
        20
    );
    finish(server, clients.into_iter().map(|(_, s)| s)).await;
}

// ---------------------------------------------------------------------------------------
// (c) Slow readers
// ---------------------------------------------------------------------------------------

const CHUNK: usize = 64 * 1024;
const BROADCASTS: u32 = 1600; // 100 MiB

/// A 64 KiB payload that carries its sequence number.
fn numbered(seq: u32) -> Bytes {
    let mut b = BytesMut::with_capacity(CHUNK);
    b.put_u32_le(seq);
    b.put_bytes((seq % 251) as u8, CHUNK - 4);
    b.freeze()
}

/// A reading client: reads `count` numbered payloads, checking each, and publishes how many
/// it has read.
async fn numbered_reader(
    mut stream: TcpStream,
    count: u32,
    progress: watch::Sender<u32>,
) -> TcpStream {
    let mut buf = vec![0u8; CHUNK];
    for seq in 0..count {
        let mut header = [0u8; 4];
        timeout(WAIT, async {
            stream.read_exact(&mut header).await?;
            assert_eq!(u32::from_le_bytes(header) as usize, CHUNK);
            stream.read_exact(&mut buf).await
        })
        .await
        .unwrap_or_else(|_| panic!("reader timed out at {seq}"))
        .unwrap_or_else(|e| panic!("reader failed at {seq}: {e}"));
        assert_eq!(u32::from_le_bytes(buf[..4].try_into().unwrap()), seq);
        assert!(buf[4..].iter().all(|&b| b == (seq % 251) as u8), "at {seq}");
        progress.send_replace(seq + 1);
    }
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_is_disconnected_by_broadcast_while_others_get_everything() {
    let _guard = exclusive().await;
    let (server, mut events) = support::start_tutorial_server().await;
    assert_eq!(server.config().broadcast_policy, FullPolicy::Disconnect);
    let mut clients = connect_many(&server, &mut events, 3).await;
    let (fast2, fast2_stream) = clients.pop().unwrap();
    let (fast1, fast1_stream) = clients.pop().unwrap();
    let (slow, slow_stream) = clients.pop().unwrap(); // never read

    let mut progress = Vec::new();
    let mut readers = Vec::new();
    for stream in [fast1_stream, fast2_stream] {
        let (tx, rx) = watch::channel(0u32);
        progress.push(rx);
        readers.push(tokio::spawn(numbered_reader(stream, BROADCASTS, tx)));
    }

    let before = rss_bytes();
    let mut peak = before;
    let mut slow_dropped_at = None;
    let mut last_reached = 0;
    for seq in 0..BROADCASTS {
        // Keep the readers at most 32 broadcasts (2 MiB) behind: they read, but they are
        // not infinitely fast, and this test is about the one that does not read at all.
        let need = seq.saturating_sub(32);
        for rx in &mut progress {
            timeout(WAIT, rx.wait_for(|&n| n >= need))
                .await
                .expect("a reading client fell behind")
                .expect("a reader stopped");
        }
        let reached = server.broadcast(numbered(seq)).await.unwrap();
        // The readers are always reached; the slow client until its queue overflows.
        assert!(
            reached >= 2,
            "broadcast {seq} reached only {reached} clients"
        );
        if reached == 2 && slow_dropped_at.is_none() {
            slow_dropped_at = Some(seq);
        }
        last_reached = reached;
        if seq % 16 == 0 {
            peak = peak.max(rss_bytes());
        }
    }
    let mut fast_streams = Vec::new();
    for reader in readers {
        let stream = timeout(WAIT, reader)
            .await
            .expect("reader timed out")
            .expect("reader failed");
        fast_streams.push(stream);
    }
    peak = peak.max(rss_bytes());

    let dropped_at = slow_dropped_at.expect("the slow client was never dropped");
    assert_eq!(last_reached, 2, "the slow client was reached again");
    let growth = peak.saturating_sub(before);
    eprintln!(
        "slow reader (broadcast): dropped after {dropped_at} broadcasts of 64 KiB; \
         RSS before {} MiB, peak {} MiB, growth {} KiB",
        before / MIB,
        peak / MIB,
        growth / 1024
    );
    // Its queue holds at most 8 MiB; the rest is kernel socket buffers. Everything the
    // others were sent (100 MiB) must not have piled up for it.
    assert!(
        dropped_at < 600,
        "dropped only after {dropped_at} broadcasts"
    );
    assert!(growth < 64 * MIB, "RSS grew by {} MiB", growth / MIB);
    let reason = disconnected(&mut events, slow).await;
    assert_eq!(reason, DisconnectReason::SlowConsumer);

    // The readers are still connected and were never disconnected.
    let ids: Vec<ClientId> = server.clients().iter().map(|c| c.id).collect();
    assert_eq!(ids, vec![fast1.min(fast2), fast1.max(fast2)]);
    while let Some(event) = events.try_recv() {
        assert!(
            !matches!(event, ServerEvent::Disconnected { .. }),
            "unexpected {event:?}"
        );
    }
    finish(server, fast_streams.into_iter().chain([slow_stream])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_with_wait_policy_blocks_on_a_non_reader_while_memory_stays_bounded() {
    let _guard = exclusive().await;
    let mut config = support::tutorial_config();
    config.send_policy = FullPolicy::Wait;
    let (server, mut events) = support::start_server_with(config).await;
    let outbox = server.config().outbox;
    let mut clients = connect_many(&server, &mut events, 2).await;
    let (other, mut other_stream) = clients.pop().unwrap();
    let (stuck, stuck_stream) = clients.pop().unwrap(); // never reads

    let before = rss_bytes();
    let mut peak = before;
    let mut queued = 0usize;
    let mut blocked = false;
    for seq in 0..BROADCASTS {
        // A distinct buffer per message, so that whatever is held shows in RSS. A send that
        // has room completes at once; one second without room means blocked.
        match timeout(Duration::from_secs(1), server.send(stuck, numbered(seq))).await {
            Ok(res) => res.expect("send to the stuck client"),
            Err(_elapsed) => {
                blocked = true;
                break;
            }
        }
        queued += 1;
        if queued % 16 == 0 {
            peak = peak.max(rss_bytes());
        }
    }
    peak = peak.max(rss_bytes());
    let growth = peak.saturating_sub(before);
    eprintln!(
        "non-reader (send, Wait): blocked after {queued} sends of 64 KiB ({} MiB); \
         RSS before {} MiB, peak {} MiB, growth {} KiB",
        queued * CHUNK / MIB as usize,
        before / MIB,
        peak / MIB,
        growth / 1024
    );
    assert!(blocked, "100 MiB were queued for a client that never reads");
    // The queue itself takes 8 MiB (128 payloads) without waiting on the socket.
    assert!(
        queued >= outbox.bytes / CHUNK,
        "blocked after only {queued} sends"
    );
    assert!(growth < 64 * MIB, "RSS grew by {} MiB", growth / MIB);

    // Still blocked, still connected, and the other client is served meanwhile.
    assert!(
        timeout(Duration::from_millis(200), server.send(stuck, numbered(0)))
            .await
            .is_err()
    );
    assert!(server.client(stuck).is_some());
    round_trip(&server, &mut events, other, &mut other_stream).await;

    // A non-reader that goes away with unread data resets the connection.
    drop(stuck_stream);
    let reason = disconnected(&mut events, stuck).await;
    assert!(
        matches!(reason, DisconnectReason::Reset | DisconnectReason::Io(_)),
        "{reason:?}"
    );
    finish(server, [other_stream]).await;
}

// ---------------------------------------------------------------------------------------
// (d) Protocol violations
// ---------------------------------------------------------------------------------------

fn protocol_text(reason: DisconnectReason) -> String {
    match reason {
        DisconnectReason::Protocol(text) => text,
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_negative_lengths_disconnect_only_the_offender() {
    let _guard = shared().await;
    let mut config = support::tutorial_config();
    config.max_frame = 1024;
    let (server, mut events) = support::start_server_with(config).await;
    let (good, mut good_stream) = connect_one(&server, &mut events).await;

    // The largest legal frame is fine.
    send_frame(&mut good_stream, &[7u8; 1024]).await;
    assert_eq!(next_message_from(&mut events, good).await.len(), 1024);

    // One byte over the maximum (the header is enough; some payload follows).
    let (bad, mut bad_stream) = connect_one(&server, &mut events).await;
    let mut wire = 1025u32.to_le_bytes().to_vec();
    wire.extend_from_slice(&[0u8; 100]);
    write_bytes(&mut bad_stream, &wire).await;
    let text = protocol_text(disconnected(&mut events, bad).await);
    assert!(
        text.contains("1025") && text.contains("1024") && text.contains("exceeds"),
        "{text}"
    );
    read_closed(&mut bad_stream).await;
    round_trip(&server, &mut events, good, &mut good_stream).await;

    // A negative length as a C# Int32.
    let (neg, mut neg_stream) = connect_one(&server, &mut events).await;
    write_bytes(&mut neg_stream, &[0x00, 0x00, 0x00, 0x80]).await;
    let text = protocol_text(disconnected(&mut events, neg).await);
    assert!(
        text.contains("0x80000000") && text.contains("negative"),
        "{text}"
    );
    read_closed(&mut neg_stream).await;
    round_trip(&server, &mut events, good, &mut good_stream).await;

    assert_eq!(server.client_count(), 1);
    finish(server, [good_stream, bad_stream, neg_stream]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_header_at_default_max_reserves_nothing() {
    const BAD: usize = 16;
    let _guard = exclusive().await;
    let (server, mut events) = support::start_tutorial_server().await;
    let (good, mut good_stream) = connect_one(&server, &mut events).await;
    let mut bad = connect_many(&server, &mut events, BAD).await;

    let before = rss_bytes();
    let announced = (16 * MIB + 1) as u32;
    for (_, stream) in &mut bad {
        write_bytes(stream, &announced.to_le_bytes()).await;
    }
    let mut left = HashMap::new();
    while left.len() < BAD {
        match next_event(&mut events).await {
            ServerEvent::Disconnected { client, reason } => {
                assert!(left.insert(client, reason).is_none());
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    for (id, stream) in &mut bad {
        let text = protocol_text(left.remove(id).expect("bad client not disconnected"));
        assert!(text.contains(&announced.to_string()), "{text}");
        read_closed(stream).await;
    }
    let growth = rss_bytes().saturating_sub(before);
    eprintln!(
        "{BAD} headers announcing 16 MiB + 1: RSS growth {} KiB",
        growth / 1024
    );
    assert!(growth < 8 * MIB, "RSS grew by {} MiB", growth / MIB);
    round_trip(&server, &mut events, good, &mut good_stream).await;
    finish(server, bad.into_iter().map(|(_, s)| s).chain([good_stream])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_announcing_i32_max_then_close_is_a_truncated_frame() {
    let _guard = exclusive().await;
    let mut config = support::tutorial_config();
    config.max_frame = i32::MAX as usize;
    let (server, mut events) = support::start_server_with(config).await;
    let (good, mut good_stream) = connect_one(&server, &mut events).await;
    let (bad, mut bad_stream) = connect_one(&server, &mut events).await;

    let before = rss_bytes();
    write_bytes(&mut bad_stream, &[0xff, 0xff, 0xff, 0x7f, b'x']).await;
    bad_stream.shutdown().await.unwrap();
    let text = protocol_text(disconnected(&mut events, bad).await);
    assert!(text.contains("mid-frame"), "{text}");
    assert!(text.contains(&(4 + i32::MAX as u64).to_string()), "{text}");
    let growth = rss_bytes().saturating_sub(before);
    eprintln!(
        "header announcing 0x7fffffff (max i32::MAX): RSS growth {} KiB",
        growth / 1024
    );
    // The server may reserve address space for the announced frame, but must not touch it.
    assert!(growth < 64 * MIB, "RSS grew by {} MiB", growth / MIB);
    round_trip(&server, &mut events, good, &mut good_stream).await;
    finish(server, [good_stream, bad_stream]).await;
}

// ---------------------------------------------------------------------------------------
// (e) Disconnect detection and ids
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_mid_frame_is_a_truncation_protocol_error() {
    let _guard = shared().await;
    let (server, mut events) = support::start_tutorial_server().await;

    // Half a frame: header for "hello", then "he".
    let (id, mut stream) = connect_one(&server, &mut events).await;
    write_bytes(&mut stream, &[5, 0, 0, 0, b'h', b'e']).await;
    drop(stream);
    let text = protocol_text(disconnected(&mut events, id).await);
    assert_eq!(text, "connection closed mid-frame (6 of 9 bytes received)");

    // Half a header.
    let (id, mut stream) = connect_one(&server, &mut events).await;
    write_bytes(&mut stream, &[5, 0]).await;
    drop(stream);
    let text = protocol_text(disconnected(&mut events, id).await);
    assert!(text.contains("mid-header"), "{text}");

    // A complete message, then half of the next: the complete one is still delivered.
    let (id, mut stream) = connect_one(&server, &mut events).await;
    let mut wire = frame(b"complete");
    wire.extend_from_slice(&frame(b"partial")[..7]);
    write_bytes(&mut stream, &wire).await;
    drop(stream);
    assert_eq!(next_message_from(&mut events, id).await, "complete");
    let text = protocol_text(disconnected(&mut events, id).await);
    assert!(text.contains("mid-frame"), "{text}");
    finish(server, []).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_close_and_reset_are_told_apart() {
    let _guard = shared().await;
    let (server, mut events) = support::start_tutorial_server().await;

    // Close between frames.
    let (id, mut stream) = connect_one(&server, &mut events).await;
    send_frame(&mut stream, b"bye").await;
    drop(stream);
    assert_eq!(next_message_from(&mut events, id).await, "bye");
    assert_eq!(
        disconnected(&mut events, id).await,
        DisconnectReason::ClosedByPeer
    );

    // Half-close (shutdown of the write side only) is a clean close too.
    let (id, mut stream) = connect_one(&server, &mut events).await;
    stream.shutdown().await.unwrap();
    assert_eq!(
        disconnected(&mut events, id).await,
        DisconnectReason::ClosedByPeer
    );
    drop(stream);

    // SO_LINGER 0, then close: the kernel sends a reset.
    let (id, stream) = connect_one(&server, &mut events).await;
    stream.set_zero_linger().unwrap();
    drop(stream);
    assert_eq!(disconnected(&mut events, id).await, DisconnectReason::Reset);

    assert_eq!(server.client_count(), 0);
    finish(server, []).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_are_never_reused() {
    let _guard = shared().await;
    let (server, mut events) = support::start_tutorial_server().await;
    let mut ids = Vec::new();
    for _ in 0..50 {
        let (id, stream) = connect_one(&server, &mut events).await;
        drop(stream);
        assert_eq!(
            disconnected(&mut events, id).await,
            DisconnectReason::ClosedByPeer
        );
        ids.push(id);
    }
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids not increasing: {ids:?}"
    );
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 50);
    assert_eq!(ids[0], ClientId(1), "ids start at 1");
    finish(server, []).await;
}

// ---------------------------------------------------------------------------------------
// (f) Graceful shutdown
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_delivers_everything_queued_then_closes() {
    const COUNT: u32 = 500;
    const SIZE: usize = 32 * 1024; // 16 MiB in all: more than the socket buffers hold
    let _guard = shared().await;
    let mut config = support::tutorial_config();
    config.outbox = OutboxLimits {
        messages: 1024,
        bytes: 32 * MIB as usize,
    };
    let (server, mut events) = support::start_server_with(config).await;
    let (id, mut stream) = connect_one(&server, &mut events).await;

    for i in 0..COUNT {
        let mut msg = BytesMut::with_capacity(SIZE);
        msg.put_u32_le(i);
        msg.put_bytes(0xee, SIZE - 4);
        timeout(WAIT, server.send(id, msg.freeze()))
            .await
            .expect("queueing timed out")
            .unwrap();
    }
    let stopping = tokio::spawn({
        let server = server.clone();
        async move { server.shutdown().await }
    });

    // The client reads everything, in order, then the end of stream.
    for i in 0..COUNT {
        let got = read_frame(&mut stream).await;
        assert_eq!(got.len(), SIZE);
        assert_eq!(u32::from_le_bytes(got[..4].try_into().unwrap()), i);
    }
    let mut rest = [0u8; 1];
    assert_eq!(
        timeout(WAIT, stream.read(&mut rest))
            .await
            .expect("no end of stream")
            .expect("clean end of stream, not a reset"),
        0
    );
    // Like the tutorial client, close on end of stream.
    drop(stream);

    timeout(WAIT, stopping)
        .await
        .expect("shutdown did not return")
        .unwrap();
    // The event stream ends after the last Disconnected.
    let rest: Vec<ServerEvent> = timeout(WAIT, async {
        let mut rest = Vec::new();
        while let Some(event) = events.recv().await {
            rest.push(event);
        }
        rest
    })
    .await
    .expect("event stream did not end");
    assert_eq!(
        rest,
        vec![ServerEvent::Disconnected {
            client: id,
            reason: DisconnectReason::Shutdown
        }]
    );
    assert!(server.clients().is_empty());
    assert!(server.is_shut_down());
    assert!(matches!(server.send(id, "late").await, Err(Error::Closed)));
    assert!(matches!(server.broadcast("late").await, Err(Error::Closed)));
    // Stopped accepting: a new connection is refused or closed at once.
    if let Ok(Ok(mut late)) = timeout(WAIT, TcpStream::connect(server.local_addr())).await {
        read_closed(&mut late).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_bounded_by_the_drain_deadline_for_a_client_that_never_reads() {
    let _guard = shared().await;
    let mut config = support::tutorial_config();
    config.drain_deadline = Duration::from_millis(300);
    let (server, mut events) = support::start_server_with(config).await;
    let (id, stream) = connect_one(&server, &mut events).await;
    // 8 MiB queued: more than loopback buffers take, so the drain cannot finish.
    for _ in 0..128 {
        server.send(id, numbered(1)).await.unwrap();
    }
    let started = Instant::now();
    timeout(WAIT, server.shutdown())
        .await
        .expect("shutdown hung on a client that never reads");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(300), "took {took:?}");
    assert_eq!(
        disconnected(&mut events, id).await,
        DisconnectReason::Shutdown
    );
    drop(stream);
}

// ---------------------------------------------------------------------------------------
// (g) Connection limit
// ---------------------------------------------------------------------------------------

// Single-threaded so that a connection task finishes its last poll (which releases its
// connection slot) before the test reacts to its Disconnected event.
#[tokio::test(flavor = "current_thread")]
async fn max_connections_refuses_the_extra_client_until_one_leaves() {
    let _guard = shared().await;
    let mut config = support::tutorial_config();
    config.max_connections = 2;
    let (server, mut events) = support::start_server_with(config).await;
    let mut clients = connect_many(&server, &mut events, 2).await;

    let mut third = connect(server.local_addr()).await;
    read_closed(&mut third).await;
    assert_eq!(server.client_count(), 2);
    let (id2, s2) = &mut clients[1];
    round_trip(&server, &mut events, *id2, s2).await;

    // One leaves; the next event is its Disconnected (the third never produced an event).
    let (id1, s1) = clients.remove(0);
    drop(s1);
    match next_event(&mut events).await {
        ServerEvent::Disconnected { client, reason } => {
            assert_eq!(client, id1);
            assert_eq!(reason, DisconnectReason::ClosedByPeer);
        }
        other => panic!("expected Disconnected of {id1}, got {other:?}"),
    }
    let (id4, mut s4) = connect_one(&server, &mut events).await;
    assert_eq!(server.client_count(), 2);
    round_trip(&server, &mut events, id4, &mut s4).await;
    finish(
        server,
        clients.into_iter().map(|(_, s)| s).chain([third, s4]),
    )
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn connection_slot_is_free_once_the_client_is_unregistered() {
    // A client that is gone from `clients()` / `client_count()` must not keep holding a
    // connection slot while its Disconnected event waits for room in the event stream.
    let _guard = shared().await;
    let mut config = support::tutorial_config();
    config.max_connections = 2;
    config.event_capacity = 1;
    let (server, mut events) = support::start_server_with(config).await;
    let (a, mut sa) = connect_one(&server, &mut events).await;
    let (b, sb) = connect_one(&server, &mut events).await;

    // Fill the event stream (capacity 1) with a message from A.
    send_frame(&mut sa, b"fill").await;
    wait_until("A's message is counted", || {
        server.client(a).is_some_and(|c| c.messages_in == 1)
    })
    .await;
    // B leaves: it is unregistered, its Disconnected event waits for room.
    drop(sb);
    wait_until("B is unregistered", || server.client_count() == 1).await;

    // One client connected, limit two: a new one must be accepted.
    let mut c = connect(server.local_addr()).await;
    assert_eq!(next_message_from(&mut events, a).await, "fill");
    assert_eq!(
        disconnected(&mut events, b).await,
        DisconnectReason::ClosedByPeer
    );
    let mut byte = [0u8; 1];
    tokio::select! {
        event = next_event(&mut events) => {
            assert!(
                matches!(event, ServerEvent::Connected { addr, .. } if addr == c.local_addr().unwrap()),
                "{event:?}"
            );
        }
        read = c.read(&mut byte) => panic!(
            "refused with client_count() = 1 < max_connections = 2 (read returned {read:?})"
        ),
    }
    // Nobody reads the (capacity 1) event stream any more: drop it so that shutdown does
    // not wait out the drain deadline on the last Disconnected events.
    drop(events);
    finish(server, [sa, c]).await;
}

// ---------------------------------------------------------------------------------------
// (h) Kick
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_delivers_what_is_queued_then_kicks() {
    let _guard = shared().await;
    let (server, mut events) = support::start_tutorial_server().await;
    let (id, mut stream) = connect_one(&server, &mut events).await;
    let (other, mut other_stream) = connect_one(&server, &mut events).await;

    for i in 0..200 {
        server.send(id, format!("queued {i}")).await.unwrap();
    }
    server.send(id, "last words").await.unwrap();
    assert!(server.disconnect(id));

    for i in 0..200 {
        assert_eq!(
            read_frame(&mut stream).await,
            format!("queued {i}").as_bytes()
        );
    }
    assert_eq!(read_frame(&mut stream).await, b"last words");
    read_closed(&mut stream).await;
    drop(stream);
    assert_eq!(
        disconnected(&mut events, id).await,
        DisconnectReason::Kicked
    );

    assert!(!server.disconnect(id), "already gone");
    assert!(!server.disconnect(ClientId(999_999)));
    assert!(matches!(
        server.send(id, "too late").await,
        Err(Error::UnknownClient(c)) if c == id
    ));
    round_trip(&server, &mut events, other, &mut other_stream).await;
    finish(server, [other_stream]).await;
}

// ---------------------------------------------------------------------------------------
// (i) Registry
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_lists_ids_addresses_and_counters() {
    let _guard = shared().await;
    let (server, mut events) = support::start_tutorial_server().await;
    let mut clients = connect_many(&server, &mut events, 2).await;
    let (talker, quiet) = (clients[0].0, clients[1].0);

    for payload in [&b"a"[..], b"bb", b"ccc"] {
        send_frame(&mut clients[0].1, payload).await;
    }
    for _ in 0..3 {
        next_message_from(&mut events, talker).await;
    }
    server.send(talker, "hello").await.unwrap();
    assert_eq!(read_frame(&mut clients[0].1).await, b"hello");

    let list = server.clients();
    let ids: Vec<ClientId> = list.iter().map(|c| c.id).collect();
    assert_eq!(
        ids,
        vec![talker.min(quiet), talker.max(quiet)],
        "ordered by id"
    );
    let t = list.iter().find(|c| c.id == talker).unwrap();
    let q = list.iter().find(|c| c.id == quiet).unwrap();
    assert_eq!(t.addr, clients[0].1.local_addr().unwrap());
    assert_eq!((t.messages_in, t.bytes_in), (3, 6));
    assert_eq!((t.messages_out, t.bytes_out), (1, 5));
    assert_eq!(q.addr, clients[1].1.local_addr().unwrap());
    assert_eq!(
        (q.messages_in, q.bytes_in, q.messages_out, q.bytes_out),
        (0, 0, 0, 0)
    );
    for c in [t, q] {
        assert_eq!(c.protocol, Mode::Tutorial, "client {}", c.id);
        assert_eq!(c.name, "", "a tutorial client has no name");
    }
    assert_eq!(server.client(talker).as_ref(), Some(t));
    assert!(t.connected_at <= std::time::SystemTime::now());
    finish(server, clients.into_iter().map(|(_, s)| s)).await;
}

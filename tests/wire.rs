//! Pins the wire format against a live server, with bytes written and read by hand: a
//! 4-byte little-endian length, then the payload. Nothing here uses the library's encoder or
//! decoder on the client side.

mod support;

use std::time::Duration;

use sockframe::server::{ClientId, ProtocolMode, Server, ServerEvent, ServerEvents};
use sockframe::{Message, Mode};
use support::{WAIT, next_connected, next_event};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// The example of `docs/protocol.md`: "hello" as a tutorial frame.
const HELLO: [u8; 9] = [0x05, 0x00, 0x00, 0x00, 0x68, 0x65, 0x6c, 0x6c, 0x6f];

/// Parses "05 00 00 00 68 ..." into bytes.
fn hex(s: &str) -> Vec<u8> {
    s.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).expect("hex byte"))
        .collect()
}

async fn connect(server: &Server) -> TcpStream {
    timeout(WAIT, TcpStream::connect(server.local_addr()))
        .await
        .expect("connect timed out")
        .expect("connect")
}

/// A tutorial-only server and one raw client connected to it, with the client's id.
async fn setup() -> (Server, ServerEvents, TcpStream, ClientId) {
    let (server, mut events) = support::start_tutorial_server().await;
    let stream = connect(&server).await;
    let id = next_connected(&mut events).await;
    (server, events, stream, id)
}

/// Closes the client first (as a tutorial client does), then shuts the server down; a
/// graceful shutdown otherwise waits up to the drain deadline for the client to close.
async fn finish(server: Server, stream: TcpStream) {
    drop(stream);
    timeout(WAIT, server.shutdown())
        .await
        .expect("shutdown timed out");
}

async fn write(stream: &mut TcpStream, bytes: &[u8]) {
    timeout(WAIT, async {
        stream.write_all(bytes).await?;
        stream.flush().await
    })
    .await
    .expect("write timed out")
    .expect("write");
}

async fn read_exactly(stream: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    timeout(WAIT, stream.read_exact(&mut buf))
        .await
        .expect("read timed out")
        .expect("read");
    buf
}

async fn expect_message(events: &mut ServerEvents, from: ClientId, payload: &[u8]) {
    match next_event(events).await {
        ServerEvent::Message { client, message } => {
            assert_eq!(client, from);
            // Untyped: the tutorial framing carries no kind.
            assert_eq!(message, Message::untyped(payload.to_vec()));
        }
        other => panic!("expected a message {payload:?}, got {other:?}"),
    }
}

/// Proves that nothing else was reported before `marker`: sends it, and checks it is the
/// very next event.
async fn expect_nothing_before_marker(
    events: &mut ServerEvents,
    stream: &mut TcpStream,
    from: ClientId,
) {
    write(stream, &hex("06 00 00 00 6d 61 72 6b 65 72")).await;
    expect_message(events, from, b"marker").await;
}

#[test]
fn doc_example_literal_is_the_tutorial_framing_of_hello() {
    assert_eq!(hex("05 00 00 00 68 65 6c 6c 6f"), HELLO);
    assert_eq!(support::frame(b"hello"), HELLO);
}

#[tokio::test]
async fn hand_written_hello_arrives_as_one_message() {
    let (server, mut events, mut stream, id) = setup().await;
    write(&mut stream, &hex("05 00 00 00 68 65 6c 6c 6f")).await;
    expect_message(&mut events, id, b"hello").await;
    expect_nothing_before_marker(&mut events, &mut stream, id).await;
    finish(server, stream).await;
}

#[tokio::test]
async fn server_send_puts_length_le_and_payload_on_the_wire() {
    let (server, _events, mut stream, id) = setup().await;

    server.send(id, "hello").await.unwrap();
    assert_eq!(read_exactly(&mut stream, 9).await, HELLO);

    // A length above 255 shows the byte order: 258 = 0x0102 -> 02 01 00 00.
    let payload: Vec<u8> = (0..258u32).map(|i| i as u8).collect();
    server.send(id, payload.clone()).await.unwrap();
    let got = read_exactly(&mut stream, 4 + 258).await;
    assert_eq!(got[..4], hex("02 01 00 00")[..]);
    assert_eq!(got[4..], payload[..]);

    // 70,000 = 0x011170 -> 70 11 01 00 (three significant bytes, larger than the copy
    // threshold, so the payload takes the no-copy path).
    let payload = vec![0x5au8; 70_000];
    server.send(id, payload.clone()).await.unwrap();
    let got = read_exactly(&mut stream, 4 + 70_000).await;
    assert_eq!(got[..4], hex("70 11 01 00")[..]);
    assert!(got[4..].iter().all(|&b| b == 0x5a));

    // Nothing more than what was sent: the next bytes are the next message.
    server.send(id, "x").await.unwrap();
    assert_eq!(read_exactly(&mut stream, 5).await, hex("01 00 00 00 78"));
    finish(server, stream).await;
}

#[tokio::test]
async fn zero_length_frames_both_ways() {
    let (server, mut events, mut stream, id) = setup().await;

    write(&mut stream, &hex("00 00 00 00")).await;
    expect_message(&mut events, id, b"").await;
    expect_nothing_before_marker(&mut events, &mut stream, id).await;

    server.send(id, bytes::Bytes::new()).await.unwrap();
    server.send(id, "ok").await.unwrap();
    assert_eq!(
        read_exactly(&mut stream, 4 + 6).await,
        hex("00 00 00 00 02 00 00 00 6f 6b")
    );
    finish(server, stream).await;
}

#[tokio::test]
async fn one_byte_per_write_still_arrives_as_one_message() {
    let (server, mut events, mut stream, id) = setup().await;
    // Without Nagle, each one-byte write goes out as its own segment.
    stream.set_nodelay(true).unwrap();
    for b in hex("05 00 00 00 68 65 6c 6c 6f") {
        write(&mut stream, &[b]).await;
    }
    expect_message(&mut events, id, b"hello").await;
    expect_nothing_before_marker(&mut events, &mut stream, id).await;
    finish(server, stream).await;
}

#[tokio::test]
async fn two_frames_in_one_write_arrive_as_two_messages_in_order() {
    let (server, mut events, mut stream, id) = setup().await;
    write(
        &mut stream,
        &hex("05 00 00 00 68 65 6c 6c 6f 05 00 00 00 77 6f 72 6c 64"),
    )
    .await;
    expect_message(&mut events, id, b"hello").await;
    expect_message(&mut events, id, b"world").await;
    expect_nothing_before_marker(&mut events, &mut stream, id).await;
    finish(server, stream).await;
}

// ---------------------------------------------------------------------------------------
// The default protocol mode (`Auto`) with raw tutorial clients
// ---------------------------------------------------------------------------------------

/// An `Auto` server (the default) whose `detect_timeout` is `detect`.
async fn start_auto_server(detect: Duration) -> (Server, ServerEvents) {
    let mut config = support::config();
    assert_eq!(config.protocol, ProtocolMode::Auto, "Auto is the default");
    config.detect_timeout = detect;
    support::start_server_with(config).await
}

#[tokio::test]
async fn auto_mode_classifies_a_raw_client_that_speaks_first_as_tutorial_at_once() {
    // Far longer than `WAIT`: if classification waited for the timeout instead of using
    // the first frame, the `Connected` event below would time out.
    let (server, mut events) = start_auto_server(Duration::from_secs(30)).await;
    let mut stream = connect(&server).await;
    write(&mut stream, &HELLO).await;

    let id = match next_event(&mut events).await {
        ServerEvent::Connected { client, addr } => {
            assert_eq!(addr, stream.local_addr().unwrap());
            client
        }
        other => panic!("expected Connected, got {other:?}"),
    };
    // The first frame, read to classify the connection, is delivered as a message.
    expect_message(&mut events, id, b"hello").await;
    let info = server.client(id).expect("registered");
    assert_eq!(info.protocol, Mode::Tutorial);
    assert_eq!(info.name, "");
    assert_eq!((info.messages_in, info.bytes_in), (1, 5));

    // Plain tutorial framing from then on, both ways: no welcome or typed frame is
    // written to it, the first bytes it reads are the message.
    write(&mut stream, &support::frame(b"again")).await;
    expect_message(&mut events, id, b"again").await;
    server.send(id, "hello").await.unwrap();
    assert_eq!(read_exactly(&mut stream, 9).await, HELLO);
    server.send(id, vec![1u8, 2, 3]).await.unwrap();
    assert_eq!(
        read_exactly(&mut stream, 7).await,
        hex("03 00 00 00 01 02 03")
    );
    expect_nothing_before_marker(&mut events, &mut stream, id).await;
    finish(server, stream).await;
}

#[tokio::test]
async fn auto_mode_classifies_a_silent_raw_client_as_tutorial_after_detect_timeout() {
    const DETECT: Duration = Duration::from_millis(100);
    let (server, mut events) = start_auto_server(DETECT).await;
    let started = std::time::Instant::now();
    let mut stream = connect(&server).await;

    // Reported only once classified, after the detect timeout, and nothing was written to
    // it meanwhile (checked below: the first bytes it reads are a message).
    let id = next_connected(&mut events).await;
    let waited = started.elapsed();
    assert!(waited >= DETECT, "reported connected after {waited:?}");
    let info = server.client(id).expect("registered");
    assert_eq!(info.protocol, Mode::Tutorial);
    assert_eq!(info.addr, stream.local_addr().unwrap());

    // It waits to be spoken to, as a tutorial client does: the first bytes it reads are
    // the tutorial frame of what the server sends.
    server.send(id, "hello").await.unwrap();
    assert_eq!(read_exactly(&mut stream, 9).await, HELLO);
    let payload: Vec<u8> = (0..258u32).map(|i| i as u8).collect();
    server.send(id, payload.clone()).await.unwrap();
    let got = read_exactly(&mut stream, 4 + 258).await;
    assert_eq!(got[..4], hex("02 01 00 00")[..]);
    assert_eq!(got[4..], payload[..]);

    // What it sends then is a plain message.
    write(&mut stream, &HELLO).await;
    expect_message(&mut events, id, b"hello").await;
    expect_nothing_before_marker(&mut events, &mut stream, id).await;
    finish(server, stream).await;
}

#[tokio::test]
async fn a_hello_after_the_detection_timeout_closes_the_connection() {
    // A sockframe client whose hello came too late was taken for a silent tutorial client;
    // delivering its hello as a message would make a phantom client. It is closed instead.
    const DETECT: Duration = Duration::from_millis(100);
    let mut config = support::config();
    config.detect_timeout = DETECT;
    let (server, mut events) = support::start_server_with(config).await;
    let mut stream = connect(&server).await;
    let id = next_connected(&mut events).await;
    let mut late_hello = sockframe::protocol::message::MAGIC.to_vec();
    late_hello.extend_from_slice(b"too late");
    write(&mut stream, &support::frame(&late_hello)).await;
    match next_event(&mut events).await {
        ServerEvent::Disconnected {
            client,
            reason: sockframe::DisconnectReason::Protocol(detail),
        } => {
            assert_eq!(client, id);
            assert!(detail.contains("detection timeout"), "{detail}");
        }
        other => panic!("expected the late hello to close the connection, got {other:?}"),
    }
    finish(server, stream).await;
}

#[tokio::test]
async fn auto_mode_reports_a_tutorial_client_whose_first_frame_breaks_the_framing() {
    // No hello is ever that broken, so the peer is a tutorial client and the application
    // hears of it like of any tutorial client's protocol error: connected, then
    // disconnected with the reason.
    let (server, mut events) = support::start_server().await;
    let mut raw = connect(&server).await;
    write(&mut raw, &[0xff, 0xff, 0xff, 0xff]).await;
    let id = next_connected(&mut events).await;
    match next_event(&mut events).await {
        ServerEvent::Disconnected {
            client,
            reason: sockframe::DisconnectReason::Protocol(detail),
        } => {
            assert_eq!(client, id);
            assert!(detail.contains("top bit"), "{detail}");
        }
        other => panic!("expected a protocol error, got {other:?}"),
    }
    finish(server, raw).await;
}

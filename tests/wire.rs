//! Pins the wire format against a live server, with bytes written and read by hand: a
//! 4-byte little-endian length, then the payload. Nothing here uses the library's encoder or
//! decoder on the client side.

mod support;

use sockframe::server::{ClientId, Server, ServerEvent, ServerEvents};
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

/// A server and one raw client connected to it, with the client's id.
async fn setup() -> (Server, ServerEvents, TcpStream, ClientId) {
    let (server, mut events) = support::start_server().await;
    let stream = timeout(WAIT, TcpStream::connect(server.local_addr()))
        .await
        .expect("connect timed out")
        .expect("connect");
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
        ServerEvent::Message { client, payload: p } => {
            assert_eq!(client, from);
            assert_eq!(&p[..], payload, "payload {:?}", String::from_utf8_lossy(&p));
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

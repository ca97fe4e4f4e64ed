//! Raw sockets speaking the protocols by hand, for tests that must send what no well-behaved
//! client sends (or many frames in one write).

use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use sockframe::codec::TutorialCodec;
use sockframe::protocol::message::{self as wire, Frame, Hello, Welcome};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_util::codec::Decoder;

use super::{WAIT, frame};

/// Connects a raw socket, failing the test after [`WAIT`].
pub async fn connect(server: SocketAddr) -> TcpStream {
    timeout(WAIT, TcpStream::connect(server))
        .await
        .expect("connect in time")
        .expect("connect")
}

/// Reads until the server closes the connection (end of stream or reset); returns what was
/// read. Fails the test if the connection stays open for [`WAIT`].
pub async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    timeout(WAIT, async {
        let mut all = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return all,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("the server closed the attacker's connection")
}

/// The sockframe frames in `bytes` (a tutorial frame each).
pub fn typed_frames(bytes: &[u8]) -> Vec<Frame> {
    let mut buf = BytesMut::from(bytes);
    let mut codec = TutorialCodec::new();
    let mut frames = Vec::new();
    while let Ok(Some(payload)) = codec.decode(&mut buf) {
        frames.push(wire::parse(&payload).expect("the server sends valid frames"));
    }
    frames
}

/// A sockframe handshake by hand: the hello, then the welcome.
pub async fn raw_handshake(server: SocketAddr, name: &str) -> (TcpStream, Welcome) {
    let mut stream = connect(server).await;
    let hello = wire::encode_hello(&Hello::new(name, Bytes::new()));
    stream.write_all(&frame(&hello)).await.unwrap();
    let mut header = [0u8; 4];
    timeout(WAIT, stream.read_exact(&mut header))
        .await
        .expect("the welcome in time")
        .expect("the welcome");
    let mut payload = vec![0; u32::from_le_bytes(header) as usize];
    stream.read_exact(&mut payload).await.unwrap();
    match wire::parse(&Bytes::from(payload)).unwrap() {
        Frame::Welcome(w) => (stream, w),
        other => panic!("expected a welcome, got {other:?}"),
    }
}

/// A sockframe frame inside a tutorial frame.
pub fn typed(f: &Frame) -> Vec<u8> {
    frame(&wire::encode(f))
}

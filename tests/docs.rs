//! Pins the examples in `docs/protocol.md` to the code: if the doc or the wire format changes
//! alone, this fails.

mod support;

use bytes::{Bytes, BytesMut};
use sockframe::Message;
use sockframe::codec::TutorialCodec;
use sockframe::server::ServerEvent;
use tokio::io::AsyncWriteExt;
use tokio_util::codec::Encoder;

/// Parses the first fenced line of the doc that starts with `prefix` as hex bytes.
fn doc_hex(prefix: &str) -> Vec<u8> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/protocol.md"))
        .expect("read docs/protocol.md");
    let line = doc
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("docs/protocol.md has no line starting with {prefix:?}"));
    line.split_whitespace()
        .map(|h| u8::from_str_radix(h, 16).expect("hex byte"))
        .collect()
}

#[test]
fn hello_example_matches_encoder() {
    let documented = doc_hex("05 00 00 00");
    let mut wire = BytesMut::new();
    TutorialCodec::new()
        .encode(Bytes::from_static(b"hello"), &mut wire)
        .unwrap();
    assert_eq!(&wire[..], &documented[..]);
    assert!(
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/protocol.md"))
            .unwrap()
            .contains("`00 00 00 00`"),
        "the zero-length example is documented"
    );
}

#[tokio::test]
async fn hello_example_is_understood_by_a_live_server() {
    // A tutorial-only server: the raw client below waits for `Connected` before sending.
    let (server, mut events) = support::start_tutorial_server().await;
    let mut raw = tokio::net::TcpStream::connect(server.local_addr())
        .await
        .unwrap();
    let id = support::next_connected(&mut events).await;
    raw.write_all(&doc_hex("05 00 00 00")).await.unwrap();
    raw.write_all(&[0, 0, 0, 0]).await.unwrap();
    assert_eq!(
        support::next_event(&mut events).await,
        ServerEvent::Message {
            client: id,
            message: Message::untyped(Bytes::from_static(b"hello"))
        }
    );
    assert_eq!(
        support::next_event(&mut events).await,
        ServerEvent::Message {
            client: id,
            message: Message::untyped(Bytes::new())
        }
    );
    drop(raw);
    server.shutdown().await;
}

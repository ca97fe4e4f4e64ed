//! Per-client message handlers (`Server::bind_with_handler`) over real loopback sockets:
//! messages handled in the connection's task, replies in order, state per client kept
//! across a session's connections, requests and notices still on the event stream, slow
//! consumers handled by the send policy.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use sockframe::client::{Backoff, Client, ClientConfig, ClientEvent};
use sockframe::codec::TutorialCodec;
use sockframe::protocol::message::{self as wire, Frame};
use sockframe::server::{ClientId, Server, ServerConfig, ServerEvent, ServerEvents};
use sockframe::{
    DisconnectReason, FullPolicy, Handler, Message, MessageKind, MessageRef, OutboxLimits,
};
use support::proxy::{FaultConfig, FaultProxy};
use support::raw::{raw_handshake, typed};
use support::{WAIT, config, frame, next_connected, next_event, next_message, tutorial_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_util::codec::Decoder;

/// A server whose handlers answer each message with `<client id>:<count>:<message>`.
async fn numbering_server(config: ServerConfig) -> (Server, ServerEvents) {
    Server::bind_with_handler(config, |client: ClientId, _addr| {
        let mut count = 0u64;
        move |message: Message| {
            count += 1;
            let text = String::from_utf8_lossy(message.payload()).into_owned();
            Some(Message::text(format!("{client}:{count}:{text}")))
        }
    })
    .await
    .expect("bind test server")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_answer_in_order_with_state_per_client() {
    const N: u64 = 2_000;
    let (server, mut events) = numbering_server(config()).await;
    let addr = server.local_addr().to_string();
    let mut a = Client::connect(ClientConfig::new(addr.clone()))
        .await
        .unwrap();
    let id_a = next_connected(&mut events).await;
    let mut b = Client::connect(ClientConfig::new(addr)).await.unwrap();
    let id_b = next_connected(&mut events).await;

    let (sa, sb) = (a.sender(), b.sender());
    let senders = tokio::spawn(async move {
        for i in 0..N {
            sa.send(format!("a{i}")).await.unwrap();
            sb.send(Message::binary(format!("b{i}").into_bytes()))
                .await
                .unwrap();
        }
    });
    for i in 0..N {
        let reply = next_message(&mut a).await;
        assert_eq!(
            reply.as_text(),
            Some(format!("{id_a}:{}:a{i}", i + 1).as_str())
        );
        let reply = next_message(&mut b).await;
        assert_eq!(
            reply.as_text(),
            Some(format!("{id_b}:{}:b{i}", i + 1).as_str())
        );
    }
    senders.await.unwrap();

    // Messages went to the handlers, not to the event stream.
    assert!(
        events.try_recv().is_none(),
        "no message events with handlers"
    );
    let info = server.client(id_a).expect("client a listed");
    assert_eq!(
        info.messages_in, N,
        "handled messages are counted as traffic"
    );
    a.close().await.unwrap();
    match next_event(&mut events).await {
        ServerEvent::Disconnected { client, .. } => assert_eq!(client, id_a),
        other => panic!("expected Disconnected, got {other:?}"),
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_see_kinds_and_tutorial_peers() {
    let kinds = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = kinds.clone();
    let (server, mut events) = Server::bind_with_handler(config(), move |_, _| {
        let seen = seen.clone();
        move |message: Message| {
            seen.lock().unwrap().push(message.kind());
            Some(message)
        }
    })
    .await
    .unwrap();

    // A sockframe client: text stays text, binary stays binary.
    let mut client = Client::connect(ClientConfig::new(server.local_addr().to_string()))
        .await
        .unwrap();
    next_connected(&mut events).await;
    client.send("text").await.unwrap();
    client.send(vec![0xff_u8, 0]).await.unwrap();
    let text = next_message(&mut client).await;
    assert_eq!(
        (text.kind(), text.as_text()),
        (MessageKind::Text, Some("text"))
    );
    let binary = next_message(&mut client).await;
    assert_eq!(
        (binary.kind(), binary.payload().as_ref()),
        (MessageKind::Binary, &[0xff_u8, 0][..])
    );

    // A tutorial peer on a raw socket, framed by hand.
    let mut raw = TcpStream::connect(server.local_addr()).await.unwrap();
    raw.write_all(&frame(b"hello")).await.unwrap();
    raw.write_all(&frame(b"world")).await.unwrap();
    let mut echoed = vec![0u8; 2 * (4 + 5)];
    timeout(WAIT, raw.read_exact(&mut echoed))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(echoed, [frame(b"hello"), frame(b"world")].concat());
    assert_eq!(
        *kinds.lock().unwrap(),
        [
            MessageKind::Text,
            MessageKind::Binary,
            MessageKind::Untyped,
            MessageKind::Untyped
        ]
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_still_come_through_the_event_stream() {
    let (server, mut events) = numbering_server(config()).await;
    let mut client = Client::connect(ClientConfig::new(server.local_addr().to_string()))
        .await
        .unwrap();
    let id = next_connected(&mut events).await;
    client.send("before").await.unwrap();
    let asking = client.sender();
    let request = tokio::spawn(async move { asking.request("question").await });
    match next_event(&mut events).await {
        ServerEvent::Request { client, request } => {
            assert_eq!(client, id);
            assert_eq!(request.message().as_text(), Some("question"));
            request.respond("answer").await.unwrap();
        }
        other => panic!("expected a request, got {other:?}"),
    }
    assert_eq!(request.await.unwrap().unwrap().as_text(), Some("answer"));
    client.send("after").await.unwrap();
    assert_eq!(
        next_message(&mut client).await.as_text(),
        Some(format!("{id}:1:before").as_str())
    );
    assert_eq!(
        next_message(&mut client).await.as_text(),
        Some(format!("{id}:2:after").as_str())
    );
    server.shutdown().await;
}

/// Says so when dropped.
struct DropFlag(Option<tokio::sync::oneshot::Sender<()>>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_lives_through_a_session_and_ends_with_its_client() {
    const ROUNDS: u64 = 4;
    const PER_ROUND: u64 = 300;
    let (flag, mut dropped) = tokio::sync::oneshot::channel();
    let flag = std::sync::Mutex::new(Some(flag));
    let made = Arc::new(AtomicU64::new(0));
    let makes = made.clone();
    let (server, mut events) = Server::bind_with_handler(config(), move |_, _| {
        makes.fetch_add(1, Ordering::SeqCst);
        let guard = DropFlag(flag.lock().unwrap().take());
        let mut count = 0u64;
        move |_message: Message| {
            let _ = &guard;
            count += 1;
            Some(Message::text(count.to_string()))
        }
    })
    .await
    .unwrap();
    let proxy = FaultProxy::start(server.local_addr(), FaultConfig::no_cuts()).await;
    let mut client = Client::connect(ClientConfig {
        reconnect: true,
        reconnect_backoff: Backoff {
            initial: Duration::from_millis(2),
            max: Duration::from_millis(50),
            deadline: Some(WAIT),
            ..Backoff::default()
        },
        ..ClientConfig::new(proxy.addr().to_string())
    })
    .await
    .unwrap();
    let id = next_connected(&mut events).await;

    let mut expected = 1u64;
    let mut resumed = 0;
    for round in 0..ROUNDS {
        for i in 0..PER_ROUND {
            client.send(format!("{round}.{i}")).await.unwrap();
        }
        // Every reply, in order, counted by the one handler of this client.
        while expected <= (round + 1) * PER_ROUND {
            match timeout(WAIT, client.recv()).await.expect("reply in time") {
                Some(ClientEvent::Message(m)) => {
                    assert_eq!(m.as_text(), Some(expected.to_string().as_str()));
                    expected += 1;
                }
                Some(ClientEvent::Resumed { .. }) => resumed += 1,
                Some(
                    ClientEvent::Disconnected { .. }
                    | ClientEvent::Reconnecting { .. }
                    | ClientEvent::Connected { .. },
                ) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        if round + 1 < ROUNDS {
            proxy.cut_all();
        }
    }
    assert_eq!(
        made.load(Ordering::SeqCst),
        1,
        "one handler for the session"
    );
    assert!(
        dropped.try_recv().is_err(),
        "handler alive while the client is"
    );
    // The client saw its session resumed after (at least) some of the cuts.
    assert!(resumed >= 1, "no resume seen");

    client.close().await.unwrap();
    timeout(WAIT, async {
        loop {
            if let ServerEvent::Disconnected { client, .. } = next_event(&mut events).await {
                assert_eq!(client, id);
                break;
            }
        }
    })
    .await
    .unwrap();
    timeout(WAIT, dropped)
        .await
        .expect("handler dropped once its client is gone")
        .unwrap();
    server.shutdown().await;
}

/// A tutorial server with a tiny outbox whose handlers echo.
async fn echo_server(policy: FullPolicy) -> (Server, ServerEvents) {
    let config = ServerConfig {
        outbox: OutboxLimits {
            messages: 2,
            bytes: 4 * 1024,
        },
        send_policy: policy,
        ..tutorial_config()
    };
    Server::bind_with_handler(config, |_, _| Some::<Message>)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_wait_for_room_and_lose_nothing() {
    const N: usize = 5_000;
    let (server, mut events) = echo_server(FullPolicy::Wait).await;
    let stream = TcpStream::connect(server.local_addr()).await.unwrap();
    next_connected(&mut events).await;
    let (mut rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        for i in 0..N {
            let payload = format!("{i:0>1000}");
            wr.write_all(&frame(payload.as_bytes())).await.unwrap();
        }
        wr
    });
    for i in 0..N {
        let mut header = [0u8; 4];
        timeout(WAIT, rd.read_exact(&mut header))
            .await
            .expect("echo in time")
            .unwrap();
        let mut body = vec![0u8; u32::from_le_bytes(header) as usize];
        rd.read_exact(&mut body).await.unwrap();
        assert_eq!(body, format!("{i:0>1000}").into_bytes(), "echo {i}");
    }
    drop(writer.await.unwrap());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_reads_is_a_slow_consumer_under_disconnect() {
    let (server, mut events) = echo_server(FullPolicy::Disconnect).await;
    let mut stream = TcpStream::connect(server.local_addr()).await.unwrap();
    let id = next_connected(&mut events).await;
    let payload = vec![b'x'; 64 * 1024];
    // Writes until the server disconnects: its echoes fill the socket buffers, then the
    // outbox. Bounded: far more than the buffers of loopback hold.
    let wrote = timeout(WAIT, async {
        for _ in 0..10_000 {
            if stream.write_all(&frame(&payload)).await.is_err() {
                return;
            }
        }
        panic!("the server never cut off a peer that does not read");
    });
    let event = timeout(WAIT, async {
        loop {
            if let ServerEvent::Disconnected { client, reason } = next_event(&mut events).await {
                return (client, reason);
            }
        }
    });
    let (wrote, event) = tokio::join!(wrote, event);
    wrote.expect("the writes ended in time");
    let (client, reason) = event.expect("a disconnect in time");
    assert_eq!(client, id);
    assert_eq!(reason, DisconnectReason::SlowConsumer);
    server.shutdown().await;
}

/// Many frames in one write: every message of a full read buffer is taken in one pass (the
/// fast path), by a handler or into the event stream, and must still arrive one by one and in
/// order, leave control frames to the connection, be counted (messages and bytes), and a bad
/// one must end that client with a protocol error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_in_one_write_reaches_the_handler_in_order_and_counted() {
    burst(Path::Owned).await;
}

/// [`a_burst_in_one_write_reaches_the_handler_in_order_and_counted`], with a handler that
/// borrows each message where it was read (`Handler::message_ref`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_in_one_write_is_lent_to_a_borrowing_handler_in_order_and_counted() {
    burst(Path::Borrowed).await;
}

/// [`a_burst_in_one_write_reaches_the_handler_in_order_and_counted`], through the event
/// stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_in_one_write_reaches_the_event_stream_in_order_and_counted() {
    burst(Path::Events).await;
}

/// How a burst reaches the application.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Path {
    /// A handler taking each message by value.
    Owned,
    /// A handler borrowing each message.
    Borrowed,
    /// The event stream.
    Events,
}

/// Logs every message it is lent and answers every hundredth, as the closure of
/// [`burst`] does for owned messages.
struct Borrowing {
    log: Arc<std::sync::Mutex<Vec<Message>>>,
}

impl Handler for Borrowing {
    fn message(&mut self, _: Message) -> Option<Message> {
        panic!("a borrowing handler is lent its messages");
    }

    fn borrows(&self) -> bool {
        true
    }

    fn message_ref(&mut self, message: MessageRef<'_>) -> Option<Message> {
        let mut log = self.log.lock().unwrap();
        log.push(message.to_message());
        (log.len() % 100 == 0).then(|| message.to_message())
    }
}

async fn burst(path: Path) {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let with_handler = path != Path::Events;
    let (server, mut events) = match path {
        Path::Owned => Server::bind_with_handler(config(), move |_, _| {
            let log = log.clone();
            move |message: Message| {
                log.lock().unwrap().push(message.clone());
                // Every hundredth message is answered: replies interleave with the burst.
                (log.lock().unwrap().len() % 100 == 0).then_some(message)
            }
        })
        .await
        .unwrap(),
        Path::Borrowed => {
            Server::bind_with_handler(config(), move |_, _| Borrowing { log: log.clone() })
                .await
                .unwrap()
        }
        Path::Events => Server::bind(config()).await.unwrap(),
    };
    let (mut raw, _) = raw_handshake(server.local_addr(), "burst").await;
    let id = next_connected(&mut events).await;

    // 2,000 messages, text and binary alternating in runs, with a ping in the middle.
    let mut burst = Vec::new();
    let mut expected = Vec::new();
    for n in 0..2_000u32 {
        let (kind, body) = if (n / 7) % 2 == 0 {
            (wire::Kind::Text, Bytes::from(format!("text {n}")))
        } else {
            (wire::Kind::Binary, Bytes::from(n.to_le_bytes().to_vec()))
        };
        burst.extend(typed(&Frame::Message {
            kind,
            body: body.clone(),
        }));
        expected.push((kind == wire::Kind::Text, body));
        if n == 1_000 {
            burst.extend(typed(&Frame::Ping(42)));
        }
    }
    let bytes: usize = expected.iter().map(|(_, b)| b.len()).sum();
    raw.write_all(&burst).await.unwrap();
    if !with_handler {
        let (taken, reason) = take_events(&mut events, 2_000).await;
        assert_eq!(reason, None);
        seen.lock().unwrap().extend(taken);
    }

    // The pong, and with a handler 20 replies, in some order with each other.
    let want_replies = if with_handler { 20 } else { 0 };
    let (mut replies, mut pongs) = (0, 0);
    let mut codec = TutorialCodec::new();
    let mut buf = BytesMut::new();
    timeout(WAIT, async {
        while replies < want_replies || pongs < 1 {
            match codec.decode(&mut buf).unwrap() {
                Some(payload) => match wire::parse(&payload).unwrap() {
                    Frame::Message { .. } => replies += 1,
                    Frame::Pong(42) => pongs += 1,
                    other => panic!("unexpected {other:?}"),
                },
                None => assert_ne!(raw.read_buf(&mut buf).await.unwrap(), 0, "closed early"),
            }
        }
    })
    .await
    .expect("replies and the pong in time");
    let got: Vec<(bool, Bytes)> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|m| (m.kind() == MessageKind::Text, m.payload().clone()))
        .collect();
    assert_eq!(got, expected);
    let info = server.clients().into_iter().find(|c| c.id == id).unwrap();
    assert_eq!((info.messages_in, info.bytes_in), (2_000, bytes as u64));

    // Text that is not UTF-8, behind a good message: the good one is taken, then the client
    // is refused with a protocol error.
    let mut bad = typed(&Frame::Message {
        kind: wire::Kind::Text,
        body: Bytes::from_static(b"last good"),
    });
    let mut invalid = wire::encode(&Frame::Message {
        kind: wire::Kind::Binary,
        body: Bytes::from_static(&[0xff, 0xfe]),
    })
    .to_vec();
    invalid[0] = wire::frame_type::TEXT;
    bad.extend(frame(&invalid));
    raw.write_all(&bad).await.unwrap();
    let (taken, reason) = take_events(&mut events, usize::MAX).await;
    seen.lock().unwrap().extend(taken);
    match reason.expect("a disconnect") {
        DisconnectReason::Protocol(d) => assert!(d.contains("UTF-8"), "{d}"),
        other => panic!("expected a protocol error, got {other:?}"),
    }
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.last().unwrap().as_text(), Some("last good"));
        assert_eq!(seen.len(), 2_001);
    }
    server.shutdown().await;
}

/// Messages from the event stream, until `until` of them or a disconnect (and its reason).
async fn take_events(
    events: &mut ServerEvents,
    until: usize,
) -> (Vec<Message>, Option<DisconnectReason>) {
    let mut taken = Vec::new();
    let mut reason = None;
    timeout(WAIT, async {
        while taken.len() < until && reason.is_none() {
            match events.recv().await.expect("events") {
                ServerEvent::Message { message, .. } => taken.push(message),
                ServerEvent::Disconnected { reason: r, .. } => reason = Some(r),
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await
    .expect("events in time");
    (taken, reason)
}

/// A tutorial peer's burst, lent to a borrowing handler: untyped, in order, counted; a
/// frame header over the limit behind the good frames ends the peer with a protocol error
/// once they are handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tutorial_burst_is_lent_untyped_then_a_bad_header_is_refused() {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let (server, mut events) = Server::bind_with_handler(
        ServerConfig {
            max_frame: 1024,
            ..tutorial_config()
        },
        move |_, _| Borrowing { log: log.clone() },
    )
    .await
    .unwrap();
    let mut raw = TcpStream::connect(server.local_addr()).await.unwrap();
    let id = next_connected(&mut events).await;
    let sent: Vec<Vec<u8>> = (0..1_000u32)
        .map(|n| format!("n{n}").into_bytes())
        .collect();
    let mut burst: Vec<u8> = sent.iter().flat_map(|p| frame(p)).collect();
    // 4 KiB announced, over the 1 KiB limit: refused before any of it is read.
    burst.extend_from_slice(&4096u32.to_le_bytes());
    raw.write_all(&burst).await.unwrap();

    let reason = loop {
        match next_event(&mut events).await {
            ServerEvent::Disconnected { client, reason } if client == id => break reason,
            _ => {}
        }
    };
    assert!(
        matches!(&reason, DisconnectReason::Protocol(d) if d.contains("4096")),
        "{reason:?}"
    );
    let seen: Vec<Message> = seen.lock().unwrap().clone();
    assert!(seen.iter().all(|m| m.kind() == MessageKind::Untyped));
    let got: Vec<&[u8]> = seen.iter().map(|m| m.payload().as_ref()).collect();
    let want: Vec<&[u8]> = sent.iter().map(|p| p.as_slice()).collect();
    assert_eq!(got, want);
    // And the peer's socket is closed.
    support::raw::read_until_closed(&mut raw).await;
    server.shutdown().await;
}

/// Messages lent to a borrowing handler count in a lossless session: the client's flush
/// (which waits for the server to acknowledge every message) finishes, with all of them
/// handled in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lent_messages_are_acknowledged_in_a_session() {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let (server, mut events) =
        Server::bind_with_handler(config(), move |_, _| Borrowing { log: log.clone() })
            .await
            .unwrap();
    let client = Client::connect(ClientConfig {
        reconnect: true,
        ..ClientConfig::new(server.local_addr().to_string())
    })
    .await
    .unwrap();
    next_connected(&mut events).await;
    for n in 0..3_000u32 {
        client.send(format!("s{n}")).await.unwrap();
    }
    timeout(WAIT, client.flush())
        .await
        .expect("flush in time")
        .unwrap();
    let seen: Vec<Message> = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3_000);
    assert!(seen.iter().enumerate().all(|(n, m)| *m == format!("s{n}")));
    client.close().await.unwrap();
    server.shutdown().await;
}

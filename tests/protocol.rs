//! Integration tests of the sockframe protocol over loopback (issue 3): tutorial and
//! sockframe peers on one server, text and binary kinds, request/response in both
//! directions, timeouts and cancellation, heartbeats, the idle timeout, token
//! authentication, handshake limits, unknown frame types, and close reasons.
//!
//! Where a test needs to misbehave (freeze, send garbage, never say hello) it uses a raw TCP
//! socket and builds frames by hand with `support::frame` and the pure encoders of
//! `sockframe::protocol::message`. Every wait is bounded by [`support::WAIT`]; ports are
//! picked by the OS.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::join_all;
use sockframe::client::{Backoff, Client, ClientConfig, ClientEvent};
use sockframe::protocol::message::{
    self as wire, Frame, Kind, RejectCode, Welcome, close_code, error_code,
};
use sockframe::server::{ClientId, ProtocolMode, ServerConfig, ServerEvent, ServerEvents};
use sockframe::{DisconnectReason, Error, Heartbeat, Message, MessageKind, Mode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

use support::raw::{raw_handshake, typed};
use support::{WAIT, frame, next_connected, next_event, next_message, start_server_with};

// Helpers ----------------------------------------------------------------------------------------

/// A heartbeat fast enough for tests: a silent peer is dead after 300 ms.
const FAST_HEARTBEAT: Heartbeat = Heartbeat {
    interval: Duration::from_millis(100),
    misses: 3,
};

/// Connects a [`Client`] (sockframe protocol unless `config` says otherwise), failing the
/// test after [`WAIT`].
async fn connect(config: ClientConfig) -> Client {
    timeout(WAIT, Client::connect(config))
        .await
        .expect("timed out connecting")
        .expect("connect")
}

/// The default client configuration for a server at `addr`.
fn client_config(addr: SocketAddr) -> ClientConfig {
    ClientConfig::new(addr.to_string())
}

/// Connects a [`Client`] and consumes its `Connected` event.
async fn connect_and_confirm(config: ClientConfig) -> Client {
    let mut client = connect(config).await;
    assert!(matches!(
        next_client_event(&mut client).await,
        ClientEvent::Connected { .. }
    ));
    client
}

/// The next client event, failing the test after [`WAIT`].
async fn next_client_event(client: &mut Client) -> ClientEvent {
    timeout(WAIT, client.recv())
        .await
        .expect("timed out waiting for a client event")
        .expect("client event stream ended")
}

/// The server's id for `client`, from its welcome.
fn id_of(client: &Client) -> ClientId {
    ClientId(
        client
            .server_assigned_id()
            .expect("a sockframe client knows its id after the welcome"),
    )
}

/// Waits for the next server event and checks that it is the `Connected` of `expected`:
/// proof that nothing else (in particular, nothing about refused connections) came first.
async fn expect_connected(events: &mut ServerEvents, expected: ClientId) {
    match next_event(events).await {
        ServerEvent::Connected { client, .. } => assert_eq!(
            client, expected,
            "the first event must be the marker client's Connected"
        ),
        other => panic!("expected the marker client's Connected, got {other:?}"),
    }
}

/// The next server event, which must be a request; returns it with its sender.
async fn next_request(events: &mut ServerEvents) -> (ClientId, sockframe::Request) {
    match next_event(events).await {
        ServerEvent::Request { client, request } => (client, request),
        other => panic!("expected a request, got {other:?}"),
    }
}

/// The next client event, which must be a request from the server.
async fn next_client_request(client: &mut Client) -> sockframe::Request {
    match next_client_event(client).await {
        ClientEvent::Request(request) => request,
        other => panic!("expected a request from the server, got {other:?}"),
    }
}

/// Reads one tutorial frame from a raw socket; `None` at end of stream (or a reset).
async fn read_raw_frame(stream: &mut TcpStream) -> Option<Vec<u8>> {
    timeout(WAIT, async {
        let mut header = [0u8; 4];
        if let Err(e) = stream.read_exact(&mut header).await {
            return match e.kind() {
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => None,
                _ => panic!("reading a frame header: {e}"),
            };
        }
        let mut payload = vec![0; u32::from_le_bytes(header) as usize];
        stream
            .read_exact(&mut payload)
            .await
            .expect("the frame's payload follows its header");
        Some(payload)
    })
    .await
    .expect("timed out reading a frame")
}

/// Reads one frame of the sockframe protocol from a raw socket.
async fn read_typed(stream: &mut TcpStream) -> Frame {
    let payload = read_raw_frame(stream)
        .await
        .expect("a frame, not the end of the stream");
    wire::parse(&Bytes::from(payload)).expect("a valid sockframe frame")
}

/// Reads sockframe frames until the peer closes the connection.
async fn read_typed_until_closed(stream: &mut TcpStream) -> Vec<Frame> {
    let mut frames = Vec::new();
    while let Some(payload) = read_raw_frame(stream).await {
        frames.push(wire::parse(&Bytes::from(payload)).expect("a valid sockframe frame"));
    }
    frames
}

/// Reads raw bytes until the peer closes the connection (end of stream or reset); fails the
/// test if it stays open for [`WAIT`].
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    timeout(WAIT, async {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => return all,
                Ok(n) => all.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return all,
                Err(e) => panic!("reading until closed: {e}"),
            }
        }
    })
    .await
    .expect("timed out: the peer did not close the connection")
}

// (1) Tutorial and sockframe peers on one server -------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tutorial_and_sockframe_clients_share_an_auto_server() {
    let (server, mut events) = start_server_with(support::config()).await;
    let addr = server.local_addr();

    // A tutorial client speaks first (as the tutorial's client does): plain frames.
    let mut raw = TcpStream::connect(addr).await.unwrap();
    raw.write_all(&frame(b"hello from raw")).await.unwrap();
    let raw_id = match next_event(&mut events).await {
        ServerEvent::Connected { client, addr } => {
            assert_eq!(addr, raw.local_addr().unwrap());
            client
        }
        other => panic!("expected Connected, got {other:?}"),
    };
    let from_raw = match next_event(&mut events).await {
        ServerEvent::Message { client, message } => {
            assert_eq!(client, raw_id);
            message
        }
        other => panic!("expected the raw client's message, got {other:?}"),
    };
    assert_eq!(from_raw.kind(), MessageKind::Untyped);
    assert_eq!(from_raw, Message::untyped("hello from raw"));

    // A sockframe client on the same port, while the tutorial one stays connected.
    let mut client = connect_and_confirm(client_config(addr)).await;
    let id = next_connected(&mut events).await;
    assert_eq!(id, id_of(&client));
    let protocols: Vec<_> = server
        .clients()
        .into_iter()
        .map(|c| (c.id, c.protocol))
        .collect();
    assert_eq!(
        protocols,
        vec![(raw_id, Mode::Tutorial), (id, Mode::Sockframe)]
    );

    // Text stays text, binary stays binary, even when the bytes happen to be UTF-8.
    client.send("x").await.unwrap();
    client
        .send(Bytes::from_static(b"bytes, not text"))
        .await
        .unwrap();
    client.send(vec![0u8, 0xff, 0x10]).await.unwrap();
    for (expected_kind, expected) in [
        (MessageKind::Text, Message::text("x")),
        (
            MessageKind::Binary,
            Message::binary(&b"bytes, not text"[..]),
        ),
        (MessageKind::Binary, Message::binary(vec![0u8, 0xff, 0x10])),
    ] {
        match next_event(&mut events).await {
            ServerEvent::Message { client, message } => {
                assert_eq!(client, id);
                assert_eq!(message.kind(), expected_kind);
                assert_eq!(message, expected);
            }
            other => panic!("expected {expected:?}, got {other:?}"),
        }
    }

    // The tutorial client gets plain tutorial frames: length and payload, no type byte.
    server.send(raw_id, "to raw").await.unwrap();
    server
        .send(raw_id, Bytes::from_static(&[0xff, 0x00]))
        .await
        .unwrap();
    let mut expected = frame(b"to raw");
    expected.extend_from_slice(&frame(&[0xff, 0x00]));
    let mut got = vec![0u8; expected.len()];
    timeout(WAIT, raw.read_exact(&mut got))
        .await
        .expect("timed out reading from the raw socket")
        .unwrap();
    assert_eq!(got, expected);

    // A tutorial message forwarded to the sockframe client arrives as text (it is UTF-8).
    server.send(id, from_raw).await.unwrap();
    let forwarded = next_message(&mut client).await;
    assert_eq!(forwarded.kind(), MessageKind::Text);
    assert_eq!(forwarded, Message::text("hello from raw"));
    // One that is not UTF-8 arrives as binary.
    raw.write_all(&frame(&[0xff, 0xfe])).await.unwrap();
    let bytes_from_raw = match next_event(&mut events).await {
        ServerEvent::Message { client, message } if client == raw_id => message,
        other => panic!("expected the raw client's message, got {other:?}"),
    };
    assert_eq!(bytes_from_raw, Message::untyped(vec![0xff, 0xfe]));
    assert_eq!(bytes_from_raw.as_text(), None);
    server.send(id, bytes_from_raw).await.unwrap();
    assert_eq!(
        next_message(&mut client).await,
        Message::binary(vec![0xff, 0xfe])
    );

    // One broadcast reaches both, each in its own framing.
    assert_eq!(server.broadcast("to everyone").await.unwrap(), 2);
    let mut got = vec![0u8; frame(b"to everyone").len()];
    timeout(WAIT, raw.read_exact(&mut got))
        .await
        .expect("timed out reading the broadcast")
        .unwrap();
    assert_eq!(got, frame(b"to everyone"));
    assert_eq!(
        next_message(&mut client).await,
        Message::text("to everyone")
    );

    // And the tutorial client keeps talking after all that.
    raw.write_all(&frame(b"still here")).await.unwrap();
    assert_eq!(
        next_event(&mut events).await,
        ServerEvent::Message {
            client: raw_id,
            message: Message::untyped("still here")
        }
    );

    timeout(WAIT, client.close()).await.unwrap().unwrap();
    drop(raw);
    timeout(WAIT, server.shutdown()).await.unwrap();
}

// (2) Request / response in both directions ------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_answered_in_both_directions() {
    let (server, mut events) = start_server_with(support::config()).await;
    let mut client = connect_and_confirm(client_config(server.local_addr())).await;
    let id = next_connected(&mut events).await;

    // Client → server, answered; the kinds survive both ways.
    let (answer, ()) = tokio::join!(client.request("2 + 2?"), async {
        let (from, request) = next_request(&mut events).await;
        assert_eq!(from, id);
        assert_eq!(request.message(), &Message::text("2 + 2?"));
        request.respond("4").await.unwrap();
    });
    assert_eq!(answer.unwrap(), Message::text("4"));

    let (answer, ()) = tokio::join!(client.request(vec![1u8, 2, 3]), async {
        let (_, request) = next_request(&mut events).await;
        assert_eq!(request.message(), &Message::binary(vec![1u8, 2, 3]));
        request.respond(vec![6u8]).await.unwrap();
    });
    assert_eq!(answer.unwrap(), Message::binary(vec![6u8]));

    // An error answer.
    let (answer, ()) = tokio::join!(client.request("divide by zero"), async {
        let (_, request) = next_request(&mut events).await;
        request
            .respond_error("cannot divide by zero")
            .await
            .unwrap();
    });
    match answer {
        Err(Error::Remote { code, text }) => {
            assert_eq!(code, error_code::APPLICATION);
            assert_eq!(code, 2);
            assert_eq!(text, "cannot divide by zero");
        }
        other => panic!("expected Error::Remote {{ code: 2, .. }}, got {other:?}"),
    }

    // A request the application drops unanswered: the requester hears `unhandled`.
    let (answer, ()) = tokio::join!(client.request("anyone?"), async {
        let (_, request) = next_request(&mut events).await;
        drop(request);
    });
    match answer {
        Err(Error::Remote { code, .. }) => {
            assert_eq!(code, error_code::UNHANDLED);
            assert_eq!(code, 1);
        }
        other => panic!("expected Error::Remote {{ code: 1, .. }}, got {other:?}"),
    }

    // Server → client: the same three outcomes.
    let (answer, ()) = tokio::join!(server.request(id, "your name?"), async {
        let request = next_client_request(&mut client).await;
        assert_eq!(request.message(), &Message::text("your name?"));
        request.respond("client one").await.unwrap();
    });
    assert_eq!(answer.unwrap(), Message::text("client one"));

    let (answer, ()) = tokio::join!(server.request(id, "secret?"), async {
        next_client_request(&mut client)
            .await
            .respond_error("not telling")
            .await
            .unwrap();
    });
    match answer {
        Err(Error::Remote { code: 2, text }) => assert_eq!(text, "not telling"),
        other => panic!("expected Error::Remote {{ code: 2, .. }}, got {other:?}"),
    }

    let (answer, ()) = tokio::join!(server.request(id, "ignored?"), async {
        drop(next_client_request(&mut client).await);
    });
    assert!(
        matches!(answer, Err(Error::Remote { code: 1, .. })),
        "expected Error::Remote {{ code: 1, .. }}, got {answer:?}"
    );

    // Messages still flow between requests, in both directions.
    client.send("plain").await.unwrap();
    assert_eq!(
        next_event(&mut events).await,
        ServerEvent::Message {
            client: id,
            message: Message::text("plain")
        }
    );
    server.send(id, "plain back").await.unwrap();
    assert_eq!(next_message(&mut client).await, Message::text("plain back"));

    timeout(WAIT, client.close()).await.unwrap().unwrap();
    timeout(WAIT, server.shutdown()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_requests_are_matched_to_their_answers() {
    const N: u64 = 1_000;
    let (server, mut events) = start_server_with(support::config()).await;
    let mut client = connect_and_confirm(client_config(server.local_addr())).await;
    let id = next_connected(&mut events).await;

    // The server collects every request before answering any (so all N are in flight at
    // once), then answers them in a shuffled order.
    let responder = tokio::spawn(async move {
        let mut held = Vec::with_capacity(N as usize);
        while held.len() < N as usize {
            let (from, request) = next_request(&mut events).await;
            assert_eq!(from, id);
            held.push(request);
        }
        fastrand::shuffle(&mut held);
        for request in held {
            let n: u64 = request.message().as_text().unwrap().parse().unwrap();
            request.respond(format!("{}", n * 3 + 1)).await.unwrap();
        }
        events
    });
    let sender = client.sender();
    let answers = timeout(
        WAIT,
        join_all((0..N).map(|i| {
            let sender = sender.clone();
            async move { (i, sender.request(i.to_string()).await) }
        })),
    )
    .await
    .expect("timed out waiting for the answers");
    for (i, answer) in answers {
        assert_eq!(
            answer.unwrap(),
            Message::text((i * 3 + 1).to_string()),
            "request {i}"
        );
    }
    let _events = timeout(WAIT, responder).await.unwrap().unwrap();

    // The other way: the server asks N questions at once; the client answers them in a
    // shuffled order.
    let answering = async {
        let mut held = Vec::with_capacity(N as usize);
        while held.len() < N as usize {
            held.push(next_client_request(&mut client).await);
        }
        fastrand::shuffle(&mut held);
        for request in held {
            let n: u64 = request.message().as_text().unwrap().parse().unwrap();
            request.respond(format!("{}", n * n)).await.unwrap();
        }
    };
    let asking = join_all((0..N).map(|i| {
        let server = server.clone();
        async move { (i, server.request(id, i.to_string()).await) }
    }));
    let (answers, ()) = timeout(WAIT, async { tokio::join!(asking, answering) })
        .await
        .expect("timed out waiting for the client's answers");
    for (i, answer) in answers {
        assert_eq!(
            answer.unwrap(),
            Message::text((i * i).to_string()),
            "request {i}"
        );
    }

    timeout(WAIT, client.close()).await.unwrap().unwrap();
    timeout(WAIT, server.shutdown()).await.unwrap();
}

// (3) Timeouts, cancellation, and peers without requests -----------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_and_cancellation_leave_the_connection_usable() {
    let limit = Duration::from_millis(200);
    let (server, mut events) = start_server_with(ServerConfig {
        request_timeout: limit,
        ..support::config()
    })
    .await;
    let mut client = connect_and_confirm(client_config(server.local_addr())).await;
    let id = next_connected(&mut events).await;
    let sender = client.sender();

    // The server receives the request but never answers it (it keeps it alive, so no
    // `unhandled` error goes back either).
    let (answer, unanswered) = tokio::join!(client.request_with_timeout("slow", limit), async {
        next_request(&mut events).await.1
    });
    match answer {
        Err(Error::Timeout(d)) => assert_eq!(d, limit),
        other => panic!("expected Error::Timeout, got {other:?}"),
    }
    let mut held = vec![unanswered];

    // Cancellation: the request reaches the server, then its future is dropped.
    let mut cancelled = Box::pin(sender.request("never mind"));
    let request = tokio::select! {
        answer = &mut cancelled => panic!("answered with nobody answering: {answer:?}"),
        (_, request) = next_request(&mut events) => request,
    };
    assert_eq!(request.message(), &Message::text("never mind"));
    drop(cancelled);
    held.push(request);

    // Late answers to both are ignored by the client.
    for request in held.drain(..) {
        request.respond("too late").await.unwrap();
    }

    // The connection still works: the next request gets its own answer, not a late one.
    let (answer, ()) = tokio::join!(client.request("still there?"), async {
        let (_, request) = next_request(&mut events).await;
        assert_eq!(request.message(), &Message::text("still there?"));
        request.respond("yes").await.unwrap();
    });
    assert_eq!(answer.unwrap(), Message::text("yes"));
    assert!(client.is_connected());

    // The server's requests are bounded by `ServerConfig::request_timeout`; the client's
    // late answer is ignored by the server just the same.
    let (answer, unanswered) = tokio::join!(server.request(id, "slow too"), async {
        next_client_request(&mut client).await
    });
    match answer {
        Err(Error::Timeout(d)) => assert_eq!(d, limit),
        other => panic!("expected Error::Timeout, got {other:?}"),
    }
    unanswered.respond("too late").await.unwrap();
    let (answer, ()) = tokio::join!(server.request(id, "and now?"), async {
        next_client_request(&mut client)
            .await
            .respond("here")
            .await
            .unwrap();
    });
    assert_eq!(answer.unwrap(), Message::text("here"));

    // A connection that ends before the answer fails the request at once, without waiting
    // for its timeout.
    let (answer, ()) = timeout(WAIT, async {
        tokio::join!(client.request_with_timeout("last words", WAIT * 3), async {
            let (_, request) = next_request(&mut events).await;
            assert!(server.disconnect(id));
            held.push(request);
        })
    })
    .await
    .expect("timed out: the request must fail when its connection ends");
    assert!(
        matches!(answer, Err(Error::Disconnected)),
        "expected Error::Disconnected, got {answer:?}"
    );
    drop(held);
    assert_eq!(
        next_client_event(&mut client).await,
        ClientEvent::Disconnected {
            reason: DisconnectReason::Kicked
        }
    );
    // Without reconnect, the client's event stream ends with the connection.
    assert_eq!(timeout(WAIT, client.recv()).await.unwrap(), None);
    timeout(WAIT, client.close()).await.unwrap().unwrap();
    timeout(WAIT, server.shutdown()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_tutorial_framing_are_not_supported() {
    let (server, mut events) = start_server_with(support::config()).await;
    let addr = server.local_addr();

    // The server cannot ask a tutorial client anything.
    let mut raw = TcpStream::connect(addr).await.unwrap();
    raw.write_all(&frame(b"hi")).await.unwrap();
    let raw_id = next_connected(&mut events).await;
    assert!(matches!(
        next_event(&mut events).await,
        ServerEvent::Message { client, .. } if client == raw_id
    ));
    match timeout(WAIT, server.request(raw_id, "question"))
        .await
        .unwrap()
    {
        Err(Error::NotSupported) => {}
        other => panic!("expected Error::NotSupported, got {other:?}"),
    }
    // Nothing was written to it: the next bytes it gets are a plain message.
    server.send(raw_id, "plain").await.unwrap();
    let mut got = vec![0u8; frame(b"plain").len()];
    timeout(WAIT, raw.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, frame(b"plain"));

    // Nor can a client speaking the tutorial framing ask the server.
    let tutorial = connect(ClientConfig {
        protocol: Mode::Tutorial,
        ..client_config(addr)
    })
    .await;
    match timeout(WAIT, tutorial.request("question")).await.unwrap() {
        Err(Error::NotSupported) => {}
        other => panic!("expected Error::NotSupported, got {other:?}"),
    }

    drop(tutorial);
    drop(raw);
    timeout(WAIT, server.shutdown()).await.unwrap();
}

// (4) Heartbeats: a frozen peer is declared dead on both sides -----------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_declares_a_frozen_client_dead() {
    let (server, mut events) = start_server_with(ServerConfig {
        heartbeat: Some(FAST_HEARTBEAT),
        ..support::config()
    })
    .await;
    let started = Instant::now();
    // Handshake by hand, then never read or answer a ping again.
    let (mut frozen, welcome) = raw_handshake(server.local_addr(), "frozen").await;
    assert_eq!(welcome.heartbeat_ms, 100);
    let id = next_connected(&mut events).await;
    assert_eq!(id.0, welcome.client_id);
    assert_eq!(server.client(id).unwrap().name, "frozen");

    assert_eq!(
        next_event(&mut events).await,
        ServerEvent::Disconnected {
            client: id,
            reason: DisconnectReason::HeartbeatTimeout
        }
    );
    let elapsed = started.elapsed();
    assert!(
        elapsed >= FAST_HEARTBEAT.interval * FAST_HEARTBEAT.misses,
        "declared dead after only {elapsed:?}"
    );

    // What the frozen peer would have read: pings (if any were due), then a CLOSE saying why.
    let frames = read_typed_until_closed(&mut frozen).await;
    let (last, pings) = frames.split_last().expect("at least the CLOSE frame");
    assert!(
        pings.iter().all(|f| matches!(f, Frame::Ping(_))),
        "{frames:?}"
    );
    match last {
        Frame::Close { code, .. } => assert_eq!(*code, close_code::HEARTBEAT_TIMEOUT),
        other => panic!("expected a CLOSE frame, got {other:?}"),
    }
    timeout(WAIT, server.shutdown()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_declares_a_silent_server_dead() {
    // A fake server: it answers the hello with a welcome, then never writes again. It keeps
    // reading, and hands back everything the client sent after the hello.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let hello = read_raw_frame(&mut stream).await.expect("a hello");
        let hello = wire::parse_hello(&hello).expect("a valid hello");
        assert_eq!(hello.name, "watchful");
        let welcome = Frame::Welcome(Welcome {
            version: wire::VERSION,
            client_id: 42,
            max_frame: 1 << 20,
            heartbeat_ms: 0,
            session: wire::SessionGrant::None,
        });
        stream.write_all(&typed(&welcome)).await.unwrap();
        read_typed_until_closed(&mut stream).await
    });

    let started = Instant::now();
    let mut client = connect_and_confirm(ClientConfig {
        heartbeat: Some(FAST_HEARTBEAT),
        name: "watchful".into(),
        ..client_config(addr)
    })
    .await;
    assert_eq!(client.server_assigned_id(), Some(42));
    assert_eq!(
        next_client_event(&mut client).await,
        ClientEvent::Disconnected {
            reason: DisconnectReason::HeartbeatTimeout
        }
    );
    let elapsed = started.elapsed();
    assert!(
        elapsed >= FAST_HEARTBEAT.interval * FAST_HEARTBEAT.misses,
        "declared dead after only {elapsed:?}"
    );
    // No reconnect configured: that was the end.
    assert_eq!(timeout(WAIT, client.recv()).await.unwrap(), None);

    let frames = timeout(WAIT, fake).await.unwrap().unwrap();
    let (last, pings) = frames.split_last().expect("at least the CLOSE frame");
    assert!(
        pings.iter().all(|f| matches!(f, Frame::Ping(_))),
        "{frames:?}"
    );
    match last {
        Frame::Close { code, .. } => assert_eq!(*code, close_code::HEARTBEAT_TIMEOUT),
        other => panic!("expected a CLOSE frame, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_application_is_not_mistaken_for_a_dead_peer() {
    // An event stream of one slot, full with the Connected event while the application is
    // busy: the connection must pause reading (backpressure), not declare the peer dead.
    let (server, mut events) = start_server_with(ServerConfig {
        heartbeat: Some(FAST_HEARTBEAT),
        event_capacity: 1,
        ..support::config()
    })
    .await;
    let client = connect_and_confirm(ClientConfig {
        heartbeat: Some(FAST_HEARTBEAT),
        ..client_config(server.local_addr())
    })
    .await;
    for i in 0..3 {
        client.send(format!("m{i}")).await.unwrap();
    }
    // The application is busy for more than three times the heartbeat's death threshold
    // and reads no events meanwhile. (The wait is the scenario, not a synchronisation.)
    tokio::time::sleep(FAST_HEARTBEAT.interval * FAST_HEARTBEAT.misses * 3).await;

    let id = next_connected(&mut events).await;
    for i in 0..3 {
        assert_eq!(
            next_event(&mut events).await,
            ServerEvent::Message {
                client: id,
                message: Message::text(format!("m{i}"))
            },
            "message {i} of a live peer must be delivered"
        );
    }
    // Still connected both ways.
    let (answer, ()) = tokio::join!(client.request("alive?"), async {
        next_request(&mut events)
            .await
            .1
            .respond("yes")
            .await
            .unwrap();
    });
    assert_eq!(answer.unwrap(), Message::text("yes"));
    assert!(client.is_connected());

    timeout(WAIT, client.close()).await.unwrap().unwrap();
    timeout(WAIT, server.shutdown()).await.unwrap();
}

// (5) Token authentication -----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_admit_only_clients_that_carry_one() {
    let (server, mut events) = start_server_with(ServerConfig {
        tokens: vec![Bytes::from("s3cret")],
        ..support::config()
    })
    .await;
    let addr = server.local_addr();

    // A backoff that would wait 5 s before a second attempt and allow a minute in all: a
    // prompt failure proves that a rejection is not retried.
    let patient = Backoff {
        initial: Duration::from_secs(5),
        max: Duration::from_secs(5),
        jitter: false,
        max_attempts: None,
        deadline: Some(Duration::from_secs(60)),
        ..Backoff::default()
    };
    for token in [Some(Bytes::from("wrong")), None, Some(Bytes::from("s3cre"))] {
        let started = Instant::now();
        let result = timeout(
            WAIT,
            Client::connect(ClientConfig {
                token: token.clone(),
                backoff: patient.clone(),
                ..client_config(addr)
            }),
        )
        .await
        .expect("a rejected connect must return, not retry");
        match result {
            Err(Error::Rejected {
                code: RejectCode::Unauthorized,
                ..
            }) => {}
            Err(other) => panic!("token {token:?}: expected Rejected(Unauthorized), got {other}"),
            Ok(_) => panic!("token {token:?}: connected without the right token"),
        }
        assert!(
            started.elapsed() < patient.initial,
            "token {token:?}: took {:?}, so it was retried",
            started.elapsed()
        );
    }

    // A tutorial client cannot carry a token: its first frame is taken as a bad hello, it
    // is told so, and disconnected; its message is delivered to no one.
    let mut raw = TcpStream::connect(addr).await.unwrap();
    raw.write_all(&frame(b"hello from the tutorial"))
        .await
        .unwrap();
    let frames = read_typed_until_closed(&mut raw).await;
    assert!(
        matches!(
            &frames[..],
            [Frame::Reject {
                code: RejectCode::BadHello,
                ..
            }]
        ),
        "{frames:?}"
    );

    // None of the refused connections produced an event: the first one is the Connected of
    // a client with the right token. Messages then flow both ways.
    let mut good = connect_and_confirm(ClientConfig {
        token: Some(Bytes::from("s3cret")),
        ..client_config(addr)
    })
    .await;
    let id = id_of(&good);
    expect_connected(&mut events, id).await;
    good.send("let me in").await.unwrap();
    assert_eq!(
        next_event(&mut events).await,
        ServerEvent::Message {
            client: id,
            message: Message::text("let me in")
        }
    );
    server.send(id, "welcome").await.unwrap();
    assert_eq!(next_message(&mut good).await, Message::text("welcome"));

    timeout(WAIT, good.close()).await.unwrap().unwrap();
    timeout(WAIT, server.shutdown()).await.unwrap();
}

// (6) Handshake limits and unknown frame types ---------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_says_hello_is_closed_after_the_handshake_timeout() {
    let handshake_timeout = Duration::from_millis(200);
    let (server, mut events) = start_server_with(ServerConfig {
        protocol: ProtocolMode::Sockframe,
        handshake_timeout,
        ..support::config()
    })
    .await;
    let started = Instant::now();
    let mut silent = TcpStream::connect(server.local_addr()).await.unwrap();
    let received = read_until_closed(&mut silent).await;
    assert!(
        received.is_empty(),
        "nothing is written to it: {received:?}"
    );
    assert!(
        started.elapsed() >= handshake_timeout,
        "closed after {:?}",
        started.elapsed()
    );

    // It never counted as connected: the next event is the marker's.
    let marker = connect_and_confirm(client_config(server.local_addr())).await;
    expect_connected(&mut events, id_of(&marker)).await;

    timeout(WAIT, marker.close()).await.unwrap().unwrap();
    timeout(WAIT, server.shutdown()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_hello_is_refused_from_its_header() {
    let (server, mut events) = start_server_with(ServerConfig {
        protocol: ProtocolMode::Sockframe,
        // Far beyond the test's waits: only the announced size can close it in time.
        handshake_timeout: WAIT * 3,
        ..support::config()
    })
    .await;
    let mut peer = TcpStream::connect(server.local_addr()).await.unwrap();
    // A header announcing 100,000 bytes; the payload is never sent.
    peer.write_all(&100_000u32.to_le_bytes()).await.unwrap();
    let received = read_until_closed(&mut peer).await;
    assert!(
        received.is_empty(),
        "nothing is written to it: {received:?}"
    );

    let marker = connect_and_confirm(client_config(server.local_addr())).await;
    expect_connected(&mut events, id_of(&marker)).await;

    timeout(WAIT, marker.close()).await.unwrap().unwrap();
    timeout(WAIT, server.shutdown()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_frame_types_follow_the_extension_rule() {
    // No pings, so that what the raw peer reads is exactly what the test provokes.
    let (server, mut events) = start_server_with(ServerConfig {
        heartbeat: None,
        ..support::config()
    })
    .await;
    let (mut peer, welcome) = raw_handshake(server.local_addr(), "extensions").await;
    assert_eq!(welcome.heartbeat_ms, 0);
    let id = next_connected(&mut events).await;
    assert_eq!(id.0, welcome.client_id);

    // An ignorable extension type (0x80 and up) is skipped; the connection keeps working.
    peer.write_all(&frame(&[0x90, 1, 2, 3])).await.unwrap();
    peer.write_all(&typed(&Frame::Message {
        kind: Kind::Text,
        body: Bytes::from_static(b"after the extension"),
    }))
    .await
    .unwrap();
    assert_eq!(
        next_event(&mut events).await,
        ServerEvent::Message {
            client: id,
            message: Message::text("after the extension")
        }
    );
    server.send(id, "still talking").await.unwrap();
    assert_eq!(
        read_typed(&mut peer).await,
        Frame::Message {
            kind: Kind::Text,
            body: Bytes::from_static(b"still talking")
        }
    );

    // An undefined type below 0x80 is a protocol error.
    peer.write_all(&frame(&[0x22])).await.unwrap();
    match next_event(&mut events).await {
        ServerEvent::Disconnected {
            client,
            reason: DisconnectReason::Protocol(detail),
        } => {
            assert_eq!(client, id);
            assert!(detail.contains("unknown frame type"), "{detail}");
        }
        other => panic!("expected Disconnected with a protocol error, got {other:?}"),
    }
    // The peer is told why before the connection closes.
    match &read_typed_until_closed(&mut peer).await[..] {
        [Frame::Close { code, text }] => {
            assert_eq!(*code, close_code::PROTOCOL_ERROR);
            assert!(text.contains("unknown frame type"), "{text}");
        }
        other => panic!("expected one CLOSE frame, got {other:?}"),
    }
    timeout(WAIT, server.shutdown()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_that_is_not_utf8_is_a_protocol_error() {
    let (server, mut events) = start_server_with(ServerConfig {
        heartbeat: None,
        ..support::config()
    })
    .await;
    let (mut peer, _) = raw_handshake(server.local_addr(), "").await;
    let id = next_connected(&mut events).await;
    // A TEXT frame whose body is not UTF-8.
    peer.write_all(&frame(&[0x10, b'o', b'k', 0xff]))
        .await
        .unwrap();
    match next_event(&mut events).await {
        ServerEvent::Disconnected {
            client,
            reason: DisconnectReason::Protocol(detail),
        } => {
            assert_eq!(client, id);
            assert!(detail.contains("UTF-8"), "{detail}");
        }
        other => panic!("expected Disconnected with a protocol error, got {other:?}"),
    }
    match &read_typed_until_closed(&mut peer).await[..] {
        [Frame::Close { code, .. }] => assert_eq!(*code, close_code::PROTOCOL_ERROR),
        other => panic!("expected one CLOSE frame, got {other:?}"),
    }
    timeout(WAIT, server.shutdown()).await.unwrap();
}

// (7) Idle timeout -------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tutorial_clients_are_disconnected() {
    let idle = Duration::from_millis(500);
    let (server, mut events) = start_server_with(ServerConfig {
        protocol: ProtocolMode::Tutorial,
        idle_timeout: Some(idle),
        ..support::config()
    })
    .await;
    let addr = server.local_addr();

    let started = Instant::now();
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let silent_id = next_connected(&mut events).await;
    let mut chatty = TcpStream::connect(addr).await.unwrap();
    let chatty_id = next_connected(&mut events).await;

    // The chatty client sends a message every fifth of the idle timeout, for longer than
    // the timeout: each message resets its idle clock. The silent one times out meanwhile.
    const ROUNDS: usize = 8;
    let mut silent_gone = None;
    for round in 0..ROUNDS {
        chatty
            .write_all(&frame(format!("round {round}").as_bytes()))
            .await
            .unwrap();
        loop {
            match next_event(&mut events).await {
                ServerEvent::Message { client, message } => {
                    assert_eq!(client, chatty_id);
                    assert_eq!(message, Message::untyped(format!("round {round}")));
                    break;
                }
                ServerEvent::Disconnected { client, reason } if client == silent_id => {
                    assert_eq!(reason, DisconnectReason::IdleTimeout);
                    silent_gone = Some(started.elapsed());
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        tokio::time::sleep(idle / 5).await;
    }
    let silent_gone = match silent_gone {
        Some(at) => at,
        None => {
            assert_eq!(
                next_event(&mut events).await,
                ServerEvent::Disconnected {
                    client: silent_id,
                    reason: DisconnectReason::IdleTimeout
                }
            );
            started.elapsed()
        }
    };
    assert!(silent_gone >= idle, "idle after only {silent_gone:?}");
    // A tutorial peer is just closed: no sockframe CLOSE frame reaches it.
    assert!(read_until_closed(&mut silent).await.is_empty());

    // Once the chatty client stops, it times out too.
    assert_eq!(
        next_event(&mut events).await,
        ServerEvent::Disconnected {
            client: chatty_id,
            reason: DisconnectReason::IdleTimeout
        }
    );
    assert!(read_until_closed(&mut chatty).await.is_empty());
    timeout(WAIT, server.shutdown()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_keep_a_quiet_connection_alive_but_not_idle() {
    // Both sides ping every 100 ms and give up after 400 ms of silence; the server's idle
    // timeout is two and a half times that. Pings and pongs keep the heartbeat satisfied for the whole
    // time, but they are not application messages: the idle timeout still ends it, and the
    // client is told so in the CLOSE frame.
    let heartbeat = Heartbeat {
        interval: Duration::from_millis(100),
        misses: 4,
    };
    let idle = Duration::from_millis(1000);
    let (server, mut events) = start_server_with(ServerConfig {
        heartbeat: Some(heartbeat),
        idle_timeout: Some(idle),
        ..support::config()
    })
    .await;
    let started = Instant::now();
    let mut client = connect_and_confirm(ClientConfig {
        heartbeat: Some(heartbeat),
        ..client_config(server.local_addr())
    })
    .await;
    let id = next_connected(&mut events).await;
    assert_eq!(
        next_event(&mut events).await,
        ServerEvent::Disconnected {
            client: id,
            reason: DisconnectReason::IdleTimeout
        }
    );
    assert_eq!(
        next_client_event(&mut client).await,
        ClientEvent::Disconnected {
            reason: DisconnectReason::IdleTimeout
        }
    );
    let elapsed = started.elapsed();
    assert!(elapsed >= idle, "idle after only {elapsed:?}");
    timeout(WAIT, server.shutdown()).await.unwrap();
}

// (8) Close reasons reach the client -------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_learns_why_the_server_closed() {
    let (server, mut events) = start_server_with(support::config()).await;
    let addr = server.local_addr();
    let mut kicked = connect_and_confirm(client_config(addr)).await;
    let kicked_id = next_connected(&mut events).await;
    let mut staying = connect_and_confirm(client_config(addr)).await;
    let staying_id = next_connected(&mut events).await;

    // A kick arrives as a CLOSE frame with code `kicked`.
    assert!(server.disconnect(kicked_id));
    assert_eq!(
        next_client_event(&mut kicked).await,
        ClientEvent::Disconnected {
            reason: DisconnectReason::Kicked
        }
    );
    assert_eq!(timeout(WAIT, kicked.recv()).await.unwrap(), None);
    assert_eq!(
        next_event(&mut events).await,
        ServerEvent::Disconnected {
            client: kicked_id,
            reason: DisconnectReason::Kicked
        }
    );

    // A graceful shutdown arrives as a CLOSE frame with code `shutdown`.
    timeout(WAIT, server.shutdown()).await.unwrap();
    assert_eq!(
        next_client_event(&mut staying).await,
        ClientEvent::Disconnected {
            reason: DisconnectReason::Shutdown
        }
    );
    assert_eq!(timeout(WAIT, staying.recv()).await.unwrap(), None);
    assert_eq!(
        next_event(&mut events).await,
        ServerEvent::Disconnected {
            client: staying_id,
            reason: DisconnectReason::Shutdown
        }
    );
    assert_eq!(timeout(WAIT, events.recv()).await.unwrap(), None);
}

// (9) Limits announced in the welcome ------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_over_the_servers_announced_maximum_fail_without_touching_the_connection() {
    // The client allows 16 MiB; the server's welcome says 1,024 bytes.
    let (server, mut events) = start_server_with(ServerConfig {
        max_frame: 1024,
        ..support::config()
    })
    .await;
    let mut client = connect_and_confirm(client_config(server.local_addr())).await;
    let id = next_connected(&mut events).await;

    match client.send(vec![0u8; 1025]).await {
        Err(Error::Frame(sockframe::protocol::FrameError::TooLarge {
            len: 1025,
            max: 1024,
        })) => {}
        other => panic!("expected Error::Frame(TooLarge), got {other:?}"),
    }
    assert!(matches!(
        client.request(vec![0u8; 4096]).await,
        Err(Error::Frame(_))
    ));

    // The largest body the server accepts goes through, and it is the first thing the
    // server receives; the connection is untouched.
    client.send(vec![1u8; 1024]).await.unwrap();
    assert_eq!(
        next_event(&mut events).await,
        ServerEvent::Message {
            client: id,
            message: Message::binary(vec![1u8; 1024])
        }
    );
    server.send(id, "still here").await.unwrap();
    assert_eq!(next_message(&mut client).await, Message::text("still here"));
    assert!(client.is_connected());

    timeout(WAIT, client.close()).await.unwrap().unwrap();
    timeout(WAIT, server.shutdown()).await.unwrap();
}

//! Protocol detection without a blind first second (issue 17): in `auto` mode a connection is
//! a client from its accept. Sends and broadcasts reach it while its protocol is detected;
//! they wait in its queue and are written, framed for its protocol, once that is known. It
//! is announced (`Connected`) only then, under the same id.
//!
//! Raw sockets over loopback, ports from :0, bounded waits. The servers keep the default
//! `detect_timeout` (1 s) where a test must show that it does not wait for it.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use sockframe::Message;
use sockframe::Mode;
use sockframe::protocol::message::{self as wire, Frame, Hello, SessionGrant, SessionRequest};
use sockframe::server::{ClientId, Server, ServerConfig, ServerEvent, ServerEvents};
use support::raw::{connect, read_until_closed};
use support::{WAIT, frame, next_connected, next_event};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// The default detection timeout, which these tests must not wait for.
const DETECT: Duration = Duration::from_secs(1);

/// Polls `cond` until it holds; for state that no event reports. Bounded by [`WAIT`].
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The id of the one client the server lists besides `known`, once it lists it.
async fn listed_besides(server: &Server, known: &[ClientId]) -> ClientId {
    let mut found = None;
    wait_until("the connection is registered", || {
        found = server
            .clients()
            .into_iter()
            .map(|c| c.id)
            .find(|id| !known.contains(id));
        found.is_some()
    })
    .await;
    found.unwrap()
}

/// One tutorial frame's payload, read within [`WAIT`].
async fn read_frame(stream: &mut TcpStream) -> Bytes {
    timeout(WAIT, async {
        let mut header = [0u8; 4];
        stream.read_exact(&mut header).await.unwrap();
        let mut payload = vec![0; u32::from_le_bytes(header) as usize];
        stream.read_exact(&mut payload).await.unwrap();
        Bytes::from(payload)
    })
    .await
    .expect("a frame in time")
}

/// The next sockframe application message's body, skipping control frames (acks).
async fn read_message(stream: &mut TcpStream) -> Bytes {
    loop {
        let payload = read_frame(stream).await;
        match wire::parse(&payload).expect("a valid frame") {
            Frame::Message { body, .. } => return body,
            Frame::Welcome(_) | Frame::Reject { .. } => panic!("unexpected handshake frame"),
            _ => continue,
        }
    }
}

/// A sockframe hello asking for `session`.
fn hello(name: &str, session: SessionRequest) -> Vec<u8> {
    let hello = Hello {
        session,
        ..Hello::new(name, Bytes::new())
    };
    frame(&wire::encode_hello(&hello))
}

/// Reads the welcome that answers a hello.
async fn read_welcome(stream: &mut TcpStream) -> wire::Welcome {
    let payload = read_frame(stream).await;
    match wire::parse(&payload).unwrap() {
        Frame::Welcome(w) => w,
        other => panic!("expected a welcome, got {other:?}"),
    }
}

/// Asserts that no event is pending, after a marker client (a tutorial client that speaks
/// first, so it is announced at once) has been announced: anything the server had to
/// report before it would have come first.
async fn expect_no_event_before_marker(server: &Server, events: &mut ServerEvents) {
    let mut marker = connect(server.local_addr()).await;
    marker.write_all(&frame(b"marker")).await.unwrap();
    match next_event(events).await {
        ServerEvent::Connected { addr, .. } => assert_eq!(addr, marker.local_addr().unwrap()),
        other => panic!("expected only the marker's Connected, got {other:?}"),
    }
}

/// Closes the test's sockets, then shuts the server down (which would otherwise wait up to
/// the drain deadline for open clients to close).
async fn finish(server: Server, streams: impl IntoIterator<Item = TcpStream>) {
    drop(streams.into_iter().collect::<Vec<_>>());
    timeout(WAIT, server.shutdown())
        .await
        .expect("shutdown in time");
}

#[tokio::test]
async fn a_broadcast_made_10ms_after_the_accept_reaches_a_silent_tutorial_client() {
    let (server, mut events) = support::start_server().await;
    assert_eq!(server.config().detect_timeout, DETECT);
    let started = Instant::now();
    let mut stream = connect(server.local_addr()).await;
    let id = listed_besides(&server, &[]).await;

    tokio::time::sleep(Duration::from_millis(10)).await;
    let reached = server.broadcast("hello").await.unwrap();
    let broadcast_at = started.elapsed();
    assert_eq!(reached, 1, "the broadcast is queued for the silent client");
    assert!(
        broadcast_at < DETECT,
        "broadcast {broadcast_at:?} after connecting: the test proves nothing"
    );

    // Written once it is classified, in the tutorial framing: the first bytes it reads.
    assert_eq!(read_frame(&mut stream).await, "hello".as_bytes());
    // Announced then, under the id it had from its accept.
    assert_eq!(next_connected(&mut events).await, id);
    let info = server.client(id).unwrap();
    assert_eq!(info.protocol, Mode::Tutorial);
    assert_eq!((info.messages_out, info.bytes_out), (1, 5));

    // And on from there as any tutorial client.
    stream.write_all(&frame(b"back")).await.unwrap();
    match next_event(&mut events).await {
        ServerEvent::Message { client, message } => {
            assert_eq!(client, id);
            assert_eq!(message.payload().as_ref(), b"back");
        }
        other => panic!("expected its message, got {other:?}"),
    }
    finish(server, [stream]).await;
}

#[tokio::test]
async fn a_send_right_after_the_accept_reaches_a_silent_tutorial_client() {
    let (server, mut events) = support::start_server().await;
    let started = Instant::now();
    let mut stream = connect(server.local_addr()).await;
    let id = listed_besides(&server, &[]).await;

    server.send(id, "first").await.unwrap();
    server.send(id, vec![1u8, 2, 3]).await.unwrap();
    let sent_at = started.elapsed();
    assert!(sent_at < DETECT, "sent {sent_at:?} after connecting");
    assert_eq!(server.client(id).unwrap().queued, 2, "held until detected");

    assert_eq!(read_frame(&mut stream).await, "first".as_bytes());
    assert_eq!(read_frame(&mut stream).await, [1u8, 2, 3].as_slice());
    assert_eq!(next_connected(&mut events).await, id);
    expect_no_event_before_marker(&server, &mut events).await;
    finish(server, [stream]).await;
}

#[tokio::test]
async fn a_sockframe_client_keeps_the_id_and_gets_what_was_held_after_its_welcome() {
    let (server, mut events) = support::start_server().await;
    let mut stream = connect(server.local_addr()).await;
    let id = listed_besides(&server, &[]).await;
    assert_eq!(server.broadcast("early").await.unwrap(), 1);
    server.send(id, "to you").await.unwrap();

    stream
        .write_all(&hello("late", SessionRequest::None))
        .await
        .unwrap();
    // The welcome first: nothing was written before the protocol was known.
    let welcome = read_welcome(&mut stream).await;
    assert_eq!(
        ClientId(welcome.client_id),
        id,
        "the id it was registered under"
    );
    assert_eq!(welcome.session, SessionGrant::None);
    // Then what was held, as sockframe messages, in order.
    assert_eq!(read_message(&mut stream).await, "early".as_bytes());
    assert_eq!(read_message(&mut stream).await, "to you".as_bytes());

    assert_eq!(next_connected(&mut events).await, id);
    let info = server.client(id).unwrap();
    assert_eq!(info.protocol, Mode::Sockframe);
    assert_eq!(info.name, "late");
    assert_eq!(server.client_count(), 1);

    // A sockframe client from then on: what it is sent comes as typed frames.
    server.send(id, "after").await.unwrap();
    assert_eq!(read_message(&mut stream).await, "after".as_bytes());
    expect_no_event_before_marker(&server, &mut events).await;
    finish(server, [stream]).await;
}

#[tokio::test]
async fn a_new_session_is_granted_under_the_id_from_the_accept() {
    let (server, mut events) = support::start_server().await;
    let mut stream = connect(server.local_addr()).await;
    let id = listed_besides(&server, &[]).await;
    server.send(id, "held").await.unwrap();
    stream
        .write_all(&hello("s", SessionRequest::New))
        .await
        .unwrap();
    let welcome = read_welcome(&mut stream).await;
    assert_eq!(ClientId(welcome.client_id), id);
    match welcome.session {
        SessionGrant::New(token) => assert_eq!(token.id, id.0),
        other => panic!("expected a new session, got {other:?}"),
    }
    assert_eq!(read_message(&mut stream).await, "held".as_bytes());
    assert_eq!(next_connected(&mut events).await, id);
    assert_eq!(
        server.client(id).unwrap().session,
        sockframe::server::SessionState::Connected
    );
    finish(server, [stream]).await;
}

#[tokio::test]
async fn a_resuming_connection_leaves_no_client_behind() {
    let (server, mut events) = support::start_server().await;
    // A session, whose connection then drops.
    let mut first = connect(server.local_addr()).await;
    first
        .write_all(&hello("r", SessionRequest::New))
        .await
        .unwrap();
    let welcome = read_welcome(&mut first).await;
    let id = ClientId(welcome.client_id);
    let SessionGrant::New(token) = welcome.session else {
        panic!("expected a session, got {:?}", welcome.session);
    };
    assert_eq!(next_connected(&mut events).await, id);
    drop(first);
    match next_event(&mut events).await {
        ServerEvent::Suspended { client, .. } => assert_eq!(client, id),
        other => panic!("expected Suspended, got {other:?}"),
    }

    // Its next connection is registered at accept under an id of its own, which a
    // broadcast reaches besides the parked session.
    let mut second = connect(server.local_addr()).await;
    let provisional = listed_besides(&server, &[id]).await;
    assert_ne!(provisional, id);
    assert_eq!(server.broadcast("meanwhile").await.unwrap(), 2);

    // The hello resumes the session: the provisional id ends, unannounced, and the
    // broadcast arrives once, from the session's own queue.
    second
        .write_all(&hello("r", SessionRequest::Resume { token, received: 0 }))
        .await
        .unwrap();
    let welcome = read_welcome(&mut second).await;
    assert_eq!(ClientId(welcome.client_id), id);
    assert!(matches!(welcome.session, SessionGrant::Resumed { .. }));
    match next_event(&mut events).await {
        ServerEvent::Resumed { client, .. } => assert_eq!(client, id),
        other => panic!("expected Resumed (and no other client), got {other:?}"),
    }
    assert_eq!(read_message(&mut second).await, "meanwhile".as_bytes());
    server.send(id, "after").await.unwrap();
    assert_eq!(
        read_message(&mut second).await,
        "after".as_bytes(),
        "the broadcast came once"
    );
    let ids: Vec<_> = server.clients().into_iter().map(|c| c.id).collect();
    assert_eq!(ids, [id], "the provisional registration is gone");
    assert!(matches!(
        server.send(provisional, "x").await,
        Err(sockframe::Error::UnknownClient(_))
    ));
    expect_no_event_before_marker(&server, &mut events).await;
    finish(server, [second]).await;
}

#[tokio::test]
async fn closing_or_kicking_a_connection_being_detected_reports_nothing() {
    let (server, mut events) = support::start_server().await;
    // A port scan: connected, then closed before a first byte.
    let scan = connect(server.local_addr()).await;
    listed_besides(&server, &[]).await;
    drop(scan);
    wait_until("the scan is unregistered", || server.client_count() == 0).await;

    // A kick while it is being detected closes it; it was never announced.
    let started = Instant::now();
    let mut stream = connect(server.local_addr()).await;
    let id = listed_besides(&server, &[]).await;
    assert!(server.disconnect(id));
    assert!(read_until_closed(&mut stream).await.is_empty());
    assert!(started.elapsed() < DETECT, "closed at once");
    wait_until("the kicked client is unregistered", || {
        server.client_count() == 0
    })
    .await;
    expect_no_event_before_marker(&server, &mut events).await;
    finish(server, []).await;
}

#[tokio::test]
async fn a_full_queue_while_detecting_skips_broadcasts_but_keeps_the_client() {
    let mut config: ServerConfig = support::config();
    config.outbox.messages = 2;
    // The default policy cuts a slow consumer; one being detected is not slow.
    assert_eq!(config.broadcast_policy, sockframe::FullPolicy::Disconnect);
    config.detect_timeout = Duration::from_millis(200);
    let (server, mut events) = support::start_server_with(config).await;
    let mut stream = connect(server.local_addr()).await;
    let id = listed_besides(&server, &[]).await;
    let reached: Vec<usize> = {
        let mut v = Vec::new();
        for i in 0..4 {
            v.push(server.broadcast(format!("b{i}")).await.unwrap());
        }
        v
    };
    assert_eq!(reached, [1, 1, 0, 0], "queued while there was room");
    assert_eq!(next_connected(&mut events).await, id);
    assert_eq!(read_frame(&mut stream).await, "b0".as_bytes());
    assert_eq!(read_frame(&mut stream).await, "b1".as_bytes());
    assert_eq!(server.broadcast(Message::text("live")).await.unwrap(), 1);
    assert_eq!(read_frame(&mut stream).await, "live".as_bytes());
    assert!(server.client(id).is_some(), "still connected");
    finish(server, [stream]).await;
}

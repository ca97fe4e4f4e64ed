//! Integration tests of the client: connecting with backoff, giving up, reconnecting, the
//! offline policies, graceful close, drop, frame limits, ordering and the backoff itself.
//!
//! Everything runs on loopback with OS-picked ports, and every wait is bounded by
//! [`support::WAIT`].

mod support;

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sockframe::client::{Backoff, Client, ClientConfig, ClientEvent, OfflinePolicy};
use sockframe::protocol::FrameError;
use sockframe::server::{Server, ServerConfig, ServerEvent, ServerEvents};
use sockframe::{DisconnectReason, Error, Message, Mode};
use tokio::time::timeout;

use support::{WAIT, next_connected, next_event, next_message, start_server, wait_for};

/// A loopback port held for one test: bound, so that no other socket (in this process or
/// another test process) is given it, but not listening, so that connections to it are
/// refused. A server can still bind it while it is held, because both sockets allow address
/// reuse; drop the reservation once the server is up.
///
/// (Binding port 0 and closing the listener again would leave the port free for any server
/// in a concurrently running test to pick, and a client meant to find nothing there would
/// connect to that server instead.)
struct ReservedPort {
    addr: SocketAddr,
    _socket: tokio::net::TcpSocket,
}

fn reserve_port() -> ReservedPort {
    let socket = tokio::net::TcpSocket::new_v4().expect("create a probe socket");
    socket.set_reuseaddr(true).expect("allow address reuse");
    socket
        .bind("127.0.0.1:0".parse().unwrap())
        .expect("bind the probe socket");
    ReservedPort {
        addr: socket.local_addr().expect("probe socket address"),
        _socket: socket,
    }
}

/// Quick retries without jitter, so tests do not wait for the default 100 ms – 5 s spacing.
fn fast_backoff() -> Backoff {
    Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(50),
        jitter: false,
        deadline: Some(WAIT),
        ..Backoff::default()
    }
}

/// A client config for `addr` with [`fast_backoff`] for connecting and reconnecting.
fn client_config(addr: SocketAddr) -> ClientConfig {
    ClientConfig {
        backoff: fast_backoff(),
        reconnect_backoff: fast_backoff(),
        ..ClientConfig::new(addr.to_string())
    }
}

/// Connects, failing the test after [`WAIT`].
async fn connect(config: ClientConfig) -> Client {
    timeout(WAIT, Client::connect(config))
        .await
        .expect("timed out connecting")
        .expect("connect")
}

/// The next client event (connection notices included), failing the test after [`WAIT`].
async fn next_client_event(client: &mut Client) -> ClientEvent {
    timeout(WAIT, client.recv())
        .await
        .expect("timed out waiting for a client event")
        .expect("client event stream ended")
}

/// A server bound to exactly `addr` (a port used before, or held by [`reserve_port`]).
async fn start_server_on(addr: SocketAddr) -> (Server, ServerEvents) {
    Server::bind(ServerConfig::new(addr))
        .await
        .expect("bind server on the given address")
}

/// The next server event that is a message, returning it; fails on a disconnect.
async fn next_server_message(events: &mut ServerEvents) -> Message {
    match wait_for(events, |e| !matches!(e, ServerEvent::Connected { .. })).await {
        ServerEvent::Message { message, .. } => message,
        other => panic!("expected a message, got {other:?}"),
    }
}

/// Shuts `server` down and checks that the client sees the connection end and starts
/// reconnecting. Returns once the client has announced its first reconnect attempt.
async fn shut_down_and_expect_reconnecting(server: &Server, client: &mut Client) {
    timeout(WAIT, server.shutdown())
        .await
        .expect("timed out shutting the server down");
    // The sockframe protocol says why the server closed: a graceful shutdown arrives as a
    // `CLOSE` frame with code `shutdown`. (Over the tutorial framing, which has no such
    // frame, the same shutdown looks like the peer closing its side between frames.)
    assert_eq!(
        next_client_event(client).await,
        ClientEvent::Disconnected {
            reason: DisconnectReason::Shutdown
        }
    );
    assert!(!client.is_connected());
    match next_client_event(client).await {
        ClientEvent::Reconnecting { attempt: 1, delay } => {
            assert!(
                delay <= fast_backoff().max,
                "delay {delay:?} above the maximum"
            );
        }
        other => panic!("expected Reconnecting {{ attempt: 1, .. }}, got {other:?}"),
    }
}

/// Waits for the client to announce reconnect attempt `attempt` (proving the earlier ones
/// failed), skipping earlier announcements.
async fn wait_for_reconnect_attempt(client: &mut Client, attempt: u32) {
    timeout(WAIT, async {
        loop {
            match client.recv().await.expect("client event stream ended") {
                ClientEvent::Reconnecting { attempt: a, .. } if a >= attempt => return,
                ClientEvent::Reconnecting { .. } => continue,
                other => panic!("expected Reconnecting, got {other:?}"),
            }
        }
    })
    .await
    .expect("timed out waiting for a reconnect attempt");
}

// (1) ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_retries_until_the_server_starts() {
    let reserved = reserve_port();
    let addr = reserved.addr;
    let connecting = tokio::spawn(Client::connect(client_config(addr)));

    // Let the client fail a few attempts (20–50 ms apart) against the closed port.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !connecting.is_finished(),
        "connect must keep retrying (neither succeed nor give up) while no server listens"
    );

    let (server, mut events) = start_server_on(addr).await;
    drop(reserved);
    let mut client = timeout(WAIT, connecting)
        .await
        .expect("timed out waiting for the retrying connect")
        .expect("connect task panicked")
        .expect("connect once the server is up");
    assert_eq!(
        next_client_event(&mut client).await,
        ClientEvent::Connected { addr }
    );
    let id = next_connected(&mut events).await;

    client.send("ping").await.unwrap();
    assert_eq!(
        next_event(&mut events).await,
        ServerEvent::Message {
            client: id,
            message: Message::text("ping")
        }
    );
    server.send(id, "pong").await.unwrap();
    assert_eq!(next_message(&mut client).await, "pong");

    timeout(WAIT, client.close()).await.unwrap().unwrap();
    server.shutdown().await;
}

// (2) ---------------------------------------------------------------------------------------

#[tokio::test]
async fn connect_gives_up_after_max_attempts() {
    let reserved = reserve_port();
    let addr = reserved.addr;
    let config = ClientConfig {
        backoff: Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(20),
            max_attempts: Some(3),
            deadline: None,
            ..Backoff::default()
        },
        ..ClientConfig::new(addr.to_string())
    };
    let err = timeout(WAIT, Client::connect(config))
        .await
        .expect("timed out: max_attempts must end connecting")
        .expect_err("nothing listens on the port");
    let text = err.to_string();
    match &err {
        Error::Connect {
            addr: a,
            attempts,
            source,
        } => {
            assert_eq!(*attempts, 3);
            assert_eq!(a, &addr.to_string());
            assert_eq!(source.kind(), io::ErrorKind::ConnectionRefused);
        }
        other => panic!("expected Error::Connect, got {other:?}"),
    }
    assert!(text.contains("cannot connect to"), "{text}");
    assert!(text.contains(&addr.to_string()), "{text}");
    assert!(text.contains("connection refused"), "{text}");
}

#[tokio::test]
async fn connect_gives_up_at_the_deadline() {
    let reserved = reserve_port();
    let addr = reserved.addr;
    let deadline = Duration::from_millis(300);
    let config = ClientConfig {
        backoff: Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(100),
            max_attempts: None,
            deadline: Some(deadline),
            ..Backoff::default()
        },
        ..ClientConfig::new(addr.to_string())
    };
    let start = Instant::now();
    let err = timeout(WAIT, Client::connect(config))
        .await
        .expect("timed out: the backoff deadline must end connecting")
        .expect_err("nothing listens on the port");
    let elapsed = start.elapsed();
    assert!(
        elapsed < Duration::from_secs(3),
        "gave up only after {elapsed:?}"
    );
    assert!(
        elapsed >= deadline,
        "gave up before the deadline: {elapsed:?}"
    );
    match err {
        Error::Connect { attempts, .. } => {
            assert!(attempts >= 2, "retried only {attempts} time(s)")
        }
        other => panic!("expected Error::Connect, got {other:?}"),
    }
}

// (3) ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_to_a_restarted_server_on_the_same_port() {
    // Held for the whole test: while the server is down, no other test's server can take
    // the port and receive this client's reconnects.
    let reserved = reserve_port();
    let addr = reserved.addr;
    let (server, mut events) = start_server_on(addr).await;
    let mut client = connect(ClientConfig {
        reconnect: true,
        ..client_config(addr)
    })
    .await;
    assert_eq!(
        next_client_event(&mut client).await,
        ClientEvent::Connected { addr }
    );
    let old_id = next_connected(&mut events).await;
    client.send("before").await.unwrap();
    assert_eq!(next_server_message(&mut events).await, "before");

    shut_down_and_expect_reconnecting(&server, &mut client).await;
    // The old server reported the shutdown from its side, then its event stream ended.
    assert_eq!(
        next_event(&mut events).await,
        ServerEvent::Disconnected {
            client: old_id,
            reason: DisconnectReason::Shutdown
        }
    );
    assert_eq!(timeout(WAIT, events.recv()).await.unwrap(), None);
    // A second announced attempt proves the first one failed while no server listened.
    wait_for_reconnect_attempt(&mut client, 2).await;

    let (server, mut events) = start_server_on(addr).await;
    timeout(WAIT, async {
        loop {
            match client.recv().await.expect("client event stream ended") {
                ClientEvent::Reconnecting { .. } => continue,
                ClientEvent::Connected { addr: a } => return assert_eq!(a, addr),
                other => panic!("expected Connected, got {other:?}"),
            }
        }
    })
    .await
    .expect("timed out waiting for the reconnect");
    let id = next_connected(&mut events).await;

    client.send("after").await.unwrap();
    assert_eq!(
        next_event(&mut events).await,
        ServerEvent::Message {
            client: id,
            message: Message::text("after")
        }
    );
    server.send(id, "welcome back").await.unwrap();
    assert_eq!(next_message(&mut client).await, "welcome back");

    timeout(WAIT, client.close()).await.unwrap().unwrap();
    server.shutdown().await;
}

// (4) ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_queue_delivers_after_reconnect_in_order() {
    const N: usize = 200;
    // Held for the whole test: while the server is down, no other test's server can take
    // the port and receive this client's reconnects.
    let reserved = reserve_port();
    let addr = reserved.addr;
    let (server, mut events) = start_server_on(addr).await;
    let mut client = connect(ClientConfig {
        reconnect: true,
        offline: OfflinePolicy::Queue,
        ..client_config(addr)
    })
    .await;
    assert_eq!(
        next_client_event(&mut client).await,
        ClientEvent::Connected { addr }
    );
    next_connected(&mut events).await;
    shut_down_and_expect_reconnecting(&server, &mut client).await;

    // Queued while no connection exists; a sender clone queues into the same outbox.
    let sender = client.sender();
    for i in 0..N {
        let msg = format!("offline {i}");
        if i % 2 == 0 {
            client.send(msg).await.unwrap();
        } else {
            sender.send(msg).await.unwrap();
        }
    }
    assert!(!client.is_connected());

    let (server, mut events) = start_server_on(addr).await;
    let id = next_connected(&mut events).await;
    for i in 0..N {
        assert_eq!(
            next_event(&mut events).await,
            ServerEvent::Message {
                client: id,
                message: Message::text(format!("offline {i}"))
            }
        );
    }

    timeout(WAIT, client.close()).await.unwrap().unwrap();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_fail_refuses_sends_while_disconnected() {
    // Held for the whole test: while the server is down, no other test's server can take
    // the port and receive this client's reconnects.
    let reserved = reserve_port();
    let addr = reserved.addr;
    let (server, mut events) = start_server_on(addr).await;
    let mut client = connect(ClientConfig {
        reconnect: true,
        offline: OfflinePolicy::Fail,
        ..client_config(addr)
    })
    .await;
    assert_eq!(
        next_client_event(&mut client).await,
        ClientEvent::Connected { addr }
    );
    next_connected(&mut events).await;
    client.send("online").await.unwrap();
    assert_eq!(next_server_message(&mut events).await, "online");

    shut_down_and_expect_reconnecting(&server, &mut client).await;
    assert!(matches!(
        client.send("while away").await,
        Err(Error::NotConnected)
    ));
    assert!(matches!(
        client.sender().send("while away").await,
        Err(Error::NotConnected)
    ));

    // Sending right after the reconnect is covered by `connected_event_means_sends_work`.
    timeout(WAIT, client.close()).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn connected_event_means_sends_work() {
    // After a `Connected` event the client must count as connected: `is_connected()` is true
    // and, under `OfflinePolicy::Fail`, a send succeeds. Checked over many reconnects, because
    // a wrong order in the client's task shows up as a race between the two.
    const ROUNDS: usize = 200;
    let (server, mut events) = start_server().await;
    let mut client = connect(ClientConfig {
        reconnect: true,
        offline: OfflinePolicy::Fail,
        reconnect_backoff: Backoff {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(1),
            ..fast_backoff()
        },
        ..ClientConfig::new(server.local_addr().to_string())
    })
    .await;
    assert!(matches!(
        next_client_event(&mut client).await,
        ClientEvent::Connected { .. }
    ));
    let mut id = next_connected(&mut events).await;
    let mut refused = 0;
    for round in 0..ROUNDS {
        assert!(server.disconnect(id));
        timeout(WAIT, async {
            loop {
                match client.recv().await.expect("client event stream ended") {
                    ClientEvent::Connected { .. } => return,
                    ClientEvent::Message(m) => panic!("unexpected message {m:?}"),
                    _ => continue,
                }
            }
        })
        .await
        .expect("timed out waiting for the reconnect");
        let connected = client.is_connected();
        let sent = client.send(format!("round {round}")).await;
        if !connected || sent.is_err() {
            refused += 1;
        }
        // The id of the connection just made (skipping the old one's message and Disconnected).
        id = match wait_for(&mut events, |e| matches!(e, ServerEvent::Connected { .. })).await {
            ServerEvent::Connected { client, .. } => client,
            _ => unreachable!(),
        };
    }
    assert_eq!(
        refused, 0,
        "{refused} of {ROUNDS} reconnects: not connected right after the Connected event"
    );
    timeout(WAIT, client.close()).await.unwrap().unwrap();
    server.shutdown().await;
}

// (5) ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_delivers_everything_queued() {
    const N: usize = 10_000;
    let (server, mut events) = start_server().await;
    let client = connect(client_config(server.local_addr())).await;
    let id = next_connected(&mut events).await;

    // Read the server's events concurrently: a server whose event stream is full stops
    // reading, and the close could not deliver.
    let collector = tokio::spawn(async move {
        let mut received = Vec::with_capacity(N);
        loop {
            match next_event(&mut events).await {
                ServerEvent::Message { client, message } => {
                    assert_eq!(client, id);
                    received.push(message);
                }
                ServerEvent::Disconnected { client, reason } => {
                    assert_eq!(client, id);
                    return (received, reason);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    });

    let sender = client.sender();
    timeout(WAIT, async {
        for i in 0..N {
            client.send(i.to_string()).await.unwrap();
        }
    })
    .await
    .expect("timed out queueing");
    timeout(WAIT, client.close())
        .await
        .expect("timed out closing")
        .expect("close delivers everything");

    assert!(matches!(sender.send("late").await, Err(Error::Closed)));

    let (received, reason) = timeout(WAIT, collector).await.unwrap().unwrap();
    assert_eq!(reason, DisconnectReason::ClosedByPeer);
    assert_eq!(received.len(), N);
    for (i, message) in received.iter().enumerate() {
        assert_eq!(message, &Message::text(i.to_string()), "message {i}");
    }
    server.shutdown().await;
}

// (6) ---------------------------------------------------------------------------------------

#[tokio::test]
async fn dropping_the_client_closes_the_connection() {
    let (server, mut events) = start_server().await;
    let client = connect(client_config(server.local_addr())).await;
    let id = next_connected(&mut events).await;
    assert_eq!(server.client_count(), 1);

    drop(client);
    assert_eq!(
        next_event(&mut events).await,
        ServerEvent::Disconnected {
            client: id,
            reason: DisconnectReason::ClosedByPeer
        }
    );
    assert_eq!(server.client_count(), 0);
    server.shutdown().await;
}

// (7) ---------------------------------------------------------------------------------------

#[tokio::test]
async fn oversized_send_fails_without_touching_the_connection() {
    let (server, mut events) = start_server().await;
    let mut client = connect(ClientConfig {
        max_frame: 1024,
        ..client_config(server.local_addr())
    })
    .await;
    let id = next_connected(&mut events).await;

    match client.send(vec![7u8; 1025]).await {
        Err(Error::Frame(FrameError::TooLarge {
            len: 1025,
            max: 1024,
        })) => {}
        other => panic!("expected Error::Frame(TooLarge), got {other:?}"),
    }
    assert!(matches!(
        client.sender().send(vec![7u8; 4096]).await,
        Err(Error::Frame(_))
    ));
    assert!(client.is_connected());

    // The largest legal payload still goes through, and it is the first thing the server
    // receives: the refused ones never reached the wire.
    client.send(vec![1u8; 1024]).await.unwrap();
    assert_eq!(
        next_event(&mut events).await,
        ServerEvent::Message {
            client: id,
            message: Message::binary(vec![1u8; 1024])
        }
    );
    server.send(id, "still here").await.unwrap();
    assert_eq!(next_message(&mut client).await, "still here");

    timeout(WAIT, client.close()).await.unwrap().unwrap();
    server.shutdown().await;
}

/// The server sends a payload of exactly the client's maximum, then `oversized`: the first
/// arrives, the second ends the connection with a protocol error whose text mentions each of
/// `detail_mentions`.
async fn oversized_frame_from_the_server(
    protocol: Mode,
    oversized: &str,
    detail_mentions: &[&str],
) {
    let server_config = match protocol {
        Mode::Tutorial => support::tutorial_config(),
        Mode::Sockframe => support::config(),
    };
    let (server, mut events) = support::start_server_with(ServerConfig {
        max_frame: 1024 * 1024,
        ..server_config
    })
    .await;
    let mut client = connect(ClientConfig {
        max_frame: 16,
        protocol,
        ..client_config(server.local_addr())
    })
    .await;
    assert!(matches!(
        next_client_event(&mut client).await,
        ClientEvent::Connected { .. }
    ));
    let id = next_connected(&mut events).await;

    server.send(id, "sixteen bytes!!!").await.unwrap();
    server.send(id, oversized).await.unwrap();
    let expected = match protocol {
        // The tutorial framing carries no type: the bytes arrive untyped.
        Mode::Tutorial => Message::untyped("sixteen bytes!!!"),
        Mode::Sockframe => Message::text("sixteen bytes!!!"),
    };
    assert_eq!(
        next_client_event(&mut client).await,
        ClientEvent::Message(expected)
    );
    match next_client_event(&mut client).await {
        ClientEvent::Disconnected {
            reason: DisconnectReason::Protocol(detail),
        } => assert!(
            detail_mentions.iter().all(|m| detail.contains(m)),
            "unexpected detail: {detail}"
        ),
        other => panic!("expected Disconnected with a protocol error, got {other:?}"),
    }
    // Without reconnect, that was the end of the client.
    assert_eq!(timeout(WAIT, client.recv()).await.unwrap(), None);
    assert!(!client.is_connected());
    assert!(matches!(client.send("x").await, Err(Error::Closed)));

    let gone = wait_for(&mut events, |e| {
        matches!(e, ServerEvent::Disconnected { .. })
    })
    .await;
    assert!(matches!(gone, ServerEvent::Disconnected { client, .. } if client == id));
    server.shutdown().await;
}

#[tokio::test]
async fn oversized_frame_from_the_server_is_a_protocol_error() {
    oversized_frame_from_the_server(Mode::Tutorial, "seventeen bytes!!", &["17", "16"]).await;
}

#[tokio::test]
async fn oversized_typed_frame_from_the_server_is_a_protocol_error() {
    // Over the sockframe protocol the maximum bounds the body; one byte over is refused
    // (the frame itself may be longer by its typed head).
    let oversized = "x".repeat(17);
    oversized_frame_from_the_server(Mode::Sockframe, &oversized, &["exceeds the maximum"]).await;
}

// (8) ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_from_the_server_arrive_in_order() {
    const N: usize = 1_000;
    let (server, mut events) = start_server().await;
    let mut client = connect(client_config(server.local_addr())).await;
    let id = next_connected(&mut events).await;

    let sending = tokio::spawn({
        let server = server.clone();
        async move {
            for i in 0..N {
                server.send(id, format!("message {i}")).await.unwrap();
            }
        }
    });
    for i in 0..N {
        assert_eq!(
            next_message(&mut client).await,
            Message::text(format!("message {i}"))
        );
    }
    timeout(WAIT, sending).await.unwrap().unwrap();

    timeout(WAIT, client.close()).await.unwrap().unwrap();
    server.shutdown().await;
}

// (9) ---------------------------------------------------------------------------------------

#[test]
fn backoff_grows_caps_and_jitters_within_bounds() {
    let exact = Backoff {
        initial: Duration::from_millis(30),
        max: Duration::from_millis(500),
        multiplier: 3.0,
        jitter: false,
        ..Backoff::default()
    };
    assert_eq!(exact.delay(1), Duration::from_millis(30));
    assert_eq!(exact.delay(2), Duration::from_millis(90));
    assert_eq!(exact.delay(3), Duration::from_millis(270));
    for attempt in [4, 5, 10, 100, u32::MAX] {
        assert_eq!(exact.delay(attempt), exact.max, "attempt {attempt}");
    }

    let jittered = Backoff {
        jitter: true,
        ..exact.clone()
    };
    let mut distinct = std::collections::HashSet::new();
    for attempt in 1..=8 {
        let full = exact.delay(attempt);
        for _ in 0..200 {
            let d = jittered.delay(attempt);
            assert!(
                d >= full / 2 && d <= full,
                "attempt {attempt}: {d:?} outside [{:?}, {full:?}]",
                full / 2
            );
            distinct.insert(d);
        }
    }
    // Jitter actually varies the delay (1,600 samples from a continuous range).
    assert!(
        distinct.len() > 100,
        "only {} distinct delays",
        distinct.len()
    );
}

//! Limits that are on by default or configurable: per-address connections, allow and deny
//! lists, the frame timeout (slowloris), and the inbound rate limit.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use sockframe::server::ServerConfig;
use sockframe::server::{ServerEvent, ServerEvents};
use sockframe::{DisconnectReason, RateAction, RateLimit};
use support::{WAIT, next_connected, next_event, tutorial_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout;

/// A tutorial-framing server config whose shutdown does not wait long for test peers that
/// never close their side.
fn config() -> ServerConfig {
    let mut config = tutorial_config();
    config.drain_deadline = Duration::from_millis(100);
    config
}

/// Connects to `server` from the loopback address `from` (any of 127.0.0.0/8).
async fn connect_from(from: [u8; 4], server: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(IpAddr::from(from), 0)).unwrap();
    socket.connect(server).await.unwrap()
}

/// Waits until the server closes `stream` (end of stream or reset), within [`WAIT`].
async fn assert_closed(stream: &mut TcpStream) {
    let mut buf = [0u8; 64];
    let closed = timeout(WAIT, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the server did not close the connection");
}

/// The next `Disconnected` reason, skipping messages.
async fn next_disconnect(events: &mut ServerEvents) -> DisconnectReason {
    loop {
        match next_event(events).await {
            ServerEvent::Disconnected { reason, .. } => return reason,
            ServerEvent::Message { .. } => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn connections_per_address_are_limited() {
    let mut config = config();
    config.max_connections_per_ip = 2;
    let (server, mut events) = support::start_server_with(config).await;
    let addr = server.local_addr();
    let _a = connect_from([127, 0, 0, 1], addr).await;
    next_connected(&mut events).await;
    let _b = connect_from([127, 0, 0, 1], addr).await;
    next_connected(&mut events).await;
    let mut third = connect_from([127, 0, 0, 1], addr).await;
    assert_closed(&mut third).await;
    // Another address has its own count.
    let _c = connect_from([127, 0, 0, 2], addr).await;
    next_connected(&mut events).await;
    assert_eq!(server.client_count(), 3);
    // A slot freed is a slot again.
    drop(_a);
    assert_eq!(
        next_disconnect(&mut events).await,
        DisconnectReason::ClosedByPeer
    );
    let _d = connect_from([127, 0, 0, 1], addr).await;
    next_connected(&mut events).await;
    server.shutdown().await;
}

#[tokio::test]
async fn allow_and_deny_lists_are_applied() {
    let mut config = config();
    config.allow = vec!["127.0.0.0/24".parse().unwrap()];
    config.deny = vec!["127.0.0.2/32".parse().unwrap()];
    let (server, mut events) = support::start_server_with(config).await;
    let addr = server.local_addr();
    let mut denied = connect_from([127, 0, 0, 2], addr).await;
    assert_closed(&mut denied).await;
    let mut not_allowed = connect_from([127, 0, 1, 1], addr).await;
    assert_closed(&mut not_allowed).await;
    let _ok = connect_from([127, 0, 0, 3], addr).await;
    // The refused ones never appear: the first event is the allowed client's.
    match next_event(&mut events).await {
        ServerEvent::Connected { addr, .. } => assert_eq!(addr.ip(), IpAddr::from([127, 0, 0, 3])),
        other => panic!("unexpected {other:?}"),
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_frame_that_does_not_finish_in_time_is_a_protocol_error() {
    let mut config = config();
    config.frame_timeout = Some(Duration::from_millis(300));
    let (server, mut events) = support::start_server_with(config).await;

    // A slow but steady sender finishes within the timeout and is fine.
    let mut steady = TcpStream::connect(server.local_addr()).await.unwrap();
    let steady_id = next_connected(&mut events).await;
    for byte in support::frame(b"steady") {
        steady.write_all(&[byte]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    match next_event(&mut events).await {
        ServerEvent::Message { client, message } => {
            assert_eq!(client, steady_id);
            assert_eq!(message, "steady");
        }
        other => panic!("unexpected {other:?}"),
    }

    // A slowloris: half a frame, then nothing.
    let mut slow = TcpStream::connect(server.local_addr()).await.unwrap();
    let slow_id = next_connected(&mut events).await;
    slow.write_all(&[10, 0, 0, 0, b'a', b'b']).await.unwrap();
    match next_event(&mut events).await {
        ServerEvent::Disconnected {
            client,
            reason: DisconnectReason::Protocol(detail),
        } => {
            assert_eq!(client, slow_id);
            assert!(detail.contains("not completed"), "{detail}");
        }
        other => panic!("unexpected {other:?}"),
    }
    // The steady client idles between frames without limit.
    assert_eq!(server.client_count(), 1);
    server.shutdown().await;
}

#[tokio::test]
async fn a_client_over_its_rate_is_disconnected() {
    let mut config = config();
    config.rate_limit = Some(RateLimit {
        per_second: 10,
        burst: 5,
        action: RateAction::Disconnect,
    });
    let (server, mut events) = support::start_server_with(config).await;
    let mut flood = TcpStream::connect(server.local_addr()).await.unwrap();
    next_connected(&mut events).await;
    let burst: Vec<u8> = (0..50).flat_map(|_| support::frame(b"x")).collect();
    flood.write_all(&burst).await.unwrap();
    let mut delivered = 0;
    let reason = loop {
        match next_event(&mut events).await {
            ServerEvent::Message { .. } => delivered += 1,
            ServerEvent::Disconnected { reason, .. } => break reason,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(reason, DisconnectReason::RateLimited);
    // The burst, plus what the rate refilled meanwhile; far from all 50.
    assert!((5..20).contains(&delivered), "{delivered} delivered");
    server.shutdown().await;
}

#[tokio::test]
async fn a_client_over_its_rate_is_slowed_down() {
    let mut config = config();
    config.rate_limit = Some(RateLimit {
        per_second: 50,
        burst: 5,
        action: RateAction::Delay,
    });
    let (server, mut events) = support::start_server_with(config).await;
    let mut fast = TcpStream::connect(server.local_addr()).await.unwrap();
    next_connected(&mut events).await;
    let started = Instant::now();
    let burst: Vec<u8> = (0..30).flat_map(|_| support::frame(b"x")).collect();
    fast.write_all(&burst).await.unwrap();
    for _ in 0..30 {
        match next_event(&mut events).await {
            ServerEvent::Message { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    // 25 messages beyond the burst at 50/s cannot arrive in less than half a second; all
    // arrive, none is dropped.
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    server.shutdown().await;
}

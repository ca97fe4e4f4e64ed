//! Shared helpers for the integration tests: servers on `127.0.0.1:0`, bounded waits.
#![allow(dead_code)]

pub mod leak;
pub mod process;
pub mod proxy;
pub mod raw;
pub mod redis_server;
pub mod transfer;

use std::time::Duration;

use sockframe::Message;
use sockframe::client::{Client, ClientEvent};
use sockframe::server::{ClientId, ProtocolMode, Server, ServerConfig, ServerEvent, ServerEvents};

/// Upper bound for any single wait in a test: generous for a loaded 2-core machine, but a
/// hang still fails instead of blocking CI.
pub const WAIT: Duration = Duration::from_secs(20);

/// The default config (protocol `Auto`), listening on a port the OS picks.
pub fn config() -> ServerConfig {
    ServerConfig::new("127.0.0.1:0".parse().unwrap())
}

/// Like [`config`], but speaking only the tutorial framing: every connection is a tutorial
/// connection from the start, so a raw socket is reported `Connected` at once (in `Auto`
/// mode a peer that sends nothing is registered at once but only classified, and reported,
/// after `detect_timeout`).
pub fn tutorial_config() -> ServerConfig {
    ServerConfig {
        protocol: ProtocolMode::Tutorial,
        ..config()
    }
}

/// Starts a server with the default config (protocol `Auto`) on an OS-picked loopback port.
pub async fn start_server() -> (Server, ServerEvents) {
    start_server_with(config()).await
}

/// Starts a tutorial-only server ([`tutorial_config`]) on an OS-picked loopback port.
pub async fn start_tutorial_server() -> (Server, ServerEvents) {
    start_server_with(tutorial_config()).await
}

/// Starts a server with `config` (its `bind` should be a loopback address with port 0).
pub async fn start_server_with(config: ServerConfig) -> (Server, ServerEvents) {
    Server::bind(config).await.expect("bind test server")
}

/// The next server event, failing the test after [`WAIT`].
pub async fn next_event(events: &mut ServerEvents) -> ServerEvent {
    tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("timed out waiting for a server event")
        .expect("server event stream ended")
}

/// A tutorial-only server with `n` raw tutorial clients connected (each one reported
/// `Connected` before the next connects), and room for a few more.
pub async fn raw_tutorial_clients(n: usize) -> (Server, ServerEvents, Vec<tokio::net::TcpStream>) {
    let (server, mut events) = start_server_with(ServerConfig {
        max_connections: n + 16,
        max_connections_per_ip: n + 16,
        ..tutorial_config()
    })
    .await;
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        clients.push(
            tokio::net::TcpStream::connect(server.local_addr())
                .await
                .unwrap(),
        );
        next_connected(&mut events).await;
    }
    (server, events, clients)
}

/// Waits for the next `Connected` event and returns the client's id.
pub async fn next_connected(events: &mut ServerEvents) -> ClientId {
    match next_event(events).await {
        ServerEvent::Connected { client, .. } => client,
        other => panic!("expected Connected, got {other:?}"),
    }
}

/// Waits for the next event matching `pred`, skipping others; fails after [`WAIT`].
pub async fn wait_for(
    events: &mut ServerEvents,
    mut pred: impl FnMut(&ServerEvent) -> bool,
) -> ServerEvent {
    tokio::time::timeout(WAIT, async {
        loop {
            let ev = events.recv().await.expect("server event stream ended");
            if pred(&ev) {
                return ev;
            }
        }
    })
    .await
    .expect("timed out waiting for a matching server event")
}

/// The next message the client receives, skipping connection notices; fails after [`WAIT`].
pub async fn next_message(client: &mut Client) -> Message {
    tokio::time::timeout(WAIT, async {
        loop {
            match client.recv().await.expect("client event stream ended") {
                ClientEvent::Message(m) => return m,
                ClientEvent::Request(r) => panic!("expected a message, got a request {r:?}"),
                _ => continue,
            }
        }
    })
    .await
    .expect("timed out waiting for a client message")
}

/// A tutorial frame built by hand (not by our encoder).
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut v = (payload.len() as u32).to_le_bytes().to_vec();
    v.extend_from_slice(payload);
    v
}

/// Resident memory of this process in bytes (Linux `/proc/self/status`, `VmRSS`).
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS line");
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("VmRSS value");
    kb * 1024
}

//! The README's event loop as a benchmark target: `Server::bind` and `while let Some(event) =
//! events.recv().await { match event { … } }`, counting every message's bytes. It is the path
//! a user who copies the README gets, without the `serve` command's batching of
//! `try_recv`; `bench/compare` and `bench/ab` run it beside the hand-written baseline.
//!
//! ```sh
//! cargo run --release --example event_sink -- 127.0.0.1:0
//! target/release/sockframe bench ADDR --size 64 --conns 16
//! ```
//!
//! It accepts tutorial-framed clients only (as the baseline does) and prints `listening on
//! ADDR`, then the messages and bytes received so far each time a client leaves.

use sockframe::server::{ProtocolMode, Server, ServerConfig, ServerEvent};

#[tokio::main]
async fn main() -> sockframe::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:1235".into());
    let config = ServerConfig {
        bind: addr.parse().expect("an address such as 127.0.0.1:0"),
        protocol: ProtocolMode::Tutorial,
        max_connections: 65_536,
        max_connections_per_ip: 65_536,
        ..ServerConfig::default()
    };
    let (server, mut events) = Server::bind(config).await?;
    eprintln!("listening on {}", server.local_addr());

    // As in the README: the loop runs in a task of its own.
    let counting = tokio::spawn(async move {
        let (mut messages, mut bytes) = (0u64, 0u64);
        while let Some(event) = events.recv().await {
            match event {
                ServerEvent::Message { message, .. } => {
                    messages += 1;
                    bytes += message.len() as u64;
                }
                ServerEvent::Disconnected { .. } => {
                    eprintln!("{messages} messages, {bytes} bytes so far");
                }
                _ => {}
            }
        }
    });
    counting.await.expect("the event loop panicked");
    Ok(())
}

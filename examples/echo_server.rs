//! The smallest echo server: every message a client sends comes straight back to it.
//!
//! ```sh
//! cargo run --release --example echo_server              # listens on 127.0.0.1:1234
//! cargo run --release --example echo_server 0.0.0.0:4000 # or on the address given
//! ```
//!
//! It prints one line per event. Try it with `cargo run --release --example chat_client` or
//! `cargo run --release -- connect 127.0.0.1:1234` in another terminal; Ctrl-C shuts it down
//! gracefully.

use sockframe::server::{Server, ServerConfig, ServerEvent};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let bind = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:1234".into());
    let (server, mut events) = Server::bind(ServerConfig::new(bind.parse()?)).await?;
    println!("listening on {}", server.local_addr());

    // On Ctrl-C, shut down; the event stream then ends once every client is disconnected.
    let handle = server.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        handle.shutdown().await;
    });

    while let Some(event) = events.recv().await {
        match event {
            ServerEvent::Connected { client, addr } => println!("{client} connected from {addr}"),
            ServerEvent::Message { client, payload } => {
                println!("{client}: {}", String::from_utf8_lossy(&payload));
                if let Err(e) = server.send(client, payload).await {
                    eprintln!("cannot echo to {client}: {e}");
                }
            }
            ServerEvent::Disconnected { client, reason } => println!("{client} left: {reason}"),
        }
    }
    Ok(())
}

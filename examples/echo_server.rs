//! The smallest echo server: every message a client sends comes straight back to it, and
//! every request is answered with its own message.
//!
//! ```sh
//! cargo run --release --example echo_server              # listens on 127.0.0.1:1234
//! cargo run --release --example echo_server 0.0.0.0:4000 # or on the address given
//! ```
//!
//! It serves both protocols on one port (the default [`ProtocolMode::Auto`]): sockframe
//! clients, whose text stays text and binary stays binary, and the tutorial's plain-framed
//! clients, whose messages arrive untyped. It prints one line per event. Try it with
//! `cargo run --release --example chat_client` or `cargo run --release -- connect
//! 127.0.0.1:1234` in another terminal; Ctrl-C shuts it down gracefully.
//!
//! [`ProtocolMode::Auto`]: sockframe::server::ProtocolMode::Auto

use sockframe::server::{Server, ServerConfig, ServerEvent};
use sockframe::{Message, MessageKind};

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
            ServerEvent::Message { client, message } => {
                println!("{client}: {}", describe(&message));
                if let Err(e) = server.send(client, message).await {
                    eprintln!("cannot echo to {client}: {e}");
                }
            }
            ServerEvent::Request { client, request } => {
                println!("{client} asks: {}", describe(request.message()));
                let answer = request.message().clone();
                // Answering never blocks the loop for long: it waits only while this
                // client's outgoing queue is full.
                if let Err(e) = request.respond(answer).await {
                    eprintln!("cannot answer {client}: {e}");
                }
            }
            ServerEvent::Disconnected { client, reason } => println!("{client} left: {reason}"),
            // File offers arrive only with `ServerConfig::transfer.save_dir` set.
            _ => {}
        }
    }
    Ok(())
}

/// One line for a message: text as is, bytes as a count.
fn describe(message: &Message) -> String {
    match (message.kind(), message.as_text()) {
        (MessageKind::Binary, _) | (_, None) => format!("<{} bytes>", message.len()),
        (_, Some(text)) => text.to_string(),
    }
}

//! A line-based chat client: each line typed is one message; messages from the server are
//! printed as they arrive. It reconnects on its own if the server goes away.
//!
//! ```sh
//! cargo run --release --example echo_server                  # in one terminal
//! cargo run --release --example chat_client                  # in another: 127.0.0.1:1234
//! cargo run --release --example chat_client 192.0.2.7:1234   # or the server given
//! ```
//!
//! End the input (Ctrl-D) to deliver what is still queued and close cleanly.

use sockframe::client::{Client, ClientConfig, ClientEvent};

#[tokio::main]
async fn main() -> sockframe::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:1234".into());
    let mut client = Client::connect(ClientConfig {
        reconnect: true,
        ..ClientConfig::new(addr)
    })
    .await?;

    // Read stdin on a plain thread: a blocking read must not hold up the runtime's exit.
    let (tx, mut lines) = tokio::sync::mpsc::channel::<String>(16);
    std::thread::spawn(move || {
        for line in std::io::stdin().lines().map_while(Result::ok) {
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });

    loop {
        tokio::select! {
            line = lines.recv() => match line {
                Some(line) => client.send(line).await?,
                None => break, // end of input
            },
            event = client.recv() => match event {
                Some(ClientEvent::Message(payload)) => println!("{}", String::from_utf8_lossy(&payload)),
                Some(ClientEvent::Connected { addr }) => eprintln!("connected to {addr}"),
                Some(ClientEvent::Disconnected { reason }) => eprintln!("disconnected: {reason}"),
                Some(ClientEvent::Reconnecting { attempt, delay }) => {
                    eprintln!("reconnecting in {delay:.1?} (attempt {attempt})");
                }
                None => break, // reconnecting gave up: close() says why
            },
        }
    }
    client.close().await
}

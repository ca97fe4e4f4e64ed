//! A line-based chat client: each line typed is one text message; messages from the server
//! are printed as they arrive. It reconnects on its own if the server goes away.
//!
//! ```sh
//! cargo run --release --example echo_server                  # in one terminal
//! cargo run --release --example chat_client                  # in another: 127.0.0.1:1234
//! cargo run --release --example chat_client 192.0.2.7:1234   # or the server given
//! SOCKFRAME_TOKEN=s3cret cargo run --release --example chat_client  # if a token is required
//! ```
//!
//! It speaks the sockframe protocol, so it learns why the server closed (a shutdown, a
//! kick, a heartbeat timeout) and can be asked questions: a request from the server is
//! answered with the last line typed. End the input (Ctrl-D) to deliver what is still
//! queued and close cleanly.

use sockframe::MessageKind;
use sockframe::client::{Client, ClientConfig, ClientEvent};

#[tokio::main]
async fn main() -> sockframe::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:1234".into());
    let mut client = Client::connect(ClientConfig {
        reconnect: true,
        name: "chat_client".into(),
        token: std::env::var("SOCKFRAME_TOKEN").ok().map(Into::into),
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

    let mut last_line = String::new();
    loop {
        tokio::select! {
            line = lines.recv() => match line {
                Some(line) => {
                    client.send(line.as_str()).await?;
                    last_line = line;
                }
                None => break, // end of input
            },
            event = client.recv() => match event {
                Some(ClientEvent::Message(message)) => match (message.kind(), message.as_text()) {
                    (MessageKind::Binary, _) | (_, None) => println!("<{} bytes>", message.len()),
                    (_, Some(text)) => println!("{text}"),
                },
                Some(ClientEvent::Request(request)) => {
                    // An answer the server waits for; a failure only means the connection
                    // just dropped.
                    let _ = request.respond(last_line.as_str()).await;
                }
                Some(ClientEvent::Connected { addr }) => eprintln!("connected to {addr}"),
                Some(ClientEvent::Disconnected { reason }) => eprintln!("disconnected: {reason}"),
                Some(ClientEvent::Reconnecting { attempt, delay }) => {
                    eprintln!("reconnecting in {delay:.1?} (attempt {attempt})");
                }
                // File offers arrive only with `ClientConfig::transfer.save_dir` set.
                Some(_) => {}
                None => break, // reconnecting gave up: close() says why
            },
        }
    }
    client.close().await
}

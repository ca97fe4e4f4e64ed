//! `sockframe connect`: an interactive client. Each line of stdin is sent as one message;
//! each message received is printed as one line on stdout; connection notices go to stderr.
//! Reconnects forever after the connection drops; exits at the end of stdin.

use std::pin::pin;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use sockframe::Error;
use sockframe::client::{Client, ClientConfig, ClientEvent, ClientSender};
use sockframe::server::ServerConfig;
use tokio::sync::mpsc;

use crate::input::{self, Line};
use crate::output::{self, print_line};
use crate::parse;

/// Arguments of `sockframe connect`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Server address, as host:port
    #[arg(value_name = "ADDR", default_value_t = ServerConfig::default().bind.to_string())]
    addr: String,
    /// How long to keep trying to make the first connection, like 500ms, 5s or 2m; once
    /// connected, reconnecting never gives up
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse::duration)]
    timeout: Duration,
    /// Accept files the server sends, into this directory (created if missing)
    #[arg(long, value_name = "DIR")]
    save_dir: Option<std::path::PathBuf>,
    /// Protocol, token and name.
    #[command(flatten)]
    peer: crate::peer::PeerArgs,
}

/// Connects, then relays stdin to the server and the server's messages to stdout until the
/// end of stdin; returns once what was typed has been delivered and the connection closed.
pub async fn run(args: Args) -> Result<()> {
    let mut config = ClientConfig::new(args.addr.clone());
    config.reconnect = true;
    args.peer.apply(&mut config)?;
    if let Some(dir) = &args.save_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the save directory {}", dir.display()))?;
        config.transfer.save_dir = Some(dir.clone());
    }
    // The first connection gives up after --timeout; reconnects keep trying (the library's
    // default `reconnect_backoff` has no limit).
    config.backoff.deadline = Some(args.timeout);
    let mut client = Client::connect(config).await?;

    // Stdin is forwarded in a future of its own, polled by the same loop as the events: a
    // send that waits (queue full while reconnecting) must not stop events from being shown.
    let lines = input::lines().context("failed to start reading stdin")?;
    let mut forward = pin!(forward(lines, client.sender()));
    loop {
        tokio::select! {
            forwarded = &mut forward => {
                forwarded?;
                break;
            }
            event = client.recv() => match event {
                Some(event) => show(event)?,
                None => bail!("the connection to {} ended for good", args.addr),
            },
        }
    }
    client
        .close()
        .await
        .context("failed to close the connection cleanly")
}

/// Sends each line until the end of input; fails only when the client can send no more.
async fn forward(mut lines: mpsc::Receiver<Line>, sender: ClientSender) -> Result<()> {
    while let Some(line) = lines.recv().await {
        let line = line.context("failed to read stdin")?;
        match sender.send(output::message_from_line(line)).await {
            Ok(()) => {}
            // Too long for a frame: this line is lost, the next may do.
            Err(e @ Error::Frame(_)) => eprintln!("error: message not sent: {e}"),
            Err(e) => return Err(e).context("failed to send a message"),
        }
    }
    Ok(())
}

/// Prints one client event: messages on stdout, connection notices on stderr.
fn show(event: ClientEvent) -> Result<()> {
    match event {
        ClientEvent::Message(message) => {
            print_line(&output::payload(&message)).context("failed to write to stdout")?;
        }
        ClientEvent::Request(request) => {
            // An interactive client has nothing to answer with; dropping the request sends
            // the server an `unhandled` error rather than leaving it waiting.
            eprintln!(
                "request from the server (not answered): {}",
                output::payload(request.message())
            );
        }
        ClientEvent::Connected { addr } => eprintln!("connected to {addr}"),
        ClientEvent::Disconnected { reason } => eprintln!("disconnected: {reason}"),
        ClientEvent::Resumed { addr } => eprintln!("resumed the session with {addr}"),
        ClientEvent::SessionExpired { undelivered } => eprintln!(
            "session expired: {undelivered} message(s) sent before may not have been delivered"
        ),
        ClientEvent::Reconnecting { attempt, delay } => eprintln!(
            "reconnecting (attempt {attempt}, in {}ms)",
            delay.as_millis()
        ),
        ClientEvent::FileOffer(offer) => {
            // Offered only with --save-dir; the library has checked the name and size.
            eprintln!(
                "receiving file {} ({} bytes)",
                output::escape(offer.name()),
                offer.size()
            );
            offer.accept();
        }
        ClientEvent::FileReceived(file) => eprintln!(
            "file {} {} {} saved as {}",
            output::escape(&file.name),
            file.size,
            file.digest,
            file.path.display()
        ),
        ClientEvent::FileFailed(failure) => eprintln!(
            "file {} not received: {}",
            output::escape(&failure.name),
            failure.reason
        ),
        other => eprintln!("{other:?}"),
    }
    Ok(())
}

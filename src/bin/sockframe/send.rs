//! `sockframe send`: connects, sends messages, waits until the server confirms them, and
//! exits.
//!
//! In the sockframe protocol the client opens a lossless session and reconnects (within
//! `--timeout`) if the connection drops, so a flaky link loses nothing; it exits 0 only once
//! the server acknowledged every message (its application has them). Over the tutorial
//! framing, which has no acknowledgements, "confirmed" means written and the server closed
//! its side. Messages the server sends meanwhile are ignored.

use std::ffi::OsString;
use std::pin::pin;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use futures_util::FutureExt;
use sockframe::Mode;
use sockframe::client::{Client, ClientConfig, ClientEvent, ClientSender};

use crate::parse;
use crate::{input, output};

/// Arguments of `sockframe send`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Server address, as host:port
    #[arg(value_name = "ADDR")]
    addr: String,
    /// Messages to send, one per argument, in order. A single `-` sends each line of stdin as
    /// one message instead. Put `--` before messages that start with `-`
    #[arg(value_name = "MESSAGE", required = true, value_parser = clap::value_parser!(OsString))]
    messages: Vec<OsString>,
    /// How long to keep trying to connect, like 500ms, 5s or 2m
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse::duration)]
    timeout: Duration,
    /// Protocol, token and name.
    #[command(flatten)]
    peer: crate::peer::PeerArgs,
}

/// Connects, sends, and closes cleanly: returns `Ok` only once every message was confirmed
/// (see the module docs).
pub async fn run(args: Args) -> Result<()> {
    let mut config = ClientConfig::new(args.addr);
    config.backoff.deadline = Some(args.timeout);
    args.peer.apply(&mut config)?;
    let session = config.protocol == Mode::Sockframe;
    if session {
        config.reconnect = true;
        config.reconnect_backoff.deadline = Some(args.timeout);
    }
    // No added context: the library's error reads "cannot connect to ADDR: connection
    // refused (is `sockframe serve` running?)", which says it all.
    let mut client = Client::connect(config).await?;

    let mut feed = pin!(feed(args.messages, client.sender()));
    loop {
        tokio::select! {
            fed = &mut feed => {
                fed?;
                break;
            }
            event = client.recv() => check(event, session)?,
        }
    }
    {
        let sender = client.sender();
        let mut confirmed = pin!(sender.flush());
        loop {
            tokio::select! {
                done = &mut confirmed => {
                    done.context("the messages were not confirmed by the server")?;
                    break;
                }
                event = client.recv() => check(event, session)?,
            }
        }
    }
    // A drop that is already known must fail the command, and `close` alone would not
    // report it (the connection is gone and there is nothing left for it to flush).
    while let Some(event) = client.recv().now_or_never() {
        check(event, session)?;
    }
    client
        .close()
        .await
        .context("failed to deliver the messages")
}

/// Queues the messages given as arguments, or stdin's lines for a lone `-`.
async fn feed(messages: Vec<OsString>, sender: ClientSender) -> Result<()> {
    if messages.len() == 1 && messages[0] == "-" {
        let mut lines = input::lines().context("failed to start reading stdin")?;
        while let Some(line) = lines.recv().await {
            let line = line.context("failed to read stdin")?;
            sender
                .send(output::message_from_line(line))
                .await
                .context("failed to send a message")?;
        }
    } else {
        for (i, message) in messages.into_iter().enumerate() {
            let message = output::message_from_line(os_bytes(message)?.to_vec());
            sender
                .send(message)
                .await
                .with_context(|| format!("failed to send message {}", i + 1))?;
        }
    }
    Ok(())
}

/// Fails when messages may have been lost: a lost connection without a session, or a
/// session the server no longer has. (With a session, a drop is followed by a resume.)
fn check(event: Option<ClientEvent>, session: bool) -> Result<()> {
    match event {
        Some(ClientEvent::Disconnected { reason }) if !session => {
            bail!("the connection closed before all messages were confirmed sent: {reason}")
        }
        Some(ClientEvent::Disconnected { reason }) => {
            eprintln!("connection lost ({reason}); resuming the session");
            Ok(())
        }
        Some(ClientEvent::SessionExpired { undelivered }) => {
            bail!("the server lost the session: {undelivered} message(s) may not have arrived")
        }
        Some(_) => Ok(()),
        None => bail!("the connection closed before all messages were confirmed sent"),
    }
}

/// An argument's bytes: on Unix any bytes can be sent, not only UTF-8.
fn os_bytes(s: OsString) -> Result<Bytes> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStringExt;
        Ok(s.into_vec().into())
    }
    #[cfg(not(unix))]
    match s.into_string() {
        Ok(s) => Ok(s.into()),
        Err(s) => bail!("message {s:?} is not valid Unicode"),
    }
}

//! `sockframe request`: sends one request, prints the answer, and exits 0; exits non-zero
//! on an error answer, a timeout or a rejection.

use std::time::Duration;

use anyhow::{Result, bail};
use sockframe::Error;
use sockframe::client::{Client, ClientConfig};

use crate::output::{self, print_line};
use crate::parse;
use crate::peer::PeerArgs;

/// Arguments of `sockframe request`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Server address, as host:port
    #[arg(value_name = "ADDR")]
    addr: String,
    /// The request's text
    #[arg(value_name = "MESSAGE")]
    message: String,
    /// How long to wait for connecting, and then for the answer, like 500ms, 5s or 2m
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse::duration)]
    timeout: Duration,
    /// Protocol, token and name.
    #[command(flatten)]
    peer: PeerArgs,
}

/// Connects, asks, prints the answer on stdout.
pub async fn run(args: Args) -> Result<()> {
    let mut config = ClientConfig::new(args.addr);
    config.backoff.deadline = Some(args.timeout);
    args.peer.apply(&mut config)?;
    let client = Client::connect(config).await?;
    let answer = client
        .request_with_timeout(args.message, args.timeout)
        .await;
    // The answer is in (or the request failed): nothing is queued, so close without waiting.
    drop(client);
    match answer {
        Ok(message) => print_line(&output::payload(&message))?,
        Err(Error::Remote { code, text }) => bail!("the server answered with error {code}: {text}"),
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

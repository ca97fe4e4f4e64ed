//! `sockframe send-file`: sends files to a server, one after another, and exits 0 only when
//! the server has verified every one of them (BLAKE3).
//!
//! Progress goes to stdout: a bar per file (bytes, rate, ETA) when stdout is a terminal,
//! one plain line per file every second otherwise, JSON objects with `--json`, nothing
//! with `--quiet`. Each verified file ends with the line `sent <name> <bytes> <digest>`.
//! The connection reconnects by itself (for `--retry-for`) and interrupted files resume.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;
use sockframe::client::{Client, ClientConfig, ClientEvent};
use sockframe::transfer::{FileReceipt, TransferHandle};

use crate::output::{json_object, print_line};
use crate::parse;

/// How often progress is shown when stdout is not a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(1);

/// Arguments of `sockframe send-file`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Server address, as host:port
    #[arg(value_name = "ADDR")]
    addr: String,
    /// Files to send, in order
    #[arg(value_name = "PATH", required = true)]
    paths: Vec<PathBuf>,
    /// How long to keep trying to make the first connection, like 500ms, 5s or 2m
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse::duration)]
    timeout: Duration,
    /// After the connection drops, how long to keep trying to reconnect (the transfer then
    /// resumes where the server's copy ends)
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse::duration)]
    retry_for: Duration,
    /// Show no progress and no result lines (the exit code still tells)
    #[arg(long, short)]
    quiet: bool,
    /// Progress and results as JSON objects, one per line
    #[arg(long, conflicts_with = "quiet")]
    json: bool,
    /// Protocol, token and name.
    #[command(flatten)]
    peer: crate::peer::PeerArgs,
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Show {
    Bar,
    Plain,
    Json,
    Quiet,
}

/// Connects, sends each file, and closes; fails unless every file was verified.
pub async fn run(args: Args) -> Result<()> {
    let show = if args.quiet {
        Show::Quiet
    } else if args.json {
        Show::Json
    } else if std::io::stdout().is_terminal() {
        Show::Bar
    } else {
        Show::Plain
    };
    let mut config = ClientConfig::new(args.addr.clone());
    config.backoff.deadline = Some(args.timeout);
    config.reconnect = true;
    config.reconnect_backoff.deadline = Some(args.retry_for);
    args.peer.apply(&mut config)?;
    let mut client = Client::connect(config).await?;

    let mut failed = 0;
    for path in &args.paths {
        let sent = async {
            let handle = client
                .send_file(path)
                .await
                .with_context(|| format!("cannot send {}", path.display()))?;
            watch(&mut client, handle, show).await
        };
        match sent.await {
            Ok(receipt) => report(&receipt, show)?,
            Err(e) => {
                failed += 1;
                eprintln!("error: {}", crate::output::error_message(&e));
            }
        }
    }
    client
        .close()
        .await
        .context("failed to close the connection cleanly")?;
    if failed > 0 {
        bail!(
            "{failed} of {} file(s) were not delivered",
            args.paths.len()
        );
    }
    Ok(())
}

/// Shows the transfer's progress until the server has verified the file.
async fn watch(client: &mut Client, handle: TransferHandle, show: Show) -> Result<FileReceipt> {
    let name = handle.name().to_string();
    let progress = handle.progress_reader();
    let total = progress().total;
    let bar = (show == Show::Bar).then(|| {
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stdout());
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_message(name.clone());
        bar
    });
    let started = Instant::now();
    let every = match show {
        Show::Bar => Duration::from_millis(100),
        _ => PLAIN_EVERY,
    };
    // The first line after one period: a file that is done (or refused) at once needs none.
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let finish = handle.finish();
    tokio::pin!(finish);
    let mut dropped = false;
    let result = loop {
        tokio::select! {
            result = &mut finish => break result.map_err(anyhow::Error::from),
            _ = tick.tick() => {
                let done = progress().confirmed;
                match (&bar, show) {
                    (Some(bar), _) => bar.set_position(done),
                    (None, Show::Plain) => print_line(&plain(&name, done, total, started))?,
                    (None, Show::Json) => print_line(&json_object(&[
                        ("event", "progress".into()),
                        ("name", name.as_str().into()),
                        ("bytes", done.into()),
                        ("total", total.into()),
                    ]))?,
                    _ => {}
                }
            }
            event = client.recv() => match event {
                Some(ClientEvent::Disconnected { reason }) if show != Show::Quiet => {
                    dropped = true;
                    notice(&bar, &format!("disconnected: {reason}; reconnecting to resume"));
                }
                // The first connection needs no notice; a reconnect does.
                Some(ClientEvent::Connected { addr }) if show != Show::Quiet && dropped => {
                    notice(&bar, &format!("reconnected to {addr}"));
                }
                Some(ClientEvent::FileOffer(offer)) => offer.reject("send-file receives no files"),
                Some(_) => {}
                None => break Err(anyhow::anyhow!("the connection ended for good")),
            },
        }
    };
    if let Some(bar) = bar {
        match &result {
            Ok(_) => bar.finish(),
            Err(_) => bar.abandon(),
        }
    }
    result.with_context(|| format!("{name} was not delivered"))
}

/// A line on stderr that does not tear the progress bar apart.
fn notice(bar: &Option<ProgressBar>, text: &str) {
    match bar {
        Some(bar) => bar.suspend(|| eprintln!("{text}")),
        None => eprintln!("{text}"),
    }
}

/// A plain progress line: `NAME: 52428800 of 104857600 bytes (50%), 95.2 MB/s`.
fn plain(name: &str, done: u64, total: u64, started: Instant) -> String {
    let percent = (done * 100).checked_div(total).unwrap_or(100);
    let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-3) / 1e6;
    format!("{name}: {done} of {total} bytes ({percent}%), {rate:.1} MB/s")
}

/// The line for a verified file: `sent <name> <bytes> <digest>`, or a JSON object.
fn report(receipt: &FileReceipt, show: Show) -> Result<()> {
    let line = match show {
        Show::Quiet => return Ok(()),
        Show::Json => json_object(&[
            ("event", "sent".into()),
            ("name", receipt.name.as_str().into()),
            ("bytes", receipt.size.into()),
            ("digest", receipt.digest.to_string().into()),
            ("resumed_from", receipt.resumed_from.into()),
            ("attempts", Value::from(receipt.attempts)),
        ]),
        _ => format!(
            "sent {} {} {}",
            crate::output::escape(&receipt.name),
            receipt.size,
            receipt.digest
        ),
    };
    print_line(&line).context("failed to write to stdout")
}

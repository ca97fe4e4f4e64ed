//! `sockframe serve`: runs a server, prints what happens on stdout, and takes commands on
//! stdin.
//!
//! Output, one line per event (or one JSON object per line with `--json`):
//!
//! ```text
//! connected 1 127.0.0.1:50412
//! message 1 hello
//! disconnected 1 closed by peer
//! ```
//!
//! With `--discard`, `--echo` or `--fanout` (targets for `sockframe bench`), messages are
//! counted instead of printed: a rate per second on stderr, and totals when the server stops.
//! `--discard` and `--echo` count (and echo) with a message handler in each connection's
//! task (`Server::bind_with_handler`, the library's fast path); `--discard` borrows each
//! message where it was read (`Handler::message_ref`) unless `--owned` asks for each as a
//! `Message`, and `--echo` takes each as a `Message` to send it back. `--events` makes them
//! take messages from the event stream instead, as an application reading `ServerEvents`
//! does.
//!
//! Commands, one per line: `send <id> <text>`, `broadcast <text>`, `list`, `kick <id>`,
//! `send-file <id> <path>`, `help`. The text is sent as typed, byte for byte (no escapes
//! are interpreted).
//!
//! With `--save-dir`, files that clients send are accepted into that directory and each
//! verified one is printed as `file <id> <name> <bytes> <blake3 digest>`.
//!
//! The pieces, and how they meet:
//!
//! - `mod.rs`: [`run`]: the main loop, which takes events, hands messages to the load mode
//!   or prints them, accepts file offers, and shuts down on a signal.
//! - `args.rs`: the command-line arguments ([`Args`]) and the [`ServerConfig`] made from them.
//! - `load.rs`: `--discard`, `--echo`, `--fanout`: the connection handler that counts
//!   messages, the same on the event stream, and the rate and totals on stderr.
//! - `printer.rs`: the line (text or JSON) printed for each event and each `list` reply.
//! - `command.rs`: the commands read from stdin, run in a task of their own beside the
//!   main loop.
//! - `signals.rs`: SIGINT and SIGTERM (shut down), SIGHUP (reload the TLS files).
//! - `nofile.rs`: the open file limit, raised (or warned about) when below `--max-conns`.
//!
//! [`ServerConfig`]: sockframe::server::ServerConfig

mod args;
mod command;
pub mod file;
mod load;
mod nofile;
mod printer;
mod signals;

pub use args::Args;

use std::io;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use sockframe::FullPolicy;
use sockframe::server::{Server, ServerEvent};

use crate::input;
use crate::output::{self, print_line};
use command::{USAGE, run_commands};
use load::{Counter, Load, LoadMode};
use printer::Printer;
use signals::{Signal, Signals};

/// Most events handled per pass through the main loop.
const EVENT_BATCH: usize = 256;

/// Runs the server until SIGINT or SIGTERM, then shuts it down gracefully and returns once
/// every client's `disconnected` line is printed.
pub async fn run(args: Args) -> Result<()> {
    let mut config = args.server_config()?;
    #[cfg(feature = "admin")]
    let admin_config = args.admin_config()?;
    #[cfg(feature = "cluster")]
    if let Some(cluster) = args.join_cluster().await? {
        eprintln!(
            "cluster node {} (number {})",
            cluster.node(),
            cluster.node_number()
        );
        config.cluster = Some(cluster);
    }
    let mut load = Load::new(&args);
    let handled = !args.events && matches!(load.mode, Some(LoadMode::Discard | LoadMode::Echo));
    if args.echo {
        // Never wait on one client's queue here: while this loop waits, no event is taken,
        // and a client that left meanwhile cannot report it and release its queue.
        config.send_policy = FullPolicy::Disconnect;
    }
    let print = Printer { json: args.json };
    nofile::check(config.max_connections as u64);

    // Before the `listening on` line: whoever reads it may signal us right away.
    let mut signals = Signals::new().context("failed to install signal handlers")?;
    // No added context: the library's error already reads "cannot listen on ADDR: ...".
    let (server, mut events) = if handled {
        let (counts, echo) = (load.counts.clone(), args.echo);
        let borrows = !args.echo && !args.owned;
        Server::bind_with_handler(config, move |_, _| {
            Counter::new(counts.clone(), echo, borrows)
        })
        .await?
    } else {
        Server::bind(config).await?
    };
    // One write for the whole line: `eprintln!` writes each piece of its format on its own
    // (stderr is unbuffered), and a script reading the log may catch the line without its
    // port.
    let line = format!("listening on {}\n", server.local_addr());
    let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
    #[cfg(feature = "admin")]
    let admin = match admin_config {
        Some(admin_config) => {
            let admin = sockframe::admin::Admin::start(server.clone(), admin_config).await?;
            let line = format!("admin on http://{}\n", admin.local_addr());
            let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
            Some(admin)
        }
        None => None,
    };
    if io::IsTerminal::is_terminal(&io::stdin()) {
        eprintln!("{USAGE}");
    }

    // Commands run in their own task: `send` may wait for a slow client's queue, and events
    // must keep flowing meanwhile (connections stop reading when the event stream is full).
    let lines = input::lines().context("failed to start reading stdin")?;
    let mut commands = tokio::spawn(run_commands(server.clone(), lines, print));
    let mut commands_done = false;
    let mut shutdown = None;
    let mut rate = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(event) => {
                    // Also take what else is ready, up to a bound: one pass through this
                    // `select!` per batch of events instead of per event. Messages that
                    // `--discard` counts are counted in a loop without an `.await`, so that
                    // none is kept in this future's state on its way (moving each event
                    // into it and out again: 69 against 57.5 ns of server CPU per 64-byte
                    // message with 16 connections, docs/benchmarks.md).
                    let mut taken = 1;
                    let mut next = load.discard(event);
                    loop {
                        if let Some(event) = next
                            && let Some(event) = load.take(&server, event).await.and_then(accept_offer)
                        {
                            print_line(&print.event(&event)).context("failed to write to stdout")?;
                            load.answer(event).await;
                        }
                        next = match load.discard_ready(&mut events, &mut taken, EVENT_BATCH) {
                            Some(event) => Some(event),
                            None => break,
                        };
                    }
                }
                None if shutdown.is_some() => break,
                None => bail!("the server stopped unexpectedly"),
            },
            _ = rate.tick(), if load.mode.is_some() => load.print_rate(),
            signal = signals.recv() => {
                if signal == Signal::Reload {
                    // Reload the TLS files; a bad new pair leaves the old one in force.
                    match server.reload_tls() {
                        Ok(()) if server.config().tls.is_some() => {
                            eprintln!("reloaded the TLS certificate and key");
                        }
                        Ok(()) => eprintln!("SIGHUP: no TLS files to reload"),
                        Err(e) => eprintln!("error: TLS reload failed, keeping the old pair: {e}"),
                    }
                    continue;
                }
                if shutdown.is_some() {
                    bail!("interrupted again; stopped without waiting for clients to disconnect");
                }
                eprintln!("shutting down");
                commands.abort();
                // Shutdown waits for every connection to end, and each one ends by sending
                // its `Disconnected` event, so this loop keeps receiving meanwhile.
                let server = server.clone();
                shutdown = Some(tokio::spawn(async move { server.shutdown().await }));
            }
            joined = &mut commands, if !commands_done => {
                commands_done = true;
                match joined {
                    Ok(result) => result?,
                    Err(e) if e.is_cancelled() => {}
                    Err(e) => return Err(e).context("the command reader failed"),
                }
            }
        }
    }
    if let Some(shutdown) = shutdown {
        shutdown.await.context("failed to shut down")?;
    }
    // Last: /healthz answers 503 while the clients drain, for a load balancer to see.
    #[cfg(feature = "admin")]
    if let Some(admin) = admin {
        admin.stop().await;
    }
    load.print_totals();
    Ok(())
}

/// Accepts a file offer (offers reach the application only with `--save-dir`, after the
/// library checked the name, the size and existing files); gives back every other event.
fn accept_offer(event: ServerEvent) -> Option<ServerEvent> {
    match event {
        ServerEvent::FileOffer { client, offer } => {
            eprintln!(
                "receiving file {} ({} bytes) from client {client}",
                output::escape(offer.name()),
                offer.size()
            );
            offer.accept();
            None
        }
        event => Some(event),
    }
}

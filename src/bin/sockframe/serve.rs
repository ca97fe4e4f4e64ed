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

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use sockframe::server::{ClientId, ClientInfo, ProtocolMode, Server, ServerConfig, ServerEvent};
use sockframe::{FullPolicy, Message};
use tokio::sync::mpsc;

use crate::input::{self, Line};
use crate::output::{self, json_object, print_line};
use crate::parse;

/// Most events handled per pass through the main loop.
const EVENT_BATCH: usize = 256;

/// The commands `serve` reads on stdin, for `help` and error messages.
const USAGE: &str = "commands: send <id> <text> | broadcast <text> | list | kick <id> | send-file <id> <path> | help";

/// Arguments of `sockframe serve`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Address to listen on; port 0 lets the OS choose. The address actually bound is printed
    /// on stderr as `listening on ADDR`
    #[arg(long, value_name = "ADDR", default_value_t = ServerConfig::default().bind)]
    bind: SocketAddr,
    /// Largest message accepted or sent, in bytes, optionally with a suffix: KiB, MiB, GiB
    /// (1024-based) or KB, MB, GB [default: 16MiB]
    #[arg(long, value_name = "BYTES", value_parser = frame_size)]
    max_frame: Option<usize>,
    /// Most clients connected at once; more are closed as soon as they are accepted
    #[arg(
        long,
        value_name = "N",
        default_value_t = ServerConfig::default().max_connections as u64,
        value_parser = clap::value_parser!(u64).range(1..),
    )]
    max_conns: u64,
    /// Most clients connected at once from one IP address
    #[arg(
        long,
        value_name = "N",
        default_value_t = ServerConfig::default().max_connections_per_ip as u64,
        value_parser = clap::value_parser!(u64).range(1..),
    )]
    max_conns_per_ip: u64,
    /// Print events and `list` replies as JSON objects, one per line
    #[arg(long)]
    json: bool,
    /// Protocols accepted: `auto` tells them apart by the first frame (a hello or not);
    /// `auto` becomes `sockframe` when tokens are required
    #[arg(long, value_enum, default_value_t = ServeProtocol::Auto)]
    protocol: ServeProtocol,
    /// Require a token: a file with one token per line (blank lines ignored). Tokens can also
    /// come from the environment variable SOCKFRAME_TOKENS (comma-separated); never only from
    /// the command line, where other users could read them
    #[arg(long, value_name = "FILE")]
    token_file: Option<std::path::PathBuf>,
    /// Ping sockframe clients this often; a client silent for 3 intervals is disconnected
    /// ("0s" turns pings off)
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse::duration)]
    heartbeat: std::time::Duration,
    /// Disconnect clients that send no message for this long [default: off]
    #[arg(long, value_name = "DURATION", value_parser = parse::duration)]
    idle_timeout: Option<std::time::Duration>,
    /// Disconnect a client whose frame, once begun, is not complete within this long
    /// ("0s" turns the check off)
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse::duration)]
    frame_timeout: std::time::Duration,
    /// Keep the lossless session of a client whose connection dropped this long, for it to
    /// resume without losing a message ("0s" turns sessions off)
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse::duration)]
    session_grace: std::time::Duration,
    /// Serve TLS with this certificate chain (PEM); needs --tls-key. SIGHUP reloads both
    /// files: new connections use the new pair
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The private key (PEM) of --tls-cert
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Require client certificates signed by this CA (PEM): mutual TLS. A client's name in
    /// `list` then comes from its certificate
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    client_ca: Option<std::path::PathBuf>,
    /// Accept files that clients send, into this directory (created if missing). Without
    /// it, file offers are refused
    #[arg(long, value_name = "DIR")]
    save_dir: Option<std::path::PathBuf>,
    /// Largest file accepted with --save-dir, in bytes, optionally with a suffix: KiB, MiB,
    /// GiB or KB, MB, GB [default: 64GiB]
    #[arg(long, value_name = "SIZE", value_parser = parse::size, requires = "save_dir")]
    max_file_size: Option<usize>,
    /// Replace existing files with received ones of the same name (default: refuse them)
    #[arg(long, requires = "save_dir")]
    overwrite: bool,
    /// Benchmark target: count each message and drop it
    #[arg(long, group = "load")]
    discard: bool,
    /// A ready test peer: send each message back to its sender, unprinted (a client whose
    /// queue fills up because it does not read is disconnected as a slow consumer), and
    /// answer each request with its own payload
    #[arg(long, group = "load")]
    echo: bool,
    /// Benchmark target: send each message to every other client (a client whose queue fills
    /// up is disconnected as a slow consumer)
    #[arg(long, group = "load")]
    fanout: bool,
    /// With --discard or --echo: take messages from the event stream, as an application
    /// reading `ServerEvents` does, instead of with a handler in each connection's task
    /// (the library's fastest path, and the default)
    #[arg(long)]
    events: bool,
    /// With --discard: count each message as an owned `Message` (`Handler::message`)
    /// instead of borrowing it where it was read (`Handler::message_ref`, the default)
    #[arg(long, requires = "discard", conflicts_with = "events")]
    owned: bool,
}

/// `--protocol` of `serve`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ServeProtocol {
    /// Both on one port, told apart by the first frame.
    Auto,
    /// Only the tutorial framing.
    Tutorial,
    /// Only the sockframe protocol.
    Sockframe,
}

/// The tokens from `--token-file` and `SOCKFRAME_TOKENS`.
fn load_tokens(file: Option<&std::path::Path>) -> Result<Vec<bytes::Bytes>> {
    let mut tokens = Vec::new();
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("failed to read the token file {}", path.display()))?;
        tokens.extend(
            text.lines()
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(String::from),
        );
        if tokens.is_empty() {
            bail!("the token file {} holds no token", path.display());
        }
    }
    if let Ok(list) = std::env::var("SOCKFRAME_TOKENS") {
        tokens.extend(
            list.split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(String::from),
        );
    }
    Ok(tokens.into_iter().map(bytes::Bytes::from).collect())
}

/// `--max-frame`: a size the tutorial's signed 32-bit length can express.
fn frame_size(s: &str) -> Result<usize, String> {
    let max = i32::MAX as usize;
    match parse::size(s)? {
        n if n > max => Err(format!(
            "{n} bytes is more than a frame can hold (at most {max}: the length is a signed 32-bit integer)"
        )),
        n => Ok(n),
    }
}

/// Runs the server until SIGINT or SIGTERM, then shuts it down gracefully and returns once
/// every client's `disconnected` line is printed.
pub async fn run(args: Args) -> Result<()> {
    let mut config = ServerConfig::new(args.bind);
    if let Some(max) = args.max_frame {
        config.max_frame = max;
    }
    config.max_connections = usize::try_from(args.max_conns).unwrap_or(usize::MAX);
    config.max_connections_per_ip = usize::try_from(args.max_conns_per_ip).unwrap_or(usize::MAX);
    config.protocol = match args.protocol {
        ServeProtocol::Auto => ProtocolMode::Auto,
        ServeProtocol::Tutorial => ProtocolMode::Tutorial,
        ServeProtocol::Sockframe => ProtocolMode::Sockframe,
    };
    config.tokens = load_tokens(args.token_file.as_deref())?;
    if !config.tokens.is_empty() && args.protocol == ServeProtocol::Tutorial {
        bail!("tokens need the sockframe protocol; the tutorial framing cannot carry them");
    }
    config.heartbeat = (!args.heartbeat.is_zero()).then(|| sockframe::Heartbeat {
        interval: args.heartbeat,
        ..Default::default()
    });
    config.idle_timeout = args.idle_timeout;
    config.frame_timeout = (!args.frame_timeout.is_zero()).then_some(args.frame_timeout);
    config.session_grace = (!args.session_grace.is_zero()).then_some(args.session_grace);
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        let tls = sockframe::tls::ServerTls::from_files(cert, key, args.client_ca.clone())?;
        config.tls = Some(std::sync::Arc::new(tls));
    }
    if let Some(dir) = &args.save_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the save directory {}", dir.display()))?;
        config.transfer.save_dir = Some(dir.clone());
        config.transfer.overwrite = args.overwrite;
        if let Some(max) = args.max_file_size {
            config.transfer.max_file_size = max as u64;
        }
    }
    let mut load = Load::new(&args);
    let handled = !args.events && matches!(load.mode, Some(LoadMode::Discard | LoadMode::Echo));
    if args.echo {
        // Never wait on one client's queue here: while this loop waits, no event is taken,
        // and a client that left meanwhile cannot report it and release its queue.
        config.send_policy = FullPolicy::Disconnect;
    }
    let print = Printer { json: args.json };

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
                    // `select!` per batch of events instead of per event.
                    let mut next = Some(event);
                    let mut taken = 0;
                    while let Some(event) = next {
                        if let Some(event) = load.take(&server, event).await.and_then(accept_offer) {
                            print_line(&print.event(&event)).context("failed to write to stdout")?;
                            load.answer(event).await;
                        }
                        taken += 1;
                        next = if taken < EVENT_BATCH { events.try_recv() } else { None };
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

/// What `--discard`, `--echo` and `--fanout` do with messages instead of printing them.
#[derive(Debug, Clone, Copy)]
enum LoadMode {
    Discard,
    Echo,
    Fanout,
}

/// Messages and bytes received by a benchmark target.
#[derive(Debug, Default)]
struct Counts {
    messages: AtomicU64,
    bytes: AtomicU64,
}

impl Counts {
    fn add(&self, messages: u64, bytes: u64) {
        self.messages.fetch_add(messages, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// The message handler of one connection under `--discard` or `--echo`: counts at the
/// application's end of the library, as an application's own handler sees the messages.
/// It adds to the shared counts in steps, because 16 connections adding every message to
/// one cache line would measure that line's contention instead of the library.
struct Counter {
    counts: Arc<Counts>,
    echo: bool,
    /// Counts messages lent in place (`message_ref`) rather than owned ones.
    borrows: bool,
    messages: u64,
    bytes: u64,
}

/// Messages a [`Counter`] counts before adding them to the shared counts.
const COUNT_STEP: u64 = 256;

impl Counter {
    fn new(counts: Arc<Counts>, echo: bool, borrows: bool) -> Self {
        Counter {
            counts,
            echo,
            borrows,
            messages: 0,
            bytes: 0,
        }
    }

    fn count(&mut self, len: usize) {
        self.messages += 1;
        self.bytes += len as u64;
        if self.messages == COUNT_STEP {
            self.counts.add(self.messages, self.bytes);
            (self.messages, self.bytes) = (0, 0);
        }
    }
}

impl sockframe::Handler for Counter {
    fn message(&mut self, message: Message) -> Option<Message> {
        self.count(message.len());
        self.echo.then_some(message)
    }

    fn borrows(&self) -> bool {
        self.borrows
    }

    fn message_ref(&mut self, message: sockframe::MessageRef<'_>) -> Option<Message> {
        self.count(message.len());
        self.echo.then(|| message.to_message())
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        self.counts.add(self.messages, self.bytes);
    }
}

/// Message counts of a benchmark target. Counted at the application: by a handler in each
/// connection (see [`Counter`]), or on the events the application receives (`--events`,
/// and always for `--fanout`), so they include the library's whole receive path.
#[derive(Debug)]
struct Load {
    /// `None` when serving normally.
    mode: Option<LoadMode>,
    counts: Arc<Counts>,
    /// The counts at the last rate line.
    reported: (u64, u64),
    /// When the last rate line was printed.
    since: tokio::time::Instant,
}

impl Load {
    fn new(args: &Args) -> Self {
        let mode = match (args.discard, args.echo, args.fanout) {
            (true, _, _) => Some(LoadMode::Discard),
            (_, true, _) => Some(LoadMode::Echo),
            (_, _, true) => Some(LoadMode::Fanout),
            _ => None,
        };
        Self {
            mode,
            counts: Arc::default(),
            reported: (0, 0),
            since: tokio::time::Instant::now(),
        }
    }

    /// Handles a message in a benchmark mode; gives back every other event (and every event
    /// when serving normally) to be printed.
    async fn take(&mut self, server: &Server, event: ServerEvent) -> Option<ServerEvent> {
        let (Some(mode), ServerEvent::Message { client, message }) = (self.mode, &event) else {
            return Some(event);
        };
        self.counts.add(1, message.len() as u64);
        match mode {
            LoadMode::Discard => {}
            // A client that left meanwhile is no error for a benchmark target.
            LoadMode::Echo => drop(server.send(*client, message.clone()).await),
            LoadMode::Fanout => drop(server.broadcast_except(*client, message.clone()).await),
        }
        None
    }

    /// After an event is printed: `--echo` answers a request with its own payload. (Without
    /// `--echo`, dropping the request answers it with the error `unhandled`.)
    async fn answer(&self, event: ServerEvent) {
        if let (Some(LoadMode::Echo), ServerEvent::Request { request, .. }) = (self.mode, event) {
            let answer = request.message().clone();
            let _ = request.respond(answer).await;
        }
    }

    /// One line on stderr with the rate since the last one, unless nothing arrived.
    fn print_rate(&mut self) {
        let now = tokio::time::Instant::now();
        let secs = (now - self.since).as_secs_f64().max(1e-9);
        let total = self.totals();
        let (messages, bytes) = (total.0 - self.reported.0, total.1 - self.reported.1);
        if messages > 0 {
            eprintln!(
                "{:.0} messages/s, {:.1} MB/s",
                messages as f64 / secs,
                bytes as f64 / secs / 1e6
            );
        }
        self.reported = total;
        self.since = now;
    }

    /// The totals, on stderr, when the server stops.
    fn print_totals(&self) {
        if self.mode.is_some() {
            let (messages, bytes) = self.totals();
            eprintln!("total: {messages} messages, {bytes} bytes");
        }
    }

    /// Messages and bytes counted so far.
    fn totals(&self) -> (u64, u64) {
        (
            self.counts.messages.load(Ordering::Relaxed),
            self.counts.bytes.load(Ordering::Relaxed),
        )
    }
}

/// Reads and runs commands until the end of stdin. Returns an error only when stdout fails;
/// a bad command is reported on stderr and the next one read.
async fn run_commands(
    server: Server,
    mut lines: mpsc::Receiver<Line>,
    print: Printer,
) -> Result<()> {
    while let Some(line) = lines.recv().await {
        let line = match line {
            Ok(line) => line,
            Err(e) => {
                eprintln!("error: failed to read stdin: {e}; no more commands will be read");
                break;
            }
        };
        match Command::parse(&line) {
            Ok(Some(command)) => command
                .execute(&server, print)
                .await
                .context("failed to write to stdout")?,
            Ok(None) => {}
            Err(message) => eprintln!("error: {message}"),
        }
    }
    // End of stdin is not a reason to stop: the server may run detached from any input.
    Ok(())
}

/// One line of input to `serve`.
#[derive(Debug, PartialEq, Eq)]
enum Command<'a> {
    /// `send <id> <text>`
    Send(ClientId, &'a [u8]),
    /// `broadcast <text>`
    Broadcast(&'a [u8]),
    /// `list`
    List,
    /// `kick <id>`
    Kick(ClientId),
    /// `send-file <id> <path>`
    SendFile(ClientId, &'a [u8]),
    /// `help`
    Help,
}

impl<'a> Command<'a> {
    /// Parses one line; `Ok(None)` for a blank line, `Err` with a message for anything that
    /// is not a command. The text of `send` and `broadcast` is everything after the single
    /// space that follows the previous word, unchanged.
    fn parse(line: &'a [u8]) -> Result<Option<Command<'a>>, String> {
        let line = line.trim_ascii_start();
        if line.is_empty() {
            return Ok(None);
        }
        let (word, rest) = split_word(line);
        let command = match word {
            b"send" => {
                let (id, text) = split_word(rest.unwrap_or_default());
                match text {
                    Some(text) if !id.is_empty() => Command::Send(client_id(id)?, text),
                    _ => return Err("usage: send <id> <text>".into()),
                }
            }
            b"broadcast" => match rest {
                Some(text) => Command::Broadcast(text),
                None => return Err("usage: broadcast <text>".into()),
            },
            b"kick" => match rest.map(<[u8]>::trim_ascii) {
                Some(id) if !id.is_empty() => Command::Kick(client_id(id)?),
                _ => return Err("usage: kick <id>".into()),
            },
            b"send-file" => {
                let (id, path) = split_word(rest.unwrap_or_default());
                match path {
                    Some(path) if !id.is_empty() && !path.is_empty() => {
                        Command::SendFile(client_id(id)?, path)
                    }
                    _ => return Err("usage: send-file <id> <path>".into()),
                }
            }
            b"list" | b"help" if rest.is_some_and(|r| !r.trim_ascii().is_empty()) => {
                return Err(format!(
                    "`{}` takes no arguments",
                    String::from_utf8_lossy(word)
                ));
            }
            b"list" => Command::List,
            b"help" => Command::Help,
            _ => {
                return Err(format!(
                    "unknown command `{}`; {USAGE}",
                    output::payload(&output::message_from_line(word.to_vec()))
                ));
            }
        };
        Ok(Some(command))
    }

    /// Carries out the command; failures of the command itself go to stderr, and only a
    /// failure to write stdout is returned.
    async fn execute(self, server: &Server, print: Printer) -> io::Result<()> {
        match self {
            Command::Send(id, text) => {
                if let Err(e) = server
                    .send(id, output::message_from_line(text.to_vec()))
                    .await
                {
                    eprintln!("error: cannot send to client {id}: {e}");
                }
            }
            Command::Broadcast(text) => {
                match server
                    .broadcast(output::message_from_line(text.to_vec()))
                    .await
                {
                    Ok(n) => eprintln!("broadcast to {n} client(s)"),
                    Err(e) => eprintln!("error: cannot broadcast: {e}"),
                }
            }
            Command::List => {
                let clients = server.clients();
                for client in &clients {
                    print_line(&print.client(client))?;
                }
                eprintln!("{} client(s) connected", clients.len());
            }
            Command::Kick(id) => {
                // Its `disconnected <id> kicked` line follows once its queue is delivered.
                if !server.disconnect(id) {
                    eprintln!("error: no connected client with id {id}");
                }
            }
            Command::SendFile(id, path) => {
                let path = std::path::PathBuf::from(String::from_utf8_lossy(path).into_owned());
                // In a task of its own: the transfer may take long, and commands go on.
                let server = server.clone();
                tokio::spawn(async move {
                    let sent = async {
                        let handle = server.send_file(id, &path).await?;
                        handle.finish().await
                    };
                    match sent.await {
                        Ok(receipt) => eprintln!(
                            "file {} ({} bytes) sent to client {id} and verified",
                            output::escape(&receipt.name),
                            receipt.size
                        ),
                        Err(e) => {
                            eprintln!("error: cannot send {} to client {id}: {e}", path.display())
                        }
                    }
                });
            }
            Command::Help => eprintln!("{USAGE}"),
        }
        Ok(())
    }
}

/// Splits at the first space: the word before it, and everything after it (`None` without
/// a space).
fn split_word(s: &[u8]) -> (&[u8], Option<&[u8]>) {
    match s.iter().position(|&b| b == b' ') {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    }
}

/// A client id as typed in a command.
fn client_id(s: &[u8]) -> Result<ClientId, String> {
    std::str::from_utf8(s)
        .ok()
        .and_then(|s| s.parse().ok())
        .map(ClientId)
        .ok_or_else(|| {
            format!(
                "bad client id `{}`: expected a number, as shown by `list`",
                output::payload(&output::message_from_line(s.to_vec()))
            )
        })
}

/// Formats events and `list` replies, as text or as JSON.
#[derive(Debug, Clone, Copy)]
struct Printer {
    /// One JSON object per line instead of text.
    json: bool,
}

impl Printer {
    /// The line for one server event.
    fn event(self, event: &ServerEvent) -> String {
        match (event, self.json) {
            (ServerEvent::Connected { client, addr }, false) => {
                format!("connected {client} {addr}")
            }
            (ServerEvent::Connected { client, addr }, true) => json_object(&[
                ("event", "connected".into()),
                ("client", client.0.into()),
                ("addr", addr.to_string().into()),
            ]),
            (ServerEvent::Message { client, message }, false) => {
                format!("message {client} {}", output::payload(message))
            }
            (ServerEvent::Message { client, message }, true) => json_object(&[
                ("event", "message".into()),
                ("client", client.0.into()),
                output::payload_field(message),
                output::kind_field(message),
            ]),
            (ServerEvent::Request { client, request }, false) => {
                format!("request {client} {}", output::payload(request.message()))
            }
            (ServerEvent::Request { client, request }, true) => json_object(&[
                ("event", "request".into()),
                ("client", client.0.into()),
                output::payload_field(request.message()),
                output::kind_field(request.message()),
            ]),
            (ServerEvent::Suspended { client, reason }, false) => {
                format!("suspended {client} {reason}")
            }
            (ServerEvent::Suspended { client, reason }, true) => json_object(&[
                ("event", "suspended".into()),
                ("client", client.0.into()),
                ("reason", reason.to_string().into()),
                ("reason_code", reason.code().into()),
            ]),
            (ServerEvent::Resumed { client, addr }, false) => {
                format!("resumed {client} {addr}")
            }
            (ServerEvent::Resumed { client, addr }, true) => json_object(&[
                ("event", "resumed".into()),
                ("client", client.0.into()),
                ("addr", addr.to_string().into()),
            ]),
            (ServerEvent::Disconnected { client, reason }, false) => {
                format!("disconnected {client} {reason}")
            }
            (ServerEvent::Disconnected { client, reason }, true) => json_object(&[
                ("event", "disconnected".into()),
                ("client", client.0.into()),
                ("reason", reason.to_string().into()),
                ("reason_code", reason.code().into()),
            ]),
            (ServerEvent::FileOffer { client, offer }, false) => format!(
                "offer {client} {} {} {}",
                output::escape(offer.name()),
                offer.size(),
                offer.digest()
            ),
            (ServerEvent::FileOffer { client, offer }, true) => json_object(&[
                ("event", "offer".into()),
                ("client", client.0.into()),
                ("name", offer.name().into()),
                ("bytes", offer.size().into()),
                ("digest", offer.digest().to_string().into()),
            ]),
            (ServerEvent::FileReceived { client, file }, false) => format!(
                "file {client} {} {} {}",
                output::escape(&file.name),
                file.size,
                file.digest
            ),
            (ServerEvent::FileReceived { client, file }, true) => json_object(&[
                ("event", "file".into()),
                ("client", client.0.into()),
                ("name", file.name.as_str().into()),
                ("bytes", file.size.into()),
                ("digest", file.digest.to_string().into()),
                ("path", file.path.display().to_string().into()),
            ]),
            (ServerEvent::FileFailed { client, failure }, false) => format!(
                "file-failed {client} {} {}",
                output::escape(&failure.name),
                failure.reason
            ),
            (ServerEvent::FileFailed { client, failure }, true) => json_object(&[
                ("event", "file-failed".into()),
                ("client", client.0.into()),
                ("name", failure.name.as_str().into()),
                ("reason", failure.reason.as_str().into()),
                ("resumable", failure.resumable.into()),
            ]),
            // Kinds of events this version of the CLI does not know yet.
            (other, false) => format!("event {other:?}"),
            (other, true) => json_object(&[
                ("event", "other".into()),
                ("debug", format!("{other:?}").into()),
            ]),
        }
    }

    /// The `list` line for one client: id, address, when it connected (Unix seconds), and
    /// its traffic so far.
    fn client(self, c: &ClientInfo) -> String {
        let since = c
            .connected_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if self.json {
            let fields: [(&str, Value); 8] = [
                ("event", "client".into()),
                ("client", c.id.0.into()),
                ("addr", c.addr.to_string().into()),
                ("connected_at", since.into()),
                ("messages_in", c.messages_in.into()),
                ("bytes_in", c.bytes_in.into()),
                ("messages_out", c.messages_out.into()),
                ("bytes_out", c.bytes_out.into()),
            ];
            json_object(&fields)
        } else {
            format!(
                "client {} {} connected_at={since} messages_in={} bytes_in={} messages_out={} bytes_out={}",
                c.id, c.addr, c.messages_in, c.bytes_in, c.messages_out, c.bytes_out
            )
        }
    }
}

/// SIGINT (Ctrl-C) and, on Unix, SIGTERM, as one stream.
/// What a signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    /// SIGINT, SIGTERM: shut down gracefully.
    Stop,
    /// SIGHUP: reload the TLS files.
    Reload,
}

struct Signals {
    /// SIGINT.
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    /// SIGTERM, which service managers and `kill` send.
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
    /// SIGHUP: reload the TLS files.
    #[cfg(unix)]
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Starts listening; from here on these signals no longer end the process by themselves.
    fn new() -> io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                interrupt: signal(SignalKind::interrupt())?,
                terminate: signal(SignalKind::terminate())?,
                hangup: signal(SignalKind::hangup())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// Waits for the next signal.
    async fn recv(&mut self) -> Signal {
        #[cfg(unix)]
        tokio::select! {
            _ = self.interrupt.recv() => Signal::Stop,
            _ = self.terminate.recv() => Signal::Stop,
            _ = self.hangup.recv() => Signal::Reload,
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            Signal::Stop
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands() {
        let id = ClientId;
        assert_eq!(
            Command::parse(b"send 3 hi there"),
            Ok(Some(Command::Send(id(3), b"hi there")))
        );
        assert_eq!(
            Command::parse(b"send 3 "),
            Ok(Some(Command::Send(id(3), b"")))
        );
        assert_eq!(
            Command::parse(b"broadcast  two spaces"),
            Ok(Some(Command::Broadcast(b" two spaces")))
        );
        assert_eq!(Command::parse(b"  list"), Ok(Some(Command::List)));
        assert_eq!(Command::parse(b"list "), Ok(Some(Command::List)));
        assert_eq!(Command::parse(b"kick 12"), Ok(Some(Command::Kick(id(12)))));
        assert_eq!(Command::parse(b"help"), Ok(Some(Command::Help)));
        assert_eq!(Command::parse(b"   "), Ok(None));
    }

    #[test]
    fn rejects_bad_commands() {
        let err = |line: &[u8]| Command::parse(line).unwrap_err();
        assert!(err(b"frob 1").starts_with("unknown command `frob`"));
        assert!(err(b"send x hi").starts_with("bad client id `x`"));
        assert!(err(b"send 1").starts_with("usage: send"));
        assert!(err(b"send").starts_with("usage: send"));
        assert!(err(b"kick").starts_with("usage: kick"));
        assert!(err(b"kick -1").starts_with("bad client id"));
        assert!(err(b"broadcast").starts_with("usage: broadcast"));
        assert!(err(b"list all").contains("takes no arguments"));
    }

    #[test]
    fn max_frame_fits_a_signed_length() {
        assert_eq!(frame_size("2147483647"), Ok(i32::MAX as usize));
        assert!(frame_size("2GiB").is_err());
        assert_eq!(frame_size("64KiB"), Ok(65536));
    }
}

//! `sockframe`: a command-line server and client for the tutorial's framing (a 4-byte
//! little-endian length, then the payload).

mod bench;
mod cert;
mod connect;
mod input;
mod output;
mod parse;
mod peer;
mod request;
mod send;
mod send_file;
mod serve;

use std::process::ExitCode;

/// mimalloc instead of the system allocator: with glibc's, every 1 MiB frame that is still
/// held by the application when the next one arrives took a fresh mapping from the kernel
/// (page faults and zero-filling), which halved large-message throughput.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;

/// Asynchronous TCP messaging, one server and many clients, with 4-byte length framing.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// What to do.
    #[command(subcommand)]
    command: Command,
    /// How log lines on stderr look: `text` for people, `json` (one object per line) for a
    /// log collector. Events and replies stay on stdout either way
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Which logs to write, as a level (`error`, `warn`, `info`, `debug`, `trace`) or
    /// `RUST_LOG` directives (`sockframe=debug,warn`); wins over RUST_LOG [default: info for
    /// serve, warn for the others]
    #[arg(long, global = true, value_name = "FILTER")]
    log_level: Option<String>,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// One line per event, for people.
    Text,
    /// One JSON object per event.
    Json,
}

/// Installs the log subscriber: stderr, filtered by `--log-level`, else `RUST_LOG`, else
/// `default`.
fn init_logs(format: LogFormat, level: Option<&str>, default: LevelFilter) -> anyhow::Result<()> {
    let builder = EnvFilter::builder().with_default_directive(default.into());
    let filter = match level {
        Some(level) => builder
            .parse(level)
            .map_err(|e| anyhow::anyhow!("invalid --log-level {level:?}: {e}"))?,
        None => builder.from_env_lossy(),
    };
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, never in a file or a pipe.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(filter);
    match format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    Ok(())
}

/// The subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Run a server: print client events on stdout, take commands on stdin
    // A flag given twice takes its last value: the settings of `--config` are put before
    // the typed flags, which so override them.
    #[command(args_override_self = true)]
    Serve(serve::Args),
    /// Connect interactively: send each stdin line, print each message received
    Connect(connect::Args),
    /// Send messages, wait until they are delivered, and exit
    Send(send::Args),
    /// Send files, wait until the server has verified each, and exit
    SendFile(send_file::Args),
    /// Send one request, print the answer, and exit
    Request(request::Args),
    /// Create a local CA and server and client certificates for TLS
    Cert(cert::Args),
    /// Load a server speaking the framing and measure it (throughput, latency, fan-out)
    Bench(bench::Args),
}

/// What `serve`'s `--config` and `--print-config` leave to do.
enum Settings {
    /// Run with this command line (the file's settings put before the typed flags).
    Run(Vec<std::ffi::OsString>),
    /// The settings were printed: nothing else to do.
    Printed,
}

/// Reads `serve --config` into the command line, and prints it with `--print-config`.
fn serve_settings(args: &serve::Args, argv: &[std::ffi::OsString]) -> anyhow::Result<Settings> {
    let cli = <Cli as clap::CommandFactory>::command();
    let argv = match &args.config {
        Some(path) => serve::file::expand(argv, path, &cli)?,
        None => argv.to_vec(),
    };
    if !args.print_config {
        return Ok(Settings::Run(argv));
    }
    let Command::Serve(args) = Cli::try_parse_from(&argv)?.command else {
        unreachable!("the command line is still serve's");
    };
    let text = serve::file::print(&argv, &cli, &args.secrets()?)?;
    output::print_line(text.trim_end())?;
    Ok(Settings::Printed)
}

/// Runs one subcommand; any error becomes one `error: ...` line on stderr and exit code 1.
#[tokio::main]
async fn main() -> ExitCode {
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let mut cli = Cli::parse_from(&argv);
    if let Command::Serve(args) = &cli.command {
        match serve_settings(args, &argv) {
            Ok(Settings::Run(expanded)) => {
                argv = expanded;
                cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| e.exit());
            }
            Ok(Settings::Printed) => return ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {}", output::error_message(&e));
                return ExitCode::FAILURE;
            }
        }
    }
    // A server's life (listening, limits hit, sessions expired, shutdown) is worth seeing by
    // default; per-connection events are at `debug`. A client command says only what fails.
    let default = match cli.command {
        Command::Serve(_) => LevelFilter::INFO,
        _ => LevelFilter::WARN,
    };
    if let Err(e) = init_logs(cli.log_format, cli.log_level.as_deref(), default) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    // On a worker thread rather than this one (where `block_on` runs it): tasks it wakes,
    // and tasks that wake it, can then run on the same thread without a cross-thread wake-up.
    let run = tokio::spawn(async move {
        match cli.command {
            Command::Serve(args) => serve::run(args).await,
            Command::Connect(args) => connect::run(args).await,
            Command::Send(args) => send::run(args).await,
            Command::SendFile(args) => send_file::run(args).await,
            Command::Request(args) => request::run(args).await,
            Command::Cert(args) => cert::run(args),
            Command::Bench(args) => bench::run(args).await,
        }
    });
    let result = match run.await {
        Ok(result) => result,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Our stdout was piped into `head` or the like, which has read all it wanted.
        Err(e) if output::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", output::error_message(&e));
            ExitCode::FAILURE
        }
    }
}

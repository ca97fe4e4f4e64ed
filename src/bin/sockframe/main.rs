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
}

/// The subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Run a server: print client events on stdout, take commands on stdin
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

/// Runs one subcommand; any error becomes one `error: ...` line on stderr and exit code 1.
#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::builder()
                .with_default_directive(LevelFilter::WARN.into())
                .from_env_lossy(),
        )
        .init();
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

//! The commands `serve` reads on stdin: parsed one line at a time and carried out against
//! the server, in a task of their own.

use std::io;

use anyhow::{Context, Result};
use sockframe::server::{ClientId, Server};
use tokio::sync::mpsc;

use super::printer::Printer;
use crate::input::Line;
use crate::output::{self, print_line};

/// The commands `serve` reads on stdin, for `help` and error messages.
pub(super) const USAGE: &str = "commands: send <id> <text> | broadcast <text> | list | kick <id> | send-file <id> <path> | help";

/// Reads and runs commands until the end of stdin. Returns an error only when stdout fails;
/// a bad command is reported on stderr and the next one read.
pub(super) async fn run_commands(
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
                    Ok(n) if server.config().cluster.is_some() => {
                        eprintln!("broadcast to {n} client(s) here and to the other nodes")
                    }
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
}

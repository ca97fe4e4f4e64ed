//! Reading stdin one line at a time, off the async runtime.
//!
//! A dedicated thread with blocking reads, as tokio's own documentation recommends for
//! interactive input, rather than `tokio::io::stdin`: the library's tokio features do not
//! include `io-std`, and tokio's stdin reads on a blocking-pool thread that the runtime waits
//! for when it is dropped, so a program could not exit while a read is pending. A plain
//! thread simply ends with the process.

use std::io::{self, BufRead};
use std::thread;

use tokio::sync::mpsc;

/// One line of input without its line ending, or the error that ended reading.
pub type Line = io::Result<Vec<u8>>;

/// Starts a thread that reads stdin and sends each line, as bytes (input need not be UTF-8)
/// without its `\n` or `\r\n`, on the returned channel. The channel closes at the end of
/// input, or after reporting a read error.
pub fn lines() -> io::Result<mpsc::Receiver<Line>> {
    // A little slack; beyond it the thread waits, so input that arrives faster than it can
    // be sent is held back by the pipe instead of piling up in memory.
    let (tx, rx) = mpsc::channel(64);
    thread::Builder::new()
        .name("stdin".into())
        .spawn(move || read_lines(io::stdin().lock(), &tx))?;
    Ok(rx)
}

/// Sends each line of `input` on `tx` until the input ends, a read fails, or `tx` closes.
fn read_lines(mut input: impl BufRead, tx: &mpsc::Sender<Line>) {
    loop {
        let mut line = Vec::new();
        let item = match input.read_until(b'\n', &mut line) {
            Ok(0) => return,
            Ok(_) => Ok(strip_line_ending(line)),
            Err(e) => Err(e),
        };
        let last = item.is_err();
        if tx.blocking_send(item).is_err() || last {
            return;
        }
    }
}

/// `line` without a trailing `\n` or `\r\n`.
fn strip_line_ending(mut line: Vec<u8>) -> Vec<u8> {
    if line.last() == Some(&b'\n') {
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_lines_and_strips_endings() {
        let (tx, mut rx) = mpsc::channel(16);
        read_lines(&b"one\ntwo\r\n\nlast\r"[..], &tx);
        let mut got = Vec::new();
        while let Ok(line) = rx.try_recv() {
            got.push(line.unwrap());
        }
        let want: [&[u8]; 4] = [b"one", b"two", b"", b"last\r"];
        assert_eq!(got, want);
    }
}

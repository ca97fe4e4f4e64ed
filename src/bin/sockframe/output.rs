//! How payloads and lines are written to stdout: one message is always exactly one line.

use std::fmt::Write as _;
use std::io::{self, Write};

use serde_json::Value;
use sockframe::Message;

/// A payload as one line of text: valid UTF-8 is shown as text with backslashes and control
/// characters escaped (`\\`, `\n`, `\r`, `\t`, `\u{1b}`); anything else as `hex:` followed
/// by the bytes in lowercase hex.
///
/// A text message that itself reads `hex:...` looks the same as binary data here; `--json`
/// (`text` versus `data_hex`) is the unambiguous form.
///
/// Binary messages of the sockframe protocol are always shown as hex, even when their bytes
/// happen to be UTF-8: binary stays binary.
pub fn payload(message: &Message) -> String {
    match message.as_text() {
        Some(text) => escape(text),
        None => format!("hex:{}", hex(message)),
    }
}

/// A message read from a terminal or script line: text when it is UTF-8, binary otherwise.
pub fn message_from_line(line: Vec<u8>) -> Message {
    match String::from_utf8(line) {
        Ok(text) => Message::text(text),
        Err(e) => Message::binary(e.into_bytes()),
    }
}

/// `text` with backslashes and control characters escaped, so that it fits on one line and
/// the escaping can be undone.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            // The same `\u{..}` form as Rust's own escapes, for every other C0, DEL and C1
            // character: terminals would act on them instead of showing them.
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out
}

/// The bytes as lowercase hex, two digits each, no separators.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// The payload as a JSON field: `text` (unescaped; JSON has its own escaping) for text, and
/// for untyped messages that are valid UTF-8; `data_hex` otherwise.
pub fn payload_field(message: &Message) -> (&'static str, Value) {
    match message.as_text() {
        Some(text) => ("text", Value::from(text)),
        None => ("data_hex", Value::from(hex(message))),
    }
}

/// The message's kind as a JSON field: `text`, `binary` or `untyped` (tutorial framing).
pub fn kind_field(message: &Message) -> (&'static str, Value) {
    let kind = match message.kind() {
        sockframe::MessageKind::Text => "text",
        sockframe::MessageKind::Binary => "binary",
        sockframe::MessageKind::Untyped => "untyped",
    };
    ("kind", Value::from(kind))
}

/// A one-line JSON object with its keys in the order given.
///
/// Built by hand because serde_json's map (without its `preserve_order` feature) sorts keys,
/// and `event` first reads better.
pub fn json_object(fields: &[(&str, Value)]) -> String {
    let mut out = String::from("{");
    for (i, (key, value)) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{}:{value}", Value::from(*key));
    }
    out.push('}');
    out
}

/// Writes `line` and a newline to stdout and flushes.
///
/// Scripts read us through a pipe and act on each line as it comes, so nothing may sit in a
/// buffer. The write blocks the calling task if the reader is slow; for a command-line tool
/// that back-pressure is what we want.
pub fn print_line(line: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(line.as_bytes())?;
    out.write_all(b"\n")?;
    out.flush()
}

/// The error and its causes on one line, as `outer: inner: ...`.
///
/// The walk stops at the library's own [`sockframe::Error`]: its message already includes
/// its cause's (`cannot connect to ADDR: connection refused ...`), and printing that cause
/// again would repeat it.
pub fn error_message(e: &anyhow::Error) -> String {
    let mut parts = Vec::new();
    for cause in e.chain() {
        parts.push(cause.to_string());
        if cause.is::<sockframe::Error>() {
            break;
        }
    }
    parts.join(": ")
}

/// Whether `e` is, at its root, a write to a closed pipe.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_onto_one_line() {
        let untyped = |b: &[u8]| payload(&Message::untyped(b.to_vec()));
        assert_eq!(untyped(b"hello w\xc3\xb6rld"), "hello wörld");
        assert_eq!(untyped(b"a\nb\r\n\tc\\d"), "a\\nb\\r\\n\\tc\\\\d");
        assert_eq!(untyped(b"\x1b[31m\x00\x7f"), "\\u{1b}[31m\\u{0}\\u{7f}");
        assert_eq!(untyped("\u{85}".as_bytes()), "\\u{85}");
        assert_eq!(untyped(b""), "");
        assert_eq!(payload(&Message::text("a\nb")), "a\\nb");
    }

    #[test]
    fn other_bytes_are_hex() {
        assert_eq!(payload(&Message::untyped(vec![0xff, 0x00])), "hex:ff00");
        assert_eq!(payload(&Message::untyped(vec![0xc3])), "hex:c3");
        // Binary stays binary, even when its bytes are UTF-8.
        assert_eq!(payload(&Message::binary(&b"hi"[..])), "hex:6869");
    }

    #[test]
    fn json_fields_keep_their_order() {
        let line = json_object(&[
            ("event", Value::from("message")),
            ("client", Value::from(7)),
            payload_field(&Message::text("a\"b\n")),
        ]);
        assert_eq!(line, r#"{"event":"message","client":7,"text":"a\"b\n"}"#);
        assert_eq!(
            json_object(&[payload_field(&Message::untyped(vec![0xff]))]),
            r#"{"data_hex":"ff"}"#
        );
        assert_eq!(json_object(&[]), "{}");
    }

    #[test]
    fn library_errors_are_not_repeated() {
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        let e = anyhow::Error::from(sockframe::Error::Connect {
            addr: "127.0.0.1:1".into(),
            attempts: 1,
            source: refused,
        });
        assert_eq!(
            error_message(&e),
            "cannot connect to 127.0.0.1:1: connection refused (is `sockframe serve` running?)"
        );
        let e = anyhow::Error::from(sockframe::Error::Undelivered(2)).context("failed to close");
        assert_eq!(
            error_message(&e),
            "failed to close: 2 queued message(s) were not sent before the connection closed"
        );
        let e = anyhow::Error::from(io::Error::other("inner")).context("outer");
        assert_eq!(error_message(&e), "outer: inner");
    }

    #[test]
    fn broken_pipe_is_found_under_context() {
        let e = anyhow::Error::from(io::Error::from(io::ErrorKind::BrokenPipe))
            .context("failed to write to stdout");
        assert!(is_broken_pipe(&e));
        assert!(!is_broken_pipe(&anyhow::anyhow!("other")));
    }
}

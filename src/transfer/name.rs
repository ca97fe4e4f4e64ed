//! Which file names a receiver accepts.
//!
//! A name in an offer comes from the peer and is never used as a path: it must already be
//! a plain file name, or the offer is refused. We **reject rather than sanitise**: quietly
//! turning `../../etc/passwd` into `passwd` or `a/b` into `a_b` would save a file under a
//! name the sender never chose (and two different names could collide on one); a refusal
//! says exactly what was wrong and lets the sender rename the file knowingly.
//!
//! Refused, on every platform (a file received on Linux may be copied to Windows later):
//! - empty names, names longer than 255 bytes;
//! - `.` and `..`, and any name containing `/` or `\` (so no absolute or relative paths);
//! - any `:` (Windows drive prefixes like `C:` and alternate data streams like `a:b`);
//! - control characters (NUL, newline, escape, DEL, C1 controls);
//! - names ending in `.` or a space (Windows drops them, so `a.` would become `a`);
//! - Windows device names `CON`, `PRN`, `AUX`, `NUL`, `COM1`–`COM9`, `LPT1`–`LPT9`, in any
//!   letter case and with any extension (`con.txt` opens the console on Windows);
//! - names starting with `.sockframe-`, which are the receiver's own partial files.

use std::fmt;

/// Longest accepted name, in bytes.
pub const MAX_NAME_LEN: usize = 255;

/// Prefix of a receiver's partial files; offered names may not start with it.
pub(crate) const PART_PREFIX: &str = ".sockframe-";

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadName(&'static str);

impl fmt::Display for BadName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for BadName {}

/// Checks that `name` is a plain file name safe to create in a save directory.
pub fn check_name(name: &str) -> Result<(), BadName> {
    if name.is_empty() {
        return Err(BadName("the name is empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(BadName("the name is longer than 255 bytes"));
    }
    if name == "." || name == ".." {
        return Err(BadName("the name is `.` or `..`"));
    }
    if name.contains(['/', '\\']) {
        return Err(BadName("the name contains a path separator"));
    }
    if name.contains(':') {
        return Err(BadName(
            "the name contains `:` (a drive prefix or stream name)",
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(BadName("the name contains a control character"));
    }
    if name.ends_with(['.', ' ']) {
        return Err(BadName("the name ends with a dot or a space"));
    }
    if is_device_name(name) {
        return Err(BadName("the name is a reserved device name on Windows"));
    }
    if name.starts_with(PART_PREFIX) {
        return Err(BadName("the name is reserved for partial files"));
    }
    Ok(())
}

/// Whether the part before the first dot is a Windows device name.
fn is_device_name(name: &str) -> bool {
    let stem = name.split('.').next().unwrap_or(name).trim_end_matches(' ');
    let upper = stem.to_ascii_uppercase();
    match upper.as_str() {
        "CON" | "PRN" | "AUX" | "NUL" => true,
        _ => {
            let b = upper.as_bytes();
            b.len() == 4
                && (upper.starts_with("COM") || upper.starts_with("LPT"))
                && (b'1'..=b'9').contains(&b[3])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_pass() {
        for ok in [
            "a",
            "report.pdf",
            "backup 2024-01-01.tar.gz",
            ".hidden",
            "héllo wörld.txt",
            "console.txt",
            "COM10",
            "a..b",
            &"x".repeat(255),
        ] {
            assert_eq!(check_name(ok), Ok(()), "{ok:?}");
        }
    }

    #[test]
    fn hostile_names_are_refused() {
        for bad in [
            "",
            ".",
            "..",
            "../../x",
            "/etc/passwd",
            "a/b",
            "a\\b",
            "C:\\x",
            "C:x",
            "file:stream",
            "a\0b",
            "a\nb",
            "a\rb",
            "\u{1b}[31m",
            "\u{85}",
            "CON",
            "con.txt",
            "Nul",
            "lpt1.log",
            "COM9.tar.gz",
            "aux .txt",
            "name.",
            "name ",
            ".sockframe-0123.part",
            &"x".repeat(256),
        ] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}

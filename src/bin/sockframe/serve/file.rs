//! `serve --config FILE.toml` and `serve --print-config`.
//!
//! Every key of the file is the name of a `serve` flag without its dashes, with the flag's
//! value: `max-conns = 1000`, `heartbeat = "5s"`, `discard = true`. The file is read into
//! command-line arguments placed *before* the ones typed, and the serve command lets a later
//! occurrence of a flag override an earlier one; so flags override the file, and every value
//! is checked by the very parser that checks the flag (one set of rules, one set of error
//! messages, and a new flag is a new key without a line written here).
//!
//! Secrets never come from the file: tokens come from `token-file` / `SOCKFRAME_TOKENS`, the
//! admin token from `admin-token-file` / `SOCKFRAME_ADMIN_TOKEN`, so that a config file can
//! be kept in version control. `--print-config` prints the effective settings as a file that
//! `--config` takes back, with the secrets in force shown only as `<hidden>` in comments.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;

use anyhow::{Context, Result, bail};
use clap::ArgAction;

/// The flags that are not settings and so have no key in a file.
const NOT_SETTINGS: &[&str] = &["config", "print-config", "help", "version"];

/// Keys people may expect that hold secrets, and where the secret goes instead.
const SECRET_KEYS: &[(&str, &str)] = &[
    (
        "tokens",
        "token-file or the environment variable SOCKFRAME_TOKENS",
    ),
    (
        "token",
        "token-file or the environment variable SOCKFRAME_TOKENS",
    ),
    (
        "admin-token",
        "admin-token-file or the environment variable SOCKFRAME_ADMIN_TOKEN",
    ),
];

/// The global flags that a file may set too (they are the binary's, not only serve's).
const GLOBAL_KEYS: &[&str] = &["log-format", "log-level"];

/// `argv` (a whole command line, program name first, with `serve` in it) with the settings
/// of the TOML file at `path` inserted right after `serve`, where the typed flags that follow
/// override them. `cli` is the binary's command, to know the flags; an unknown key, a table,
/// or a value the flag's parser refuses is an error naming the file, the line and the key.
pub fn expand(argv: &[OsString], path: &Path, cli: &clap::Command) -> Result<Vec<OsString>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("failed to read the config file {}", path.display()))?;
    let serve = cli
        .find_subcommand("serve")
        .expect("the binary has a serve command");
    let flags = file_flags(&text, path, serve)?;
    // Check the file's flags alone first, so that a bad value is blamed on its line (the
    // typed flags are checked by the parse that follows).
    let mut alone: Vec<OsString> = vec![argv[0].clone(), "serve".into()];
    alone.extend(flags.iter().flat_map(|f| f.args.iter().cloned()));
    if let Err(e) = cli.clone().try_get_matches_from(&alone) {
        use clap::error::{ContextKind, ContextValue, ErrorKind};
        if matches!(
            e.kind(),
            ErrorKind::InvalidValue | ErrorKind::ValueValidation
        ) {
            let arg = match e.get(ContextKind::InvalidArg) {
                Some(ContextValue::String(arg)) => arg.clone(),
                _ => String::new(),
            };
            let culprit = flags.iter().find(|f| {
                arg.starts_with(&format!("--{} ", f.key)) || arg == format!("--{}", f.key)
            });
            let message = e.to_string();
            let message = message
                .lines()
                .next()
                .unwrap_or_default()
                .trim_start_matches("error: ");
            match culprit {
                Some(f) => bail!("{}:{}: `{}`: {message}", path.display(), f.line, f.key),
                None => bail!("{}: {message}", path.display()),
            }
        }
    }
    // Program name, then everything typed, with the file's flags right after `serve`.
    let at = argv
        .iter()
        .position(|a| a == "serve")
        .context("--config is an option of serve")?;
    let mut out = argv[..=at].to_vec();
    out.extend(flags.into_iter().flat_map(|f| f.args));
    out.extend(argv[at + 1..].iter().cloned());
    Ok(out)
}

/// One key of the file as command-line arguments.
struct FileFlag {
    key: String,
    line: usize,
    args: Vec<OsString>,
}

/// The file's keys as flags of `serve`, in the file's order of lines.
fn file_flags(text: &str, path: &Path, serve: &clap::Command) -> Result<Vec<FileFlag>> {
    let table: BTreeMap<String, toml::Spanned<toml::Value>> = toml::from_str(text)
        .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.to_string().trim_end()))?;
    let line_of = |at: usize| text[..at.min(text.len())].matches('\n').count() + 1;
    let mut flags = Vec::new();
    for (key, value) in table {
        let line = line_of(value.span().start);
        let at = format!("{}:{line}", path.display());
        if let Some((_, instead)) = SECRET_KEYS.iter().find(|(k, _)| *k == key) {
            bail!("{at}: `{key}`: secrets are not read from the config file; use {instead}");
        }
        let setting = |name: &str| {
            serve
                .get_arguments()
                .find(|a| a.get_long() == Some(name))
                .filter(|_| !NOT_SETTINGS.contains(&name))
        };
        let arg = setting(&key);
        let is_global = GLOBAL_KEYS.contains(&key.as_str());
        if arg.is_none() && !is_global {
            let kebab = key.replace('_', "-");
            let hint = if kebab != key
                && (setting(&kebab).is_some() || GLOBAL_KEYS.contains(&kebab.as_str()))
            {
                format!(" (keys are spelled like the flags: `{kebab}`)")
            } else {
                String::new()
            };
            bail!("{at}: unknown key `{key}`{hint}; `sockframe serve --help` lists the settings");
        }
        let switch = arg.is_some_and(|a| matches!(a.get_action(), ArgAction::SetTrue));
        let flag = OsString::from(format!("--{key}"));
        let args = match value.into_inner() {
            toml::Value::Boolean(true) if switch => vec![flag],
            toml::Value::Boolean(false) if switch => vec![],
            toml::Value::Boolean(_) => bail!("{at}: `{key}` takes a value, not true or false"),
            _ if switch => bail!("{at}: `{key}` is true or false"),
            toml::Value::String(s) => vec![flag, s.into()],
            toml::Value::Integer(n) => vec![flag, n.to_string().into()],
            toml::Value::Float(x) => vec![flag, x.to_string().into()],
            toml::Value::Datetime(d) => vec![flag, d.to_string().into()],
            toml::Value::Array(_) | toml::Value::Table(_) => {
                bail!("{at}: `{key}` takes one value, not an array or a table")
            }
        };
        flags.push(FileFlag { key, line, args });
    }
    flags.sort_by_key(|f| f.line);
    Ok(flags)
}

/// The effective settings of `serve` parsed from `argv`, as TOML that `--config` reads
/// back. `secrets` names each secret in force (for a comment; its value is never shown).
pub fn print(argv: &[OsString], cli: &clap::Command, secrets: &[&str]) -> Result<String> {
    let matches = cli.clone().try_get_matches_from(argv)?;
    let (_, sub) = matches.subcommand().context("no subcommand")?;
    let serve = cli
        .find_subcommand("serve")
        .expect("the binary has a serve command");
    let mut out = String::from("# sockframe serve: the effective settings\n");
    let mut keys: Vec<(String, String)> = Vec::new();
    for name in GLOBAL_KEYS {
        let id = name.replace('-', "_");
        match matches.get_raw(&id).and_then(|mut v| v.next()) {
            Some(v) => keys.push((name.to_string(), quoted(&v.to_string_lossy()))),
            None => keys.push((format!("# {name}"), "not set".to_string())),
        }
    }
    for arg in serve.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if NOT_SETTINGS.contains(&long) {
            continue;
        }
        let id = arg.get_id().as_str();
        let value = match arg.get_action() {
            ArgAction::SetTrue => Some(sub.get_flag(id).to_string()),
            _ => sub
                .get_raw(id)
                .and_then(|mut v| v.next())
                .map(|v| literal(&v.to_string_lossy())),
        };
        match value {
            Some(v) => keys.push((long.to_string(), v)),
            None => keys.push((format!("# {long}"), "not set".to_string())),
        }
    }
    for (key, value) in keys {
        if key.starts_with('#') {
            out.push_str(&format!("{key}: {value}\n"));
        } else {
            out.push_str(&format!("{key} = {value}\n"));
        }
    }
    for secret in secrets {
        out.push_str(&format!("# {secret}: <hidden>\n"));
    }
    Ok(out)
}

/// A flag's value as a TOML literal: a bare integer when it is one, else a string.
fn literal(value: &str) -> String {
    if value.parse::<i64>().is_ok() {
        value.to_string()
    } else {
        quoted(value)
    }
}

/// A TOML string (escaped by the toml crate).
fn quoted(value: &str) -> String {
    toml::Value::String(value.to_string()).to_string()
}

//! Running `sockframe serve` as an operator does: the admin endpoint from the command line
//! (`--admin`, its token from a file or the environment), logs on stderr (`--log-format`,
//! `--log-level`) that never hold a secret, and the settings from a TOML file (`--config`,
//! `--print-config`, the repository's example `sockframe.toml`).
//!
//! Every process is a real `sockframe` on 127.0.0.1 with OS-picked ports, reaped on drop.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;

use serde_json::Value;

use support::WAIT;
use support::process::{Proc, serve_env};

/// A file in a fresh temporary directory (removed by the OS's tmp cleaning; each test's name
/// is its own).
fn temp_file(test: &str, name: &str, contents: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sockframe-ops-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

/// The admin address that `serve --admin` reports on stderr.
fn admin_addr(server: &mut Proc) -> SocketAddr {
    let line = server.stderr.wait_prefix("admin on http://");
    line["admin on http://".len()..]
        .parse()
        .unwrap_or_else(|e| panic!("bad admin address in {line:?}: {e}"))
}

/// One blocking HTTP/1.1 GET with `Connection: close`: the status and the body.
fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response);
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// `sockframe ARGS...` to its end: exit success, stdout, stderr.
fn run(args: &[&str]) -> (bool, String, String) {
    let mut p = Proc::start(args);
    p.close_stdin();
    let out = p.stdout.rest().join("\n");
    let err = p.stderr.rest().join("\n");
    (p.wait().success(), out, err)
}

#[test]
fn admin_flag_serves_metrics_behind_the_token_from_the_environment() {
    let token = "admin-secret-4f1c9a";
    let (mut server, addr) = serve_env(
        &["--admin", "127.0.0.1:0"],
        &[("SOCKFRAME_ADMIN_TOKEN", token)],
    );
    let admin = admin_addr(&mut server);
    assert_eq!(
        get(admin, "/healthz", None).0,
        200,
        "healthz needs no token"
    );
    assert_eq!(get(admin, "/metrics", None).0, 401);
    assert_eq!(get(admin, "/metrics", Some("wrong")).0, 401);

    // A client and a message, then the counters say so.
    let mut client = TcpStream::connect(addr).unwrap();
    let body = b"counted";
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(body);
    client.write_all(&frame).unwrap();
    server.stdout.wait_prefix("message 1 counted");
    let (status, text) = get(admin, "/metrics", Some(token));
    assert_eq!(status, 200);
    assert!(
        text.lines()
            .any(|l| l == "sockframe_messages_received_total 1"),
        "{text}"
    );
    let (status, clients) = get(admin, "/api/clients", Some(token));
    assert_eq!(status, 200);
    let clients: Value = serde_json::from_str(&clients).unwrap();
    assert_eq!(clients.as_array().map(Vec::len), Some(1), "{clients}");
}

#[test]
fn admin_token_file_is_read_and_an_empty_one_is_refused() {
    let path = temp_file("admin-token", "token", "\n  file-token-77  \n");
    let path = path.to_str().unwrap();
    let (mut server, _) = serve_env(&["--admin", "127.0.0.1:0", "--admin-token-file", path], &[]);
    let admin = admin_addr(&mut server);
    assert_eq!(get(admin, "/api/stats", None).0, 401);
    assert_eq!(get(admin, "/api/stats", Some("file-token-77")).0, 200);

    let empty = temp_file("admin-token", "empty", "\n\n");
    let (ok, _, err) = run(&[
        "serve",
        "--bind",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--admin-token-file",
        empty.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("holds no token"), "{err}");
}

#[test]
fn json_logs_go_to_stderr_and_never_hold_a_secret() {
    let client_token = "client-secret-a8e2";
    let admin_token = "admin-secret-93bd";
    let (mut server, addr) = serve_env(
        &[
            "--admin",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--log-level",
            "trace",
        ],
        &[
            ("SOCKFRAME_TOKENS", client_token),
            ("SOCKFRAME_ADMIN_TOKEN", admin_token),
        ],
    );
    let admin = admin_addr(&mut server);
    let addr = addr.to_string();
    // A client with the right token and one with a wrong one; admin requests with the
    // right token and a wrong one.
    let (ok, _, _) = run_env(
        &["send", &addr, "--protocol", "sockframe", "hello"],
        &[("SOCKFRAME_TOKEN", client_token)],
    );
    assert!(ok);
    let (ok, _, _) = run_env(
        &["send", &addr, "--protocol", "sockframe", "hello"],
        &[("SOCKFRAME_TOKEN", "not-the-token")],
    );
    assert!(!ok);
    assert_eq!(get(admin, "/api/clients", Some(admin_token)).0, 200);
    assert_eq!(get(admin, "/api/clients", Some("nope")).0, 401);
    server.stderr.wait_for("the unauthorized warning", |l| {
        l.contains("\"level\":\"WARN\"") && l.contains("unauthorized")
    });
    server.terminate();
    assert!(server.wait().success());
    let stderr = server.stderr.rest();
    let stdout = server.stdout.rest();
    let mut logs = 0;
    for line in server.stderr.seen.iter().chain(&stdout) {
        assert!(!line.contains(client_token), "client token in {line}");
        assert!(!line.contains(admin_token), "admin token in {line}");
    }
    for line in server.stderr.seen.iter() {
        if line.starts_with('{') {
            let log: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            assert!(
                log["level"].is_string() && log["message"].is_string(),
                "{line}"
            );
            logs += 1;
        }
    }
    assert!(logs > 0, "no JSON log line among {stderr:?}");
    // The event stream stays on stdout, in its own format.
    assert!(
        stdout.iter().any(|l| l.starts_with("disconnected 1")),
        "{stdout:?}"
    );
}

/// [`run`] with extra environment variables.
fn run_env(args: &[&str], envs: &[(&str, &str)]) -> (bool, String, String) {
    let mut p = Proc::start_env(args, envs);
    p.close_stdin();
    let out = p.stdout.rest().join("\n");
    let err = p.stderr.rest().join("\n");
    (p.wait().success(), out, err)
}

#[test]
fn a_bad_log_level_is_refused() {
    let (ok, _, err) = run(&["serve", "--log-level", "loud=[", "--bind", "127.0.0.1:0"]);
    assert!(!ok);
    assert!(err.contains("invalid --log-level"), "{err}");
}

#[test]
fn config_file_settings_apply_and_typed_flags_override_them() {
    let config = temp_file(
        "config-applies",
        "serve.toml",
        "# a comment\nbind = \"127.0.0.1:1\"\nmax-conns = 1\njson = true\n",
    );
    let (mut server, addr) = serve_env(&["--config", config.to_str().unwrap()], &[]);
    // `--bind 127.0.0.1:0`, typed after, won over the file's port 1; `json` came from the file.
    let mut first = TcpStream::connect(addr).unwrap();
    let line = server.stdout.wait_prefix("{");
    let event: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(event["event"], "connected", "{line}");
    // `max-conns = 1`: a second client is closed at once.
    let mut second = TcpStream::connect(addr).unwrap();
    second.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 1];
    assert!(
        matches!(second.read(&mut buf), Ok(0) | Err(_)),
        "the second client should be closed"
    );
    first.write_all(&[1, 0, 0, 0, b'x']).unwrap();
    let line = server.stdout.wait_prefix("{");
    assert!(line.contains("\"message\""), "{line}");
}

#[test]
fn config_file_errors_name_the_key_and_the_line() {
    let cases = [
        (
            "max-conns = 5\nmax-connections = 5\n",
            ":2: unknown key `max-connections`",
        ),
        (
            "max_conns = 5\n",
            "keys are spelled like the flags: `max-conns`",
        ),
        ("\nheartbeat = \"soon\"\n", ":2: `heartbeat`"),
        ("discard = \"yes\"\n", ":1: `discard` is true or false"),
        (
            "tokens = [\"a\"]\n",
            ":1: `tokens`: secrets are not read from the config file",
        ),
        ("[server]\nbind = \"x\"\n", ":1: unknown key `server`"),
        ("bind = \n", "TOML parse error"),
    ];
    for (i, (text, expected)) in cases.iter().enumerate() {
        let path = temp_file("config-errors", &format!("{i}.toml"), text);
        let (ok, _, err) = run(&["serve", "--config", path.to_str().unwrap()]);
        assert!(!ok, "{text:?} was accepted");
        assert!(
            err.contains(expected),
            "{text:?}: expected {expected:?} in {err}"
        );
    }
}

#[test]
fn the_example_config_is_valid_and_print_config_shows_its_values() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/sockframe.toml");
    let (ok, out, err) = run(&[
        "serve",
        "--config",
        example,
        "--max-conns",
        "42",
        "--print-config",
    ]);
    assert!(ok, "{err}");
    let printed: toml::Table = toml::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let file: toml::Table = toml::from_str(&std::fs::read_to_string(example).unwrap()).unwrap();
    for (key, value) in &file {
        let expected = if key == "max-conns" {
            toml::Value::Integer(42) // the typed flag wins
        } else {
            value.clone()
        };
        assert_eq!(printed.get(key), Some(&expected), "{key} in {out}");
    }
    // Defaults are there too, and what is printed is read back unchanged.
    assert_eq!(printed["session-grace"].as_str(), Some("60s"));
    let again = temp_file("print-config", "printed.toml", &out);
    let (ok, out2, err) = run(&[
        "serve",
        "--config",
        again.to_str().unwrap(),
        "--print-config",
    ]);
    assert!(ok, "{err}");
    assert_eq!(out, out2);
}

#[test]
fn print_config_hides_the_secrets() {
    let mut p = Proc::start_env(
        &["serve", "--admin", "127.0.0.1:0", "--print-config"],
        &[
            ("SOCKFRAME_TOKENS", "tok-one-5d1,tok-two-6e2"),
            ("SOCKFRAME_ADMIN_TOKEN", "adm-7f3"),
        ],
    );
    p.close_stdin();
    let out = p.stdout.rest().join("\n");
    assert!(p.wait().success());
    assert!(out.contains("# client tokens: <hidden>"), "{out}");
    assert!(out.contains("# admin token: <hidden>"), "{out}");
    for secret in ["tok-one-5d1", "tok-two-6e2", "adm-7f3"] {
        assert!(!out.contains(secret), "{secret} printed: {out}");
    }
}

/// The soft and hard open file limits of process `pid`, from `/proc/PID/limits`.
#[cfg(target_os = "linux")]
fn nofile_of(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let mut numbers = line["Max open files".len()..].split_whitespace();
    (
        numbers.next().unwrap().to_string(),
        numbers.next().unwrap().to_string(),
    )
}

#[cfg(target_os = "linux")]
#[test]
fn a_file_limit_below_max_conns_is_raised_to_the_hard_limit() {
    let (_, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
    if hard < 2048 {
        eprintln!("skipped: the hard file limit here is {hard}, too low to raise to");
        return;
    }
    let mut server = Proc::start_with_nofile(
        (256, 2048),
        &["serve", "--bind", "127.0.0.1:0", "--max-conns", "1000"],
    );
    let line = server.stderr.wait_for("the limit raised", |l| {
        l.contains("raised the open file limit")
    });
    assert!(
        line.contains("from=256") && line.contains("to=2048") && line.contains("max_conns=1000"),
        "{line}"
    );
    server.stderr.wait_prefix("listening on ");
    assert_eq!(
        nofile_of(server.child.id()),
        ("2048".into(), "2048".into()),
        "the soft limit is the hard one"
    );
    assert!(
        !server.stderr.seen.iter().any(|l| l.contains("WARN")),
        "no warning when raising is enough: {:#?}",
        server.stderr.seen
    );
}

#[cfg(unix)]
#[test]
fn a_file_limit_that_stays_below_max_conns_is_warned_of_with_both_numbers() {
    let mut server = Proc::start_with_nofile(
        (300, 300),
        &["serve", "--bind", "127.0.0.1:0", "--max-conns", "1000"],
    );
    let warning = server
        .stderr
        .wait_for("the warning", |l| l.contains("WARN"));
    assert!(
        warning.contains("open file limit (300)") && warning.contains("--max-conns (1000)"),
        "{warning}"
    );
    // A warning, not a refusal: the server runs.
    let line = server.stderr.wait_prefix("listening on ");
    let addr: SocketAddr = line["listening on ".len()..].parse().unwrap();
    TcpStream::connect(addr).expect("it serves");
}

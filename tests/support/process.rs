//! Child `sockframe` processes for the tests that run the binary: each owned by a [`Proc`],
//! which kills and reaps it when dropped (also when a test panics), with its output read by
//! threads into [`Lines`] so that every wait is bounded by [`WAIT`].

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::WAIT;

/// The lines of one output stream of a child, read by a thread so they can be awaited with a
/// deadline.
pub struct Lines {
    /// Which stream of which process, for failure messages.
    pub name: String,
    pub rx: mpsc::Receiver<String>,
    /// Every line received so far, for failure messages.
    pub seen: Vec<String>,
}

impl Lines {
    pub fn new(name: String, stream: impl Read + Send + 'static) -> Self {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut line = Vec::new();
            while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
                let text = String::from_utf8_lossy(&line);
                if tx
                    .send(text.trim_end_matches(['\n', '\r']).to_string())
                    .is_err()
                {
                    break;
                }
                line.clear();
            }
        });
        Self {
            name,
            rx,
            seen: Vec::new(),
        }
    }

    /// The next line for which `pred` holds, skipping others; panics after [`WAIT`] or at
    /// the end of the stream.
    pub fn wait_for(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            match self
                .rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                    "{}: timed out waiting for {what}; lines so far: {:#?}",
                    self.name, self.seen
                ),
                Err(mpsc::RecvTimeoutError::Disconnected) => panic!(
                    "{}: ended before {what}; lines: {:#?}",
                    self.name, self.seen
                ),
            }
        }
    }

    /// The next line that starts with `prefix`.
    pub fn wait_prefix(&mut self, prefix: &str) -> String {
        self.wait_for(&format!("a line starting with {prefix:?}"), |l| {
            l.starts_with(prefix)
        })
    }

    /// The next line.
    pub fn next_line(&mut self) -> String {
        self.wait_for("a line", |_| true)
    }

    /// The next line, parsed as JSON.
    pub fn next_json(&mut self) -> Value {
        let line = self.wait_for("a line", |_| true);
        serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {line}", self.name))
    }

    /// Every remaining line, until the stream ends (bounded by [`WAIT`]).
    pub fn rest(&mut self) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        let mut rest = Vec::new();
        loop {
            match self
                .rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) => {
                    self.seen.push(line.clone());
                    rest.push(line);
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return rest,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("{}: did not end; lines: {:#?}", self.name, self.seen)
                }
            }
        }
    }
}

/// A running `sockframe` process, killed and reaped on drop.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub stdin: Option<ChildStdin>,
    pub stdout: Lines,
    pub stderr: Lines,
}

impl Proc {
    /// Starts `sockframe args...` with all three standard streams piped.
    pub fn start<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Proc {
        Self::start_env(args, &[])
    }

    /// Like [`start`](Self::start), with extra environment variables.
    pub fn start_env<S: AsRef<std::ffi::OsStr>>(args: &[S], envs: &[(&str, &str)]) -> Proc {
        let name = format!(
            "sockframe {}",
            args.iter()
                .map(|a| a.as_ref().to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ")
        );
        let mut command = Command::new(env!("CARGO_BIN_EXE_sockframe"));
        command.args(args);
        Self::spawn(name, command, envs)
    }

    /// Like [`start`](Self::start), under an open file limit: the soft and hard limits are
    /// set by `sh`'s `ulimit` before it runs `sockframe args...` in its place.
    pub fn start_with_nofile<S: AsRef<std::ffi::OsStr>>(
        (soft, hard): (u64, u64),
        args: &[S],
    ) -> Proc {
        let name = format!(
            "sockframe (ulimit -n {soft}/{hard}) {}",
            args.iter()
                .map(|a| a.as_ref().to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ")
        );
        let mut command = Command::new("sh");
        // The soft limit first: a hard limit below the current soft one is refused.
        command
            .arg("-c")
            .arg(format!(
                "ulimit -Sn {soft} && ulimit -Hn {hard} && exec \"$0\" \"$@\""
            ))
            .arg(env!("CARGO_BIN_EXE_sockframe"))
            .args(args);
        Self::spawn(name, command, &[])
    }

    fn spawn(name: String, mut command: Command, envs: &[(&str, &str)]) -> Proc {
        let mut child = command
            .env_remove("RUST_LOG")
            .env_remove("SOCKFRAME_TOKEN")
            .env_remove("SOCKFRAME_TOKENS")
            .env_remove("SOCKFRAME_ADMIN_TOKEN")
            .envs(envs.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let stdout = Lines::new(format!("{name} (stdout)"), child.stdout.take().unwrap());
        let stderr = Lines::new(format!("{name} (stderr)"), child.stderr.take().unwrap());
        Proc {
            stdin: child.stdin.take(),
            child,
            stdout,
            stderr,
            name,
        }
    }

    /// Writes one line to the child's stdin.
    pub fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("{}: write stdin: {e}", self.name));
    }

    /// Closes the child's stdin (end of input).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits for the child to exit, bounded by [`WAIT`].
    pub fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {WAIT:?}; stderr so far: {:#?}",
                self.name,
                self.stderr.seen
            );
            // std has no wait-with-timeout; poll. (This is not waiting for a state to
            // settle: the exit has either happened or not.)
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends SIGTERM, as `kill` (and service managers) do.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `sockframe serve --bind 127.0.0.1:0 extra...` and returns it with the address it
/// reports listening on.
pub fn serve(extra: &[&str]) -> (Proc, SocketAddr) {
    serve_env(extra, &[])
}

/// Like [`serve`], with extra environment variables.
pub fn serve_env(extra: &[&str], envs: &[(&str, &str)]) -> (Proc, SocketAddr) {
    let mut args = vec!["serve", "--bind", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let mut server = Proc::start_env(&args, envs);
    let line = server.stderr.wait_prefix("listening on ");
    let addr = line["listening on ".len()..]
        .parse()
        .unwrap_or_else(|e| panic!("bad address in {line:?}: {e}"));
    (server, addr)
}

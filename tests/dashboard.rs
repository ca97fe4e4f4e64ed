//! The dashboard in a real browser: `sockframe serve --admin` with a token, three tutorial
//! clients from three loopback addresses, and the page loaded in headless Chromium (Debian's
//! `chromium`; `.ci/run` installs it), driven through the DevTools protocol. The test checks
//! that the rendered page lists every client's address, and that the page's kick button
//! disconnects the client it belongs to (and only that one). It saves a screenshot of the
//! page in `CARGO_TARGET_TMPDIR/dashboard.png`.
//!
//! Every wait is bounded by `WAIT`; the browser and the server are killed and reaped on drop.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use support::WAIT;
use support::process::serve_env;

/// A headless Chromium, killed and reaped on drop, with its profile in a fresh directory.
struct Browser {
    child: Child,
    profile: std::path::PathBuf,
    /// The DevTools HTTP address (`/json/list`).
    devtools: SocketAddr,
}

impl Browser {
    fn start(url: &str) -> Browser {
        let profile =
            std::env::temp_dir().join(format!("sockframe-chromium-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile).unwrap();
        let mut child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1280,1000",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start chromium ({e}): install it with `apt-get install chromium`")
            });
        // Chromium says where DevTools listens on stderr; read it on a thread, so that the
        // wait is bounded, and keep draining the pipe afterwards.
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("DevTools listening on ws://") {
                    let _ = tx.send(rest.split('/').next().unwrap_or_default().to_string());
                }
            }
        });
        let devtools = rx
            .recv_timeout(WAIT)
            .expect("chromium reports its DevTools address")
            .parse()
            .unwrap();
        Browser {
            child,
            profile,
            devtools,
        }
    }

    /// A DevTools session on the browser's first page.
    fn page(&self) -> Page {
        let deadline = Instant::now() + WAIT;
        loop {
            let (_, body) = http(self.devtools, "GET", "/json/list", None);
            let targets: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            let ws = targets.as_array().and_then(|all| {
                all.iter()
                    .find(|t| t["type"] == "page")
                    .and_then(|t| t["webSocketDebuggerUrl"].as_str())
                    .map(str::to_owned)
            });
            if let Some(ws) = ws {
                return Page::connect(&ws);
            }
            assert!(Instant::now() < deadline, "no page target: {body}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// One page's DevTools protocol connection.
struct Page {
    ws: tungstenite::WebSocket<TcpStream>,
    next: u64,
}

impl Page {
    fn connect(url: &str) -> Page {
        let addr = url
            .strip_prefix("ws://")
            .and_then(|r| r.split('/').next())
            .unwrap();
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let (ws, _) = tungstenite::client(url, stream).expect("DevTools websocket");
        Page { ws, next: 0 }
    }

    /// Calls `method` and returns its result (events in between are skipped).
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let request = json!({ "id": id, "method": method, "params": params });
        self.ws
            .send(tungstenite::Message::text(request.to_string()))
            .unwrap();
        let deadline = Instant::now() + WAIT;
        loop {
            assert!(Instant::now() < deadline, "no answer to {method}");
            let message = self.ws.read().expect("DevTools answers");
            let Ok(text) = message.to_text() else {
                continue;
            };
            let reply: Value = serde_json::from_str(text).unwrap_or(Value::Null);
            if reply["id"] == id {
                assert!(reply.get("error").is_none(), "{method}: {reply}");
                return reply["result"].clone();
            }
        }
    }

    /// Evaluates `expression` in the page and returns its value.
    fn eval(&mut self, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true }),
        );
        result["result"]["value"].clone()
    }

    /// Waits until `expression` is true in the page (it renders updates pushed once a
    /// second, so this polls the DOM; bounded by `WAIT`).
    fn wait_until(&mut self, what: &str, expression: &str) {
        let deadline = Instant::now() + WAIT;
        while self.eval(expression) != Value::Bool(true) {
            assert!(
                Instant::now() < deadline,
                "the page never showed {what}; it shows: {}",
                self.eval("document.body.innerText")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// One HTTP/1.1 exchange: status and body. The body is read by its `Content-Length`, as
/// Chromium's DevTools server keeps the connection open despite `Connection: close`.
fn http(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    (&stream).write_all(request.as_bytes()).unwrap();
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line).unwrap();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {status_line:?}"));
    let mut length = None;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse::<usize>().ok();
            }
        }
    }
    let mut body = Vec::new();
    match length {
        Some(n) => {
            body.resize(n, 0);
            reader.read_exact(&mut body).unwrap();
        }
        None => {
            let _ = reader.read_to_end(&mut body);
        }
    }
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A tutorial client connected to `server` from the loopback address `source`.
fn client_from(source: &str, server: SocketAddr) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stream = rt
        .block_on(async {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(format!("{source}:0").parse().unwrap())?;
            socket.connect(server).await
        })
        .unwrap_or_else(|e| panic!("connect from {source}: {e}"));
    let stream = stream.into_std().unwrap();
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream
}

#[test]
fn the_dashboard_lists_clients_and_kicks_one_from_the_page() {
    let token = "dash-token-31c7";
    let (mut server, addr) = serve_env(
        &["--admin", "127.0.0.1:0"],
        &[("SOCKFRAME_ADMIN_TOKEN", token)],
    );
    let line = server.stderr.wait_prefix("admin on http://");
    let admin: SocketAddr = line["admin on http://".len()..].parse().unwrap();

    let sources = ["127.0.0.2", "127.0.0.3", "127.0.0.4"];
    let mut clients = Vec::new();
    for (i, source) in sources.iter().enumerate() {
        let mut stream = client_from(source, addr);
        let local = stream.local_addr().unwrap();
        server
            .stdout
            .wait_prefix(&format!("connected {} {local}", i + 1));
        let text = format!("hello from {source}");
        let mut frame = (text.len() as u32).to_le_bytes().to_vec();
        frame.extend_from_slice(text.as_bytes());
        stream.write_all(&frame).unwrap();
        server
            .stdout
            .wait_prefix(&format!("message {} {text}", i + 1));
        clients.push((stream, local));
    }

    let browser = Browser::start(&format!("http://{admin}/?token={token}"));
    let mut page = browser.page();
    for (_, local) in &clients {
        page.wait_until(
            &format!("client {local}"),
            &format!("document.querySelector('#clients').innerText.includes('{local}')"),
        );
    }
    page.wait_until(
        "3 clients connected",
        "document.getElementById('connected').textContent === '3'",
    );
    let shot = page.call("Page.captureScreenshot", json!({ "format": "png" }));
    let png = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        shot["data"].as_str().expect("screenshot data"),
    )
    .expect("base64 screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    std::fs::write(&path, &png).unwrap();

    // Kick the second client with its row's button.
    let (victim, victim_addr) = &mut clients[1];
    let clicked = page.eval(&format!(
        "(() => {{ const b = document.querySelector('#clients tr[data-addr=\"{victim_addr}\"] button.kick');\
         if (!b) return false; b.click(); return true; }})()"
    ));
    assert_eq!(
        clicked,
        Value::Bool(true),
        "no kick button for {victim_addr}"
    );
    let mut buf = [0u8; 1];
    assert!(
        matches!(victim.read(&mut buf), Ok(0) | Err(_)),
        "the kicked client's connection is closed"
    );
    // Close our end too: the server's close waits (a bounded while) for the peer's.
    victim.shutdown(std::net::Shutdown::Both).unwrap();
    server.stdout.wait_prefix("disconnected 2 kicked");
    page.wait_until(
        "the kicked client gone",
        &format!("!document.querySelector('#clients').innerText.includes('{victim_addr}')"),
    );
    // The others are still there, on the page and on the server.
    for i in [0, 2] {
        let local = clients[i].1;
        assert_eq!(
            page.eval(&format!(
                "document.querySelector('#clients').innerText.includes('{local}')"
            )),
            Value::Bool(true)
        );
    }
    let (status, body) = http(admin, "GET", "/api/clients", Some(token));
    assert_eq!(status, 200);
    let listed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{body}");
}

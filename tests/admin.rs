//! The admin endpoint over real loopback sockets: exact counters after known traffic,
//! the token check, health, the JSON API, a kick, and hostile HTTP that harms no client.

mod support;

use std::net::SocketAddr;

use sockframe::admin::{Admin, AdminConfig};
use sockframe::server::{Server, ServerEvent, ServerEvents};
use sockframe::{DisconnectReason, Message};
use support::raw::connect;
use support::{WAIT, frame, next_event, start_tutorial_server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

const TOKEN: &str = "s3cret-admin-token";

async fn start_admin(server: &Server, token: Option<&str>) -> Admin {
    let config = AdminConfig {
        bind: Some("127.0.0.1:0".parse().unwrap()),
        token: token.map(str::to_owned),
    };
    Admin::start(server.clone(), config)
        .await
        .expect("admin endpoint")
}

/// One HTTP/1.1 exchange with `Connection: close`: the status code and the body.
async fn http(admin: SocketAddr, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut stream = TcpStream::connect(admin).await.unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let response = read_all(&mut stream).await;
    status_and_body(&response)
}

async fn read_all(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    // An error (a reset after a refused request) ends the read with what arrived.
    let _ = timeout(WAIT, stream.read_to_end(&mut out))
        .await
        .expect("the admin endpoint answers in time");
    String::from_utf8_lossy(&out).into_owned()
}

fn status_and_body(response: &str) -> (u16, String) {
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

/// The value of the sample `name` whose labels include `label` (if given).
fn sample(text: &str, name: &str, label: Option<(&str, &str)>) -> f64 {
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
    let found = scrape
        .samples
        .iter()
        .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
        .unwrap_or_else(|| panic!("no sample {name} {label:?} in\n{text}"));
    match found.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => v,
        ref other => panic!("{name}: unexpected {other:?}"),
    }
}

/// Drains events until `pred` matches one; fails after [`WAIT`].
async fn until(events: &mut ServerEvents, mut pred: impl FnMut(&ServerEvent) -> bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = timeout(left, next_event(events))
            .await
            .expect("the event in time");
        if pred(&event) {
            return;
        }
    }
}

#[tokio::test]
async fn metrics_count_exactly_what_happened() {
    let (server, mut events) = start_tutorial_server().await;
    let admin = start_admin(&server, Some(TOKEN)).await;
    let addr = server.local_addr();

    // 100 messages from 3 clients (34 + 33 + 33), 5 bytes each.
    let mut peers = Vec::new();
    for n in [34, 33, 33] {
        let mut peer = connect(addr).await;
        for _ in 0..n {
            peer.write_all(&frame(b"hello")).await.unwrap();
        }
        peers.push(peer);
    }
    let mut seen = 0;
    let mut ids = Vec::new();
    until(&mut events, |e| {
        match e {
            ServerEvent::Connected { client, .. } => ids.push(*client),
            ServerEvent::Message { .. } => seen += 1,
            _ => {}
        }
        seen == 100 && ids.len() == 3
    })
    .await;
    // One message to each, so that sent counts are known too.
    for id in &ids {
        server.send(*id, Message::from("ok")).await.unwrap();
    }
    for peer in &mut peers {
        let mut got = [0u8; 6];
        timeout(WAIT, peer.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got[4..], b"ok");
    }

    // Kick the first one from the admin endpoint, as the dashboard's button does.
    let (status, _) = http(
        admin.local_addr(),
        "POST",
        &format!("/api/clients/{}/kick", ids[0]),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 204);
    until(&mut events, |e| {
        matches!(
            e,
            ServerEvent::Disconnected {
                reason: DisconnectReason::Kicked,
                ..
            }
        )
    })
    .await;
    let (status, _) = http(
        admin.local_addr(),
        "POST",
        "/api/clients/999999/kick",
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 404);

    let (status, text) = http(admin.local_addr(), "GET", "/metrics", Some(TOKEN)).await;
    assert_eq!(status, 200);
    assert_eq!(
        sample(&text, "sockframe_messages_received_total", None),
        100.0
    );
    assert_eq!(sample(&text, "sockframe_bytes_received_total", None), 500.0);
    assert_eq!(sample(&text, "sockframe_messages_sent_total", None), 3.0);
    assert_eq!(sample(&text, "sockframe_bytes_sent_total", None), 6.0);
    assert_eq!(
        sample(&text, "sockframe_connections_accepted_total", None),
        3.0
    );
    let kicked = Some(("reason", "kicked"));
    assert_eq!(sample(&text, "sockframe_disconnects_total", kicked), 1.0);
    let reset = Some(("reason", "reset"));
    assert_eq!(sample(&text, "sockframe_disconnects_total", reset), 0.0);
    let tutorial = Some(("protocol", "tutorial"));
    assert_eq!(sample(&text, "sockframe_clients_connected", tutorial), 2.0);
    let per_ip = Some(("limit", "per_ip"));
    assert_eq!(sample(&text, "sockframe_rejected_total", per_ip), 0.0);
    assert!(text.contains("# TYPE sockframe_request_duration_seconds histogram"));
    assert!(text.contains("# HELP sockframe_messages_received_total "));

    // The JSON API agrees, and lists the two clients left with their addresses.
    let (status, body) = http(admin.local_addr(), "GET", "/api/clients", Some(TOKEN)).await;
    assert_eq!(status, 200);
    let clients: serde_json::Value = serde_json::from_str(&body).unwrap();
    let listed: Vec<String> = clients
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["addr"].as_str().unwrap().to_owned())
        .collect();
    let expected: Vec<String> = peers[1..]
        .iter()
        .map(|p| p.local_addr().unwrap().to_string())
        .collect();
    assert_eq!(listed, expected);
    let (_, body) = http(admin.local_addr(), "GET", "/api/stats", Some(TOKEN)).await;
    let stats: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(stats["messages_in"], 100);
    assert_eq!(stats["disconnects"]["kicked"], 1);
    admin.stop().await;
}

#[tokio::test]
async fn the_token_guards_every_route_but_healthz() {
    let (server, _events) = start_tutorial_server().await;
    let admin = start_admin(&server, Some(TOKEN)).await;
    let at = admin.local_addr();
    for path in ["/", "/metrics", "/readyz", "/api/clients", "/api/stats"] {
        assert_eq!(
            http(at, "GET", path, None).await.0,
            401,
            "{path} without a token"
        );
        assert_eq!(
            http(at, "GET", path, Some("wrong")).await.0,
            401,
            "{path} with a wrong one"
        );
        assert_eq!(
            http(at, "GET", path, Some(TOKEN)).await.0,
            200,
            "{path} with the token"
        );
    }
    assert_eq!(http(at, "POST", "/api/clients/1/kick", None).await.0, 401);
    // The dashboard's event stream passes the token in the query.
    assert_eq!(
        http(at, "GET", &format!("/metrics?token={TOKEN}"), None)
            .await
            .0,
        200
    );
    assert_eq!(
        http(at, "GET", "/healthz", None).await,
        (200, "ok\n".into())
    );
    assert_eq!(http(at, "GET", "/nothing-here", Some(TOKEN)).await.0, 404);

    // Draining: healthz says so while the server shuts down.
    server.shutdown().await;
    assert_eq!(http(at, "GET", "/healthz", None).await.0, 503);
    admin.stop().await;
}

#[tokio::test]
async fn hostile_http_gets_4xx_and_messaging_goes_on() {
    let (server, mut events) = start_tutorial_server().await;
    let admin = start_admin(&server, None).await;
    let at = admin.local_addr();

    // A messaging client, connected before the attack, keeps being served through it.
    let mut good = connect(server.local_addr()).await;
    good.write_all(&frame(b"before")).await.unwrap();
    until(&mut events, |e| matches!(e, ServerEvent::Message { .. })).await;

    // Slow headers: a few bytes, then nothing (cut by the header timeout).
    let mut slow = Vec::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(at).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        slow.push(s);
    }
    // Garbage instead of a request line.
    let mut garbage = TcpStream::connect(at).await.unwrap();
    garbage
        .write_all(b"\x00\x01\x02 not http at all\r\n\r\n")
        .await
        .unwrap();
    let (status, _) = status_and_body(&read_all(&mut garbage).await);
    assert_eq!(status, 400);
    // A huge body.
    let mut huge = TcpStream::connect(at).await.unwrap();
    huge.write_all(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let _ = huge.write_all(&vec![b'x'; 64 * 1024]).await;
    let (status, _) = status_and_body(&read_all(&mut huge).await);
    assert!((400..500).contains(&status), "huge body: {status}");
    // A header block larger than the endpoint buffers.
    let mut long = TcpStream::connect(at).await.unwrap();
    let header = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Long: {}\r\n\r\n",
        "a".repeat(200_000)
    );
    let _ = long.write_all(header.as_bytes()).await;
    let (status, _) = status_and_body(&read_all(&mut long).await);
    assert!((400..500).contains(&status), "long headers: {status}");

    // The messaging client is unaffected: a round trip through the server works.
    let id = server.clients()[0].id;
    good.write_all(&frame(b"during")).await.unwrap();
    until(&mut events, |e| matches!(e, ServerEvent::Message { .. })).await;
    server.send(id, Message::from("still here")).await.unwrap();
    let mut got = [0u8; 14];
    timeout(WAIT, good.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got[4..], b"still here");

    // The slow-header peers are cut (by the header timeout) rather than kept forever.
    for s in &mut slow {
        let mut rest = Vec::new();
        let read = timeout(WAIT, s.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "a slow-header peer is cut");
    }
    // And the endpoint still answers.
    assert_eq!(http(at, "GET", "/healthz", None).await.0, 200);
    admin.stop().await;
}

#[tokio::test]
async fn transfers_in_progress_and_client_state_are_listed() {
    use sockframe::client::{Client, ClientConfig, ClientEvent};
    use sockframe::transfer::{Direction, TransferConfig};
    use support::transfer::{TempDir, generate};

    let dir = TempDir::new("admin-transfers");
    let (src, save) = (dir.sub("src"), dir.sub("save"));
    generate(&src.join("pushed.bin"), 1 << 20, 7);
    let (server, mut events) = support::start_server().await;
    let admin = start_admin(&server, Some(TOKEN)).await;
    let at = admin.local_addr();
    let mut config = ClientConfig::new(server.local_addr().to_string());
    config.transfer = TransferConfig::receive_into(&save);
    config.reconnect = true; // and so a lossless session
    let mut client = Client::connect(config).await.unwrap();
    let id = support::next_connected(&mut events).await;

    // A sockframe client has a session, connected now, and nothing queued.
    let (_, body) = http(at, "GET", "/api/clients", Some(TOKEN)).await;
    let clients: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(clients[0]["session"], "connected", "{body}");
    assert_eq!(clients[0]["queued"], 0, "{body}");

    // The server offers a file; until the client accepts, it is in progress with 0 done.
    let handle = server.send_file(id, src.join("pushed.bin")).await.unwrap();
    let offer = timeout(WAIT, async {
        loop {
            if let ClientEvent::FileOffer(offer) = client.recv().await.expect("client events") {
                return offer;
            }
        }
    })
    .await
    .unwrap();
    let listed = server.transfers();
    assert_eq!(listed.len(), 1, "{listed:?}");
    let (client_id, status) = &listed[0];
    assert_eq!(*client_id, id);
    assert_eq!(
        (
            status.name.as_str(),
            status.size,
            status.done,
            status.direction
        ),
        ("pushed.bin", 1 << 20, 0, Direction::Sending)
    );
    let (status, body) = http(at, "GET", "/api/transfers", Some(TOKEN)).await;
    assert_eq!(status, 200);
    let transfers: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(transfers[0]["name"], "pushed.bin", "{body}");
    assert_eq!(transfers[0]["direction"], "sending", "{body}");
    assert_eq!(transfers[0]["size"], 1 << 20, "{body}");
    assert_eq!(http(at, "GET", "/api/transfers", None).await.0, 401);

    // Accepted and verified: it leaves the list.
    offer.accept();
    timeout(WAIT, handle.finish()).await.unwrap().unwrap();
    assert!(server.transfers().is_empty());
    let (_, body) = http(at, "GET", "/api/transfers", Some(TOKEN)).await;
    assert_eq!(body.trim(), "[]");
    client.close().await.unwrap();
    admin.stop().await;
}

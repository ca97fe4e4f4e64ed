//! Lossless sessions over real loopback sockets, most of them through a proxy that cuts the
//! connection at random moments (`support::proxy`): nothing lost, duplicated or reordered;
//! expiry reported with the count that may be lost; hijacks refused; no leaks.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use sockframe::client::{Backoff, Client, ClientConfig, ClientEvent};
use sockframe::protocol::message::{
    self as wire, Frame, Hello, RejectCode, SessionGrant, SessionRequest, SessionToken,
};
use sockframe::server::{ClientId, Server, ServerConfig, ServerEvent, ServerEvents};
use sockframe::{DisconnectReason, Message};
use support::proxy::{FaultConfig, FaultProxy};
use support::{WAIT, config, frame, next_event, rss_bytes, start_server_with, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// A client that reconnects at once (the proxy's cuts come every few milliseconds) and so
/// asks for a session.
fn session_client(addr: SocketAddr) -> ClientConfig {
    ClientConfig {
        reconnect: true,
        reconnect_backoff: Backoff {
            initial: Duration::from_millis(2),
            max: Duration::from_millis(50),
            deadline: Some(Duration::from_secs(60)),
            ..Backoff::default()
        },
        handshake_timeout: Duration::from_secs(2),
        ..ClientConfig::new(addr.to_string())
    }
}

/// Where a receiver is in a numbered stream; fails on a gap, a duplicate or a reordering.
#[derive(Debug, Default)]
struct Sequence {
    next: u64,
}

impl Sequence {
    fn check(&mut self, message: &Message, side: &str) {
        let n: u64 = message
            .as_text()
            .and_then(|t| t.split(':').next()?.parse().ok())
            .unwrap_or_else(|| panic!("{side}: not a number: {message:?}"));
        assert_eq!(n, self.next, "{side}: expected {}, got {n}", self.next);
        self.next += 1;
    }
}

/// Receives on the server until `n` numbered messages arrived from `id`; counts suspensions.
async fn server_receives(
    events: &mut ServerEvents,
    id: ClientId,
    n: u64,
    mut progress: impl FnMut(u64),
) -> u64 {
    let mut seq = Sequence::default();
    let mut suspended = 0;
    while seq.next < n {
        match next_event(events).await {
            ServerEvent::Message { client, message } => {
                assert_eq!(client, id, "one client id for the whole session");
                seq.check(&message, "server");
                progress(seq.next);
            }
            ServerEvent::Suspended { client, .. } => {
                assert_eq!(client, id);
                suspended += 1;
            }
            ServerEvent::Resumed { client, .. } => assert_eq!(client, id),
            other => panic!("server: unexpected {other:?}"),
        }
    }
    suspended
}

/// Receives on the client until `n` numbered messages arrived; counts drops.
async fn client_receives(client: &mut Client, n: u64) -> u64 {
    let mut seq = Sequence::default();
    let mut drops = 0;
    while seq.next < n {
        let event = timeout(WAIT, client.recv())
            .await
            .expect("client: timed out")
            .expect("client: event stream ended");
        match event {
            ClientEvent::Message(message) => seq.check(&message, "client"),
            ClientEvent::Disconnected { .. } => drops += 1,
            ClientEvent::Resumed { .. } | ClientEvent::Reconnecting { .. } => {}
            // The first connection's notice; any later one would mean a new session.
            ClientEvent::Connected { .. } if seq.next == 0 && drops == 0 => {}
            other => panic!("client: unexpected {other:?}"),
        }
    }
    drops
}

/// Message `i` of a numbered stream: the number, then padding, so that 100,000 of them take
/// long enough for the proxy to cut many times.
fn numbered(i: u64) -> String {
    format!("{i}:{:x<200}", "")
}

/// Sends `0..n` from the server to `id`, then waits until the client acknowledged them all.
fn server_sends(server: &Server, id: ClientId, n: u64) -> tokio::task::JoinHandle<()> {
    let server = server.clone();
    tokio::spawn(async move {
        for i in 0..n {
            server.send(id, numbered(i)).await.expect("server send");
        }
        server.flush(id).await.expect("server flush");
    })
}

/// Sends `0..n` from the client, then waits until the server acknowledged them all.
fn client_sends(client: &Client, n: u64) -> tokio::task::JoinHandle<()> {
    let sender = client.sender();
    tokio::spawn(async move {
        for i in 0..n {
            sender.send(numbered(i)).await.expect("client send");
        }
        sender.flush().await.expect("client flush");
    })
}

async fn connected(events: &mut ServerEvents) -> ClientId {
    match next_event(events).await {
        ServerEvent::Connected { client, .. } => client,
        other => panic!("expected Connected, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_thousand_messages_each_way_survive_random_cuts() {
    const N: u64 = 100_000;
    let (server, mut events) = start_server_with(config()).await;
    // Cuts every 20–200 ms, in the middle of frames as often as not.
    let proxy = FaultProxy::start(server.local_addr(), FaultConfig::default()).await;
    let mut client = Client::connect(session_client(proxy.addr())).await.unwrap();
    let id = connected(&mut events).await;

    let to_client = server_sends(&server, id, N);
    let to_server = client_sends(&client, N);
    let (suspended, drops) = tokio::join!(
        // Random cuts alone depend on how long the transfer takes (a faster library saw
        // only 4 in one run); these make sure there are several, spread over the stream.
        server_receives(&mut events, id, N, |got| {
            if got % (N / 8) == 0 {
                proxy.cut_all();
            }
        }),
        client_receives(&mut client, N),
    );
    timeout(WAIT, to_client).await.unwrap().unwrap();
    timeout(WAIT, to_server).await.unwrap().unwrap();
    eprintln!(
        "{N} messages each way through {} cuts ({} connections): server saw {suspended} \
         suspensions, client {drops} drops",
        proxy.cuts(),
        proxy.connections()
    );
    assert!(
        proxy.cuts() >= 5,
        "the proxy must actually have cut: {}",
        proxy.cuts()
    );
    assert!(drops >= 1 && suspended >= 1);
    assert_eq!(client.server_assigned_id(), Some(id.0));

    proxy.set_cutting(false);
    client.close().await.unwrap();
    match wait_for(&mut events, |e| {
        matches!(e, ServerEvent::Disconnected { .. })
    })
    .await
    {
        ServerEvent::Disconnected { client, reason } => {
            assert_eq!((client, reason), (id, DisconnectReason::ClosedByPeer));
        }
        _ => unreachable!(),
    }
    proxy.shutdown().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_and_responses_in_flight_survive_random_cuts() {
    const N: u64 = 20_000;
    let (server, mut events) = start_server_with(config()).await;
    let proxy = FaultProxy::start(
        server.local_addr(),
        FaultConfig {
            cut_every: (Duration::from_millis(5), Duration::from_millis(40)),
            ..FaultConfig::default()
        },
    )
    .await;
    let mut client = Client::connect(ClientConfig {
        request_timeout: WAIT,
        ..session_client(proxy.addr())
    })
    .await
    .unwrap();
    let id = connected(&mut events).await;

    // The server's application answers every request; the client's too.
    let answering = tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            if let ServerEvent::Request { request, .. } = event {
                let answer = format!("re {}", request.message().as_text().unwrap());
                let _ = request.respond(answer).await;
            }
        }
    });
    let sender = client.sender();
    let client_answers = tokio::spawn(async move {
        while let Some(event) = client.recv().await {
            if let ClientEvent::Request(request) = event {
                let answer = format!("re {}", request.message().as_text().unwrap());
                let _ = request.respond(answer).await;
            }
        }
    });
    let from_client = futures_util::stream::iter(0..N)
        .map(|i| {
            let sender = sender.clone();
            async move { (i, sender.request(i.to_string()).await) }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>();
    let from_server = futures_util::stream::iter(0..N)
        .map(|i| {
            let server = server.clone();
            async move { (i, server.request(id, i.to_string()).await) }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>();
    let (a, b) = timeout(Duration::from_secs(120), async {
        tokio::join!(from_client, from_server)
    })
    .await
    .expect("requests finish");
    for (i, answer) in a.into_iter().chain(b) {
        assert_eq!(
            answer.expect("answered").as_text(),
            Some(&*format!("re {i}"))
        );
    }
    eprintln!("{N} requests each way through {} cuts", proxy.cuts());
    assert!(proxy.cuts() >= 1);
    proxy.set_cutting(false);
    server.shutdown().await;
    let _ = timeout(WAIT, answering).await;
    // The client would try to reconnect to the stopped server for its whole backoff
    // deadline: drop it instead of waiting.
    client_answers.abort();
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_cuts_leak_no_tasks_or_memory() {
    const CUTS: u64 = 2_000;
    let (server, mut events) = start_server_with(config()).await;
    let proxy = FaultProxy::start(
        server.local_addr(),
        FaultConfig {
            cut_every: (Duration::from_millis(1), Duration::from_millis(6)),
            ..FaultConfig::default()
        },
    )
    .await;
    proxy.set_cutting(false);
    let mut client = Client::connect(session_client(proxy.addr())).await.unwrap();
    let id = connected(&mut events).await;
    // Warm up (allocator arenas, buffers), then take the baseline.
    server.send(id, "warm").await.unwrap();
    client.send("warm").await.unwrap();
    support::next_message(&mut client).await;
    wait_for(&mut events, |e| matches!(e, ServerEvent::Message { .. })).await;
    tokio::time::sleep(Duration::from_millis(100)).await; // let the warm-up's tasks settle
    let tasks_before = support::leak::alive_tasks();
    let rss_before = rss_bytes();

    proxy.set_cutting(true);
    let mut sent = 0u64;
    let (mut to_server, mut to_client) = (Sequence::default(), Sequence::default());
    let started = std::time::Instant::now();
    // Traffic both ways in rounds, until the proxy has cut often enough.
    // The last round runs with cutting off, so that the counts and the close below find a
    // link that is up, not one cut a moment ago and still being resumed.
    let mut last_round = false;
    while !last_round {
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "only {} cuts in 240 s",
            proxy.cuts()
        );
        if proxy.cuts() >= CUTS {
            proxy.set_cutting(false);
            last_round = true;
        }
        for _ in 0..50 {
            server.send(id, sent.to_string()).await.unwrap();
            client.send(sent.to_string()).await.unwrap();
            sent += 1;
        }
        while to_client.next < sent {
            match timeout(WAIT, client.recv()).await.unwrap().unwrap() {
                ClientEvent::Message(m) => to_client.check(&m, "client"),
                ClientEvent::SessionExpired { .. } => panic!("session expired"),
                _ => {}
            }
        }
        while to_server.next < sent {
            match next_event(&mut events).await {
                ServerEvent::Message { message, .. } => to_server.check(&message, "server"),
                ServerEvent::Disconnected { reason, .. } => panic!("disconnected: {reason}"),
                _ => {}
            }
        }
    }
    eprintln!(
        "{} cuts, {sent} messages each way, in {:?}",
        proxy.cuts(),
        started.elapsed()
    );
    // Every old connection's task has ended (the parked ones when their session was taken
    // over): the same number of tasks as before, give or take the current connection's.
    let tasks_after = support::leak::settle_alive_tasks(tasks_before, WAIT).await;
    assert!(
        tasks_after <= tasks_before + 2,
        "tasks: {tasks_before} before, {tasks_after} after"
    );
    let grown = rss_bytes().saturating_sub(rss_before);
    assert!(grown < 64 << 20, "resident memory grew by {grown} bytes");
    client.close().await.unwrap();
    proxy.shutdown().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_reports_what_may_be_lost_on_both_sides() {
    let (server, mut events) = start_server_with(ServerConfig {
        session_grace: Some(Duration::from_millis(300)),
        ..config()
    })
    .await;
    let proxy = FaultProxy::start(server.local_addr(), FaultConfig::no_cuts()).await;
    let mut client = Client::connect(ClientConfig {
        handshake_timeout: Duration::from_millis(200),
        ..session_client(proxy.addr())
    })
    .await
    .unwrap();
    let id = connected(&mut events).await;
    server.send(id, "before").await.unwrap();
    assert_eq!(support::next_message(&mut client).await, "before");
    client.send("before").await.unwrap();
    wait_for(&mut events, |e| matches!(e, ServerEvent::Message { .. })).await;
    // Everything so far is acknowledged.
    client.flush().await.unwrap();
    server.flush(id).await.unwrap();

    // Nothing gets through from now on: 7 messages from the server and 5 from the client
    // are sent and never acknowledged.
    proxy.blackhole(true);
    for i in 0..7 {
        server.send(id, format!("lost {i}")).await.unwrap();
    }
    for i in 0..5 {
        client.send(format!("lost {i}")).await.unwrap();
    }
    // Give both writers the chance to put them on the wire, then cut. The client keeps
    // reconnecting, but its hellos vanish in the black hole, past the grace period.
    tokio::time::sleep(Duration::from_millis(50)).await;
    proxy.cut_all();
    match wait_for(&mut events, |e| {
        matches!(e, ServerEvent::Disconnected { .. })
    })
    .await
    {
        ServerEvent::Disconnected { client, reason } => {
            assert_eq!(client, id);
            assert_eq!(reason, DisconnectReason::SessionExpired { undelivered: 7 });
        }
        _ => unreachable!(),
    }
    assert!(server.client(id).is_none(), "an expired client is gone");

    // The client comes back, is told its session is gone, and starts a new one.
    proxy.blackhole(false);
    let undelivered = timeout(WAIT, async {
        loop {
            match client.recv().await.expect("client events") {
                ClientEvent::SessionExpired { undelivered } => return undelivered,
                ClientEvent::Message(m) => panic!("nothing should arrive: {m:?}"),
                _ => {}
            }
        }
    })
    .await
    .expect("the client hears of the expiry");
    assert_eq!(undelivered, 5);
    let new_id = connected(&mut events).await;
    assert_ne!(new_id, id, "a new session has a new id");
    timeout(WAIT, async {
        while client.server_assigned_id() != Some(new_id.0) {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    server.send(new_id, "again").await.unwrap();
    assert_eq!(support::next_message(&mut client).await, "again");
    client.close().await.unwrap();
    proxy.shutdown().await;
    server.shutdown().await;
}

/// Writes a hello asking for `session` with `token`, and returns the server's answer.
async fn raw_hello(
    addr: SocketAddr,
    token: &'static [u8],
    session: SessionRequest,
) -> (TcpStream, Frame) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let hello = Hello {
        session,
        ..Hello::new("raw", Bytes::from_static(token))
    };
    stream
        .write_all(&frame(&wire::encode_hello(&hello)))
        .await
        .unwrap();
    let answer = timeout(WAIT, async {
        let mut len = [0u8; 4];
        stream.read_exact(&mut len).await.unwrap();
        let mut payload = vec![0u8; u32::from_le_bytes(len) as usize];
        stream.read_exact(&mut payload).await.unwrap();
        wire::parse(&Bytes::from(payload)).unwrap()
    })
    .await
    .expect("an answer to the hello");
    (stream, answer)
}

fn granted(answer: Frame) -> SessionToken {
    match answer {
        Frame::Welcome(w) => match w.session {
            SessionGrant::New(token) => {
                assert_eq!(token.id, w.client_id);
                token
            }
            other => panic!("expected a new session, got {other:?}"),
        },
        other => panic!("expected a welcome, got {other:?}"),
    }
}

fn assert_refused(answer: Frame) {
    match answer {
        Frame::Reject { code, text } => {
            assert_eq!(code, RejectCode::SessionUnknown);
            assert_eq!(text, "session expired or unknown");
        }
        other => panic!("expected a reject, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hijacks_and_guesses_resume_nothing() {
    let (server, mut events) = start_server_with(ServerConfig {
        tokens: vec![Bytes::from_static(b"alice"), Bytes::from_static(b"bob")],
        ..config()
    })
    .await;
    let addr = server.local_addr();
    let (mut alice, answer) = raw_hello(addr, b"alice", SessionRequest::New).await;
    let token = granted(answer);
    let alice_id = connected(&mut events).await;
    assert_eq!(alice_id.0, token.id);

    // Bob, a legitimate user, presents Alice's session token: refused.
    let (_, answer) = raw_hello(addr, b"bob", SessionRequest::Resume { token, received: 0 }).await;
    assert_refused(answer);
    // A guessed secret for Alice's id: refused.
    let guess = SessionToken::new(token.id, [0x42; 16]);
    for who in [&b"alice"[..], b"bob"] {
        let who: &'static [u8] = if who == b"alice" { b"alice" } else { b"bob" };
        let (_, answer) = raw_hello(
            addr,
            who,
            SessionRequest::Resume {
                token: guess,
                received: 0,
            },
        )
        .await;
        assert_refused(answer);
    }
    // An id that has no session at all.
    let (_, answer) = raw_hello(
        addr,
        b"alice",
        SessionRequest::Resume {
            token: SessionToken::new(9_999, [0; 16]),
            received: 0,
        },
    )
    .await;
    assert_refused(answer);

    // Alice was never disturbed: her connection still works.
    server.send(alice_id, "still yours").await.unwrap();
    let mut len = [0u8; 4];
    timeout(WAIT, alice.read_exact(&mut len))
        .await
        .unwrap()
        .unwrap();
    let mut payload = vec![0u8; u32::from_le_bytes(len) as usize];
    alice.read_exact(&mut payload).await.unwrap();
    assert_eq!(
        wire::parse(&Bytes::from(payload)).unwrap(),
        Frame::Message {
            kind: wire::Kind::Text,
            body: Bytes::from_static(b"still yours")
        }
    );

    // Alice herself, with the right token, resumes (taking the session over from her old
    // connection, which the server has not seen drop).
    let (_, answer) = raw_hello(
        addr,
        b"alice",
        SessionRequest::Resume { token, received: 1 },
    )
    .await;
    match answer {
        Frame::Welcome(w) => {
            assert_eq!(w.client_id, alice_id.0);
            assert_eq!(
                w.session,
                SessionGrant::Resumed { token, received: 0 },
                "nothing of Alice's has arrived yet"
            );
        }
        other => panic!("expected a welcome, got {other:?}"),
    }
    match wait_for(&mut events, |e| matches!(e, ServerEvent::Resumed { .. })).await {
        ServerEvent::Resumed { client, .. } => assert_eq!(client, alice_id),
        _ => unreachable!(),
    }
    // No other session was ever created by the attempts.
    assert_eq!(server.client_count(), 1);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_never_logged_or_shown_in_full() {
    let (server, mut events) = start_server_with(config()).await;
    let (_stream, answer) = raw_hello(server.local_addr(), b"", SessionRequest::New).await;
    let token = granted(answer);
    connected(&mut events).await;
    // What the library prints of a token is its id only.
    let shown = format!("{token} {token:?}");
    assert!(shown.contains(&token.id.to_string()));
    assert!(!shown.to_lowercase().contains("secret:"), "{shown}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_reconnect_ask_for_no_session() {
    let (server, mut events) = start_server_with(config()).await;
    let client = Client::connect(ClientConfig::new(server.local_addr().to_string()))
        .await
        .unwrap();
    let id = connected(&mut events).await;
    drop(client);
    // No session to keep: the server reports the end at once, not after a grace period.
    match timeout(Duration::from_secs(3), async {
        wait_for(&mut events, |e| {
            matches!(e, ServerEvent::Disconnected { .. })
        })
        .await
    })
    .await
    .expect("prompt disconnect")
    {
        ServerEvent::Disconnected { client, .. } => assert_eq!(client, id),
        _ => unreachable!(),
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_session_client_ends_its_session_at_once() {
    let (server, mut events) = start_server_with(config()).await;
    let client = Client::connect(session_client(server.local_addr()))
        .await
        .unwrap();
    let id = connected(&mut events).await;
    drop(client);
    // Dropping the client says goodbye (a CLOSE frame): the session is not kept.
    match timeout(Duration::from_secs(3), async {
        wait_for(&mut events, |e| {
            matches!(
                e,
                ServerEvent::Disconnected { .. } | ServerEvent::Suspended { .. }
            )
        })
        .await
    })
    .await
    .expect("prompt disconnect")
    {
        ServerEvent::Disconnected { client, .. } => assert_eq!(client, id),
        other => panic!("expected Disconnected, got {other:?}"),
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspended_sessions_are_bounded() {
    // With room for one suspended session, a second dropped client's session ends at once.
    let (server, mut events) = start_server_with(ServerConfig {
        max_suspended: 1,
        ..config()
    })
    .await;
    let proxy = FaultProxy::start(server.local_addr(), FaultConfig::no_cuts()).await;
    proxy.blackhole(true);
    let mut clients = Vec::new();
    for _ in 0..2 {
        proxy.blackhole(false);
        clients.push(Client::connect(session_client(proxy.addr())).await.unwrap());
        connected(&mut events).await;
    }
    // Both links cut, and the clients kept away (their hellos vanish).
    proxy.blackhole(true);
    proxy.cut_all();
    let mut seen = Vec::new();
    for _ in 0..2 {
        seen.push(
            wait_for(&mut events, |e| {
                matches!(
                    e,
                    ServerEvent::Suspended { .. } | ServerEvent::Disconnected { .. }
                )
            })
            .await,
        );
    }
    let suspended = seen
        .iter()
        .filter(|e| matches!(e, ServerEvent::Suspended { .. }))
        .count();
    assert_eq!(suspended, 1, "{seen:?}");
    drop(clients);
    proxy.shutdown().await;
    server.shutdown().await;
}

/// A server with a short session grace (so that a session left parked ends, and fails a
/// test, quickly), a proxy in front of it, and a session client through the proxy.
async fn proxied_session() -> (Server, ServerEvents, FaultProxy, Client) {
    // Long enough for a reconnect on a loaded CI machine (2 s once expired a session that a
    // close was about to resume), short against the tests' 20 s waits.
    let (server, mut events) = start_server_with(ServerConfig {
        session_grace: Some(Duration::from_secs(8)),
        ..config()
    })
    .await;
    let proxy = FaultProxy::start(server.local_addr(), FaultConfig::no_cuts()).await;
    let client = Client::connect(session_client(proxy.addr())).await.unwrap();
    connected(&mut events).await;
    (server, events, proxy, client)
}

/// The texts of the messages the server reports until the client is disconnected, and why.
async fn texts_until_disconnected(events: &mut ServerEvents) -> (Vec<String>, DisconnectReason) {
    let mut got = Vec::new();
    loop {
        match next_event(events).await {
            ServerEvent::Message { message, .. } => {
                got.push(message.as_text().expect("text").to_string())
            }
            ServerEvent::Disconnected { reason, .. } => return (got, reason),
            _ => {}
        }
    }
}

/// A close whose link is cut while the server has not had everything: the client resumes
/// its session and finishes the close there, so `close` returns `Ok` only with every
/// message delivered, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_cut_short_resumes_and_delivers_everything() {
    let (server, mut events, proxy, client) = proxied_session().await;
    client.send("before").await.unwrap();
    client.flush().await.unwrap();

    // Held by the proxy: written by the client, not yet received by the server.
    proxy.blackhole(true);
    for i in 0..5 {
        client.send(format!("held {i}")).await.unwrap();
    }
    let closing = tokio::spawn(client.close());
    // Any moment is a valid one to cut; this one lets the close write its queue and its
    // close frame into the black hole first.
    tokio::time::sleep(Duration::from_millis(50)).await;
    proxy.cut_all();
    proxy.blackhole(false);
    let closed = timeout(WAIT, closing).await.unwrap().unwrap();

    let (got, reason) = texts_until_disconnected(&mut events).await;
    let want: Vec<String> = std::iter::once("before".to_string())
        .chain((0..5).map(|i| format!("held {i}")))
        .collect();
    assert_eq!(got, want, "close returned {closed:?}");
    assert!(closed.is_ok(), "close returned {closed:?}");
    assert_eq!(reason, DisconnectReason::ClosedByPeer);
    proxy.shutdown().await;
    server.shutdown().await;
}

/// A close whose link is cut after the server has everything: `Ok`, whether the server's
/// acknowledgement came before the cut or the client resumed to get it. (CI once saw a
/// close report one message undelivered in a race like this one, with nothing lost; the
/// cut lands at a different point of the close from run to run.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_cut_after_delivery_reports_no_loss() {
    let (server, mut events, proxy, client) = proxied_session().await;
    let sent: Vec<String> = (0..5).map(|i| format!("m {i}")).collect();
    for text in &sent {
        client.send(text.clone()).await.unwrap();
    }
    let mut got = Vec::new();
    while got.len() < sent.len() {
        if let ServerEvent::Message { message, .. } =
            wait_for(&mut events, |e| matches!(e, ServerEvent::Message { .. })).await
        {
            got.push(message.as_text().expect("text").to_string());
        }
    }
    assert_eq!(got, sent);
    // The server has all five; from now on nothing gets through, then the link is cut.
    proxy.blackhole(true);
    let closing = tokio::spawn(client.close());
    proxy.cut_all();
    proxy.blackhole(false);
    let closed = timeout(WAIT, closing).await.unwrap().unwrap();
    assert!(closed.is_ok(), "close returned {closed:?}");
    // Nothing more arrived, and the session ended (closed on a resumed link, or expired
    // after the grace if the close was confirmed before the cut).
    let (more, _) = texts_until_disconnected(&mut events).await;
    assert!(more.is_empty(), "unexpected messages {more:?}");
    proxy.shutdown().await;
    server.shutdown().await;
}

/// `flush` on an idle session returns once the peer acknowledges, not at the next frame
/// the connection happens to write: with heartbeats off there is none, and it used to wait
/// for ever (with them, up to an interval).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushes_of_idle_sessions_finish_without_other_traffic() {
    let (server, mut events) = start_server_with(ServerConfig {
        heartbeat: None,
        ..config()
    })
    .await;
    let mut client = Client::connect(ClientConfig {
        heartbeat: None,
        ..session_client(server.local_addr())
    })
    .await
    .unwrap();
    let id = connected(&mut events).await;
    for round in 0..3 {
        client.send(format!("up {round}")).await.unwrap();
        timeout(WAIT, client.flush())
            .await
            .expect("client flush finished")
            .unwrap();
        server.send(id, format!("down {round}")).await.unwrap();
        timeout(WAIT, server.flush(id))
            .await
            .expect("server flush finished")
            .unwrap();
        assert_eq!(
            support::next_message(&mut client).await,
            format!("down {round}")
        );
    }
    client.close().await.unwrap();
    server.shutdown().await;
}

/// Sends "before" and waits until the server has it; then cuts the link and holds every
/// new connection's hello (the client keeps trying), until the client saw the drop.
async fn delivered_then_cut(proxy: &FaultProxy, client: &mut Client) {
    client.send("before").await.unwrap();
    client.flush().await.unwrap();
    proxy.blackhole(true);
    proxy.cut_all();
    loop {
        match timeout(WAIT, client.recv()).await.unwrap() {
            Some(ClientEvent::Disconnected { .. }) => break,
            Some(_) => {}
            None => panic!("client events ended"),
        }
    }
}

/// A close that comes while the client is reconnecting (its link cut, the new one not yet
/// through): the client finishes reconnecting, resumes, delivers what it queued meanwhile,
/// and closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_while_reconnecting_resumes_and_delivers_everything() {
    let (server, mut events, proxy, mut client) = proxied_session().await;
    delivered_then_cut(&proxy, &mut client).await;
    for i in 0..3 {
        client.send(format!("queued {i}")).await.unwrap();
    }
    let closing = tokio::spawn(client.close());
    proxy.blackhole(false);
    let closed = timeout(WAIT, closing).await.unwrap().unwrap();

    let (got, reason) = texts_until_disconnected(&mut events).await;
    assert_eq!(
        got,
        ["before", "queued 0", "queued 1", "queued 2"],
        "{closed:?}"
    );
    assert!(closed.is_ok(), "close returned {closed:?}");
    assert_eq!(reason, DisconnectReason::ClosedByPeer);
    proxy.shutdown().await;
    server.shutdown().await;
}

/// A close while the link is down with nothing left to deliver still tells the server:
/// the client resumes once to close, so the server reports the client gone at once
/// instead of keeping its session for the whole grace period (60 s here) and calling it
/// expired. (Found as a rare failure of the 100,000-message test, when a cut landed just
/// before its close.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_while_reconnecting_with_nothing_left_still_tells_the_server() {
    let (server, mut events, proxy, mut client) = proxied_session().await;
    delivered_then_cut(&proxy, &mut client).await;
    let closing = tokio::spawn(client.close());
    proxy.blackhole(false);
    let closed = timeout(WAIT, closing).await.unwrap().unwrap();
    assert!(closed.is_ok(), "close returned {closed:?}");
    let (got, reason) = texts_until_disconnected(&mut events).await;
    assert_eq!(got, ["before"]);
    assert_eq!(reason, DisconnectReason::ClosedByPeer);
    proxy.shutdown().await;
    server.shutdown().await;
}

//! Three servers as one over a real `redis-server` (started per test on a free loopback
//! port, stopped by its PID): ids distinct across nodes, every node lists every client,
//! sends and requests reach a client on another node (an unknown id is an error), a
//! broadcast reaches every client once, order is kept across the hop, a dead node's
//! clients leave the registry within the TTL, and a Redis outage leaves local traffic
//! untouched while cross-node sends fail clearly until Redis is back. A client whose
//! connection is cut comes back (through a round-robin proxy, as behind a load balancer)
//! to another node, which takes its lossless session over: nothing lost, duplicated or
//! reordered; a session whose node died is reported expired.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use sockframe::client::{Client, ClientConfig, ClientEvent};
use sockframe::cluster::{Cluster, ClusterConfig};
use sockframe::server::{ClientId, Server, ServerConfig, ServerEvents};
use sockframe::{Error, Message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use support::proxy::{FaultConfig, FaultProxy};
use support::redis_server::RedisServer;
use support::{WAIT, next_connected, start_server_with};

/// A node of the cluster at `redis`, named `name`, with `config`'s protocol.
async fn node_with(
    redis: &RedisServer,
    name: &str,
    mut config: ServerConfig,
) -> (Server, ServerEvents, Arc<Cluster>) {
    let mut cluster = ClusterConfig::new(redis.url());
    cluster.node = Some(name.to_string());
    cluster.heartbeat = Duration::from_millis(200);
    cluster.ttl = Duration::from_secs(2);
    cluster.timeout = Duration::from_secs(2);
    let cluster = Cluster::connect(cluster).await.expect("join the cluster");
    config.cluster = Some(cluster.clone());
    let (server, events) = start_server_with(config).await;
    (server, events, cluster)
}

/// A tutorial-framing node (clients are registered at once).
async fn node(redis: &RedisServer, name: &str) -> (Server, ServerEvents, Arc<Cluster>) {
    node_with(redis, name, support::tutorial_config()).await
}

/// A raw tutorial client of `server`, and its id.
async fn client(server: &Server, events: &mut ServerEvents) -> (TcpStream, ClientId) {
    let stream = support::raw::connect(server.local_addr()).await;
    (stream, next_connected(events).await)
}

/// The next tutorial frame's payload; fails after [`WAIT`].
async fn read_frame(stream: &mut TcpStream) -> Vec<u8> {
    timeout(WAIT, async {
        let mut len = [0u8; 4];
        stream.read_exact(&mut len).await.unwrap();
        let mut payload = vec![0u8; u32::from_le_bytes(len) as usize];
        stream.read_exact(&mut payload).await.unwrap();
        payload
    })
    .await
    .expect("a frame in time")
}

/// Polls `cond` every 20 ms until it holds; fails after `within`.
async fn until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn ids_are_distinct_and_every_node_lists_every_client() {
    let redis = RedisServer::start();
    let (a, mut ea, _) = node(&redis, "a").await;
    let (b, mut eb, _) = node(&redis, "b").await;
    let (c, mut ec, _) = node(&redis, "c").await;
    let (_sa, ia) = client(&a, &mut ea).await;
    let (_sb, ib) = client(&b, &mut eb).await;
    let (_sc, ic) = client(&c, &mut ec).await;
    assert!(ia != ib && ib != ic && ia != ic, "{ia} {ib} {ic}");
    for (server, name) in [(&a, "a"), (&b, "b"), (&c, "c")] {
        until(&format!("node {name} to list 3 clients"), WAIT, || {
            server.clients().len() == 3
        })
        .await;
        let listed = server.clients();
        for (id, node) in [(ia, "a"), (ib, "b"), (ic, "c")] {
            let entry = listed.iter().find(|c| c.id == id).expect("listed");
            assert_eq!(entry.node.as_deref(), Some(node), "{entry:?} on {name}");
        }
        assert_eq!(server.local_clients().len(), 1);
    }
}

#[tokio::test]
async fn a_send_reaches_a_client_on_another_node_and_an_unknown_id_fails() {
    let redis = RedisServer::start();
    let (a, _ea, _) = node(&redis, "a").await;
    let (c, mut ec, _) = node(&redis, "c").await;
    let (mut on_c, id) = client(&c, &mut ec).await;
    a.send(id, Message::text("from a"))
        .await
        .expect("cross-node send");
    assert_eq!(read_frame(&mut on_c).await, b"from a");

    // An id of a node that holds no such client, and one of no node at all.
    let missing = ClientId(id.0 + 1000);
    assert!(matches!(a.send(missing, "x").await, Err(Error::UnknownClient(m)) if m == missing));
    let nowhere = ClientId(999 << 40);
    assert!(matches!(
        a.send(nowhere, "x").await,
        Err(Error::UnknownClient(_))
    ));
}

#[tokio::test]
async fn a_broadcast_reaches_every_client_of_the_cluster_once() {
    let redis = RedisServer::start();
    let (a, mut ea, _) = node(&redis, "a").await;
    let (b, mut eb, _) = node(&redis, "b").await;
    let (c, mut ec, _) = node(&redis, "c").await;
    let mut clients = Vec::new();
    for (server, events) in [(&a, &mut ea), (&b, &mut eb), (&c, &mut ec)] {
        for _ in 0..2 {
            clients.push(client(server, events).await);
        }
    }
    let local = b.broadcast(Message::text("to all")).await.unwrap();
    assert_eq!(local, 2, "b's own two clients");
    let except = clients[4].1; // a client of c
    b.broadcast_except(except, Message::text("all but one"))
        .await
        .unwrap();
    // Then a marker to each, by id: what arrives before it is all the broadcasts brought.
    for (_, id) in &clients {
        b.send(*id, Message::text("end")).await.unwrap();
    }
    for (i, (stream, id)) in clients.iter_mut().enumerate() {
        let mut got = Vec::new();
        loop {
            let frame = read_frame(stream).await;
            if frame == b"end" {
                break;
            }
            got.push(String::from_utf8(frame).unwrap());
        }
        let expected: &[&str] = if *id == except {
            &["to all"]
        } else {
            &["to all", "all but one"]
        };
        assert_eq!(got, expected, "client {i} ({id})");
    }
}

#[tokio::test]
async fn a_request_to_a_client_on_another_node_is_answered() {
    let redis = RedisServer::start();
    let (a, _ea, _) = node(&redis, "a").await;
    let (c, mut ec, _) = node_with(&redis, "c", support::config()).await;
    let mut client = Client::connect(ClientConfig::new(c.local_addr().to_string()))
        .await
        .unwrap();
    let id = next_connected(&mut ec).await;
    let answering = tokio::spawn(async move {
        loop {
            match client.recv().await.expect("client events") {
                ClientEvent::Request(r) => {
                    let question = r.message().as_text().unwrap().to_string();
                    r.respond(format!("answer to {question}")).await.unwrap();
                    return client;
                }
                _ => continue,
            }
        }
    });
    let answer = timeout(WAIT, a.request(id, "ping?"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer.as_text(), Some("answer to ping?"));
    timeout(WAIT, answering).await.unwrap().unwrap();
}

#[tokio::test]
async fn a_thousand_sends_across_the_hop_arrive_in_order() {
    let redis = RedisServer::start();
    let (a, _ea, _) = node(&redis, "a").await;
    let (b, mut eb, _) = node(&redis, "b").await;
    let (mut on_b, id) = client(&b, &mut eb).await;
    let sender = tokio::spawn(async move {
        for i in 0..1000u32 {
            a.send(id, Message::binary(i.to_le_bytes().to_vec()))
                .await
                .unwrap();
        }
        a
    });
    for i in 0..1000u32 {
        assert_eq!(read_frame(&mut on_b).await, i.to_le_bytes(), "message {i}");
    }
    timeout(WAIT, sender).await.unwrap().unwrap();
}

#[tokio::test]
async fn a_dead_nodes_clients_leave_the_registry_within_the_ttl() {
    let redis = RedisServer::start();
    let (a, _ea, _) = node(&redis, "a").await;
    // The node that dies is a real `sockframe serve --cluster` process, killed (SIGKILL).
    let (mut x, x_addr) = support::process::serve(&[
        "--protocol",
        "tutorial",
        "--cluster",
        &redis.url(),
        "--node-id",
        "x",
    ]);
    let mut on_x = support::raw::connect(x_addr).await;
    let line = x.stdout.wait_prefix("connected ");
    let id = ClientId(line.split(' ').nth(1).unwrap().parse().unwrap());
    until("a to see x's client", WAIT, || {
        a.clients().iter().any(|c| c.id == id)
    })
    .await;
    a.send(id, "alive").await.unwrap();
    assert_eq!(read_frame(&mut on_x).await, b"alive");

    drop(x); // SIGKILL and reap: no clean leave
    let killed = Instant::now();
    // x's registry entry expires after its TTL (5 s by default for the binary), and a's
    // view refreshes each heartbeat.
    until("x's client to leave a's list", WAIT, || {
        !a.clients().iter().any(|c| c.id == id)
    })
    .await;
    assert!(
        killed.elapsed() < Duration::from_secs(5) + Duration::from_secs(3),
        "left after {:?}",
        killed.elapsed()
    );
    // And a send to it is an explicit error: nobody listens on x's channel.
    assert!(matches!(
        a.send(id, "gone?").await,
        Err(Error::UnknownClient(_))
    ));
}

#[tokio::test]
async fn a_redis_outage_leaves_local_traffic_alone_and_fails_cross_node_sends_clearly() {
    let mut redis = RedisServer::start();
    let (a, mut ea, cluster) = node(&redis, "a").await;
    let (b, mut eb, _) = node(&redis, "b").await;
    let (mut on_a, ia) = client(&a, &mut ea).await;
    let (mut on_b, ib) = client(&b, &mut eb).await;
    a.send(ib, "before").await.unwrap();
    assert_eq!(read_frame(&mut on_b).await, b"before");

    redis.stop();
    // Local traffic: a send and a broadcast on a's own client, and a message from it.
    a.send(ia, "local send").await.unwrap();
    assert_eq!(read_frame(&mut on_a).await, b"local send");
    let _ = a.broadcast("local broadcast").await; // the remote half fails; see below
    assert_eq!(read_frame(&mut on_a).await, b"local broadcast");
    on_a.write_all(&support::frame(b"up")).await.unwrap();
    support::wait_for(&mut ea, |e| {
        matches!(e, sockframe::server::ServerEvent::Message { message, .. } if message.payload() == &b"up"[..])
    })
    .await;
    // Cross-node: a clear error, within the timeouts.
    let failed = timeout(WAIT, a.send(ib, "during")).await.unwrap();
    assert!(matches!(failed, Err(Error::Cluster(_))), "{failed:?}");
    assert!(cluster.redis_errors() > 0);

    redis.restart();
    // The connection comes back with backoff (at most 2 s apart): poll, bounded.
    let deadline = Instant::now() + WAIT;
    loop {
        match a.send(ib, "after").await {
            Ok(()) => break,
            Err(Error::Cluster(_)) | Err(Error::UnknownClient(_)) => {
                assert!(
                    Instant::now() < deadline,
                    "cross-node sends did not come back"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(read_frame(&mut on_b).await, b"after");
}

/// A client that reconnects at once and asks for a lossless session.
fn session_client(addr: std::net::SocketAddr) -> ClientConfig {
    ClientConfig {
        reconnect: true,
        reconnect_backoff: sockframe::client::Backoff {
            initial: Duration::from_millis(2),
            max: Duration::from_millis(50),
            deadline: Some(Duration::from_secs(30)),
            ..Default::default()
        },
        handshake_timeout: Duration::from_secs(5),
        ..ClientConfig::new(addr.to_string())
    }
}

/// Drains a node's events in the background: how many sessions it handed over to another
/// node, and the other reasons its clients left for.
fn count_handed_over(
    mut events: ServerEvents,
) -> tokio::task::JoinHandle<(u64, Vec<sockframe::DisconnectReason>)> {
    tokio::spawn(async move {
        let (mut handed, mut others) = (0, Vec::new());
        while let Some(event) = events.recv().await {
            if let sockframe::server::ServerEvent::Disconnected { reason, .. } = event {
                match reason {
                    sockframe::DisconnectReason::HandedOver => handed += 1,
                    reason => others.push(reason),
                }
            }
        }
        (handed, others)
    })
}

/// Three nodes behind a round-robin balancer (each new connection goes to the next node, a,
/// b, c, a, ...), and a session client connected through it to node a: the Redis server
/// (kept for the test's length), the nodes, the balancer, the client, its id, and a count of
/// each node's departures ([`count_handed_over`]).
async fn moving_client() -> (
    RedisServer,
    [Server; 3],
    FaultProxy,
    Client,
    ClientId,
    [tokio::task::JoinHandle<(u64, Vec<sockframe::DisconnectReason>)>; 3],
) {
    let redis = RedisServer::start();
    let (a, mut ea, _) = node_with(&redis, "a", support::config()).await;
    let (b, eb, _) = node_with(&redis, "b", support::config()).await;
    let (c, ec, _) = node_with(&redis, "c", support::config()).await;
    let proxy = FaultProxy::start_balancing(
        vec![a.local_addr(), b.local_addr(), c.local_addr()],
        FaultConfig::no_cuts(),
    )
    .await;
    let client = Client::connect(session_client(proxy.addr())).await.unwrap();
    let id = next_connected(&mut ea).await;
    let counters = [
        count_handed_over(ea),
        count_handed_over(eb),
        count_handed_over(ec),
    ];
    (redis, [a, b, c], proxy, client, id, counters)
}

/// The end of a test that moved a client among `nodes`: exactly one node holds it; then it
/// closes, the nodes shut down, and their `counters` must have seen at least `moves`
/// hand-overs and, besides them, only the client's own close.
async fn end_of_moves(
    nodes: [&Server; 3],
    client: Client,
    id: ClientId,
    counters: [tokio::task::JoinHandle<(u64, Vec<sockframe::DisconnectReason>)>; 3],
    moves: u64,
) {
    let holder = nodes
        .into_iter()
        .filter(|n| n.local_clients().iter().any(|c| c.id == id))
        .count();
    assert_eq!(holder, 1, "exactly one node holds the client");
    let _ = client.close().await;
    for server in nodes {
        server.shutdown().await;
    }
    let (mut handed, mut others) = (0, Vec::new());
    for counter in counters {
        let (h, o) = timeout(WAIT, counter).await.unwrap().unwrap();
        handed += h;
        others.extend(o);
    }
    assert!(handed >= moves, "sessions handed over: {handed}");
    // The only other departure is the client's own close at the end.
    assert_eq!(others.len(), 1, "{others:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_follow_a_client_moved_between_nodes() {
    const N: u64 = 10_000;
    const MOVES: u64 = 6;
    let (_redis, [a, b, c], proxy, mut client, id, counters) = moving_client().await;

    // Node b sends them all, one after the other, wherever the client is.
    let sender = {
        let b = b.clone();
        tokio::spawn(async move {
            for i in 0..N {
                b.send(id, Message::text(i.to_string()))
                    .await
                    .unwrap_or_else(|e| panic!("send {i}: {e}"));
            }
        })
    };
    let mut next = 0u64;
    let mut resumed = 0;
    let mut seen = Vec::new(); // what the client saw besides messages, for a failure's report
    while next < N || resumed < MOVES {
        // Cut the client's connection each N / (MOVES + 1) messages, once the last cut's
        // resume is seen (a cut that found no connection is made again): it comes back
        // through the balancer to the next node, which must take the session over. The
        // client may have read every message before the last cuts take effect.
        if next >= (resumed + 1) * (N / (MOVES + 1)) && resumed < MOVES && proxy.cuts() <= resumed {
            proxy.cut_all();
        }
        let event = timeout(WAIT, client.recv())
            .await
            .unwrap_or_else(|_| panic!("client: nothing after message {next}; saw {seen:?}"))
            .expect("client events");
        match event {
            ClientEvent::Message(m) => {
                assert!(next < N, "a duplicate after the last message: {m:?}");
                assert_eq!(
                    m.as_text(),
                    Some(next.to_string().as_str()),
                    "lost, duplicated or reordered"
                );
                next += 1;
                continue;
            }
            ClientEvent::Resumed { .. } => resumed += 1,
            ClientEvent::Disconnected { .. } | ClientEvent::Reconnecting { .. } => {}
            // The first connection's notice; a later one would mean a new session.
            ClientEvent::Connected { .. } if next == 0 && proxy.cuts() == 0 => {}
            ref other => panic!("client: unexpected {other:?} after message {next}; saw {seen:?}"),
        }
        seen.push(format!("{event:?} at {next}"));
    }
    timeout(WAIT, sender).await.unwrap().unwrap();
    // Every resume landed on another node: each took the session from the one before.
    end_of_moves([&a, &b, &c], client, id, counters, MOVES).await;
}

/// What a broadcast from the test's nodes says: `NODE:INDEX`, or `NODE:end` after the last.
fn parse_broadcast(text: &str) -> (usize, Option<u64>) {
    let (node, index) = text.split_once(':').expect("NODE:INDEX");
    let node = ["a", "b", "c"]
        .iter()
        .position(|n| *n == node)
        .expect("a node");
    (node, index.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcasts_reach_a_client_moved_between_nodes_exactly_once_in_order() {
    // Every node broadcasts at a steady pace (four each millisecond) while the client is
    // moved between them: among them the node it leaves and the node it comes to. Each
    // broadcast must reach it exactly once, in order per node.
    const PER_NODE: u64 = 4000;
    const BURST: u64 = 4;
    const MOVES: u64 = 8;
    const NAMES: [&str; 3] = ["a", "b", "c"];
    let (_redis, [a, b, c], proxy, mut client, id, counters) = moving_client().await;
    let broadcasters: Vec<_> = [&a, &b, &c]
        .into_iter()
        .zip(NAMES)
        .map(|(server, name)| {
            let server = server.clone();
            tokio::spawn(async move {
                let mut pace = tokio::time::interval(Duration::from_millis(1));
                pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                for i in 0..PER_NODE {
                    if i % BURST == 0 {
                        pace.tick().await;
                    }
                    server
                        .broadcast(Message::text(format!("{name}:{i}")))
                        .await
                        .unwrap_or_else(|e| panic!("broadcast {name}:{i}: {e}"));
                }
                server
                    .broadcast(Message::text(format!("{name}:end")))
                    .await
                    .unwrap();
            })
        })
        .collect();

    let mut next = [0u64; 3]; // the index expected next from each node
    let mut ended = [false; 3];
    let mut resumed = 0;
    let mut away: Option<Instant> = None; // when the client saw its connection drop
    let mut outages = Vec::new(); // from that to its resume on the next node
    let mut seen = Vec::new();
    while ended.iter().any(|e| !e) || resumed < MOVES {
        let got: u64 = next.iter().sum();
        if got >= (resumed + 1) * (3 * PER_NODE / (MOVES + 1))
            && resumed < MOVES
            && proxy.cuts() <= resumed
        {
            proxy.cut_all();
        }
        let event = timeout(WAIT, client.recv())
            .await
            .unwrap_or_else(|_| panic!("client: nothing more after {next:?} (lost?); saw {seen:?}"))
            .expect("client events");
        match event {
            ClientEvent::Message(m) => {
                let text = m.as_text().expect("text").to_string();
                let (node, index) = parse_broadcast(&text);
                let name = NAMES[node];
                match index {
                    Some(i) => {
                        assert!(
                            i >= next[node],
                            "duplicated or reordered: {text} after {name}:{} (moves so far {resumed}; saw {seen:?})",
                            next[node] - 1
                        );
                        assert!(
                            i == next[node],
                            "lost: {name}:{}..{name}:{} before {text} (moves so far {resumed}; saw {seen:?})",
                            next[node],
                            i - 1
                        );
                        next[node] += 1;
                    }
                    None => {
                        assert_eq!(next[node], PER_NODE, "lost {name}'s last broadcasts");
                        assert!(!ended[node], "{text} twice");
                        ended[node] = true;
                    }
                }
                continue;
            }
            ClientEvent::Resumed { .. } => {
                resumed += 1;
                if let Some(at) = away.take() {
                    outages.push(at.elapsed());
                }
            }
            ClientEvent::Disconnected { .. } => away = Some(Instant::now()),
            ClientEvent::Reconnecting { .. } => {}
            ClientEvent::Connected { .. } if resumed == 0 && proxy.cuts() == 0 => {}
            ref other => panic!("client: unexpected {other:?} at {next:?}; saw {seen:?}"),
        }
        seen.push(format!("{event:?} at {next:?}"));
    }
    for broadcaster in broadcasters {
        timeout(WAIT, broadcaster).await.unwrap().unwrap();
    }
    outages.sort();
    eprintln!(
        "hand-over as the client sees it (drop noticed → resumed on the next node), {} moves: min {:?}, median {:?}, max {:?}",
        outages.len(),
        outages.first(),
        outages.get(outages.len() / 2),
        outages.last()
    );
    end_of_moves([&a, &b, &c], client, id, counters, MOVES).await;
}

#[tokio::test]
async fn a_session_whose_node_died_is_reported_expired_on_the_new_node() {
    let redis = RedisServer::start();
    let (a, mut ea, _) = node_with(&redis, "a", support::config()).await;
    // The node that dies is a real `sockframe serve --cluster` process, killed (SIGKILL).
    let (x, x_addr) = support::process::serve(&["--cluster", &redis.url(), "--node-id", "x"]);
    let proxy =
        FaultProxy::start_balancing(vec![x_addr, a.local_addr()], FaultConfig::no_cuts()).await;
    let mut client = Client::connect(session_client(proxy.addr())).await.unwrap();
    client.sender().send("hello x").await.unwrap();
    client.sender().flush().await.unwrap();
    drop(x); // SIGKILL and reap: its sessions die with it
    proxy.cut_all();
    // The client comes back to node a, which finds nobody to hand the session over.
    let event = timeout(WAIT, async {
        loop {
            match client.recv().await.expect("client events") {
                e @ ClientEvent::SessionExpired { .. } => return e,
                ClientEvent::Resumed { .. } => panic!("resumed a session whose node died"),
                _ => {}
            }
        }
    })
    .await
    .expect("an explicit expiry");
    assert!(
        matches!(event, ClientEvent::SessionExpired { undelivered: 0 }),
        "{event:?}"
    );
    // It goes on with a new session on node a.
    next_connected(&mut ea).await;
}

#[tokio::test]
async fn a_silent_tutorial_client_is_listed_everywhere_once_detected() {
    let redis = RedisServer::start();
    // Auto mode: a connection is a client from its accept, announced to the other nodes
    // only once its protocol is known (a silent one after `detect_timeout`).
    let (a, mut ea, _) = node_with(&redis, "a", support::config()).await;
    let (b, _eb, _) = node(&redis, "b").await;
    let mut silent = support::raw::connect(a.local_addr()).await;
    let id = next_connected(&mut ea).await;
    until("b to list a's silent client", WAIT, || {
        b.clients().iter().any(|c| c.id == id)
    })
    .await;
    b.send(id, "found you").await.unwrap();
    assert_eq!(read_frame(&mut silent).await, b"found you");
}

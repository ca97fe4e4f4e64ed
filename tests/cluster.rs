//! Three servers as one over a real `redis-server` (started per test on a free loopback
//! port, stopped by its PID): ids distinct across nodes, every node lists every client,
//! sends and requests reach a client on another node (an unknown id is an error), a
//! broadcast reaches every client once, order is kept across the hop, a dead node's
//! clients leave the registry within the TTL, and a Redis outage leaves local traffic
//! untouched while cross-node sends fail clearly until Redis is back.

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

//! What a cluster hop costs: broadcast deliveries/s and cross-node sends/s with 3 nodes
//! over Redis, against the same load on one node without a cluster, in one run.
//!
//! ```sh
//! cargo run --release --example cluster_bench            # needs redis-server on the PATH
//! CLIENTS=30 MESSAGES=20000 NODES=1,2,3,5 cargo run --release --example cluster_bench
//! ```
//!
//! It starts its own `redis-server` on a free port of 127.0.0.1 (stopped at the end), the
//! nodes in this process, and raw tutorial-framing clients spread over the nodes, each
//! counting the frames it reads. Rates count a message when every client has read it.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use sockframe::Message;
use sockframe::cluster::{Cluster, ClusterConfig};
use sockframe::server::{ClientId, ProtocolMode, Server, ServerConfig, ServerEvents};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// A redis-server of our own, killed on drop.
struct Redis(Child, u16);

impl Redis {
    fn start() -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on the PATH (apt-get install redis-server)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Redis(child, port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `nodes` servers (with a cluster when more than one), and `clients` raw clients
/// connected round-robin; returns the servers and each client's frame counter.
async fn start(
    redis: Option<&Redis>,
    nodes: usize,
    clients: usize,
) -> (Vec<Server>, Vec<ServerEvents>, Vec<Arc<AtomicU64>>) {
    let mut servers = Vec::new();
    let mut streams = Vec::new();
    for _ in 0..nodes {
        let mut config = ServerConfig::new("127.0.0.1:0".parse().unwrap());
        config.protocol = ProtocolMode::Tutorial;
        // Measure delivery, not the slow-consumer rule: a broadcast waits for a full queue.
        config.broadcast_policy = sockframe::FullPolicy::Wait;
        if let Some(redis) = redis {
            let cluster =
                Cluster::connect(ClusterConfig::new(format!("redis://127.0.0.1:{}", redis.1)))
                    .await
                    .expect("join the cluster");
            config.cluster = Some(cluster);
        }
        let (server, events) = Server::bind(config).await.unwrap();
        servers.push(server);
        streams.push(events);
    }
    let mut counters = Vec::new();
    for i in 0..clients {
        let addr: SocketAddr = servers[i % nodes].local_addr();
        let stream = TcpStream::connect(addr).await.unwrap();
        let count = Arc::new(AtomicU64::new(0));
        tokio::spawn(read_frames(stream, count.clone()));
        counters.push(count);
    }
    // Every node has registered its clients (and, in a cluster, sees the others').
    let deadline = Instant::now() + Duration::from_secs(20);
    while servers.iter().any(|s| s.clients().len() < clients) {
        assert!(Instant::now() < deadline, "clients did not all register");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (servers, streams, counters)
}

/// Counts the tutorial frames read from `stream`.
async fn read_frames(mut stream: TcpStream, count: Arc<AtomicU64>) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut have = 0usize;
    loop {
        let Ok(n) = stream.read(&mut buf[have..]).await else {
            return;
        };
        if n == 0 {
            return;
        }
        have += n;
        let mut at = 0;
        let mut frames = 0;
        while have - at >= 4 {
            let len = u32::from_le_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
            if have - at < 4 + len {
                break;
            }
            at += 4 + len;
            frames += 1;
        }
        buf.copy_within(at..have, 0);
        have -= at;
        count.fetch_add(frames, Ordering::Relaxed);
    }
}

/// Waits until every counter has reached `target`.
async fn all_reach(counters: &[Arc<AtomicU64>], target: impl Fn(usize) -> u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while counters
        .iter()
        .enumerate()
        .any(|(i, c)| c.load(Ordering::Relaxed) < target(i))
    {
        assert!(Instant::now() < deadline, "deliveries stalled");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::main]
async fn main() {
    let clients = env("CLIENTS", 30) as usize;
    let messages = env("MESSAGES", 20_000);
    let sends = env("SENDS", 20_000);
    let redis = Redis::start();
    println!(
        "| nodes | broadcast deliveries/s | cross-node sends/s (64 in flight) | send round trip p50 |"
    );
    println!("|---|---|---|---|");
    let list = std::env::var("NODES").unwrap_or_else(|_| "1,3".into());
    for nodes in list
        .split(',')
        .filter_map(|n| n.trim().parse::<usize>().ok())
    {
        let (servers, _events, counters) =
            start((nodes > 1).then_some(&redis), nodes, clients).await;
        let payload = Message::binary(vec![7u8; 64]);

        // Broadcasts from node 0, each awaited, until every client has read them all.
        let t = Instant::now();
        for _ in 0..messages {
            servers[0].broadcast(payload.clone()).await.unwrap();
        }
        all_reach(&counters, |_| messages).await;
        let broadcast_rate = (messages * clients as u64) as f64 / t.elapsed().as_secs_f64();

        // Sends from node 0 to the clients of the other nodes (of node 0 itself when alone).
        let targets: Vec<ClientId> = servers[0]
            .clients()
            .iter()
            .filter(|c| nodes == 1 || c.node.as_deref() != Some(servers_node(&servers[0])))
            .map(|c| c.id)
            .collect();
        let before: Vec<u64> = counters.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        let t = Instant::now();
        let mut sent = 0u64;
        while sent < sends {
            let batch = (sends - sent).min(64);
            let futures = (0..batch).map(|k| {
                let target = targets[((sent + k) as usize) % targets.len()];
                servers[0].send(target, payload.clone())
            });
            for r in join_all(futures).await {
                r.unwrap();
            }
            sent += batch;
        }
        let send_rate = sends as f64 / t.elapsed().as_secs_f64();
        let total_after: u64 = before.iter().sum::<u64>() + sends;
        let deadline = Instant::now() + Duration::from_secs(60);
        while counters
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum::<u64>()
            < total_after
        {
            assert!(Instant::now() < deadline, "sends not all delivered");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // One send at a time: the round trip of a hop (the other node's ack).
        let mut times = Vec::new();
        for i in 0..1000 {
            let t = Instant::now();
            servers[0]
                .send(targets[i % targets.len()], payload.clone())
                .await
                .unwrap();
            times.push(t.elapsed());
        }
        times.sort();
        println!(
            "| {nodes} | {:.0} | {:.0} | {:.0} µs |",
            broadcast_rate,
            send_rate,
            times[times.len() / 2].as_secs_f64() * 1e6
        );
        for s in &servers {
            s.shutdown().await;
        }
    }
}

/// The node name of `server`'s clients.
fn servers_node(server: &Server) -> &str {
    server
        .config()
        .cluster
        .as_ref()
        .map(|c| c.node())
        .unwrap_or("")
}

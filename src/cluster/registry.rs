//! The cluster's registry: this node's clients in the Redis hash `P:clients:N`, which
//! expires unless the heartbeat refreshes it (so a dead node's clients vanish after the
//! TTL), and the other nodes' clients as read at the last heartbeat.
//!
//! Joins and leaves are sync calls from the server's registry: they record the latest state
//! of each changed client (one entry per client, so memory is bounded by the clients) and
//! wake the heartbeat task, which writes them in one pipeline. After a failed write, or
//! when the hash is found gone (Redis restarted), the next heartbeat writes the whole hash
//! again.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, UNIX_EPOCH};

use redis::AsyncCommands;
use serde_json::{Value, json};
use tokio::sync::Notify;

use super::{Shared, lock};
use crate::connection::Mode;
use crate::server::{ClientId, ClientInfo};

/// This node's part of the registry, and what it last read of the others'.
pub(crate) struct Registry {
    prefix: String,
    key: String,
    /// This node's clients, as their JSON entries.
    local: Mutex<HashMap<ClientId, String>>,
    /// Changes not yet written: the latest entry of each changed client (`None`: left).
    changes: Mutex<HashMap<ClientId, Option<String>>>,
    /// Whether the whole hash must be written again.
    rewrite: std::sync::atomic::AtomicBool,
    changed: Notify,
    remote: Mutex<Vec<ClientInfo>>,
    /// The node of each remote client that lives away from the node its id names (its
    /// session was handed over), as last read: where sends to it go.
    moved: Mutex<HashMap<ClientId, u64>>,
}

impl Registry {
    pub(crate) fn new(prefix: &str, number: u64) -> Registry {
        Registry {
            prefix: prefix.to_string(),
            key: format!("{prefix}:clients:{number}"),
            local: Mutex::default(),
            changes: Mutex::default(),
            rewrite: Default::default(),
            changed: Notify::new(),
            remote: Mutex::default(),
            moved: Mutex::default(),
        }
    }

    pub(crate) fn joined(&self, client: &ClientInfo, node: &str) {
        let entry = entry(client, node);
        lock(&self.local).insert(client.id, entry.clone());
        lock(&self.changes).insert(client.id, Some(entry));
        self.changed.notify_one();
    }

    pub(crate) fn left(&self, client: ClientId) {
        lock(&self.local).remove(&client);
        lock(&self.changes).insert(client, None);
        self.changed.notify_one();
    }

    pub(crate) fn remote(&self) -> Vec<ClientInfo> {
        lock(&self.remote).clone()
    }

    /// The node another node's registry lists `client` under, if that is not the node its
    /// id names.
    pub(crate) fn moved_to(&self, client: ClientId) -> Option<u64> {
        lock(&self.moved).get(&client).copied()
    }
}

/// A client's registry entry.
fn entry(c: &ClientInfo, node: &str) -> String {
    let since = c
        .connected_at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    json!({
        "id": c.id.0,
        "node": node,
        "addr": c.addr.to_string(),
        "protocol": match c.protocol { Mode::Tutorial => "tutorial", Mode::Sockframe => "sockframe" },
        "name": c.name,
        "since_ms": since,
    })
    .to_string()
}

/// A registry entry as a client's info (`None` if it does not parse).
fn parse(entry: &str) -> Option<ClientInfo> {
    let v: Value = serde_json::from_str(entry).ok()?;
    Some(ClientInfo {
        id: ClientId(v["id"].as_u64()?),
        addr: v["addr"].as_str()?.parse().ok()?,
        connected_at: UNIX_EPOCH + Duration::from_millis(v["since_ms"].as_u64()?),
        messages_in: 0,
        bytes_in: 0,
        messages_out: 0,
        bytes_out: 0,
        protocol: match v["protocol"].as_str()? {
            "sockframe" => Mode::Sockframe,
            _ => Mode::Tutorial,
        },
        name: v["name"].as_str()?.to_string(),
        queued: 0,
        session: crate::server::SessionState::None,
        node: Some(v["node"].as_str()?.to_string()),
    })
}

/// Writes changes as they come and refreshes the registry each heartbeat, until the
/// cluster stops; then removes this node's entry (a clean leave).
pub(crate) async fn heartbeat(shared: Arc<Shared>) {
    let reg = &shared.registry;
    let mut tick = tokio::time::interval(shared.config.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let beat = tokio::select! {
            _ = shared.stop.cancelled() => break,
            _ = tick.tick() => true,
            _ = reg.changed.notified() => false,
        };
        write_changes(&shared).await;
        if beat {
            refresh(&shared).await;
        }
    }
    let mut redis = shared.redis.clone();
    let _ = tokio::time::timeout(Duration::from_secs(1), redis.del::<_, ()>(&reg.key)).await;
}

async fn write_changes(shared: &Shared) {
    let reg = &shared.registry;
    let ttl = shared.config.ttl.as_millis() as i64;
    let mut pipe = redis::pipe();
    if reg
        .rewrite
        .swap(false, std::sync::atomic::Ordering::Relaxed)
    {
        lock(&reg.changes).clear();
        let local: Vec<(u64, String)> = lock(&reg.local)
            .iter()
            .map(|(id, e)| (id.0, e.clone()))
            .collect();
        pipe.atomic().del(&reg.key).ignore();
        if !local.is_empty() {
            pipe.hset_multiple(&reg.key, &local).ignore();
        }
    } else {
        let changes: Vec<_> = lock(&reg.changes).drain().collect();
        if changes.is_empty() {
            return;
        }
        for (id, entry) in changes {
            match entry {
                Some(entry) => pipe.hset(&reg.key, id.0, entry).ignore(),
                None => pipe.hdel(&reg.key, id.0).ignore(),
            };
        }
    }
    pipe.pexpire(&reg.key, ttl).ignore();
    let mut redis = shared.redis.clone();
    let result: redis::RedisResult<()> = pipe.query_async(&mut redis).await;
    if shared.redis_result(result).is_err() {
        reg.rewrite
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Renews this node's TTL (writing the hash again if it is gone) and reads the others'.
async fn refresh(shared: &Shared) {
    let reg = &shared.registry;
    let mut redis = shared.redis.clone();
    let ttl = shared.config.ttl.as_millis() as i64;
    let renewed: redis::RedisResult<bool> = redis.pexpire(&reg.key, ttl).await;
    match shared.redis_result(renewed) {
        Ok(false) if !lock(&reg.local).is_empty() => {
            reg.rewrite
                .store(true, std::sync::atomic::Ordering::Relaxed);
            write_changes(shared).await;
        }
        Ok(_) => {}
        Err(_) => return,
    }
    let pattern = format!("{}:clients:*", reg.prefix);
    let keys: redis::RedisResult<Vec<String>> = async {
        let mut keys = Vec::new();
        let mut iter: redis::AsyncIter<String> = redis.scan_match(&pattern).await?;
        while let Some(key) = iter.next_item().await {
            keys.push(key?);
        }
        Ok(keys)
    }
    .await;
    let Ok(keys) = shared.redis_result(keys) else {
        return;
    };
    let mut remote = Vec::new();
    let mut moved = HashMap::new();
    for key in keys.into_iter().filter(|k| *k != reg.key) {
        let entries: redis::RedisResult<HashMap<String, String>> = redis.hgetall(&key).await;
        let node: Option<u64> = key.rsplit(':').next().and_then(|n| n.parse().ok());
        match shared.redis_result(entries) {
            Ok(entries) => {
                let start = remote.len();
                remote.extend(entries.values().filter_map(|e| parse(e)));
                for c in &remote[start..] {
                    match node {
                        Some(n) if n != super::node_of(c.id) => moved.insert(c.id, n),
                        _ => None,
                    };
                }
            }
            Err(_) => return,
        }
    }
    remote.sort_by_key(|c| c.id);
    // A client that just moved may be listed by both nodes for a heartbeat: list it once.
    remote.dedup_by_key(|c| c.id);
    *lock(&reg.remote) = remote;
    *lock(&reg.moved) = moved;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    #[test]
    fn an_entry_parses_back() {
        let info = ClientInfo {
            id: ClientId((3 << 40) + 7),
            addr: "127.0.0.2:4000".parse().unwrap(),
            connected_at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            messages_in: 5,
            bytes_in: 5,
            messages_out: 0,
            bytes_out: 0,
            protocol: Mode::Sockframe,
            name: "alice".into(),
            queued: 0,
            session: crate::server::SessionState::None,
            node: None,
        };
        let back = parse(&entry(&info, "b")).unwrap();
        assert_eq!(back.id, info.id);
        assert_eq!(back.addr, info.addr);
        assert_eq!(back.connected_at, info.connected_at);
        assert_eq!(back.name, "alice");
        assert_eq!(back.protocol, Mode::Sockframe);
        assert_eq!(back.node.as_deref(), Some("b"));
        assert!(parse("not json").is_none());
    }
}

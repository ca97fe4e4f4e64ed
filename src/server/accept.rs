//! Listening and accepting: the listener with a large backlog, the accept loop, the global
//! and per-address connection limits (a [`Slot`] per connection), and the TLS handshake
//! before a connection is handed to [`task`](super::task).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::Either;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::task::serve_stream;
use super::{Inner, ServerConfig, ServerEvent, stats};
use crate::connection::Batch;
use crate::{Error, Result};

/// A listener with a backlog larger than `TcpListener::bind`'s 128.
pub(super) fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // Lets a restarted server bind again while old connections sit in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Listens on `config.bind` with `config.backlog`, naming the address in the error.
pub(super) fn listen_on(config: &ServerConfig) -> Result<TcpListener> {
    listen(config.bind, config.backlog).map_err(|source| Error::Bind {
        addr: config.bind.to_string(),
        source,
    })
}

pub(super) async fn accept_loop(
    inner: Arc<Inner>,
    listener: TcpListener,
    events: mpsc::Sender<Batch<ServerEvent>>,
) {
    let limit = Arc::new(Semaphore::new(inner.config.max_connections));
    let per_ip = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    loop {
        let accepted = tokio::select! {
            _ = inner.shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, addr) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Out of file descriptors and the like: per-connection errors that clear
                // up. Pause briefly so the loop does not spin while they last.
                tracing::warn!(error = %e, "accept failed");
                tokio::select! {
                    _ = inner.shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                }
            }
        };
        if !inner.config.admits(addr.ip()) {
            tracing::debug!(%addr, "refused by the allow/deny lists");
            inner.counters.refused(stats::Refusal::Cidr);
            continue;
        }
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!(%addr, limit = inner.config.max_connections, "connection limit reached; refusing");
            inner.counters.refused(stats::Refusal::ConnectionLimit);
            drop(stream);
            continue;
        };
        let Some(per_ip) = PerIp::take(&per_ip, addr.ip(), inner.config.max_connections_per_ip)
        else {
            tracing::warn!(%addr, limit = inner.config.max_connections_per_ip, "per-address connection limit reached; refusing");
            inner.counters.refused(stats::Refusal::PerIp);
            continue;
        };
        inner.counters.accepted();
        let permit = Slot {
            _global: permit,
            _per_ip: per_ip,
        };
        inner.tasks.spawn(serve_client(
            inner.clone(),
            stream,
            addr,
            events.clone(),
            permit,
        ));
    }
    tracing::info!("stopped accepting");
}

/// A connection's place under the global and the per-address limits; freed on drop.
pub(super) struct Slot {
    _global: OwnedSemaphorePermit,
    _per_ip: PerIp,
}

#[cfg(test)]
impl Slot {
    /// A slot under limits of its own, for a connection's future built in a test.
    pub(super) fn for_test() -> Slot {
        let global = Arc::new(Semaphore::new(1));
        let counts = PerIpCounts::default();
        Slot {
            _global: global.try_acquire_owned().expect("a free permit"),
            _per_ip: PerIp::take(&counts, std::net::Ipv4Addr::LOCALHOST.into(), 1)
                .expect("a free slot"),
        }
    }
}

/// Connections per IP address.
pub(super) type PerIpCounts =
    Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>;

/// One connection counted against its address; uncounted on drop.
pub(super) struct PerIp {
    counts: PerIpCounts,
    ip: std::net::IpAddr,
}

impl PerIp {
    /// Counts a connection from `ip`, unless `max` are already open.
    pub(super) fn take(counts: &PerIpCounts, ip: std::net::IpAddr, max: usize) -> Option<PerIp> {
        let ip = ip.to_canonical();
        let mut map = counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PerIp {
            counts: counts.clone(),
            ip,
        })
    }
}

impl Drop for PerIp {
    fn drop(&mut self) {
        let mut map = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// Runs one accepted TCP connection: the TLS handshake when configured, then the rest.
///
/// Not an `async fn`: its future would hold its arguments besides the future it hands them
/// to (128 bytes of every connection's task); this returns that future itself.
pub(super) fn serve_client(
    inner: Arc<Inner>,
    stream: TcpStream,
    addr: SocketAddr,
    events: mpsc::Sender<Batch<ServerEvent>>,
    permit: Slot,
) -> impl Future<Output = ()> + Send {
    // Our writes are batched already; Nagle's algorithm would only add latency.
    let _ = stream.set_nodelay(true);
    #[cfg(feature = "tls")]
    if inner.config.tls.is_some() {
        // Boxed: the TLS handshake's and a TLS stream's states are larger, and every plain
        // connection's future (the bulk of an idle connection's memory) would otherwise be
        // as large as a TLS one's.
        return Either::<Boxed, _>::Left(Box::pin(serve_tls(inner, stream, addr, events, permit)));
    }
    Either::<Boxed, _>::Right(serve_stream(inner, stream, addr, events, permit, None))
}

/// A boxed connection future (a TLS connection's).
type Boxed = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// Runs the TLS handshake, then the rest of the connection over TLS.
#[cfg(feature = "tls")]
pub(super) async fn serve_tls(
    inner: Arc<Inner>,
    stream: TcpStream,
    addr: SocketAddr,
    events: mpsc::Sender<Batch<ServerEvent>>,
    permit: Slot,
) {
    let Some(tls) = &inner.config.tls else {
        return;
    };
    // Large socket reads under rustls's small ones: see `ReadAhead`.
    let accept = tls.acceptor().accept(crate::tls::ReadAhead::new(stream));
    let stream = match tokio::time::timeout(inner.config.handshake_timeout, accept).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::debug!(%addr, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%addr, "TLS handshake timed out");
            return;
        }
    };
    let cert_name = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(crate::tls::certificate_name);
    // Writes of whole records: see `RecordWrites` for why.
    let stream = crate::tls::RecordWrites(stream);
    serve_stream(inner, stream, addr, events, permit, cert_name).await
}

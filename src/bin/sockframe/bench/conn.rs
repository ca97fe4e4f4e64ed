//! Connections of `sockframe bench`: TCP or TLS, and the sockframe handshake.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context as TaskContext, Poll};

use anyhow::{Context, Result, bail};
use bytes::BytesMut;
use sockframe::tls::{ClientTls, ClientTlsOptions, ReadAhead, RecordWrites};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::ServerName;

use super::wire::{self, Wire};
use crate::peer::Protocol;

/// A connection to the server under load: plain TCP or TLS.
#[derive(Debug)]
pub enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP (boxed: the TLS state is large), writing whole records at offsets that
    /// keep rustls's plaintext copy fast (see [`RecordWrites`]) and reading the socket in
    /// large reads (see [`ReadAhead`]).
    Tls(Box<RecordWrites<TlsStream<ReadAhead<TcpStream>>>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// An established connection: the stream, and what was read past the handshake.
#[derive(Debug)]
pub struct Conn {
    /// The stream.
    pub stream: Stream,
    /// Bytes already read (after the welcome) that the load loop must parse first.
    pub inbuf: BytesMut,
}

/// Opens connections: TCP, then TLS if asked, then the hello/welcome handshake for the
/// sockframe protocol.
#[derive(Clone)]
pub struct Connector {
    addr: String,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    /// The hello frame (sockframe protocol), built once.
    hello: Option<Arc<[u8]>>,
    /// Whether the hello asks for a lossless session.
    session: bool,
    /// The last byte of the loopback address connections come from (127.0.0.x), shared by
    /// every clone: 1 (the address the system picks) until its ports run out.
    source: Arc<AtomicU8>,
}

/// TLS settings of `sockframe bench`.
#[derive(Debug, Default)]
pub struct TlsArgs {
    /// Whether to connect with TLS at all.
    pub enabled: bool,
    /// Extra CA to trust.
    pub ca: Option<std::path::PathBuf>,
    /// Skip verification.
    pub insecure: bool,
    /// Name to verify the server against (default: the host of the address).
    pub server_name: Option<String>,
}

impl Connector {
    /// A connector for `addr`.
    pub fn new(addr: &str, wire: Wire, token: Option<&str>, tls: &TlsArgs) -> Result<Self> {
        if token.is_some() && wire.protocol == Protocol::Tutorial {
            bail!("--token needs --protocol sockframe: the tutorial framing cannot carry it");
        }
        if wire.session && wire.protocol == Protocol::Tutorial {
            bail!("--session needs --protocol sockframe: the tutorial framing has no sessions");
        }
        let tls = if tls.enabled {
            let client = ClientTls::new(&ClientTlsOptions {
                ca: tls.ca.clone(),
                no_system_roots: false,
                insecure: tls.insecure,
                identity: None,
                server_name: tls.server_name.clone(),
            })?;
            let host = tls.server_name.as_deref().unwrap_or_else(|| host_of(addr));
            let name = ServerName::try_from(host.to_string())
                .with_context(|| format!("cannot verify the server as {host:?}"))?;
            Some((TlsConnector::from(client.config), name))
        } else {
            None
        };
        let hello = match wire.protocol {
            Protocol::Tutorial => None,
            Protocol::Sockframe => Some(wire::hello(token, wire.session)?.into()),
        };
        Ok(Connector {
            addr: addr.to_string(),
            tls,
            hello,
            session: wire.session,
            source: Arc::new(AtomicU8::new(1)),
        })
    }

    /// Opens one connection, ready for load.
    pub async fn connect(&self) -> Result<Conn> {
        let addr = &self.addr;
        let tcp = self
            .tcp()
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        tcp.set_nodelay(true)?;
        let mut stream = match &self.tls {
            None => Stream::Plain(tcp),
            Some((connector, name)) => Stream::Tls(Box::new(RecordWrites(
                connector
                    .connect(name.clone(), ReadAhead::new(tcp))
                    .await
                    .with_context(|| format!("TLS handshake with {addr} failed"))?,
            ))),
        };
        // Small: idle connections keep this buffer; the load loops grow it.
        let mut inbuf = BytesMut::with_capacity(64);
        if let Some(hello) = &self.hello {
            stream.write_all(hello).await?;
            stream.flush().await?;
            loop {
                if let Some(_heartbeat_ms) = wire::take_welcome(&mut inbuf, self.session)? {
                    break;
                }
                if stream.read_buf(&mut inbuf).await? == 0 {
                    bail!("the server closed the connection during the handshake");
                }
            }
        }
        Ok(Conn { stream, inbuf })
    }
}

impl Connector {
    /// A TCP connection to the server. One source address has about 28,000 ports (Linux's
    /// default `ip_local_port_range`), fewer when earlier runs left many in `TIME_WAIT`; a
    /// server on an IPv4 loopback address is reached from 127.0.0.2, .3, … once 127.0.0.1
    /// has none left (any 127.x address is this machine's), so that `--mode idle` can hold
    /// as many connections as the file limits allow.
    async fn tcp(&self) -> io::Result<TcpStream> {
        let mut target = None;
        // Bounded: every failed attempt moves the source on by one, and .254 is the last.
        loop {
            let source = self.source.load(Ordering::Relaxed);
            if source > 1 && target.is_none() {
                target = Some(loopback_v4(&self.addr).await?);
            }
            let attempt = match target {
                Some(to) if source > 1 => connect_from(source, to).await,
                _ => TcpStream::connect(&self.addr).await,
            };
            match attempt {
                Err(e) if out_of_ports(&e) && source < 254 => {
                    if target.is_none() {
                        // Not loopback: there is no other source address to try.
                        let Ok(to) = loopback_v4(&self.addr).await else {
                            return Err(e);
                        };
                        target = Some(to);
                    }
                    // Another connection may have moved it on already; either way, the next.
                    let _ = self.source.compare_exchange(
                        source,
                        source + 1,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                }
                done => return done,
            }
        }
    }
}

/// Connects to `to` from 127.0.0.`source`.
async fn connect_from(source: u8, to: SocketAddr) -> io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((Ipv4Addr::new(127, 0, 0, source), 0)))?;
    socket.connect(to).await
}

/// Whether a connect failed for want of a local port: `EADDRNOTAVAIL` from `connect`,
/// `EADDRINUSE` from a `bind` to a chosen address.
fn out_of_ports(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::AddrNotAvailable | io::ErrorKind::AddrInUse
    )
}

/// Raises the soft limit on open files (up to the hard one) if `conns` connections and a
/// few files besides need more; says so on stderr when even the hard limit is short, since
/// the connections past it would fail one by one.
#[cfg(unix)]
pub fn raise_nofile(conns: u64) {
    use rlimit::Resource;
    let need = conns.saturating_add(64);
    let Ok((soft, hard)) = Resource::NOFILE.get() else {
        return;
    };
    if soft >= need {
        return;
    }
    let now = rlimit::increase_nofile_limit(need.min(hard)).unwrap_or(soft);
    if now < need {
        eprintln!(
            "warning: the open file limit is {now} (hard limit {hard}): too low for {conns} \
             connections; raise it with ulimit -n"
        );
    }
}

/// No limit to raise here.
#[cfg(not(unix))]
pub fn raise_nofile(_conns: u64) {}

/// `addr` resolved, if it is an IPv4 loopback address (127.0.0.0/8).
async fn loopback_v4(addr: &str) -> io::Result<SocketAddr> {
    tokio::net::lookup_host(addr)
        .await?
        .find(|a| matches!(a, SocketAddr::V4(v4) if v4.ip().is_loopback()))
        .ok_or_else(|| io::Error::other(format!("{addr} is not an IPv4 loopback address")))
}

/// The host part of `host:port` or `[v6]:port`.
fn host_of(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.parse::<u16>().is_ok() => host,
        _ => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::host_of;

    #[tokio::test]
    async fn connections_come_from_the_source_address_asked_for() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let to = listener.local_addr().unwrap();
        assert_eq!(super::loopback_v4(&to.to_string()).await.unwrap(), to);
        let _client = super::connect_from(3, to).await.unwrap();
        let (_, from) = listener.accept().await.unwrap();
        assert_eq!(from.ip(), std::net::Ipv4Addr::new(127, 0, 0, 3));
        assert!(super::loopback_v4("[::1]:80").await.is_err());
    }

    #[test]
    fn hosts() {
        assert_eq!(host_of("127.0.0.1:80"), "127.0.0.1");
        assert_eq!(host_of("[::1]:80"), "::1");
        assert_eq!(host_of("localhost"), "localhost");
    }
}

//! Connections of `sockframe bench`: TCP or TLS, and the sockframe handshake.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use anyhow::{Context, Result, bail};
use bytes::BytesMut;
use sockframe::tls::{ClientTls, ClientTlsOptions, ReadAhead, RecordWrites};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
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
        })
    }

    /// Opens one connection, ready for load.
    pub async fn connect(&self) -> Result<Conn> {
        let addr = &self.addr;
        let tcp = TcpStream::connect(addr)
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

    #[test]
    fn hosts() {
        assert_eq!(host_of("127.0.0.1:80"), "127.0.0.1");
        assert_eq!(host_of("[::1]:80"), "::1");
        assert_eq!(host_of("localhost"), "localhost");
    }
}

//! Opening a connection: TCP with retries and backoff, TLS when configured, and the
//! sockframe handshake (hello, session request, `WELCOME`).

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Backoff, ClientConfig, ClientEvent};
use crate::connection::{Batch, FrameReader, FrameWriter, HEAD_ROOM, Mode};
use crate::protocol::message::{
    self as wire, Frame, Hello, SessionGrant, SessionRequest, SessionToken,
};
use crate::{Error, Result};

/// The reading half of a plain or TLS stream.
pub(super) type ReadStream = Box<dyn AsyncRead + Send + Unpin>;
/// The writing half of a plain or TLS stream.
pub(super) type WriteStream = Box<dyn AsyncWrite + Send + Unpin>;

/// An established connection: the two halves, after the handshake.
pub(super) struct Link {
    pub(super) reader: FrameReader<ReadStream>,
    pub(super) writer: FrameWriter<WriteStream>,
    pub(super) addr: Option<SocketAddr>,
    /// The server's id for us (sockframe protocol).
    pub(super) server_id: Option<u64>,
    /// Largest body the server accepts (ours, unless its welcome says less).
    pub(super) send_limit: usize,
    /// The session the welcome granted.
    pub(super) grant: SessionGrant,
}

/// Connects, retrying per the backoff. With `events`, this is a reconnect: each attempt is
/// announced and preceded by its delay; without, the first attempt is immediate.
pub(super) async fn connect_with_backoff(
    config: &ClientConfig,
    backoff: &Backoff,
    events: Option<&mpsc::Sender<Batch<ClientEvent>>>,
    close: &CancellationToken,
    resume: Option<(SessionToken, u64)>,
) -> Result<Link> {
    let start = Instant::now();
    let deadline = backoff.deadline.map(|d| start + d);
    let mut attempt: u32 = 0;
    loop {
        attempt += 1;
        if let Some(events) = events {
            let mut delay = backoff.delay(attempt);
            if let Some(deadline) = deadline {
                delay = delay.min(deadline.saturating_duration_since(Instant::now()));
            }
            tracing::debug!(attempt, ?delay, "reconnecting");
            tokio::select! {
                _ = close.cancelled() => return Err(Error::Closed),
                _ = events.send(Batch::from(ClientEvent::Reconnecting { attempt, delay })) => {}
            }
            tokio::select! {
                _ = close.cancelled() => return Err(Error::Closed),
                _ = tokio::time::sleep(delay) => {}
            }
        }
        let mut limit = config.connect_timeout;
        if let Some(deadline) = deadline {
            limit = limit.min(deadline.saturating_duration_since(Instant::now()));
        }
        let error = tokio::select! {
            _ = close.cancelled() => return Err(Error::Closed),
            res = tokio::time::timeout(limit, TcpStream::connect(&config.addr)) => match res {
                Ok(Ok(stream)) => match handshake(config, stream, resume).await {
                    Ok(link) => return Ok(link),
                    // The same hello would be refused again: do not retry.
                    Err(e @ (Error::Rejected { .. } | Error::Certificate { .. })) => return Err(e),
                    Err(e) => {
                        tracing::debug!(attempt, error = %e, "handshake failed");
                        std::io::Error::other(e.to_string())
                    }
                },
                Ok(Err(e)) => e,
                Err(_) => std::io::ErrorKind::TimedOut.into(),
            },
        };
        tracing::debug!(attempt, error = %error, addr = %config.addr, "connect failed");
        let out_of_time = deadline.is_some_and(|d| Instant::now() >= d);
        if backoff.exhausted(attempt) || out_of_time {
            return Err(Error::Connect {
                addr: config.addr.clone(),
                attempts: attempt,
                source: error,
            });
        }
        if events.is_none() {
            let mut delay = backoff.delay(attempt);
            if let Some(deadline) = deadline {
                delay = delay.min(deadline.saturating_duration_since(Instant::now()));
            }
            tokio::select! {
                _ = close.cancelled() => return Err(Error::Closed),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }
}

/// Runs the TLS handshake when configured, and splits the stream.
pub(super) async fn secure(
    config: &ClientConfig,
    stream: TcpStream,
) -> Result<(ReadStream, WriteStream)> {
    #[cfg(feature = "tls")]
    if let Some(tls) = &config.tls {
        let name = tls.server_name(&config.addr)?;
        let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
        let stream = tokio::time::timeout(
            config.handshake_timeout,
            connector.connect(name, crate::tls::ReadAhead::new(stream)),
        )
        .await
        .map_err(|_| Error::Handshake {
            addr: config.addr.clone(),
            detail: format!("no TLS handshake within {:?}", config.handshake_timeout),
        })?
        .map_err(|e| {
            let detail = crate::reason::plain_io_message(&e);
            // rustls reports certificate and protocol failures as invalid data; those
            // would fail the same way again. Other errors (reset, closed) may not.
            if e.kind() == std::io::ErrorKind::InvalidData {
                Error::Certificate {
                    addr: config.addr.clone(),
                    detail,
                }
            } else {
                Error::Handshake {
                    addr: config.addr.clone(),
                    detail: format!("TLS: {detail}"),
                }
            }
        })?;
        // Writes of whole records: see `RecordWrites` for why.
        let (r, w) = tokio::io::split(crate::tls::RecordWrites(stream));
        return Ok((Box::new(r), Box::new(w)));
    }
    let _ = config;
    let (r, w) = stream.into_split();
    Ok((Box::new(r), Box::new(w)))
}

/// Opens the protocol on a new TCP connection: for the sockframe protocol, sends the hello
/// and waits for the welcome.
pub(super) async fn handshake(
    config: &ClientConfig,
    stream: TcpStream,
    resume: Option<(SessionToken, u64)>,
) -> Result<Link> {
    // Our writes are batched already; Nagle's algorithm would only add latency.
    let _ = stream.set_nodelay(true);
    let addr = stream.peer_addr().ok();
    let (r, w) = secure(config, stream).await?;
    let mut reader = FrameReader::new(r, config.max_frame);
    let mut writer = FrameWriter::new(w, config.max_frame);
    if config.protocol == Mode::Tutorial {
        return Ok(Link {
            reader,
            writer,
            addr,
            server_id: None,
            send_limit: config.max_frame,
            grant: SessionGrant::None,
        });
    }
    let failed = |detail: String| Error::Handshake {
        addr: config.addr.clone(),
        detail,
    };
    let hello = Hello {
        session: match resume {
            Some((token, received)) => SessionRequest::Resume { token, received },
            None if config.session && config.reconnect => SessionRequest::New,
            None => SessionRequest::None,
        },
        ..Hello::new(
            config.name.clone(),
            config.token.clone().unwrap_or_default(),
        )
    };
    let exchange = async {
        writer.push(wire::encode_hello(&hello))?;
        writer.flush().await?;
        // The answer is small; do not let a confused peer announce a large frame.
        reader.set_max_frame(wire::MAX_HELLO);
        let answer = reader.read_frame().await.map_err(|e| match e {
            Error::Frame(f) => failed(format!(
                "{f}: the server does not answer in the sockframe protocol \
                 (a TLS server? then connect with TLS)"
            )),
            other => other,
        })?;
        let Some(answer) = answer else {
            return Err(failed(
                "the server closed the connection during the handshake".into(),
            ));
        };
        match wire::parse(&answer) {
            Ok(Frame::Welcome(welcome)) => Ok(welcome),
            Ok(Frame::Reject { code, text }) => Err(Error::Rejected { code, text }),
            Ok(other) => Err(failed(format!("expected a welcome, got {other:?}"))),
            Err(e) => Err(failed(format!(
                "the server does not speak the sockframe protocol ({e}); \
                 is it a tutorial server? use the tutorial protocol"
            ))),
        }
    };
    let welcome = tokio::time::timeout(config.handshake_timeout, exchange)
        .await
        .map_err(|_| {
            failed(format!(
                "no welcome within {:?} (does the server speak the sockframe protocol?)",
                config.handshake_timeout
            ))
        })??;
    let send_limit = (welcome.max_frame as usize).min(config.max_frame);
    reader.set_max_frame(config.max_frame + HEAD_ROOM);
    writer.set_max_frame(send_limit + HEAD_ROOM);
    Ok(Link {
        reader,
        writer,
        addr,
        server_id: Some(welcome.client_id),
        send_limit,
        grant: welcome.session,
    })
}

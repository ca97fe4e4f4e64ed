//! Admission of a new connection: protocol detection, the sockframe handshake (hello,
//! token, session request) and the `WELCOME` or `REJECT` that answers it.

use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use super::{ClientId, Inner, ProtocolMode, ServerConfig, stats};
use crate::connection::{FrameReader, FrameWriter, Mode};
use crate::protocol::message::{
    self as wire, Frame, Hello, RejectCode, SessionGrant, SessionRequest, Welcome,
};
use crate::reason::DisconnectReason;
use crate::{Error, Result};

/// The welcome for a client.
pub(super) fn welcome(config: &ServerConfig, client: ClientId, session: SessionGrant) -> Frame {
    Frame::Welcome(Welcome {
        version: wire::VERSION,
        client_id: client.0,
        max_frame: config.max_frame.min(u32::MAX as usize) as u32,
        heartbeat_ms: config
            .heartbeat
            .map_or(0, |h| h.interval.as_millis().min(u32::MAX as u128) as u32),
        session,
    })
}

/// Writes the welcome within the handshake timeout.
pub(super) async fn send_welcome<W: AsyncWrite + Unpin>(
    config: &ServerConfig,
    writer: &mut FrameWriter<W>,
    welcome: Frame,
) -> Result<()> {
    let sent = async {
        writer.push(wire::encode(&welcome))?;
        writer.flush().await.map_err(Error::from)
    };
    tokio::time::timeout(config.handshake_timeout, sent)
        .await
        .unwrap_or(Err(Error::Timeout(config.handshake_timeout)))
}

/// A connection that passed detection and, for sockframe clients, the handshake.
pub(super) struct Admitted {
    pub(super) mode: Mode,
    /// A first tutorial message already read, to be delivered.
    pub(super) held: Option<Bytes>,
    /// The name from the hello.
    pub(super) name: String,
    /// A tutorial connection whose first frame already broke the framing: it is reported
    /// (connected, then disconnected with this reason) but not run.
    pub(super) broken: Option<DisconnectReason>,
    /// Classified as tutorial because it said nothing within the detection timeout.
    pub(super) silent: bool,
    /// The hello's token (empty without one).
    pub(super) token: Bytes,
    /// What the hello asked about sessions.
    pub(super) session: SessionRequest,
}

impl Admitted {
    fn tutorial(held: Option<Bytes>) -> Self {
        Admitted {
            mode: Mode::Tutorial,
            held,
            name: String::new(),
            broken: None,
            silent: false,
            token: Bytes::new(),
            session: SessionRequest::None,
        }
    }
}

/// Decides the connection's protocol and, for sockframe clients, checks the hello; gives up
/// when `stop` fires (shutdown, or the close of a client registered while being detected).
///
/// Returns what was admitted, or why the connection is refused (a sockframe client is told,
/// in a `REJECT` frame, before the connection closes; refused connections are never
/// reported to the application, as they never joined).
pub(super) async fn admit<R, W>(
    inner: &Inner,
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    stop: &CancellationToken,
) -> std::result::Result<Admitted, String>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let config = &inner.config;
    let mode = config.effective_protocol();
    let wait = match mode {
        ProtocolMode::Tutorial => return Ok(Admitted::tutorial(None)),
        ProtocolMode::Sockframe => {
            // Before the handshake only a hello may arrive, and it is small.
            reader.set_max_frame(wire::MAX_HELLO);
            config.handshake_timeout
        }
        ProtocolMode::Auto => config.detect_timeout,
    };
    let first = tokio::select! {
        _ = stop.cancelled() => return Err("closed before its protocol was known".into()),
        first = tokio::time::timeout(wait, reader.read_frame()) => first,
    };
    let first = match first {
        Err(_) if mode == ProtocolMode::Auto => {
            // A silent peer in auto mode: a tutorial client that waits to be spoken to.
            return Ok(Admitted {
                silent: true,
                ..Admitted::tutorial(None)
            });
        }
        Err(_) => return Err("no hello within the handshake timeout".into()),
        Ok(Ok(Some(frame))) => frame,
        Ok(Ok(None)) => return Err("closed before the handshake".into()),
        Ok(Err(e @ Error::Frame(_))) if mode == ProtocolMode::Auto => {
            // No hello can be that broken: a tutorial client breaking the framing, which the
            // application hears of like any other tutorial client's protocol error.
            return Ok(Admitted {
                broken: Some(DisconnectReason::from_error(&e)),
                ..Admitted::tutorial(None)
            });
        }
        Ok(Err(e)) => return Err(format!("before the handshake: {e}")),
    };
    if mode == ProtocolMode::Auto && !wire::is_hello(&first) {
        return Ok(Admitted::tutorial(Some(first)));
    }
    let hello = match wire::parse_hello(&first) {
        Ok(hello) => hello,
        Err(e) => {
            reject(writer, RejectCode::BadHello, &e.to_string()).await;
            return Err(format!("bad hello: {e}"));
        }
    };
    if wire::negotiate(&hello).is_none() {
        let text = format!(
            "this server speaks version {}; the client offers {}..={}",
            wire::VERSION,
            hello.min_version,
            hello.max_version
        );
        reject(writer, RejectCode::UnsupportedVersion, &text).await;
        return Err(text);
    }
    if !authorized(&config.tokens, &hello) {
        tracing::warn!(name = %hello.name, "client rejected: unauthorized");
        inner.counters.refused(stats::Refusal::Token);
        reject(writer, RejectCode::Unauthorized, "unauthorized").await;
        return Err("unauthorized".into());
    }
    Ok(Admitted {
        mode: Mode::Sockframe,
        held: None,
        name: hello.name,
        broken: None,
        silent: false,
        token: hello.token,
        session: hello.session,
    })
}

/// Whether the hello carries one of `tokens` (always, when none is required).
pub(super) fn authorized(tokens: &[Bytes], hello: &Hello) -> bool {
    use subtle::ConstantTimeEq;
    if tokens.is_empty() {
        return true;
    }
    // Compare against every token without stopping early, so that timing tells nothing
    // about which token came close.
    let mut ok = subtle::Choice::from(0);
    for token in tokens {
        ok |= token.as_ref().ct_eq(hello.token.as_ref());
    }
    ok.into()
}

/// Sends a `REJECT` frame and closes, giving up quickly on a peer that does not read.
pub(super) async fn reject<W: AsyncWrite + Unpin>(
    writer: &mut FrameWriter<W>,
    code: RejectCode,
    text: &str,
) {
    let frame = Frame::Reject {
        code,
        text: text.to_string(),
    };
    if writer.push(wire::encode(&frame)).is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(1), writer.shutdown()).await;
    }
}

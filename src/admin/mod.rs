//! The admin HTTP endpoint (feature `admin`): what an operator watches a server through.
//!
//! [`Admin::start`] serves, beside a running [`Server`], on its own address:
//!
//! | route | what | token |
//! |---|---|---|
//! | `GET /healthz` | `200 ok` while accepting, `503 draining` once shutting down | never |
//! | `GET /readyz` | the same, for readiness probes | when set |
//! | `GET /metrics` | Prometheus text exposition ([`metrics`]) | when set |
//! | `GET /api/clients` | JSON array of the connected clients | when set |
//! | `GET /api/stats` | JSON totals and per-second rates | when set |
//! | `GET /api/events` | Server-Sent Events: `{stats, clients}` once a second | when set |
//! | `POST /api/clients/{id}/kick` | disconnects a client (reason `kicked`) | when set |
//! | `GET /` | the live dashboard, a page embedded in the binary ([`dashboard`]) | when set |
//!
//! How the pieces meet: `mod.rs` binds and drives the HTTP connections (hyper, with a
//! header timeout and a cap on concurrent connections, so a slow or flooding admin client
//! cannot reach the messaging port); `routes` holds the handlers and the token check;
//! [`metrics`] turns a [`ServerStats`](crate::server::ServerStats) snapshot into the
//! exposition text; `rates` samples the totals once a second for the per-second figures.
//!
//! The endpoint only *reads* the server through its public handle ([`Server::stats`],
//! [`Server::clients`]) and acts through [`Server::disconnect`]: the server does not know
//! it exists. Nothing here runs per message: the totals are added up when asked for.

pub mod dashboard;
pub mod metrics;
mod rates;
mod routes;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::server::Server;
use crate::{Error, Result};

/// How the admin endpoint is set up.
#[derive(Clone, Default)]
pub struct AdminConfig {
    /// Where to listen. Bind a loopback address unless the network in between is trusted:
    /// the endpoint shows every client and can disconnect them.
    pub bind: Option<SocketAddr>,
    /// When set, every route but `/healthz` requires `Authorization: Bearer <token>`.
    pub token: Option<String>,
}

impl std::fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("AdminConfig")
            .field("bind", &self.bind)
            .field("token", &self.token.as_ref().map(|_| "<hidden>"))
            .finish()
    }
}

/// The default admin address: loopback only.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:9100";

/// At most this many admin HTTP connections at once; more wait in the listen backlog.
const MAX_ADMIN_CONNECTIONS: usize = 64;
/// A request's headers must arrive within this time (a slowloris peer is cut).
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// A running admin endpoint. Stops when [`stop`](Self::stop) is called or it is dropped.
#[derive(Debug)]
pub struct Admin {
    local_addr: SocketAddr,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Admin {
    /// Binds `config.bind` (default [`DEFAULT_ADMIN_ADDR`]) and serves the routes above for
    /// `server`.
    pub async fn start(server: Server, config: AdminConfig) -> Result<Admin> {
        let addr = match config.bind {
            Some(addr) => addr,
            None => DEFAULT_ADMIN_ADDR.parse().expect("a valid address"),
        };
        let listener = TcpListener::bind(addr).await.map_err(|e| Error::Bind {
            addr: addr.to_string(),
            source: e,
        })?;
        Self::from_listener(server, listener, config)
    }

    /// Serves the admin routes on an existing listener (`config.bind` is ignored).
    pub fn from_listener(
        server: Server,
        listener: TcpListener,
        config: AdminConfig,
    ) -> Result<Admin> {
        let local_addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let rates = rates::Rates::start(server.clone(), stop.clone(), &tasks);
        let state = Arc::new(routes::State {
            server,
            token: config.token,
            rates,
            stop: stop.clone(),
        });
        let router = routes::router(state);
        tasks.spawn(accept_loop(listener, router, stop.clone(), tasks.clone()));
        tracing::info!(%local_addr, "admin endpoint listening");
        Ok(Admin {
            local_addr,
            stop,
            tasks,
        })
    }

    /// The address the endpoint listens on (useful after binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops listening, ends open admin connections (event streams included), and returns
    /// when they are gone.
    pub async fn stop(self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

impl Drop for Admin {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Accepts admin connections, at most [`MAX_ADMIN_CONNECTIONS`] at a time.
async fn accept_loop(
    listener: TcpListener,
    router: axum::Router,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            permit = slots.clone().acquire_owned() => permit.expect("never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let service = TowerToHyperService::new(router.clone());
        let stop = stop.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "admin connection ended");
                    }
                }
                _ = stop.cancelled() => {
                    // Finish the request in flight, then close; bounded, as a peer may
                    // never read the answer.
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(HEADER_TIMEOUT, conn).await;
                }
            }
        });
    }
}

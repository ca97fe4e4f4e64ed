//! The admin routes and the token check in front of them.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::extract::{DefaultBodyLimit, Path, Request, State as Shared};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::Stream;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::metrics::{self, protocol_label};
use super::rates::Rates;
use crate::server::{ClientId, ClientInfo, Server};

/// What every route shares.
pub(super) struct State {
    pub(super) server: Server,
    pub(super) token: Option<String>,
    pub(super) rates: Rates,
    /// Fired when the endpoint stops: ends the event streams.
    pub(super) stop: CancellationToken,
}

type Ctx = Arc<State>;

/// The routes, behind the token check (`/healthz` stays open for probes).
pub(super) fn router(state: Ctx) -> Router {
    let guarded = Router::new()
        .route("/", get(dashboard))
        .route("/readyz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/api/clients", get(clients))
        .route("/api/stats", get(stats))
        .route("/api/transfers", get(transfers))
        .route("/api/events", get(events))
        .route("/api/clients/{id}/kick", post(kick))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .route("/healthz", get(healthz))
        .merge(guarded)
        // No route takes a body: a small limit answers a huge one with 413.
        .layer(DefaultBodyLimit::max(4096))
        .with_state(state)
}

/// Lets a request through when no token is set or it carries `Bearer <token>`; else 401.
async fn authorize(Shared(state): Shared<Ctx>, request: Request, next: Next) -> Response {
    if let Some(token) = &state.token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        // The dashboard's `EventSource` cannot set headers: it passes `?token=` instead.
        let query = request.uri().query().and_then(|q| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix("token="))
                .map(percent_decoded)
        });
        let given = given.map(str::to_owned).or(query).unwrap_or_default();
        if !same(given.as_bytes(), token.as_bytes()) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "unauthorized\n",
            )
                .into_response();
        }
    }
    next.run(request).await
}

/// `%XX` escapes decoded (a token is sent URL-encoded by the dashboard); bad escapes kept.
fn percent_decoded(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).and_then(|&c| hex(c)),
            b.get(i + 2).and_then(|&c| hex(c)),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Compares in constant time (for equal lengths; a length tells only the length).
fn same(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

async fn healthz(Shared(state): Shared<Ctx>) -> Response {
    if state.server.is_shut_down() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else {
        (StatusCode::OK, "ok\n").into_response()
    }
}

async fn dashboard() -> Html<&'static str> {
    Html(super::dashboard::PAGE)
}

async fn metrics(Shared(state): Shared<Ctx>) -> Response {
    let text = metrics::render(&state.server.stats());
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response()
}

async fn clients(Shared(state): Shared<Ctx>) -> Json<Value> {
    Json(clients_json(&state.server))
}

async fn stats(Shared(state): Shared<Ctx>) -> Json<Value> {
    Json(stats_json(&state))
}

async fn kick(Shared(state): Shared<Ctx>, Path(id): Path<u64>) -> Response {
    if state.server.disconnect(ClientId(id)) {
        tracing::info!(client = id, "kicked from the admin endpoint");
        StatusCode::NO_CONTENT.into_response()
    } else {
        (StatusCode::NOT_FOUND, format!("no client {id}\n")).into_response()
    }
}

/// `{stats, clients}` once a second, until the client goes or the endpoint stops.
async fn events(Shared(state): Shared<Ctx>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let stream = futures_util::stream::unfold((state, true), |(state, first)| async move {
        if !first {
            tokio::select! {
                _ = state.stop.cancelled() => return None,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        let body = json!({
            "stats": stats_json(&state),
            "clients": clients_json(&state.server),
            "transfers": transfers_json(&state.server),
        });
        let event = Event::default().event("update").data(body.to_string());
        Some((Ok(event), (state, false)))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

fn client_json(c: &ClientInfo) -> Value {
    let since = c
        .connected_at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    json!({
        "id": c.id.0,
        "addr": c.addr.to_string(),
        "protocol": protocol_label(c.protocol),
        "name": c.name,
        "connected_since_ms": since,
        "messages_in": c.messages_in,
        "bytes_in": c.bytes_in,
        "messages_out": c.messages_out,
        "bytes_out": c.bytes_out,
        "queued": c.queued,
        "session": c.session.as_str(),
        "node": c.node,
    })
}

/// `GET /api/transfers`: the files in progress.
async fn transfers(Shared(state): Shared<Ctx>) -> Json<Value> {
    Json(transfers_json(&state.server))
}

fn transfers_json(server: &Server) -> Value {
    Value::Array(
        server
            .transfers()
            .into_iter()
            .map(|(client, t)| {
                json!({
                    "client": client.0,
                    "name": t.name,
                    "size": t.size,
                    "done": t.done,
                    "direction": t.direction.as_str(),
                })
            })
            .collect(),
    )
}

fn clients_json(server: &Server) -> Value {
    Value::Array(server.clients().iter().map(client_json).collect())
}

fn stats_json(state: &State) -> Value {
    let s = state.server.stats();
    let pairs = |v: Vec<(&'static str, u64)>| -> Value {
        Value::Object(
            v.into_iter()
                .map(|(k, n)| (k.to_string(), n.into()))
                .collect(),
        )
    };
    json!({
        "accepted": s.accepted,
        "connected": pairs(s.connected.iter().map(|(m, n)| (protocol_label(*m), *n)).collect()),
        "sessions_suspended": s.sessions_suspended,
        "sessions_resumed": s.sessions_resumed,
        "disconnects": pairs(s.disconnects.clone()),
        "rejected": pairs(s.refused.iter().map(|(r, n)| (r.label(), *n)).collect()),
        "requests": s.requests,
        "files_received": s.files_received,
        "file_bytes_received": s.file_bytes_received,
        "messages_in": s.messages_in,
        "bytes_in": s.bytes_in,
        "messages_out": s.messages_out,
        "bytes_out": s.bytes_out,
        "rates": state.rates.get(),
        "draining": state.server.is_shut_down(),
    })
}

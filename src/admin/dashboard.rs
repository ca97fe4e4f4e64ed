//! `GET /`: the live dashboard, one HTML page with its script and style inline, compiled
//! into the binary (no CDN, no build step). It reads `GET /api/events` (Server-Sent Events,
//! once a second) and kicks with `POST /api/clients/{id}/kick`. With a token set, open it
//! as `/?token=…`: a browser's `EventSource` cannot send an `Authorization` header, so the
//! token check also accepts a `token` query parameter (compared the same way).

/// The page.
pub const PAGE: &str = include_str!("dashboard.html");

//! The WebSocket transport: RSocket over WebSocket, as the PowerSync SDKs use it when
//! `connectionMethod` is `web-socket` (protocol.md §3).
//!
//! The upgrade request is answered by the router like any other request (so CORS, routing and
//! error envelopes are shared); the upgraded connection is then served by [`session`], with
//! WebSocket framing of our own ([`websocket`]) and the RSocket subset PowerSync needs
//! ([`frame`]). Hand-written because the RSocket crates are unmaintained, and because a held
//! stream must stay as lean as on HTTP.

mod frame;
mod session;
mod socket;
mod websocket;

use crate::error::ServiceError;
use crate::server::AppState;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use std::sync::Arc;

/// Whether a request asks for a WebSocket upgrade.
pub fn is_upgrade(request: &Request) -> bool {
    request.method() == Method::GET && header_has(request.headers(), header::UPGRADE, "websocket")
}

/// `true` if the comma-separated header contains `token` (case-insensitive).
pub(crate) fn header_has(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Answer a WebSocket upgrade (RFC 6455 §4.2) and serve RSocket on the upgraded connection.
/// The reference accepts the upgrade on any path; the SDKs use `/sync/stream`.
pub async fn upgrade(State(state): State<Arc<AppState>>, mut request: Request) -> Response {
    let headers = request.headers();
    let key = headers.get(header::SEC_WEBSOCKET_KEY).map(|k| websocket::accept_key(k.as_bytes()));
    let version_ok = headers.get(header::SEC_WEBSOCKET_VERSION).is_some_and(|v| v == "13");
    let (Some(accept), true, true) = (key, version_ok, header_has(headers, header::CONNECTION, "upgrade")) else {
        return ServiceError::new("PSYNC_S2001", 400, "Invalid WebSocket upgrade request").into_response();
    };
    let Some(on_upgrade) = request.extensions_mut().remove::<OnUpgrade>() else {
        // HTTP/2 and the lean HTTP/1.1 path cannot upgrade.
        return ServiceError::new("PSYNC_S2001", 400, "WebSocket upgrades need HTTP/1.1").into_response();
    };
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => session::run(TokioIo::new(upgraded), state).await,
            Err(e) => tracing::debug!(error = %e, "WebSocket upgrade failed"),
        }
    });
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    response
}

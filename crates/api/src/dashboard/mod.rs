//! The operator dashboard: a static page (HTML, CSS and vanilla JS embedded in the binary,
//! carrying no data) at `GET /dashboard`, and the admin JSON it polls, behind an admin token.
//!
//! The page reads `GET /api/admin/v1/status` (this module), `GET /api/admin/v1/storage-stats`
//! and `POST /api/admin/v1/inspect` (the admin API's).

mod prom_text;
pub mod recent_errors;
mod status;

use crate::server::AppState;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use std::sync::Arc;

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const CHART_JS: &str = include_str!("assets/chart.js");
const STYLE_CSS: &str = include_str!("assets/style.css");
const FAVICON_SVG: &str = include_str!("assets/favicon.svg");

/// Renders the metrics exposition (the Prometheus recorder's).
pub type MetricsSource = Arc<dyn Fn() -> String + Send + Sync>;

/// What the dashboard routes need besides the service state.
pub struct Dashboard {
    /// The service state; its admin tokens guard the status route.
    pub app: Arc<AppState>,
    pub metrics: MetricsSource,
}

/// The page, its assets and the status route.
pub fn router(dashboard: Dashboard) -> Router {
    Router::new()
        .route("/dashboard", get(|| asset("text/html; charset=utf-8", INDEX_HTML)))
        .route("/dashboard/app.js", get(|| asset("text/javascript; charset=utf-8", APP_JS)))
        .route("/dashboard/chart.js", get(|| asset("text/javascript; charset=utf-8", CHART_JS)))
        .route("/dashboard/style.css", get(|| asset("text/css; charset=utf-8", STYLE_CSS)))
        .route("/dashboard/favicon.svg", get(|| asset("image/svg+xml", FAVICON_SVG)))
        .route("/api/admin/v1/status", get(status_route))
        .with_state(Arc::new(dashboard))
}

async fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Only our own scripts and styles, and no framing: the page handles an admin token.
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'; frame-ancestors 'none'"),
    );
    response
}

async fn status_route(State(dashboard): State<Arc<Dashboard>>, headers: HeaderMap) -> Response {
    if let Err(e) = dashboard.app.admin.tokens.authorize(&headers) {
        return e.into_response();
    }
    let mut response = Json(status::build(&dashboard.app, &(dashboard.metrics)())).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

//! `POST /sync/stream`: validate, authenticate, negotiate NDJSON vs BSON (and the content
//! encoding), then stream lines produced by the sync layer. Validation and admission are shared
//! with the WebSocket transport.

use crate::auth::AuthContext;
use crate::body::{LimitedBody, SYNC_STREAM_LIMIT};
use crate::checkpoint::user_key;
use crate::compression::{Encoded, Encoding};
use crate::error::ServiceError;
use crate::lifecycle::Lifecycle;
use crate::server::AppState;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use ferrosync_metrics::Transport;
use ferrosync_rules::{RequestParameters, StreamSubscription, StreamsRequest};
use ferrosync_sync::{connection_stream, ConnectionRequest, LineFormat, SyncError};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{oneshot, OwnedSemaphorePermit};

/// The request body (protocol spec §2.3); unknown fields are ignored.
#[derive(Deserialize)]
pub struct StreamingSyncRequest {
    #[serde(default)]
    pub buckets: Option<Vec<BucketRequest>>,
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub parameters: Option<serde_json::Value>,
    /// Sync-stream subscriptions; absent means defaults only.
    #[serde(default)]
    pub streams: Option<StreamsBody>,
}

/// `streams` of the request body (protocol spec §10.2).
#[derive(Deserialize)]
pub struct StreamsBody {
    #[serde(default = "yes")]
    pub include_defaults: bool,
    #[serde(default)]
    pub subscriptions: Vec<SubscriptionBody>,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
pub struct SubscriptionBody {
    pub stream: String,
    #[serde(default)]
    pub parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub override_priority: Option<u8>,
}

impl StreamsBody {
    /// The validated request (parameters objects, priorities 0..3).
    pub fn into_request(self) -> Result<StreamsRequest, ServiceError> {
        let mut subscriptions = Vec::with_capacity(self.subscriptions.len());
        for s in self.subscriptions {
            if s.parameters.as_ref().is_some_and(|p| !p.is_object() && !p.is_null()) {
                return Err(ServiceError::validation(format!(
                    "subscription to {:?}: parameters must be an object",
                    s.stream
                )));
            }
            if s.override_priority.is_some_and(|p| p > 3) {
                return Err(ServiceError::validation(format!(
                    "subscription to {:?}: override_priority must be 0..3",
                    s.stream
                )));
            }
            subscriptions.push(StreamSubscription {
                stream: s.stream,
                parameters: s.parameters.filter(|p| !p.is_null()),
                override_priority: s.override_priority,
            });
        }
        Ok(StreamsRequest {
            include_defaults: self.include_defaults,
            subscriptions,
        })
    }
}

#[derive(Deserialize)]
pub struct BucketRequest {
    pub name: String,
    pub after: String,
}

/// Pick BSON only when the client prefers it over NDJSON (by q-value); NDJSON otherwise.
pub fn negotiate(accept: Option<&str>) -> LineFormat {
    let Some(accept) = accept else { return LineFormat::Ndjson };
    let q = |mime: &str| {
        accept
            .split(',')
            .filter_map(|part| {
                let mut pieces = part.split(';').map(str::trim);
                (pieces.next()? == mime).then(|| pieces.find_map(|p| p.strip_prefix("q=")?.parse::<f32>().ok()).unwrap_or(1.0))
            })
            .fold(None, |best: Option<f32>, q| Some(best.map_or(q, |b| b.max(q))))
    };
    match (q(LineFormat::Bson.content_type()), q(LineFormat::Ndjson.content_type())) {
        (Some(b), Some(n)) if b > n => LineFormat::Bson,
        (Some(_), None) => LineFormat::Bson,
        _ => LineFormat::Ndjson,
    }
}

/// A validated request body, before authentication is known.
pub(crate) struct ValidRequest {
    client_id: Option<String>,
    parameters: Option<serde_json::Value>,
    streams: StreamsRequest,
    buckets: Vec<(String, i64)>,
}

impl StreamingSyncRequest {
    /// Check the body (positions, parameters, subscriptions); `PSYNC_S2001` on bad input.
    pub(crate) fn validate(self) -> Result<ValidRequest, ServiceError> {
        let mut buckets = Vec::new();
        for b in self.buckets.unwrap_or_default() {
            let after = b
                .after
                .parse::<i64>()
                .map_err(|_| ServiceError::validation(format!("bucket {:?}: after must be a decimal op id", b.name)))?;
            buckets.push((b.name, after));
        }
        if let Some(p) = &self.parameters {
            if !p.is_object() && !p.is_null() {
                return Err(ServiceError::validation("parameters must be an object"));
            }
        }
        let streams = match self.streams {
            Some(body) => body.into_request()?,
            None => StreamsRequest::default(),
        };
        Ok(ValidRequest {
            client_id: self.client_id,
            parameters: self.parameters.filter(|p| !p.is_null()),
            streams,
            buckets,
        })
    }
}

impl ValidRequest {
    /// What the sync layer serves for this request and user, and the stream's lifecycle (open
    /// from now on).
    pub(crate) fn into_connection(self, auth: &AuthContext, format: LineFormat, transport: Transport) -> (ConnectionRequest, Lifecycle) {
        let lifecycle = Lifecycle::open(transport, &auth.user_id, self.client_id.as_deref());
        let request = ConnectionRequest {
            user_key: user_key(&auth.user_id, self.client_id.as_deref()),
            parameters: RequestParameters::new(auth.payload.clone(), self.parameters),
            streams: self.streams,
            buckets: self.buckets,
            expires_at: auth.expires_at,
            format,
            // RSocket relies on its own keepalives.
            keepalive_lines: transport == Transport::Http,
            stats: lifecycle.stats(),
        };
        (request, lifecycle)
    }
}

/// Checks before a sync stream opens on either transport: storage is reachable and a
/// connection slot is free. The permit must live as long as the stream.
pub(crate) fn admit(state: &AppState) -> Result<OwnedSemaphorePermit, ServiceError> {
    if let Some(error) = state.hub.storage_error() {
        // Answer now rather than hold a stream that cannot make progress: clients retry.
        return Err(ServiceError::new("PSYNC_S2003", 503, "Bucket storage is unreachable; retry shortly").with_details(error));
    }
    state
        .connections
        .clone()
        .try_acquire_owned()
        .map_err(|_| ServiceError::new("PSYNC_S2304", 429, "Maximum active concurrent connections reached"))
}

pub async fn sync_stream(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody<SYNC_STREAM_LIMIT>,
) -> Result<Response, ServiceError> {
    let request: StreamingSyncRequest =
        serde_json::from_slice(&body).map_err(|e| ServiceError::validation(format!("invalid sync request body: {e}")))?;
    let request = request.validate()?;
    let auth = state
        .keys
        .verify_authorization(headers.get(header::AUTHORIZATION).and_then(|h| h.to_str().ok()))
        .await?;
    let permit = admit(&state)?;
    let opening_wait = if state.hub.subscribe().borrow().is_none() {
        tracing::debug!("no active sync config yet; client waits for the first checkpoint");
        Duration::ZERO
    } else {
        OPENING_WAIT
    };
    let format = negotiate(headers.get(header::ACCEPT).and_then(|h| h.to_str().ok()));
    let (req, lifecycle) = request.into_connection(&auth, format, Transport::Http);
    let (lines, ended_with) = connection_stream(state.hub.clone(), req, state.limits);
    let lines = opening(lines, ended_with, opening_wait).await?;
    // The permit and the lifecycle live as long as the response body, which drives the
    // connection.
    let lifecycle = Arc::new(lifecycle);
    let on_line = lifecycle.clone();
    let chunks = lines.map(move |chunk| {
        let _permit = &permit;
        on_line.synced(chunk.len());
        chunk
    });
    let encoding = Encoding::negotiate(headers.get(header::ACCEPT_ENCODING).and_then(|h| h.to_str().ok()));
    let body = match encoding {
        Some(encoding) => Body::from_stream(Encoded::new(chunks, encoding).inspect(move |encoded| {
            if let Ok(bytes) = encoded {
                lifecycle.sent(bytes.len());
            }
        })),
        None => Body::from_stream(chunks.map(move |chunk| {
            lifecycle.sent(chunk.len());
            Ok::<_, std::convert::Infallible>(chunk)
        })),
    };
    let mut response = body.into_response();
    let h = response.headers_mut();
    if let Some(encoding) = encoding {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static(encoding.name()));
    }
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(format.content_type()));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}

/// Longest the answer waits for a connection's first lines before it starts anyway.
const OPENING_WAIT: Duration = Duration::from_secs(10);

/// Hold the answer until the connection's first lines (its first checkpoint) are ready, at
/// most `wait`: a connection that ends in an error before sending anything (too many buckets,
/// storage failing) is answered with that error's status, as the reference answers it
/// (errata.md, "Requests"), instead of an empty 200 stream. Returns every line to send.
async fn opening<L>(
    mut lines: L,
    ended_with: oneshot::Receiver<SyncError>,
    wait: Duration,
) -> Result<impl Stream<Item = Bytes>, ServiceError>
where
    L: Stream<Item = Bytes> + Unpin,
{
    let first = match tokio::time::timeout(wait, lines.next()).await {
        Ok(Some(first)) => Some(first),
        Ok(None) => match ended_with.await {
            Ok(error) => return Err(refused(error)),
            Err(_) => None,
        },
        Err(_) => None,
    };
    Ok(futures::stream::iter(first).chain(lines))
}

/// The error a client is given for a connection that ended with `error`.
pub(crate) fn refused(error: SyncError) -> ServiceError {
    let code = error.code();
    let refused = match error {
        SyncError::TooMany(description) => ServiceError::new(code, 500, description),
        SyncError::Storage(e) => ServiceError::new(code, 500, "Bucket storage query failed; retry shortly").with_details(e.to_string()),
    };
    // The sync layer counted it where it happened.
    refused.counted()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation() {
        let sdk = "application/vnd.powersync.bson-stream;q=0.9,application/x-ndjson;q=0.8";
        assert_eq!(negotiate(Some(sdk)), LineFormat::Bson);
        assert_eq!(negotiate(Some("application/x-ndjson")), LineFormat::Ndjson);
        assert_eq!(negotiate(None), LineFormat::Ndjson);
        assert_eq!(
            negotiate(Some("application/vnd.powersync.bson-stream;q=0.5,application/x-ndjson")),
            LineFormat::Ndjson
        );
        assert_eq!(negotiate(Some("*/*")), LineFormat::Ndjson);
    }
}

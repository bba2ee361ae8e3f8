//! Request bodies with a size limit per route. A body over the limit gets a PowerSync error
//! (413 `PSYNC_S2001`) instead of axum's plain-text rejection, and is read to its end (up to
//! [`DRAIN_LIMIT`]) first: a client still sending it would otherwise see the connection reset
//! instead of the answer.

use crate::error::ServiceError;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::header;
use bytes::BytesMut;
use futures::StreamExt;

/// `POST /sync/stream`: a client states each bucket it has (name and position, ~100 bytes);
/// a client with ten thousand buckets sends about 1 MB.
pub const SYNC_STREAM_LIMIT: usize = 1 << 20;
/// `POST /sync/checkpoint-request`: a client id and a number.
pub const CHECKPOINT_REQUEST_LIMIT: usize = 16 << 10;
/// Most bytes read (and dropped) of a body over its limit; a larger one is refused without
/// reading it.
pub const DRAIN_LIMIT: usize = 8 << 20;

/// The whole request body, at most `LIMIT` bytes.
pub struct LimitedBody<const LIMIT: usize>(pub Bytes);

impl<S: Send + Sync, const LIMIT: usize> FromRequest<S> for LimitedBody<LIMIT> {
    type Rejection = ServiceError;

    async fn from_request(req: Request, _: &S) -> Result<Self, ServiceError> {
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > DRAIN_LIMIT as u64) {
            return Err(too_large(LIMIT));
        }
        let mut frames = req.into_body().into_data_stream();
        let mut body = BytesMut::new();
        let mut read = 0;
        while let Some(frame) = frames.next().await {
            let frame = frame.map_err(|e| ServiceError::validation(format!("could not read the request body: {e}")))?;
            read += frame.len();
            if read <= LIMIT {
                body.extend_from_slice(&frame);
            } else if read > DRAIN_LIMIT {
                break;
            }
        }
        if read > LIMIT {
            return Err(too_large(LIMIT));
        }
        Ok(LimitedBody(body.freeze()))
    }
}

fn too_large(limit: usize) -> ServiceError {
    ServiceError::new("PSYNC_S2001", 413, format!("Request body too large (limit {limit} bytes)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;

    async fn read<const LIMIT: usize>(body: Body, content_length: Option<usize>) -> Result<Bytes, ServiceError> {
        let mut req = Request::builder();
        if let Some(n) = content_length {
            req = req.header(header::CONTENT_LENGTH, n);
        }
        let req = req.body(body).map_err(|e| ServiceError::internal(e.to_string()))?;
        LimitedBody::<LIMIT>::from_request(req, &()).await.map(|b| b.0)
    }

    fn chunked(pieces: &'static [&'static str]) -> Body {
        Body::from_stream(futures::stream::iter(
            pieces.iter().map(|p| Ok::<_, std::io::Error>(Bytes::from_static(p.as_bytes()))),
        ))
    }

    #[tokio::test]
    async fn bodies_up_to_the_limit_are_read_whole() {
        assert_eq!(read::<5>(Body::from("12345"), Some(5)).await.ok(), Some(Bytes::from("12345")));
        assert_eq!(read::<5>(chunked(&["12", "345"]), None).await.ok(), Some(Bytes::from("12345")));
        assert_eq!(read::<5>(Body::empty(), None).await.ok(), Some(Bytes::new()));
    }

    #[tokio::test]
    async fn larger_bodies_are_413() {
        for result in [
            read::<5>(Body::from("123456"), Some(6)).await,
            read::<5>(chunked(&["123", "456"]), None).await,
            // Declared beyond what would be read at all: refused without reading.
            read::<5>(Body::from("1"), Some(DRAIN_LIMIT + 1)).await,
        ] {
            let e = result.err().map(|e| (e.status, e.code, e.description));
            assert_eq!(e, Some((413, "PSYNC_S2001", "Request body too large (limit 5 bytes)".to_string())));
        }
    }
}

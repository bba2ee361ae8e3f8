//! The HTTP server: accepts connections and serves the router, over a lean HTTP/1.1 path of
//! our own for plain requests and over hyper (HTTP/1.1 and h2) for everything else.
//!
//! Why: a held sync stream is idle nearly all the time, yet hyper's HTTP/1 connection keeps a
//! read buffer (8 KiB, grown to 16 KiB by the read that watches for the client going away), an
//! 8 KiB header write buffer and its dispatcher for the connection's lifetime: most of what
//! 10,000 held streams cost. The lean path ([`lean_http1`]) parses the request head, hands
//! the request to the same router (so routing, CORS, auth, error envelopes and 429s are
//! unchanged) and writes the response itself, holding no buffers while the stream is idle.
//!
//! It answers plain requests of every route, not only sync streams, and then reads the next
//! request off the same connection: clients pool their connections (the Node SDK's undici
//! does), so a stream often starts on one that served a write checkpoint before, and must be
//! as lean there. What it does not take ([`sniff`] says which: chunked request bodies,
//! `Expect`, `HEAD`, HTTP/1.0, h2, WebSocket upgrades, oversized or malformed heads) goes to
//! hyper with the bytes already read put back in front of the socket, for the rest of the
//! connection.

mod lean_http1;
mod prefixed;
mod sniff;
#[cfg(test)]
mod tests;
mod write_timeout;

use crate::error::ServiceError;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue, Version};
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prefixed::Prefixed;
use std::convert::Infallible;
use std::io;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;

/// Serve `router` on `listener` until the future is dropped.
pub async fn serve(listener: TcpListener, router: Router) {
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => {
                tokio::spawn(connection(tcp, router.clone(), Timeouts::DEFAULT));
            }
            Err(e) => accept_error(e).await,
        }
    }
}

/// Serve `router` on every listener until the future is dropped.
pub async fn serve_all(listeners: Vec<TcpListener>, router: Router) {
    futures::future::join_all(listeners.into_iter().map(|listener| serve(listener, router.clone()))).await;
}

/// Per-connection errors (the client gave up while queued) are skipped. Others, such as running
/// out of file descriptors, are logged and retried after a pause rather than spun on; as hyper
/// and axum do.
async fn accept_error(e: io::Error) {
    let kind = e.kind();
    if matches!(
        kind,
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accept error");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

#[derive(Clone, Copy, Debug)]
struct Timeouts {
    /// How long a connection may take to send its next request (idle time, head and, for the
    /// lean path, body; for hyper, idle time and head): idle sockets cannot pile up.
    request: Duration,
    /// How long a write may make no progress before the connection is closed: a client that
    /// stops reading cannot hold its connection (and sync connection) forever.
    write: Duration,
}

impl Timeouts {
    const DEFAULT: Timeouts = Timeouts {
        request: Duration::from_secs(30),
        write: Duration::from_secs(60),
    };
}

async fn connection(mut tcp: TcpStream, router: Router, timeouts: Timeouts) {
    // Sync lines are small and latency-bound: never hold them back for Nagle's algorithm.
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "could not set TCP_NODELAY");
    }
    let mut read = Vec::new();
    loop {
        match tokio::time::timeout(timeouts.request, sniff::sniff(&tcp, read)).await {
            Ok(Ok(sniff::Sniffed::Lean { request, rest })) => {
                if !lean_http1::serve(&mut tcp, request, router.clone(), timeouts.write).await {
                    return;
                }
                read = rest;
            }
            // Boxed: hyper's connection state machine is large, and would otherwise size the task of
            // every held stream too.
            Ok(Ok(sniff::Sniffed::Other(read))) => {
                let io = Prefixed::new(read, tcp, timeouts.write);
                return Box::pin(hyper_connection(io, router, timeouts.request)).await;
            }
            // The client went away, or sent no complete request in time: close.
            Ok(Err(_)) => return,
            Err(_) => {
                tracing::debug!("closing a connection that sent no request in time");
                return;
            }
        }
    }
}

/// Serve a connection with hyper (HTTP/1.1 with keep-alive, or h2), as `axum::serve` does.
async fn hyper_connection(io: Prefixed, router: Router, header_timeout: Duration) {
    let service = tower::service_fn(move |request: Request<hyper::body::Incoming>| {
        let router = router.clone();
        async move { Ok::<_, Infallible>(respond(router, request.map(Body::new)).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http2().enable_connect_protocol();
    builder.http1().timer(TokioTimer::new()).header_read_timeout(header_timeout);
    let service = TowerToHyperService::new(service);
    if let Err(e) = builder.serve_connection_with_upgrades(TokioIo::new(io), service).await {
        tracing::trace!(error = %e, "connection ended with an error");
    }
}

/// Answer one request (on either path) through the router, except an HTTP/1.1 request without
/// exactly one `Host` header: RFC 9112 §3.2 requires a 400 for it, and Node (which the
/// reference runs on) answers 400 to one without. hyper leaves the check to the service, so it is done here for
/// both paths alike. HTTP/1.0 requests need no `Host`; h2 ones carry `:authority` instead.
async fn respond(router: Router, request: Request) -> Response {
    if request.version() == Version::HTTP_11 && request.headers().get_all(header::HOST).iter().count() != 1 {
        let mut response = ServiceError::validation("an HTTP/1.1 request needs exactly one Host header").into_response();
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        return response;
    }
    match router.oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

//! HTTP API: sync stream (HTTP and WebSocket), write checkpoints, probes, auth, admin API,
//! the dashboard.
pub mod admin;
pub mod auth;
pub mod body;
pub mod checkpoint;
pub mod checkpoint_request;
mod compression;
pub mod dashboard;
pub mod error;
pub mod http_server;
mod lifecycle;
pub mod probes;
pub mod rsocket;
pub mod server;
pub mod stream;

pub use server::{router, AppState};

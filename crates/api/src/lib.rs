//! HTTP API: sync stream, write checkpoints, probes, auth.
pub mod auth;
pub mod checkpoint;
mod compression;
pub mod error;
pub mod http_server;
pub mod probes;
pub mod server;
pub mod stream;

pub use server::{router, AppState};

//! Postgres connections as the service makes them: TLS (rustls) per the PowerSync `sslmode`
//! settings, connect timeouts and TCP keepalives ([`PgEndpoint`]), clients that reconnect on
//! demand after the server went away ([`LazyClient`]), retry delays with jitter ([`Backoff`]),
//! and errors that say what failed (unknown CA, host name mismatch, expired certificate).

mod backoff;
mod endpoint;
mod error;
mod lazy;
mod tls;

pub use backoff::Backoff;
pub use endpoint::PgEndpoint;
pub use error::PgConnError;
pub use lazy::LazyClient;

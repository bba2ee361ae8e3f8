//! PostgreSQL source: setup checks, table discovery, chunked snapshots (COPY), and the
//! pgoutput change stream, all producing rows as sync-rules values.
//!
//! This crate knows nothing about buckets or storage: it turns Postgres into a sequence of
//! [`SourceEvent`]s and snapshot chunks. The replicator (in the binary) feeds them to storage.

pub mod array;
pub mod copy_text;
pub mod error;
pub mod lsn;
pub mod pgoutput;
pub mod relation;
pub mod setup;
pub mod slot;
pub mod snapshot;
pub mod stream;
pub mod types;

pub use error::SourceError;
pub use lsn::Lsn;
pub use relation::{ColumnValue, RelationInfo, SourceRow};
pub use stream::{ChangeStream, SourceEvent, StreamOptions};

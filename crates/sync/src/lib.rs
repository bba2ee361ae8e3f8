//! Sync layer: turns storage checkpoints into protocol lines for each client connection.
//!
//! [`CheckpointHub`] does the shared work once per checkpoint for the whole process (listens
//! for new checkpoints, keeps bucket checksums current incrementally, tracks write checkpoints);
//! each connection only compares its own buckets against it and streams the data it lacks.

mod cache;
pub mod connection;
pub mod hub;
#[cfg(test)]
mod hub_tests;
#[cfg(test)]
mod interrupt_tests;
mod interrupts;
pub mod lines;
mod misses;
mod output;
pub mod stats;
#[cfg(test)]
mod testing;
mod write_checkpoints;

pub use connection::{connection_stream, ConnectionRequest, Limits, SyncError};
pub use hub::CheckpointHub;
pub use lines::LineFormat;
pub use stats::ConnectionStats;
pub use write_checkpoints::WriteCheckpointWatch;

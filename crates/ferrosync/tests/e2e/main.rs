//! End-to-end tests: a throwaway Postgres, the real `ferrosync` binary, and clients speaking
//! the protocol (a raw HTTP client that checks every checksum, and the real PowerSync Node SDK).

mod abuse;
mod admin;
mod chaos;
mod checkpoint_requests;
mod compaction;
mod compression;
mod dashboard;
mod deploy;
mod failover;
mod harness;
mod hygiene;
mod incremental_deploy;
mod kill;
mod large_download;
mod limits;
mod live;
mod metrics;
mod network_cut;
mod node_client;
mod otlp;
mod protocol;
mod proxy;
mod restart;
mod schema_changes;
mod slots;
mod streams;
mod tls;
mod tools;
mod websocket;
mod ws_client;

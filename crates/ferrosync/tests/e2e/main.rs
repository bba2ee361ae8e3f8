//! End-to-end tests: a throwaway Postgres, the real `ferrosync` binary, and clients speaking
//! the protocol (a raw HTTP client that checks every checksum, and the real PowerSync Node SDK).

mod harness;
mod kill;
mod node_client;
mod protocol;
mod tls;

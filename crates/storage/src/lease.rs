//! The replication lease: one replicator per stream. It is a session advisory lock on a
//! dedicated storage connection, so it is released the moment its holder dies (kill -9, OOM,
//! a crashed host: the server ends the session) and a standby takes over within its polling
//! interval instead of waiting out a timeout. `sync_rules.lock_owner` names the holder, and
//! every write transaction of the replicator checks it ([`crate::BucketWriter`]): a replicator
//! that lost the lease can never commit again, even before it notices.

use crate::error::StorageError;
use ferrosync_pgconn::PgEndpoint;
use std::time::Duration;
use tokio_postgres::Client;

/// Advisory-lock namespace of replication leases (the key's first half; the stream id is the second).
const LEASE_NAMESPACE: i32 = 0x6673_796e;
/// How often a held lease checks that its connection (and so its lock) is still alive.
const HEALTH_INTERVAL: Duration = Duration::from_secs(1);
/// A health check unanswered this long counts as a lost lease (the server drops a silent
/// session after about 11 s of keepalives, and a standby may then take over).
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

/// A storage connection that can hold replication leases. It also serves the replicator's
/// occasional stream bookkeeping, so a standby polling for the lease uses this one connection.
pub struct LeaseConnection {
    client: Client,
}

impl LeaseConnection {
    pub async fn open(storage: &PgEndpoint) -> Result<LeaseConnection, StorageError> {
        // Server-side keepalives (set there): a holder that vanished without closing its socket
        // loses the lock within seconds, not hours.
        let client = crate::connect_for_writes(storage).await?;
        Ok(LeaseConnection { client })
    }

    /// The connection itself, for stream bookkeeping (commits are synchronous).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Take the lease on `stream` for `owner` if nobody holds it; `false` if another live
    /// process does. Taking it makes `owner` the stream's fencing token, so the previous
    /// holder's writes fail from now on.
    pub async fn try_acquire(&self, stream: i64, owner: &str) -> Result<bool, StorageError> {
        self.acquire_in(stream, owner, &["PROCESSING", "ACTIVE"]).await
    }

    /// Take the lease on a STOP stream, to clean it up: `false` while anyone holds it (its last
    /// replicator may not have noticed the stop yet, or another process is cleaning it up).
    pub async fn try_acquire_stopped(&self, stream: i64, owner: &str) -> Result<bool, StorageError> {
        self.acquire_in(stream, owner, &["STOP"]).await
    }

    /// Take the lease on `stream` while it is in one of `states`.
    async fn acquire_in(&self, stream: i64, owner: &str, states: &[&str]) -> Result<bool, StorageError> {
        let key = i32::try_from(stream).map_err(|_| StorageError::Corrupt(format!("stream id {stream} exceeds int4")))?;
        let got: bool = self
            .client
            .query_one("SELECT pg_try_advisory_lock($1, $2)", &[&LEASE_NAMESPACE, &key])
            .await?
            .get(0);
        if !got {
            return Ok(false);
        }
        // Only a stream in the expected state; and never over an unexpired lease of a process
        // of the previous (time-based) lease scheme, which does not check the fencing token.
        let taken = self
            .client
            .execute(
                "UPDATE ferrosync.sync_rules SET lock_owner = $2, lock_expires_at = NULL
                 WHERE id = $1 AND state = ANY ($3)
                   AND (lock_expires_at IS NULL OR lock_expires_at < now() OR lock_owner = $2)",
                &[&stream, &owner, &states],
            )
            .await?;
        if taken == 0 {
            self.client
                .execute("SELECT pg_advisory_unlock($1, $2)", &[&LEASE_NAMESPACE, &key])
                .await?;
        }
        Ok(taken == 1)
    }

    /// Give up every lease this connection holds.
    pub async fn release(&self) -> Result<(), StorageError> {
        self.client.execute("SELECT pg_advisory_unlock_all()", &[]).await?;
        Ok(())
    }

    /// Resolves once the lease may be lost: its connection ended (so the server released the
    /// lock) or stopped answering (a cut network: the server drops the session in seconds).
    pub async fn lost(&self) -> StorageError {
        loop {
            tokio::time::sleep(HEALTH_INTERVAL).await;
            match tokio::time::timeout(HEALTH_TIMEOUT, self.client.simple_query("SELECT 1")).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return StorageError::LeaseLost(format!("the lease connection failed: {e}")),
                Err(_) => {
                    return StorageError::LeaseLost(format!("the lease connection did not answer within {} s", HEALTH_TIMEOUT.as_secs()))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrosync_testkit::{PgCluster, PgOptions};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_holder_and_instant_release_when_it_dies() -> anyhow::Result<()> {
        let cluster = PgCluster::start(PgOptions::default())?;
        cluster.create_database("storage").await?;
        let storage = PgEndpoint::from_conn_str(&cluster.conn_str("storage"))?;
        crate::schema::migrate(&crate::connect(&storage).await?).await?;
        let admin = cluster.connect("storage").await?;
        admin
            .batch_execute("INSERT INTO ferrosync.sync_rules (id, content, state, slot_name) VALUES (7, '', 'ACTIVE', 's')")
            .await?;
        let a = LeaseConnection::open(&storage).await?;
        let b = LeaseConnection::open(&storage).await?;
        assert!(a.try_acquire(7, "a").await?);
        assert!(!b.try_acquire(7, "b").await?, "a holds it");
        let owner: String = admin
            .query_one("SELECT lock_owner FROM ferrosync.sync_rules WHERE id = 7", &[])
            .await?
            .get(0);
        assert_eq!(owner, "a");
        drop(a);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !b.try_acquire(7, "b").await? {
            assert!(std::time::Instant::now() < deadline, "the lock outlived its connection");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let owner: String = admin
            .query_one("SELECT lock_owner FROM ferrosync.sync_rules WHERE id = 7", &[])
            .await?
            .get(0);
        assert_eq!(owner, "b", "the new holder is the fencing token");
        Ok(())
    }
}

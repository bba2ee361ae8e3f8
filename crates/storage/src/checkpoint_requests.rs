//! Client-chosen write checkpoint ids (`POST /sync/checkpoint-request`, protocol.md §2.5).
//!
//! They share `ferrosync.write_checkpoints` with server-generated ids (`GET
//! /write-checkpoint2.json`): one row per `<sub>/<client_id>`, whose id only grows whichever
//! mode raises it. A request raises it to the client's id when that is larger; a server-generated
//! id is always the stored one plus one. So a client that mixes the modes still sees a monotone
//! value. Rows whose id was last chosen by a client carry `requested_at` and expire after the
//! retention period (`checkpoint_request_retention_minutes`); a server-generated id clears it,
//! so such rows are kept, as the reference keeps them. An expired key starts over: a
//! requests-mode client re-seeds from its own (larger) counter, but a legacy request on it would
//! start again at 1, which is why mixing modes on one key is not recommended.

use crate::error::StorageError;
use crate::reader::PgStorage;
use crate::writer::lsn_to_text;
use std::time::Duration;

impl PgStorage {
    /// Raise the write checkpoint of `user_key` to `id` at source position `head`, unless the
    /// stored id is already at least `id`; returns the stored id. An equal id keeps its
    /// position but restarts its retention period (the client is still waiting for it).
    pub async fn request_write_checkpoint(&self, user_key: &str, id: i64, head: u64) -> Result<i64, StorageError> {
        // One statement, so concurrent requests for a key serialise on its row. Every SET
        // expression reads the row as it was.
        let row = self
            .client()
            .await?
            .query_one(
                "INSERT INTO ferrosync.write_checkpoints AS w (user_key, write_checkpoint, lsn, seq, requested_at)
                 VALUES ($1, $2, $3::text::pg_lsn, nextval('ferrosync.write_checkpoint_seq'), now())
                 ON CONFLICT (user_key) DO UPDATE SET
                   lsn = CASE WHEN excluded.write_checkpoint > w.write_checkpoint THEN excluded.lsn ELSE w.lsn END,
                   seq = CASE WHEN excluded.write_checkpoint > w.write_checkpoint THEN excluded.seq ELSE w.seq END,
                   requested_at = CASE
                     WHEN excluded.write_checkpoint > w.write_checkpoint THEN now()
                     WHEN excluded.write_checkpoint = w.write_checkpoint AND w.requested_at IS NOT NULL THEN now()
                     ELSE w.requested_at END,
                   write_checkpoint = greatest(w.write_checkpoint, excluded.write_checkpoint),
                   updated_at = now()
                 RETURNING w.write_checkpoint",
                &[&user_key, &id, &lsn_to_text(head)],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Delete client-chosen write checkpoints not requested again for `retention`; returns how
    /// many. Server-generated ones are kept.
    pub async fn expire_checkpoint_requests(&self, retention: Duration) -> Result<u64, StorageError> {
        let seconds = retention.as_secs_f64();
        Ok(self
            .client()
            .await?
            .execute(
                "DELETE FROM ferrosync.write_checkpoints WHERE requested_at < now() - $1::float8 * interval '1 second'",
                &[&seconds],
            )
            .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reader::SyncStorage;
    use ferrosync_testkit::{PgCluster, PgOptions};

    const HEAD: u64 = 0x100;

    async fn storage(cluster: &PgCluster) -> anyhow::Result<PgStorage> {
        cluster.create_database("storage").await?;
        let endpoint = crate::PgEndpoint::from_conn_str(&cluster.conn_str("storage"))?;
        crate::schema::migrate(&crate::connect(&endpoint).await?).await?;
        Ok(PgStorage::connect(&endpoint, 1).await?)
    }

    /// (key, id, position) of every stored write checkpoint, in the order the hub reads them.
    async fn stored(s: &PgStorage) -> anyhow::Result<Vec<(String, i64, u64)>> {
        Ok(s.write_checkpoints_since(0)
            .await?
            .into_iter()
            .map(|w| (w.user_key, w.write_checkpoint, w.lsn))
            .collect())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requested_ids_only_grow_and_mix_with_generated_ones() -> anyhow::Result<()> {
        let cluster = PgCluster::start(PgOptions::default())?;
        let s = storage(&cluster).await?;
        let row = |key: &str, id, lsn| (key.to_string(), id, lsn);
        assert_eq!(s.request_write_checkpoint("u/c", 5, HEAD).await?, 5);
        // Stale and duplicate ids keep the stored id and the position it waits for.
        assert_eq!(s.request_write_checkpoint("u/c", 3, HEAD + 8).await?, 5);
        assert_eq!(s.request_write_checkpoint("u/c", 5, HEAD + 8).await?, 5);
        assert_eq!(stored(&s).await?, [row("u/c", 5, HEAD)]);
        assert_eq!(s.request_write_checkpoint("u/c", 6, HEAD + 16).await?, 6);
        // Keys are separate.
        assert_eq!(s.request_write_checkpoint("u/d", 1, HEAD).await?, 1);
        assert_eq!(stored(&s).await?, [row("u/c", 6, HEAD + 16), row("u/d", 1, HEAD)]);
        // A generated id continues from the requested one, and a request continues from that.
        assert_eq!(s.create_write_checkpoint("u/c", HEAD + 24).await?, 7);
        assert_eq!(s.request_write_checkpoint("u/c", 7, HEAD + 32).await?, 7);
        assert_eq!(stored(&s).await?, [row("u/d", 1, HEAD), row("u/c", 7, HEAD + 24)]);
        assert_eq!(s.request_write_checkpoint("u/c", i64::MAX, HEAD + 32).await?, i64::MAX);
        assert_eq!(s.create_write_checkpoint("u/d", HEAD + 40).await?, 2);
        assert_eq!(stored(&s).await?, [row("u/c", i64::MAX, HEAD + 32), row("u/d", 2, HEAD + 40)]);
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_requested_ids_expire() -> anyhow::Result<()> {
        let cluster = PgCluster::start(PgOptions::default())?;
        let s = storage(&cluster).await?;
        s.request_write_checkpoint("requested", 4, HEAD).await?;
        s.request_write_checkpoint("generated later", 4, HEAD).await?;
        s.create_write_checkpoint("generated later", HEAD).await?;
        s.create_write_checkpoint("generated", HEAD).await?;
        // Repeating a generated id does not make it expire.
        s.request_write_checkpoint("generated", 1, HEAD).await?;
        assert_eq!(s.expire_checkpoint_requests(Duration::from_secs(3600)).await?, 0);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(s.expire_checkpoint_requests(Duration::from_millis(10)).await?, 1);
        let mut left: Vec<String> = stored(&s).await?.into_iter().map(|(key, _, _)| key).collect();
        left.sort();
        assert_eq!(left, ["generated", "generated later"]);
        // An expired key starts over with the client's id.
        assert_eq!(s.request_write_checkpoint("requested", 2, HEAD).await?, 2);
        Ok(())
    }
}

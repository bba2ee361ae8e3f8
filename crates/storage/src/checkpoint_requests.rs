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
use crate::writer::{lsn_from_text, lsn_to_text};
use std::time::Duration;

/// The row for a key after a checkpoint request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredRequest {
    /// The stored id (the request's id when it raised it, the larger stored one otherwise).
    pub id: i64,
    /// The source position the stored id waits for.
    pub lsn: u64,
    /// Whether this request raised the stored id (and so stored `head` as its position).
    pub raised: bool,
}

impl PgStorage {
    /// Raise the write checkpoint of `user_key` to `id` at source position `head`, unless the
    /// stored id is already at least `id`. An equal id keeps its position but restarts its
    /// retention period (the client is still waiting for it).
    pub async fn request_write_checkpoint(&self, user_key: &str, id: i64, head: u64) -> Result<StoredRequest, StorageError> {
        // One statement, so concurrent requests for a key serialise on its row. The sequence
        // value is drawn first so that `raised` can tell whether this request's row is stored.
        let row = self
            .client()
            .await?
            .query_one(
                "WITH s AS (SELECT nextval('ferrosync.write_checkpoint_seq') AS seq)
                 INSERT INTO ferrosync.write_checkpoints AS w (user_key, write_checkpoint, lsn, seq, requested_at)
                 SELECT $1, $2, $3::text::pg_lsn, s.seq, now() FROM s
                 ON CONFLICT (user_key) DO UPDATE SET
                   lsn = CASE WHEN excluded.write_checkpoint > w.write_checkpoint THEN excluded.lsn ELSE w.lsn END,
                   seq = CASE WHEN excluded.write_checkpoint > w.write_checkpoint THEN excluded.seq ELSE w.seq END,
                   requested_at = CASE
                     WHEN excluded.write_checkpoint > w.write_checkpoint THEN now()
                     WHEN excluded.write_checkpoint = w.write_checkpoint AND w.requested_at IS NOT NULL THEN now()
                     ELSE w.requested_at END,
                   write_checkpoint = greatest(w.write_checkpoint, excluded.write_checkpoint)
                 RETURNING w.write_checkpoint, w.lsn::text, w.seq = (SELECT seq FROM s)",
                &[&user_key, &id, &lsn_to_text(head)],
            )
            .await?;
        let lsn: String = row.get(1);
        Ok(StoredRequest {
            id: row.get(0),
            lsn: lsn_from_text(&lsn).ok_or_else(|| StorageError::Corrupt(format!("bad lsn {lsn}")))?,
            raised: row.get(2),
        })
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requested_ids_only_grow_and_mix_with_generated_ones() -> anyhow::Result<()> {
        let cluster = PgCluster::start(PgOptions::default())?;
        let s = storage(&cluster).await?;
        let stored = |id, lsn, raised| StoredRequest { id, lsn, raised };
        assert_eq!(s.request_write_checkpoint("u/c", 5, HEAD).await?, stored(5, HEAD, true));
        // Stale and duplicate ids keep the stored id and the position it waits for.
        assert_eq!(s.request_write_checkpoint("u/c", 3, HEAD + 8).await?, stored(5, HEAD, false));
        assert_eq!(s.request_write_checkpoint("u/c", 5, HEAD + 8).await?, stored(5, HEAD, false));
        assert_eq!(s.request_write_checkpoint("u/c", 6, HEAD + 16).await?, stored(6, HEAD + 16, true));
        // Keys are separate.
        assert_eq!(s.request_write_checkpoint("u/d", 1, HEAD).await?, stored(1, HEAD, true));
        // A generated id continues from the requested one, and a request continues from that.
        assert_eq!(s.create_write_checkpoint("u/c", HEAD + 24).await?, 7);
        assert_eq!(s.request_write_checkpoint("u/c", 7, HEAD + 32).await?, stored(7, HEAD + 24, false));
        assert_eq!(
            s.request_write_checkpoint("u/c", i64::MAX, HEAD + 32).await?,
            stored(i64::MAX, HEAD + 32, true)
        );
        // The hub sees the last raise of each key, in order.
        let seen: Vec<(String, i64)> = s
            .write_checkpoints_since(0)
            .await?
            .into_iter()
            .map(|w| (w.user_key, w.write_checkpoint))
            .collect();
        assert_eq!(seen, [("u/d".to_string(), 1), ("u/c".to_string(), i64::MAX)]);
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
        let mut left: Vec<String> = s.write_checkpoints_since(0).await?.into_iter().map(|w| w.user_key).collect();
        left.sort();
        assert_eq!(left, ["generated", "generated later"]);
        // An expired key starts over with the client's id.
        assert_eq!(s.request_write_checkpoint("requested", 2, HEAD).await?.id, 2);
        Ok(())
    }
}

//! Storage schema migrations, applied in order on start (idempotent, versioned).

use crate::error::StorageError;
use tokio_postgres::Client;

const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        r#"
CREATE TABLE ferrosync.sync_rules (
    id bigserial PRIMARY KEY,
    content text NOT NULL,
    state text NOT NULL,
    slot_name text NOT NULL,
    snapshot_done boolean NOT NULL DEFAULT false,
    last_checkpoint bigint NOT NULL DEFAULT 0,
    last_checkpoint_lsn pg_lsn,
    no_checkpoint_before pg_lsn,
    persisted_op bigint NOT NULL DEFAULT 0,
    lock_owner text,
    lock_expires_at timestamptz,
    last_error text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE ferrosync.source_tables (
    id bigserial PRIMARY KEY,
    group_id bigint NOT NULL,
    relation_oid bigint NOT NULL,
    schema_name text NOT NULL,
    table_name text NOT NULL,
    key_columns text[] NOT NULL,
    snapshot_done boolean NOT NULL DEFAULT false,
    snapshot_last_key text,
    snapshot_rows bigint NOT NULL DEFAULT 0
);
CREATE INDEX ON ferrosync.source_tables (group_id);
CREATE TABLE ferrosync.bucket_data (
    group_id integer NOT NULL,
    bucket text NOT NULL,
    op_id bigint NOT NULL,
    op smallint NOT NULL,
    row_type text,
    row_id text,
    subkey text,
    data text,
    checksum bigint NOT NULL,
    target_op bigint,
    PRIMARY KEY (group_id, bucket, op_id)
);
CREATE TABLE ferrosync.current_data (
    group_id integer NOT NULL,
    table_id bigint NOT NULL,
    key uuid NOT NULL,
    data bytea,
    buckets text NOT NULL,
    lookups text NOT NULL,
    PRIMARY KEY (group_id, table_id, key)
);
CREATE TABLE ferrosync.bucket_parameters (
    group_id integer NOT NULL,
    lookup text NOT NULL,
    table_id bigint NOT NULL,
    key uuid NOT NULL,
    id bigint NOT NULL,
    bucket_parameters text NOT NULL,
    PRIMARY KEY (group_id, lookup, table_id, key, id)
);
CREATE TABLE ferrosync.bucket_changes (
    group_id integer NOT NULL,
    max_op_id bigint NOT NULL,
    buckets text[] NOT NULL,
    lookups text[] NOT NULL,
    PRIMARY KEY (group_id, max_op_id)
);
CREATE SEQUENCE ferrosync.write_checkpoint_seq;
CREATE TABLE ferrosync.write_checkpoints (
    user_key text PRIMARY KEY,
    write_checkpoint bigint NOT NULL,
    lsn pg_lsn NOT NULL,
    seq bigint NOT NULL
);
CREATE INDEX ON ferrosync.write_checkpoints (seq);
"#,
    ),
    (
        2,
        // Ops move from one row each to compressed per-bucket chunks (see chunk.rs). The old
        // layout only ever held pre-release data, which is not converted.
        r#"
DO $$ BEGIN
    IF EXISTS (SELECT 1 FROM ferrosync.bucket_data LIMIT 1) OR EXISTS (SELECT 1 FROM ferrosync.current_data LIMIT 1) THEN
        RAISE EXCEPTION 'bucket storage holds ops in the pre-release per-op layout; run DROP SCHEMA ferrosync CASCADE on the storage database and restart (the service replicates again and clients re-sync)';
    END IF;
END $$;
DROP TABLE ferrosync.bucket_data;
CREATE TABLE ferrosync.op_chunks (
    group_id integer NOT NULL,
    bucket text COLLATE "C" NOT NULL,
    last_op bigint NOT NULL,
    first_op bigint NOT NULL,
    op_count integer NOT NULL,
    -- Sum of the ops' checksums, mod 2^32.
    checksum bigint NOT NULL,
    ops bytea NOT NULL,
    PRIMARY KEY (group_id, bucket, last_op)
);
-- Payloads are zstd already: no pglz attempt when they are moved out of line.
ALTER TABLE ferrosync.op_chunks ALTER COLUMN ops SET STORAGE EXTERNAL;
-- Current state shrinks too: int4 table ids (no alignment padding in heap or index) and the
-- buckets/lookups lists in a compact binary form (row_codec), NULL when empty.
DROP TABLE ferrosync.current_data;
CREATE TABLE ferrosync.current_data (
    group_id integer NOT NULL,
    table_id integer NOT NULL,
    key uuid NOT NULL,
    data bytea,
    buckets bytea,
    lookups bytea,
    PRIMARY KEY (group_id, table_id, key)
);
"#,
    ),
    (
        3,
        r#"
-- bucket_changes rows up to this op_id have been deleted (see write_task::Pruner).
ALTER TABLE ferrosync.sync_rules ADD COLUMN changes_pruned_to bigint NOT NULL DEFAULT 0;
"#,
    ),
    (
        4,
        r#"
-- Set while a row's id was last chosen by the client (POST /sync/checkpoint-request): such
-- rows expire after checkpoint_request_retention_minutes. NULL for server-generated ids.
ALTER TABLE ferrosync.write_checkpoints ADD COLUMN requested_at timestamptz;
CREATE INDEX write_checkpoints_requested_at ON ferrosync.write_checkpoints (requested_at) WHERE requested_at IS NOT NULL;
"#,
    ),
    (
        5,
        r#"
-- Compaction (see compact.rs). target_op: the newest op that superseded an op this chunk
-- rewrote as MOVE or folded into its CLEAR (0: none); a client downloading an older
-- checkpoint cannot reproduce it from this chunk. clear: the chunk holds only a CLEAR, and
-- its first_op is where the folded range began.
ALTER TABLE ferrosync.op_chunks ADD COLUMN target_op bigint NOT NULL DEFAULT 0;
ALTER TABLE ferrosync.op_chunks ADD COLUMN clear boolean NOT NULL DEFAULT false;
-- Per bucket: compacted up to this checkpoint; a bucket with no newer ops is skipped.
CREATE TABLE ferrosync.bucket_compaction (
    group_id integer NOT NULL,
    bucket text COLLATE "C" NOT NULL,
    compacted_to bigint NOT NULL,
    PRIMARY KEY (group_id, bucket)
);
"#,
    ),
    (
        7,
        r#"
-- In-place deploys (see incremental.rs). prefix_ids: bucket-prefix id per definition (JSON
-- object; NULL or absent: the stream's id). pending_*: a deploy being built on this stream
-- (pending_id is its id from the sync_rules sequence, also the prefix id of the definitions it
-- adds or changes); pending_switch_lsn: built, switch once the stream passes it.
-- retired_*: prefixes of buckets and lookups of replaced definitions, deleted in batches.
ALTER TABLE ferrosync.sync_rules ADD COLUMN prefix_ids text;
ALTER TABLE ferrosync.sync_rules ADD COLUMN pending_id bigint;
ALTER TABLE ferrosync.sync_rules ADD COLUMN pending_content text;
ALTER TABLE ferrosync.sync_rules ADD COLUMN pending_prefix_ids text;
ALTER TABLE ferrosync.sync_rules ADD COLUMN pending_switch_lsn pg_lsn;
ALTER TABLE ferrosync.sync_rules ADD COLUMN retired_buckets text[] NOT NULL DEFAULT '{}';
ALTER TABLE ferrosync.sync_rules ADD COLUMN retired_lookups text[] NOT NULL DEFAULT '{}';
-- Per table: how far the re-read for a pending deploy got.
CREATE TABLE ferrosync.rebuild_tables (
    group_id bigint NOT NULL,
    pending_id bigint NOT NULL,
    table_id bigint NOT NULL,
    last_key text,
    rows bigint NOT NULL DEFAULT 0,
    done boolean NOT NULL DEFAULT false,
    PRIMARY KEY (group_id, pending_id, table_id)
);
"#,
    ),
    (
        8,
        // Write checkpoint retention (see hygiene.rs): when a row was last written, and the
        // largest server-generated id ever pruned, above which a key's new row starts so its
        // ids stay monotone across a prune.
        r#"
ALTER TABLE ferrosync.write_checkpoints ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();
CREATE INDEX write_checkpoints_generated_updated_at ON ferrosync.write_checkpoints (updated_at) WHERE requested_at IS NULL;
CREATE TABLE ferrosync.write_checkpoint_floor (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    pruned_to bigint NOT NULL
);
INSERT INTO ferrosync.write_checkpoint_floor (pruned_to) VALUES (0);
"#,
    ),
    (
        9,
        // Parameter packs (see pack.rs): the parameter entries of the rows a snapshot batch
        // copied, one row per (lookup, table). A row's pack_id names the pack its entries are in.
        r#"
CREATE TABLE ferrosync.parameter_packs (
    group_id integer NOT NULL,
    lookup text COLLATE "C" NOT NULL,
    table_id bigint NOT NULL,
    pack_id bigint NOT NULL,
    entry_count integer NOT NULL,
    entries bytea NOT NULL,
    PRIMARY KEY (group_id, lookup, table_id, pack_id)
);
ALTER TABLE ferrosync.current_data ADD COLUMN pack_id bigint;
"#,
    ),
    (
        10,
        // Values over ~2 KB (a snapshot batch's larger parameter packs, row images, long
        // bucket lists, a batch's changed buckets) are compressed by Postgres. pglz took a
        // tenth of the storage backend's time in a snapshot; lz4 compresses the packs to the
        // same size in less than half the time. A Postgres built without lz4 keeps pglz.
        r#"
DO $$
BEGIN
    ALTER TABLE ferrosync.parameter_packs ALTER COLUMN entries SET COMPRESSION lz4;
    ALTER TABLE ferrosync.current_data
        ALTER COLUMN data SET COMPRESSION lz4,
        ALTER COLUMN buckets SET COMPRESSION lz4,
        ALTER COLUMN lookups SET COMPRESSION lz4;
    ALTER TABLE ferrosync.bucket_changes
        ALTER COLUMN buckets SET COMPRESSION lz4,
        ALTER COLUMN lookups SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
    RAISE NOTICE 'this Postgres has no lz4: storage values stay compressed with pglz';
END $$
"#,
    ),
    (
        11,
        // Lookups compare bytewise, as bucket ids and packed lookups already do: the database's
        // default collation (often en_US.UTF-8) compares through the locale on every request's
        // lookups, and a replaced definition's lookups are a prefix range only in "C".
        r#"
ALTER TABLE ferrosync.bucket_parameters ALTER COLUMN lookup TYPE text COLLATE "C";
"#,
    ),
];

/// Create the schema and apply pending migrations. Serialised with an advisory lock so several
/// processes starting at once do not race.
pub async fn migrate(client: &Client) -> Result<(), StorageError> {
    client
        .batch_execute(
            "SELECT pg_advisory_lock(7283910);
             CREATE SCHEMA IF NOT EXISTS ferrosync;
             CREATE TABLE IF NOT EXISTS ferrosync.migrations (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now());",
        )
        .await?;
    let result = apply(client).await;
    if result.is_err() {
        // A failed migration leaves its transaction open (and aborted): end it, or the
        // unlock below fails too and hides the migration's error.
        let _ = client.batch_execute("ROLLBACK").await;
    }
    client.batch_execute("SELECT pg_advisory_unlock(7283910)").await?;
    result
}

async fn apply(client: &Client) -> Result<(), StorageError> {
    let applied: Vec<i32> = client
        .query("SELECT version FROM ferrosync.migrations", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let pending: Vec<&(i32, &str)> = MIGRATIONS.iter().filter(|(version, _)| !applied.contains(version)).collect();
    if pending.is_empty() {
        return Ok(());
    }
    // One transaction for all of them: a fresh storage database starts with one commit (one
    // WAL flush) instead of one per migration, and a failed one leaves none applied.
    let mut batch = String::from("BEGIN;");
    for (version, sql) in &pending {
        batch.push_str(&format!("{sql}; INSERT INTO ferrosync.migrations (version) VALUES ({version});"));
    }
    batch.push_str("COMMIT;");
    client.batch_execute(&batch).await?;
    for (version, _) in pending {
        tracing::info!(version, "applied storage migration");
    }
    Ok(())
}

//! Pack encoding and the live-version rule, then packs written and unpacked by a real writer
//! against a throwaway Postgres.

use super::*;

fn key(n: u8) -> Uuid {
    Uuid::from_bytes([n; 16])
}

#[test]
fn groups_by_lookup_and_table_and_round_trips() {
    let params = vec![
        // In id order, as the writer allocates them; the lookups are not in order.
        ("b".to_string(), 1, key(3), 10, r#"[{"0":"y"}]"#.to_string()),
        ("b".to_string(), 2, key(4), 11, r#"[{"0":"z"}]"#.to_string()),
        ("a".to_string(), 1, key(2), 12, "[]".to_string()),
        ("b".to_string(), 1, key(1), 13, r#"[{"0":"x"}]"#.to_string()),
    ];
    let packs = pack(params, 10);
    let summary: Vec<(&str, i64, i32)> = packs.iter().map(|p| (p.lookup.as_str(), p.table_id, p.entry_count)).collect();
    assert_eq!(summary, vec![("a", 1, 1), ("b", 1, 2), ("b", 2, 1)]);
    let b = entries(10, &packs[1].entries).expect("valid");
    assert_eq!(
        b,
        vec![
            Entry {
                key: key(3),
                id: 10,
                json: r#"[{"0":"y"}]"#.into()
            },
            Entry {
                key: key(1),
                id: 13,
                json: r#"[{"0":"x"}]"#.into()
            },
        ]
    );
    assert_eq!(encode(10, &b), packs[1].entries);
}

#[test]
fn live_takes_each_keys_newest_version_and_drops_tombstones() {
    let v = |lookup: &str, k: u8, id: i64, json: &str| (lookup.to_string(), 1, key(k), id, json.to_string());
    let live = live(vec![
        v("a", 1, 20, "[new]"),
        v("a", 1, 10, "[old]"),
        v("a", 2, 11, "[two]"),
        v("a", 3, 12, "[gone]"),
        v("a", 3, 13, "[]"),
        v("b", 1, 5, "[b]"),
    ]);
    assert_eq!(live.get("a"), Some(&vec!["[new]".to_string(), "[two]".to_string()]));
    assert_eq!(live.get("b"), Some(&vec!["[b]".to_string()]));
    assert_eq!(live.len(), 2);
}

#[test]
fn damaged_entries_are_none_not_a_panic() {
    let packs = pack(vec![("l".to_string(), 1, key(1), 6, "[1]".to_string())], 5);
    let bytes = &packs[0].entries;
    assert_eq!(entries(5, bytes).map(|e| e.len()), Some(1));
    for cut in 1..bytes.len() {
        assert_eq!(entries(5, &bytes[..cut]), None, "cut at {cut}");
    }
    assert_eq!(entries(i64::MAX, bytes), None, "id overflow");
}

// --- Through the writer, against Postgres -------------------------------------------------

use crate::model::StreamState;
use crate::reader::{PgStorage, SyncStorage};
use crate::writer::{BucketWriter, RecordOp, TableHandle, TableProgress};
use ferrosync_rules::{Row, SourceTableName, SqliteValue, SyncRules, SyncRulesOptions};
use ferrosync_testkit::{PgCluster, PgOptions};
use std::sync::Arc;

const RULES: &str = r#"
bucket_definitions:
  by_list:
    parameters: SELECT list_id FROM todos WHERE owner_id = request.user_id()
    data:
      - SELECT * FROM todos WHERE list_id = bucket.list_id
"#;

fn todo(id: u8, list: &str) -> (Uuid, Row) {
    let mut row = Row::new();
    row.push("id", SqliteValue::Text(format!("t{id}")));
    row.push("owner_id", SqliteValue::Text("u1".into()));
    row.push("list_id", SqliteValue::Text(list.into()));
    (key(id), row)
}

fn upsert(table: &Arc<TableHandle>, (key, row): (Uuid, Row)) -> RecordOp {
    RecordOp::Upsert {
        table: table.clone(),
        key,
        before_key: None,
        row,
        unchanged: Vec::new(),
    }
}

struct Setup {
    _cluster: PgCluster,
    db: tokio_postgres::Client,
    storage: PgStorage,
    writer: BucketWriter,
    table: Arc<TableHandle>,
}

async fn setup() -> anyhow::Result<Setup> {
    let cluster = PgCluster::start(PgOptions::default())?;
    cluster.create_database("storage").await?;
    let endpoint = crate::PgEndpoint::from_conn_str(&cluster.conn_str("storage"))?;
    let db = crate::connect(&endpoint).await?;
    crate::schema::migrate(&db).await?;
    db.batch_execute(
        "INSERT INTO ferrosync.sync_rules (id, content, state, slot_name, lock_owner) VALUES (1, '', 'PROCESSING', 's', 'me');
         INSERT INTO ferrosync.source_tables (id, group_id, relation_oid, schema_name, table_name, key_columns)
         VALUES (1, 1, 100, 'public', 'todos', '{id}');",
    )
    .await?;
    let stream = crate::streams::stream_by_id(&db, 1)
        .await?
        .ok_or_else(|| anyhow::anyhow!("stream 1"))?;
    assert_eq!(stream.state, StreamState::Processing);
    let rules = Arc::new(SyncRules::parse(RULES, &SyncRulesOptions::default())?);
    let writer = BucketWriter::new(
        crate::connect(&endpoint).await?,
        crate::connect(&endpoint).await?,
        stream,
        rules,
        "me".into(),
    );
    let table = Arc::new(TableHandle {
        id: 1,
        name: SourceTableName {
            connection_tag: "default".into(),
            schema: "public".into(),
            name: "todos".into(),
        },
        store_image: false,
    });
    let storage = PgStorage::connect(&endpoint, 1).await?;
    Ok(Setup {
        _cluster: cluster,
        db,
        storage,
        writer,
        table,
    })
}

/// (entry_count, count of bucket_parameters rows)
async fn stored(db: &tokio_postgres::Client) -> anyhow::Result<(i64, i64)> {
    let row = db
        .query_one(
            "SELECT (SELECT coalesce(sum(entry_count), 0)::int8 FROM ferrosync.parameter_packs),
                    (SELECT count(*) FROM ferrosync.bucket_parameters)",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

async fn lists_at(s: &Setup, lookup: &str, checkpoint: i64) -> anyhow::Result<Vec<String>> {
    let mut found = s.storage.parameter_sets(1, checkpoint, &[lookup.to_string()]).await?;
    let mut lists = found.remove(lookup).unwrap_or_default();
    lists.sort();
    Ok(lists)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copied_rows_are_packed_and_leave_their_pack_with_their_history() -> anyhow::Result<()> {
    let mut s = setup().await?;
    // Large packs are compressed with lz4 (migration 10; Debian's Postgres is built with it).
    let compression: String =
        s.db.query_one(
            "SELECT attcompression::text FROM pg_attribute WHERE attrelid = 'ferrosync.parameter_packs'::regclass AND attname = 'entries'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(compression, "l");
    s.writer.set_snapshot_mode(true);
    for (id, list) in [(1, "A"), (2, "B"), (3, "C")] {
        s.writer.save(upsert(&s.table, todo(id, list))).await?;
    }
    let progress = TableProgress {
        table_id: 1,
        last_key: Some("t3".into()),
        rows: 3,
        done: false,
        rebuild: None,
    };
    s.writer.flush_snapshot_chunk(progress).await?;
    s.writer.set_snapshot_mode(false);
    s.writer.sync().await?;
    assert_eq!(stored(&s.db).await?, (3, 0), "one pack of three entries, no single rows");
    let lookup: String = s.db.query_one("SELECT lookup FROM ferrosync.parameter_packs", &[]).await?.get(0);
    let copied = s.writer.stream().persisted_op;
    let json = |l: &str| format!(r#"[{{"list_id":"{l}"}}]"#);
    assert_eq!(lists_at(&s, &lookup, copied).await?, [json("A"), json("B"), json("C")]);

    // t1 moves to list D, t2 is deleted: their entries leave the pack with their ids, so a
    // read at the snapshot's checkpoint still sees what it saw.
    s.writer.save(upsert(&s.table, todo(1, "D"))).await?;
    s.writer
        .save(RecordOp::Delete {
            table: s.table.clone(),
            key: key(2),
        })
        .await?;
    s.writer.flush().await?;
    s.writer.sync().await?;
    assert_eq!(
        stored(&s.db).await?,
        (1, 4),
        "t3 stays packed; t1 and t2: old version + new/tombstone"
    );
    let now = s.writer.stream().persisted_op;
    assert_eq!(lists_at(&s, &lookup, copied).await?, [json("A"), json("B"), json("C")]);
    assert_eq!(lists_at(&s, &lookup, now).await?, [json("C"), json("D")]);

    // Hygiene prunes the moved versions and the tombstone; nothing comes back from the pack.
    let options = crate::hygiene::PruneOptions {
        parameter_horizon: now,
        write_checkpoint_retention: std::time::Duration::from_secs(86_400),
        pause: std::time::Duration::ZERO,
    };
    crate::hygiene::prune(&mut s.db, 1, &options).await?;
    assert_eq!(stored(&s.db).await?, (1, 1), "only t1's current version is left unpacked");
    assert_eq!(lists_at(&s, &lookup, now).await?, [json("C"), json("D")]);

    // The last packed row leaves: its emptied pack is deleted.
    s.writer
        .save(RecordOp::Delete {
            table: s.table.clone(),
            key: key(3),
        })
        .await?;
    s.writer.flush().await?;
    s.writer.sync().await?;
    let packs: i64 = s.db.query_one("SELECT count(*) FROM ferrosync.parameter_packs", &[]).await?.get(0);
    assert_eq!(packs, 0);
    assert_eq!(lists_at(&s, &lookup, s.writer.stream().persisted_op).await?, [json("D")]);
    Ok(())
}

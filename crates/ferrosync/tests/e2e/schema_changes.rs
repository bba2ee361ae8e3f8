//! Source schema changes while the service runs and a client holds a stream: columns added
//! and dropped, replica identity changes, TRUNCATE, a table added to the publication, and a
//! primary key change. The client (a raw protocol client, every checksum verified) must end up
//! with the source's rows, compared on their full data.

use crate::harness::*;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use tokio_postgres::Client;

/// A running service on a seeded source (2 lists; 5 todos each for u1 and u2) with a stream
/// open for u1 that holds the source's rows.
struct Case {
    svc: Service,
    db: Client,
    u1: Client1,
}

/// One raw protocol client: its stream and what it holds.
struct Client1 {
    user: String,
    stream: RawStream,
    state: ClientState,
    /// The number of todos at every complete checkpoint seen while converging.
    seen: Vec<usize>,
}

impl Case {
    async fn start() -> Result<Case> {
        let svc = Service::new().await?;
        let db = svc.source().await?;
        seed(&db, 2, 5, &["u1", "u2"]).await?;
        Case::run(svc, db).await
    }

    async fn run(mut svc: Service, db: Client) -> Result<Case> {
        svc.start().await?;
        let mut u1 = Client1::open(&svc, "u1").await?;
        u1.converge(&db, &svc, "initial sync").await?;
        Ok(Case { svc, db, u1 })
    }

    async fn exec(&self, sql: &str) -> Result<()> {
        self.db.batch_execute(sql).await.with_context(|| format!("source: {sql}"))
    }
}

impl Client1 {
    async fn open(svc: &Service, user: &str) -> Result<Client1> {
        let stream = RawStream::open(
            &svc.url(),
            &token(user),
            json!({"buckets": [], "client_id": format!("schema-{user}")}),
        )
        .await?;
        Ok(Client1 {
            user: user.into(),
            stream,
            state: ClientState::default(),
            seen: Vec::new(),
        })
    }

    fn rows(&self) -> BTreeMap<String, Value> {
        self.state.table("todos")
    }

    /// Sync until a complete checkpoint holds exactly the source's todos of this user (full
    /// row data).
    async fn converge(&mut self, db: &Client, svc: &Service, what: &str) -> Result<()> {
        let expected = source_rows(db, &self.user).await?;
        self.converge_to(expected, svc, what).await
    }

    /// Sync until a complete checkpoint holds exactly `expected` (object_id -> row data).
    async fn converge_to(&mut self, expected: BTreeMap<String, Value>, svc: &Service, what: &str) -> Result<()> {
        if self.state.complete && self.rows() == expected {
            return Ok(());
        }
        let seen = std::cell::RefCell::new(Vec::new());
        let result = self
            .stream
            .sync_until(&mut self.state, T, |s| {
                let rows = s.table("todos");
                seen.borrow_mut().push(rows.len());
                rows == expected
            })
            .await;
        self.seen.extend(seen.into_inner());
        if let Err(e) = result {
            bail!(
                "{} ({what}): {e:#}\n{}\nservice log (tail):\n{}",
                self.user,
                diff(&self.rows(), &expected),
                tail(&svc.log(), 40)
            );
        }
        Ok(())
    }
}

/// The source's todos of `owner` as the service should serialize them (object_id -> row): every
/// current column, booleans as 0/1, integers as numbers, timestamptz as `YYYY-MM-DD hh:mm:ss[.f]Z`
/// (UTC), NULL as null, everything else as text.
async fn source_rows(db: &Client, owner: &str) -> Result<BTreeMap<String, Value>> {
    db.batch_execute("SET TimeZone = 'UTC'").await?;
    let columns: Vec<(String, String)> = db
        .query(
            "SELECT column_name::text, data_type::text FROM information_schema.columns
             WHERE table_schema = 'public' AND table_name = 'todos' ORDER BY ordinal_position",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let select: Vec<String> = columns.iter().map(|(c, _)| format!("\"{c}\"::text")).collect();
    let sql = format!("SELECT {} FROM todos WHERE owner_id = $1", select.join(", "));
    let mut out = BTreeMap::new();
    for row in db.query(&sql, &[&owner]).await? {
        let mut obj = serde_json::Map::new();
        for (i, (name, ty)) in columns.iter().enumerate() {
            let text: Option<String> = row.get(i);
            let value = match text {
                None => Value::Null,
                Some(t) => match ty.as_str() {
                    "boolean" => json!(i64::from(t == "true" || t == "t")),
                    "smallint" | "integer" | "bigint" => json!(t.parse::<i64>()?),
                    "timestamp with time zone" => json!(format!("{}Z", t.strip_suffix("+00").unwrap_or(&t))),
                    _ => json!(t),
                },
            };
            obj.insert(name.clone(), value);
        }
        let id = obj["id"].as_str().context("id")?.to_string();
        out.insert(id, Value::Object(obj));
    }
    Ok(out)
}

/// What differs between the client's rows and the expected ones (for failure reports).
fn diff(got: &BTreeMap<String, Value>, expected: &BTreeMap<String, Value>) -> String {
    let missing: Vec<&String> = expected.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<&String> = got.keys().filter(|k| !expected.contains_key(*k)).collect();
    let different: Vec<String> = expected
        .iter()
        .filter_map(|(k, v)| {
            let g = got.get(k)?;
            (g != v).then(|| format!("  {k}:\n    client: {g}\n    source: {v}"))
        })
        .collect();
    format!(
        "client has {} rows, expected {}; missing {missing:?}; extra {extra:?}; {} differ:\n{}",
        got.len(),
        expected.len(),
        different.len(),
        different.iter().take(5).cloned().collect::<Vec<_>>().join("\n")
    )
}

fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Ids of `owner`'s todos in the source.
async fn ids(db: &Client, owner: &str) -> Result<Vec<String>> {
    Ok(db
        .query("SELECT id::text FROM todos WHERE owner_id = $1 ORDER BY description, id", &[&owner])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Expected rows: the source's, except that the rows `stale` still hold what the client had in
/// `before` (rows no change touched since a schema change are not resent).
fn with_stale(mut source: BTreeMap<String, Value>, before: &BTreeMap<String, Value>, stale: &BTreeSet<String>) -> BTreeMap<String, Value> {
    for id in stale {
        if let Some(old) = before.get(id) {
            source.insert(id.clone(), old.clone());
        }
    }
    source
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_change_column_added() -> Result<()> {
    let mut c = Case::start().await?;
    let before = c.u1.rows();
    assert!(before.values().all(|r| r.get("priority").is_none()));
    let old = ids(&c.db, "u1").await?;

    c.exec("ALTER TABLE todos ADD COLUMN priority int DEFAULT 3").await?;
    // New rows (the default and an explicit value), an old row updated on the new column, an
    // old row updated on another column (its new image carries the default).
    c.exec(
        "INSERT INTO todos (description, owner_id, list_id) SELECT 'new default', 'u1', id FROM lists LIMIT 1;
         INSERT INTO todos (description, owner_id, list_id, priority) SELECT 'new explicit', 'u1', id, 7 FROM lists LIMIT 1",
    )
    .await?;
    c.exec(&format!("UPDATE todos SET priority = 1 WHERE id = '{}'", old[0])).await?;
    c.exec(&format!("UPDATE todos SET description = 'edited' WHERE id = '{}'", old[1]))
        .await?;
    // The rows not touched since the ALTER keep what the client had (no priority).
    let stale: BTreeSet<String> = old[2..].iter().cloned().collect();
    let expected = with_stale(source_rows(&c.db, "u1").await?, &before, &stale);
    c.u1.converge_to(expected, &c.svc, "after ADD COLUMN and changes").await?;
    let rows = c.u1.rows();
    assert_eq!(rows[&old[0]]["priority"], json!(1));
    assert_eq!(rows[&old[1]]["priority"], json!(3));
    assert_eq!(rows.values().filter(|r| r["priority"] == json!(3)).count(), 2, "{rows:?}");
    assert!(rows
        .values()
        .any(|r| r["description"] == json!("new explicit") && r["priority"] == json!(7)));

    // Every row touched: the client equals the source, row for row.
    c.exec("UPDATE todos SET priority = coalesce(priority, 0) + 1 WHERE owner_id = 'u1'")
        .await?;
    c.u1.converge(&c.db, &c.svc, "after updating every row").await?;
    assert!(c.u1.rows().values().all(|r| r["priority"].is_i64()));
    // A delete still replicates.
    c.exec(&format!("DELETE FROM todos WHERE id = '{}'", old[2])).await?;
    c.u1.converge(&c.db, &c.svc, "after a delete").await?;

    // The new column changes type (a table rewrite, not replicated as changes): rows written
    // afterwards carry the new type's value.
    c.exec("ALTER TABLE todos ALTER COLUMN priority TYPE text USING 'p' || priority")
        .await?;
    c.exec("UPDATE todos SET description = description || '!' WHERE owner_id = 'u1'")
        .await?;
    c.u1.converge(&c.db, &c.svc, "after ALTER COLUMN TYPE and updating every row")
        .await?;
    assert!(c
        .u1
        .rows()
        .values()
        .all(|r| r["priority"].as_str().is_some_and(|p| p.starts_with('p'))));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_change_column_dropped() -> Result<()> {
    let svc = Service::new().await?;
    let db = svc.source().await?;
    seed(&db, 2, 5, &["u1", "u2"]).await?;
    // Some rows hold a value in the column to drop.
    db.batch_execute(
        "UPDATE todos SET completed = true, completed_at = '2024-05-06 07:08:09.123+00'
         WHERE id IN (SELECT id FROM todos WHERE owner_id = 'u1' ORDER BY description LIMIT 3)",
    )
    .await?;
    let mut c = Case::run(svc, db).await?;
    let before = c.u1.rows();
    assert_eq!(
        before
            .values()
            .filter(|r| r["completed_at"] == json!("2024-05-06 07:08:09.123Z"))
            .count(),
        3,
        "{before:?}"
    );
    let old = ids(&c.db, "u1").await?;

    c.exec("ALTER TABLE todos DROP COLUMN completed_at").await?;
    c.exec(&format!("UPDATE todos SET description = 'edited 0' WHERE id = '{}'", old[0]))
        .await?;
    c.exec(&format!("UPDATE todos SET completed = false WHERE id = '{}'", old[1]))
        .await?;
    c.exec("INSERT INTO todos (description, owner_id, list_id) SELECT 'new', 'u1', id FROM lists LIMIT 1")
        .await?;
    let stale: BTreeSet<String> = old[2..].iter().cloned().collect();
    let expected = with_stale(source_rows(&c.db, "u1").await?, &before, &stale);
    c.u1.converge_to(expected, &c.svc, "after DROP COLUMN and changes").await?;
    let rows = c.u1.rows();
    for id in &old[..2] {
        assert!(rows[id].get("completed_at").is_none(), "{}", rows[id]);
    }

    c.exec("UPDATE todos SET description = description || ' touched' WHERE owner_id = 'u1'")
        .await?;
    c.u1.converge(&c.db, &c.svc, "after updating every row").await?;
    assert!(c.u1.rows().values().all(|r| r.get("completed_at").is_none()));
    c.exec(&format!("DELETE FROM todos WHERE id = '{}'", old[2])).await?;
    c.u1.converge(&c.db, &c.svc, "after a delete").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_change_replica_identity() -> Result<()> {
    let mut c = Case::start().await?;
    let mut u2 = Client1::open(&c.svc, "u2").await?;
    u2.converge(&c.db, &c.svc, "initial sync").await?;

    for identity in ["FULL", "DEFAULT"] {
        c.u1.seen.clear();
        u2.seen.clear();
        let (u1_floor, u2_floor) = (c.u1.rows().len() - 2, u2.rows().len());
        let u1_ids = ids(&c.db, "u1").await?;
        let u2_ids = ids(&c.db, "u2").await?;
        let steps = [
            format!("ALTER TABLE todos REPLICA IDENTITY {identity}"),
            format!(
                "UPDATE todos SET description = 'edited under {identity}', completed = true, completed_at = now() WHERE id = '{}'",
                u1_ids[0]
            ),
            format!("DELETE FROM todos WHERE id = '{}'", u1_ids[1]),
            // Bucket moves: u1 -> u2, and u2 -> u1.
            format!(
                "UPDATE todos SET owner_id = 'u2', description = 'moved to u2 under {identity}' WHERE id = '{}'",
                u1_ids[2]
            ),
            format!(
                "UPDATE todos SET owner_id = 'u1', description = 'moved to u1 under {identity}' WHERE id = '{}'",
                u2_ids[0]
            ),
        ];
        for step in &steps {
            c.exec(step).await?;
            let what = format!("REPLICA IDENTITY {identity}, after: {step}");
            c.u1.converge(&c.db, &c.svc, &what).await?;
            u2.converge(&c.db, &c.svc, &what).await?;
        }
        // The table is snapshotted again when its identity changes: no complete checkpoint
        // shows it emptied meanwhile (u1 loses at most 2 rows along the way, u2 none).
        assert!(
            c.u1.seen.iter().all(|&n| n >= u1_floor),
            "u1 todos at complete checkpoints: {:?}",
            c.u1.seen
        );
        assert!(
            u2.seen.iter().all(|&n| n >= u2_floor),
            "u2 todos at complete checkpoints: {:?}",
            u2.seen
        );
        println!(
            "REPLICA IDENTITY {identity}: todos at complete checkpoints: u1 {:?}, u2 {:?}",
            c.u1.seen, u2.seen
        );
    }
    Ok(())
}

/// Under REPLICA IDENTITY FULL, an update that leaves a large out-of-line (TOAST) value
/// unchanged: the new tuple carries it as "unchanged", the old tuple in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_change_replica_identity_full_toast() -> Result<()> {
    let mut c = Case::start().await?;
    c.exec("ALTER TABLE todos REPLICA IDENTITY FULL").await?;
    let steps = [
        "INSERT INTO todos (description, owner_id, list_id)
         SELECT (SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 400)), 'u1', id FROM lists LIMIT 1",
        "UPDATE todos SET completed = NOT completed WHERE length(description) > 10000",
        "UPDATE todos SET completed_at = now() WHERE length(description) > 10000",
        "DELETE FROM todos WHERE length(description) > 10000",
    ];
    for step in steps {
        c.exec(step).await?;
        c.u1.converge(&c.db, &c.svc, &format!("REPLICA IDENTITY FULL, after: {step}"))
            .await?;
    }
    Ok(())
}

/// A key change under the default identity: the old row is key-only (NULL elsewhere), so an
/// unchanged TOASTed value must come from the image stored under the old key, never the old row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_change_keeps_an_unchanged_toasted_value() -> Result<()> {
    let mut c = Case::start().await?;
    let steps = [
        "INSERT INTO todos (description, owner_id, list_id)
         SELECT (SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 400)), 'u1', id FROM lists LIMIT 1",
        "UPDATE todos SET id = gen_random_uuid() WHERE length(description) > 10000",
        "UPDATE todos SET id = gen_random_uuid(), completed = NOT completed WHERE length(description) > 10000",
    ];
    for step in steps {
        c.exec(step).await?;
        c.u1.converge(&c.db, &c.svc, &format!("DEFAULT identity, after: {step}")).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_change_truncate() -> Result<()> {
    let mut c = Case::start().await?;
    let mut u2 = Client1::open(&c.svc, "u2").await?;
    u2.converge(&c.db, &c.svc, "initial sync").await?;

    c.exec("TRUNCATE todos").await?;
    c.u1.converge(&c.db, &c.svc, "after TRUNCATE todos").await?;
    u2.converge(&c.db, &c.svc, "after TRUNCATE todos").await?;
    assert!(c.u1.rows().is_empty() && u2.rows().is_empty());
    assert_eq!(c.u1.state.table("lists").len(), 2, "lists are untouched");

    c.exec(
        "INSERT INTO todos (description, owner_id, list_id) SELECT 'after truncate ' || g, 'u1', (SELECT id FROM lists LIMIT 1) FROM generate_series(1, 3) g;
         INSERT INTO todos (description, owner_id, list_id) SELECT 'after truncate', 'u2', id FROM lists LIMIT 1",
    )
    .await?;
    c.u1.converge(&c.db, &c.svc, "inserts after TRUNCATE").await?;
    u2.converge(&c.db, &c.svc, "inserts after TRUNCATE").await?;
    assert_eq!(c.u1.rows().len(), 3);

    // A truncate in a transaction with later inserts, then a cascading one through lists.
    c.exec(
        "BEGIN; TRUNCATE todos;
         INSERT INTO todos (description, owner_id, list_id) SELECT 'same transaction', 'u1', id FROM lists LIMIT 1; COMMIT",
    )
    .await?;
    c.u1.converge(&c.db, &c.svc, "TRUNCATE and INSERT in one transaction").await?;
    u2.converge(&c.db, &c.svc, "TRUNCATE and INSERT in one transaction").await?;
    c.exec("TRUNCATE lists CASCADE").await?;
    c.u1.converge(&c.db, &c.svc, "after TRUNCATE lists CASCADE").await?;
    if !c.u1.state.table("lists").is_empty() {
        let svc = &c.svc;
        c.u1.stream
            .sync_until(&mut c.u1.state, T, |s| s.table("lists").is_empty())
            .await
            .with_context(|| tail(&svc.log(), 40))?;
    }
    seed(&c.db, 1, 2, &["u1"]).await?;
    c.u1.converge(&c.db, &c.svc, "seeded again after TRUNCATE lists CASCADE").await?;
    assert_eq!(c.u1.state.table("lists").len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_change_table_added_to_publication() -> Result<()> {
    let svc = Service::new().await?;
    let db = svc.source().await?;
    db.batch_execute("DROP PUBLICATION powersync; CREATE PUBLICATION powersync FOR TABLE lists")
        .await?;
    seed(&db, 2, 5, &["u1", "u2"]).await?;
    let mut svc = svc;
    svc.start().await?;
    let mut u1 = Client1::open(&svc, "u1").await?;
    u1.stream
        .sync_until(&mut u1.state, T, |s| s.table("lists").len() == 2)
        .await
        .with_context(|| tail(&svc.log(), 40))?;
    // todos is not published: not replicated (yet).
    assert!(u1.rows().is_empty(), "unpublished todos replicated: {:?}", u1.rows());

    db.batch_execute("ALTER PUBLICATION powersync ADD TABLE todos").await?;
    db.batch_execute(
        "UPDATE todos SET description = 'changed after publishing' WHERE id = (SELECT id FROM todos WHERE owner_id = 'u1' ORDER BY description LIMIT 1)",
    )
    .await?;
    // All of u1's todos, not only the changed one.
    u1.converge(&db, &svc, "after ALTER PUBLICATION ADD TABLE todos and one change")
        .await?;
    assert_eq!(u1.rows().len(), 5);
    db.batch_execute("INSERT INTO todos (description, owner_id, list_id) SELECT 'new', 'u1', id FROM lists LIMIT 1")
        .await?;
    u1.converge(&db, &svc, "a later insert").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_change_primary_key_value() -> Result<()> {
    let mut c = Case::start().await?;
    let mut u2 = Client1::open(&c.svc, "u2").await?;
    u2.converge(&c.db, &c.svc, "initial sync").await?;
    for identity in ["DEFAULT", "FULL"] {
        c.exec(&format!("ALTER TABLE todos REPLICA IDENTITY {identity}")).await?;
        let old = ids(&c.db, "u1").await?;
        c.exec(&format!("UPDATE todos SET id = gen_random_uuid() WHERE id = '{}'", old[0]))
            .await?;
        // A key change together with a bucket move.
        c.exec(&format!(
            "UPDATE todos SET id = gen_random_uuid(), owner_id = 'u2' WHERE id = '{}'",
            old[1]
        ))
        .await?;
        c.u1.converge(&c.db, &c.svc, &format!("after primary key changes ({identity})"))
            .await?;
        u2.converge(&c.db, &c.svc, &format!("after primary key changes ({identity})"))
            .await?;
        let rows = c.u1.rows();
        assert!(!rows.contains_key(&old[0]) && !rows.contains_key(&old[1]));
    }

    // The key column changes type (uuid -> text): rows keep their ids, later key changes to
    // non-uuid values replicate.
    c.exec("ALTER TABLE todos REPLICA IDENTITY DEFAULT; ALTER TABLE todos ALTER COLUMN id TYPE text")
        .await?;
    let old = ids(&c.db, "u1").await?;
    c.exec(&format!("UPDATE todos SET id = 'text-key-1' WHERE id = '{}'", old[0]))
        .await?;
    c.exec("INSERT INTO todos (id, description, owner_id, list_id) SELECT 'text-key-2', 'text key', 'u1', id FROM lists LIMIT 1")
        .await?;
    c.exec(&format!(
        "UPDATE todos SET description = 'after key type change' WHERE id = '{}'",
        old[1]
    ))
    .await?;
    c.u1.converge(&c.db, &c.svc, "after the key's type change").await?;
    u2.converge(&c.db, &c.svc, "after the key's type change").await?;
    assert!(c.u1.rows().contains_key("text-key-1") && !c.u1.rows().contains_key(&old[0]));
    Ok(())
}

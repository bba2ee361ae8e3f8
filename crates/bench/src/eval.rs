//! Sync-config evaluation speed, in process on one core: the seeded todo rows (and lists)
//! through the ten-definition edition-3 todo config, with replication-time bucket rows and
//! parameter-index entries, as the replicator computes them for every source row.

use crate::report::{self, Row};
use anyhow::{bail, Context, Result};
use ferrosync_rules::{Row as SourceRow, SourceTableName, SqliteValue, SyncRules, SyncRulesOptions};
use std::time::Instant;

const STREAMS: &str = include_str!("../../../examples/todo/sync-streams.yaml");

fn table(name: &str) -> SourceTableName {
    SourceTableName {
        connection_tag: "default".into(),
        schema: "public".into(),
        name: name.into(),
    }
}

fn text(s: String) -> SqliteValue {
    SqliteValue::Text(s)
}

/// Rows shaped like the bench's seed: uuid ids, timestamps as text, one list per 100 todos.
fn todo(i: usize) -> SourceRow {
    let mut r = SourceRow::with_capacity(7);
    r.push("id", text(format!("00000000-0000-4000-8000-{i:012x}")));
    r.push("created_at", text("2026-11-26 10:00:00.123456Z".into()));
    r.push(
        "completed_at",
        if i.is_multiple_of(10) {
            text("2026-11-26 11:00:00Z".into())
        } else {
            SqliteValue::Null
        },
    );
    r.push("description", text(format!("todo number {i}")));
    r.push("completed", SqliteValue::Integer(i64::from(i.is_multiple_of(10))));
    r.push("owner_id", text(format!("u{}", i % 1000)));
    r.push("list_id", text(format!("10000000-0000-4000-8000-{:012x}", i / 100)));
    r
}

fn list(i: usize) -> SourceRow {
    let mut r = SourceRow::with_capacity(4);
    r.push("id", text(format!("10000000-0000-4000-8000-{i:012x}")));
    r.push("created_at", text("2026-11-26 10:00:00Z".into()));
    r.push("name", text(format!("list {i}")));
    r.push("owner_id", text(format!("u{}", i % 1000)));
    r
}

/// Evaluates `rows` todos and `rows / 100` lists; one core, no I/O.
pub fn rules_eval(rows: usize) -> Result<Row> {
    let rules = SyncRules::parse(STREAMS, &SyncRulesOptions::default()).context("examples/todo/sync-streams.yaml")?;
    let definitions = rules.bucket_sources().len();
    let lists = (rows / 100).max(1);
    let sources: Vec<(SourceTableName, SourceRow)> = (0..lists)
        .map(|i| (table("lists"), list(i)))
        .chain((0..rows).map(|i| (table("todos"), todo(i))))
        .collect();
    // Best of three passes, like the downloads: one pass may meet a busy moment of the machine.
    let mut best = f64::MAX;
    let (mut bucket_rows, mut lookups) = (0usize, 0usize);
    for _ in 0..3 {
        let started = Instant::now();
        let (mut rows_out, mut lookups_out, mut errors) = (0usize, 0usize, 0usize);
        // Reused from row to row, as the replicator does.
        let mut results = Vec::new();
        for (t, row) in &sources {
            rules.evaluate_row_into(t, row, &mut results);
            for r in results.drain(..) {
                match r {
                    Ok(_) => rows_out += 1,
                    Err(_) => errors += 1,
                }
            }
            for p in rules.evaluate_parameter_row(t, row) {
                match p {
                    Ok(_) => lookups_out += 1,
                    Err(_) => errors += 1,
                }
            }
        }
        best = best.min(started.elapsed().as_secs_f64());
        if errors > 0 {
            bail!("{errors} evaluation errors");
        }
        (bucket_rows, lookups) = (rows_out, lookups_out);
    }
    let secs = best;
    let n = sources.len() as f64;
    let value = format!(
        "{} rows/s, best of 3 ({} rows → {} bucket rows + {} lookups in {:.2} s)",
        report::rate(n / secs),
        report::thousands(sources.len() as u64),
        report::thousands(bucket_rows as u64),
        report::thousands(lookups as u64),
        secs
    );
    let metric = format!("sync-config evaluation, {definitions}-definition edition-3 config (one core)");
    Ok(Row::new(metric, value, &report::EVAL, None))
}

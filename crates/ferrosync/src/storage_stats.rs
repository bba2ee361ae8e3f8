//! `ferrosync storage stats --config FILE [--json] [--top N]`: what bucket storage holds, per
//! table, per sync-config version, and its largest buckets.

use crate::serve::load;
use anyhow::{Context, Result};
use ferrosync_pgconn::PgEndpoint;
use ferrosync_storage::stats::{self, StorageStats};
use std::fmt::Write;
use std::path::Path;

pub async fn run(path: &Path, json: bool, top: usize) -> Result<()> {
    let config = load(path)?.config;
    let endpoint = PgEndpoint::from_config(&config.storage).context("bucket storage")?;
    let client = ferrosync_storage::connect(&endpoint)
        .await
        .context("connecting to bucket storage")?;
    let stats = stats::collect(&client, top)
        .await
        .context("reading bucket storage statistics (has `ferrosync migrate` run?)")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
    } else {
        print!("{}", render(&stats));
    }
    Ok(())
}

/// The readable form: three tables.
fn render(stats: &StorageStats) -> String {
    let mut out = String::new();
    let mut tables = vec![row(&["table", "rows (est.)", "heap", "toast", "indexes", "total"])];
    for t in &stats.tables {
        tables.push(vec![
            t.name.clone(),
            t.rows_estimate.to_string(),
            bytes(t.heap_bytes),
            bytes(t.toast_bytes),
            bytes(t.index_bytes),
            bytes(t.total_bytes),
        ]);
    }
    section(&mut out, "Storage tables", &tables);
    let mut streams = vec![row(&[
        "id",
        "state",
        "slot",
        "checkpoint",
        "ops",
        "op bytes",
        "buckets",
        "current rows",
        "parameter rows",
    ])];
    for s in &stats.streams {
        streams.push(vec![
            s.id.to_string(),
            s.state.clone(),
            s.slot_name.clone(),
            format!("{} ({})", s.last_checkpoint, s.last_checkpoint_lsn.as_deref().unwrap_or("-")),
            s.ops.to_string(),
            bytes(s.op_bytes),
            s.buckets.to_string(),
            s.current_data_rows.to_string(),
            s.parameter_rows.to_string(),
        ]);
    }
    section(&mut out, "Sync-config versions", &streams);
    let mut buckets = vec![row(&["stream", "bucket", "definition", "ops", "bytes"])];
    for b in &stats.largest_buckets {
        buckets.push(vec![
            b.stream.to_string(),
            b.bucket.clone(),
            b.definition.clone().unwrap_or_else(|| "?".into()),
            b.ops.to_string(),
            bytes(b.bytes),
        ]);
    }
    section(&mut out, "Largest buckets (stored bytes)", &buckets);
    out
}

fn row(cells: &[&str]) -> Vec<String> {
    cells.iter().map(|c| c.to_string()).collect()
}

/// A titled table, columns padded to their widest cell.
fn section(out: &mut String, title: &str, rows: &[Vec<String>]) {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let _ = writeln!(out, "{title}");
    for r in rows {
        let cells: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        let _ = writeln!(out, "  {}", cells.join("  ").trim_end());
    }
    if rows.len() == 1 {
        let _ = writeln!(out, "  (none)");
    }
    out.push('\n');
}

/// `1536` -> `1.5 KiB`.
fn bytes(n: i64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{n} B"),
        _ => format!("{value:.1} {}", UNITS[unit]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes_read_naturally() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(5 << 30), "5.0 GiB");
    }
}

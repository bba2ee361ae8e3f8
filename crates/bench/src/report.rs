//! The results table: rows with reference and target values, formatting, and the append to
//! bench/RESULTS.md.

use crate::client::{Format, Transport};
use crate::procstat::CpuSample;
use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;

/// Reference value (../shared/spec/baseline.md) and target for one metric.
pub struct Spec {
    pub reference: &'static str,
    pub target: &'static str,
}

pub const EVAL: Spec = Spec {
    reference: "—",
    target: "≥ 1M rows/s",
};
pub const SNAPSHOT: Spec = Spec {
    reference: "5.5k rows/s",
    target: "≥ 100k rows/s",
};
pub const IDLE_RSS: Spec = Spec {
    reference: "347 MiB (470 MiB after snapshot)",
    target: "≤ 30 MiB",
};
pub const STORAGE: Spec = Spec {
    reference: "6.6× source, 1.2 KB/op",
    target: "≤ 2× source",
};
pub const COMPACTION: Spec = Spec {
    reference: "30,312 → 213 ops after 30k updates of 200 rows (`compact`)",
    target: "fresh download ≤ 1.1× live rows",
};
pub const LATENCY: Spec = Spec {
    reference: "p50 23 ms",
    target: "p50 ≤ 5 ms, p99 ≤ 20 ms",
};
pub const INCREMENTAL: Spec = Spec {
    reference: "5.8k rows/s",
    target: "≥ 50k rows/s",
};
pub const DOWNLOAD_NDJSON: Spec = Spec {
    reference: "17k ops/s, 515 B/op",
    target: "≥ 300k ops/s",
};
pub const DOWNLOAD_BSON: Spec = Spec {
    reference: "—",
    target: "≥ 300k ops/s",
};
/// The reference was measured over HTTP only (baseline.md): WebSocket rows have targets alone.
pub const DOWNLOAD_WS: Spec = Spec {
    reference: "—",
    target: "≥ 300k ops/s",
};
pub const CONNECT: Spec = Spec {
    reference: "—",
    target: "—",
};
pub const FANOUT_100: Spec = Spec {
    reference: "500 clients: 0.8 s",
    target: "—",
};
pub const FANOUT_1000: Spec = Spec {
    reference: "500 clients: 0.8 s",
    target: "≤ 100 ms",
};
pub const FANOUT_10000: Spec = Spec {
    reference: "500 clients: 0.8 s",
    target: "≤ 1 s",
};
pub const FANOUT_WS_100: Spec = Spec {
    reference: "—",
    target: "—",
};
pub const FANOUT_WS_1000: Spec = Spec {
    reference: "—",
    target: "≤ 100 ms",
};
pub const FANOUT_WS_10000: Spec = Spec {
    reference: "—",
    target: "≤ 1 s",
};
pub const PER_CONNECTION: Spec = Spec {
    reference: "620 KiB",
    target: "≤ 16 KiB",
};
pub const PER_CONNECTION_WS: Spec = Spec {
    reference: "—",
    target: "≤ 16 KiB",
};
/// The reference's failover figure comes from the issue, not from baseline.md (which has no
/// failover run); its design (replication-storage.md, item 8) is a lease row with a 60 s
/// timeout, refreshed about every 30 s.
pub const DEPLOY_INCREMENTAL: Spec = Spec {
    reference: "every deploy rebuilds all buckets (= full)",
    target: "only the new definition's table and buckets",
};
pub const DEPLOY_FULL: Spec = Spec {
    reference: "snapshot of every table, all buckets re-downloaded",
    target: "—",
};
pub const FAILOVER_STANDBY: Spec = Spec {
    reference: "~57 s (issue figure; 60 s lease timeout)",
    target: "≤ 5 s",
};
pub const FAILOVER_RESTART: Spec = Spec {
    reference: "~57 s (issue figure; 60 s lease timeout)",
    target: "≤ 5 s + start",
};

pub fn download_spec(transport: Transport) -> &'static Spec {
    match transport {
        Transport::Http(Format::Ndjson) => &DOWNLOAD_NDJSON,
        Transport::Http(Format::Bson) => &DOWNLOAD_BSON,
        Transport::WebSocket => &DOWNLOAD_WS,
    }
}

/// Reference/target for a fan-out of `n` clients.
pub fn fanout_spec(transport: Transport, n: usize) -> &'static Spec {
    match (transport, n) {
        (Transport::Http(_), 0..=500) => &FANOUT_100,
        (Transport::Http(_), 501..=5000) => &FANOUT_1000,
        (Transport::Http(_), _) => &FANOUT_10000,
        (Transport::WebSocket, 0..=500) => &FANOUT_WS_100,
        (Transport::WebSocket, 501..=5000) => &FANOUT_WS_1000,
        (Transport::WebSocket, _) => &FANOUT_WS_10000,
    }
}

pub fn per_connection_spec(transport: Transport) -> &'static Spec {
    match transport {
        Transport::Http(_) => &PER_CONNECTION,
        Transport::WebSocket => &PER_CONNECTION_WS,
    }
}

/// One line of the table.
pub struct Row {
    pub metric: String,
    pub value: String,
    pub spec: &'static Spec,
    pub cpu: Option<CpuSample>,
}

impl Row {
    pub fn new(metric: impl Into<String>, value: impl Into<String>, spec: &'static Spec, cpu: Option<CpuSample>) -> Row {
        Row {
            metric: metric.into(),
            value: value.into(),
            spec,
            cpu,
        }
    }
}

/// Everything printed for one run.
#[derive(Default)]
pub struct Report {
    pub rows: Vec<Row>,
    /// Lines printed under the table (storage breakdown etc.).
    pub details: Vec<String>,
    pub notes: Vec<String>,
}

impl Report {
    /// Record a phase that failed, keeping its place in the table.
    pub fn failed(&mut self, metric: &str, spec: &'static Spec, err: &anyhow::Error) {
        let msg = format!("{err:#}").replace('\n', " ").replace('|', "/");
        let msg: String = msg.chars().take(300).collect();
        self.rows.push(Row::new(metric, format!("FAILED: {msg}"), spec, None));
    }

    /// Phases that failed (their rows say so).
    pub fn failures(&self) -> usize {
        self.rows.iter().filter(|r| r.value.starts_with("FAILED")).count()
    }

    pub fn markdown(&self) -> String {
        let mut out = String::from(
            "| metric | ferrosync | reference | target | service CPU s | Postgres CPU s | bench CPU s |\n|---|---|---|---|---|---|---|\n",
        );
        for r in &self.rows {
            let (svc, pg, bench) = match &r.cpu {
                Some(c) => (opt_secs(c.service), opt_secs(c.postgres), format!("{:.2}", c.bench)),
                None => ("—".into(), "—".into(), "—".into()),
            };
            out += &format!(
                "| {} | {} | {} | {} | {svc} | {pg} | {bench} |\n",
                r.metric, r.value, r.spec.reference, r.spec.target
            );
        }
        for d in &self.details {
            out += &format!("\n{d}\n");
        }
        if !self.notes.is_empty() {
            out += "\nNotes:\n";
            for n in &self.notes {
                out += &format!("- {n}\n");
            }
        }
        out
    }
}

fn opt_secs(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".into(), |s| format!("{s:.2}"))
}

/// `## <date UTC> — <cores> cores, <cpu model>; <mode>`
pub fn heading(mode: &str) -> String {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    format!("## {} — {cores} cores, {}; {mode}", utc_now(), cpu_model())
}

/// Append a section to the results file.
pub fn append(path: &Path, heading: &str, body: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(f, "\n{heading}\n\n{body}").with_context(|| format!("appending to {}", path.display()))
}

fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or_else(|| "unknown CPU".into(), |m| m.trim().to_string())
}

/// Current time as `YYYY-MM-DD HH:MM UTC`.
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let (y, m, d) = civil_from_days(days);
    let rem = secs % 86_400;
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02} UTC", rem / 3600, rem % 3600 / 60)
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// 1234567 → "1,234,567".
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A rate as "39.5k" / "1.25M" / "950".
pub fn rate(per_sec: f64) -> String {
    if per_sec >= 1e6 {
        format!("{:.2}M", per_sec / 1e6)
    } else if per_sec >= 1e4 {
        format!("{:.1}k", per_sec / 1e3)
    } else {
        format!("{per_sec:.0}")
    }
}

/// Milliseconds with precision that suits the size.
pub fn ms(secs: f64) -> String {
    let ms = secs * 1000.0;
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else if ms < 1000.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{secs:.2} s")
    }
}

/// Median of a non-empty slice (sorted copy); 0 when empty.
pub fn median(values: &[f64]) -> f64 {
    percentile(values, 0.5)
}

/// Nearest-rank percentile of a slice (sorted copy); 0 when empty.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n => v[((n as f64 - 1.0) * p).round() as usize],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_numbers() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_415), (2025, 11, 23));
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(999), "999");
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
    }
}

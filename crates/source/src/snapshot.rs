//! Initial snapshot of one table: COPY text in primary-key order, in chunks, resumable from
//! the last key copied. Tables without a single chunkable key are copied in one pass.
//!
//! Consistency does not come from a single snapshot: the stream replays from the slot's
//! creation point, and the replicator blocks checkpoints until the WAL position read after the
//! copy (replication spec §1.3). That is what lets a crashed snapshot resume mid-table.

use crate::copy_text::parse_line;
use crate::error::SourceError;
use crate::relation::{ColumnInfo, ColumnValue, RelationInfo, SourceRow};
use crate::setup::{quote_ident, quote_literal};
use crate::types::{self, decode_text};
use bytes::{Bytes, BytesMut};
use ferrosync_rules::{Compatibility, SqliteValue};
use futures::StreamExt;
use std::borrow::Cow;
use tokio::sync::mpsc;
use tokio_postgres::Client;

/// Rows copied in one step, and where to resume after them.
#[derive(Debug)]
pub struct SnapshotChunk {
    pub rows: Vec<SourceRow>,
    /// Text of the key of the last row (chunked tables only).
    pub last_key: Option<String>,
    /// No rows follow this chunk.
    pub done: bool,
}

/// The key column used for chunking, if the table has exactly one of a type that orders well.
pub fn chunk_column(rel: &RelationInfo) -> Option<&ColumnInfo> {
    let mut keys = rel.key_columns();
    let key = keys.next()?;
    if keys.next().is_some() || rel.replica_identity == b'f' {
        return None;
    }
    matches!(key.type_oid, types::INT2 | types::INT4 | types::INT8 | 25 | 1043 | 2950).then_some(key)
}

/// How large the chunks of a table copy are: about `text_bytes` of COPY text each, and at
/// most `max_rows`. Each chunk is one storage transaction, so larger ones write fewer, larger
/// op chunks and insert index entries with more locality; bounding them by bytes rather than
/// rows keeps memory in check for wide rows.
#[derive(Debug, Clone, Copy)]
pub struct ChunkSize {
    pub text_bytes: usize,
    pub max_rows: usize,
    /// Rows of the first chunk of a keyed table (a small one starts the pipeline sooner).
    pub first_rows: usize,
}

impl ChunkSize {
    /// Rows to ask for after a query of `rows` rows took `bytes` of COPY text.
    fn next_rows(&self, rows: usize, bytes: usize) -> usize {
        (self.text_bytes / (bytes / rows.max(1)).max(1)).clamp(1, self.max_rows)
    }

    /// Where the one COPY of a table without a chunkable key is cut into chunks.
    fn split(&self) -> Split {
        Split {
            rows: self.max_rows,
            bytes: self.text_bytes,
        }
    }

    /// Where a keyed query's rows are cut: it asks for about `text_bytes` of rows already, so
    /// this only cuts rows much wider than the last ones measured.
    fn split_keyed(&self) -> Split {
        Split {
            rows: usize::MAX,
            bytes: self.text_bytes.saturating_mul(2),
        }
    }
}

/// Copy `rel` starting after `resume_key`, sending chunks sized by `size` to `tx`.
/// Stops early (without error) when the receiver is dropped.
pub async fn copy_table(
    client: &Client,
    rel: &RelationInfo,
    mut resume_key: Option<String>,
    size: ChunkSize,
    compat: &Compatibility,
    tx: mpsc::Sender<Result<SnapshotChunk, SourceError>>,
) -> Result<(), SourceError> {
    client.batch_execute(types::SESSION_SETTINGS).await?;
    let table = format!("{}.{}", quote_ident(&rel.name.schema), quote_ident(&rel.name.name));
    let Some(key) = chunk_column(rel) else {
        let query = format!("COPY (SELECT * FROM {table}) TO STDOUT");
        return copy_query(client, &query, rel, size.split(), compat, None, &tx).await.map(|_| ());
    };
    let key_index = rel.columns.iter().position(|c| c.name == key.name);
    let mut chunk_rows = size.first_rows.clamp(1, size.max_rows);
    loop {
        let filter = match &resume_key {
            Some(k) => format!("WHERE {} > {}", quote_ident(&key.name), quote_literal(k)),
            None => String::new(),
        };
        let query = format!(
            "COPY (SELECT * FROM {table} {filter} ORDER BY {} LIMIT {chunk_rows}) TO STDOUT",
            quote_ident(&key.name)
        );
        let copied = copy_query(client, &query, rel, size.split_keyed(), compat, key_index, &tx).await?;
        if copied.rows < chunk_rows || tx.is_closed() {
            let _ = tx
                .send(Ok(SnapshotChunk {
                    rows: Vec::new(),
                    last_key: copied.last_key,
                    done: true,
                }))
                .await;
            return Ok(());
        }
        resume_key = copied.last_key;
        chunk_rows = size.next_rows(copied.rows, copied.bytes);
    }
}

/// One chunk of `rel` after `after`, read at once: at most `chunk_rows` rows in key order for a
/// table with a single sortable key, else the whole table (`done` is set on the last chunk).
/// For a re-read that runs between batches of the change stream: nothing the stream applies
/// meanwhile can be newer than a chunk read this way.
pub async fn read_chunk(
    client: &Client,
    rel: &RelationInfo,
    after: Option<&str>,
    chunk_rows: usize,
    compat: &Compatibility,
) -> Result<SnapshotChunk, SourceError> {
    let table = format!("{}.{}", quote_ident(&rel.name.schema), quote_ident(&rel.name.name));
    let (query, key_index) = match chunk_column(rel) {
        Some(key) => {
            let filter = match after {
                Some(k) => format!("WHERE {} > {}", quote_ident(&key.name), quote_literal(k)),
                None => String::new(),
            };
            let query = format!(
                "COPY (SELECT * FROM {table} {filter} ORDER BY {} LIMIT {chunk_rows}) TO STDOUT",
                quote_ident(&key.name)
            );
            (query, rel.columns.iter().position(|c| c.name == key.name))
        }
        None => (format!("COPY (SELECT * FROM {table}) TO STDOUT"), None),
    };
    let (tx, mut rx) = mpsc::channel(1);
    let copied = copy_query(client, &query, rel, Split::NEVER, compat, key_index, &tx).await?;
    drop(tx);
    let rows = match rx.recv().await {
        Some(chunk) => chunk?.rows,
        None => Vec::new(),
    };
    Ok(SnapshotChunk {
        rows,
        last_key: copied.last_key,
        done: key_index.is_none() || copied.rows < chunk_rows,
    })
}

/// Where one COPY's rows are cut into chunks: at `rows` rows or `bytes` of COPY text,
/// whichever comes first.
#[derive(Clone, Copy)]
struct Split {
    rows: usize,
    bytes: usize,
}

impl Split {
    /// The whole COPY is one chunk.
    const NEVER: Split = Split {
        rows: usize::MAX,
        bytes: usize::MAX,
    };
}

/// What one COPY read.
struct Copied {
    rows: usize,
    /// COPY text, line ends included.
    bytes: usize,
    /// Raw text of the key of the last row.
    last_key: Option<String>,
}

/// Run one COPY, sending its rows in chunks cut by `split`.
async fn copy_query(
    client: &Client,
    query: &str,
    rel: &RelationInfo,
    split: Split,
    compat: &Compatibility,
    key_index: Option<usize>,
    tx: &mpsc::Sender<Result<SnapshotChunk, SourceError>>,
) -> Result<Copied, SourceError> {
    let stream = client.copy_out(query).await?;
    futures::pin_mut!(stream);
    let mut pending = Lines::default();
    let mut rows = Vec::new();
    let mut copied = Copied {
        rows: 0,
        bytes: 0,
        last_key: None,
    };
    let mut chunk_bytes = 0;
    // The last row's line: its key is parsed again only where a chunk ends.
    let mut last_line = Bytes::new();
    while let Some(bytes) = stream.next().await {
        let mut lines = pending.push(bytes?);
        while let Some(pos) = lines.iter().position(|&b| b == b'\n') {
            let line = lines.split_to(pos + 1);
            rows.push(decode_fields(rel, parse_line(&line[..pos]), compat));
            copied.rows += 1;
            copied.bytes += line.len();
            chunk_bytes += line.len();
            last_line = line;
            if rows.len() >= split.rows || chunk_bytes >= split.bytes {
                chunk_bytes = 0;
                // Rows come in key order: a keyed copy can resume after this chunk's last row.
                copied.last_key = line_key(&last_line, key_index);
                let chunk = SnapshotChunk {
                    rows: std::mem::take(&mut rows),
                    last_key: copied.last_key.clone(),
                    done: false,
                };
                if tx.send(Ok(chunk)).await.is_err() {
                    return Ok(copied);
                }
            }
        }
    }
    copied.last_key = line_key(&last_line, key_index);
    if !pending.partial.is_empty() {
        return Err(SourceError::decode("COPY output ended mid-row"));
    }
    if !rows.is_empty() || key_index.is_none() {
        let chunk = SnapshotChunk {
            rows,
            last_key: copied.last_key.clone(),
            done: key_index.is_none(),
        };
        let _ = tx.send(Ok(chunk)).await;
    }
    Ok(copied)
}

/// Complete lines out of COPY messages. Postgres sends each row as one message, which is
/// parsed where it lies; only a message that ends mid-line is buffered.
#[derive(Default)]
struct Lines {
    partial: BytesMut,
}

impl Lines {
    /// The complete lines `message` finishes (possibly none).
    fn push(&mut self, message: Bytes) -> Bytes {
        if self.partial.is_empty() && message.last() == Some(&b'\n') {
            return message;
        }
        self.partial.extend_from_slice(&message);
        match self.partial.iter().rposition(|&b| b == b'\n') {
            Some(end) => self.partial.split_to(end + 1).freeze(),
            None => Bytes::new(),
        }
    }
}

/// The raw text of the key column of a COPY line (line end included).
fn line_key(line: &[u8], key_index: Option<usize>) -> Option<String> {
    let text = line.strip_suffix(b"\n")?;
    parse_line(text).into_iter().nth(key_index?).flatten().map(Cow::into_owned)
}

fn decode_fields(rel: &RelationInfo, fields: Vec<Option<Cow<'_, str>>>, compat: &Compatibility) -> SourceRow {
    let columns = rel
        .columns
        .iter()
        .zip(fields)
        .map(|(col, field)| {
            let value = match field {
                None => SqliteValue::Null,
                Some(text) => decode_text(col.type_oid, &text, compat),
            };
            (col.name.clone(), ColumnValue::Value(value))
        })
        .collect();
    SourceRow { columns }
}

/// Estimated row count, for progress logs.
pub async fn estimate_rows(client: &Client, oid: u32) -> Result<i64, SourceError> {
    let row = client
        .query_one("SELECT greatest(reltuples, 0)::int8 FROM pg_class WHERE oid = $1", &[&oid])
        .await?;
    Ok(row.get(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrosync_rules::SourceTableName;
    use ferrosync_testkit::{PgCluster, PgOptions};

    const SIZE: ChunkSize = ChunkSize {
        text_bytes: 4 << 20,
        max_rows: 50_000,
        first_rows: 1_000,
    };

    #[test]
    fn lines_are_taken_whole_and_split_messages_are_joined() {
        let mut lines = Lines::default();
        assert_eq!(lines.push(Bytes::from_static(b"1\ta\n")), &b"1\ta\n"[..]);
        assert_eq!(lines.push(Bytes::from_static(b"2\t")), &b""[..]);
        assert_eq!(lines.push(Bytes::from_static(b"b\n3\tc")), &b"2\tb\n"[..]);
        assert_eq!(&lines.partial[..], b"3\tc");
        assert_eq!(lines.push(Bytes::from_static(b"\n")), &b"3\tc\n"[..]);
        assert!(lines.partial.is_empty());
    }

    #[test]
    fn the_key_is_read_back_from_the_last_line() {
        assert_eq!(line_key(b"7\tx\\ty\n", Some(1)).as_deref(), Some("x\ty"));
        assert_eq!(line_key(b"7\t\\N\n", Some(1)), None);
        assert_eq!(line_key(b"", Some(0)), None, "no row read");
        assert_eq!(line_key(b"7\n", None), None, "no key column");
    }

    #[test]
    fn chunks_hold_about_the_byte_target() {
        // 1,000 rows of 140 bytes: the next query asks for 4 MiB of them.
        assert_eq!(SIZE.next_rows(1_000, 140_000), (4 << 20) / 140);
        assert_eq!(SIZE.next_rows(1_000, 10_000), 50_000, "narrow rows: capped");
        assert_eq!(SIZE.next_rows(10, 100 << 20), 1, "rows over the target: one at a time");
        assert_eq!(
            SIZE.next_rows(0, 0),
            50_000,
            "an empty query measures nothing, and does not divide by zero"
        );
    }

    fn key_of(row: &SourceRow) -> Option<i64> {
        match row.columns.first() {
            Some((_, ColumnValue::Value(SqliteValue::Integer(id)))) => Some(*id),
            _ => None,
        }
    }

    /// A keyed copy over rows of very different widths: chunks follow the byte target, a
    /// query that meets rows much wider than measured is cut mid-stream, and every chunk
    /// names its last key, so a copy resumed after any chunk neither skips nor repeats a row.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_keyed_copy_is_cut_by_bytes_and_every_chunk_can_be_resumed_after() -> anyhow::Result<()> {
        let cluster = PgCluster::start(PgOptions::default())?;
        let client = cluster.connect("postgres").await?;
        client
            .batch_execute(
                "CREATE TABLE t (id bigint PRIMARY KEY, body text NOT NULL);
                 INSERT INTO t SELECT g, CASE WHEN g BETWEEN 41 AND 50 THEN repeat('w', 5000) ELSE 'n' END
                 FROM generate_series(1, 100) g;",
            )
            .await?;
        let oid: u32 = client.query_one("SELECT 't'::regclass::oid", &[]).await?.get(0);
        let name = SourceTableName {
            connection_tag: "default".into(),
            schema: "public".into(),
            name: "t".into(),
        };
        let rel = crate::setup::describe_table(&client, oid, name, b'd').await?;
        let size = ChunkSize {
            text_bytes: 200,
            max_rows: 30,
            first_rows: 5,
        };
        let (tx, mut rx) = mpsc::channel(1000);
        copy_table(&client, &rel, None, size, &Compatibility::default(), tx).await?;
        let mut copied = Vec::new();
        let mut sizes = Vec::new();
        while let Some(chunk) = rx.recv().await {
            let chunk = chunk?;
            let keys: Vec<i64> = chunk.rows.iter().filter_map(key_of).collect();
            assert_eq!(keys.len(), chunk.rows.len());
            if let Some(last) = keys.last() {
                assert_eq!(
                    chunk.last_key.as_deref(),
                    Some(last.to_string().as_str()),
                    "a chunk resumes after its last row"
                );
            }
            sizes.push(keys.len());
            copied.extend(keys);
            if chunk.done {
                break;
            }
        }
        assert_eq!(copied, (1..=100).collect::<Vec<i64>>(), "every row once, in key order");
        assert_eq!(sizes.first(), Some(&5), "the first query asks for first_rows");
        assert!(sizes.iter().all(|&n| n <= 30), "{sizes:?}");
        // Narrow rows ("1\tn\n" is 4-6 bytes) fill a chunk to max_rows; the 5 KB rows come one
        // per chunk, cut at twice the byte target.
        assert!(sizes.contains(&30), "{sizes:?}");
        assert!(sizes.iter().filter(|&&n| n == 1).count() >= 10, "{sizes:?}");
        Ok(())
    }
}

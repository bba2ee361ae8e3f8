//! Sync lines (protocol spec §4) and their NDJSON / BSON encodings.

use bytes::{BufMut, BytesMut};
use ferrosync_rules::{BucketReason, StreamInfo};
use ferrosync_storage::OplogEntry;
use serde::Serialize;

/// Wire encoding of lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineFormat {
    /// `application/x-ndjson`: one JSON object per line.
    Ndjson,
    /// `application/vnd.powersync.bson-stream`: concatenated BSON documents.
    Bson,
}

impl LineFormat {
    pub fn content_type(self) -> &'static str {
        match self {
            LineFormat::Ndjson => "application/x-ndjson",
            LineFormat::Bson => "application/vnd.powersync.bson-stream",
        }
    }

    /// Append one encoded line to `buf`. Lines are built from our own types, so encoding cannot
    /// fail in practice; if it somehow does, nothing is appended and the error is logged.
    pub fn encode_into<T: Serialize>(self, line: &T, buf: &mut BytesMut) {
        let start = buf.len();
        let result = match self {
            LineFormat::Ndjson => serde_json::to_writer(buf.writer(), line)
                .map(|()| buf.put_u8(b'\n'))
                .map_err(|e| e.to_string()),
            LineFormat::Bson => bson::serialize_to_vec(line)
                .map(|doc| buf.extend_from_slice(&doc))
                .map_err(|e| e.to_string()),
        };
        if let Err(e) = result {
            buf.truncate(start);
            tracing::error!(error = %e, "could not encode sync line");
        }
    }
}

#[derive(Serialize)]
pub struct BucketChecksumLine<'a> {
    pub bucket: &'a str,
    pub checksum: i64,
    pub count: i64,
    pub priority: u8,
    pub subscriptions: Vec<Reason>,
}

/// Why a bucket is included: `{"default": k}` (index into `checkpoint.streams`) or
/// `{"sub": i}` (index into the request's subscriptions).
#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    Default(usize),
    Sub(usize),
}

impl From<BucketReason> for Reason {
    fn from(r: BucketReason) -> Self {
        match r {
            BucketReason::Default(k) => Reason::Default(k),
            BucketReason::Subscription(i) => Reason::Sub(i),
        }
    }
}

#[derive(Serialize)]
pub struct StreamDescription<'a> {
    pub name: &'a str,
    pub is_default: bool,
    pub errors: Vec<StreamErrorLine<'a>>,
}

impl<'a> StreamDescription<'a> {
    pub fn new(info: &'a StreamInfo) -> Self {
        StreamDescription {
            name: &info.name,
            is_default: info.is_default,
            errors: info
                .errors
                .iter()
                .map(|e| StreamErrorLine {
                    subscription: match e.subscription {
                        None => SubscriptionRef::Default("default"),
                        Some(i) => SubscriptionRef::Index(i),
                    },
                    message: &e.message,
                })
                .collect(),
        }
    }
}

#[derive(Serialize)]
pub struct StreamErrorLine<'a> {
    pub subscription: SubscriptionRef,
    pub message: &'a str,
}

/// `"default"` or the index of an explicit subscription.
#[derive(Serialize)]
#[serde(untagged)]
pub enum SubscriptionRef {
    Default(&'static str),
    Index(usize),
}

#[derive(Serialize)]
pub struct Checkpoint<'a> {
    pub last_op_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write_checkpoint: Option<String>,
    pub buckets: Vec<BucketChecksumLine<'a>>,
    pub streams: Vec<StreamDescription<'a>>,
}

#[derive(Serialize)]
pub struct CheckpointDiff<'a> {
    pub last_op_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write_checkpoint: Option<String>,
    pub updated_buckets: Vec<BucketChecksumLine<'a>>,
    pub removed_buckets: Vec<&'a str>,
}

#[derive(Serialize)]
pub struct OplogLine<'a> {
    pub op_id: String,
    pub op: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object_type: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subkey: Option<&'a str>,
    pub checksum: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<&'a str>,
}

#[derive(Serialize)]
pub struct DataBatch<'a> {
    pub bucket: &'a str,
    pub after: String,
    pub next_after: String,
    pub has_more: bool,
    pub data: Vec<OplogLine<'a>>,
}

#[derive(Serialize)]
pub struct CompleteLine {
    pub last_op_id: String,
}

#[derive(Serialize)]
pub struct PartialCompleteLine {
    pub last_op_id: String,
    pub priority: u8,
}

/// One protocol line: an object with exactly one key.
#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Line<'a> {
    Checkpoint(Checkpoint<'a>),
    CheckpointDiff(CheckpointDiff<'a>),
    Data(DataBatch<'a>),
    CheckpointComplete(CompleteLine),
    PartialCheckpointComplete(PartialCompleteLine),
    TokenExpiresIn(i64),
}

/// Most ops in one `data` line.
pub const LINE_OPS: usize = 1000;
/// A `data` line is cut once its row data reaches this size (it may exceed it by one op), as
/// the reference cuts at 1 MiB: large rows must not make a line, and the buffers that encode
/// and carry it, tens of MB.
pub const LINE_BYTES: usize = 1 << 20;

/// How many of `ops` go into the next `data` line: at most [`LINE_OPS`], and no more once the
/// line holds [`LINE_BYTES`] of row data. At least one when `ops` is not empty.
pub fn line_len<'o>(ops: impl Iterator<Item = &'o OplogEntry>) -> usize {
    let mut bytes = 0;
    let mut n = 0;
    for op in ops.take(LINE_OPS) {
        if n > 0 && bytes >= LINE_BYTES {
            break;
        }
        bytes += op.data.as_ref().map_or(0, String::len);
        n += 1;
    }
    n
}

/// The wire form of a stored op.
pub fn op_line(op: &OplogEntry) -> OplogLine<'_> {
    OplogLine {
        op_id: op.op_id.to_string(),
        op: op.op.as_str(),
        object_type: op.object_type.as_deref(),
        object_id: op.object_id.as_deref(),
        subkey: op.subkey.as_deref(),
        checksum: i64::from(op.checksum),
        data: op.data.as_deref(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(data_len: usize) -> OplogEntry {
        OplogEntry {
            op_id: 1,
            op: ferrosync_storage::OpType::Put,
            object_type: Some("t".into()),
            object_id: Some("1".into()),
            subkey: None,
            data: Some("x".repeat(data_len)),
            checksum: 0,
        }
    }

    #[test]
    fn lines_are_cut_by_op_count_and_by_size() {
        let small: Vec<_> = (0..2500).map(|_| op(10)).collect();
        assert_eq!(line_len(small.iter()), LINE_OPS);
        let large: Vec<_> = (0..3).map(|_| op(600 * 1024)).collect();
        assert_eq!(line_len(large.iter()), 2, "cut once 1 MiB is reached");
        assert_eq!(line_len(large[2..].iter()), 1);
        let huge = [op(5 << 20), op(1)];
        assert_eq!(line_len(huge.iter()), 1, "one op per line at least, however large");
        assert_eq!(line_len([].iter()), 0);
    }

    fn encode(format: LineFormat, line: &Line<'_>) -> BytesMut {
        let mut buf = BytesMut::new();
        format.encode_into(line, &mut buf);
        buf
    }

    #[test]
    fn one_key_per_line_with_string_op_ids() {
        let line = Line::CheckpointComplete(CompleteLine { last_op_id: "3".into() });
        assert_eq!(
            &encode(LineFormat::Ndjson, &line)[..],
            b"{\"checkpoint_complete\":{\"last_op_id\":\"3\"}}\n"
        );
        let line = Line::TokenExpiresIn(0);
        assert_eq!(&encode(LineFormat::Ndjson, &line)[..], b"{\"token_expires_in\":0}\n");
        let bson = encode(LineFormat::Bson, &line);
        assert_eq!(u32::from_le_bytes([bson[0], bson[1], bson[2], bson[3]]) as usize, bson.len());
    }
}

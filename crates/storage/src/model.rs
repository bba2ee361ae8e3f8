//! Plain data types shared by the writer, the reader and the sync layer.

/// Operation kinds as stored (`op` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpType {
    Put = 1,
    Remove = 2,
    Move = 3,
    Clear = 4,
}

impl OpType {
    pub fn from_i16(v: i16) -> Option<OpType> {
        Some(match v {
            1 => OpType::Put,
            2 => OpType::Remove,
            3 => OpType::Move,
            4 => OpType::Clear,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OpType::Put => "PUT",
            OpType::Remove => "REMOVE",
            OpType::Move => "MOVE",
            OpType::Clear => "CLEAR",
        }
    }
}

/// One op as read for a `data` line.
#[derive(Debug, Clone)]
pub struct OplogEntry {
    pub op_id: i64,
    pub op: OpType,
    pub object_type: Option<String>,
    pub object_id: Option<String>,
    pub subkey: Option<String>,
    pub data: Option<String>,
    pub checksum: u32,
}

/// Ops read for some buckets (see [`crate::SyncStorage::bucket_data`]).
#[derive(Debug, Default)]
pub struct OpBatch {
    /// (bucket, op), in request order then ascending op_id.
    pub ops: Vec<(String, OplogEntry)>,
    /// Set when the read stopped early: continue with this bucket from this position (it may
    /// lie beyond the last op returned), followed by the buckets requested after it. Buckets
    /// requested before it are complete.
    pub resume: Option<(String, i64)>,
    /// The highest `target_op` of the chunks read (0: none). Above the checkpoint read, the
    /// ops may not reproduce it: compaction rewrote some against newer ops (see
    /// [`crate::compact`]), so that checkpoint must not be completed.
    pub target_op: i64,
}

/// A consistent position: everything with `op_id <= op_id` is visible; `lsn` is the source position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Checkpoint {
    pub op_id: i64,
    pub lsn: u64,
}

/// Lifecycle of a replication stream (one per deployed sync config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamState {
    Processing,
    Active,
    /// Its slot was lost: still served to clients, no longer replicated, while a new stream
    /// with the same config is built.
    Errored,
    Stop,
    Terminated,
}

impl StreamState {
    pub fn as_str(self) -> &'static str {
        match self {
            StreamState::Processing => "PROCESSING",
            StreamState::Active => "ACTIVE",
            StreamState::Errored => "ERRORED",
            StreamState::Stop => "STOP",
            StreamState::Terminated => "TERMINATED",
        }
    }

    pub fn parse(s: &str) -> Option<StreamState> {
        Some(match s {
            "PROCESSING" => StreamState::Processing,
            "ACTIVE" => StreamState::Active,
            "ERRORED" => StreamState::Errored,
            "STOP" => StreamState::Stop,
            "TERMINATED" => StreamState::Terminated,
            _ => return None,
        })
    }
}

/// A replication stream's persisted state.
#[derive(Debug, Clone)]
pub struct StreamRecord {
    pub id: i64,
    pub content: String,
    pub state: StreamState,
    pub slot_name: String,
    pub snapshot_done: bool,
    pub checkpoint: Checkpoint,
    pub no_checkpoint_before: u64,
    pub persisted_op: i64,
    /// Bucket-prefix id per definition built under another id than the stream's.
    pub prefix_ids: std::collections::BTreeMap<String, u64>,
    /// A new config being built in place on this stream (see [`crate::incremental`]).
    pub pending: Option<PendingConfig>,
}

impl StreamRecord {
    /// Options that parse `content` into the rules this stream's buckets are built with.
    pub fn rules_options(&self, base: &ferrosync_rules::SyncRulesOptions) -> ferrosync_rules::SyncRulesOptions {
        ferrosync_rules::SyncRulesOptions {
            sync_rules_id: self.id as u64,
            prefix_ids: self.prefix_ids.clone(),
            ..base.clone()
        }
    }
}

/// A sync config deployed in place on an active stream, being built beside the served one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingConfig {
    /// Deploy id (from the stream id sequence): the prefix id of added and changed definitions.
    pub id: i64,
    pub content: String,
    pub prefix_ids: std::collections::BTreeMap<String, u64>,
    /// Set once every table is re-read: the switch happens at the first checkpoint at or
    /// past this LSN.
    pub switch_lsn: Option<u64>,
}

impl PendingConfig {
    /// Options that parse the pending content into its rules.
    pub fn rules_options(&self, stream_id: i64, base: &ferrosync_rules::SyncRulesOptions) -> ferrosync_rules::SyncRulesOptions {
        ferrosync_rules::SyncRulesOptions {
            sync_rules_id: stream_id as u64,
            prefix_ids: self.prefix_ids.clone(),
            ..base.clone()
        }
    }
}

/// A source table known to a stream.
#[derive(Debug, Clone)]
pub struct SourceTableRecord {
    pub id: i64,
    pub relation_oid: u32,
    pub schema: String,
    pub name: String,
    pub key_columns: Vec<String>,
    pub snapshot_done: bool,
    pub snapshot_last_key: Option<String>,
    pub snapshot_rows: i64,
}

/// Bucket checksum at a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BucketChecksum {
    pub checksum: u32,
    pub count: i64,
}

/// What changed in a range of op_ids: buckets with new ops and lookups with new rows.
#[derive(Debug, Clone, Default)]
pub struct ChangeSet {
    pub buckets: std::collections::HashSet<String>,
    pub lookups: std::collections::HashSet<String>,
    /// False when old change records for the range were already pruned: the sets may be
    /// missing entries, so a reader must start over from the checkpoint instead.
    pub complete: bool,
}

/// A write checkpoint row: `user_key` = `<sub>/<client_id>`.
#[derive(Debug, Clone)]
pub struct WriteCheckpoint {
    pub user_key: String,
    pub write_checkpoint: i64,
    pub lsn: u64,
    pub seq: i64,
}

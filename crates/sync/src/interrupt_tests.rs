//! Newer checkpoints interrupting long downloads (protocol spec §7.3), and checkpoints
//! compaction invalidated (§6.3), driven line by line through in-memory storage.

use crate::testing::{Client, MemStorage, TestHub};

/// Two global buckets: `first[]` at priority 0, `rest[]` at the default 3.
const RULES: &str = "
bucket_definitions:
  first:
    priority: 0
    data:
      - SELECT * FROM a
  rest:
    data:
      - SELECT * FROM b
";

/// Bucket names carry the sync config's id.
const FIRST: &str = "1#first[]";
const REST: &str = "1#rest[]";

fn op_ids(client: &Client, bucket: &str) -> Vec<i64> {
    client.received.get(bucket).cloned().unwrap_or_default()
}

#[tokio::test]
async fn a_newer_checkpoint_interrupts_a_long_download() {
    let storage = MemStorage::new(RULES);
    storage.append(FIRST, 5000);
    storage.append(REST, 4000);
    let mut hub = TestHub::start(storage).await;
    let cp1 = hub.storage.commit();
    let mut stream = hub.connect();
    let mut client = Client::default();
    let mut received = client.read_chunk(&mut stream).await;

    // A checkpoint that changes none of the client's buckets does not interrupt.
    hub.storage.append("1#someone_else[]", 50);
    let unrelated = hub.publish().await;
    while received < 2500 {
        received += client.read_chunk(&mut stream).await;
    }
    hub.storage.append(FIRST, 10);
    hub.storage.append(REST, 10);
    let cp2 = hub.publish().await;
    for _ in 0..1000 {
        if client.completed.is_some() {
            break;
        }
        client.read_chunk(&mut stream).await;
    }
    assert_eq!(client.completed, Some(cp2), "the newest checkpoint completes");

    let diffs: Vec<_> = client.lines_of("checkpoint_diff").collect();
    assert_eq!(diffs.len(), 1, "one diff, for the checkpoint that changed buckets: {diffs:?}");
    let (diff_at, diff) = diffs[0];
    let cp2_id = serde_json::Value::from(cp2.to_string());
    assert_eq!(diff["last_op_id"], cp2_id);
    assert_ne!(cp2, unrelated);
    let ops_before_diff: usize = client.lines[..diff_at]
        .iter()
        .filter_map(|l| l["data"]["data"].as_array())
        .map(Vec::len)
        .sum();
    assert!(
        (1000..9000).contains(&ops_before_diff),
        "the diff came {ops_before_diff} ops into a 9000-op download"
    );
    let mut updated: Vec<&str> = diff["updated_buckets"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| b["bucket"].as_str())
        .collect();
    updated.sort();
    assert_eq!(updated, [FIRST, REST]);
    // Nothing completed at the superseded checkpoint (the diff came amid priority 0).
    for key in ["checkpoint_complete", "partial_checkpoint_complete"] {
        assert!(client.lines_of(key).all(|(_, l)| l["last_op_id"] == cp2_id), "{key} for {cp1}");
    }
    // Priority 0 completes first, at the new checkpoint; the client checked its checksum then.
    let partials: Vec<_> = client.lines_of("partial_checkpoint_complete").collect();
    assert_eq!(partials.len(), 1);
    let partial_at = partials[0].0;
    assert!(partial_at > diff_at);
    assert!(client.lines[partial_at..].iter().all(|l| l["data"]["bucket"] != FIRST));
    // Every op exactly once (the client also checked each line continues from the last).
    for bucket in [FIRST, REST] {
        assert_eq!(op_ids(&client, bucket), hub.storage.op_ids(bucket, cp2), "{bucket}");
    }
}

#[tokio::test]
async fn downloads_complete_while_checkpoints_keep_arriving() {
    let storage = MemStorage::new(RULES);
    storage.append(REST, 6000);
    let mut hub = TestHub::start(storage).await;
    let mut stream = hub.connect();
    let mut client = Client::default();
    let mut published = Vec::new();
    // After every chunk, a new checkpoint with half as many ops again as the chunk carried:
    // the bucket grows faster than the client downloads it.
    for _ in 0..400 {
        let ops = client.read_chunk(&mut stream).await;
        if client.completed.is_some() {
            break;
        }
        hub.storage.append(REST, ops * 3 / 2 + 1);
        published.push(hub.publish().await);
    }
    let Some(completed) = client.completed else {
        panic!("no checkpoint_complete after {} checkpoints", published.len());
    };
    assert!(client.lines_of("checkpoint_diff").count() >= 2, "the download was interrupted");
    assert!(published.contains(&completed));
    assert_eq!(op_ids(&client, REST), hub.storage.op_ids(REST, completed));
}

/// Protocol spec §6.3: a download that met ops compaction rewrote against newer ops does not
/// complete its checkpoint; the next one that covers those ops completes, even when none of
/// the client's buckets changed.
#[tokio::test]
async fn a_checkpoint_compaction_invalidated_completes_at_the_next_one() {
    let storage = MemStorage::new(RULES);
    storage.append(FIRST, 10);
    let mut hub = TestHub::start(storage).await;
    // Compacted against op 15, which this hub has not seen yet.
    hub.storage.append("1#someone_else[]", 5);
    hub.storage.compacted(15);
    let mut stream = hub.connect();
    let mut client = Client::default();
    while op_ids(&client, FIRST).len() < 10 {
        client.read_chunk(&mut stream).await;
    }
    assert_eq!(client.completed, None);
    assert_eq!(hub.hub.compaction_floor(1), 15);
    let cp2 = hub.publish().await;
    assert_eq!(cp2, 15);
    for _ in 0..10 {
        if client.completed.is_some() {
            break;
        }
        client.read_chunk(&mut stream).await;
    }
    assert_eq!(client.completed, Some(cp2));
    assert_eq!(client.lines_of("checkpoint_complete").count(), 1);
}

//! What the hub holds follows who is connected: write checkpoints of connected users only,
//! and cached buckets that connections still read.

use crate::testing::{Client, MemStorage, TestHub};
use bytes::Bytes;
use futures::Stream;
use std::time::Duration;

const RULES: &str = "
bucket_definitions:
  mine:
    parameters: SELECT request.user_id() as user_id
    data:
      - SELECT * FROM items WHERE owner = bucket.user_id
";

fn bucket(user: usize) -> String {
    format!("1#mine[\"u{user}\"]")
}

async fn until_complete(client: &mut Client, stream: &mut (impl Stream<Item = Bytes> + Unpin), checkpoint: i64) {
    for _ in 0..100 {
        if client.completed == Some(checkpoint) {
            return;
        }
        client.read_chunk(stream).await;
    }
    panic!("checkpoint {checkpoint} did not complete: {:?}", client.lines);
}

#[tokio::test]
async fn users_who_leave_are_forgotten() {
    const USERS: usize = 10;
    let storage = MemStorage::new(RULES);
    for u in 0..USERS {
        storage.append(&bucket(u), 3);
        storage.set_write_checkpoint(&format!("u{u}/c1"), 5 + u as i64, 1);
    }
    storage.set_write_checkpoint("never connected/c1", 1, 1);
    let mut hub = TestHub::with_sweep_interval(storage, Duration::ZERO).await;
    let cp = hub.storage.commit();
    let mut streams = Vec::new();
    for u in 0..USERS {
        let mut stream = hub.connect_as(&format!("u{u}"));
        let mut client = Client::default();
        until_complete(&mut client, &mut stream, cp).await;
        let (_, line) = client.lines_of("checkpoint").next().expect("a checkpoint line");
        assert_eq!(
            line["write_checkpoint"],
            (5 + u).to_string(),
            "read from storage when the user connected"
        );
        streams.push((client, stream));
    }
    assert_eq!(hub.hub.held(), (USERS, USERS));

    // Everyone but u0 leaves: their write checkpoints go at once.
    streams.truncate(1);
    assert_eq!(hub.hub.held().0, 1);
    hub.storage.set_write_checkpoint("u0/c1", 42, 1);
    for round in 0..2 {
        hub.storage.append(&bucket(0), 1);
        let cp = hub.publish().await;
        let (client, stream) = &mut streams[0];
        until_complete(client, stream, cp).await;
        if round == 0 {
            // The buckets of those who left were read before this sweep, so they survive it.
            assert_eq!(hub.hub.held(), (1, USERS));
        }
    }
    // The next sweep found that nobody read them since.
    assert_eq!(hub.hub.held(), (1, 1));
    let (client, _) = &streams[0];
    let (_, last) = client.lines_of("checkpoint_diff").last().expect("diffs");
    assert_eq!(last["write_checkpoint"], "42", "a connected user's write checkpoint stays current");
}

#[tokio::test]
async fn a_users_stored_write_checkpoint_is_read_once_for_all_its_connections() {
    let storage = MemStorage::new(RULES);
    storage.append(&bucket(0), 3);
    storage.set_write_checkpoint("u0/c1", 7, 1);
    // The first connection's read is still running when the second connects: the second must
    // wait for it (skipping it would announce a checkpoint without the write checkpoint, which
    // an idle source would not repeat).
    storage.slow_write_checkpoint_reads(Duration::from_millis(200));
    let hub = TestHub::start(storage).await;
    let cp = hub.storage.commit();
    let mut clients: Vec<_> = (0..3).map(|_| (Client::default(), hub.connect_as("u0"))).collect();
    let (first, rest) = clients.split_at_mut(1);
    let (a, b) = rest.split_at_mut(1);
    tokio::join!(
        until_complete(&mut first[0].0, &mut first[0].1, cp),
        until_complete(&mut a[0].0, &mut a[0].1, cp),
        until_complete(&mut b[0].0, &mut b[0].1, cp),
    );
    for (client, _) in &clients {
        let (_, line) = client.lines_of("checkpoint").next().expect("a checkpoint line");
        assert_eq!(line["write_checkpoint"], "7");
    }
    assert_eq!(hub.storage.write_checkpoint_reads(), 1, "one read for the user's three connections");
    let (mut late, mut late_stream) = (Client::default(), hub.connect_as("u0"));
    until_complete(&mut late, &mut late_stream, cp).await;
    assert_eq!(
        late.lines_of("checkpoint").next().expect("a checkpoint line").1["write_checkpoint"],
        "7"
    );
    assert_eq!(
        hub.storage.write_checkpoint_reads(),
        1,
        "still watched: no read for a later connection"
    );

    drop(clients);
    drop(late_stream);
    let (mut again, mut again_stream) = (Client::default(), hub.connect_as("u0"));
    until_complete(&mut again, &mut again_stream, cp).await;
    assert_eq!(hub.storage.write_checkpoint_reads(), 2, "the user left and came back: read again");
}

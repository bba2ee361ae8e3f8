//! Parameter packs: the parameter entries of the rows one snapshot batch copied, one stored row
//! per (lookup, source table) instead of one per entry.
//!
//! A snapshot writes a parameter entry for nearly every row of a table a parameter query reads
//! (e.g. each todo: its owner -> its list). Stored one row each, those entries were the
//! largest part of the Postgres work of a snapshot: a heap tuple and a five-column index entry
//! per row. Packed, a batch of 30,000 rows over 1,000 users is 1,000 rows.
//!
//! A pack holds only entries that no later change superseded: the first time a packed row
//! changes, the writer moves its entries out into `bucket_parameters`, with their original
//! ids, in the same transaction as the change (see [`unpack`]). So an entry is either
//! in a pack or in `bucket_parameters`, never both, and everything that manages parameter
//! history (versions, tombstones, hygiene) sees the moved entries as it always did. A row's
//! `current_data.pack_id` names the pack its entries are in. Reads merge both (see
//! [`live`]).
//!
//! Entries layout: per entry, the 16 key bytes, the id as LEB128 after `pack_id`, and the
//! parameters JSON as a LEB128 length and its bytes.

use crate::copy_in::CopyIn;
use crate::error::StorageError;
use crate::row_codec::{push_leb128, read_leb128, take};
use std::collections::{BTreeMap, HashMap, HashSet};
use tokio_postgres::Transaction;
use uuid::Uuid;

/// One parameter entry: (lookup, table_id, key, id, bucket_parameters JSON), as in
/// `bucket_parameters`.
pub(crate) type ParamRow = (String, i64, Uuid, i64, String);

/// A pack to insert.
pub(crate) struct NewPack {
    pub lookup: String,
    pub table_id: i64,
    pub pack_id: i64,
    pub entries: Vec<u8>,
    pub entry_count: i32,
}

/// A packed row's entry to move out of its pack.
pub(crate) struct Unpack {
    pub lookup: String,
    pub table_id: i64,
    pub pack_id: i64,
    pub key: Uuid,
}

/// Write a batch's packs; returns their lookups.
pub(crate) async fn copy_packs<'a>(tx: &Transaction<'_>, group: i32, packs: &'a [NewPack]) -> Result<Vec<&'a str>, StorageError> {
    if packs.is_empty() {
        return Ok(Vec::new());
    }
    let mut copy = CopyIn::start(
        tx,
        "COPY ferrosync.parameter_packs (group_id, lookup, table_id, pack_id, entry_count, entries) FROM STDIN BINARY",
    )
    .await?;
    for p in packs {
        copy.row(6);
        copy.int4(group);
        copy.bytes(p.lookup.as_bytes())?;
        copy.int8(p.table_id);
        copy.int8(p.pack_id);
        copy.int4(p.entry_count);
        copy.bytes(&p.entries)?;
        copy.end_row().await?;
    }
    copy.finish().await?;
    let mut lookups: Vec<&str> = packs.iter().map(|p| p.lookup.as_str()).collect();
    lookups.dedup();
    Ok(lookups)
}

/// Take the entries of `unpacks` out of their packs (rewriting or deleting each pack) and
/// return them as parameter rows with their original ids, for the caller to write in the same
/// transaction. An entry that is not there (its pack deleted with a replaced definition) is
/// skipped: there is nothing left to keep.
pub(crate) async fn unpack(tx: &Transaction<'_>, group: i32, unpacks: &[Unpack]) -> Result<Vec<ParamRow>, StorageError> {
    if unpacks.is_empty() {
        return Ok(Vec::new());
    }
    let mut wanted: HashMap<(&str, i64, i64), HashSet<Uuid>> = HashMap::new();
    for u in unpacks {
        wanted.entry((u.lookup.as_str(), u.table_id, u.pack_id)).or_default().insert(u.key);
    }
    let lookups: Vec<&str> = wanted.keys().map(|k| k.0).collect();
    let tables: Vec<i64> = wanted.keys().map(|k| k.1).collect();
    let pack_ids: Vec<i64> = wanted.keys().map(|k| k.2).collect();
    let rows = tx
        .query(
            // An index lookup per pack (see `load_current` in writer.rs for why the fence).
            "SELECT p.lookup, p.table_id, p.pack_id, p.entries
             FROM unnest($2::text[], $3::int8[], $4::int8[]) AS k(lookup, table_id, pack_id)
             CROSS JOIN LATERAL (
                SELECT * FROM ferrosync.parameter_packs p
                WHERE p.group_id = $1 AND p.lookup = k.lookup AND p.table_id = k.table_id AND p.pack_id = k.pack_id OFFSET 0) p",
            &[&group, &lookups, &tables, &pack_ids],
        )
        .await?;
    let mut moved = Vec::new();
    let (mut kept_lookups, mut kept_tables, mut kept_ids, mut kept_entries, mut kept_counts) = (vec![], vec![], vec![], vec![], vec![]);
    for r in rows {
        let (lookup, table_id, pack_id): (String, i64, i64) = (r.get(0), r.get(1), r.get(2));
        let all = entries(pack_id, r.get(3)).ok_or_else(|| StorageError::Corrupt(format!("parameter pack {lookup}/{pack_id}")))?;
        let Some(keys) = wanted.get(&(lookup.as_str(), table_id, pack_id)) else {
            continue;
        };
        let (out, kept): (Vec<Entry>, Vec<Entry>) = all.into_iter().partition(|e| keys.contains(&e.key));
        moved.extend(out.into_iter().map(|e| (lookup.clone(), table_id, e.key, e.id, e.json)));
        kept_counts.push(kept.len() as i32);
        kept_entries.push(encode(pack_id, &kept));
        kept_lookups.push(lookup);
        kept_tables.push(table_id);
        kept_ids.push(pack_id);
    }
    if kept_ids.is_empty() {
        return Ok(moved);
    }
    let emptied = kept_counts.contains(&0);
    tx.execute(
        "UPDATE ferrosync.parameter_packs p SET entries = k.entries, entry_count = k.entry_count
         FROM unnest($2::text[], $3::int8[], $4::int8[], $5::bytea[], $6::int4[]) AS k(lookup, table_id, pack_id, entries, entry_count)
         WHERE p.group_id = $1 AND p.lookup = k.lookup AND p.table_id = k.table_id AND p.pack_id = k.pack_id",
        &[&group, &kept_lookups, &kept_tables, &kept_ids, &kept_entries, &kept_counts],
    )
    .await?;
    if emptied {
        tx.execute(
            "DELETE FROM ferrosync.parameter_packs p USING unnest($2::text[], $3::int8[], $4::int8[]) AS k(lookup, table_id, pack_id)
             WHERE p.group_id = $1 AND p.lookup = k.lookup AND p.table_id = k.table_id AND p.pack_id = k.pack_id AND p.entry_count = 0",
            &[&group, &kept_lookups, &kept_tables, &kept_ids],
        )
        .await?;
    }
    Ok(moved)
}

/// The live parameters per lookup among `versions` (visible parameter rows, packed or not):
/// per (lookup, table, key) the version with the largest id, unless it is a tombstone (`[]`),
/// in (lookup, table, key) order.
pub(crate) fn live(versions: Vec<ParamRow>) -> HashMap<String, Vec<String>> {
    let mut newest: BTreeMap<(String, i64, Uuid), (i64, String)> = BTreeMap::new();
    for (lookup, table_id, key, id, json) in versions {
        let slot = newest.entry((lookup, table_id, key)).or_insert((id, String::new()));
        if slot.0 <= id {
            *slot = (id, json);
        }
    }
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for ((lookup, _, _), (_, json)) in newest {
        if json != "[]" {
            out.entry(lookup).or_default().push(json);
        }
    }
    out
}

/// Group `params` (entries with ids ≥ `pack_id`, ascending) into packs, one per (lookup,
/// table_id), in that order. Entries keep their order within a pack: only the packs are
/// sorted, not the batch's tens of thousands of entries by their lookup text.
pub(crate) fn pack(params: Vec<ParamRow>, pack_id: i64) -> Vec<NewPack> {
    let mut index: HashMap<(String, i64), usize> = HashMap::new();
    let mut packs: Vec<NewPack> = Vec::new();
    for (lookup, table_id, key, id, json) in params {
        let group = (lookup, table_id);
        let at = match index.get(&group) {
            Some(&at) => at,
            None => {
                packs.push(NewPack {
                    lookup: group.0.clone(),
                    table_id,
                    pack_id,
                    entries: Vec::new(),
                    entry_count: 0,
                });
                index.insert(group, packs.len() - 1);
                packs.len() - 1
            }
        };
        let p = &mut packs[at];
        push_entry(&mut p.entries, pack_id, key, id, &json);
        p.entry_count += 1;
    }
    packs.sort_unstable_by(|a, b| (&a.lookup, a.table_id).cmp(&(&b.lookup, b.table_id)));
    packs
}

fn push_entry(out: &mut Vec<u8>, pack_id: i64, key: Uuid, id: i64, json: &str) {
    out.extend_from_slice(key.as_bytes());
    // Ids of a pack are allocated from pack_id up; a smaller one would not fit the layout.
    push_leb128(out, id.saturating_sub(pack_id).max(0) as usize);
    push_leb128(out, json.len());
    out.extend_from_slice(json.as_bytes());
}

/// One decoded entry.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry {
    pub key: Uuid,
    pub id: i64,
    pub json: String,
}

/// Decode a pack's entries; `None` if the bytes are damaged.
pub(crate) fn entries(pack_id: i64, mut buf: &[u8]) -> Option<Vec<Entry>> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let key = Uuid::from_bytes(take::<16>(&mut buf)?);
        let id = pack_id.checked_add(i64::try_from(read_leb128(&mut buf)?).ok()?)?;
        let len = read_leb128(&mut buf)?;
        let json = String::from_utf8(buf.get(..len)?.to_vec()).ok()?;
        buf = &buf[len..];
        out.push(Entry { key, id, json });
    }
    Some(out)
}

/// Re-encode the entries that stay in a pack.
pub(crate) fn encode(pack_id: i64, entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        push_entry(&mut out, pack_id, e.key, e.id, &e.json);
    }
    out
}

#[cfg(test)]
mod tests;

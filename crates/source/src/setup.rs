//! Source setup checks and table discovery.
//!
//! Every problem found is reported with what to run to fix it, so a first-time user does not
//! have to read docs to get replication going.

use crate::error::SourceError;
use crate::relation::{ColumnInfo, RelationInfo};
use ferrosync_rules::SourceTableName;
use tokio_postgres::Client;

/// The publication every PowerSync-compatible source uses.
pub const PUBLICATION: &str = "powersync";

/// Check wal_level, the `powersync` publication and the role's privileges.
pub async fn check_source(client: &Client) -> Result<(), SourceError> {
    let wal_level: String = client.query_one("SHOW wal_level", &[]).await?.get(0);
    if wal_level != "logical" {
        return Err(SourceError::Setup {
            code: "PSYNC_S1140",
            message: format!(
                "wal_level is '{wal_level}', but logical replication needs 'logical': run ALTER SYSTEM SET wal_level = logical; and restart Postgres"
            ),
        });
    }
    let role = client
        .query_one("SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user", &[])
        .await?;
    if !role.get::<_, bool>(0) {
        return Err(SourceError::Setup {
            code: "PSYNC_S1147",
            message: "the source role lacks the REPLICATION attribute: run ALTER ROLE <user> WITH REPLICATION;".into(),
        });
    }
    let publication = client
        .query_opt(
            "SELECT pubinsert, pubupdate, pubdelete, pubtruncate, pubviaroot FROM pg_publication WHERE pubname = $1",
            &[&PUBLICATION],
        )
        .await?;
    let Some(p) = publication else {
        return Err(SourceError::Setup {
            code: "PSYNC_S1141",
            message: "publication 'powersync' does not exist: run CREATE PUBLICATION powersync FOR ALL TABLES;".into(),
        });
    };
    let (ins, upd, del, trunc, via_root): (bool, bool, bool, bool, bool) = (p.get(0), p.get(1), p.get(2), p.get(3), p.get(4));
    if !(ins && upd && del && trunc) {
        return Err(SourceError::Setup {
            code: "PSYNC_S1142",
            message: "publication 'powersync' must publish insert, update, delete and truncate: run ALTER PUBLICATION powersync SET (publish = 'insert, update, delete, truncate');".into(),
        });
    }
    if via_root {
        return Err(SourceError::Setup {
            code: "PSYNC_S1143",
            message: "publication 'powersync' has publish_via_partition_root enabled, which is not supported: run ALTER PUBLICATION powersync SET (publish_via_partition_root = false);".into(),
        });
    }
    Ok(())
}

/// Tables in the `powersync` publication, as (oid, name, replica identity).
pub async fn published_tables(client: &Client, connection_tag: &str) -> Result<Vec<(u32, SourceTableName, u8)>, SourceError> {
    let rows = client
        .query(
            "SELECT c.oid, n.nspname::text, c.relname::text, c.relreplident::text
             FROM pg_publication_tables pt
             JOIN pg_namespace n ON n.nspname = pt.schemaname
             JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
             WHERE pt.pubname = $1 ORDER BY 2, 3",
            &[&PUBLICATION],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let ident: String = r.get(3);
            (
                r.get::<_, u32>(0),
                SourceTableName {
                    connection_tag: connection_tag.to_string(),
                    schema: r.get(1),
                    name: r.get(2),
                },
                ident.bytes().next().unwrap_or(b'd'),
            )
        })
        .collect())
}

/// Column list and replica identity of one table, from the catalog.
pub async fn describe_table(client: &Client, oid: u32, name: SourceTableName, replica_identity: u8) -> Result<RelationInfo, SourceError> {
    let key_rows = match replica_identity {
        b'd' | b'i' => {
            let by_ident = replica_identity == b'i';
            client
                .query(
                    "SELECT a.attname::text FROM pg_index i
                     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
                     WHERE i.indrelid = $1 AND CASE WHEN $2 THEN i.indisreplident ELSE i.indisprimary END",
                    &[&oid, &by_ident],
                )
                .await?
        }
        _ => Vec::new(),
    };
    let keys: Vec<String> = key_rows.iter().map(|r| r.get(0)).collect();
    let cols = client
        .query(
            "SELECT attname::text, atttypid FROM pg_attribute
             WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped AND attgenerated = '' ORDER BY attnum",
            &[&oid],
        )
        .await?;
    let columns = cols
        .iter()
        .map(|r| {
            let name: String = r.get(0);
            let is_key = replica_identity == b'f' || keys.contains(&name);
            ColumnInfo {
                name: name.into(),
                type_oid: r.get(1),
                is_key,
            }
        })
        .collect();
    Ok(RelationInfo {
        oid,
        name,
        columns,
        replica_identity,
    })
}

/// Quote an identifier for SQL text.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quote a string literal for SQL text.
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

pub async fn create_slot(client: &Client, slot: &str) -> Result<(), SourceError> {
    client
        .execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&slot])
        .await?;
    Ok(())
}

pub async fn drop_slot(client: &Client, slot: &str) -> Result<(), SourceError> {
    client
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(())
}

/// Current WAL position of the source.
pub async fn current_lsn(client: &Client) -> Result<crate::Lsn, SourceError> {
    let text: String = client.query_one("SELECT pg_current_wal_lsn()::text", &[]).await?.get(0);
    crate::Lsn::parse(&text).ok_or_else(|| SourceError::decode(format!("bad lsn {text}")))
}

/// Emit the keepalive marker the change stream turns into a checkpoint.
///
/// A non-transactional message is not flushed by itself, and the walsender only sends flushed
/// WAL: on an idle source the marker waited for the WAL writer (`wal_writer_delay`, 200 ms by
/// default) before any checkpoint could follow. The commit of a transaction that has an xid
/// flushes the WAL up to it, marker included (Postgres 17 has a `flush` argument for this,
/// Postgres 15 and 16 do not). pgoutput skips the empty transaction itself.
pub async fn emit_ping(client: &Client) -> Result<(), SourceError> {
    client
        .batch_execute("BEGIN; SELECT pg_logical_emit_message(false, 'powersync', 'ping'); SELECT pg_current_xact_id(); COMMIT;")
        .await?;
    Ok(())
}

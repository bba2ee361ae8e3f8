//! Watching a replication slot. A slot that is gone or invalidated (Postgres removed WAL it
//! still needed, past `max_slot_wal_keep_size`) means the stream's history is lost and a new
//! stream must be built; a slot close to that budget is reported while there is time to act.

use crate::error::SourceError;
use tokio_postgres::Client;

/// A slot's state as `pg_replication_slots` reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct SlotHealth {
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: String,
    /// Bytes of WAL that can still be written before the slot is at risk (`None`: no budget).
    pub safe_wal_size: Option<i64>,
    /// `max_slot_wal_keep_size` in bytes (`None`: unlimited).
    pub budget: Option<i64>,
    /// WAL written since the slot's confirmed position: how far replication is behind
    /// (`None` before the slot confirmed anything).
    pub lag_bytes: Option<i64>,
}

impl SlotHealth {
    /// The slot can no longer stream: its WAL is gone.
    pub fn is_lost(&self) -> bool {
        self.wal_status == "lost"
    }

    /// Share of the WAL budget still free (`None` without a budget).
    pub fn headroom(&self) -> Option<f64> {
        match (self.safe_wal_size, self.budget) {
            (Some(safe), Some(budget)) if budget > 0 => Some(safe.max(0) as f64 / budget as f64),
            _ => None,
        }
    }

    /// Worth a warning: less than a quarter of the budget left, or already past it.
    pub fn is_at_risk(&self) -> bool {
        self.wal_status == "unreserved" || self.headroom().is_some_and(|h| h < 0.25)
    }
}

/// The slot's health; `Ok(None)` when it does not exist.
pub async fn slot_health(client: &Client, slot: &str) -> Result<Option<SlotHealth>, SourceError> {
    let row = client
        .query_opt(
            "SELECT coalesce(wal_status, 'reserved'), safe_wal_size,
                    pg_size_bytes(nullif(current_setting('max_slot_wal_keep_size'), '-1')),
                    pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END,
                                    confirmed_flush_lsn)::bigint
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.map(|r| SlotHealth {
        wal_status: r.get(0),
        safe_wal_size: r.get(1),
        budget: r.get(2),
        lag_bytes: r.get(3),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(status: &str, safe: Option<i64>, budget: Option<i64>) -> SlotHealth {
        SlotHealth {
            wal_status: status.into(),
            safe_wal_size: safe,
            budget,
            lag_bytes: None,
        }
    }

    #[test]
    fn risk_and_loss() {
        assert!(health("lost", None, Some(1 << 30)).is_lost());
        assert!(!health("reserved", None, None).is_at_risk(), "no budget, nothing to warn about");
        assert!(!health("reserved", Some(900 << 20), Some(1 << 30)).is_at_risk());
        assert!(health("reserved", Some(100 << 20), Some(1 << 30)).is_at_risk());
        assert!(health("unreserved", Some(-5), Some(1 << 30)).is_at_risk());
        assert_eq!(health("unreserved", Some(-5), Some(1 << 30)).headroom(), Some(0.0));
    }
}

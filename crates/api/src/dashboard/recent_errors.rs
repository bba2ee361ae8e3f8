//! The last warnings and errors the process logged, for the dashboard: a bounded ring fed by a
//! `tracing` layer (installed next to the log output), so what an operator sees there is what
//! the logs say, with the `PSYNC_Sxxxx` code picked out when the event carries one.

use serde::Serialize;
use std::collections::VecDeque;
use std::fmt::Write;
use std::sync::{Mutex, OnceLock};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// Events kept: enough for "what went wrong lately", small enough to send every poll.
const CAPACITY: usize = 100;

#[derive(Debug, Clone, Serialize)]
pub struct LoggedError {
    pub time_ms: u64,
    pub level: &'static str,
    pub target: String,
    /// The message and the event's other fields (`key=value`).
    pub message: String,
    pub code: Option<String>,
}

/// The process's ring (logging is process-wide, so is this).
pub fn recent() -> &'static RecentErrors {
    static RING: OnceLock<RecentErrors> = OnceLock::new();
    RING.get_or_init(|| RecentErrors::new(CAPACITY))
}

pub struct RecentErrors {
    capacity: usize,
    entries: Mutex<VecDeque<LoggedError>>,
}

impl RecentErrors {
    fn new(capacity: usize) -> RecentErrors {
        RecentErrors {
            capacity,
            entries: Mutex::new(VecDeque::with_capacity(capacity)),
        }
    }

    fn push(&self, entry: LoggedError) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() == self.capacity {
            entries.pop_front();
        }
        entries.push_back(entry);
    }

    /// Newest first.
    pub fn snapshot(&self) -> Vec<LoggedError> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.iter().rev().cloned().collect()
    }
}

/// Feeds [`recent`] with WARN and ERROR events.
pub struct RecentErrorsLayer;

impl<S: Subscriber> Layer<S> for RecentErrorsLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if let Some(entry) = entry(event) {
            recent().push(entry);
        }
    }
}

fn entry(event: &Event<'_>) -> Option<LoggedError> {
    let meta = event.metadata();
    let level = match *meta.level() {
        Level::ERROR => "error",
        Level::WARN => "warn",
        _ => return None,
    };
    let mut text = EventText::default();
    event.record(&mut text);
    if !text.fields.is_empty() {
        text.message = format!("{}{}", text.message, text.fields);
    }
    Some(LoggedError {
        time_ms: crate::probes::unix_millis().max(0) as u64,
        level,
        target: meta.target().to_string(),
        code: psync_code(&text.message),
        message: text.message,
    })
}

#[derive(Default)]
struct EventText {
    message: String,
    fields: String,
}

impl Visit for EventText {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message.push_str(value),
            name => {
                let _ = write!(self.fields, " {name}={value:?}");
            }
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => {
                let _ = write!(self.message, "{value:?}");
            }
            name => {
                let _ = write!(self.fields, " {name}={value:?}");
            }
        }
    }
}

/// The first `PSYNC_S` followed by four digits.
fn psync_code(text: &str) -> Option<String> {
    text.match_indices("PSYNC_S").find_map(|(i, _)| {
        let code = text.get(i..i + 11)?;
        code[7..].bytes().all(|b| b.is_ascii_digit()).then(|| code.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn warnings_and_errors_are_kept_with_their_code() {
        let subscriber = tracing_subscriber::registry().with(RecentErrorsLayer);
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("not kept");
            tracing::warn!(code = "PSYNC_S2103", user = "u1", "authentication failed");
            tracing::error!(error = "storage gone [PSYNC_S2003]", "ring test event");
        });
        let mine: Vec<LoggedError> = recent()
            .snapshot()
            .into_iter()
            .filter(|e| e.message.contains("ring test event") || e.message.contains("authentication failed"))
            .collect();
        assert_eq!(mine.len(), 2, "{mine:?}");
        assert_eq!((mine[0].level, mine[0].code.as_deref()), ("error", Some("PSYNC_S2003")));
        assert_eq!((mine[1].level, mine[1].code.as_deref()), ("warn", Some("PSYNC_S2103")));
        assert!(mine[1].message.contains("user=\"u1\""), "{}", mine[1].message);
        assert!(!recent().snapshot().iter().any(|e| e.message == "not kept"));
    }

    #[test]
    fn the_ring_keeps_the_newest() {
        let ring = RecentErrors::new(3);
        for i in 0..5 {
            ring.push(LoggedError {
                time_ms: i,
                level: "warn",
                target: "t".into(),
                message: format!("m{i}"),
                code: None,
            });
        }
        let times: Vec<u64> = ring.snapshot().iter().map(|e| e.time_ms).collect();
        assert_eq!(times, [4, 3, 2]);
    }

    #[test]
    fn codes_are_found_only_when_complete() {
        assert_eq!(psync_code("x [PSYNC_S2101] y").as_deref(), Some("PSYNC_S2101"));
        assert_eq!(psync_code("PSYNC_S21 then PSYNC_S2305"), Some("PSYNC_S2305".into()));
        assert_eq!(psync_code("PSYNC_Sxx"), None);
    }
}

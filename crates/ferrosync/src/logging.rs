//! Log output: level and format from the config's `system.logging`; `RUST_LOG`, when set,
//! overrides the level (and can filter by module, which the config cannot). Warnings and
//! errors also go to the dashboard's recent-errors ring.

use ferrosync_api::dashboard::recent_errors::RecentErrorsLayer;
use ferrosync_config::{LogFormat, LogLevel, LoggingConfig};
use std::path::Path;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// `system.logging` of the config at `path`, read before logging starts. A config that does not
/// load gives the defaults here; the command itself then reports why it does not load.
pub fn settings(path: &Path) -> LoggingConfig {
    ferrosync_config::load_config_file(path, &|name| std::env::var(name).ok())
        .map(|loaded| loaded.config.logging)
        .unwrap_or_default()
}

/// The reference's winston levels as tracing directives (`http` and `verbose` lie between
/// info and debug, which tracing lacks).
fn directive(level: LogLevel) -> &'static str {
    match level {
        LogLevel::Error => "error",
        LogLevel::Warn => "warn",
        LogLevel::Info => "info",
        LogLevel::Http | LogLevel::Verbose | LogLevel::Debug => "debug",
        LogLevel::Silly => "trace",
    }
}

fn filter(level: Option<LogLevel>) -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| level.map_or("info", directive).into())
}

pub fn init(config: LoggingConfig) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(config.level))
        .with_writer(std::io::stderr);
    match config.format {
        // Collectors parse the fields; colour codes would only get in their way.
        LogFormat::Json => builder.json().with_ansi(false).finish().with(RecentErrorsLayer).init(),
        // Colour codes only for a person at a terminal, not in log files and collectors.
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .finish()
            .with(RecentErrorsLayer)
            .init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_levels_map_to_tracing_levels() {
        assert_eq!(directive(LogLevel::Warn), "warn");
        assert_eq!(directive(LogLevel::Verbose), "debug");
        assert_eq!(directive(LogLevel::Silly), "trace");
    }
}

//! `ferrosync validate`: every problem of a config file and its sync config, one line each,
//! then (when the source database answers within a few seconds) checks against the source:
//! the setup serve needs, referenced tables and the columns simple queries name, and column
//! types that ferrosync drops or converts. Errors make the exit code non-zero; warnings do not.

use crate::serve::rules_options;
use anyhow::{bail, Result};
use ferrosync_config::{load_config_file, PostgresConnectionConfig};
use ferrosync_inspect::source_checks::{connect_source, one_line};
use ferrosync_inspect::{check_source, rule_issues, Severity};
use ferrosync_rules::SyncRules;
use std::path::Path;

/// Prints problems and counts them.
#[derive(Default)]
struct Report {
    errors: usize,
    warnings: usize,
}

impl Report {
    fn error(&mut self, what: impl std::fmt::Display) {
        self.errors += 1;
        println!("error: {what}");
    }

    fn warning(&mut self, what: impl std::fmt::Display) {
        self.warnings += 1;
        println!("warning: {what}");
    }

    fn add(&mut self, severity: Severity, what: String) {
        match severity {
            Severity::Error => self.error(what),
            Severity::Warning => self.warning(what),
        }
    }

    fn note(&self, what: impl std::fmt::Display) {
        println!("note: {what}");
    }
}

pub async fn validate(path: &Path) -> Result<()> {
    let mut report = Report::default();
    let loaded = match load_config_file(path, &|name| std::env::var(name).ok()) {
        Ok(l) => l,
        Err(e) => {
            report.error(format_args!("{}: {e}", path.display()));
            bail!("1 error(s), 0 warning(s)");
        }
    };
    for w in &loaded.warnings {
        report.warning(format_args!("{}: {w}", path.display()));
    }
    let config = &loaded.config;
    let rules = match &config.sync_config {
        None => {
            report.note(format_args!(
                "{}: no sync_config (or sync_rules): serve serves the one deployed through the admin API",
                path.display()
            ));
            None
        }
        Some(sync) => {
            let name = match &sync.path {
                Some(p) => p.display().to_string(),
                None => format!("{} (sync_config.content)", path.display()),
            };
            check_rules(&name, &sync.content, &mut report).map(|rules| (rules, sync.content.as_str()))
        }
    };
    if let Some(auth_error) = ferrosync_api::auth::KeyStore::from_config(&config.client_auth).err() {
        report.error(format_args!("{}: client_auth: {auth_error}", path.display()));
    }
    match (&config.replication, &rules) {
        (None, _) => report.note("no replication source configured: source checks skipped"),
        (Some(_), None) => report.note("source checks skipped: no sync config that parses"),
        (Some(source), Some((rules, content))) => source_checks(source, rules, content, &mut report).await,
    }
    let summary = format!("{} error(s), {} warning(s)", report.errors, report.warnings);
    if report.errors > 0 {
        bail!(summary);
    }
    println!("config OK: {summary}");
    Ok(())
}

/// Parses the sync config and prints all its errors and warnings, in file order.
fn check_rules(name: &str, content: &str, report: &mut Report) -> Option<SyncRules> {
    let (rules, issues) = rule_issues(content, &rules_options());
    for (issue, severity) in &issues {
        report.add(*severity, format!("{name}: {}", one_line(issue)));
    }
    rules
}

async fn source_checks(source: &PostgresConnectionConfig, rules: &SyncRules, content: &str, report: &mut Report) {
    let client = match connect_source(source).await {
        Ok(c) => c,
        Err(e) => {
            report.warning(format_args!("source: {e}; table and column checks skipped"));
            return;
        }
    };
    for issue in check_source(&client, &source.tag, rules, content, &rules_options().default_schema).await {
        report.add(issue.severity, issue.message);
    }
}

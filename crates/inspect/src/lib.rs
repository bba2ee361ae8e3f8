//! What the service can tell about itself, shared by the CLI (`ferrosync validate`, `explain`)
//! and the admin API: sync-config problems, checks of a sync config against the source
//! database, the source schema, and which buckets a request would sync and why.

pub mod catalog;
pub mod columns;
pub mod explain;
pub mod source_checks;

pub use explain::{explain, BucketReport, Explanation, Served};
pub use source_checks::{check_source, rule_issues, Issue, Severity};

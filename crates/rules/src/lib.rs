//! Sync configs for ferrosync: legacy `bucket_definitions` (editions 1/2) and sync streams
//! (edition 3, and alpha streams in edition 2). YAML parsing, SQL compilation,
//! replication-time row and parameter evaluation, and request-time bucket resolution,
//! wire-compatible with the PowerSync service.

mod compile;
mod config;
mod data_query;
pub mod diff;
mod errors;
mod expr;
mod filter;
mod functions;
pub use functions::iso8601_millis;
mod json;
mod locate;
mod param_query;
mod querier;
mod request;
mod rules;
mod sql;
mod streams;
mod table;
mod value;

pub use config::{Compatibility, SyncRulesOptions};
pub use errors::{EvaluationError, Location, RuleIssue, SyncRulesError};
pub use querier::{BucketDescription, BucketReason, LookupKey, Querier, StreamError, StreamInfo, StreamSubscription, StreamsRequest};
pub use request::RequestParameters;
pub use rules::{BucketSourceInfo, EvaluatedParameters, EvaluatedRow, SyncRules};
pub use table::{SourceTableName, TablePattern};
pub use value::{Row, SqliteValue};

#[cfg(test)]
mod eval_tests;

#[cfg(test)]
mod fuzz_smoke;
#[doc(hidden)]
pub mod fuzz_support;
#[cfg(test)]
mod prefix_tests;

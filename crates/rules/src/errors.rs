//! Error and issue types reported while parsing and evaluating sync rules.

use std::fmt;

/// One error or warning found in a sync rules file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleIssue {
    /// The message (matching the reference service where it defines one).
    pub message: String,
    /// The bucket definition the issue belongs to, if any.
    pub definition: Option<String>,
    /// The SQL query text the issue belongs to, if any.
    pub query: Option<String>,
    /// Where in the sync config file the issue is, when it can be told: the offending SQL
    /// character for SQL syntax errors, else the query text, the key, or the definition.
    pub location: Option<Location>,
}

/// A position in the sync config file (1-based line and column, columns in characters).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)
    }
}

impl RuleIssue {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        RuleIssue {
            message: message.into(),
            definition: None,
            query: None,
            location: None,
        }
    }

    pub(crate) fn at(message: impl Into<String>, definition: &str, query: Option<&str>) -> Self {
        RuleIssue {
            message: message.into(),
            definition: Some(definition.to_string()),
            query: query.map(str::to_string),
            location: None,
        }
    }
}

impl fmt::Display for RuleIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(at) = &self.location {
            write!(f, "{at}: ")?;
        }
        match (&self.definition, &self.query) {
            (Some(d), Some(q)) => write!(f, "{d}: {} (query: {q})", self.message),
            (Some(d), None) => write!(f, "{d}: {}", self.message),
            (None, Some(q)) => write!(f, "{} (query: {q})", self.message),
            (None, None) => f.write_str(&self.message),
        }
    }
}

/// All errors found while parsing a sync rules file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", render(.errors))]
pub struct SyncRulesError {
    /// The errors, in file order.
    pub errors: Vec<RuleIssue>,
    /// Warnings found before parsing stopped (not part of the error text).
    pub warnings: Vec<RuleIssue>,
}

fn render(errors: &[RuleIssue]) -> String {
    errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
}

/// A row could not be evaluated (for example `IN` on non-JSON text).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct EvaluationError {
    /// What went wrong.
    pub message: String,
}

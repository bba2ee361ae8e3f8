use std::path::PathBuf;

/// Errors produced while loading the service configuration.
///
/// Every validation error names the offending key path (e.g.
/// `replication.connections[0].port`), so the user can find the problem in the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file (or a file it references) could not be read.
    #[error("could not read config file `{}`: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The text is not valid YAML / JSON.
    #[error("Could not parse {format} configuration file: {message}")]
    Parse { format: &'static str, message: String },
    /// The document parsed, but a value is invalid.
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

impl ConfigError {
    pub(crate) fn invalid(path: impl Into<String>, message: impl Into<String>) -> Self {
        let path = path.into();
        ConfigError::Invalid {
            path: if path.is_empty() { "<root>".to_string() } else { path },
            message: message.into(),
        }
    }

    /// The key path the error refers to, if any.
    pub fn key_path(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { path, .. } => Some(path),
            _ => None,
        }
    }
}

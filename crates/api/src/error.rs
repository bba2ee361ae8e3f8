//! Service errors in the PowerSync wire shape (`{"error": {...}}`, protocol.md §2.1, §11).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// An error returned to clients: a `PSYNC_Sxxxx` code, an HTTP status and a description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceError {
    pub code: &'static str,
    pub status: u16,
    pub description: String,
    pub details: Option<String>,
    /// Already in the errors metric (it was counted where it arose).
    counted: bool,
}

impl ServiceError {
    pub fn new(code: &'static str, status: u16, description: impl Into<String>) -> Self {
        ServiceError {
            code,
            status,
            description: description.into(),
            details: None,
            counted: false,
        }
    }

    /// Marks an error as already in the errors metric, so that sending it does not count it
    /// again.
    pub(crate) fn counted(mut self) -> Self {
        self.counted = true;
        self
    }

    /// Count the error in the errors metric, as it is sent to a client.
    pub(crate) fn record(&self) {
        if !self.counted {
            ferrosync_metrics::error(self.code);
        }
    }

    pub fn with_details(mut self, d: impl Into<String>) -> Self {
        self.details = Some(d.into());
        self
    }

    /// A 401 authorization error (`PSYNC_S21xx` / `PSYNC_S22xx`).
    pub fn unauthorized(code: &'static str, description: impl Into<String>) -> Self {
        Self::new(code, 401, description)
    }

    /// Generic internal error (`PSYNC_S2001`, 500).
    pub fn internal(description: impl Into<String>) -> Self {
        Self::new("PSYNC_S2001", 500, description)
    }

    /// Request validation error (`PSYNC_S2001`, 400).
    pub fn validation(details: impl Into<String>) -> Self {
        Self::new("PSYNC_S2001", 400, "Validation failed").with_details(details)
    }

    /// The `name` field of the JSON body: the error class name the reference uses.
    pub fn name(&self) -> &'static str {
        if self.code.starts_with("PSYNC_S21") || self.code.starts_with("PSYNC_S22") {
            "AuthorizationError"
        } else {
            "ServiceError"
        }
    }

    pub fn is_auth_error(&self) -> bool {
        self.code.starts_with("PSYNC_S21")
    }

    /// `{"error": {"name", "code", "status", "description", "details"?}}`
    pub fn to_json(&self) -> serde_json::Value {
        let mut inner = serde_json::Map::new();
        inner.insert("name".into(), self.name().into());
        inner.insert("code".into(), self.code.into());
        inner.insert("status".into(), self.status.into());
        inner.insert("description".into(), self.description.clone().into());
        if let Some(d) = &self.details {
            inner.insert("details".into(), d.clone().into());
        }
        let mut outer = serde_json::Map::new();
        outer.insert("error".into(), serde_json::Value::Object(inner));
        serde_json::Value::Object(outer)
    }

    pub fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl std::fmt::Display for ServiceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}] {}", self.code, self.description)
    }
}

impl std::error::Error for ServiceError {}

impl IntoResponse for ServiceError {
    fn into_response(self) -> Response {
        self.record();
        let body = self.to_json().to_string();
        let mut response = (self.status_code(), body).into_response();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        response
    }
}

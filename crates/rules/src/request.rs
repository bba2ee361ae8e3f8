//! Request-time inputs: the verified JWT payload and the client parameters,
//! pre-converted into the values parameter queries read.

use crate::json::{from_serde, Json};
use crate::value::SqliteValue;

/// Parameters of one sync request (connection).
#[derive(Clone, Debug)]
pub struct RequestParameters {
    pub(crate) user_id: SqliteValue,
    pub(crate) token_parameters: Vec<(String, SqliteValue)>,
    pub(crate) user_parameters: Vec<(String, SqliteValue)>,
    pub(crate) jwt_text: String,
    pub(crate) parameters_text: String,
    /// `subscription.parameters()` of the subscription being evaluated (streams).
    pub(crate) subscription_text: String,
}

/// Converts the entries of a JSON object (integers stay INTEGER, nested
/// values become JSON text).
fn object_values(v: Option<&serde_json::Value>) -> Vec<(String, SqliteValue)> {
    match v {
        Some(serde_json::Value::Object(map)) => map
            .iter()
            .map(|(k, v)| (k.clone(), from_serde(v, false).to_sqlite(false)))
            .collect(),
        _ => Vec::new(),
    }
}

impl RequestParameters {
    /// Builds request parameters from a JWT payload and optional client
    /// parameters (a JSON object).
    pub fn new(jwt_payload: serde_json::Value, client_parameters: Option<serde_json::Value>) -> Self {
        let user_id = match jwt_payload.get("sub") {
            None => SqliteValue::Null,
            Some(v) => from_serde(v, false).to_sqlite(false),
        };
        let mut token_parameters = object_values(jwt_payload.get("parameters"));
        token_parameters.retain(|(k, _)| k != "user_id");
        token_parameters.push(("user_id".to_string(), user_id.clone()));
        let user_parameters = object_values(client_parameters.as_ref());
        let jwt_text = from_serde(&jwt_payload, true).to_text();
        let parameters_text = match &client_parameters {
            Some(v @ serde_json::Value::Object(_)) => from_serde(v, true).to_text(),
            _ => Json::Object(Vec::new()).to_text(),
        };
        RequestParameters {
            user_id,
            token_parameters,
            user_parameters,
            jwt_text,
            parameters_text,
            subscription_text: "{}".to_string(),
        }
    }

    /// The same request seen from one stream subscription with its parameters.
    pub(crate) fn for_subscription(&self, parameters: Option<&serde_json::Value>) -> RequestParameters {
        let mut out = self.clone();
        if let Some(v @ serde_json::Value::Object(_)) = parameters {
            out.subscription_text = from_serde(v, true).to_text();
        }
        out
    }

    pub(crate) fn token_parameter(&self, key: &str) -> SqliteValue {
        lookup(&self.token_parameters, key)
    }

    pub(crate) fn user_parameter(&self, key: &str) -> SqliteValue {
        lookup(&self.user_parameters, key)
    }
}

fn lookup(values: &[(String, SqliteValue)], key: &str) -> SqliteValue {
    values
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .unwrap_or(SqliteValue::Null)
}

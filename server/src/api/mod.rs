//! The two front doors. Protocol only: decode, validate, call the engine, map
//! errors to gRPC codes / HTTP statuses. `generate` holds what both share.

pub mod error;
pub mod generate;
pub mod grpc;
pub mod http;
pub mod knowledge;
pub mod openai;

use axum::body::Bytes;
use serde::de::DeserializeOwned;
use serde_json::Value;

use error::ApiError;

/// Parses a JSON body, naming the offending field in the error.
pub fn parse_json<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    from_value(&parse_value(body)?)
}

/// Parses a body into a JSON value; malformed JSON (or invalid UTF-8) is an error on `body`.
pub fn parse_value(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::invalid("body", format!("malformed JSON: {e}")))
}

/// Deserializes a typed view of a parsed body; a wrong type names the field's path.
pub fn from_value<T: DeserializeOwned>(v: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        let msg = e.into_inner().to_string();
        // serde reports a missing field at its parent's path; name the field itself.
        let missing = msg.strip_prefix("missing field `").and_then(|m| m.split('`').next());
        let param = match (missing, path.is_empty()) {
            (Some(f), true) => f.to_string(),
            (Some(f), false) => format!("{path}.{f}"),
            (None, true) => "body".to_string(),
            (None, false) => path,
        };
        ApiError::invalid(param, msg)
    })
}

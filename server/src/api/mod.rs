//! The two front doors. Protocol only: decode, validate, call the engine, map
//! errors to gRPC codes / HTTP statuses. `generate` holds what both share.

pub mod error;
pub mod generate;
pub mod grpc;
pub mod http;
pub mod knowledge;
pub mod observe;
pub mod openai;

use axum::body::Bytes;
use serde::de::DeserializeOwned;

use error::ApiError;

/// Parses a JSON body, naming the offending field in the error.
pub fn parse_json<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let param = if path == "." || path.is_empty() {
            "body".to_string()
        } else {
            path
        };
        let msg = if inner.is_syntax() || inner.is_eof() {
            format!("malformed JSON: {inner}")
        } else {
            inner.to_string()
        };
        ApiError::invalid(param, msg)
    })
}

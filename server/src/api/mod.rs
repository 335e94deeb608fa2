//! The two front doors. Protocol only: decode into pipeline inputs, call the
//! [`Pipeline`](crate::pipeline::Pipeline), encode what comes back, map errors to gRPC codes /
//! HTTP statuses. One tower stack (request id, then request context) wraps both.

pub(crate) mod assistant;
pub(crate) mod error;
pub(crate) mod grpc;
mod grpc_guard;
pub(crate) mod http;
pub(crate) mod knowledge;
pub(crate) mod openai;

use axum::body::Bytes;
use serde::de::DeserializeOwned;
use serde_json::Value;

use error::ApiError;

use crate::ops::observe::Observer;
use crate::pipeline::context::RequestContext;
use crate::state::AppState;

/// The observer of one request; `ctx` is None when the request's headers were refused.
pub(crate) fn observer(
    state: &AppState,
    api: &str,
    method: &'static str,
    route: &str,
    ctx: Option<&RequestContext>,
) -> Observer {
    let (rid, tenant) = ctx.map_or(("", ""), |c| (c.request_id.as_str(), c.tenant.as_str()));
    let label = state.ops().tenant_label(Some(tenant));
    Observer::new(state.ops().clone(), api, method, route, rid, &label)
}

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

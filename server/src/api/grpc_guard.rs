//! Counts the inputs of a gRPC `Embed` call on the wire, before tonic decodes it.
//!
//! prost decodes `repeated string texts` into one `String` per entry: a 16 MiB message of
//! one-letter texts is five million allocations (hundreds of MiB) before any handler could look
//! at the count. This layer scans the protobuf encoding of the buffered message (tags and
//! lengths only, nothing allocated per entry) and refuses it with INVALID_ARGUMENT naming
//! `input` and the limit, exactly as the pipeline would. Anything it cannot read (compressed
//! frames, malformed bytes) passes through for tonic to judge.
//!
//! Tested below on hand-encoded messages; end to end in tests/e2e/pipeline.rs.

use std::task::{Context, Poll};

use axum::http::{Request, Response};
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Full, Limited};
use tonic::body::Body;
use tower::{Layer, Service};

use crate::error::ApiError;

const EMBED_PATH: &str = "/genai.v1.Inference/Embed";
/// `EmbedRequest.texts`.
const TEXTS_FIELD: u64 = 2;

#[derive(Debug, Clone, Copy)]
pub(crate) struct EmbedGuardLayer {
    pub max_inputs: usize,
    pub max_message_bytes: usize,
}

impl<S> Layer<S> for EmbedGuardLayer {
    type Service = EmbedGuard<S>;
    fn layer(&self, inner: S) -> Self::Service {
        EmbedGuard { inner, limits: *self }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct EmbedGuard<S> {
    inner: S,
    limits: EmbedGuardLayer,
}

impl<S> Service<Request<Body>> for EmbedGuard<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        if req.uri().path() != EMBED_PATH {
            return Box::pin(self.inner.call(req));
        }
        // The clone that was driven to readiness serves this call (tower's clone-and-swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let limits = self.limits;
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            // 5 bytes of gRPC framing around the message.
            let bytes = match Limited::new(body, limits.max_message_bytes + 5).collect().await {
                Ok(c) => c.to_bytes(),
                Err(_) => {
                    let status = tonic::Status::resource_exhausted(format!(
                        "message larger than server.max_message_bytes ({})",
                        limits.max_message_bytes
                    ));
                    return Ok(status.into_http());
                }
            };
            if let Some(n) = count_texts(&bytes, limits.max_inputs) {
                if n > limits.max_inputs {
                    let e = ApiError::invalid(
                        "input",
                        format!(
                            "more than {} inputs; at most {} per request (limits.max_embedding_inputs)",
                            limits.max_inputs, limits.max_inputs
                        ),
                    );
                    return Ok(tonic::Status::from(e).into_http());
                }
            }
            inner
                .call(Request::from_parts(parts, Body::new(Full::new(bytes))))
                .await
        })
    }
}

/// The number of `texts` entries in an uncompressed gRPC frame holding an `EmbedRequest`,
/// counting no further than `max + 1`; None when the frame cannot be read here.
fn count_texts(frame: &[u8], max: usize) -> Option<usize> {
    let (&flag, rest) = frame.split_first()?;
    if flag != 0 || rest.len() < 4 {
        return None;
    }
    let len = u32::from_be_bytes(rest[..4].try_into().ok()?) as usize;
    let mut msg = rest.get(4..4 + len)?;
    let mut count = 0;
    while !msg.is_empty() {
        let key = varint(&mut msg)?;
        match key & 7 {
            0 => {
                varint(&mut msg)?;
            }
            1 => msg = msg.get(8..)?,
            2 => {
                let n = usize::try_from(varint(&mut msg)?).ok()?;
                msg = msg.get(n..)?;
                if key >> 3 == TEXTS_FIELD {
                    count += 1;
                    if count > max {
                        return Some(count);
                    }
                }
            }
            5 => msg = msg.get(4..)?,
            _ => return None,
        }
    }
    Some(count)
}

fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf.split_first()?;
        *buf = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn frame(req: &genai_proto::v1::EmbedRequest) -> Vec<u8> {
        let msg = req.encode_to_vec();
        let mut f = vec![0u8];
        f.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        f.extend_from_slice(&msg);
        f
    }

    #[test]
    fn counts_texts_without_decoding_them() {
        let req = genai_proto::v1::EmbedRequest {
            model: "m".repeat(300),
            texts: vec!["a".into(), String::new(), "é".repeat(200)],
        };
        assert_eq!(count_texts(&frame(&req), 10), Some(3));
        let many = genai_proto::v1::EmbedRequest {
            model: String::new(),
            texts: vec!["a".into(); 100_000],
        };
        assert_eq!(count_texts(&frame(&many), 256), Some(257));
        // Compressed, truncated or malformed frames are left to tonic.
        let mut compressed = frame(&req);
        compressed[0] = 1;
        assert_eq!(count_texts(&compressed, 10), None);
        let f = frame(&req);
        assert_eq!(count_texts(&f[..f.len() - 1], 10), None);
        assert_eq!(count_texts(&[0, 0, 0, 0, 2, 0xff, 0xff], 10), None);
    }
}

//! Per-request accounting shared by both front doors: one [`Observer`] lives as
//! long as the request (including its response stream) and, when dropped,
//! records the request once — `genai_requests_total` / duration, the rolling
//! latency monitor, the cost monitor and the request log. Dropping it before a
//! finish (client went away) records the request as cancelled.

use std::sync::Arc;
use std::time::Instant;

use crate::ops::cost::CostMonitor;
use crate::ops::latency::LatencyMonitor;
use crate::ops::metrics::{self, MetricsHandle};
use crate::ops::request_log::{RequestLog, RequestRecord};
use genai_engine::{FinishReason, Usage};

/// The observability sinks, built once at start-up.
pub struct Ops {
    pub metrics: MetricsHandle,
    pub cost: Arc<CostMonitor>,
    pub latency: Arc<LatencyMonitor>,
    pub request_log: Option<Arc<RequestLog>>,
    /// Tenants with a configured budget; others are labelled "other" to keep label sets bounded.
    known_tenants: Vec<String>,
}

impl Ops {
    pub fn new(
        metrics: MetricsHandle,
        cost: Arc<CostMonitor>,
        latency: Arc<LatencyMonitor>,
        request_log: Option<Arc<RequestLog>>,
        known_tenants: Vec<String>,
    ) -> Self {
        Self {
            metrics,
            cost,
            latency,
            request_log,
            known_tenants,
        }
    }

    /// The metric/cost label for a caller's `x-tenant-id`: "default" when absent,
    /// the id when it has a configured budget, else "other".
    pub fn tenant_label(&self, header: Option<&str>) -> String {
        match header {
            None | Some("") => "default".into(),
            Some(t) if self.known_tenants.iter().any(|k| k == t) => t.into(),
            Some(_) => "other".into(),
        }
    }
}

pub struct Observer {
    ops: Arc<Ops>,
    start: Instant,
    first_token: Option<Instant>,
    record: RequestRecord,
    /// The gRPC code name or HTTP status, once known.
    status: Option<String>,
    /// API method label (RPC name or HTTP path).
    method: &'static str,
    /// `stage:verdict:reason` codes the safety stages add (input and output).
    safety_flags: crate::safety::Flags,
}

impl Observer {
    pub fn new(ops: Arc<Ops>, api: &str, method: &'static str, route: &str, request_id: &str, tenant: &str) -> Self {
        let record = RequestRecord {
            request_id: request_id.into(),
            tenant: tenant.into(),
            route: route.into(),
            api: api.into(),
            ..Default::default()
        };
        Self {
            ops,
            start: Instant::now(),
            first_token: None,
            record,
            status: None,
            method,
            safety_flags: Default::default(),
        }
    }

    /// Where the safety stages of this request record their verdict codes.
    pub fn safety_flags(&self) -> crate::safety::Flags {
        self.safety_flags.clone()
    }

    /// The route, once known (the assistant's `auto` mode routes after the observer exists).
    pub fn set_route(&mut self, route: &str) {
        self.record.route = route.into();
    }

    pub fn set_model(&mut self, model: &str, prompt: &str) {
        self.record.model = model.into();
        self.record.prompt = prompt.into();
    }

    pub fn on_text(&mut self, text: &str) {
        self.first_token.get_or_insert_with(Instant::now);
        self.record.answer.push_str(text);
    }

    pub fn on_finish(&mut self, reason: FinishReason, usage: &Usage) {
        self.record.finish_reason = Some(reason.as_str().into());
        self.record.prompt_tokens = usage.prompt_tokens;
        self.record.completion_tokens = usage.completion_tokens;
        self.record.cached_tokens = usage.cached_prompt_tokens;
        self.on_ok();
    }

    /// Marks the request finished without generation (embeddings, tokenize ...).
    pub fn on_ok(&mut self) {
        if self.status.is_none() {
            self.status = Some(self.ok_status().into());
        }
    }

    /// Marks the request failed, with the status each door answers it with.
    pub fn on_error(&mut self, (grpc, http): (tonic::Code, u16)) {
        self.status = Some(if self.record.api == "grpc" {
            grpc_code_name(grpc)
        } else {
            http.to_string()
        });
    }

    fn ok_status(&self) -> &'static str {
        if self.record.api == "grpc" {
            "OK"
        } else {
            "200"
        }
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        let elapsed = self.start.elapsed();
        let status = self.status.take().unwrap_or_else(|| {
            // Dropped before any outcome: the client went away mid-request.
            self.record.finish_reason.get_or_insert_with(|| "cancelled".into());
            if self.record.api == "grpc" { "CANCELLED" } else { "499" }.into()
        });
        let r = &mut self.record;
        metrics::record_request(&r.api, self.method, &status, &r.tenant, elapsed);
        self.ops.latency.observe(&r.route, elapsed);
        if r.prompt_tokens + r.completion_tokens > 0 {
            let secs = elapsed.as_secs_f64();
            self.ops.cost.record(
                &r.model,
                &r.tenant,
                r.prompt_tokens.into(),
                r.completion_tokens.into(),
                secs,
            );
        }
        if let Some(log) = &self.ops.request_log {
            r.safety_flags = std::mem::take(
                &mut self
                    .safety_flags
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            );
            r.status = status;
            r.e2e_ms = elapsed.as_secs_f64() * 1e3;
            r.ttft_ms = self.first_token.map(|t| (t - self.start).as_secs_f64() * 1e3);
            log.log(std::mem::take(r));
        }
    }
}

/// "INVALID_ARGUMENT" for `Code::InvalidArgument`: the canonical gRPC spelling.
fn grpc_code_name(code: tonic::Code) -> String {
    let mut out = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn grpc_code_names_are_canonical() {
        assert_eq!(super::grpc_code_name(tonic::Code::InvalidArgument), "INVALID_ARGUMENT");
        assert_eq!(
            super::grpc_code_name(tonic::Code::ResourceExhausted),
            "RESOURCE_EXHAUSTED"
        );
        assert_eq!(super::grpc_code_name(tonic::Code::Ok), "OK");
    }
}

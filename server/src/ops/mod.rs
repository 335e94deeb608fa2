//! Observability: Prometheus metrics, cost and latency monitors,
//! request ids with per-request tracing spans, and the JSON-lines request log.
//!
//! Each submodule is a library the API servers and the engine call into; none
//! of them owns a listener or a runtime. Invariants shared by all of them:
//! nothing here blocks a request path on disk or on a lock held across I/O,
//! and nothing panics on bad input (label values, ids and texts are escaped,
//! bounded or hashed). Metric names live in one catalogue
//! ([`metrics::CATALOGUE`]) that the README table and the Grafana dashboard
//! are checked against in tests.
//!
//! Tests: unit tests per module against non-global recorders
//! (`metrics::with_local_recorder`), a real axum router and a real tonic
//! server for request ids, temporary directories for the request log, and —
//! where installed — `promtool check metrics` and a real Prometheus server
//! scraping the exposition.

pub mod cost;
pub mod latency;
pub mod metrics;
pub mod observe;
pub mod request_id;
pub mod request_log;

#[cfg(test)]
pub(crate) mod test_support {
    //! Captures `tracing` output as parsed JSON lines for assertions.

    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    pub struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Captured {
        /// Every captured log line, parsed; panics (test-only) on a non-JSON line.
        pub fn lines(&self) -> Vec<serde_json::Value> {
            let buf = self.0.lock().unwrap();
            String::from_utf8_lossy(&buf)
                .lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("log line is not JSON ({e}): {l}")))
                .collect()
        }
    }

    impl Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A JSON subscriber like `telemetry::init` builds for `log.format = "json"`, writing into the returned buffer.
    pub fn json_subscriber() -> (impl tracing::Subscriber + Send + Sync, Captured) {
        let captured = Captured::default();
        let writer = captured.clone();
        let sub = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || writer.clone())
            .finish();
        (sub, captured)
    }
}

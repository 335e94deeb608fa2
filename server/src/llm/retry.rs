//! Retries of a remote call before its first token: which failures are retried, how long to
//! wait, and how many retries a backend may spend.
//!
//! An attempt ([`Failure`] when it fails) ends at the upstream's first generated text; after
//! that nothing is ever retried (the remote stream ends with an error instead), so a client
//! never sees text twice or two answers spliced. Retried: connection failures and the connect
//! timeout, the first-token timeout, a stream that broke or was malformed before any text, and
//! HTTP 408, 429 and 5xx. Not retried: the other 4xx (the request's fault, or the backend's
//! configuration: 401/403/404 go to the fallback chain instead) and an open circuit.
//!
//! Waits come from `backon`'s exponential backoff (`initial_backoff`, doubling, at most
//! `max_backoff`) with FULL jitter applied in `.adjust()`: each wait is drawn uniformly from
//! zero to that bound (backon's own jitter only adds to the bound). A `Retry-After`
//! (`retry-after-ms`, delta-seconds or an HTTP date) replaces the draw, capped at
//! `retry_after_cap`. A retry budget per backend (a token bucket: each request adds
//! `retry_budget_ratio`, each retry takes one, at most `retry_budget_burst` saved) keeps
//! retries from multiplying the load on a failing upstream.
//!
//! Tested: `tests` below (classification, jitter bounds, the budget) and, against a real HTTP
//! server with tokio's paused clock, in `remote`'s tests (attempt counts and exact delays).

use std::future::Future;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::backends::BackendConfig;
use crate::error::ApiError;
use crate::ops::metrics::BACKEND_RETRIES;

/// Why one attempt at a remote backend failed before its first token.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Failure {
    /// No connection (refused, unreachable, TLS, or `connect_timeout`).
    Connect(String),
    /// `first_token_timeout` passed without text.
    FirstTokenTimeout(Duration),
    /// The upstream answered with an error status.
    Status {
        code: u16,
        retry_after: Option<Duration>,
        message: String,
    },
    /// The response broke, ended or was malformed before any text.
    Stream(String),
    /// The circuit breaker refused the call.
    CircuitOpen,
}

impl Failure {
    pub(crate) fn retryable(&self) -> bool {
        match self {
            Failure::Connect(_) | Failure::FirstTokenTimeout(_) | Failure::Stream(_) => true,
            Failure::Status { code, .. } => matches!(code, 408 | 429 | 500..=599),
            Failure::CircuitOpen => false,
        }
    }

    /// Whether the upstream, not the request, is at fault (what the circuit breaker counts).
    pub(crate) fn backend_fault(&self) -> bool {
        !self.request_fault() && *self != Failure::CircuitOpen
    }

    /// A 4xx that says the request itself is wrong: no retry, no fallback (another backend
    /// would refuse it too).
    fn request_fault(&self) -> bool {
        matches!(self, Failure::Status { code, .. }
            if (400..500).contains(code) && !matches!(code, 401 | 403 | 404 | 408 | 429))
    }

    pub(crate) fn retry_after(&self) -> Option<Duration> {
        match self {
            Failure::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The `outcome` label of `genai_backend_attempts_total`.
    pub(crate) fn outcome(&self) -> &'static str {
        match self {
            Failure::Connect(_) => "connect_error",
            Failure::FirstTokenTimeout(_) => "first_token_timeout",
            Failure::Status { code: 429, .. } => "rate_limited",
            Failure::Status { code: 500..=599, .. } => "server_error",
            Failure::Status { .. } => "client_error",
            Failure::Stream(_) => "stream_error",
            Failure::CircuitOpen => "circuit_open",
        }
    }

    /// What the client is told once no retry (or fallback) is left. A request the upstream
    /// refused as malformed is the client's error (400); anything else is the backend's (503,
    /// or 429 for its rate limit).
    pub(crate) fn into_api_error(self, backend: &str) -> ApiError {
        if self.request_fault() {
            let Failure::Status { code, message, .. } = self else {
                unreachable!("request_fault is a status")
            };
            return ApiError::invalid(
                "request",
                format!("backend `{backend}` refused the request (HTTP {code}): {message}"),
            );
        }
        match self {
            Failure::Status {
                code: 429, retry_after, ..
            } => ApiError::Overloaded {
                retry_after: retry_after.unwrap_or(Duration::from_secs(1)),
            },
            Failure::Connect(e) => ApiError::Unavailable(format!("backend `{backend}`: cannot connect: {e}")),
            Failure::FirstTokenTimeout(d) => ApiError::Unavailable(format!(
                "backend `{backend}`: no text within {} (first_token_timeout)",
                humantime::format_duration(d)
            )),
            Failure::Status { code, message, .. } => {
                ApiError::Unavailable(format!("backend `{backend}` answered HTTP {code}: {message}"))
            }
            Failure::Stream(e) => ApiError::Unavailable(format!("backend `{backend}`: {e}")),
            Failure::CircuitOpen => ApiError::Unavailable(format!("backend `{backend}`: circuit open")),
        }
    }
}

/// A token bucket of retries: each request deposits `ratio`, each retry withdraws one.
pub(crate) struct RetryBudget {
    ratio: f64,
    burst: f64,
    balance: Mutex<f64>,
}

impl RetryBudget {
    pub(crate) fn new(ratio: f64, burst: usize) -> Self {
        Self {
            ratio,
            burst: burst as f64,
            balance: Mutex::new(burst as f64),
        }
    }

    fn deposit(&self) {
        let mut b = self.balance.lock();
        *b = (*b + self.ratio).min(self.burst);
    }

    fn withdraw(&self) -> bool {
        let mut b = self.balance.lock();
        if *b >= 1.0 {
            *b -= 1.0;
            true
        } else {
            false
        }
    }
}

pub(crate) struct RetryPolicy {
    backend: String,
    max_retries: usize,
    initial_backoff: Duration,
    max_backoff: Duration,
    retry_after_cap: Duration,
    budget: RetryBudget,
    rng: Mutex<StdRng>,
}

impl RetryPolicy {
    pub(crate) fn new(cfg: &BackendConfig) -> Self {
        Self {
            backend: cfg.name.clone(),
            max_retries: cfg.max_retries,
            initial_backoff: cfg.initial_backoff,
            max_backoff: cfg.max_backoff,
            retry_after_cap: cfg.retry_after_cap,
            budget: RetryBudget::new(cfg.retry_budget_ratio, cfg.retry_budget_burst),
            rng: Mutex::new(StdRng::from_os_rng()),
        }
    }

    /// Full jitter: uniform in [0, bound].
    fn jitter(&self, bound: Duration) -> Duration {
        bound.mul_f64(self.rng.lock().random_range(0.0..=1.0))
    }

    /// The wait before the next retry, or `None` to stop: `bound` is backon's exponential
    /// bound (`None` once `max_retries` are spent).
    fn delay(&self, failure: &Failure, bound: Option<Duration>) -> Option<Duration> {
        let bound = bound?;
        if !self.budget.withdraw() {
            tracing::warn!(backend = %self.backend, "retry budget exhausted; not retrying");
            return None;
        }
        Some(match failure.retry_after() {
            Some(ra) => ra.min(self.retry_after_cap),
            None => self.jitter(bound),
        })
    }

    /// Runs `attempt` until it succeeds, fails for good, or the retries (or the budget) are
    /// spent; the last failure is returned.
    pub(crate) async fn run<T, Fut>(&self, attempt: impl FnMut() -> Fut) -> Result<T, Failure>
    where
        Fut: Future<Output = Result<T, Failure>>,
    {
        self.budget.deposit();
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.initial_backoff)
            .with_max_delay(self.max_backoff)
            .with_factor(2.0)
            .with_max_times(self.max_retries);
        attempt
            .retry(backoff)
            .when(Failure::retryable)
            .adjust(|f, bound| self.delay(f, bound))
            .notify(|f, wait| {
                metrics::counter!(BACKEND_RETRIES, "backend" => self.backend.clone()).increment(1);
                tracing::info!(backend = %self.backend, failure = f.outcome(), ?wait, "retrying");
            })
            .await
    }
}

/// The wait a 429/503 asks for: `retry-after-ms` (OpenAI), else `Retry-After` as seconds or an
/// HTTP date.
pub(crate) fn parse_retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let get = |k: &str| headers.get(k).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(ms) = get("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        return Duration::try_from_secs_f64(ms / 1000.0).ok();
    }
    let v = get("retry-after")?;
    if let Ok(secs) = v.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).ok();
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(std::time::SystemTime::now()).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> Failure {
        Failure::Status {
            code,
            retry_after: None,
            message: String::new(),
        }
    }

    #[test]
    fn classification() {
        for f in [
            Failure::Connect("refused".into()),
            Failure::FirstTokenTimeout(Duration::from_secs(1)),
            Failure::Stream("reset".into()),
            status(408),
            status(429),
            status(500),
            status(503),
        ] {
            assert!(f.retryable() && f.backend_fault(), "{f:?}");
        }
        for code in [401, 404] {
            assert!(!status(code).retryable() && status(code).backend_fault());
            assert!(matches!(status(code).into_api_error("b"), ApiError::Unavailable(_)));
        }
        assert!(!status(400).retryable() && !status(400).backend_fault());
        assert!(matches!(status(422).into_api_error("b"), ApiError::Invalid { .. }));
        assert!(!Failure::CircuitOpen.retryable() && !Failure::CircuitOpen.backend_fault());
        assert!(matches!(status(429).into_api_error("b"), ApiError::Overloaded { .. }));
    }

    #[test]
    fn full_jitter_stays_within_the_bound_and_spreads() {
        let p = RetryPolicy::new(&BackendConfig::default());
        let bound = Duration::from_millis(400);
        let draws: Vec<Duration> = (0..2000).map(|_| p.jitter(bound)).collect();
        assert!(draws.iter().all(|d| *d <= bound));
        // Full jitter, not "bound + something": draws cover the low and the high end.
        assert!(draws.iter().any(|d| *d < bound / 10) && draws.iter().any(|d| *d > bound * 9 / 10));
    }

    #[test]
    fn the_budget_refills_by_ratio_up_to_the_burst() {
        let b = RetryBudget::new(0.5, 2);
        assert!(b.withdraw() && b.withdraw() && !b.withdraw());
        b.deposit();
        assert!(!b.withdraw());
        b.deposit();
        assert!(b.withdraw());
        for _ in 0..10 {
            b.deposit();
        }
        assert!(b.withdraw() && b.withdraw() && !b.withdraw());
    }

    #[test]
    fn retry_after_forms() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("retry-after", "3".parse().unwrap());
        assert_eq!(parse_retry_after(&h), Some(Duration::from_secs(3)));
        h.insert("retry-after-ms", "250".parse().unwrap());
        assert_eq!(parse_retry_after(&h), Some(Duration::from_millis(250)));
        let mut h = reqwest::header::HeaderMap::new();
        let later = std::time::SystemTime::now() + Duration::from_secs(120);
        h.insert("retry-after", httpdate::fmt_http_date(later).parse().unwrap());
        let d = parse_retry_after(&h).unwrap();
        assert!(d > Duration::from_secs(100) && d <= Duration::from_secs(120), "{d:?}");
        h.insert("retry-after", "soon".parse().unwrap());
        assert_eq!(parse_retry_after(&h), None);
    }
}

//! Rolling latency quantiles (p50/p95/p99) per route and SLO alerts.
//!
//! Each route keeps a window of its recent latencies bounded both by age
//! (`window_secs`) and by count (`max_samples`, oldest leave first).
//! Quantiles are exact nearest-rank values over the window (a sort of at most
//! `max_samples` floats), computed at most once per `eval_interval_ms` per
//! route on the observing thread, or by [`LatencyMonitor::evaluate`] from a
//! timer so gauges decay when traffic stops. They are exported as
//! `genai_route_latency_seconds{route,percentile}` (NaN for an empty window).
//!
//! SLO invariant: a route configured under `[ops.latency.slo.<route>]` with at
//! least `min_samples` samples is in breach for quantile q while its rolling q
//! exceeds the threshold; entering breach logs one `warn!` (target
//! `genai::slo`) and adds 1 to `genai_slo_breaches_total{route,percentile}`;
//! staying in breach adds nothing; leaving it logs an `info!` and re-arms.
//!
//! Tests: nearest-rank quantiles on known data, eviction by age and by count,
//! breach counted once per episode with re-arming, min_samples respected,
//! gauges checked on a local recorder.
//!
//! The label is `percentile` ("p50" | "p95" | "p99"), not `quantile`: Prometheus
//! reserves `quantile` for summaries and `promtool check metrics` rejects it here.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::config::{LatencyConfig, SloThresholds};
use crate::ops::metrics;

/// Label values of the exported percentiles, in `[p50, p95, p99]` order.
const PERCENTILES: [&str; 3] = ["p50", "p95", "p99"];

/// Rolling quantiles of one route, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouteQuantiles {
    pub count: usize,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
}

#[derive(Default)]
struct Window {
    samples: VecDeque<(Instant, f64)>,
    last_eval: Option<Instant>,
    /// Per entry of PERCENTILES: currently in breach.
    breached: [bool; 3],
}

pub struct LatencyMonitor {
    window: Duration,
    max_samples: usize,
    min_samples: usize,
    eval_interval: Duration,
    slo: HashMap<String, SloThresholds>,
    routes: Mutex<HashMap<String, Window>>,
}

impl LatencyMonitor {
    pub fn new(cfg: &LatencyConfig) -> Self {
        Self {
            window: Duration::from_secs(cfg.window_secs),
            max_samples: cfg.max_samples.max(1),
            min_samples: cfg.min_samples.max(1),
            eval_interval: Duration::from_millis(cfg.eval_interval_ms),
            slo: cfg.slo.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            routes: Mutex::new(HashMap::new()),
        }
    }

    /// Adds one latency sample for `route` (a fixed route name, not a raw path: it becomes a label).
    pub fn observe(&self, route: &str, latency: Duration) {
        self.observe_at(route, latency, Instant::now());
    }

    /// [`observe`](Self::observe) at an explicit instant.
    pub fn observe_at(&self, route: &str, latency: Duration, now: Instant) {
        let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        let w = match routes.get_mut(route) {
            Some(w) => w,
            None => routes.entry(route.to_owned()).or_default(),
        };
        w.samples.push_back((now, latency.as_secs_f64()));
        while w.samples.len() > self.max_samples {
            w.samples.pop_front();
        }
        let due = w
            .last_eval
            .is_none_or(|t| now.saturating_duration_since(t) >= self.eval_interval);
        if due {
            self.evaluate_route(route, w, now);
        }
    }

    /// Re-evaluates every route now: evicts old samples, updates gauges, checks SLOs.
    pub fn evaluate(&self) {
        self.evaluate_at(Instant::now());
    }

    /// [`evaluate`](Self::evaluate) at an explicit instant.
    pub fn evaluate_at(&self, now: Instant) {
        let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        for (route, w) in routes.iter_mut() {
            self.evaluate_route(route, w, now);
        }
    }

    /// Calls [`evaluate`](Self::evaluate) every `period` until the task is dropped or aborted.
    pub async fn run(self: Arc<Self>, period: Duration) {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.evaluate();
        }
    }

    /// The route's quantiles over the window as of `now` (None if it has no samples).
    #[cfg(test)]
    pub fn quantiles_at(&self, route: &str, now: Instant) -> Option<RouteQuantiles> {
        let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        let w = routes.get_mut(route)?;
        self.evict(w, now);
        quantiles(&w.samples)
    }

    fn evict(&self, w: &mut Window, now: Instant) {
        while w
            .samples
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > self.window)
        {
            w.samples.pop_front();
        }
    }

    fn evaluate_route(&self, route: &str, w: &mut Window, now: Instant) {
        self.evict(w, now);
        w.last_eval = Some(now);
        let q = quantiles(&w.samples);
        let values = q.map_or([f64::NAN; 3], |q| [q.p50, q.p95, q.p99]);
        for (label, v) in PERCENTILES.iter().zip(values) {
            ::metrics::gauge!(metrics::ROUTE_LATENCY, "route" => route.to_owned(), "percentile" => *label).set(v);
        }
        let Some(slo) = self.slo.get(route) else { return };
        let judged = q.is_some_and(|q| q.count >= self.min_samples);
        for (i, (threshold, label)) in [slo.p50, slo.p95, slo.p99].into_iter().zip(PERCENTILES).enumerate() {
            let Some(threshold) = threshold else { continue };
            let value = values[i];
            let breach = judged && value > threshold;
            if breach && !w.breached[i] {
                ::metrics::counter!(metrics::SLO_BREACHES, "route" => route.to_owned(), "percentile" => label)
                    .increment(1);
                tracing::warn!(
                    target: "genai::slo",
                    route,
                    percentile = label,
                    value_seconds = value,
                    threshold_seconds = threshold,
                    samples = q.map_or(0, |q| q.count),
                    "latency SLO breached"
                );
            } else if !breach && w.breached[i] && judged {
                tracing::info!(target: "genai::slo", route, percentile = label, value_seconds = value,
                    threshold_seconds = threshold, "latency SLO recovered");
            }
            // Too few samples to judge: keep the current state rather than flapping.
            if judged {
                w.breached[i] = breach;
            }
        }
    }
}

/// Nearest-rank quantiles of the window.
fn quantiles(samples: &VecDeque<(Instant, f64)>) -> Option<RouteQuantiles> {
    if samples.is_empty() {
        return None;
    }
    let mut v: Vec<f64> = samples.iter().map(|(_, s)| *s).collect();
    v.sort_unstable_by(f64::total_cmp);
    let rank = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    Some(RouteQuantiles {
        count: v.len(),
        p50: rank(0.5),
        p95: rank(0.95),
        p99: rank(0.99),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_support::json_subscriber;
    use std::collections::BTreeMap;

    fn cfg(window_secs: u64, max_samples: usize, p99: Option<f64>) -> LatencyConfig {
        LatencyConfig {
            window_secs,
            max_samples,
            min_samples: 10,
            eval_interval_ms: 0,
            slo: BTreeMap::from([(
                "chat".to_owned(),
                SloThresholds {
                    p50: None,
                    p95: None,
                    p99,
                },
            )]),
        }
    }

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn series(text: &str, prefix: &str) -> Option<String> {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix).map(|v| v.trim().to_owned()))
    }

    #[test]
    fn nearest_rank_quantiles() {
        let m = LatencyMonitor::new(&cfg(60, 10_000, None));
        let t0 = Instant::now();
        for i in 1..=100 {
            m.observe_at("chat", ms(i * 10), t0);
        }
        let q = m.quantiles_at("chat", t0).unwrap();
        assert_eq!((q.count, q.p50, q.p95, q.p99), (100, 0.5, 0.95, 0.99));
        assert!(m.quantiles_at("nope", t0).is_none());
    }

    #[test]
    fn window_bounded_by_age_and_count() {
        let m = LatencyMonitor::new(&cfg(60, 5, None));
        let t0 = Instant::now();
        for i in 1..=8 {
            m.observe_at("chat", ms(i), t0);
        }
        // Only the last 5 (4..=8 ms) remain.
        let q = m.quantiles_at("chat", t0).unwrap();
        assert_eq!((q.count, q.p50), (5, 0.006));
        m.observe_at("chat", ms(100), t0 + Duration::from_secs(30));
        // At t0+61 s the first five are older than 60 s; only the 100 ms one stays.
        let q = m.quantiles_at("chat", t0 + Duration::from_secs(61)).unwrap();
        assert_eq!((q.count, q.p99), (1, 0.1));
        assert!(m.quantiles_at("chat", t0 + Duration::from_secs(200)).is_none());
    }

    #[test]
    fn breach_is_counted_once_per_episode_and_gauges_exported() {
        let rec = metrics::local_recorder().unwrap();
        let (sub, logs) = json_subscriber();
        let m = LatencyMonitor::new(&cfg(10, 10_000, Some(0.5)));
        let t0 = Instant::now();
        tracing::subscriber::with_default(sub, || {
            ::metrics::with_local_recorder(&rec, || {
                // 9 slow samples: below min_samples, no verdict yet.
                for _ in 0..9 {
                    m.observe_at("chat", ms(900), t0);
                }
                assert!(!rec.handle().render().contains("genai_slo_breaches_total"));
                // 10th: judged, p99 = 0.9 > 0.5 → one breach; more slow samples add none.
                for _ in 0..20 {
                    m.observe_at("chat", ms(900), t0);
                }
                // Window passes, fast traffic: recovery, then a second episode.
                for _ in 0..20 {
                    m.observe_at("chat", ms(10), t0 + Duration::from_secs(20));
                }
                for _ in 0..20 {
                    m.observe_at("chat", ms(900), t0 + Duration::from_secs(21));
                }
            })
        });
        let text = rec.handle().render();
        assert_eq!(
            series(&text, "genai_slo_breaches_total{route=\"chat\",percentile=\"p99\"}").as_deref(),
            Some("2"),
            "{text}"
        );
        assert_eq!(
            series(&text, "genai_route_latency_seconds{route=\"chat\",percentile=\"p99\"}").as_deref(),
            Some("0.9"),
            "{text}"
        );
        let lines = logs.lines();
        let breached = lines.iter().filter(|l| l["message"] == "latency SLO breached").count();
        let recovered = lines.iter().filter(|l| l["message"] == "latency SLO recovered").count();
        assert_eq!((breached, recovered), (2, 1), "{lines:?}");
        let first = lines.iter().find(|l| l["message"] == "latency SLO breached").unwrap();
        assert_eq!(
            (first["route"].as_str(), first["percentile"].as_str()),
            (Some("chat"), Some("p99"))
        );
        assert_eq!(first["threshold_seconds"], 0.5);
    }

    #[test]
    fn evaluate_decays_gauges_to_nan_when_traffic_stops() {
        let rec = metrics::local_recorder().unwrap();
        let m = LatencyMonitor::new(&cfg(1, 100, None));
        let t0 = Instant::now();
        ::metrics::with_local_recorder(&rec, || {
            m.observe_at("rag", ms(50), t0);
            m.evaluate_at(t0 + Duration::from_secs(5));
        });
        let text = rec.handle().render();
        assert_eq!(
            series(&text, "genai_route_latency_seconds{route=\"rag\",percentile=\"p50\"}").as_deref(),
            Some("NaN"),
            "{text}"
        );
    }
}

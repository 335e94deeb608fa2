//! Cost accounting per model and tenant from the `[ops.cost]` price table,
//! with per-tenant budgets.
//!
//! [`CostMonitor::record`] prices one finished request (prompt and completion
//! tokens per 1k, GPU-seconds for local models), adds it to
//! `genai_cost_usd_total{model,tenant,kind}` and to the tenant's running spend
//! in the current budget period. Invariant: a tenant's budget alert fires
//! exactly once per crossing — on the record that takes its spend from below
//! the budget to at or above it — as a `warn!` event (target `genai::cost`,
//! fields tenant/budget_usd/spent_usd/model) and
//! `genai_tenant_budget_exceeded_total{tenant}`; spend resets at each period
//! start (`budget_period_secs`, 0 = never), re-arming the alert. The state is
//! one short mutex section per record; no I/O under it.
//!
//! Tests: alerts at the budget, not before, once; period reset re-arms;
//! prices multiply as configured; counters and log events checked against a
//! local recorder and a captured JSON subscriber.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::config::{CostConfig, Price};
use crate::ops::metrics::{self, FloatCounters};

/// The cost of one request, in USD, and where its tenant stands.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Charge {
    pub prompt_usd: f64,
    pub completion_usd: f64,
    pub gpu_usd: f64,
    pub total_usd: f64,
    /// The tenant's spend in the current period, this request included.
    pub tenant_spend_usd: f64,
    /// True only on the record that crossed the tenant's budget.
    pub crossed_budget: bool,
}

#[derive(Default)]
struct Spend {
    usd: f64,
    alerted: bool,
}

struct State {
    period_start: Instant,
    tenants: HashMap<String, Spend>,
    unpriced_warned: HashSet<String>,
}

pub struct CostMonitor {
    prices: BTreeMap<String, Price>,
    budgets: BTreeMap<String, f64>,
    period: Option<Duration>,
    counters: Arc<FloatCounters>,
    state: Mutex<State>,
}

impl CostMonitor {
    /// A monitor exporting into the process-wide float counters that `/metrics` renders.
    pub fn new(cfg: &CostConfig) -> Self {
        Self::with_counters(cfg, metrics::global_float_counters())
    }

    /// A monitor exporting into `counters` (tests, or a separate exposition).
    pub fn with_counters(cfg: &CostConfig, counters: Arc<FloatCounters>) -> Self {
        Self {
            prices: cfg.prices.clone(),
            budgets: cfg.budgets.clone(),
            period: (cfg.budget_period_secs > 0).then(|| Duration::from_secs(cfg.budget_period_secs)),
            counters,
            state: Mutex::new(State {
                period_start: Instant::now(),
                tenants: HashMap::new(),
                unpriced_warned: HashSet::new(),
            }),
        }
    }

    /// Prices and records one request; see the module doc for the alert rule.
    pub fn record(
        &self,
        model: &str,
        tenant: &str,
        prompt_tokens: u64,
        completion_tokens: u64,
        gpu_seconds: f64,
    ) -> Charge {
        self.record_at(
            model,
            tenant,
            prompt_tokens,
            completion_tokens,
            gpu_seconds,
            Instant::now(),
        )
    }

    /// [`record`](Self::record) at an explicit instant (budget periods are measured from construction).
    pub fn record_at(
        &self,
        model: &str,
        tenant: &str,
        prompt_tokens: u64,
        completion_tokens: u64,
        gpu_seconds: f64,
        now: Instant,
    ) -> Charge {
        let price = self.prices.get(model).copied();
        let p = price.unwrap_or_default();
        // A bad gpu_seconds (NaN, negative) from a caller must not poison the running totals.
        let gpu_seconds = if gpu_seconds.is_finite() && gpu_seconds > 0.0 {
            gpu_seconds
        } else {
            0.0
        };
        let prompt_usd = prompt_tokens as f64 / 1000.0 * p.prompt_per_1k;
        let completion_usd = completion_tokens as f64 / 1000.0 * p.completion_per_1k;
        let gpu_usd = gpu_seconds * p.gpu_second;
        let total_usd = prompt_usd + completion_usd + gpu_usd;
        for (kind, usd) in [("prompt", prompt_usd), ("completion", completion_usd), ("gpu", gpu_usd)] {
            if usd > 0.0 {
                self.counters.add(
                    metrics::COST_USD,
                    &[("model", model), ("tenant", tenant), ("kind", kind)],
                    usd,
                );
            }
        }

        let budget = self.budgets.get(tenant).copied();
        let (tenant_spend_usd, crossed_budget, warn_unpriced) = {
            let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(period) = self.period {
                // Whole periods since construction: spend and alerts reset together.
                while now.saturating_duration_since(st.period_start) >= period {
                    st.period_start += period;
                    st.tenants.clear();
                }
            }
            let warn_unpriced = price.is_none() && st.unpriced_warned.insert(model.to_owned());
            let spend = st.tenants.entry(tenant.to_owned()).or_default();
            spend.usd += total_usd;
            let crossed = match budget {
                Some(b) if spend.usd >= b && !spend.alerted => {
                    spend.alerted = true;
                    true
                }
                _ => false,
            };
            (spend.usd, crossed, warn_unpriced)
        };

        if warn_unpriced {
            tracing::warn!(target: "genai::cost", model, "model has no entry in ops.cost.prices; its requests cost 0");
        }
        if let Some(b) = budget {
            ::metrics::gauge!(metrics::TENANT_BUDGET_USED_RATIO, "tenant" => tenant.to_owned())
                .set(tenant_spend_usd / b);
            if crossed_budget {
                ::metrics::counter!(metrics::TENANT_BUDGET_EXCEEDED, "tenant" => tenant.to_owned()).increment(1);
                tracing::warn!(
                    target: "genai::cost",
                    tenant,
                    budget_usd = b,
                    spent_usd = tenant_spend_usd,
                    model,
                    "tenant budget exceeded"
                );
            }
        }
        Charge {
            prompt_usd,
            completion_usd,
            gpu_usd,
            total_usd,
            tenant_spend_usd,
            crossed_budget,
        }
    }

    /// The tenant's spend in the current budget period (as of the last record).
    #[cfg(test)]
    pub fn tenant_spend(&self, tenant: &str) -> f64 {
        let st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        st.tenants.get(tenant).map_or(0.0, |s| s.usd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_support::json_subscriber;

    fn cfg(budget: f64, period_secs: u64) -> CostConfig {
        CostConfig {
            prices: BTreeMap::from([(
                "m".to_owned(),
                Price {
                    prompt_per_1k: 1.0,
                    completion_per_1k: 2.0,
                    gpu_second: 0.5,
                },
            )]),
            budgets: BTreeMap::from([("acme".to_owned(), budget)]),
            budget_period_secs: period_secs,
        }
    }

    fn counter_value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
    }

    #[test]
    fn prices_apply_per_kind() {
        let floats = Arc::new(FloatCounters::new());
        let m = CostMonitor::with_counters(&cfg(100.0, 0), floats.clone());
        let c = m.record("m", "acme", 1500, 250, 2.0);
        assert_eq!((c.prompt_usd, c.completion_usd, c.gpu_usd), (1.5, 0.5, 1.0));
        assert_eq!(c.total_usd, 3.0);
        let labels = |kind| [("model", "m"), ("tenant", "acme"), ("kind", kind)];
        assert_eq!(floats.get(metrics::COST_USD, &labels("prompt")), 1.5);
        assert_eq!(floats.get(metrics::COST_USD, &labels("gpu")), 1.0);
        // Unknown model: free, recorded nowhere, no panic; bad gpu seconds ignored.
        let c = m.record("other", "acme", 1000, 1000, f64::NAN);
        assert_eq!(c.total_usd, 0.0);
        assert_eq!(m.tenant_spend("acme"), 3.0);
    }

    #[test]
    fn alert_fires_at_the_budget_not_before_and_once() {
        let rec = metrics::local_recorder().unwrap();
        let (sub, logs) = json_subscriber();
        let m = CostMonitor::with_counters(&cfg(10.0, 0), Arc::new(FloatCounters::new()));
        let crossings: Vec<bool> = tracing::subscriber::with_default(sub, || {
            ::metrics::with_local_recorder(&rec, || {
                // 4 USD per request (1k prompt + 1k completion + 2 GPU-s): 4, 8, 12, 16.
                (0..4)
                    .map(|_| m.record("m", "acme", 1000, 1000, 2.0).crossed_budget)
                    .collect()
            })
        });
        assert_eq!(crossings, [false, false, true, false]);
        assert!(m.tenant_spend("acme") >= 10.0, "spend reached the budget");
        let alerts: Vec<_> = logs
            .lines()
            .into_iter()
            .filter(|l| l["message"] == "tenant budget exceeded")
            .collect();
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        assert_eq!(alerts[0]["tenant"], "acme");
        assert_eq!(alerts[0]["budget_usd"], 10.0);
        assert_eq!(alerts[0]["spent_usd"], 12.0);
        assert_eq!(alerts[0]["level"], "WARN");
        let text = rec.handle().render();
        assert_eq!(
            counter_value(&text, "genai_tenant_budget_exceeded_total{tenant=\"acme\"}"),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            counter_value(&text, "genai_tenant_budget_used_ratio{tenant=\"acme\"}"),
            Some(1.6),
            "{text}"
        );
    }

    #[test]
    fn exactly_reaching_the_budget_alerts_and_other_tenants_are_separate() {
        let m = CostMonitor::with_counters(&cfg(4.0, 0), Arc::new(FloatCounters::new()));
        assert!(!m.record("m", "other", 100_000, 0, 0.0).crossed_budget); // no budget, never alerts
        assert!(!m.record("m", "acme", 1000, 1000, 1.0).crossed_budget); // 3.5
        assert!(m.record("m", "acme", 0, 0, 1.0).crossed_budget); // exactly 4.0
    }

    #[test]
    fn a_new_budget_period_resets_spend_and_rearms_the_alert() {
        let m = CostMonitor::with_counters(&cfg(5.0, 60), Arc::new(FloatCounters::new()));
        let t0 = Instant::now();
        assert!(m.record_at("m", "acme", 0, 0, 12.0, t0).crossed_budget); // 6 USD
        assert!(
            !m.record_at("m", "acme", 0, 0, 12.0, t0 + Duration::from_secs(30))
                .crossed_budget
        );
        let c = m.record_at("m", "acme", 0, 0, 4.0, t0 + Duration::from_secs(61));
        assert_eq!((c.tenant_spend_usd, c.crossed_budget), (2.0, false));
        assert!(
            m.record_at("m", "acme", 0, 0, 6.0, t0 + Duration::from_secs(62))
                .crossed_budget
        );
        // Two empty periods later: still exactly one reset to zero.
        let c = m.record_at("m", "acme", 0, 0, 0.0, t0 + Duration::from_secs(200));
        assert_eq!(c.tenant_spend_usd, 0.0);
    }
}

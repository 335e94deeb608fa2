//! Hard per-tenant limits (denial-of-wallet protection): `[tenants.default]` and
//! `[tenants.<name>]` in the config, enforced between the doors and the engine.
//!
//! What it owns, per tenant (a request's tenant is `RequestContext::tenant`; "" is `default`;
//! a tenant without its own section gets the default tenant's limits and its own books):
//! - `requests_per_minute`: a GCRA limiter ([`rate`], the `governor` crate);
//! - `concurrent_streams`: generations in flight, streamed or not (a slot held by the stream);
//! - `max_prompt_tokens`, `max_tokens`: per-request caps (a request without `max_tokens` gets
//!   the smaller of the server default and the cap instead of a refusal; `/v1/completions`'
//!   OpenAI default of 16 counts as set);
//! - `tokens_per_minute`: prompt + completion tokens in a sliding minute (60 one-second buckets);
//! - `budget_usd` per `budget_period`: spend at the `[ops.cost.prices]` token prices.
//!
//! The ledger ([`ledger`]) reserves `prompt + max_tokens` tokens and their worst-case price at
//! admission — after tokenization, before the engine sees the request — books usage as the
//! engine reports it (the prompt with the first event, completion tokens with each delta, the
//! exact usage with `Finished`), and refunds the rest when the request ends, however it ends:
//! the reservation is an RAII guard ([`ledger::Admission`]) that travels with the event stream,
//! so dropping the stream (client gone, deadline, failure) refunds it. Cheap refusals
//! (`max_tokens`, requests per minute, streams) come before tokenization; prompt tokens, the
//! minute window and the budget right after it.
//!
//! Invariants: a tenant's settled spend plus its reservations never exceed its budget, under
//! any concurrency (one mutex per tenant; check and reserve in one critical section; integer
//! nano-USD); every reservation is booked or refunded exactly once; every refusal is a
//! `RateLimited` error (429 / RESOURCE_EXHAUSTED) naming the limit, with `retry-after` and
//! OpenAI's `x-ratelimit-*` headers, and counts `genai_tenant_limit_rejections_total`.
//! Successful HTTP answers carry the same headers as of admission.
//!
//! Labels and memory: metrics name configured tenants (and `default`); any other tenant is
//! "other" and gets no gauges. Open mode lets a caller name any tenant, so books of unconfigured
//! tenants that hold nothing (no stream, reservation, spend or recent tokens) are forgotten at
//! each flush; those with spend stay, and are saved.
//!
//! Spend: the hard budget counts token prices only (`prompt_per_1k`, `completion_per_1k`).
//! `gpu_second` is not part of it — engine time cannot be bounded at admission — so the soft
//! `[ops.cost.budgets]` alerts (`ops::cost`, which also price GPU time, after the fact) can read
//! higher than the hard spend; the two are separate on purpose. A model without a price costs
//! nothing here (start-up warns when a budget is set for an unpriced model). Embeddings are
//! charged too: input tokens, reserved at a bound (characters + 2, at most 512 per input) and
//! settled to the embedder's count.
//!
//! Persistence: the spend of the current period per tenant is saved to `[tenants_state] path`
//! (JSON; temp file + fsync + rename; the server is its one writer: one server per state
//! file) when it changed, every
//! `flush_interval_ms`, and at shutdown; at start it is restored if it belongs to the current
//! period. Reservations in flight at the last save count as spent after a crash (conservative).
//! A corrupt state file stops the start-up with an error naming it rather than forgetting spend.
//! The minute window and the request limiter are not persisted (a minute is short).
//!
//! Tested: unit tests here and in [`ledger`], [`period`], [`rate`] (reserve/settle/refund,
//! windows, periods, persistence round trip and corrupt files), the concurrency property test
//! in [`ledger`] (64 threads against a budget worth k requests, random disconnects and usage),
//! and end to end through the real binary in `tests/e2e/limits.rs` (every limit → 429 with
//! headers on HTTP, gRPC RESOURCE_EXHAUSTED, a cancelled stream's refund, spend across restart).

pub(crate) mod ledger;
pub(crate) mod period;
pub(crate) mod rate;

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::bail;
use futures::StreamExt;
use genai_engine::EngineEvent;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::config::Price;
use crate::error::ApiError;
use crate::llm::EventStream;
use crate::ops::metrics as m;
use ledger::{price_nanos, usd_to_nanos, Admission, Book, Denial, Limit, Limits, Persisted, StreamSlot, TokenStatus};
use period::Period;
use rate::{RequestRate, RequestStatus};

/// The tenant a request without one belongs to, and the section other tenants inherit from.
pub(crate) const DEFAULT_TENANT: &str = "default";
/// Most tokens the embedding model reads of one input (its position table).
const EMBED_MAX_TOKENS_PER_INPUT: u64 = 512;

/// `[tenants.<name>]`: one tenant's hard limits. Unset = the default tenant's value (for
/// `[tenants.default]` itself: unlimited).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantLimits {
    pub requests_per_minute: Option<u32>,
    pub concurrent_streams: Option<u32>,
    pub max_prompt_tokens: Option<u64>,
    pub max_tokens: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    pub budget_usd: Option<f64>,
    /// "month" or a duration ("1h", "1d", "30d"); unset = the budget never resets.
    pub budget_period: Option<String>,
}

/// `[tenants_state]`: where tenants' spend survives restarts.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantsStateConfig {
    pub path: PathBuf,
    /// How often changed spend is saved (and the tenant gauges refreshed), ms.
    pub flush_interval_ms: u64,
}

impl Default for TenantsStateConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("data/tenants.json"),
            flush_interval_ms: 1000,
        }
    }
}

/// Checks `[tenants.*]` and `[tenants_state]`; errors name the key.
pub fn validate(tenants: &BTreeMap<String, TenantLimits>, state: &TenantsStateConfig) -> anyhow::Result<()> {
    for (name, t) in tenants {
        let key = format!("tenants.{name}");
        if name.is_empty()
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            bail!("invalid config: {key}: a tenant name is 1 to 64 characters of [A-Za-z0-9._-]");
        }
        for (field, v) in [
            ("requests_per_minute", t.requests_per_minute.map(u64::from)),
            ("concurrent_streams", t.concurrent_streams.map(u64::from)),
            ("max_prompt_tokens", t.max_prompt_tokens),
            ("max_tokens", t.max_tokens),
            ("tokens_per_minute", t.tokens_per_minute),
        ] {
            if v == Some(0) {
                bail!("invalid config: {key}.{field} must be >= 1 (leave it out for no limit)");
            }
        }
        if let Some(b) = t.budget_usd {
            if !(b.is_finite() && b >= 0.0) {
                bail!("invalid config: {key}.budget_usd must be a finite number >= 0 (got {b})");
            }
        }
        if let Some(p) = &t.budget_period {
            Period::parse(p).map_err(|e| anyhow::anyhow!("invalid config: {key}.budget_period: {e}"))?;
        }
    }
    if state.flush_interval_ms == 0 {
        bail!("invalid config: tenants_state.flush_interval_ms must be > 0");
    }
    if state.path.as_os_str().is_empty() {
        bail!("invalid config: tenants_state.path must not be empty");
    }
    Ok(())
}

/// `own`'s limits, with the default tenant's where `own` leaves them unset.
fn resolve(default: Option<&TenantLimits>, own: Option<&TenantLimits>) -> Limits {
    let pick = |f: fn(&TenantLimits) -> Option<u64>| own.and_then(f).or_else(|| default.and_then(f));
    let budget = own
        .and_then(|t| t.budget_usd)
        .or_else(|| default.and_then(|t| t.budget_usd));
    let period = own
        .and_then(|t| t.budget_period.clone())
        .or_else(|| default.and_then(|t| t.budget_period.clone()));
    Limits {
        requests_per_minute: pick(|t| t.requests_per_minute.map(u64::from)).map(|v| v as u32),
        concurrent_streams: pick(|t| t.concurrent_streams.map(u64::from)).map(|v| v as u32),
        max_prompt_tokens: pick(|t| t.max_prompt_tokens),
        max_tokens: pick(|t| t.max_tokens),
        tokens_per_minute: pick(|t| t.tokens_per_minute),
        budget_nanos: budget.map(usd_to_nanos),
        // Validated at config load.
        period: period.and_then(|p| Period::parse(&p).ok()).unwrap_or_default(),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// OpenAI's reset format: "20ms", "1s", "6m0s", "1h2m3s".
fn fmt_reset(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        return format!("{}ms", d.as_millis());
    }
    let s = d.as_secs_f64().ceil() as u64;
    match (s / 3600, s % 3600 / 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, min, sec) => format!("{min}m{sec}s"),
        (h, min, sec) => format!("{h}h{min}m{sec}s"),
    }
}

/// The `x-ratelimit-*` pairs for the limits the tenant has.
fn ratelimit_headers(req: Option<RequestStatus>, tok: Option<TokenStatus>) -> Vec<(&'static str, String)> {
    let mut h = Vec::new();
    if let Some(r) = req {
        h.push(("x-ratelimit-limit-requests", r.limit.to_string()));
        h.push(("x-ratelimit-remaining-requests", r.remaining.to_string()));
        h.push(("x-ratelimit-reset-requests", fmt_reset(r.reset)));
    }
    if let Some(t) = tok {
        h.push(("x-ratelimit-limit-tokens", t.limit.to_string()));
        h.push(("x-ratelimit-remaining-tokens", t.remaining.to_string()));
        h.push(("x-ratelimit-reset-tokens", fmt_reset(t.reset)));
    }
    h
}

/// One tenant: its label in metrics, its request limiter and its books.
#[derive(Debug)]
struct Tenant {
    /// The tenant's name when configured, else "other" (bounded label sets).
    label: String,
    configured: bool,
    rate: Option<RequestRate>,
    book: Arc<Book>,
}

/// State file layout.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    tenants: BTreeMap<String, Persisted>,
}

const STATE_VERSION: u32 = 1;

/// The per-tenant limits and books of the whole server.
pub(crate) struct Tenancy {
    configured: BTreeMap<String, Limits>,
    default: Limits,
    prices: BTreeMap<String, Price>,
    tenants: Mutex<HashMap<String, Arc<Tenant>>>,
    state: TenantsStateConfig,
    /// What the state file holds (as last written, or being written).
    saved: Mutex<BTreeMap<String, Persisted>>,
}

/// A request past the cheap checks, holding a stream slot; [`Tenancy::admit`] turns it into a
/// reservation once the prompt is tokenized.
pub(crate) struct Entry {
    tenant: Arc<Tenant>,
    slot: StreamSlot,
    requests: Option<RequestStatus>,
}

/// An admitted request's reservation and prices: books usage as it is reported; dropping it
/// refunds the rest.
pub(crate) struct Meter {
    admission: Admission,
    price: Price,
    prompt: u64,
    completion: u64,
    /// `x-ratelimit-*` as of admission (this request's reservation counted).
    headers: Vec<(&'static str, String)>,
}

impl Meter {
    pub(crate) fn headers(&self) -> Vec<(&'static str, String)> {
        self.headers.clone()
    }

    /// Books running totals of prompt and completion tokens.
    pub(crate) fn record(&mut self, prompt: u64, completion: u64) {
        self.prompt = prompt;
        self.completion = completion;
        let nanos = price_nanos(prompt, self.price.prompt_per_1k)
            .saturating_add(price_nanos(completion, self.price.completion_per_1k));
        self.admission.book_usage(now_ms(), prompt + completion, nanos);
    }
}

/// The backend's events, with usage booked as they pass: the prompt with the first event, each
/// delta's tokens, and the exact usage at `Finished`. The meter goes with the stream, so dropping
/// the stream refunds what was not used.
pub(crate) fn metered(events: EventStream, mut meter: Meter) -> EventStream {
    let prompt = meter.prompt;
    Box::pin(events.map(move |ev| {
        match &ev {
            Ok(EngineEvent::Delta { token_ids, text, .. }) => {
                // Remote backends' deltas carry no ids: estimated until their `Finished` settles.
                let n = if token_ids.is_empty() {
                    crate::llm::estimate_tokens(text)
                } else {
                    token_ids.len()
                };
                let completion = meter.completion + n as u64;
                meter.record(prompt, completion);
            }
            Ok(EngineEvent::Finished { usage, .. }) => {
                meter.record(u64::from(usage.prompt_tokens), u64::from(usage.completion_tokens));
            }
            Ok(EngineEvent::Failed { .. }) | Err(_) => {}
        }
        ev
    }))
}

impl Tenancy {
    /// Builds the limits and restores saved spend from the state file (a missing file is a
    /// fresh start; a corrupt one an error naming it). Config is validated already.
    pub(crate) fn new(
        tenants: &BTreeMap<String, TenantLimits>,
        state: &TenantsStateConfig,
        prices: &BTreeMap<String, Price>,
        priced_model: &str,
    ) -> anyhow::Result<Self> {
        let default_cfg = tenants.get(DEFAULT_TENANT);
        let configured: BTreeMap<String, Limits> = tenants
            .iter()
            .map(|(name, t)| (name.clone(), resolve(default_cfg, Some(t))))
            .collect();
        if configured.values().any(|l| l.budget_nanos.is_some()) && !prices.contains_key(priced_model) {
            tracing::warn!(
                model = priced_model,
                "a tenant budget_usd is set but the model has no entry in ops.cost.prices: its requests cost nothing"
            );
        }
        let me = Self {
            default: resolve(default_cfg, None),
            configured,
            prices: prices.clone(),
            tenants: Mutex::new(HashMap::new()),
            state: state.clone(),
            saved: Mutex::new(BTreeMap::new()),
        };
        me.restore()?;
        me.publish();
        Ok(me)
    }

    fn tenant(&self, name: &str) -> Arc<Tenant> {
        let name = if name.is_empty() { DEFAULT_TENANT } else { name };
        let mut map = self.tenants.lock();
        if let Some(t) = map.get(name) {
            return t.clone();
        }
        let (limits, configured) = match self.configured.get(name) {
            Some(l) => (l.clone(), true),
            None => (self.default.clone(), name == DEFAULT_TENANT),
        };
        let t = Arc::new(Tenant {
            label: if configured {
                name.to_owned()
            } else {
                "other".to_owned()
            },
            configured,
            rate: limits
                .requests_per_minute
                .and_then(NonZeroU32::new)
                .map(RequestRate::per_minute),
            book: Arc::new(Book::new(limits)),
        });
        map.insert(name.to_owned(), t.clone());
        t
    }

    fn reject(&self, t: &Tenant, d: Denial, requests: Option<RequestStatus>) -> ApiError {
        ::metrics::counter!(m::TENANT_LIMIT_REJECTIONS, "tenant" => t.label.clone(), "limit" => d.limit.as_str())
            .increment(1);
        tracing::info!(tenant = %t.label, limit = d.limit.as_str(), "request refused by a tenant limit");
        ApiError::RateLimited {
            limit: d.limit.as_str().into(),
            message: d.message,
            retry_after: d.retry_after,
            headers: ratelimit_headers(requests, t.book.token_status(now_ms())),
        }
    }

    /// The checks before tokenization: the `max_tokens` cap (an unset `max_tokens` becomes the
    /// smaller of `default_max` and the cap), requests per minute, a stream slot.
    pub(crate) fn enter(
        &self,
        tenant: &str,
        max_tokens: &mut Option<i64>,
        default_max: usize,
    ) -> Result<Entry, ApiError> {
        let t = self.tenant(tenant);
        if let Some(cap) = t.book.limits().max_tokens {
            match *max_tokens {
                None if default_max as u64 > cap => *max_tokens = Some(cap as i64),
                Some(n) if n > 0 && n as u64 > cap => {
                    let d = Denial {
                        limit: Limit::MaxTokens,
                        message: format!("max_tokens is {n}; the tenant's max_tokens limit is {cap}"),
                        retry_after: Duration::from_secs(60),
                    };
                    return Err(self.reject(&t, d, None));
                }
                _ => {}
            }
        }
        let requests = match &t.rate {
            None => None,
            Some(r) => match r.check() {
                Ok(s) => Some(s),
                Err((d, s)) => return Err(self.reject(&t, d, Some(s))),
            },
        };
        let slot = t.book.open_stream().map_err(|d| self.reject(&t, d, requests))?;
        Ok(Entry {
            tenant: t,
            slot,
            requests,
        })
    }

    fn price(&self, model: &str) -> Price {
        self.prices.get(model).copied().unwrap_or_default()
    }

    /// Admits a tokenized request: the prompt cap, then `prompt + max_tokens` tokens and their
    /// worst-case price reserved in one step.
    pub(crate) fn admit(
        &self,
        entry: Entry,
        prompt_tokens: usize,
        max_tokens: usize,
        model: &str,
    ) -> Result<Meter, ApiError> {
        let Entry {
            tenant: t,
            slot,
            requests,
        } = entry;
        let (prompt, max) = (prompt_tokens as u64, max_tokens as u64);
        if let Some(cap) = t.book.limits().max_prompt_tokens {
            if prompt > cap {
                let d = Denial {
                    limit: Limit::MaxPromptTokens,
                    message: format!("the prompt has {prompt} tokens; the tenant's max_prompt_tokens limit is {cap}"),
                    retry_after: Duration::from_secs(60),
                };
                return Err(self.reject(&t, d, requests));
            }
        }
        let price = self.price(model);
        let nanos = price_nanos(prompt, price.prompt_per_1k).saturating_add(price_nanos(max, price.completion_per_1k));
        let admission = t
            .book
            .reserve(now_ms(), prompt + max, nanos, Some(slot))
            .map_err(|d| self.reject(&t, d, requests))?;
        Ok(Meter {
            admission,
            price,
            prompt,
            completion: 0,
            headers: ratelimit_headers(requests, t.book.token_status(now_ms())),
        })
    }

    /// Embeddings: requests per minute, then the inputs' token bound reserved against the minute
    /// window and the budget (`Meter::record` books the embedder's count).
    pub(crate) fn embeddings(&self, tenant: &str, model: &str, texts: &[String]) -> Result<Meter, ApiError> {
        let t = self.tenant(tenant);
        let requests = match &t.rate {
            None => None,
            Some(r) => Some(r.check().map_err(|(d, s)| self.reject(&t, d, Some(s)))?),
        };
        let bound: u64 = texts
            .iter()
            .map(|s| (s.chars().count() as u64 + 2).min(EMBED_MAX_TOKENS_PER_INPUT))
            .sum();
        let price = self.price(model);
        let admission = t
            .book
            .reserve(now_ms(), bound, price_nanos(bound, price.prompt_per_1k), None)
            .map_err(|d| self.reject(&t, d, requests))?;
        Ok(Meter {
            admission,
            price,
            prompt: 0,
            completion: 0,
            headers: Vec::new(),
        })
    }

    /// Sets the tenant gauges of the configured tenants (others share the "other" label, where
    /// a gauge would mean nothing).
    fn publish(&self) {
        let now = now_ms();
        let tenants: Vec<Arc<Tenant>> = self.tenants.lock().values().filter(|t| t.configured).cloned().collect();
        for t in tenants {
            let u = t.book.usage(now);
            let label = t.label.clone();
            if let Some(b) = t.book.limits().budget_nanos {
                ::metrics::gauge!(m::TENANT_BUDGET_USD, "tenant" => label.clone()).set(ledger::nanos_to_usd(b));
            }
            ::metrics::gauge!(m::TENANT_SPEND_USD, "tenant" => label.clone()).set(ledger::nanos_to_usd(u.spent_nanos));
            ::metrics::gauge!(m::TENANT_RESERVED_USD, "tenant" => label.clone())
                .set(ledger::nanos_to_usd(u.reserved_nanos));
            ::metrics::gauge!(m::TENANT_WINDOW_TOKENS, "tenant" => label.clone())
                .set((u.window_tokens + u.reserved_tokens) as f64);
            ::metrics::gauge!(m::TENANT_ACTIVE_STREAMS, "tenant" => label).set(f64::from(u.streams));
        }
    }

    /// Forgets books of unconfigured tenants that hold nothing (open mode lets callers name any
    /// tenant; the map must not grow with them). Nobody else holds an idle book's `Arc` while
    /// the map is locked, since requests take it under the same lock.
    fn prune(&self) {
        let now = now_ms();
        self.tenants
            .lock()
            .retain(|_, t| t.configured || Arc::strong_count(t) > 1 || !t.book.is_idle(now));
    }

    fn restore(&self) -> anyhow::Result<()> {
        for name in self.configured.keys() {
            self.tenant(name);
        }
        self.tenant(DEFAULT_TENANT);
        let path = &self.state.path;
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => bail!(
                "cannot read the tenant state file {} (tenants_state.path): {e}",
                path.display()
            ),
        };
        let file: StateFile = serde_json::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "the tenant state file {} (tenants_state.path) is corrupt: {e}. It holds the tenants' spend, so the \
                 server does not start without it: repair it, or move it away to start every budget from zero",
                path.display()
            )
        })?;
        if file.version != STATE_VERSION {
            bail!(
                "the tenant state file {} has version {}; this server reads version {STATE_VERSION}",
                path.display(),
                file.version
            );
        }
        let now = now_ms();
        let mut saved = self.saved.lock();
        for (name, p) in file.tenants {
            if self.tenant(&name).book.restore(now, &p) {
                tracing::info!(tenant = %name, spent_usd = ledger::nanos_to_usd(p.spent_nanos + p.reserved_nanos), "restored tenant spend");
                saved.insert(name, p);
            }
        }
        Ok(())
    }

    /// Writes the state file if any tenant's spend changed since the last save (`force`: in any
    /// case). Blocking I/O: call it off the async workers.
    pub(crate) fn save(&self, force: bool) -> anyhow::Result<()> {
        let now = now_ms();
        let tenants: Vec<(String, Arc<Tenant>)> = self
            .tenants
            .lock()
            .iter()
            .map(|(k, t)| (k.clone(), t.clone()))
            .collect();
        let mut changed = Vec::new();
        let mut saved = self.saved.lock();
        for (name, t) in &tenants {
            if let Some(p) = t.book.take_snapshot(now, force) {
                saved.insert(name.clone(), p);
                changed.push(t);
            }
        }
        if changed.is_empty() && !force {
            return Ok(());
        }
        saved.retain(|_, p| p.spent_nanos + p.reserved_nanos > 0);
        let file = StateFile {
            version: STATE_VERSION,
            tenants: saved.clone(),
        };
        drop(saved);
        if let Err(e) = crate::atomic_file::write(&self.state.path, &serde_json::to_vec_pretty(&file)?, false) {
            for t in changed {
                t.book.mark_dirty();
            }
            return Err(e);
        }
        Ok(())
    }

    /// Every `flush_interval_ms`: saves changed spend, refreshes the gauges, forgets idle books.
    pub(crate) async fn run(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(self.state.flush_interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.publish();
            self.prune();
            let me = self.clone();
            match tokio::task::spawn_blocking(move || me.save(false)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!("saving tenant spend failed (retried next tick): {e:#}"),
                Err(e) => tracing::warn!("saving tenant spend failed: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn limits(f: impl FnOnce(&mut TenantLimits)) -> TenantLimits {
        let mut t = TenantLimits::default();
        f(&mut t);
        t
    }

    fn tenancy(dir: &Path, tenants: &[(&str, TenantLimits)]) -> anyhow::Result<Tenancy> {
        let tenants: BTreeMap<String, TenantLimits> =
            tenants.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
        let state = TenantsStateConfig {
            path: dir.join("state/tenants.json"),
            flush_interval_ms: 1000,
        };
        validate(&tenants, &state)?;
        let prices = BTreeMap::from([(
            "m".to_owned(),
            Price {
                prompt_per_1k: 1.0,
                completion_per_1k: 2.0,
                gpu_second: 0.0,
            },
        )]);
        Tenancy::new(&tenants, &state, &prices, "m")
    }

    fn limit_of(e: &ApiError) -> &str {
        match e {
            ApiError::RateLimited { limit, .. } => limit,
            other => panic!("not rate limited: {other:?}"),
        }
    }

    #[test]
    fn named_tenants_inherit_unset_fields_from_default() {
        let d = limits(|t| {
            t.tokens_per_minute = Some(100);
            t.budget_usd = Some(1.0);
            t.budget_period = Some("1d".into());
        });
        let acme = limits(|t| t.tokens_per_minute = Some(500));
        let l = resolve(Some(&d), Some(&acme));
        assert_eq!(l.tokens_per_minute, Some(500));
        assert_eq!(l.budget_nanos, Some(1_000_000_000));
        assert_eq!(l.period, Period::Every(86_400));
        assert_eq!(resolve(None, None), Limits::default());
    }

    #[test]
    fn bad_config_names_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let err = |t: TenantLimits| tenancy(dir.path(), &[("acme", t)]).err().unwrap().to_string();
        let e = err(limits(|t| t.requests_per_minute = Some(0)));
        assert!(e.contains("tenants.acme.requests_per_minute"), "{e}");
        let e = err(limits(|t| t.budget_usd = Some(f64::NAN)));
        assert!(e.contains("tenants.acme.budget_usd"), "{e}");
        let e = err(limits(|t| t.budget_period = Some("fortnightly".into())));
        assert!(e.contains("tenants.acme.budget_period"), "{e}");
        let e = tenancy(dir.path(), &[("a/b", TenantLimits::default())])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("tenants.a/b"), "{e}");
    }

    #[test]
    fn refusals_name_the_limit_and_carry_openai_headers() {
        let dir = tempfile::tempdir().unwrap();
        let t = tenancy(
            dir.path(),
            &[(
                "default",
                limits(|t| {
                    t.requests_per_minute = Some(100);
                    t.tokens_per_minute = Some(50);
                    t.max_tokens = Some(20);
                    t.max_prompt_tokens = Some(30);
                    t.concurrent_streams = Some(1);
                }),
            )],
        )
        .unwrap();
        // max_tokens: over the cap is refused; unset is capped.
        let e = t.enter("", &mut Some(21), 256).err().unwrap();
        assert_eq!(limit_of(&e), "max_tokens");
        let mut unset = None;
        let entry = t.enter("", &mut unset, 256).unwrap();
        assert_eq!(unset, Some(20));
        // One stream at a time.
        let e = t.enter("", &mut None, 256).err().unwrap();
        assert_eq!(limit_of(&e), "concurrent_streams");
        let ApiError::RateLimited {
            headers, retry_after, ..
        } = e
        else {
            unreachable!()
        };
        assert_eq!(retry_after, Duration::from_secs(1));
        let h: BTreeMap<_, _> = headers.into_iter().collect();
        assert_eq!(h["x-ratelimit-limit-requests"], "100");
        assert_eq!(h["x-ratelimit-remaining-requests"], "98");
        assert_eq!(h["x-ratelimit-limit-tokens"], "50");
        assert_eq!(h["x-ratelimit-remaining-tokens"], "50");
        assert_eq!(h["x-ratelimit-reset-tokens"], "0ms");
        // Prompt cap, then the window: 30 + 20 fits exactly, 31 does not.
        let e = t.admit(entry, 31, 20, "m").err().unwrap();
        assert_eq!(limit_of(&e), "max_prompt_tokens");
        let mut meter = t.admit(t.enter("", &mut None, 256).unwrap(), 30, 20, "m").unwrap();
        let h: BTreeMap<_, _> = meter.headers().into_iter().collect();
        assert_eq!(
            h["x-ratelimit-remaining-tokens"], "0",
            "this request's reservation counts"
        );
        assert_eq!(h["x-ratelimit-remaining-requests"], "97");
        meter.record(30, 5);
        drop(meter);
        let e = t
            .admit(t.enter("", &mut None, 256).unwrap(), 30, 20, "m")
            .err()
            .unwrap();
        assert_eq!(limit_of(&e), "tokens_per_minute");
        // Another tenant has its own books.
        assert!(t.admit(t.enter("acme", &mut None, 256).unwrap(), 30, 20, "m").is_ok());
    }

    /// The stream wrapper books the prompt and each delta as they pass, the exact usage at
    /// `Finished`, and refunds the rest when the stream is dropped early.
    #[tokio::test]
    async fn metered_streams_book_as_events_pass_and_refund_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let t = tenancy(dir.path(), &[("acme", limits(|t| t.budget_usd = Some(1.0)))]).unwrap();
        let book = t.tenant("acme").book.clone();
        let delta = |n: usize| {
            Ok(EngineEvent::Delta {
                text: "x".repeat(n),
                token_ids: vec![7; n],
                logprobs: Vec::new(),
            })
        };
        let finished = Ok(EngineEvent::Finished {
            reason: genai_engine::FinishReason::Length,
            usage: genai_engine::Usage {
                prompt_tokens: 10,
                completion_tokens: 5,
                cached_prompt_tokens: 0,
            },
        });
        // Finished: exactly the usage (10 prompt at 1.0 + 5 completion at 2.0 per 1k).
        let events: EventStream = Box::pin(futures::stream::iter(vec![delta(2), delta(3), finished]));
        let meter = t.admit(t.enter("acme", &mut None, 256).unwrap(), 10, 100, "m").unwrap();
        let all: Vec<_> = metered(events, meter).collect().await;
        assert_eq!(all.len(), 3);
        let u = book.usage(now_ms());
        assert_eq!((u.spent_nanos, u.reserved_nanos, u.streams), (20_000_000, 0, 0));
        // Dropped after two deltas (client gone, deadline): booked so far, the rest refunded.
        let events: EventStream =
            Box::pin(futures::stream::iter(vec![delta(2), delta(3)]).chain(futures::stream::pending()));
        let meter = t.admit(t.enter("acme", &mut None, 256).unwrap(), 10, 100, "m").unwrap();
        let mut s = metered(events, meter);
        s.next().await.unwrap().unwrap();
        let u = book.usage(now_ms());
        assert_eq!(
            (u.spent_nanos - 20_000_000, u.streams),
            (14_000_000, 1),
            "prompt + 2 tokens"
        );
        s.next().await.unwrap().unwrap();
        drop(s);
        let u = book.usage(now_ms());
        assert_eq!(
            (u.spent_nanos - 20_000_000, u.reserved_nanos, u.streams),
            (20_000_000, 0, 0)
        );
    }

    #[test]
    fn the_reset_format_is_openais() {
        assert_eq!(fmt_reset(Duration::from_millis(20)), "20ms");
        assert_eq!(fmt_reset(Duration::from_secs(1)), "1s");
        assert_eq!(fmt_reset(Duration::from_millis(1500)), "2s");
        assert_eq!(fmt_reset(Duration::from_secs(360)), "6m0s");
        assert_eq!(fmt_reset(Duration::from_secs(3723)), "1h2m3s");
    }

    #[test]
    fn spend_survives_a_restart_through_the_state_file() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = [("acme", limits(|t| t.budget_usd = Some(1.0)))];
        let t = tenancy(dir.path(), &cfg).unwrap();
        let mut meter = t
            .admit(t.enter("acme", &mut None, 256).unwrap(), 100, 100, "m")
            .unwrap();
        meter.record(100, 50); // 0.1 + 0.1 USD
        drop(meter);
        let mut other = t.embeddings("walk-in", "m", &["hello".into()]).unwrap();
        other.record(3, 0);
        drop(other);
        t.save(false).unwrap();
        let text = std::fs::read_to_string(dir.path().join("state/tenants.json")).unwrap();
        assert!(text.contains("\"acme\"") && text.contains("\"walk-in\""), "{text}");

        let t2 = tenancy(dir.path(), &cfg).unwrap();
        let u = t2.tenant("acme").book.usage(now_ms());
        assert_eq!(u.spent_nanos, 200_000_000);
        assert_eq!(t2.tenant("walk-in").book.usage(now_ms()).spent_nanos, 3_000_000);
        // 0.2 spent: a request worth up to 0.9 no longer fits.
        let e = t2
            .admit(t2.enter("acme", &mut None, 256).unwrap(), 300, 300, "m")
            .err()
            .unwrap();
        assert_eq!(limit_of(&e), "budget_usd");
    }

    #[test]
    fn a_corrupt_state_file_stops_the_start_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("state")).unwrap();
        std::fs::write(
            dir.path().join("state/tenants.json"),
            "{\"version\": 1, \"tenants\": {\"a\": 3",
        )
        .unwrap();
        let e = tenancy(dir.path(), &[]).err().unwrap().to_string();
        assert!(e.contains("tenants.json") && e.contains("corrupt"), "{e}");
        std::fs::write(
            dir.path().join("state/tenants.json"),
            "{\"version\": 9, \"tenants\": {}}",
        )
        .unwrap();
        let e = tenancy(dir.path(), &[]).err().unwrap().to_string();
        assert!(e.contains("version 9"), "{e}");
    }

    #[test]
    fn idle_walk_in_tenants_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let t = tenancy(dir.path(), &[("acme", TenantLimits::default())]).unwrap();
        drop(t.enter("walk-in", &mut None, 256).unwrap());
        assert!(t.tenants.lock().contains_key("walk-in"));
        t.prune();
        let map = t.tenants.lock();
        assert!(!map.contains_key("walk-in"));
        assert!(map.contains_key("acme") && map.contains_key("default"));
    }
}

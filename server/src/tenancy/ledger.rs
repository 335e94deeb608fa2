//! The reserve / settle / refund ledger of one tenant: concurrent streams, tokens in the sliding
//! minute and spend in the budget period, all under ONE mutex per tenant.
//!
//! Amounts: tokens are `u64`; money is integer nano-USD (`u64`), so "spent + reserved <= budget"
//! is exact arithmetic, never a float sum that drifts. A request's cost is priced from token
//! totals (never summed per delta), rounding up, so what one request books can never exceed
//! what it reserved.
//!
//! Invariants (checked by the unit and property tests below):
//! - `spent + reserved <= budget` after every admission, whatever the concurrency: the check and
//!   the reservation are one critical section, and settling only moves an amount from reserved
//!   to spent (never more than reserved; the rest is refunded).
//! - Every reservation is settled or refunded exactly once: [`Admission`] owns it and its `Drop`
//!   refunds what was not booked, so a cancel, a deadline, a failure or a panic cannot leak it.
//! - The same holds for tokens in the minute window and for the stream count.
//!
//! Time is passed in (unix milliseconds) so tests can drive windows and periods.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::period::Period;

/// The TPM window: 60 one-second buckets (a sliding minute at one-second resolution).
pub(crate) const WINDOW_SECS: u64 = 60;
const NANOS_PER_USD: f64 = 1e9;

/// USD → nano-USD, to the nearest nano (0.03 * 1e9 is 29999999.999999996 in floating point).
pub(crate) fn usd_to_nanos(usd: f64) -> u64 {
    (usd * NANOS_PER_USD).round().clamp(0.0, u64::MAX as f64) as u64
}

pub(crate) fn nanos_to_usd(nanos: u64) -> f64 {
    nanos as f64 / NANOS_PER_USD
}

/// Price of `tokens` at `per_1k` USD per 1000 tokens, in nano-USD, rounded up. Monotonic in
/// `tokens`, so pricing actual usage <= reserved usage never costs more than the reservation.
pub(crate) fn price_nanos(tokens: u64, per_1k: f64) -> u64 {
    (tokens as f64 * per_1k * (NANOS_PER_USD / 1000.0))
        .ceil()
        .clamp(0.0, u64::MAX as f64) as u64
}

/// A tenant's effective limits (the tenant's own fields, the default tenant's where unset).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Limits {
    pub requests_per_minute: Option<u32>,
    pub concurrent_streams: Option<u32>,
    pub max_prompt_tokens: Option<u64>,
    pub max_tokens: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    pub budget_nanos: Option<u64>,
    pub period: Period,
}

/// Which limit refused a request; `as_str` is the name in config, metrics and errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limit {
    RequestsPerMinute,
    ConcurrentStreams,
    MaxPromptTokens,
    MaxTokens,
    TokensPerMinute,
    BudgetUsd,
}

impl Limit {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Limit::RequestsPerMinute => "requests_per_minute",
            Limit::ConcurrentStreams => "concurrent_streams",
            Limit::MaxPromptTokens => "max_prompt_tokens",
            Limit::MaxTokens => "max_tokens",
            Limit::TokensPerMinute => "tokens_per_minute",
            Limit::BudgetUsd => "budget_usd",
        }
    }
}

/// A refusal: the limit, a message naming it, and when retrying can succeed.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Denial {
    pub limit: Limit,
    pub message: String,
    pub retry_after: Duration,
}

/// Where the tenant stands on tokens in the window (for `x-ratelimit-*-tokens`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct TokenStatus {
    pub limit: u64,
    pub remaining: u64,
    /// Until the window holds nothing settled (reservations in flight are not time-bound).
    pub reset: Duration,
}

/// A snapshot for metrics and the state file.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub(crate) struct Usage {
    pub streams: u32,
    pub window_tokens: u64,
    pub reserved_tokens: u64,
    pub spent_nanos: u64,
    pub reserved_nanos: u64,
}

/// What the state file keeps of one tenant.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Persisted {
    /// Unix seconds of the budget period the spend belongs to (0 for a budget that never resets).
    pub period_start: u64,
    /// Settled spend, nano-USD.
    pub spent_nanos: u64,
    /// Reservations in flight at the time of the snapshot, nano-USD. Restored as spent: after a
    /// crash nobody can tell how much of them was used, so the ledger assumes all of it.
    pub reserved_nanos: u64,
}

#[derive(Debug)]
struct State {
    streams: u32,
    /// Settled tokens per second; bucket `s % 60` holds second `s`, for `s` in `(head-60, head]`.
    buckets: [u64; WINDOW_SECS as usize],
    head: u64,
    reserved_tokens: u64,
    period_start: u64,
    spent_nanos: u64,
    reserved_nanos: u64,
    /// Spend changed since the last snapshot for the state file.
    dirty: bool,
}

impl Default for State {
    fn default() -> Self {
        Self {
            streams: 0,
            buckets: [0; WINDOW_SECS as usize],
            head: 0,
            reserved_tokens: 0,
            period_start: 0,
            spent_nanos: 0,
            reserved_nanos: 0,
            dirty: false,
        }
    }
}

impl State {
    /// Moves the window to second `now` (a clock that went back keeps the newest second) and
    /// starts a new budget period when the current one is over.
    fn roll(&mut self, now_ms: u64, period: Period) {
        let now = now_ms / 1000;
        if now > self.head {
            let gap = (now - self.head).min(WINDOW_SECS);
            for s in now - gap + 1..=now {
                self.buckets[(s % WINDOW_SECS) as usize] = 0;
            }
            self.head = now;
        }
        let start = period.start(now);
        if start > self.period_start {
            // Reservations in flight stay reserved: they are booked into the new period.
            self.period_start = start;
            if self.spent_nanos > 0 {
                self.dirty = true;
            }
            self.spent_nanos = 0;
        }
    }

    fn window_tokens(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Seconds until `need` settled tokens have left the window, if the window holds that many.
    fn frees_in(&self, need: u64) -> Option<u64> {
        let mut freed = 0;
        for s in self.head + 1 - WINDOW_SECS.min(self.head + 1)..=self.head {
            freed += self.buckets[(s % WINDOW_SECS) as usize];
            if freed >= need {
                return Some(s + WINDOW_SECS - self.head);
            }
        }
        None
    }

    fn token_status(&self, limit: u64) -> TokenStatus {
        let used = self.window_tokens() + self.reserved_tokens;
        let newest = (0..WINDOW_SECS)
            .map(|back| self.head.saturating_sub(back))
            .find(|&s| self.buckets[(s % WINDOW_SECS) as usize] > 0);
        TokenStatus {
            limit,
            remaining: limit.saturating_sub(used),
            reset: Duration::from_secs(newest.map_or(0, |s| s + WINDOW_SECS - self.head)),
        }
    }
}

/// One tenant's limits and ledger.
#[derive(Debug)]
pub(crate) struct Book {
    limits: Limits,
    state: Mutex<State>,
}

impl Book {
    pub(crate) fn new(limits: Limits) -> Self {
        Self {
            limits,
            state: Mutex::new(State::default()),
        }
    }

    pub(crate) fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Takes a stream slot, or refuses at `concurrent_streams`. The slot is released when the
    /// returned guard drops.
    pub(crate) fn open_stream(self: &Arc<Self>) -> Result<StreamSlot, Denial> {
        let mut st = self.state.lock();
        if let Some(max) = self.limits.concurrent_streams {
            if st.streams >= max {
                return Err(Denial {
                    limit: Limit::ConcurrentStreams,
                    message: format!(
                        "{} streams of this tenant are already open; its concurrent_streams limit is {max}",
                        st.streams
                    ),
                    retry_after: Duration::from_secs(1),
                });
            }
        }
        st.streams += 1;
        Ok(StreamSlot { book: self.clone() })
    }

    /// Reserves `tokens` in the minute window and `nanos` of the budget, or refuses naming the
    /// limit. Check and reservation are one critical section.
    pub(crate) fn reserve(
        self: &Arc<Self>,
        now_ms: u64,
        tokens: u64,
        nanos: u64,
        slot: Option<StreamSlot>,
    ) -> Result<Admission, Denial> {
        let mut st = self.state.lock();
        st.roll(now_ms, self.limits.period);
        if let Some(tpm) = self.limits.tokens_per_minute {
            let window = st.window_tokens();
            let used = window + st.reserved_tokens;
            if tokens > tpm {
                return Err(Denial {
                    limit: Limit::TokensPerMinute,
                    message: format!(
                        "this request may use {tokens} tokens (prompt + max_tokens), more than the tenant's \
                         tokens_per_minute limit of {tpm}; lower max_tokens or shorten the prompt"
                    ),
                    retry_after: Duration::from_secs(WINDOW_SECS),
                });
            }
            if used + tokens > tpm {
                // Settled tokens leave the window with time; reservations only when their streams end.
                let wait = st.frees_in(used + tokens - tpm).unwrap_or(1);
                return Err(Denial {
                    limit: Limit::TokensPerMinute,
                    message: format!(
                        "this request may use {tokens} tokens (prompt + max_tokens); {used} of the tenant's \
                         tokens_per_minute limit of {tpm} are used or reserved in the last minute"
                    ),
                    retry_after: Duration::from_secs(wait.max(1)),
                });
            }
        }
        if let Some(budget) = self.limits.budget_nanos {
            let committed = st.spent_nanos + st.reserved_nanos;
            if committed.saturating_add(nanos) > budget {
                let period_end = self.limits.period.end(now_ms / 1000);
                // Spend alone over the budget: only the next period helps. Otherwise reservations
                // in flight are refunded as their streams end.
                let wait = if st.spent_nanos.saturating_add(nanos) > budget {
                    period_end.map_or(3600, |end| end.saturating_sub(now_ms / 1000))
                } else {
                    1
                };
                return Err(Denial {
                    limit: Limit::BudgetUsd,
                    message: format!(
                        "this request may cost up to {:.6} USD (prompt + max_tokens at the configured prices); \
                         the tenant has spent {:.6} and reserved {:.6} of its budget_usd of {:.6} {}",
                        nanos_to_usd(nanos),
                        nanos_to_usd(st.spent_nanos),
                        nanos_to_usd(st.reserved_nanos),
                        nanos_to_usd(budget),
                        self.limits.period.describe(),
                    ),
                    retry_after: Duration::from_secs(wait.max(1)),
                });
            }
        }
        st.reserved_tokens += tokens;
        st.reserved_nanos += nanos;
        Ok(Admission {
            book: self.clone(),
            reserved_tokens: tokens,
            reserved_nanos: nanos,
            booked_tokens: 0,
            booked_nanos: 0,
            _slot: slot,
        })
    }

    pub(crate) fn token_status(&self, now_ms: u64) -> Option<TokenStatus> {
        let tpm = self.limits.tokens_per_minute?;
        let mut st = self.state.lock();
        st.roll(now_ms, self.limits.period);
        Some(st.token_status(tpm))
    }

    pub(crate) fn usage(&self, now_ms: u64) -> Usage {
        let mut st = self.state.lock();
        st.roll(now_ms, self.limits.period);
        Usage {
            streams: st.streams,
            window_tokens: st.window_tokens(),
            reserved_tokens: st.reserved_tokens,
            spent_nanos: st.spent_nanos,
            reserved_nanos: st.reserved_nanos,
        }
    }

    /// The state-file record, if spend changed since the last call (`force`: in any case).
    pub(crate) fn take_snapshot(&self, now_ms: u64, force: bool) -> Option<Persisted> {
        let mut st = self.state.lock();
        st.roll(now_ms, self.limits.period);
        if !(st.dirty || force) {
            return None;
        }
        st.dirty = false;
        Some(Persisted {
            period_start: st.period_start,
            spent_nanos: st.spent_nanos,
            reserved_nanos: st.reserved_nanos,
        })
    }

    /// Marks the spend unsaved again (a snapshot that could not be written).
    pub(crate) fn mark_dirty(&self) {
        self.state.lock().dirty = true;
    }

    /// Restores a saved spend if it belongs to the current period; returns whether it did.
    pub(crate) fn restore(&self, now_ms: u64, p: &Persisted) -> bool {
        let mut st = self.state.lock();
        st.roll(now_ms, self.limits.period);
        if p.period_start != st.period_start {
            return false;
        }
        st.spent_nanos = p.spent_nanos.saturating_add(p.reserved_nanos);
        st.dirty = p.reserved_nanos > 0;
        true
    }

    /// True when the book holds nothing worth keeping (no stream, reservation, spend or recent
    /// tokens): the tenant map may forget it.
    pub(crate) fn is_idle(&self, now_ms: u64) -> bool {
        let mut st = self.state.lock();
        st.roll(now_ms, self.limits.period);
        st.streams == 0 && st.reserved_tokens == 0 && st.spent_nanos == 0 && !st.dirty && st.window_tokens() == 0
    }
}

/// A held `concurrent_streams` slot; released on drop.
#[derive(Debug)]
pub(crate) struct StreamSlot {
    book: Arc<Book>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut st = self.book.state.lock();
        st.streams = st.streams.saturating_sub(1);
    }
}

/// One admitted request's reservation (and its stream slot, if any). [`Admission::book_usage`]
/// moves used amounts from reserved to spent; `Drop` refunds the rest, exactly once.
#[derive(Debug)]
pub(crate) struct Admission {
    book: Arc<Book>,
    reserved_tokens: u64,
    reserved_nanos: u64,
    booked_tokens: u64,
    booked_nanos: u64,
    _slot: Option<StreamSlot>,
}

impl Admission {
    /// Books the request's usage so far: `tokens` and `nanos` are running totals (never
    /// increments), capped at the reservation, so booking is idempotent and never overspends.
    pub(crate) fn book_usage(&mut self, now_ms: u64, tokens: u64, nanos: u64) {
        let tokens = tokens.min(self.reserved_tokens);
        let nanos = nanos.min(self.reserved_nanos);
        let (dt, dn) = (
            tokens.saturating_sub(self.booked_tokens),
            nanos.saturating_sub(self.booked_nanos),
        );
        if dt == 0 && dn == 0 {
            return;
        }
        let mut st = self.book.state.lock();
        st.roll(now_ms, self.book.limits.period);
        st.reserved_tokens -= dt;
        let head = st.head;
        st.buckets[(head % WINDOW_SECS) as usize] += dt;
        st.reserved_nanos -= dn;
        st.spent_nanos += dn;
        st.dirty |= dn > 0;
        self.booked_tokens += dt;
        self.booked_nanos += dn;
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut st = self.book.state.lock();
        st.reserved_tokens -= self.reserved_tokens - self.booked_tokens;
        st.reserved_nanos -= self.reserved_nanos - self.booked_nanos;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T0: u64 = 1_800_000_000_000; // ms, a Thursday in 2027

    fn book(l: Limits) -> Arc<Book> {
        Arc::new(Book::new(l))
    }

    #[test]
    fn reserve_settle_refund_keeps_the_books_exact() {
        let b = book(Limits {
            tokens_per_minute: Some(1000),
            budget_nanos: Some(1000),
            ..Limits::default()
        });
        let mut a = b.reserve(T0, 600, 600, None).unwrap();
        assert_eq!(b.usage(T0).reserved_tokens, 600);
        // 600 + 600 > 1000: refused on tokens first, naming the limit.
        let d = b.reserve(T0, 600, 1, None).unwrap_err();
        assert_eq!(d.limit, Limit::TokensPerMinute);
        assert!(d.message.contains("tokens_per_minute"), "{}", d.message);
        let d = b.reserve(T0, 1, 401, None).unwrap_err();
        assert_eq!(d.limit, Limit::BudgetUsd);
        a.book_usage(T0, 100, 100);
        a.book_usage(T0, 250, 250);
        a.book_usage(T0, 200, 200); // a smaller running total books nothing
        let u = b.usage(T0);
        assert_eq!((u.window_tokens, u.reserved_tokens), (250, 350));
        assert_eq!((u.spent_nanos, u.reserved_nanos), (250, 350));
        drop(a);
        let u = b.usage(T0);
        assert_eq!((u.window_tokens, u.reserved_tokens), (250, 0));
        assert_eq!((u.spent_nanos, u.reserved_nanos), (250, 0));
        // Usage above the reservation is capped, never overspent.
        let mut a = b.reserve(T0, 10, 10, None).unwrap();
        a.book_usage(T0, 50, 50);
        drop(a);
        assert_eq!(b.usage(T0).spent_nanos, 260);
        // The budget's remainder fits exactly; one more nano does not.
        let exact = b.reserve(T0, 1, 740, None).unwrap();
        assert_eq!(b.reserve(T0, 1, 1, None).unwrap_err().limit, Limit::BudgetUsd);
        drop(exact);
    }

    #[test]
    fn the_minute_window_slides_by_seconds() {
        let b = book(Limits {
            tokens_per_minute: Some(100),
            ..Limits::default()
        });
        let mut a = b.reserve(T0, 60, 0, None).unwrap();
        a.book_usage(T0, 60, 0);
        drop(a);
        let mut a = b.reserve(T0 + 30_000, 40, 0, None).unwrap();
        a.book_usage(T0 + 30_000, 40, 0);
        drop(a);
        // Full: the first 60 tokens leave the window 60 s after they were booked.
        let d = b.reserve(T0 + 30_000, 50, 0, None).unwrap_err();
        assert_eq!(d.retry_after, Duration::from_secs(30));
        let s = b.token_status(T0 + 30_000).unwrap();
        assert_eq!((s.limit, s.remaining, s.reset), (100, 0, Duration::from_secs(60)));
        assert!(b.reserve(T0 + 59_000, 50, 0, None).is_err());
        let a = b.reserve(T0 + 60_000, 50, 0, None).unwrap();
        assert_eq!(b.usage(T0 + 60_000).window_tokens, 40);
        drop(a);
        assert_eq!(b.usage(T0 + 200_000).window_tokens, 0);
        // A request larger than the whole limit can never fit, and says so.
        let d = b.reserve(T0 + 200_000, 101, 0, None).unwrap_err();
        assert!(d.message.contains("more than"), "{}", d.message);
    }

    #[test]
    fn streams_are_counted_and_released_on_drop() {
        let b = book(Limits {
            concurrent_streams: Some(2),
            ..Limits::default()
        });
        let s1 = b.open_stream().unwrap();
        let s2 = b.open_stream().unwrap();
        assert_eq!(b.open_stream().unwrap_err().limit, Limit::ConcurrentStreams);
        let a = b.reserve(T0, 1, 0, Some(s1)).unwrap();
        drop(s2);
        assert_eq!(b.usage(T0).streams, 1);
        drop(a);
        assert_eq!(b.usage(T0).streams, 0);
    }

    #[test]
    fn a_new_period_starts_with_zero_spend_and_keeps_reservations() {
        let b = book(Limits {
            budget_nanos: Some(100),
            period: Period::Every(3600),
            ..Limits::default()
        });
        let mut a = b.reserve(T0, 0, 80, None).unwrap();
        a.book_usage(T0, 0, 30);
        assert_eq!(b.reserve(T0, 0, 30, None).unwrap_err().limit, Limit::BudgetUsd);
        let next = (T0 / 3_600_000 + 1) * 3_600_000;
        let u = b.usage(next);
        assert_eq!((u.spent_nanos, u.reserved_nanos), (0, 50));
        a.book_usage(next, 0, 80);
        drop(a);
        assert_eq!(b.usage(next).spent_nanos, 50);
    }

    #[test]
    fn retry_after_says_when_the_budget_frees() {
        let b = book(Limits {
            budget_nanos: Some(100),
            period: Period::Every(3600),
            ..Limits::default()
        });
        let held = b.reserve(T0, 0, 90, None).unwrap();
        // Blocked by a reservation in flight: retry soon.
        assert_eq!(
            b.reserve(T0, 0, 20, None).unwrap_err().retry_after,
            Duration::from_secs(1)
        );
        drop(held);
        let mut a = b.reserve(T0, 0, 90, None).unwrap();
        a.book_usage(T0, 0, 90);
        drop(a);
        // Blocked by spend: only the next period helps.
        let d = b.reserve(T0, 0, 20, None).unwrap_err();
        let end = (T0 / 3_600_000 + 1) * 3600;
        assert_eq!(d.retry_after, Duration::from_secs(end - T0 / 1000));
    }

    #[test]
    fn snapshots_restore_within_the_same_period_only() {
        let limits = Limits {
            budget_nanos: Some(1000),
            period: Period::Every(3600),
            ..Limits::default()
        };
        let b = book(limits.clone());
        assert_eq!(b.take_snapshot(T0, false), None, "nothing changed yet");
        let mut a = b.reserve(T0, 0, 100, None).unwrap();
        a.book_usage(T0, 0, 40);
        let p = b.take_snapshot(T0, false).unwrap();
        assert_eq!((p.spent_nanos, p.reserved_nanos), (40, 60));
        assert_eq!(b.take_snapshot(T0, false), None, "saved");
        // A crash with the request in flight: its whole reservation counts as spent.
        let restored = book(limits.clone());
        assert!(restored.restore(T0 + 1000, &p));
        assert_eq!(restored.usage(T0 + 1000).spent_nanos, 100);
        // The next period does not inherit it.
        let later = book(limits);
        assert!(!later.restore(T0 + 3_600_000, &p));
        assert_eq!(later.usage(T0 + 3_600_000).spent_nanos, 0);
        drop(a);
    }

    #[test]
    fn prices_round_up_and_are_monotonic() {
        assert_eq!(price_nanos(1000, 0.001), 1_000_000);
        assert_eq!(price_nanos(1, 1e-9), 1);
        assert_eq!(price_nanos(0, 5.0), 0);
        assert_eq!(usd_to_nanos(0.5), 500_000_000);
        for n in 0..2000 {
            assert!(price_nanos(n, 0.0137) <= price_nanos(n + 1, 0.0137));
        }
    }

    /// The property, with real threads: 64 concurrent requests against a budget worth `k`
    /// of them. All race to reserve at once and hold: exactly `k` are admitted (never more, and
    /// the ledger does not refuse what fits). Then, concurrently, the admitted ones disconnect
    /// (dropped without booking) or book a random usage <= reserved, while the refused ones retry
    /// (fitting only into refunds). Spend never passes the budget, and nothing stays reserved.
    /// With `full` usage and no disconnects there are no refunds: at most `k` admitted in all.
    fn run_trial(k: u64, cost: u64, full: bool, plans: Vec<(bool, u64, u32)>) -> Result<(), TestCaseError> {
        use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
        let budget = k * cost;
        let b = book(Limits {
            budget_nanos: Some(budget),
            tokens_per_minute: Some(k * 100 + 99),
            concurrent_streams: Some(64),
            ..Limits::default()
        });
        let n = plans.len();
        let (start, held) = (
            Arc::new(std::sync::Barrier::new(n)),
            Arc::new(std::sync::Barrier::new(n)),
        );
        let (first, total) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let threads: Vec<_> = plans
            .into_iter()
            .map(|(disconnect, used_pct, yields)| {
                let (b, start, held, first, total) =
                    (b.clone(), start.clone(), held.clone(), first.clone(), total.clone());
                let (disconnect, used_pct) = if full { (false, 100) } else { (disconnect, used_pct) };
                std::thread::spawn(move || {
                    let finish = |mut a: Admission, used_pct: u64| {
                        // Book in two steps, as deltas and then Finished do.
                        a.book_usage(T0, used_pct / 2, cost * used_pct / 200);
                        a.book_usage(T0, used_pct, cost * used_pct / 100);
                    };
                    start.wait();
                    let slot = b.open_stream().ok();
                    let admitted = b.reserve(T0, 100, cost, slot).ok();
                    if admitted.is_some() {
                        first.fetch_add(1, SeqCst);
                        total.fetch_add(1, SeqCst);
                    }
                    held.wait();
                    for _ in 0..yields {
                        std::thread::yield_now();
                    }
                    match admitted {
                        Some(a) if !disconnect => finish(a, used_pct),
                        Some(a) => drop(a),
                        None => {
                            let slot = b.open_stream().ok();
                            if let Ok(a) = b.reserve(T0, 100, cost, slot) {
                                total.fetch_add(1, SeqCst);
                                finish(a, 100);
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("no panic");
        }
        let (first, total) = (first.load(SeqCst), total.load(SeqCst));
        let u = b.usage(T0);
        prop_assert_eq!(first, k, "admitted at once, against a budget worth {}", k);
        prop_assert!(u.spent_nanos <= budget, "spent {} > budget {budget}", u.spent_nanos);
        prop_assert_eq!((u.reserved_nanos, u.reserved_tokens, u.streams), (0, 0, 0));
        if full {
            prop_assert_eq!(total, k, "no refunds, so no more admissions");
            prop_assert_eq!(u.spent_nanos, budget);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn concurrent_requests_never_overspend(
            k in 0u64..64,
            cost in 1u64..10_000,
            full in any::<bool>(),
            plans in proptest::collection::vec((any::<bool>(), 0u64..=100, 0u32..50), 64),
        ) {
            run_trial(k, cost, full, plans)?;
        }
    }

    /// Sequential rounds: once refunds come back, later requests fit again, and the total spent
    /// is exactly what was booked.
    #[test]
    fn refunds_make_room_for_the_next_requests() {
        let b = book(Limits {
            budget_nanos: Some(100),
            ..Limits::default()
        });
        for _ in 0..10 {
            let mut a = b.reserve(T0, 0, 50, None).unwrap();
            a.book_usage(T0, 0, 5);
        }
        assert_eq!(b.usage(T0).spent_nanos, 50);
        assert_eq!(b.usage(T0).reserved_nanos, 0);
    }
}

//! A circuit breaker per remote backend, written out by hand so its three states are plain to
//! read and to test.
//!
//! Closed: every call goes through; `failure_threshold` failed attempts within `failure_window`
//! open it. Open: calls are refused at once (the fallback chain skips the backend without a
//! network round trip) for `open_for`. Then half-open: exactly ONE call, the probe, goes
//! through while every other is refused; its success closes the circuit, its failure opens it
//! for another `open_for`. A probe abandoned without a verdict (the client went away) frees the
//! slot for the next call.
//!
//! The state is the gauge `genai_backend_circuit_state{backend}` (0 closed, 1 open, 2
//! half-open), set at each transition; an open circuit whose time is up shows 1 until the next
//! call takes the probe. Time is tokio's clock, so the tests drive it paused.
//!
//! Tested: `tests` below (transitions, the single probe, abandoned probes, the window) and,
//! through real HTTP, in `remote`'s and `fallback`'s tests.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::ops::metrics::BACKEND_CIRCUIT_STATE;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CircuitState {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

enum State {
    /// When the failures in the window happened, oldest first.
    Closed {
        failures: VecDeque<Instant>,
    },
    Open {
        until: Instant,
    },
    /// `probing`: the one call let through has not reported yet.
    HalfOpen {
        probing: bool,
    },
}

pub(crate) struct Breaker {
    backend: String,
    threshold: usize,
    window: Duration,
    open_for: Duration,
    state: Mutex<State>,
}

/// A call let through; report how it went with [`Permit::success`] or [`Permit::failure`].
pub(crate) struct Permit {
    breaker: Arc<Breaker>,
    probe: bool,
    settled: bool,
}

impl Breaker {
    pub(crate) fn new(backend: &str, threshold: usize, window: Duration, open_for: Duration) -> Self {
        let b = Self {
            backend: backend.to_owned(),
            threshold,
            window,
            open_for,
            state: Mutex::new(State::Closed {
                failures: VecDeque::new(),
            }),
        };
        b.publish(CircuitState::Closed);
        b
    }

    fn publish(&self, s: CircuitState) {
        metrics::gauge!(BACKEND_CIRCUIT_STATE, "backend" => self.backend.clone()).set(s as u8 as f64);
    }

    fn set(&self, state: &mut State, new: State) {
        let s = match new {
            State::Closed { .. } => CircuitState::Closed,
            State::Open { .. } => CircuitState::Open,
            State::HalfOpen { .. } => CircuitState::HalfOpen,
        };
        if std::mem::discriminant(state) != std::mem::discriminant(&new) {
            tracing::info!(backend = %self.backend, state = ?s, "circuit breaker");
        }
        *state = new;
        self.publish(s);
    }

    /// The state as the gauge shows it.
    #[cfg(test)]
    pub(crate) fn state(&self) -> CircuitState {
        match &*self.state.lock() {
            State::Closed { .. } => CircuitState::Closed,
            State::Open { .. } => CircuitState::Open,
            State::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }

    /// Whether a call would be let through now (without taking the probe): the fallback chain
    /// skips a backend that would refuse.
    pub(crate) fn admits(&self) -> bool {
        match &*self.state.lock() {
            State::Closed { .. } => true,
            State::Open { until } => Instant::now() >= *until,
            State::HalfOpen { probing } => !probing,
        }
    }

    /// Lets a call through, or refuses it (open, or half-open with the probe out).
    pub(crate) fn acquire(self: &Arc<Self>) -> Option<Permit> {
        let mut st = self.state.lock();
        let probe = match &*st {
            State::Closed { .. } => false,
            State::Open { until } if Instant::now() < *until => return None,
            State::Open { .. } | State::HalfOpen { probing: false } => {
                self.set(&mut st, State::HalfOpen { probing: true });
                true
            }
            State::HalfOpen { probing: true } => return None,
        };
        Some(Permit {
            breaker: self.clone(),
            probe,
            settled: false,
        })
    }

    /// A failure outside an attempt (a stream that broke after its first token): counted while
    /// closed; the probe alone decides a half-open circuit.
    pub(crate) fn record_failure(&self) {
        let mut st = self.state.lock();
        if matches!(*st, State::Closed { .. }) {
            self.closed_failure(&mut st);
        }
    }

    fn closed_failure(&self, st: &mut State) {
        let now = Instant::now();
        let State::Closed { failures } = st else {
            return;
        };
        failures.push_back(now);
        while failures.front().is_some_and(|t| now.duration_since(*t) > self.window) {
            failures.pop_front();
        }
        if failures.len() >= self.threshold {
            self.set(
                st,
                State::Open {
                    until: now + self.open_for,
                },
            );
        }
    }

    fn settle(&self, probe: bool, ok: Option<bool>) {
        let mut st = self.state.lock();
        match (probe, ok) {
            (true, Some(true)) => self.set(
                &mut st,
                State::Closed {
                    failures: VecDeque::new(),
                },
            ),
            (true, Some(false)) => self.set(
                &mut st,
                State::Open {
                    until: Instant::now() + self.open_for,
                },
            ),
            // An abandoned probe: the next call probes.
            (true, None) => {
                if matches!(*st, State::HalfOpen { probing: true }) {
                    self.set(&mut st, State::HalfOpen { probing: false });
                }
            }
            (false, Some(false)) => {
                if matches!(*st, State::Closed { .. }) {
                    self.closed_failure(&mut st);
                }
            }
            (false, _) => {}
        }
    }
}

impl Permit {
    pub(crate) fn success(mut self) {
        self.settled = true;
        self.breaker.settle(self.probe, Some(true));
    }

    pub(crate) fn failure(mut self) {
        self.settled = true;
        self.breaker.settle(self.probe, Some(false));
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.settled {
            self.breaker.settle(self.probe, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Arc<Breaker> {
        Arc::new(Breaker::new("t", 3, Duration::from_secs(10), Duration::from_secs(30)))
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_threshold_then_half_opens_with_one_probe() {
        let b = breaker();
        for _ in 0..2 {
            b.acquire().unwrap().failure();
        }
        assert_eq!(b.state(), CircuitState::Closed);
        b.acquire().unwrap().failure();
        assert_eq!(b.state(), CircuitState::Open);
        assert!(b.acquire().is_none() && !b.admits());
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(b.acquire().is_none());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(b.admits());
        let probe = b.acquire().expect("the probe");
        assert_eq!(b.state(), CircuitState::HalfOpen);
        // Exactly one probe: everyone else is refused meanwhile.
        assert!(b.acquire().is_none() && !b.admits());
        probe.success();
        assert_eq!(b.state(), CircuitState::Closed);
        assert!(b.acquire().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_and_an_abandoned_one_frees_the_slot() {
        let b = breaker();
        for _ in 0..3 {
            b.acquire().unwrap().failure();
        }
        tokio::time::advance(Duration::from_secs(30)).await;
        b.acquire().unwrap().failure();
        assert_eq!(b.state(), CircuitState::Open);
        assert!(b.acquire().is_none());
        tokio::time::advance(Duration::from_secs(30)).await;
        drop(b.acquire().expect("probe"));
        assert_eq!(b.state(), CircuitState::HalfOpen);
        let probe = b.acquire().expect("the slot is free again");
        assert!(b.acquire().is_none());
        probe.success();
        assert_eq!(b.state(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_outside_the_window_do_not_count() {
        let b = breaker();
        b.acquire().unwrap().failure();
        b.acquire().unwrap().failure();
        tokio::time::advance(Duration::from_secs(11)).await;
        b.acquire().unwrap().failure();
        assert_eq!(b.state(), CircuitState::Closed);
        b.record_failure();
        assert_eq!(b.state(), CircuitState::Closed);
        let late = b.acquire().unwrap();
        b.acquire().unwrap().failure();
        assert_eq!(b.state(), CircuitState::Open, "3 failures within 10 s");
        // A call let through while closed never closes an open circuit.
        late.success();
        assert!(b.acquire().is_none());
    }
}

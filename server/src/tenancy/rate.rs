//! `requests_per_minute`: a GCRA limiter (the `governor` crate) per tenant, burst = the limit,
//! replenishing one request every `60 s / limit`. Lock-free; refusals say when the next request
//! fits. Tested below.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::{DefaultDirectRateLimiter, Quota};

use super::ledger::{Denial, Limit};

/// Where the tenant stands on requests (for `x-ratelimit-*-requests`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RequestStatus {
    pub limit: u32,
    pub remaining: u32,
    /// Until the burst capacity is full again.
    pub reset: Duration,
}

pub(crate) struct RequestRate {
    limit: NonZeroU32,
    limiter: DefaultDirectRateLimiter<StateInformationMiddleware>,
    clock: DefaultClock,
}

impl std::fmt::Debug for RequestRate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RequestRate({}/min)", self.limit)
    }
}

impl RequestRate {
    pub(crate) fn per_minute(limit: NonZeroU32) -> Self {
        Self {
            limit,
            limiter: DefaultDirectRateLimiter::direct(Quota::per_minute(limit))
                .with_middleware::<StateInformationMiddleware>(),
            clock: DefaultClock::default(),
        }
    }

    fn status(&self, remaining: u32) -> RequestStatus {
        let per_request = Duration::from_secs(60) / self.limit.get();
        RequestStatus {
            limit: self.limit.get(),
            remaining,
            reset: per_request * (self.limit.get() - remaining),
        }
    }

    /// Counts one request, or refuses it with the time until one fits.
    pub(crate) fn check(&self) -> Result<RequestStatus, (Denial, RequestStatus)> {
        match self.limiter.check() {
            Ok(snapshot) => Ok(self.status(snapshot.remaining_burst_capacity())),
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.clock.now());
                let denial = Denial {
                    limit: Limit::RequestsPerMinute,
                    message: format!(
                        "the tenant's requests_per_minute limit of {} is reached; the next request fits in {:.1} s",
                        self.limit,
                        wait.as_secs_f64()
                    ),
                    retry_after: wait.max(Duration::from_secs(1)),
                };
                Err((denial, self.status(0)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_the_limit_passes_then_the_next_is_refused() {
        let r = RequestRate::per_minute(NonZeroU32::new(3).unwrap());
        let remaining: Vec<u32> = (0..3).map(|_| r.check().unwrap().remaining).collect();
        assert_eq!(remaining, [2, 1, 0]);
        let (d, s) = r.check().unwrap_err();
        assert_eq!(d.limit, Limit::RequestsPerMinute);
        assert!(d.message.contains("requests_per_minute"), "{}", d.message);
        // One request replenishes every 20 s.
        assert!(d.retry_after > Duration::from_secs(15) && d.retry_after <= Duration::from_secs(20));
        assert_eq!((s.limit, s.remaining, s.reset), (3, 0, Duration::from_secs(60)));
    }
}

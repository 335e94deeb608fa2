//! Budget periods: when a tenant's spend starts again from zero.
//!
//! `budget_period` is unset (the budget never resets), `"month"` (calendar months, UTC) or a
//! duration humantime parses (`"1h"`, `"1d"`, `"30d"`, `"1week"`); durations are whole seconds,
//! aligned to the Unix epoch, so every restart computes the same period boundaries and a saved
//! spend is restored only into the period it belongs to. Tested below (alignment, month ends,
//! leap years, bad values).

/// A budget period, computed from wall-clock Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Period {
    /// The budget never resets.
    #[default]
    Lifetime,
    /// Fixed-length periods of this many seconds, aligned to the Unix epoch.
    Every(u64),
    /// Calendar months, UTC.
    Month,
}

impl Period {
    /// Parses `budget_period`; the error says what is accepted.
    pub(crate) fn parse(s: &str) -> Result<Period, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("month") {
            return Ok(Period::Month);
        }
        let d = humantime::parse_duration(s)
            .map_err(|e| format!("{s:?} is not \"month\" or a duration such as \"1h\", \"1d\" or \"30d\" ({e})"))?;
        if d.as_secs() == 0 || d.subsec_nanos() != 0 {
            return Err(format!("{s:?} must be a whole number of seconds, at least 1s"));
        }
        Ok(Period::Every(d.as_secs()))
    }

    /// Start (Unix seconds) of the period containing `now`; 0 for [`Period::Lifetime`].
    pub(crate) fn start(self, now: u64) -> u64 {
        match self {
            Period::Lifetime => 0,
            Period::Every(len) => now - now % len,
            Period::Month => {
                let (y, m, _) = civil_from_days(now / 86_400);
                days_from_civil(y, m, 1) * 86_400
            }
        }
    }

    /// End (Unix seconds) of the period containing `now`; none for [`Period::Lifetime`].
    pub(crate) fn end(self, now: u64) -> Option<u64> {
        match self {
            Period::Lifetime => None,
            Period::Every(len) => Some(self.start(now) + len),
            Period::Month => {
                let (y, m, _) = civil_from_days(now / 86_400);
                let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                Some(days_from_civil(y, m, 1) * 86_400)
            }
        }
    }

    /// "per month", "per 1day", "in total": for messages.
    pub(crate) fn describe(self) -> String {
        match self {
            Period::Lifetime => "in total (budget_period unset: it never resets)".into(),
            Period::Every(len) => format!(
                "per {}",
                humantime::format_duration(std::time::Duration::from_secs(len))
            ),
            Period::Month => "per calendar month (UTC)".into(),
        }
    }
}

/// (year, month 1..=12, day 1..=31) of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// Days since 1970-01-01 of a civil date (year >= 1970).
fn days_from_civil(y: u64, m: u64, d: u64) -> u64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations_and_month() {
        assert_eq!(Period::parse("1h"), Ok(Period::Every(3600)));
        assert_eq!(Period::parse("30d"), Ok(Period::Every(30 * 86_400)));
        assert_eq!(Period::parse(" Month "), Ok(Period::Month));
        let e = Period::parse("monthly").unwrap_err();
        assert!(e.contains("\"month\""), "{e}");
        assert!(Period::parse("0s").is_err());
        assert!(Period::parse("1500ms").is_err());
    }

    #[test]
    fn durations_align_to_the_epoch() {
        let p = Period::Every(86_400);
        assert_eq!(p.start(86_400 * 3 + 5), 86_400 * 3);
        assert_eq!(p.end(86_400 * 3 + 5), Some(86_400 * 4));
        assert_eq!(Period::Lifetime.start(12345), 0);
        assert_eq!(Period::Lifetime.end(12345), None);
    }

    #[test]
    fn months_follow_the_calendar() {
        // 2024-02-29 12:00 UTC (leap day) → February 2024.
        let leap = days_from_civil(2024, 2, 29) * 86_400 + 43_200;
        assert_eq!(civil_from_days(leap / 86_400), (2024, 2, 29));
        assert_eq!(Period::Month.start(leap), days_from_civil(2024, 2, 1) * 86_400);
        assert_eq!(Period::Month.end(leap), Some(days_from_civil(2024, 3, 1) * 86_400));
        // December rolls into January of the next year.
        let dec = days_from_civil(2026, 12, 31) * 86_400;
        assert_eq!(Period::Month.end(dec), Some(days_from_civil(2027, 1, 1) * 86_400));
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        for days in [0, 59, 60, 365, 10_957, 20_000, 30_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }
}

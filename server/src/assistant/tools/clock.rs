//! `current_time`: the current date and time, in UTC or an IANA time zone (`jiff`, with its
//! bundled tz database so a host without `/usr/share/zoneinfo` answers the same).
//!
//! Tested below: UTC by default, a named zone's offset, an unknown zone refused by name.

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{parse_args, Tool, ToolContext, ToolError};

pub(crate) struct CurrentTime;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    #[serde(default)]
    timezone: Option<String>,
}

#[async_trait]
impl Tool for CurrentTime {
    fn name(&self) -> &'static str {
        "current_time"
    }

    fn description(&self) -> &'static str {
        "Returns the current date, time and weekday, in UTC or in an IANA time zone such as \"Europe/Paris\"."
    }

    fn parameters(&self) -> Value {
        json!({
            "type": "object",
            "properties": {
                "timezone": {"type": "string", "description": "IANA time zone name; UTC when omitted."}
            },
            "additionalProperties": false
        })
    }

    async fn run(&self, args: Value, _ctx: &ToolContext) -> Result<String, ToolError> {
        let a: Args = parse_args(args)?;
        now_in(a.timezone.as_deref().unwrap_or("UTC"), jiff::Timestamp::now())
    }
}

/// `at` in zone `tz`, to the second: `2026-11-29T23:05:09+01:00[Europe/Paris] (Sunday)`.
fn now_in(tz: &str, at: jiff::Timestamp) -> Result<String, ToolError> {
    let zone = jiff::tz::TimeZone::get(tz.trim())
        .map_err(|_| ToolError::InvalidArguments(format!("timezone: unknown time zone {tz:?} (use an IANA name)")))?;
    let z = at
        .to_zoned_datetime(zone)
        .round(jiff::Unit::Second)
        .map_err(|e| ToolError::Failed(e.to_string()))?;
    Ok(format!("{z} ({:?})", z.weekday()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zones_by_name_and_utc_by_default() {
        let at: jiff::Timestamp = "2026-07-01T12:00:00Z".parse().unwrap();
        assert_eq!(now_in("UTC", at).unwrap(), "2026-07-01T12:00:00+00:00[UTC] (Wednesday)");
        assert_eq!(
            now_in("Europe/Paris", at).unwrap(),
            "2026-07-01T14:00:00+02:00[Europe/Paris] (Wednesday)"
        );
        assert_eq!(
            now_in("America/New_York", at).unwrap(),
            "2026-07-01T08:00:00-04:00[America/New_York] (Wednesday)"
        );
        let e = now_in("Mars/Olympus", at).unwrap_err();
        assert!(matches!(&e, ToolError::InvalidArguments(m) if m.contains("Mars/Olympus")));
    }

    #[tokio::test]
    async fn runs_with_and_without_a_zone() {
        let out = CurrentTime.run(json!({}), &ToolContext::default()).await.unwrap();
        assert!(out.contains("+00:00[UTC]"), "{out}");
        let out = CurrentTime
            .run(json!({"timezone": "Asia/Tokyo"}), &ToolContext::default())
            .await
            .unwrap();
        assert!(out.contains("+09:00[Asia/Tokyo]"), "{out}");
    }
}

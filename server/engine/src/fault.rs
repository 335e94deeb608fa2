//! Test-only fault injection for end-to-end tests of supervision, read once
//! when the engine starts from `GENAI_FAULT_INJECT`:
//! - `engine_step_panic:N`: the N-th engine step (1-based, counting steps
//!   that run the model) panics after sampling, outside the forward pass;
//! - `engine_step_panic_always`: every step panics there, so the engine gives
//!   up (see the crate doc for when).
//!
//! Unset or empty: no fault. Anything else fails the engine start, so a typo
//! cannot silently disable a test.

use anyhow::bail;

const ENV: &str = "GENAI_FAULT_INJECT";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Fault {
    #[default]
    None,
    StepPanicAt(u64),
    StepPanicAlways,
}

impl Fault {
    pub(crate) fn from_env() -> anyhow::Result<Self> {
        match std::env::var(ENV) {
            Ok(v) => Self::parse(&v),
            Err(std::env::VarError::NotPresent) => Ok(Fault::None),
            Err(e) => bail!("{ENV}: {e}"),
        }
    }

    fn parse(v: &str) -> anyhow::Result<Self> {
        match v.trim() {
            "" => Ok(Fault::None),
            "engine_step_panic_always" => Ok(Fault::StepPanicAlways),
            other => match other.strip_prefix("engine_step_panic:").map(str::parse::<u64>) {
                Some(Ok(n)) if n >= 1 => Ok(Fault::StepPanicAt(n)),
                _ => bail!("{ENV}={other:?}: expected `engine_step_panic:N` (N >= 1) or `engine_step_panic_always`"),
            },
        }
    }

    /// Panics if the plan makes step `step` (1-based) fail.
    pub(crate) fn inject(self, step: u64) {
        let fire = match self {
            Fault::None => false,
            Fault::StepPanicAt(n) => n == step,
            Fault::StepPanicAlways => true,
        };
        if fire {
            panic!("injected fault ({ENV}): engine step {step} panics after sampling");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_values_and_refuses_the_rest() {
        assert_eq!(Fault::parse("").unwrap(), Fault::None);
        assert_eq!(Fault::parse("engine_step_panic:3").unwrap(), Fault::StepPanicAt(3));
        assert_eq!(
            Fault::parse("engine_step_panic_always").unwrap(),
            Fault::StepPanicAlways
        );
        for bad in [
            "engine_step_panic:0",
            "engine_step_panic:x",
            "engine_step_panic",
            "step_panic:1",
        ] {
            assert!(Fault::parse(bad).unwrap_err().to_string().contains(ENV), "{bad}");
        }
    }

    #[test]
    fn fires_on_the_planned_step_only() {
        Fault::None.inject(1);
        Fault::StepPanicAt(2).inject(1);
        Fault::StepPanicAt(2).inject(3);
        assert!(std::panic::catch_unwind(|| Fault::StepPanicAt(2).inject(2)).is_err());
        assert!(std::panic::catch_unwind(|| Fault::StepPanicAlways.inject(7)).is_err());
    }
}

//! What every stage of the safety chain answers: allow, redact or block, with a reason code
//! (a short stable label such as `email`, `jailbreak_rule`, `toxicity_classifier`) that goes to
//! metrics, logs and the client — never the matched value.

use serde::Serialize;

/// Which check decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// PII and secrets.
    Pii,
    /// Prompt injection and jailbreaks (direct, or indirect in retrieved text).
    Injection,
    Toxicity,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Pii => "pii",
            Stage::Injection => "injection",
            Stage::Toxicity => "toxicity",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Allow,
    Redact,
    Block,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Redact => "redact",
            Action::Block => "block",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub stage: Stage,
    pub action: Action,
    /// Stable reason code, e.g. `email`, `credit_card`, `injection_rule`, `injection_classifier`.
    pub reason: &'static str,
    /// Classifier score when a classifier decided.
    pub score: Option<f32>,
}

impl Verdict {
    pub fn block(stage: Stage, reason: &'static str, score: f32) -> Self {
        Verdict {
            stage,
            action: Action::Block,
            reason,
            score: Some(score),
        }
    }

    /// A classifier's verdict: a block at or above `threshold`, else an allow that keeps the
    /// score.
    pub fn scored(stage: Stage, reason: &'static str, score: f32, threshold: f32) -> Self {
        match score >= threshold {
            true => Verdict::block(stage, reason, score),
            false => Verdict {
                score: Some(score),
                ..Verdict::allow(stage)
            },
        }
    }

    pub fn allow(stage: Stage) -> Self {
        Verdict {
            stage,
            action: Action::Allow,
            reason: "none",
            score: None,
        }
    }
}

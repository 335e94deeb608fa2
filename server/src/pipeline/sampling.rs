//! Sampling fields as both doors carry them, converted and validated in one place so gRPC and
//! HTTP agree on every rule (the engine's `SamplingParams::validate` has the last word).

use genai_engine::SamplingParams;

use crate::error::ApiError;

/// Unset = the engine's default.
#[derive(Debug, Default, Clone)]
pub(crate) struct SamplingInput {
    pub(crate) temperature: Option<f64>,
    pub(crate) top_p: Option<f64>,
    pub(crate) top_k: Option<i64>,
    pub(crate) min_p: Option<f64>,
    pub(crate) repetition_penalty: Option<f64>,
    pub(crate) presence_penalty: Option<f64>,
    pub(crate) frequency_penalty: Option<f64>,
    pub(crate) seed: Option<u64>,
    pub(crate) max_tokens: Option<i64>,
    pub(crate) min_tokens: Option<i64>,
    pub(crate) ignore_eos: bool,
    pub(crate) stop: Vec<String>,
    pub(crate) stop_token_ids: Vec<u32>,
    /// Some(n): return logprobs of sampled tokens plus the top n alternatives.
    pub(crate) logprobs: Option<i64>,
}

impl SamplingInput {
    pub(crate) fn into_params(self, default_max_tokens: usize) -> Result<SamplingParams, ApiError> {
        let mut p = SamplingParams {
            max_tokens: default_max_tokens,
            ..SamplingParams::default()
        };
        let float = |v: Option<f64>, name: &str, dflt: f32| -> Result<f32, ApiError> {
            match v {
                None => Ok(dflt),
                Some(x) if x.is_finite() => Ok(x as f32),
                Some(_) => Err(ApiError::invalid(name, "must be a finite number")),
            }
        };
        let count = |v: Option<i64>, name: &str, min: i64| -> Result<Option<usize>, ApiError> {
            match v {
                None => Ok(None),
                Some(x) if x < min => Err(ApiError::invalid(name, format!("must be >= {min}, got {x}"))),
                Some(x) => Ok(Some(x as usize)),
            }
        };
        p.temperature = float(self.temperature, "temperature", p.temperature)?;
        p.top_p = float(self.top_p, "top_p", p.top_p)?;
        p.min_p = float(self.min_p, "min_p", p.min_p)?;
        p.repetition_penalty = float(self.repetition_penalty, "repetition_penalty", p.repetition_penalty)?;
        p.presence_penalty = float(self.presence_penalty, "presence_penalty", p.presence_penalty)?;
        p.frequency_penalty = float(self.frequency_penalty, "frequency_penalty", p.frequency_penalty)?;
        p.top_k = count(self.top_k, "top_k", 0)?.unwrap_or(p.top_k);
        p.max_tokens = count(self.max_tokens, "max_tokens", 1)?.unwrap_or(p.max_tokens);
        p.min_tokens = count(self.min_tokens, "min_tokens", 0)?.unwrap_or(p.min_tokens);
        p.logprobs = count(self.logprobs, "top_logprobs", 0)?;
        p.seed = self.seed;
        p.ignore_eos = self.ignore_eos;
        p.stop = self.stop;
        p.stop_token_ids = self.stop_token_ids;
        p.validate()?;
        Ok(p)
    }
}

//! One generation request inside the engine: its tokens, progress counter,
//! sampling and detokenization state and the channel its events go to.
//!
//! Invariant: `num_computed <= tokens.len()`; tokens at positions
//! `< num_computed` have their KV in the sequence's blocks (while running).
//! After preemption `num_computed` is 0 and the tokens (prompt + generated)
//! are re-prefilled; sampler and detokenizer state are kept, so the output
//! continues exactly where it stopped. Exercised through the scheduler and
//! engine tests.

use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::detokenizer::Detokenizer;
use super::kv_cache::{CacheDomain, SeqId};
use super::sampler::SeqSampler;
use super::{Constraint, EngineEvent, GenerateRequest, SamplingParams};

#[derive(Debug)]
pub(crate) struct Sequence {
    /// Also the arrival order: ids are handed out at submission.
    pub(crate) id: SeqId,
    pub(crate) request_id: String,
    /// Prompt followed by the generated tokens.
    pub(crate) tokens: Vec<u32>,
    pub(crate) prompt_len: usize,
    /// Tokens whose KV is in the cache (the vLLM V1 progress counter).
    pub(crate) num_computed: usize,
    /// Prompt tokens served from the prefix cache at first admission.
    pub(crate) cached_prompt_tokens: usize,
    pub(crate) cache_domain: CacheDomain,
    pub(crate) params: SamplingParams,
    /// EOS (unless `ignore_eos`) and the stop token ids, sorted and
    /// deduplicated once: the per-token check is a binary search.
    pub(crate) end_ids: Vec<u32>,
    pub(crate) sampler: SeqSampler,
    pub(crate) detok: Detokenizer,
    /// Structured output; moved out while its mask is computed on the mask pool.
    pub(crate) constraint: Option<Box<dyn Constraint>>,
    pub(crate) events: UnboundedSender<EngineEvent>,
    pub(crate) arrival: Instant,
    /// First admission (end of queueing).
    pub(crate) admitted_at: Option<Instant>,
    /// When the newest token was sampled (TTFT / inter-token latency).
    pub(crate) last_token_at: Option<Instant>,
}

impl Sequence {
    /// Fails only when the stop strings are too large for the matcher.
    pub(crate) fn new(
        id: SeqId,
        req: GenerateRequest,
        eos: &[u32],
        events: UnboundedSender<EngineEvent>,
    ) -> anyhow::Result<Self> {
        let GenerateRequest {
            request_id,
            prompt_tokens,
            params,
            cache_salt,
            adapter,
            constraint,
        } = req;
        let prompt_len = prompt_tokens.len();
        let mut end_ids = params.stop_token_ids.clone();
        // A grammar's mask allows EOS exactly where the output may end: it always ends there.
        if !params.ignore_eos || constraint.is_some() {
            end_ids.extend_from_slice(eos);
        }
        end_ids.sort_unstable();
        end_ids.dedup();
        Ok(Self {
            id,
            request_id,
            sampler: SeqSampler::new(params.seed),
            detok: Detokenizer::new(prompt_len, &params.stop)?,
            constraint,
            tokens: prompt_tokens,
            prompt_len,
            num_computed: 0,
            cached_prompt_tokens: 0,
            cache_domain: CacheDomain {
                salt: cache_salt,
                adapter,
            },
            params,
            end_ids,
            events,
            arrival: Instant::now(),
            admitted_at: None,
            last_token_at: None,
        })
    }

    pub(crate) fn num_output(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Known tokens whose KV is not computed yet.
    pub(crate) fn num_uncomputed(&self) -> usize {
        self.tokens.len() - self.num_computed
    }

    /// The client dropped its receiver.
    pub(crate) fn is_cancelled(&self) -> bool {
        self.events.is_closed()
    }

    /// Whether `token` ends the sequence (EOS or a stop token id).
    pub(crate) fn is_end(&self, token: u32) -> bool {
        self.end_ids.binary_search(&token).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_ids_are_eos_and_stop_ids_once_each() {
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let req = |ignore_eos| GenerateRequest {
            prompt_tokens: vec![1],
            params: SamplingParams {
                stop_token_ids: vec![9, 3, 9, 7],
                ignore_eos,
                ..SamplingParams::default()
            },
            ..GenerateRequest::default()
        };
        let s = Sequence::new(1, req(false), &[7, 2], tx.clone()).unwrap();
        assert_eq!(s.end_ids, [2, 3, 7, 9]);
        assert!(s.is_end(2) && s.is_end(9) && !s.is_end(4));
        let s = Sequence::new(2, req(true), &[2], tx).unwrap();
        assert_eq!(s.end_ids, [3, 7, 9]);
        assert!(!s.is_end(2));
    }
}

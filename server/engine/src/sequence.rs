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
use super::kv_cache::SeqId;
use super::sampler::SeqSampler;
use super::{EngineEvent, SamplingParams};

#[derive(Debug)]
pub struct Sequence {
    pub id: SeqId,
    pub request_id: String,
    /// Prompt followed by the generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Tokens whose KV is in the cache (the vLLM V1 progress counter).
    pub num_computed: usize,
    /// Prompt tokens served from the prefix cache at first admission.
    pub cached_prompt_tokens: usize,
    pub params: SamplingParams,
    pub sampler: SeqSampler,
    pub detok: Detokenizer,
    pub events: UnboundedSender<EngineEvent>,
    pub arrival: Instant,
    /// First admission (end of queueing).
    pub admitted_at: Option<Instant>,
    /// When the newest token was sampled (TTFT / inter-token latency).
    pub last_token_at: Option<Instant>,
}

impl Sequence {
    pub fn new(
        id: SeqId,
        request_id: String,
        prompt: Vec<u32>,
        params: SamplingParams,
        events: UnboundedSender<EngineEvent>,
    ) -> Self {
        let prompt_len = prompt.len();
        Self {
            id,
            request_id,
            sampler: SeqSampler::new(params.seed),
            detok: Detokenizer::new(prompt_len, params.stop.clone()),
            tokens: prompt,
            prompt_len,
            num_computed: 0,
            cached_prompt_tokens: 0,
            params,
            events,
            arrival: Instant::now(),
            admitted_at: None,
            last_token_at: None,
        }
    }

    pub fn num_output(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Known tokens whose KV is not computed yet.
    pub fn num_uncomputed(&self) -> usize {
        self.tokens.len() - self.num_computed
    }

    /// The client dropped its receiver.
    pub fn is_cancelled(&self) -> bool {
        self.events.is_closed()
    }
}

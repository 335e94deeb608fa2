//! The generation engine: scheduler, paged KV cache, sampler, detokenizer, and
//! the thread that runs them against a [`runner::ModelRunner`].
//!
//! Threads and channels: [`EngineHandle::submit`] validates and admits
//! synchronously (atomics only, never blocks) and sends the sequence over a
//! std channel to the engine thread, which owns the scheduler, the block
//! manager and the runner. Each request gets its own unbounded tokio channel
//! of [`EngineEvent`]s. A step: take new submissions → drop sequences whose
//! receiver is closed (their blocks are free before this step is planned) →
//! schedule → forward → sample → detokenize → send deltas → free finished
//! sequences. When idle the thread blocks on the command channel.
//!
//! Supervision: every step runs under `catch_unwind`, and the engine keeps
//! every accepted request's sender until its final event, so each request
//! ends with `Finished` or `Failed` whatever breaks in a step.
//! - The forward pass returns an error or panics: that batch fails; the
//!   scheduler did not record it, so the engine continues.
//! - Anything else in a step panics (scheduling, block manager, sampling,
//!   detokenizing, retiring): the scheduler and the block manager can no
//!   longer be trusted, so every running and waiting request fails with
//!   `internal engine error: …`, both are rebuilt empty (the KV pool is
//!   reused; nothing cached survives) and the engine keeps serving.
//! - The engine cannot continue, and stops, when the reset itself panics or
//!   after three consecutive failed steps (`MAX_FAILED_STEPS`: a forward
//!   error or a panic anywhere, with no good step between; e.g. a lost
//!   device). Every request still held fails, the thread exits,
//!   [`EngineHandle::is_up`] turns false and `genai_engine_up` drops to 0;
//!   later submissions get [`SubmitError::EngineStopped`]. A drop guard in the
//!   thread does the same if it ever dies outside this supervision.
//!
//! Panics are logged and counted in `genai_engine_panics_total`. The
//! `GENAI_FAULT_INJECT` test hook (see `fault.rs`) makes steps panic outside
//! the forward pass for end-to-end tests.
//!
//! Tested in `tests` below with a scripted paged model (see `ScriptedRunner`);
//! the parts have their own unit tests. Design note: `README.md` here.

mod config;
mod constraint;
mod detokenizer;
mod fault;
mod kv_cache;
pub mod metric_names;
pub mod runner;
mod sampler;
mod scheduler;
mod sequence;
mod worker;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use tokenizers::Tokenizer;
use tokio::sync::mpsc::UnboundedReceiver;

pub use config::EngineConfig;
pub use constraint::{Constraint, TokenMask};
use fault::Fault;
use kv_cache::BlockManager;
use runner::{ModelInfo, ModelRunner};
use scheduler::Scheduler;
use sequence::Sequence;
use worker::{Command, Engine, Shared, UpGuard};

/// How a request samples and when it stops.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 = off.
    pub top_p: f32,
    /// 0 = off.
    pub top_k: usize,
    /// Drop tokens below `min_p` × the best token's probability; 0 = off.
    pub min_p: f32,
    /// HF style on prompt + output; 1 = off.
    pub repetition_penalty: f32,
    /// OpenAI style on output tokens, in [-2, 2].
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Same seed ⇒ same output, batched or not. None = random.
    pub seed: Option<u64>,
    pub max_tokens: usize,
    /// EOS and stop token ids are masked until this many tokens exist.
    pub min_tokens: usize,
    pub ignore_eos: bool,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    /// Some(n): the sampled token's logprob plus the top n (n <= 20).
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            max_tokens: 256,
            min_tokens: 0,
            ignore_eos: false,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            logprobs: None,
        }
    }
}

/// A rejected request parameter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid `{field}`: {message}")]
pub struct InvalidParam {
    pub field: &'static str,
    pub message: String,
}

fn invalid(field: &'static str, message: impl Into<String>) -> InvalidParam {
    InvalidParam {
        field,
        message: message.into(),
    }
}

/// Most top logprobs a request may ask for.
pub const MAX_LOGPROBS: usize = 20;

impl SamplingParams {
    pub fn validate(&self) -> Result<(), InvalidParam> {
        // Written as negated ranges so NaN is rejected too.
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(invalid("temperature", "must be a finite number >= 0"));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(invalid("top_p", "must be in (0, 1]"));
        }
        if !(self.min_p >= 0.0 && self.min_p <= 1.0) {
            return Err(invalid("min_p", "must be in [0, 1]"));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(invalid("repetition_penalty", "must be a finite number > 0"));
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return Err(invalid("presence_penalty", "must be in [-2, 2]"));
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return Err(invalid("frequency_penalty", "must be in [-2, 2]"));
        }
        if self.max_tokens < 1 {
            return Err(invalid("max_tokens", "must be >= 1"));
        }
        if self.min_tokens > self.max_tokens {
            return Err(invalid("min_tokens", "must be <= max_tokens"));
        }
        if self.logprobs.is_some_and(|n| n > MAX_LOGPROBS) {
            return Err(invalid("logprobs", format!("must be <= {MAX_LOGPROBS}")));
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(invalid("stop", "stop strings must not be empty"));
        }
        Ok(())
    }
}

#[derive(Debug, Default)]
pub struct GenerateRequest {
    pub request_id: String,
    pub prompt_tokens: Vec<u32>,
    pub params: SamplingParams,
    /// Prefix-cache domain (e.g. per tenant): KV blocks are only shared between
    /// requests with the same salt and adapter, so `cached_prompt_tokens` only
    /// reports the caller's own domain. 0 = the shared default domain.
    pub cache_salt: u64,
    /// LoRA adapter slot; None = the base model.
    pub adapter: Option<u32>,
    /// Structured output: only tokens this allows are sampled (see [`Constraint`]). EOS always
    /// ends a constrained sequence, even with `ignore_eos`: the grammar decides when it may end.
    pub constraint: Option<Box<dyn Constraint>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token_id: u32,
    pub token: String,
    pub logprob: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PositionLogprobs {
    pub sampled: TokenLogprob,
    pub top: Vec<TokenLogprob>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
    /// Never produced by the engine: the server's output scanner ended the stream (OpenAI's
    /// `content_filter`).
    ContentFilter,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ContentFilter => "content_filter",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Prompt tokens served from the prefix cache of the request's own domain.
    pub cached_prompt_tokens: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    /// `text` is valid UTF-8 and never contains a stop string; it may lag
    /// `token_ids` (held back until complete).
    Delta {
        text: String,
        token_ids: Vec<u32>,
        logprobs: Vec<PositionLogprobs>,
    },
    Finished {
        reason: FinishReason,
        usage: Usage,
    },
    /// The request failed: the model's forward pass or sampling failed, or
    /// (`internal engine error: …`) the engine hit a bug or stopped.
    Failed {
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("too many waiting requests; retry after {retry_after:?}")]
    QueueFull { retry_after: Duration },
    #[error(transparent)]
    Invalid(InvalidParam),
    #[error("the engine is shutting down")]
    ShuttingDown,
    /// The engine thread is gone (after an internal error) while the server is not shutting down.
    #[error("the engine has stopped")]
    EngineStopped,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    pub kv_blocks_total: usize,
    pub kv_blocks_used: usize,
    /// Free but holding reusable prefix blocks.
    pub kv_blocks_cached: usize,
    /// Slots of the used blocks that hold a computed token (shared blocks counted once); the rest of
    /// `kv_blocks_used * block_size` is the paging waste.
    pub kv_tokens_live: usize,
    /// In tokens, at each request's first admission.
    pub prefix_cache_queries: u64,
    pub prefix_cache_hits: u64,
    pub preemptions: u64,
    pub steps: u64,
}

/// Suggested back-off for a full queue (the HTTP layer's `Retry-After`).
const QUEUE_FULL_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Cheap, cloneable entry point to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    commands: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    info: Arc<ModelInfo>,
    /// Longest prompt + max_tokens accepted (model, config and KV pool bound).
    max_context: usize,
    max_waiting: usize,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle")
            .field("model", &self.info.name)
            .finish_non_exhaustive()
    }
}

impl EngineHandle {
    /// Sizes and allocates the KV pool, then starts the engine thread. Reads
    /// the `GENAI_FAULT_INJECT` test hook once.
    pub fn start(
        runner: Box<dyn ModelRunner>,
        tokenizer: Arc<Tokenizer>,
        cfg: &EngineConfig,
    ) -> anyhow::Result<EngineHandle> {
        Self::start_with(runner, tokenizer, cfg, Fault::from_env()?)
    }

    fn start_with(
        mut runner: Box<dyn ModelRunner>,
        tokenizer: Arc<Tokenizer>,
        cfg: &EngineConfig,
        fault: Fault,
    ) -> anyhow::Result<EngineHandle> {
        let info = runner.info().clone();
        if info.kv_bytes_per_token == 0 || cfg.block_size == 0 {
            bail!("model {} reports 0 KV bytes per token or block_size is 0", info.name);
        }
        let num_blocks = (cfg.kv_cache_mib << 20) / (info.kv_bytes_per_token * cfg.block_size);
        if num_blocks == 0 {
            bail!(
                "engine.kv_cache_mib = {} holds less than one block of {} tokens ({} bytes per token)",
                cfg.kv_cache_mib,
                cfg.block_size,
                info.kv_bytes_per_token
            );
        }
        let mut max_context = info.context_length.min(num_blocks * cfg.block_size);
        if cfg.max_context > 0 {
            max_context = max_context.min(cfg.max_context);
        }
        runner
            .allocate_kv(num_blocks, cfg.block_size)
            .with_context(|| format!("allocating {num_blocks} KV blocks"))?;
        if fault != Fault::None {
            tracing::warn!(?fault, "test fault injection is on");
        }
        let shared = Arc::new(Shared {
            stats: Mutex::new(EngineStats {
                kv_blocks_total: num_blocks,
                ..EngineStats::default()
            }),
            queued: AtomicUsize::new(0),
            shutting_down: AtomicBool::new(false),
            up: AtomicBool::new(true),
            next_id: AtomicU64::new(1),
        });
        let (tx, rx) = mpsc::channel();
        let scheduler = Scheduler::new(
            BlockManager::new(num_blocks, cfg.block_size),
            cfg.max_batch_tokens,
            cfg.max_running,
        );
        let mask_pool = rayon::ThreadPoolBuilder::new()
            .num_threads(worker::mask_pool_threads())
            .thread_name(|i| format!("genai-mask-{i}"))
            .build()
            .context("starting the structured-output mask pool")?;
        let engine = Engine::new(runner, mask_pool, tokenizer, scheduler, shared.clone(), fault);
        metrics::gauge!(metric_names::ENGINE_UP).set(1.0);
        // Dropped with the closure if the thread never starts.
        let guard = UpGuard(shared.clone());
        std::thread::Builder::new()
            .name("genai-engine".into())
            .spawn(move || {
                let _guard = guard;
                engine.run(rx);
            })
            .context("spawning the engine thread")?;
        tracing::info!(num_blocks, block_size = cfg.block_size, max_context, "engine started");
        Ok(EngineHandle {
            commands: tx,
            shared,
            info: Arc::new(info),
            max_context,
            max_waiting: cfg.max_waiting,
        })
    }

    /// Validates and queues a request; never blocks.
    pub fn submit(&self, req: GenerateRequest) -> Result<UnboundedReceiver<EngineEvent>, SubmitError> {
        let rejected =
            |reason: &'static str| metrics::counter!(metric_names::REQUESTS_REJECTED, "reason" => reason).increment(1);
        // Shutting down is the expected stop; an engine that stopped on its own is not.
        let stopped = || {
            if self.shared.shutting_down.load(Ordering::Acquire) {
                rejected("shutting_down");
                SubmitError::ShuttingDown
            } else {
                rejected("engine_stopped");
                SubmitError::EngineStopped
            }
        };
        if self.shared.shutting_down.load(Ordering::Acquire) || !self.is_up() {
            return Err(stopped());
        }
        if let Err(e) = self.check(&req) {
            rejected("invalid");
            return Err(SubmitError::Invalid(e));
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let seq = match Sequence::new(id, req, &self.info.eos_token_ids, tx) {
            Ok(seq) => seq,
            Err(e) => {
                rejected("invalid");
                return Err(SubmitError::Invalid(invalid("stop", format!("{e:#}"))));
            }
        };
        let admitted = self
            .shared
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q < self.max_waiting).then_some(q + 1)
            });
        if admitted.is_err() {
            rejected("queue_full");
            return Err(SubmitError::QueueFull {
                retry_after: QUEUE_FULL_RETRY_AFTER,
            });
        }
        if self.commands.send(Command::Submit(Box::new(seq))).is_err() {
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(stopped());
        }
        Ok(rx)
    }

    fn check(&self, req: &GenerateRequest) -> Result<(), InvalidParam> {
        req.params.validate()?;
        let n = req.prompt_tokens.len();
        if n == 0 {
            return Err(invalid("prompt", "must not be empty"));
        }
        if let Some(&t) = req.prompt_tokens.iter().find(|&&t| t as usize >= self.info.vocab_size) {
            return Err(invalid(
                "prompt",
                format!("token id {t} is outside the vocabulary ({})", self.info.vocab_size),
            ));
        }
        if n >= self.max_context {
            return Err(invalid(
                "prompt",
                format!("{n} tokens leave no room in the context of {} tokens", self.max_context),
            ));
        }
        if n + req.params.max_tokens > self.max_context {
            return Err(invalid(
                "max_tokens",
                format!(
                    "prompt ({n}) + max_tokens ({}) exceeds the context of {} tokens",
                    req.params.max_tokens, self.max_context
                ),
            ));
        }
        Ok(())
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn stats(&self) -> EngineStats {
        self.shared.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Longest prompt + completion a request may have, in tokens (the model's context, capped by
    /// the KV pool and `engine.max_context`).
    pub fn max_context(&self) -> usize {
        self.max_context
    }

    /// False once the engine thread has exited: shut down, given up after
    /// internal errors, or died. Health checks follow it.
    pub fn is_up(&self) -> bool {
        self.shared.up.load(Ordering::Acquire)
    }

    /// Stops admitting; accepted requests still finish, then the thread exits.
    pub fn shutdown(&self) {
        self.shared.shutting_down.store(true, Ordering::Release);
        // Wake an idle engine thread so it notices; a request that loses the
        // race with the flag is still served.
        let _ = self.commands.send(Command::Wake);
    }
}

#[cfg(test)]
mod tests {
    use super::kv_cache::SeqId;
    use super::runner::{BatchEntry, ForwardBatch};
    use super::*;
    use std::collections::HashSet;
    use std::time::Instant;

    /// Token ids 0..93 of the byte-level test tokenizer are printable ASCII
    /// ('!'..='}'); the model only ever generates those.
    const PRINTABLE: u32 = 93;
    const EOS: u32 = 200;
    /// '~': never generated; a prompt containing it makes forward fail.
    const POISON: u32 = 93;
    /// Never generated; a prompt containing it makes forward panic.
    const PANIC: u32 = 94;

    /// One forward entry as the runner saw it: (seq, start_pos, num tokens, want_logits).
    type Logged = (SeqId, usize, usize, bool);

    /// A model whose logits are a pure function of the sequence's token
    /// history, where the history is read back from its own paged store
    /// through the block table it is given: a wrong block table or a bad
    /// prefix hit changes (or fails) the output.
    struct ScriptedRunner {
        info: ModelInfo,
        block_size: usize,
        /// The paged "KV cache": what was computed into each slot.
        store: Vec<Option<Kv>>,
        log: Arc<Mutex<Vec<Vec<Logged>>>>,
        /// Each forward first takes one permit (when gated).
        permits: Option<mpsc::Receiver<()>>,
        /// Told when a forward starts (when gated).
        entered: Option<mpsc::Sender<()>>,
        /// EOS becomes the best token once a history is this long.
        eos_at: Option<usize>,
        /// The logits of a history this long hold a NaN.
        nan_at: Option<usize>,
    }

    fn info(num_blocks: usize, block_size: usize) -> ModelInfo {
        ModelInfo {
            name: "scripted".into(),
            vocab_size: 256,
            eos_token_ids: vec![EOS],
            context_length: 4096,
            num_layers: 1,
            num_kv_heads: 1,
            head_dim: 1,
            // Chosen so that kv_cache_mib = 1 gives exactly `num_blocks`.
            kv_bytes_per_token: (1 << 20) / (num_blocks * block_size),
        }
    }

    /// A slot's content. Like real KV, it depends on the whole prefix, so a
    /// block reused under a different prefix is detected.
    #[derive(Debug, Clone, Copy, PartialEq)]
    struct Kv {
        token: u32,
        pos: usize,
        /// `chain` over tokens `0..=pos`.
        prefix: u64,
    }

    /// FNV-1a step.
    fn chain(h: u64, t: u32) -> u64 {
        (h ^ t as u64).wrapping_mul(0x100_0000_01b3)
    }

    const FNV_SEED: u64 = 0xcbf2_9ce4_8422_2325;

    impl ScriptedRunner {
        fn new(num_blocks: usize, block_size: usize) -> Self {
            Self {
                info: info(num_blocks, block_size),
                block_size,
                store: Vec::new(),
                log: Arc::default(),
                permits: None,
                entered: None,
                eos_at: None,
                nan_at: None,
            }
        }

        fn logits(&self, history: &[u32]) -> Vec<f32> {
            // Hash of the history, then one pseudo-random logit per token.
            let h = history.iter().fold(FNV_SEED, |h, &t| chain(h, t));
            let mut row: Vec<f32> = (0..self.info.vocab_size as u64)
                .map(|v| {
                    let x = (h ^ v.wrapping_mul(0x9e37_79b9_7f4a_7c15)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                    ((x >> 40) % 1000) as f32 / 250.0
                })
                .collect();
            for (v, l) in row.iter_mut().enumerate() {
                if v as u32 >= PRINTABLE {
                    *l = -100.0;
                }
            }
            if self.eos_at.is_some_and(|n| history.len() >= n) {
                row[EOS as usize] = 100.0;
            }
            if self.nan_at == Some(history.len()) {
                row[7] = f32::NAN;
            }
            row
        }

        /// Reads positions `0..end` of the entry's sequence back from the
        /// store, checking each slot holds that position under that prefix.
        fn read(&self, e: &BatchEntry, end: usize) -> anyhow::Result<(Vec<u32>, u64)> {
            let mut h = FNV_SEED;
            let mut history = Vec::with_capacity(end);
            for p in 0..end {
                match self.store[self.slot(e, p)?] {
                    Some(kv) if kv.pos == p && kv.prefix == chain(h, kv.token) => {
                        h = kv.prefix;
                        history.push(kv.token);
                    }
                    other => bail!("seq {} position {p}: slot holds {other:?}", e.seq_id),
                }
            }
            Ok((history, h))
        }

        fn slot(&self, e: &BatchEntry, pos: usize) -> anyhow::Result<usize> {
            let block = *e
                .block_table
                .get(pos / self.block_size)
                .context("position beyond the block table")?;
            let slot = block as usize * self.block_size + pos % self.block_size;
            anyhow::ensure!(slot < self.store.len(), "block {block} outside the pool");
            Ok(slot)
        }
    }

    impl ModelRunner for ScriptedRunner {
        fn info(&self) -> &ModelInfo {
            &self.info
        }

        fn allocate_kv(&mut self, num_blocks: usize, block_size: usize) -> anyhow::Result<()> {
            assert_eq!(block_size, self.block_size);
            self.store = vec![None; num_blocks * block_size];
            Ok(())
        }

        fn forward(&mut self, batch: &ForwardBatch) -> anyhow::Result<Vec<Vec<f32>>> {
            if let Some(tx) = &self.entered {
                let _ = tx.send(());
            }
            if let Some(rx) = &self.permits {
                rx.recv()?;
            }
            self.log.lock().unwrap().push(
                batch
                    .entries
                    .iter()
                    .map(|e| (e.seq_id, e.start_pos, e.tokens.len(), e.want_logits))
                    .collect(),
            );
            if batch.entries.iter().any(|e| e.tokens.contains(&PANIC)) {
                panic!("scripted runner panic");
            }
            if batch.entries.iter().any(|e| e.tokens.contains(&POISON)) {
                bail!("poisoned input");
            }
            let bs = self.block_size;
            for &(src, dst) in &batch.block_copies {
                let (s, d) = (src as usize * bs, dst as usize * bs);
                let copy = self.store[s..s + bs].to_vec();
                self.store[d..d + bs].copy_from_slice(&copy);
            }
            let mut written = HashSet::new();
            for e in &batch.entries {
                let end = e.start_pos + e.tokens.len();
                anyhow::ensure!(
                    e.block_table.len() == end.div_ceil(bs),
                    "block table length for {end} tokens"
                );
                let (_, mut h) = self.read(e, e.start_pos)?;
                for (i, &t) in e.tokens.iter().enumerate() {
                    let slot = self.slot(e, e.start_pos + i)?;
                    anyhow::ensure!(written.insert(slot), "two sequences write slot {slot} in one step");
                    h = chain(h, t);
                    self.store[slot] = Some(Kv {
                        token: t,
                        pos: e.start_pos + i,
                        prefix: h,
                    });
                }
            }
            let mut rows = Vec::new();
            for e in batch.entries.iter().filter(|e| e.want_logits) {
                let (history, _) = self.read(e, e.start_pos + e.tokens.len())?;
                rows.push(self.logits(&history));
            }
            Ok(rows)
        }
    }

    fn config(max_batch_tokens: usize, max_running: usize, max_waiting: usize) -> EngineConfig {
        EngineConfig {
            block_size: 4,
            kv_cache_mib: 1,
            max_batch_tokens,
            max_running,
            max_waiting,
            ..EngineConfig::default()
        }
    }

    fn start(runner: ScriptedRunner, cfg: &EngineConfig) -> EngineHandle {
        start_with_fault(runner, cfg, Fault::None)
    }

    fn start_with_fault(runner: ScriptedRunner, cfg: &EngineConfig, fault: Fault) -> EngineHandle {
        let tok = Arc::new(detokenizer::tests::byte_tokenizer());
        EngineHandle::start_with(Box::new(runner), tok, cfg, fault).unwrap()
    }

    fn request(id: &str, prompt: Vec<u32>, params: SamplingParams) -> GenerateRequest {
        GenerateRequest {
            request_id: id.into(),
            prompt_tokens: prompt,
            params,
            ..GenerateRequest::default()
        }
    }

    fn prompt(i: u32, len: usize) -> Vec<u32> {
        (0..len as u32).map(|k| (i * 7 + k * 3) % PRINTABLE).collect()
    }

    #[derive(Debug, Default, PartialEq)]
    struct Outcome {
        text: String,
        tokens: Vec<u32>,
        finish: Option<FinishReason>,
        usage: Usage,
        failed: Option<String>,
        logprobs: Vec<PositionLogprobs>,
    }

    fn collect(mut rx: UnboundedReceiver<EngineEvent>) -> Outcome {
        let mut o = Outcome::default();
        while let Some(ev) = rx.blocking_recv() {
            match ev {
                EngineEvent::Delta {
                    text,
                    token_ids,
                    logprobs,
                } => {
                    o.text.push_str(&text);
                    o.tokens.extend(token_ids);
                    o.logprobs.extend(logprobs);
                }
                EngineEvent::Finished { reason, usage } => {
                    o.finish = Some(reason);
                    o.usage = usage;
                    break;
                }
                EngineEvent::Failed { message } => {
                    o.failed = Some(message);
                    break;
                }
            }
        }
        o
    }

    fn sampled(seed: u64, max_tokens: usize) -> SamplingParams {
        SamplingParams {
            temperature: 0.9,
            top_k: 40,
            top_p: 0.95,
            seed: Some(seed),
            max_tokens,
            ..SamplingParams::default()
        }
    }

    fn wait_for(h: &EngineHandle, what: impl Fn(&EngineStats) -> bool) -> EngineStats {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = h.stats();
            if what(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "timed out; stats {s:?}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Runs the 16 requests one at a time on a roomy engine.
    fn alone(reqs: Vec<GenerateRequest>) -> Vec<Outcome> {
        let h = start(ScriptedRunner::new(256, 4), &config(64, 16, 64));
        reqs.into_iter().map(|r| collect(h.submit(r).unwrap())).collect()
    }

    fn sixteen() -> Vec<GenerateRequest> {
        (0..16u32)
            .map(|i| {
                request(
                    &format!("r{i}"),
                    prompt(i, 5 + i as usize),
                    sampled(i as u64, 12 + i as usize),
                )
            })
            .collect()
    }

    #[test]
    fn same_output_alone_and_among_sixteen_concurrent() {
        let expected = alone(sixteen());
        let runner = ScriptedRunner::new(256, 4);
        let log = runner.log.clone();
        let h = start(runner, &config(64, 16, 64));
        let reqs = sixteen();
        let max_tokens: Vec<_> = reqs.iter().map(|r| r.params.max_tokens).collect();
        let rxs: Vec<_> = reqs.into_iter().map(|r| h.submit(r).unwrap()).collect();
        let got: Vec<_> = rxs.into_iter().map(collect).collect();
        assert_eq!(got, expected);
        for (o, max_tokens) in got.iter().zip(max_tokens) {
            assert_eq!(o.finish, Some(FinishReason::Length));
            assert_eq!(o.tokens.len(), max_tokens);
            assert_eq!(o.text.len(), o.tokens.len(), "one printable byte per token");
        }
        assert!(
            log.lock().unwrap().iter().any(|step| step.len() >= 8),
            "requests were batched"
        );
    }

    #[test]
    fn tiny_kv_pool_forces_preemption_and_output_stays_identical() {
        let expected = alone(sixteen());
        // 16 blocks of 4 tokens: the longest request alone needs 12 blocks.
        let h = start(ScriptedRunner::new(16, 4), &config(64, 16, 64));
        let rxs: Vec<_> = sixteen().into_iter().map(|r| h.submit(r).unwrap()).collect();
        let got: Vec<_> = rxs.into_iter().map(collect).collect();
        assert_eq!(
            got.iter().map(|o| &o.tokens).collect::<Vec<_>>(),
            expected.iter().map(|o| &o.tokens).collect::<Vec<_>>()
        );
        assert_eq!(
            got.iter().map(|o| &o.text).collect::<Vec<_>>(),
            expected.iter().map(|o| &o.text).collect::<Vec<_>>()
        );
        let s = wait_for(&h, |s| s.running == 0);
        assert!(s.preemptions > 0, "{s:?}");
        assert_eq!(s.kv_blocks_used, 0);
        // Re-admissions after preemption are not prefix-cache queries again.
        let prompts: usize = sixteen().iter().map(|r| r.prompt_tokens.len()).sum();
        assert_eq!(s.prefix_cache_queries, prompts as u64);
    }

    #[test]
    fn continuous_batching_admits_mid_flight_and_chunks_long_prompts() {
        let mut runner = ScriptedRunner::new(256, 4);
        let (permit, permits) = mpsc::channel();
        runner.permits = Some(permits);
        let log = runner.log.clone();
        let h = start(runner, &config(16, 8, 8));
        let a = h.submit(request("a", prompt(1, 3), sampled(1, 30))).unwrap();
        for _ in 0..3 {
            permit.send(()).unwrap();
        }
        wait_for(&h, |s| s.steps == 3);
        // A 100-token prompt arrives while `a` decodes.
        let b = h.submit(request("b", prompt(2, 100), sampled(2, 5))).unwrap();
        for _ in 0..200 {
            permit.send(()).unwrap();
        }
        let (a, b) = (collect(a), collect(b));
        assert_eq!((a.tokens.len(), b.tokens.len()), (30, 5));
        let log = log.lock().unwrap();
        let (ida, idb) = (1, 2); // ids in submission order
        let prefill_steps: Vec<_> = log.iter().filter(|s| s.iter().any(|e| e.0 == idb && e.2 > 1)).collect();
        // 100 tokens under a 16-token budget shared with one decode: 15 per step.
        assert_eq!(prefill_steps.len(), 7, "{prefill_steps:?}");
        for step in &prefill_steps {
            assert!(
                step.contains(&(ida, step[0].1, 1, true)),
                "decode of `a` runs first in {step:?}"
            );
            assert!(step.iter().map(|e| e.2).sum::<usize>() <= 16);
        }
        assert!(
            !prefill_steps[5].iter().any(|e| e.0 == idb && e.3),
            "non-final chunk wants no logits"
        );
        assert!(
            prefill_steps[6].iter().any(|e| e.0 == idb && e.3),
            "final chunk wants logits"
        );
    }

    #[test]
    fn dropping_the_receiver_frees_blocks_within_a_step() {
        let mut runner = ScriptedRunner::new(64, 4);
        let (permit, permits) = mpsc::channel();
        runner.permits = Some(permits);
        let h = start(runner, &config(64, 8, 8));
        let mut rx = h.submit(request("a", prompt(1, 10), sampled(1, 100))).unwrap();
        permit.send(()).unwrap();
        assert!(matches!(rx.blocking_recv(), Some(EngineEvent::Delta { .. })));
        let before = wait_for(&h, |s| s.steps == 1);
        assert_eq!(before.kv_blocks_used, 3);
        drop(rx);
        // At most the step already planned runs; its delta finds no receiver.
        permit.send(()).unwrap();
        let after = wait_for(&h, |s| s.running == 0);
        assert_eq!(after.kv_blocks_used, 0);
        assert!(after.steps <= 2, "{after:?}");
    }

    #[test]
    fn full_waiting_queue_rejects_with_retry_after() {
        let mut runner = ScriptedRunner::new(64, 4);
        let (permit, permits) = mpsc::channel();
        let (entered_tx, entered) = mpsc::channel();
        runner.permits = Some(permits);
        runner.entered = Some(entered_tx);
        let h = start(runner, &config(64, 1, 2));
        let a = h.submit(request("a", prompt(1, 4), sampled(1, 3))).unwrap();
        entered.recv().unwrap(); // `a` is admitted and its first step is blocked.
        let b = h.submit(request("b", prompt(2, 4), sampled(2, 3))).unwrap();
        let c = h.submit(request("c", prompt(3, 4), sampled(3, 3))).unwrap();
        let full = h.submit(request("d", prompt(4, 4), sampled(4, 3))).unwrap_err();
        assert_eq!(
            full,
            SubmitError::QueueFull {
                retry_after: QUEUE_FULL_RETRY_AFTER
            }
        );
        for _ in 0..9 {
            permit.send(()).unwrap();
        }
        for rx in [a, b, c] {
            assert_eq!(collect(rx).finish, Some(FinishReason::Length));
        }
        // Room again once they are admitted.
        let d = h.submit(request("d", prompt(4, 4), sampled(4, 1))).unwrap();
        permit.send(()).unwrap();
        assert_eq!(collect(d).tokens.len(), 1);
    }

    #[test]
    fn shared_system_prompt_is_prefilled_once() {
        let runner = ScriptedRunner::new(256, 4);
        let log = runner.log.clone();
        let h = start(runner, &config(64, 8, 8));
        let system = prompt(9, 32);
        let with_question = |q: u32| [system.clone(), prompt(q, 5)].concat();
        let first = collect(h.submit(request("0", with_question(0), sampled(0, 4))).unwrap());
        assert_eq!(first.usage.cached_prompt_tokens, 0);
        let rxs: Vec<_> = (1..=4)
            .map(|q| h.submit(request("q", with_question(q), sampled(q as u64, 4))).unwrap())
            .collect();
        for rx in rxs {
            let o = collect(rx);
            assert_eq!(
                o.usage,
                Usage {
                    prompt_tokens: 37,
                    completion_tokens: 4,
                    cached_prompt_tokens: 32
                }
            );
        }
        let s = wait_for(&h, |s| s.prefix_cache_queries == 5 * 37);
        assert_eq!((s.prefix_cache_queries, s.prefix_cache_hits), (5 * 37, 4 * 32));
        // Computed: 37 + 3 decodes for the first, then 5 + 3 for each other.
        let computed: usize = log.lock().unwrap().iter().flatten().map(|e| e.2).sum();
        assert_eq!(computed, 40 + 4 * 8);
        // Same result as computing everything.
        let fresh = start(ScriptedRunner::new(256, 4), &config(64, 8, 8));
        let again = collect(fresh.submit(request("q", with_question(3), sampled(3, 4))).unwrap());
        let shared = collect(h.submit(request("q", with_question(3), sampled(3, 4))).unwrap());
        assert_eq!(again.tokens, shared.tokens);
    }

    #[test]
    fn stop_strings_eos_and_min_tokens() {
        let greedy = |max_tokens| SamplingParams {
            max_tokens,
            ..SamplingParams::default()
        };
        let h = start(ScriptedRunner::new(64, 4), &config(64, 8, 8));
        let full = collect(h.submit(request("a", prompt(1, 6), greedy(20))).unwrap());
        assert_eq!(full.text.len(), 20);
        // Stop at a 3-character string that first occurs at byte 8 or later.
        let stop = (8..17)
            .map(|i| full.text[i..i + 3].to_string())
            .find(|s| full.text.find(s.as_str()).unwrap() >= 8)
            .unwrap();
        let at = full.text.find(&stop).unwrap();
        let params = SamplingParams {
            stop: vec![stop],
            ..greedy(20)
        };
        let o = collect(h.submit(request("b", prompt(1, 6), params)).unwrap());
        assert_eq!(
            (o.text.as_str(), o.finish),
            (&full.text[..at], Some(FinishReason::Stop))
        );
        assert_eq!(o.tokens.len(), at + 3, "the stop string's tokens were generated");

        let mut runner = ScriptedRunner::new(64, 4);
        runner.eos_at = Some(10);
        let h = start(runner, &config(64, 8, 8));
        let o = collect(h.submit(request("c", prompt(1, 6), greedy(20))).unwrap());
        assert_eq!((o.tokens.len(), o.finish), (5, Some(FinishReason::Stop)));
        assert_eq!(o.tokens.last(), Some(&EOS));
        assert_eq!(o.text.len(), 4, "EOS is not text");
        let p = SamplingParams {
            min_tokens: 8,
            ..greedy(20)
        };
        let o = collect(h.submit(request("d", prompt(1, 6), p)).unwrap());
        assert_eq!((o.tokens.len(), o.tokens[8]), (9, EOS));
        let p = SamplingParams {
            ignore_eos: true,
            ..greedy(12)
        };
        let o = collect(h.submit(request("e", prompt(1, 6), p)).unwrap());
        assert_eq!((o.tokens.len(), o.finish), (12, Some(FinishReason::Length)));
        assert!(o.tokens[4..].iter().all(|&t| t == EOS));
    }

    #[test]
    fn logprobs_are_reported_per_token() {
        let h = start(ScriptedRunner::new(64, 4), &config(64, 8, 8));
        let p = SamplingParams {
            logprobs: Some(3),
            max_tokens: 4,
            ..SamplingParams::default()
        };
        let o = collect(h.submit(request("a", prompt(1, 6), p)).unwrap());
        assert_eq!(o.logprobs.len(), 4);
        for (lp, &t) in o.logprobs.iter().zip(&o.tokens) {
            assert_eq!(lp.sampled.token_id, t);
            assert_eq!(lp.top.len(), 3);
            // Greedy: the sampled token is the top one.
            assert_eq!(lp.top[0], lp.sampled);
            assert!(lp.top.windows(2).all(|w| w[0].logprob >= w[1].logprob) && lp.top[0].logprob < 0.0);
        }
    }

    #[test]
    fn runner_errors_fail_the_batch_and_the_engine_keeps_running() {
        let h = start(ScriptedRunner::new(64, 4), &config(64, 8, 8));
        let bad = collect(h.submit(request("bad", vec![1, POISON, 2], sampled(1, 5))).unwrap());
        assert!(bad.failed.unwrap().contains("poisoned input"));
        let panicked = collect(h.submit(request("panic", vec![1, PANIC], sampled(1, 5))).unwrap());
        assert!(panicked.failed.unwrap().contains("scripted runner panic"));
        let good = collect(h.submit(request("good", prompt(1, 5), sampled(1, 5))).unwrap());
        assert_eq!(good.finish, Some(FinishReason::Length));
        wait_for(&h, |s| s.running == 0 && s.kv_blocks_used == 0);
    }

    #[test]
    fn submit_validates_and_shutdown_drains() {
        let h = start(ScriptedRunner::new(64, 4), &config(64, 8, 8));
        assert_eq!(h.max_context, 256, "bounded by the 64 x 4 token pool");
        let field = |r: GenerateRequest| match h.submit(r) {
            Err(SubmitError::Invalid(e)) => e.field,
            other => panic!("expected Invalid, got {other:?}"),
        };
        assert_eq!(field(request("x", vec![], sampled(1, 5))), "prompt");
        assert_eq!(field(request("x", vec![300], sampled(1, 5))), "prompt");
        assert_eq!(field(request("x", vec![1; 256], sampled(1, 5))), "prompt");
        assert_eq!(field(request("x", vec![1; 200], sampled(1, 57))), "max_tokens");
        let p = SamplingParams {
            temperature: -1.0,
            ..sampled(1, 5)
        };
        assert_eq!(field(request("x", vec![1], p)), "temperature");
        let ok = h.submit(request("x", vec![1; 200], sampled(1, 56))).unwrap();
        h.shutdown();
        assert_eq!(
            h.submit(request("y", vec![1], sampled(1, 5))).unwrap_err(),
            SubmitError::ShuttingDown
        );
        assert_eq!(collect(ok).tokens.len(), 56, "accepted work still finishes");
    }

    #[test]
    fn validate_names_the_field() {
        let bad = |p: SamplingParams| p.validate().unwrap_err().field;
        let d = SamplingParams::default;
        assert!(d().validate().is_ok());
        assert_eq!(
            bad(SamplingParams {
                temperature: f32::NAN,
                ..d()
            }),
            "temperature"
        );
        assert_eq!(bad(SamplingParams { top_p: 0.0, ..d() }), "top_p");
        assert_eq!(bad(SamplingParams { min_p: 1.5, ..d() }), "min_p");
        assert_eq!(
            bad(SamplingParams {
                repetition_penalty: 0.0,
                ..d()
            }),
            "repetition_penalty"
        );
        assert_eq!(
            bad(SamplingParams {
                presence_penalty: 2.5,
                ..d()
            }),
            "presence_penalty"
        );
        assert_eq!(
            bad(SamplingParams {
                frequency_penalty: -3.0,
                ..d()
            }),
            "frequency_penalty"
        );
        assert_eq!(bad(SamplingParams { max_tokens: 0, ..d() }), "max_tokens");
        assert_eq!(
            bad(SamplingParams {
                logprobs: Some(21),
                ..d()
            }),
            "logprobs"
        );
        assert_eq!(bad(SamplingParams { min_tokens: 300, ..d() }), "min_tokens");
    }

    #[test]
    fn stop_token_ids_end_the_sequence_and_are_not_text() {
        let greedy = SamplingParams {
            max_tokens: 20,
            ..SamplingParams::default()
        };
        let h = start(ScriptedRunner::new(64, 4), &config(64, 8, 8));
        let full = collect(h.submit(request("a", prompt(1, 6), greedy.clone())).unwrap());
        let stop_at = full.tokens[6];
        let first = full.tokens.iter().position(|&t| t == stop_at).unwrap();
        let p = SamplingParams {
            stop_token_ids: vec![250, stop_at, 3],
            ..greedy
        };
        let o = collect(h.submit(request("b", prompt(1, 6), p)).unwrap());
        assert_eq!(o.finish, Some(FinishReason::Stop));
        assert_eq!(o.tokens, full.tokens[..=first]);
        assert_eq!(o.text, full.text[..first]);
    }

    #[test]
    fn prefix_cache_hits_stay_within_the_salt_and_adapter() {
        let h = start(ScriptedRunner::new(256, 4), &config(64, 8, 8));
        let run = |salt: u64, adapter: Option<u32>| {
            let req = GenerateRequest {
                cache_salt: salt,
                adapter,
                ..request("r", prompt(5, 33), sampled(1, 2))
            };
            collect(h.submit(req).unwrap())
        };
        let first = run(1, None);
        assert_eq!(first.usage.cached_prompt_tokens, 0);
        assert_eq!(run(2, None).usage.cached_prompt_tokens, 0, "another tenant");
        assert_eq!(run(0, None).usage.cached_prompt_tokens, 0, "the shared domain");
        assert_eq!(run(1, Some(3)).usage.cached_prompt_tokens, 0, "another adapter");
        let again = run(1, None);
        assert_eq!(again.usage.cached_prompt_tokens, 32, "same tenant");
        assert_eq!(again.tokens, first.tokens, "cached KV gives the same output");
    }

    #[test]
    fn nan_logits_fail_the_sequence_not_the_engine() {
        let mut runner = ScriptedRunner::new(64, 4);
        runner.nan_at = Some(9);
        let h = start(runner, &config(64, 8, 8));
        let o = collect(h.submit(request("a", prompt(1, 6), sampled(1, 10))).unwrap());
        assert_eq!(o.tokens.len(), 3, "tokens sampled from histories of 6, 7, 8");
        let message = o.failed.unwrap();
        assert!(message.contains("non-finite logit (NaN) for token 7"), "{message}");
        let good = collect(h.submit(request("b", prompt(2, 20), sampled(2, 5))).unwrap());
        assert_eq!(good.finish, Some(FinishReason::Length));
        assert!(h.is_up());
    }

    #[test]
    fn a_panic_outside_forward_fails_every_request_and_the_engine_recovers() {
        let mut runner = ScriptedRunner::new(64, 4);
        let (permit, permits) = mpsc::channel();
        runner.permits = Some(permits);
        // One running sequence at a time: `b` waits while `a` runs.
        let h = start_with_fault(runner, &config(64, 1, 8), Fault::StepPanicAt(2));
        let a = h.submit(request("a", prompt(1, 6), sampled(1, 10))).unwrap();
        let b = h.submit(request("b", prompt(2, 6), sampled(2, 10))).unwrap();
        permit.send(()).unwrap();
        permit.send(()).unwrap();
        let (a, b) = (collect(a), collect(b));
        // `a` got its two tokens (step 2 panicked after sampling), then the error.
        assert_eq!(a.tokens.len(), 2);
        for o in [&a, &b] {
            let message = o.failed.as_deref().unwrap();
            assert!(
                message.starts_with("internal engine error: injected fault"),
                "{message}"
            );
        }
        assert!(b.tokens.is_empty(), "waiting requests fail too");
        let s = wait_for(&h, |s| s.running == 0 && s.waiting == 0);
        assert_eq!((s.kv_blocks_used, s.kv_blocks_cached), (0, 0), "a fresh pool");
        assert_eq!(h.shared.queued.load(Ordering::Acquire), 0);
        assert!(h.is_up());
        for _ in 0..5 {
            permit.send(()).unwrap();
        }
        let c = collect(h.submit(request("c", prompt(3, 6), sampled(3, 5))).unwrap());
        assert_eq!(c.finish, Some(FinishReason::Length));
    }

    #[test]
    fn panicking_steps_in_a_row_take_the_engine_down() {
        let h = start_with_fault(ScriptedRunner::new(64, 4), &config(64, 8, 8), Fault::StepPanicAlways);
        for i in 0..worker::MAX_FAILED_STEPS {
            assert!(h.is_up());
            let o = collect(h.submit(request("r", prompt(i, 6), sampled(1, 5))).unwrap());
            let message = o.failed.unwrap();
            assert!(message.starts_with("internal engine error"), "{message}");
        }
        // The last failure was sent after the engine was marked down.
        assert!(!h.is_up());
        assert_eq!(
            h.submit(request("late", prompt(9, 6), sampled(1, 5))).unwrap_err(),
            SubmitError::EngineStopped
        );
        h.shutdown();
        assert_eq!(
            h.submit(request("late", prompt(9, 6), sampled(1, 5))).unwrap_err(),
            SubmitError::ShuttingDown
        );
    }

    #[test]
    fn a_thread_that_dies_anyhow_marks_the_engine_down() {
        let h = start(ScriptedRunner::new(64, 4), &config(64, 8, 8));
        let guard = UpGuard(h.shared.clone());
        assert!(std::thread::spawn(move || {
            let _guard = guard;
            panic!("engine thread died");
        })
        .join()
        .is_err());
        assert!(!h.is_up());
        assert_eq!(
            h.submit(request("r", prompt(1, 6), sampled(1, 5))).unwrap_err(),
            SubmitError::EngineStopped
        );
    }

    #[test]
    fn shutdown_marks_the_engine_down_once_the_thread_exits() {
        let h = start(ScriptedRunner::new(64, 4), &config(64, 8, 8));
        assert!(h.is_up());
        h.shutdown();
        let deadline = Instant::now() + Duration::from_secs(10);
        while h.is_up() {
            assert!(Instant::now() < deadline, "the engine thread did not exit");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(
            h.submit(request("r", prompt(1, 6), sampled(1, 5))).unwrap_err(),
            SubmitError::ShuttingDown
        );
    }

    /// A scripted structured-output constraint: spells `script`, then allows only EOS
    /// (`then_eos`) or declares itself finished. Fails or panics at a chosen position; its first
    /// mask can be gated (announces itself, then waits to be released).
    #[derive(Debug, Default)]
    struct Spell {
        script: Vec<u32>,
        pos: usize,
        then_eos: bool,
        fail_at: Option<usize>,
        panic_at: Option<usize>,
        gate: Option<(mpsc::Sender<()>, mpsc::Receiver<()>)>,
    }

    /// The byte tokenizer's ids of a printable ASCII string.
    fn ids(text: &str) -> Vec<u32> {
        text.bytes().map(|b| u32::from(b - b'!')).collect()
    }

    fn spell(text: &str) -> Box<Spell> {
        Box::new(Spell {
            script: ids(text),
            ..Spell::default()
        })
    }

    impl Constraint for Spell {
        fn allowed(&mut self) -> Result<TokenMask, String> {
            if let Some((started, release)) = self.gate.take() {
                started.send(()).map_err(|e| e.to_string())?;
                release
                    .recv_timeout(Duration::from_secs(10))
                    .map_err(|e| e.to_string())?;
            }
            if self.fail_at == Some(self.pos) {
                return Err("scripted failure".into());
            }
            if self.panic_at == Some(self.pos) {
                panic!("scripted constraint panic");
            }
            Ok(match self.script.get(self.pos) {
                Some(&t) => TokenMask::from_ids([t]),
                None => TokenMask::from_ids([EOS]),
            })
        }

        fn commit(&mut self, token: u32) -> Result<(), String> {
            if self.script.get(self.pos) != Some(&token) {
                return Err(format!("token {token} was not allowed"));
            }
            self.pos += 1;
            Ok(())
        }

        fn is_finished(&self) -> bool {
            !self.then_eos && self.pos == self.script.len()
        }
    }

    fn constrained(id: &str, params: SamplingParams, c: Box<Spell>) -> GenerateRequest {
        GenerateRequest {
            constraint: Some(c),
            ..request(id, prompt(3, 6), params)
        }
    }

    #[test]
    fn constraints_steer_sampling_and_end_the_sequence_among_unconstrained_ones() {
        let runner = ScriptedRunner::new(256, 4);
        let log = runner.log.clone();
        let h = start(runner, &config(64, 16, 64));
        // Sampled (not greedy): the mask, not luck, picks the tokens. Interleaved with
        // unconstrained requests so constrained and free rows share batches.
        let words = ["hello", "{\"a\":1}", "yes", "constrained!"];
        let mut rxs = Vec::new();
        for (i, w) in words.iter().enumerate() {
            rxs.push(
                h.submit(constrained(&format!("c{i}"), sampled(i as u64, 64), spell(w)))
                    .unwrap(),
            );
            rxs.push(
                h.submit(request(&format!("f{i}"), prompt(i as u32, 5), sampled(i as u64, 12)))
                    .unwrap(),
            );
        }
        let got: Vec<_> = rxs.into_iter().map(collect).collect();
        for (i, w) in words.iter().enumerate() {
            let c = &got[2 * i];
            assert_eq!(c.text, *w);
            assert_eq!(c.tokens, ids(w), "nothing after the grammar finished");
            assert_eq!(c.finish, Some(FinishReason::Stop));
            let f = &got[2 * i + 1];
            assert_eq!((f.finish, f.tokens.len()), (Some(FinishReason::Length), 12));
        }
        assert!(
            log.lock().unwrap().iter().any(|step| step.len() >= 4),
            "requests were batched"
        );

        // A grammar that may end allows EOS, which ends the sequence even under ignore_eos.
        let c = Box::new(Spell {
            then_eos: true,
            ..*spell("ok")
        });
        let p = SamplingParams {
            ignore_eos: true,
            ..sampled(5, 64)
        };
        let o = collect(h.submit(constrained("eos", p, c)).unwrap());
        assert_eq!((o.text.as_str(), o.finish), ("ok", Some(FinishReason::Stop)));
        assert_eq!(o.tokens, [ids("ok"), vec![EOS]].concat());
        // max_tokens still cuts a grammar short.
        let o = collect(h.submit(constrained("len", sampled(6, 3), spell("longer"))).unwrap());
        assert_eq!((o.text.as_str(), o.finish), ("lon", Some(FinishReason::Length)));
        wait_for(&h, |s| s.running == 0 && s.kv_blocks_used == 0);
    }

    #[test]
    fn a_failing_or_panicking_constraint_fails_only_its_own_sequence() {
        let h = start(ScriptedRunner::new(256, 4), &config(64, 16, 64));
        let failing = Box::new(Spell {
            fail_at: Some(2),
            ..*spell("abcdef")
        });
        let panicking = Box::new(Spell {
            panic_at: Some(1),
            ..*spell("abcdef")
        });
        let rx_fail = h.submit(constrained("fail", sampled(1, 32), failing)).unwrap();
        let rx_panic = h.submit(constrained("panic", sampled(2, 32), panicking)).unwrap();
        let rx_free = h.submit(request("free", prompt(1, 5), sampled(3, 20))).unwrap();
        let rx_ok = h.submit(constrained("ok", sampled(4, 32), spell("abcdef"))).unwrap();
        let fail = collect(rx_fail);
        let msg = fail.failed.unwrap();
        assert!(
            msg.contains("structured output failed") && msg.contains("scripted failure"),
            "{msg}"
        );
        assert_eq!(fail.text, "ab", "the tokens before the failure were streamed");
        let msg = collect(rx_panic).failed.unwrap();
        assert!(msg.contains("scripted constraint panic"), "{msg}");
        assert_eq!(collect(rx_free).finish, Some(FinishReason::Length));
        assert_eq!(collect(rx_ok).text, "abcdef");
        // The engine carried on: no failed step, no reset.
        assert!(h.is_up());
        let again = collect(h.submit(constrained("again", sampled(5, 32), spell("xyz"))).unwrap());
        assert_eq!(again.text, "xyz");
        wait_for(&h, |s| s.running == 0 && s.kv_blocks_used == 0);
    }

    #[test]
    fn masks_are_computed_while_the_forward_pass_runs() {
        let mut runner = ScriptedRunner::new(64, 4);
        let (permit, permits) = mpsc::channel();
        let (entered_tx, entered) = mpsc::channel();
        runner.permits = Some(permits);
        runner.entered = Some(entered_tx);
        let h = start(runner, &config(64, 8, 8));
        let (started_tx, mask_started) = mpsc::channel();
        let (release, release_rx) = mpsc::channel();
        let c = Box::new(Spell {
            gate: Some((started_tx, release_rx)),
            ..*spell("q")
        });
        let rx = h.submit(constrained("gated", sampled(1, 8), c)).unwrap();
        let wait = Duration::from_secs(10);
        // The forward pass is held until the mask has started, and the mask until the forward
        // pass has: both are seen under way together, which a serial step never allows.
        entered.recv_timeout(wait).expect("the forward pass started");
        mask_started
            .recv_timeout(wait)
            .expect("the mask started while the forward pass was still running");
        permit.send(()).unwrap();
        release.send(()).unwrap();
        let o = collect(rx);
        assert_eq!((o.text.as_str(), o.finish), ("q", Some(FinishReason::Stop)));
    }
}

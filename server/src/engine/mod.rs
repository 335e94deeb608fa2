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
//! Tested in `tests` below with a scripted paged model (see `ScriptedRunner`);
//! the parts have their own unit tests. Design note: `README.md` here.

pub mod detokenizer;
pub mod kv_cache;
pub mod runner;
pub mod sampler;
pub mod scheduler;
pub mod sequence;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::sync::mpsc::UnboundedReceiver;
use tokenizers::Tokenizer;

use crate::config::EngineConfig;
use kv_cache::{BlockManager, SeqId};
use runner::{ModelInfo, ModelRunner};
use scheduler::Scheduler;
use sequence::Sequence;

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

#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub request_id: String,
    pub prompt_tokens: Vec<u32>,
    pub params: SamplingParams,
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
    Cancelled,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
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
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    pub kv_blocks_total: usize,
    pub kv_blocks_used: usize,
    /// Free but holding reusable prefix blocks.
    pub kv_blocks_cached: usize,
    /// In tokens.
    pub prefix_cache_queries: u64,
    pub prefix_cache_hits: u64,
    pub preemptions: u64,
    pub steps: u64,
}

/// Suggested back-off for a full queue (the HTTP layer's `Retry-After`).
const QUEUE_FULL_RETRY_AFTER: Duration = Duration::from_secs(1);

/// State shared by the handles and the engine thread.
#[derive(Debug)]
struct Shared {
    stats: Mutex<EngineStats>,
    /// Requests accepted but never admitted yet (channel + waiting queue).
    queued: AtomicUsize,
    shutting_down: AtomicBool,
    next_id: AtomicU64,
}

enum Command {
    Submit(Sequence),
    /// Wakes an idle engine thread (shutdown).
    Wake,
}

/// Cheap, cloneable entry point to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    commands: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    info: Arc<ModelInfo>,
    max_context: usize,
    max_waiting: usize,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle").field("model", &self.info.name).finish_non_exhaustive()
    }
}

impl EngineHandle {
    /// Sizes and allocates the KV pool, then starts the engine thread.
    pub fn start(
        mut runner: Box<dyn ModelRunner>,
        tokenizer: Arc<Tokenizer>,
        cfg: &EngineConfig,
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
        let shared = Arc::new(Shared {
            stats: Mutex::new(EngineStats {
                kv_blocks_total: num_blocks,
                ..EngineStats::default()
            }),
            queued: AtomicUsize::new(0),
            shutting_down: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
        });
        let (tx, rx) = mpsc::channel();
        let scheduler = Scheduler::new(BlockManager::new(num_blocks, cfg.block_size), cfg.max_batch_tokens, cfg.max_running);
        let mut engine = Engine {
            runner,
            tokenizer,
            scheduler,
            shared: shared.clone(),
            eos: info.eos_token_ids.clone(),
            steps: 0,
        };
        std::thread::Builder::new()
            .name("genai-engine".into())
            .spawn(move || engine.run(rx))
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
        let rejected = |reason: &'static str| metrics::counter!("genai_requests_rejected_total", "reason" => reason).increment(1);
        if self.shared.shutting_down.load(Ordering::Acquire) {
            rejected("shutting_down");
            return Err(SubmitError::ShuttingDown);
        }
        if let Err(e) = self.check(&req) {
            rejected("invalid");
            return Err(SubmitError::Invalid(e));
        }
        let admitted = self
            .shared
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| (q < self.max_waiting).then_some(q + 1));
        if admitted.is_err() {
            rejected("queue_full");
            return Err(SubmitError::QueueFull {
                retry_after: QUEUE_FULL_RETRY_AFTER,
            });
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let seq = Sequence::new(id, req.request_id, req.prompt_tokens, req.params, tx);
        if self.commands.send(Command::Submit(seq)).is_err() {
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
            rejected("shutting_down");
            return Err(SubmitError::ShuttingDown);
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
            return Err(invalid("prompt", format!("token id {t} is outside the vocabulary ({})", self.info.vocab_size)));
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

    /// Longest prompt + max_tokens accepted (model, config and KV pool bound).
    pub fn max_context(&self) -> usize {
        self.max_context
    }

    pub fn stats(&self) -> EngineStats {
        self.shared.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stops admitting; accepted requests still finish, then the thread exits.
    pub fn shutdown(&self) {
        self.shared.shutting_down.store(true, Ordering::Release);
        // Wake an idle engine thread so it notices; a request that loses the
        // race with the flag is still served.
        let _ = self.commands.send(Command::Wake);
    }
}

/// The engine thread's state.
struct Engine {
    runner: Box<dyn ModelRunner>,
    tokenizer: Arc<Tokenizer>,
    scheduler: Scheduler,
    shared: Arc<Shared>,
    eos: Vec<u32>,
    steps: u64,
}

/// Why a sequence leaves the engine after a step.
enum Outcome {
    Finished(FinishReason),
    Failed(String),
    /// The receiver is gone: nothing to send.
    Dropped,
}

impl Engine {
    fn run(&mut self, rx: mpsc::Receiver<Command>) {
        loop {
            if self.scheduler.is_idle() {
                self.publish_stats();
                if self.shared.shutting_down.load(Ordering::Acquire) {
                    break;
                }
                match rx.recv() {
                    Ok(cmd) => self.accept(cmd),
                    Err(_) => break, // every handle dropped and no work left
                }
            }
            while let Ok(cmd) = rx.try_recv() {
                self.accept(cmd);
            }
            self.step();
        }
        tracing::info!("engine thread stopped");
    }

    fn accept(&mut self, cmd: Command) {
        if let Command::Submit(seq) = cmd {
            metrics::counter!("genai_prompt_tokens_total").increment(seq.prompt_len as u64);
            self.scheduler.add(seq);
        }
    }

    fn step(&mut self) {
        for s in self.scheduler.remove_cancelled() {
            if s.admitted_at.is_none() {
                self.shared.queued.fetch_sub(1, Ordering::AcqRel);
            }
            tracing::debug!(request_id = %s.request_id, "request cancelled by the client");
        }
        let (q0, h0) = self.scheduler.prefix_counters();
        let batch = self.scheduler.schedule();
        self.note_admissions();
        let (q1, h1) = self.scheduler.prefix_counters();
        metrics::counter!("genai_prefix_cache_queries_total").increment(q1 - q0);
        metrics::counter!("genai_prefix_cache_hits_total").increment(h1 - h0);
        if batch.entries.is_empty() {
            // Only when every sequence was just cancelled: the loop then
            // blocks on the channel again.
            self.publish_stats();
            return;
        }
        let started = Instant::now();
        let result = self.runner.forward(&batch);
        let elapsed = started.elapsed().as_secs_f64();
        self.steps += 1;
        let num_tokens: usize = batch.entries.iter().map(|e| e.tokens.len()).sum();
        let prefill = batch.entries.iter().any(|e| e.tokens.len() > 1 || !e.want_logits);
        let step_metric = if prefill { "genai_prefill_step_seconds" } else { "genai_decode_step_seconds" };
        metrics::histogram!(step_metric).record(elapsed);
        metrics::histogram!("genai_batch_size").record(batch.entries.len() as f64);
        metrics::histogram!("genai_iteration_tokens").record(num_tokens as f64);

        let mut outcomes: Vec<(SeqId, Outcome)> = Vec::new();
        match result {
            Err(e) => {
                let message = format!("model forward failed: {e:#}");
                tracing::error!("{message}");
                outcomes.extend(batch.entries.iter().map(|e| (e.seq_id, Outcome::Failed(message.clone()))));
            }
            Ok(rows) => {
                self.scheduler.complete(&batch);
                let wanted = batch.entries.iter().filter(|e| e.want_logits);
                if rows.len() != wanted.clone().count() {
                    let message = format!("model returned {} logit rows for {} sequences", rows.len(), wanted.count());
                    outcomes.extend(batch.entries.iter().map(|e| (e.seq_id, Outcome::Failed(message.clone()))));
                } else {
                    for (e, row) in wanted.zip(rows) {
                        if let Some(o) = self.advance(e.seq_id, row) {
                            outcomes.push((e.seq_id, o));
                        }
                    }
                }
            }
        }
        for (id, outcome) in outcomes {
            self.retire(id, outcome);
        }
        self.publish_stats();
    }

    /// Queue-time bookkeeping for sequences admitted for the first time.
    fn note_admissions(&mut self) {
        for (arrival, admitted) in self.scheduler.take_first_admissions() {
            metrics::histogram!("genai_request_queue_time_seconds").record(admitted.duration_since(arrival).as_secs_f64());
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Samples the next token of `id`, streams it; Some(outcome) if done.
    fn advance(&mut self, id: SeqId, logits: Vec<f32>) -> Option<Outcome> {
        let tokenizer = self.tokenizer.clone();
        let eos = &self.eos;
        let s = self.scheduler.get_mut(id)?;
        let mut end_ids = s.params.stop_token_ids.clone();
        if !s.params.ignore_eos {
            end_ids.extend_from_slice(eos);
        }
        let sampled = s.sampler.sample(logits, &s.params, &s.tokens, s.prompt_len, &end_ids);
        let token = sampled.token;
        s.tokens.push(token);
        metrics::counter!("genai_generation_tokens_total").increment(1);
        let now = Instant::now();
        let since = s.last_token_at.unwrap_or(s.arrival);
        let latency = if s.last_token_at.is_some() {
            "genai_inter_token_latency_seconds"
        } else {
            "genai_time_to_first_token_seconds"
        };
        metrics::histogram!(latency).record(now.duration_since(since).as_secs_f64());
        s.last_token_at = Some(now);

        let mut finish = None;
        let mut text = String::new();
        if end_ids.contains(&token) {
            // EOS / stop token: ends the sequence and is never text.
            finish = Some(FinishReason::Stop);
        } else {
            match s.detok.push(&tokenizer, &s.tokens) {
                Ok(out) => {
                    text = out.text;
                    if out.stopped {
                        finish = Some(FinishReason::Stop);
                    }
                }
                Err(e) => return Some(Outcome::Failed(format!("{e:#}"))),
            }
        }
        if finish.is_none() && s.num_output() >= s.params.max_tokens {
            finish = Some(FinishReason::Length);
        }
        if finish.is_some() {
            // Text held back for a possible stop string is real output when
            // no stop string matched (after a match nothing is held).
            text.push_str(&s.detok.flush());
        }
        let logprobs = sampled
            .logprobs
            .map(|(lp, top)| {
                let entry = |token_id: u32, logprob: f32| TokenLogprob {
                    token_id,
                    token: tokenizer.decode(&[token_id], false).unwrap_or_default(),
                    logprob,
                };
                vec![PositionLogprobs {
                    sampled: entry(token, lp),
                    top: top.into_iter().map(|(t, l)| entry(t, l)).collect(),
                }]
            })
            .unwrap_or_default();
        let delta = EngineEvent::Delta {
            text,
            token_ids: vec![token],
            logprobs,
        };
        if s.events.send(delta).is_err() {
            return Some(Outcome::Dropped);
        }
        finish.map(Outcome::Finished)
    }

    /// Removes a sequence for good and tells its client why.
    fn retire(&mut self, id: SeqId, outcome: Outcome) {
        let Some(s) = self.scheduler.finish(id) else { return };
        let event = match outcome {
            Outcome::Finished(reason) => {
                metrics::histogram!("genai_e2e_request_latency_seconds").record(s.arrival.elapsed().as_secs_f64());
                EngineEvent::Finished {
                    reason,
                    usage: Usage {
                        prompt_tokens: s.prompt_len as u32,
                        completion_tokens: s.num_output() as u32,
                        cached_prompt_tokens: s.cached_prompt_tokens as u32,
                    },
                }
            }
            Outcome::Failed(message) => EngineEvent::Failed { message },
            Outcome::Dropped => return,
        };
        let _ = s.events.send(event);
    }

    fn publish_stats(&self) {
        let kv = self.scheduler.kv_usage();
        let (queries, hits) = self.scheduler.prefix_counters();
        let stats = EngineStats {
            running: self.scheduler.num_running(),
            waiting: self.scheduler.num_waiting(),
            kv_blocks_total: kv.total,
            kv_blocks_used: kv.used,
            kv_blocks_cached: kv.cached,
            prefix_cache_queries: queries,
            prefix_cache_hits: hits,
            preemptions: self.scheduler.preemptions(),
            steps: self.steps,
        };
        let prev_preemptions = {
            let mut guard = self.shared.stats.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::replace(&mut *guard, stats.clone()).preemptions
        };
        metrics::counter!("genai_preemptions_total").increment(stats.preemptions - prev_preemptions);
        metrics::gauge!("genai_num_requests_running").set(stats.running as f64);
        metrics::gauge!("genai_num_requests_waiting").set(stats.waiting as f64);
        metrics::gauge!("genai_kv_cache_blocks_used").set(kv.used as f64);
        metrics::gauge!("genai_kv_cache_blocks_free").set((kv.cached + kv.free) as f64);
        metrics::gauge!("genai_kv_cache_usage_ratio").set(kv.used as f64 / kv.total.max(1) as f64);
    }
}

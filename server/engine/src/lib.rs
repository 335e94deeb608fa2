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

pub mod config;
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
use tokenizers::Tokenizer;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

pub use config::EngineConfig;
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
    Submit(Box<Sequence>),
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
        f.debug_struct("EngineHandle")
            .field("model", &self.info.name)
            .finish_non_exhaustive()
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
        let scheduler = Scheduler::new(
            BlockManager::new(num_blocks, cfg.block_size),
            cfg.max_batch_tokens,
            cfg.max_running,
        );
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
        let rejected =
            |reason: &'static str| metrics::counter!("genai_requests_rejected_total", "reason" => reason).increment(1);
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
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q < self.max_waiting).then_some(q + 1)
            });
        if admitted.is_err() {
            rejected("queue_full");
            return Err(SubmitError::QueueFull {
                retry_after: QUEUE_FULL_RETRY_AFTER,
            });
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let seq = Sequence::new(id, req.request_id, req.prompt_tokens, req.params, tx);
        if self.commands.send(Command::Submit(Box::new(seq))).is_err() {
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
            while let Ok(cmd) = rx.try_recv() {
                self.accept(cmd);
            }
            if !self.scheduler.is_idle() {
                self.step();
                continue;
            }
            self.publish_stats();
            // The channel was drained just above: no accepted work is left.
            if self.shared.shutting_down.load(Ordering::Acquire) {
                break;
            }
            match rx.recv() {
                Ok(cmd) => self.accept(cmd),
                Err(_) => break, // every handle dropped and no work left
            }
        }
        // A submission that raced with shutdown is failed, not lost.
        while let Ok(cmd) = rx.try_recv() {
            if let Command::Submit(seq) = cmd {
                let message = "the engine shut down before the request started".to_string();
                let _ = seq.events.send(EngineEvent::Failed { message });
            }
        }
        tracing::info!("engine thread stopped");
    }

    fn accept(&mut self, cmd: Command) {
        if let Command::Submit(seq) = cmd {
            metrics::counter!("genai_prompt_tokens_total").increment(seq.prompt_len as u64);
            self.scheduler.add(*seq);
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
        // A panicking runner fails this batch instead of killing the engine thread.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.runner.forward(&batch)))
            .unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Err(anyhow::anyhow!("model runner panicked: {what}"))
            });
        let elapsed = started.elapsed().as_secs_f64();
        self.steps += 1;
        let num_tokens: usize = batch.entries.iter().map(|e| e.tokens.len()).sum();
        let prefill = batch.entries.iter().any(|e| e.tokens.len() > 1 || !e.want_logits);
        let step_metric = if prefill {
            "genai_prefill_step_seconds"
        } else {
            "genai_decode_step_seconds"
        };
        metrics::histogram!(step_metric).record(elapsed);
        metrics::histogram!("genai_batch_size").record(batch.entries.len() as f64);
        metrics::histogram!("genai_iteration_tokens").record(num_tokens as f64);

        let mut outcomes: Vec<(SeqId, Outcome)> = Vec::new();
        match result {
            Err(e) => {
                let message = format!("model forward failed: {e:#}");
                tracing::error!("{message}");
                outcomes.extend(
                    batch
                        .entries
                        .iter()
                        .map(|e| (e.seq_id, Outcome::Failed(message.clone()))),
                );
            }
            Ok(rows) => {
                self.scheduler.complete(&batch);
                let wanted = batch.entries.iter().filter(|e| e.want_logits);
                let vocab = self.runner.info().vocab_size;
                if rows.len() != wanted.clone().count() || rows.iter().any(|r| r.len() != vocab) {
                    let message = format!(
                        "model returned {} logit rows (widths {:?}) for {} sequences, vocabulary {vocab}",
                        rows.len(),
                        rows.iter().map(Vec::len).collect::<Vec<_>>(),
                        wanted.count()
                    );
                    outcomes.extend(
                        batch
                            .entries
                            .iter()
                            .map(|e| (e.seq_id, Outcome::Failed(message.clone()))),
                    );
                } else {
                    for (e, row) in wanted.zip(rows) {
                        if let Some(o) = self.advance(e.seq_id, row) {
                            outcomes.push((e.seq_id, o));
                        }
                    }
                }
            }
        }
        // Free first, publish, then tell the clients: a client that has its final
        // event never reads gauges that still count its blocks.
        let finals: Vec<_> = outcomes.into_iter().filter_map(|(id, o)| self.retire(id, o)).collect();
        self.publish_stats();
        for (events, event) in finals {
            let _ = events.send(event);
        }
    }

    /// Queue-time bookkeeping for sequences admitted for the first time.
    fn note_admissions(&mut self) {
        for (arrival, admitted) in self.scheduler.take_first_admissions() {
            metrics::histogram!("genai_request_queue_time_seconds")
                .record(admitted.duration_since(arrival).as_secs_f64());
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

    /// Removes a sequence for good (freeing its blocks); returns the final event for its client.
    fn retire(&mut self, id: SeqId, outcome: Outcome) -> Option<(UnboundedSender<EngineEvent>, EngineEvent)> {
        let s = self.scheduler.finish(id)?;
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
            Outcome::Dropped => return None,
        };
        Some((s.events, event))
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
            kv_tokens_live: self.scheduler.kv_live_tokens(),
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
        metrics::gauge!("genai_kv_cache_live_tokens").set(stats.kv_tokens_live as f64);
        let held_slots = kv.used * self.scheduler.block_size();
        let waste = if held_slots == 0 {
            0.0
        } else {
            1.0 - stats.kv_tokens_live as f64 / held_slots as f64
        };
        metrics::gauge!("genai_kv_cache_waste_ratio").set(waste);
    }
}

#[cfg(test)]
mod tests {
    use super::runner::{BatchEntry, ForwardBatch};
    use super::*;
    use std::collections::HashSet;

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
    /// through the block table it is given: a wrong block table, a missed
    /// copy-on-write or a bad prefix hit changes (or fails) the output.
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
        let tok = Arc::new(detokenizer::tests::byte_tokenizer());
        EngineHandle::start(Box::new(runner), tok, cfg).unwrap()
    }

    fn request(id: &str, prompt: Vec<u32>, params: SamplingParams) -> GenerateRequest {
        GenerateRequest {
            request_id: id.into(),
            prompt_tokens: prompt,
            params,
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
    fn alone(reqs: &[GenerateRequest]) -> Vec<Outcome> {
        let h = start(ScriptedRunner::new(256, 4), &config(64, 16, 64));
        reqs.iter().map(|r| collect(h.submit(r.clone()).unwrap())).collect()
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
        let reqs = sixteen();
        let expected = alone(&reqs);
        let runner = ScriptedRunner::new(256, 4);
        let log = runner.log.clone();
        let h = start(runner, &config(64, 16, 64));
        let rxs: Vec<_> = reqs.iter().map(|r| h.submit(r.clone()).unwrap()).collect();
        let got: Vec<_> = rxs.into_iter().map(collect).collect();
        assert_eq!(got, expected);
        for (o, r) in got.iter().zip(&reqs) {
            assert_eq!(o.finish, Some(FinishReason::Length));
            assert_eq!(o.tokens.len(), r.params.max_tokens);
            assert_eq!(o.text.len(), o.tokens.len(), "one printable byte per token");
        }
        assert!(
            log.lock().unwrap().iter().any(|step| step.len() >= 8),
            "requests were batched"
        );
    }

    #[test]
    fn tiny_kv_pool_forces_preemption_and_output_stays_identical() {
        let reqs = sixteen();
        let expected = alone(&reqs);
        // 16 blocks of 4 tokens: the longest request alone needs 12 blocks.
        let h = start(ScriptedRunner::new(16, 4), &config(64, 16, 64));
        let rxs: Vec<_> = reqs.iter().map(|r| h.submit(r.clone()).unwrap()).collect();
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
        assert_eq!(h.max_context(), 256, "bounded by the 64 x 4 token pool");
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
}

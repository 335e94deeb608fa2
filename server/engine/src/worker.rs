//! The engine thread: one loop that owns the scheduler, the block manager and
//! the runner, runs steps and supervises them (policy in the crate doc).

use std::any::Any;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use tokenizers::Tokenizer;
use tokio::sync::mpsc::UnboundedSender;

use super::fault::Fault;
use super::kv_cache::SeqId;
use super::metric_names as m;
use super::runner::ForwardBatch;
use super::runner::ModelRunner;
use super::scheduler::Scheduler;
use super::sequence::Sequence;
use super::{Constraint, EngineEvent, EngineStats, FinishReason, PositionLogprobs, TokenLogprob, TokenMask, Usage};

/// Consecutive failed steps (a forward error, or a panic anywhere) after
/// which the engine gives up.
pub(crate) const MAX_FAILED_STEPS: u32 = 3;

/// State shared by the handles and the engine thread.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) stats: Mutex<EngineStats>,
    /// Requests accepted but never admitted yet (channel + waiting queue).
    pub(crate) queued: AtomicUsize,
    pub(crate) shutting_down: AtomicBool,
    /// False once the engine thread has stopped, for whatever reason.
    pub(crate) up: AtomicBool,
    pub(crate) next_id: AtomicU64,
}

impl Shared {
    fn mark_down(&self) {
        self.up.store(false, Ordering::Release);
        metrics::gauge!(m::ENGINE_UP).set(0.0);
    }
}

/// Marks the engine down when the thread ends, however it ends (a return, a
/// panic that escaped supervision, or a thread that never started).
pub(crate) struct UpGuard(pub(crate) Arc<Shared>);

impl Drop for UpGuard {
    fn drop(&mut self) {
        self.0.mark_down();
    }
}

pub(crate) enum Command {
    Submit(Box<Sequence>),
    /// Wakes an idle engine thread (shutdown).
    Wake,
}

/// A request between `accept` and its final event: whatever happens to the
/// scheduler, it still gets one.
struct Inflight {
    events: UnboundedSender<EngineEvent>,
    /// Still counted in `Shared::queued` (never admitted).
    queued: bool,
}

/// Why a sequence leaves the engine after a step.
enum Outcome {
    Finished(FinishReason),
    Failed(String),
    /// The receiver is gone: nothing to send.
    Dropped,
}

/// How a step that did not panic ended.
enum StepEnd {
    /// Nothing ran, or the forward pass succeeded.
    Done,
    /// The forward pass returned an error or panicked: its batch failed.
    ForwardFailed,
}

/// A constrained sequence's mask for this step, computed on the mask pool while the forward
/// pass runs. The constraint is moved out of its sequence meanwhile and put back after.
struct MaskJob {
    id: SeqId,
    constraint: Box<dyn Constraint>,
    mask: Option<Result<TokenMask, String>>,
}

impl MaskJob {
    fn compute(&mut self) {
        // A panicking constraint fails its own sequence, never the step.
        let mask = catch_unwind(AssertUnwindSafe(|| self.constraint.allowed()))
            .unwrap_or_else(|panic| Err(format!("panicked: {}", panic_message(&*panic))));
        self.mask = Some(mask);
    }
}

/// Threads of the mask pool: masks of one step run in parallel, beside the forward pass.
pub(crate) fn mask_pool_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 4)
}

/// The engine thread's state.
pub(crate) struct Engine {
    runner: Box<dyn ModelRunner>,
    /// Computes structured-output masks during the forward pass (see `constraint.rs`).
    mask_pool: rayon::ThreadPool,
    tokenizer: Arc<Tokenizer>,
    scheduler: Scheduler,
    shared: Arc<Shared>,
    fault: Fault,
    inflight: HashMap<SeqId, Inflight>,
    steps: u64,
    failed_steps: u32,
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

impl Engine {
    pub(crate) fn new(
        runner: Box<dyn ModelRunner>,
        mask_pool: rayon::ThreadPool,
        tokenizer: Arc<Tokenizer>,
        scheduler: Scheduler,
        shared: Arc<Shared>,
        fault: Fault,
    ) -> Self {
        Self {
            runner,
            mask_pool,
            tokenizer,
            scheduler,
            shared,
            fault,
            inflight: HashMap::new(),
            steps: 0,
            failed_steps: 0,
        }
    }

    pub(crate) fn run(mut self, rx: mpsc::Receiver<Command>) {
        let gave_up = loop {
            while let Ok(cmd) = rx.try_recv() {
                self.accept(cmd);
            }
            if !self.scheduler.is_idle() {
                match self.supervised_step() {
                    Ok(()) => continue,
                    Err(reason) => break Some(reason),
                }
            }
            self.publish_stats();
            // The channel was drained just above: no accepted work is left.
            if self.shared.shutting_down.load(Ordering::Acquire) {
                break None;
            }
            match rx.recv() {
                Ok(cmd) => self.accept(cmd),
                Err(_) => break None, // every handle dropped and no work left
            }
        };
        // Down before the last drain: a later `submit` sees it and never sends.
        self.shared.mark_down();
        let message = match gave_up {
            Some(reason) => {
                tracing::error!(%reason, "the engine cannot continue and has stopped");
                let message = format!("internal engine error: {reason}; the engine has stopped");
                self.fail_all(&message);
                message
            }
            None => "the engine shut down before the request started".to_string(),
        };
        // A submission that raced with shutdown is failed, not lost.
        while let Ok(cmd) = rx.try_recv() {
            if let Command::Submit(seq) = cmd {
                let _ = seq.events.send(EngineEvent::Failed {
                    message: message.clone(),
                });
            }
        }
        tracing::info!("engine thread stopped");
    }

    fn accept(&mut self, cmd: Command) {
        if let Command::Submit(seq) = cmd {
            metrics::counter!(m::PROMPT_TOKENS).increment(seq.prompt_len as u64);
            let inflight = Inflight {
                events: seq.events.clone(),
                queued: true,
            };
            self.inflight.insert(seq.id, inflight);
            self.scheduler.add(*seq);
        }
    }

    /// Runs one step under `catch_unwind`. A panic outside the forward pass
    /// leaves the scheduler and block manager untrustworthy: every request
    /// fails and both start afresh. Err when the engine must stop.
    fn supervised_step(&mut self) -> Result<(), String> {
        let panicked = match catch_unwind(AssertUnwindSafe(|| self.step())) {
            Ok(StepEnd::Done) => {
                self.failed_steps = 0;
                return Ok(());
            }
            Ok(StepEnd::ForwardFailed) => None,
            Err(panic) => {
                let what = panic_message(&*panic);
                metrics::counter!(m::ENGINE_PANICS).increment(1);
                tracing::error!(panic = %what, "engine step panicked outside the forward pass");
                Some(what)
            }
        };
        self.failed_steps += 1;
        if self.failed_steps >= MAX_FAILED_STEPS {
            let last = panicked.map_or_else(String::new, |what| format!(", the last panicked: {what}"));
            return Err(format!("{MAX_FAILED_STEPS} consecutive engine steps failed{last}"));
        }
        if let Some(what) = panicked {
            tracing::warn!("failing every request and resetting the scheduler and the block manager");
            if catch_unwind(AssertUnwindSafe(|| self.reset(&what))).is_err() {
                return Err(format!("resetting after a panic ({what}) panicked too"));
            }
        }
        Ok(())
    }

    /// Fails every request and empties the scheduler and the block manager.
    fn reset(&mut self, what: &str) {
        self.fail_all(&format!("internal engine error: {what}"));
        self.scheduler.reset();
        self.publish_stats();
    }

    /// Sends `Failed` to every request not yet answered.
    fn fail_all(&mut self, message: &str) {
        for (_, r) in self.inflight.drain() {
            if r.queued {
                self.shared.queued.fetch_sub(1, Ordering::AcqRel);
            }
            let _ = r.events.send(EngineEvent::Failed {
                message: message.to_string(),
            });
        }
    }

    /// Forgets a request that needs no final event (cancelled, or dropped by its client).
    fn forget(&mut self, id: SeqId) {
        if self.inflight.remove(&id).is_some_and(|r| r.queued) {
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn step(&mut self) -> StepEnd {
        for s in self.scheduler.remove_cancelled() {
            self.forget(s.id);
            tracing::debug!(request_id = %s.request_id, "request cancelled by the client");
        }
        let (q0, h0) = self.scheduler.prefix_counters();
        let batch = self.scheduler.schedule();
        self.note_admissions();
        let (q1, h1) = self.scheduler.prefix_counters();
        metrics::counter!(m::PREFIX_CACHE_QUERIES).increment(q1 - q0);
        metrics::counter!(m::PREFIX_CACHE_HITS).increment(h1 - h0);
        if batch.entries.is_empty() {
            // Only when every sequence was just cancelled: the loop then
            // blocks on the channel again.
            self.publish_stats();
            return StepEnd::Done;
        }
        let started = Instant::now();
        let mut jobs = self.take_constraints(&batch);
        let result = self.forward_and_masks(&batch, &mut jobs);
        let elapsed = started.elapsed().as_secs_f64();
        let mut masks = self.restore_constraints(jobs);
        self.steps += 1;
        let num_tokens: usize = batch.entries.iter().map(|e| e.tokens.len()).sum();
        let prefill = batch.entries.iter().any(|e| e.tokens.len() > 1 || !e.want_logits);
        let step_metric = if prefill { m::PREFILL_STEP } else { m::DECODE_STEP };
        metrics::histogram!(step_metric).record(elapsed);
        metrics::histogram!(m::BATCH_SIZE).record(batch.entries.len() as f64);
        metrics::histogram!(m::ITERATION_TOKENS).record(num_tokens as f64);

        let mut outcomes: Vec<(SeqId, Outcome)> = Vec::new();
        let mut end = StepEnd::Done;
        match result {
            Err(e) => {
                let message = format!("model forward failed: {e:#}");
                tracing::error!("{message}");
                end = StepEnd::ForwardFailed;
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
                        if let Some(o) = self.advance(e.seq_id, row, masks.remove(&e.seq_id)) {
                            outcomes.push((e.seq_id, o));
                        }
                    }
                }
            }
        }
        self.fault.inject(self.steps);
        // Free first, publish, then tell the clients: a client that has its final
        // event never reads gauges that still count its blocks.
        let finals: Vec<_> = outcomes.into_iter().filter_map(|(id, o)| self.retire(id, o)).collect();
        self.publish_stats();
        for (id, events, event) in finals {
            let _ = events.send(event);
            self.inflight.remove(&id);
        }
        end
    }

    /// Queue-time bookkeeping for sequences admitted for the first time.
    fn note_admissions(&mut self) {
        for (id, arrival, admitted) in self.scheduler.take_first_admissions() {
            metrics::histogram!(m::REQUEST_QUEUE_TIME).record(admitted.duration_since(arrival).as_secs_f64());
            if let Some(r) = self.inflight.get_mut(&id).filter(|r| r.queued) {
                r.queued = false;
                self.shared.queued.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    /// Moves the constraints of the sequences that sample this step out, for the mask pool.
    fn take_constraints(&mut self, batch: &ForwardBatch) -> Vec<MaskJob> {
        let mut jobs = Vec::new();
        for e in batch.entries.iter().filter(|e| e.want_logits) {
            if let Some(constraint) = self.scheduler.get_mut(e.seq_id).and_then(|s| s.constraint.take()) {
                jobs.push(MaskJob {
                    id: e.seq_id,
                    constraint,
                    mask: None,
                });
            }
        }
        jobs
    }

    /// Runs the forward pass on this thread while the mask pool computes the masks of `jobs`;
    /// returns when both are done. A panicking runner fails this batch; the engine's own state
    /// is intact.
    fn forward_and_masks(&mut self, batch: &ForwardBatch, jobs: &mut [MaskJob]) -> anyhow::Result<Vec<Vec<f32>>> {
        let runner = &mut self.runner;
        let mut forward = move || {
            catch_unwind(AssertUnwindSafe(|| runner.forward(batch))).unwrap_or_else(|panic| {
                metrics::counter!(m::ENGINE_PANICS).increment(1);
                Err(anyhow::anyhow!("model runner panicked: {}", panic_message(&*panic)))
            })
        };
        if jobs.is_empty() {
            return forward();
        }
        // The scope's body (the forward pass) runs here, on the engine thread, which keeps the
        // model's device context; the spawned masks run on the pool.
        self.mask_pool.in_place_scope(|scope| {
            for job in jobs.iter_mut() {
                scope.spawn(move |_| job.compute());
            }
            forward()
        })
    }

    /// Gives the constraints back to their sequences; the masks by sequence.
    fn restore_constraints(&mut self, jobs: Vec<MaskJob>) -> HashMap<SeqId, Result<TokenMask, String>> {
        let mut masks = HashMap::with_capacity(jobs.len());
        for job in jobs {
            if let Some(s) = self.scheduler.get_mut(job.id) {
                s.constraint = Some(job.constraint);
            }
            if let Some(mask) = job.mask {
                masks.insert(job.id, mask);
            }
        }
        masks
    }

    /// Samples the next token of `id` (within `mask` when it is constrained), streams it;
    /// Some(outcome) if done.
    fn advance(&mut self, id: SeqId, logits: Vec<f32>, mask: Option<Result<TokenMask, String>>) -> Option<Outcome> {
        let tokenizer = self.tokenizer.clone();
        let s = self.scheduler.get_mut(id)?;
        let mask = match mask.transpose() {
            Ok(mask) => mask,
            Err(e) => return Some(Outcome::Failed(format!("structured output failed: {e}"))),
        };
        let sampled = match s
            .sampler
            .sample(logits, &s.params, &s.tokens, s.prompt_len, &s.end_ids, mask.as_ref())
        {
            Ok(sampled) => sampled,
            Err(e) => return Some(Outcome::Failed(format!("sampling failed: {e}"))),
        };
        let token = sampled.token;
        s.tokens.push(token);
        // The constraint follows every non-end token; it may declare the output complete.
        let is_end = s.is_end(token);
        let mut grammar_done = false;
        if let Some(c) = s.constraint.as_mut().filter(|_| !is_end) {
            if let Err(e) = c.commit(token) {
                return Some(Outcome::Failed(format!("structured output failed: {e}")));
            }
            grammar_done = c.is_finished();
        }
        metrics::counter!(m::GENERATION_TOKENS).increment(1);
        let now = Instant::now();
        let since = s.last_token_at.unwrap_or(s.arrival);
        let latency = if s.last_token_at.is_some() {
            m::INTER_TOKEN_LATENCY
        } else {
            m::TIME_TO_FIRST_TOKEN
        };
        metrics::histogram!(latency).record(now.duration_since(since).as_secs_f64());
        s.last_token_at = Some(now);

        let mut finish = None;
        let mut text = String::new();
        if is_end {
            // EOS / stop token: ends the sequence and is never text.
            finish = Some(FinishReason::Stop);
        } else {
            match s.detok.push(&tokenizer, &s.tokens) {
                Ok(out) => {
                    text = out.text;
                    if out.stopped || grammar_done {
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
    fn retire(&mut self, id: SeqId, outcome: Outcome) -> Option<(SeqId, UnboundedSender<EngineEvent>, EngineEvent)> {
        let s = self.scheduler.finish(id)?;
        let event = match outcome {
            Outcome::Finished(reason) => {
                metrics::histogram!(m::E2E_REQUEST_LATENCY).record(s.arrival.elapsed().as_secs_f64());
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
            Outcome::Dropped => {
                self.forget(id);
                return None;
            }
        };
        Some((id, s.events, event))
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
        metrics::counter!(m::PREEMPTIONS).increment(stats.preemptions.saturating_sub(prev_preemptions));
        metrics::gauge!(m::REQUESTS_RUNNING).set(stats.running as f64);
        metrics::gauge!(m::REQUESTS_WAITING).set(stats.waiting as f64);
        metrics::gauge!(m::KV_BLOCKS_USED).set(kv.used as f64);
        metrics::gauge!(m::KV_BLOCKS_FREE).set((kv.cached + kv.free) as f64);
        metrics::gauge!(m::KV_USAGE_RATIO).set(kv.used as f64 / kv.total.max(1) as f64);
        metrics::gauge!(m::KV_LIVE_TOKENS).set(stats.kv_tokens_live as f64);
        let held_slots = kv.used * self.scheduler.block_size();
        let waste = if held_slots == 0 {
            0.0
        } else {
            1.0 - stats.kv_tokens_live as f64 / held_slots as f64
        };
        metrics::gauge!(m::KV_WASTE_RATIO).set(waste);
    }
}

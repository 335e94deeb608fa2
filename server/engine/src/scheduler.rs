//! Iteration-level continuous batching (the vLLM V1 model): no prefill or
//! decode phases, each sequence only tracks `num_computed` against its known
//! tokens, and every step hands out a token budget.
//!
//! Per step, under `max_batch_tokens`:
//! 1. running sequences with exactly one uncomputed token (decodes) get it,
//!    oldest first, so a long prompt never stalls decoding;
//! 2. running sequences still prefilling get a chunk of the remaining budget
//!    (shrunk to the free KV space);
//! 3. waiting sequences are admitted in FIFO order (with their cached prefix)
//!    while budget, `max_running` and free blocks allow; none are admitted in
//!    a step that had to preempt.
//!
//! When a running sequence cannot get blocks, the most recently admitted
//! running sequence not yet scheduled this step is preempted (blocks freed,
//! back to the head of the waiting queue, recomputed later with its generated
//! tokens; its full blocks usually come back as prefix-cache hits). If that
//! would be an older one, the sequence itself is preempted instead.
//!
//! Tested below with exact budgets and block counts; the engine tests run it
//! against a scripted model.

use std::collections::{HashSet, VecDeque};
use std::time::Instant;

use super::kv_cache::{BlockManager, KvUsage, SeqId};
use super::runner::{BatchEntry, ForwardBatch};
use super::sequence::Sequence;

#[derive(Debug)]
pub struct Scheduler {
    max_batch_tokens: usize,
    max_running: usize,
    kv: BlockManager,
    waiting: VecDeque<Sequence>,
    /// In admission order (newest last).
    running: Vec<Sequence>,
    preemptions: u64,
    /// (arrival, admission) of sequences admitted for the first time since
    /// the last [`Scheduler::take_first_admissions`].
    first_admissions: Vec<(Instant, Instant)>,
}

impl Scheduler {
    pub fn new(kv: BlockManager, max_batch_tokens: usize, max_running: usize) -> Self {
        Self {
            max_batch_tokens,
            max_running,
            kv,
            waiting: VecDeque::new(),
            running: Vec::new(),
            preemptions: 0,
            first_admissions: Vec::new(),
        }
    }

    pub fn add(&mut self, seq: Sequence) {
        self.waiting.push_back(seq);
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn preemptions(&self) -> u64 {
        self.preemptions
    }

    pub fn kv_usage(&self) -> KvUsage {
        self.kv.usage()
    }

    pub fn block_size(&self) -> usize {
        self.kv.block_size()
    }

    /// Distinct KV slots holding a running sequence's computed token.
    pub fn kv_live_tokens(&self) -> usize {
        self.kv.live_tokens(self.running.iter().map(|s| (s.id, s.num_computed)))
    }

    pub fn prefix_counters(&self) -> (u64, u64) {
        self.kv.prefix_counters()
    }

    pub fn get_mut(&mut self, id: SeqId) -> Option<&mut Sequence> {
        self.running.iter_mut().find(|s| s.id == id)
    }

    /// Removes sequences whose client went away, freeing their blocks now.
    pub fn remove_cancelled(&mut self) -> Vec<Sequence> {
        let mut gone = Vec::new();
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].is_cancelled() {
                let s = self.running.remove(i);
                self.kv.free(s.id);
                gone.push(s);
            } else {
                i += 1;
            }
        }
        let (cancelled, kept): (Vec<_>, Vec<_>) = self.waiting.drain(..).partition(Sequence::is_cancelled);
        self.waiting = kept.into();
        gone.extend(cancelled);
        gone
    }

    /// Removes a running sequence (finished or failed) and frees its blocks.
    pub fn finish(&mut self, id: SeqId) -> Option<Sequence> {
        let i = self.running.iter().position(|s| s.id == id)?;
        self.kv.free(id);
        Some(self.running.remove(i))
    }

    /// Plans one step. Empty when nothing can run.
    pub fn schedule(&mut self) -> ForwardBatch {
        let mut budget = self.max_batch_tokens;
        let mut planned: Vec<(SeqId, usize)> = Vec::new();
        let mut scheduled: HashSet<SeqId> = HashSet::new();
        let mut copies = Vec::new();
        let mut preempted = false;

        for decode_pass in [true, false] {
            let mut i = 0;
            while i < self.running.len() && budget > 0 {
                let s = &self.running[i];
                let left = s.num_uncomputed();
                if scheduled.contains(&s.id) || (left == 1) != decode_pass {
                    i += 1;
                    continue;
                }
                let (id, computed) = (s.id, s.num_computed);
                let n = left.min(budget).min(self.kv.slot_capacity(id, computed));
                let got = if n > 0 {
                    self.kv.allocate_slots(id, computed, n).ok()
                } else {
                    None
                };
                match got {
                    Some(c) => {
                        copies.extend(c);
                        planned.push((id, n));
                        scheduled.insert(id);
                        budget -= n;
                        i += 1;
                    }
                    None => {
                        preempted = true;
                        let victim = (0..self.running.len())
                            .rev()
                            .find(|&j| j != i && !scheduled.contains(&self.running[j].id));
                        match victim {
                            // Retry the same sequence with the freed blocks.
                            Some(j) if j > i => self.preempt(j),
                            // Itself is the newest candidate; `i` now points at the next one.
                            _ => self.preempt(i),
                        }
                    }
                }
            }
        }

        while budget > 0 && !preempted && self.running.len() < self.max_running {
            let Some(s) = self.waiting.front_mut() else { break };
            let Ok(cached) = self.kv.admit(s.id, &s.tokens, budget) else {
                break;
            };
            let n = (s.tokens.len() - cached).min(budget);
            s.num_computed = cached;
            if s.admitted_at.is_none() {
                let now = Instant::now();
                s.admitted_at = Some(now);
                s.cached_prompt_tokens = cached.min(s.prompt_len);
                self.first_admissions.push((s.arrival, now));
            }
            planned.push((s.id, n));
            budget -= n;
            let s = self.waiting.pop_front().expect("front exists");
            self.running.push(s);
        }

        let entries = planned
            .into_iter()
            .map(|(id, n)| {
                let s = self.running.iter().find(|s| s.id == id).expect("planned sequences run");
                let end = s.num_computed + n;
                let table = self.kv.block_table(id).expect("running sequences hold blocks");
                BatchEntry {
                    seq_id: id,
                    tokens: s.tokens[s.num_computed..end].to_vec(),
                    start_pos: s.num_computed,
                    block_table: table[..end.div_ceil(self.kv.block_size())].to_vec(),
                    want_logits: end == s.tokens.len(),
                }
            })
            .collect();
        ForwardBatch {
            entries,
            block_copies: copies,
        }
    }

    pub fn take_first_admissions(&mut self) -> Vec<(Instant, Instant)> {
        std::mem::take(&mut self.first_admissions)
    }

    /// Marks the batch's tokens computed and offers the newly full blocks to
    /// the prefix cache. Call after a successful forward pass.
    pub fn complete(&mut self, batch: &ForwardBatch) {
        for e in &batch.entries {
            if let Some(s) = self.running.iter_mut().find(|s| s.id == e.seq_id) {
                s.num_computed = e.start_pos + e.tokens.len();
                self.kv.cache_computed(s.id, &s.tokens, s.num_computed);
            }
        }
    }

    fn preempt(&mut self, i: usize) {
        let mut s = self.running.remove(i);
        self.kv.free(s.id);
        s.num_computed = 0;
        self.preemptions += 1;
        self.waiting.push_front(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SamplingParams;

    fn seq(id: SeqId, prompt: Vec<u32>) -> Sequence {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        std::mem::forget(rx); // keep the channel open: not cancelled
        Sequence::new(id, format!("r{id}"), prompt, SamplingParams::default(), tx)
    }

    /// Pretends the model sampled `tok` for every entry that wanted logits.
    fn run(s: &mut Scheduler, batch: &ForwardBatch, tok: u32) {
        s.complete(batch);
        for e in &batch.entries {
            if e.want_logits {
                s.get_mut(e.seq_id).unwrap().tokens.push(tok);
            }
        }
    }

    fn plan(b: &ForwardBatch) -> Vec<(SeqId, usize, usize, bool)> {
        b.entries
            .iter()
            .map(|e| (e.seq_id, e.start_pos, e.tokens.len(), e.want_logits))
            .collect()
    }

    #[test]
    fn long_prompt_is_chunked_and_decodes_go_first() {
        let mut s = Scheduler::new(BlockManager::new(64, 4), 8, 8);
        s.add(seq(1, vec![1; 3]));
        let b = s.schedule();
        assert_eq!(plan(&b), vec![(1, 0, 3, true)]);
        run(&mut s, &b, 7);
        // A 20-token prompt arrives: seq 1 decodes (1 token), seq 2 gets 7.
        s.add(seq(2, vec![2; 20]));
        let b = s.schedule();
        assert_eq!(plan(&b), vec![(1, 3, 1, true), (2, 0, 7, false)]);
        assert_eq!(b.entries[1].block_table.len(), 2);
        run(&mut s, &b, 7);
        let b = s.schedule();
        assert_eq!(plan(&b), vec![(1, 4, 1, true), (2, 7, 7, false)]);
        run(&mut s, &b, 7);
        let b = s.schedule();
        assert_eq!(plan(&b), vec![(1, 5, 1, true), (2, 14, 6, true)]);
        run(&mut s, &b, 7);
        let b = s.schedule();
        assert_eq!(plan(&b), vec![(1, 6, 1, true), (2, 20, 1, true)]);
    }

    #[test]
    fn max_running_bounds_admission() {
        let mut s = Scheduler::new(BlockManager::new(64, 4), 100, 2);
        for id in 1..=3 {
            s.add(seq(id, vec![1, 2]));
        }
        let b = s.schedule();
        assert_eq!(b.entries.len(), 2);
        assert_eq!((s.num_running(), s.num_waiting()), (2, 1));
        run(&mut s, &b, 3);
        s.finish(1);
        let b = s.schedule();
        assert_eq!(plan(&b), vec![(2, 2, 1, true), (3, 0, 2, true)]);
    }

    #[test]
    fn out_of_blocks_preempts_the_newest_and_readmits_it_first() {
        // 4 blocks of 2 tokens: two sequences of 3 tokens hold 2 blocks each.
        let mut s = Scheduler::new(BlockManager::new(4, 2), 100, 8);
        s.add(seq(1, vec![1, 2, 3]));
        s.add(seq(2, vec![4, 5, 6]));
        let b = s.schedule();
        assert_eq!(b.entries.len(), 2);
        run(&mut s, &b, 9);
        // 4 tokens still fit in 2 blocks each: both decode.
        let b = s.schedule();
        assert_eq!(b.entries.len(), 2);
        run(&mut s, &b, 9);
        // Position 4 needs a third block each: seq 2 (newest) is preempted.
        let b = s.schedule();
        assert_eq!(plan(&b), vec![(1, 4, 1, true)]);
        assert_eq!(s.preemptions(), 1);
        assert_eq!((s.num_running(), s.num_waiting()), (1, 1));
        run(&mut s, &b, 9);
        s.finish(1);
        // Seq 2 comes back with its generated tokens; its first block [4,5]
        // is still cached, the rest is recomputed.
        let b = s.schedule();
        assert_eq!(plan(&b), vec![(2, 2, 3, true)]);
        assert_eq!(b.entries[0].tokens, vec![6, 9, 9]);
    }

    #[test]
    fn cancelled_sequences_free_their_blocks_immediately() {
        let mut s = Scheduler::new(BlockManager::new(8, 2), 100, 8);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        s.add(Sequence::new(
            1,
            "r".into(),
            vec![1, 2, 3],
            SamplingParams::default(),
            tx,
        ));
        let b = s.schedule();
        run(&mut s, &b, 4);
        assert_eq!(s.kv_usage().used, 2);
        drop(rx);
        let gone = s.remove_cancelled();
        assert_eq!(gone.len(), 1);
        assert_eq!(s.kv_usage().used, 0);
        assert!(s.is_idle());
    }

    #[test]
    fn preempted_sequence_hits_its_own_cached_blocks() {
        let mut s = Scheduler::new(BlockManager::new(4, 2), 100, 8);
        s.add(seq(1, vec![1, 2, 3, 4, 5]));
        let b = s.schedule();
        run(&mut s, &b, 6);
        let mut victim = s.finish(1).unwrap();
        victim.num_computed = 0;
        s.add(victim);
        let b = s.schedule();
        // Its computed full blocks [1,2],[3,4] were cached and are reused.
        assert_eq!(plan(&b), vec![(1, 4, 2, true)]);
        assert_eq!(s.prefix_counters(), (5 + 6, 4));
    }
}

//! Iteration-level continuous batching (the vLLM V1 model): no prefill or
//! decode phases, each sequence only tracks `num_computed` against its known
//! tokens, and every step hands out a token budget.
//!
//! Per step, under `max_batch_tokens`:
//! 1. running sequences with exactly one uncomputed token (decodes) get it,
//!    oldest arrival first, so a long prompt never stalls decoding;
//! 2. running sequences still prefilling get a chunk of the remaining budget
//!    (shrunk to the free KV space);
//! 3. waiting sequences are admitted in arrival order (with their cached
//!    prefix) while budget, `max_running` and free blocks allow; none are
//!    admitted in a step that had to preempt.
//!
//! Arrival order is sequence id order (ids are handed out at submission);
//! both queues are kept in it, so a preempted and re-admitted sequence keeps
//! its seniority. When a running sequence cannot get blocks, the newest
//! arrival among the running sequences not yet scheduled this step is
//! preempted (blocks freed, back to the waiting queue, recomputed later with
//! its generated tokens; its full blocks usually come back as prefix-cache
//! hits). If that would be an older one, the sequence itself is preempted
//! instead.
//!
//! Prefix-cache queries and hits are counted at a sequence's first admission
//! only: re-admissions after preemption would count its own blocks again.
//!
//! Tested below with exact budgets and block counts; the engine tests run it
//! against a scripted model.

use std::collections::{HashSet, VecDeque};
use std::time::Instant;

use super::kv_cache::{BlockManager, KvUsage, SeqId};
use super::runner::{BatchEntry, ForwardBatch};
use super::sequence::Sequence;

/// A sequence admitted for the first time: (id, arrival, admission).
pub(crate) type FirstAdmission = (SeqId, Instant, Instant);

#[derive(Debug)]
pub(crate) struct Scheduler {
    max_batch_tokens: usize,
    max_running: usize,
    kv: BlockManager,
    /// In arrival order.
    waiting: VecDeque<Sequence>,
    /// In arrival order (oldest first).
    running: Vec<Sequence>,
    preemptions: u64,
    /// Prompt tokens looked up in the prefix cache / found there (first admissions).
    prefix_queries: u64,
    prefix_hits: u64,
    /// Sequences admitted for the first time since the last
    /// [`Scheduler::take_first_admissions`].
    first_admissions: Vec<FirstAdmission>,
}

impl Scheduler {
    pub(crate) fn new(kv: BlockManager, max_batch_tokens: usize, max_running: usize) -> Self {
        Self {
            max_batch_tokens,
            max_running,
            kv,
            waiting: VecDeque::new(),
            running: Vec::new(),
            preemptions: 0,
            prefix_queries: 0,
            prefix_hits: 0,
            first_admissions: Vec::new(),
        }
    }

    /// Queues a sequence by arrival (a new one normally goes last).
    pub(crate) fn add(&mut self, seq: Sequence) {
        let at = self.waiting.partition_point(|s| s.id < seq.id);
        self.waiting.insert(at, seq);
    }

    pub(crate) fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    pub(crate) fn num_running(&self) -> usize {
        self.running.len()
    }

    pub(crate) fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub(crate) fn preemptions(&self) -> u64 {
        self.preemptions
    }

    pub(crate) fn kv_usage(&self) -> KvUsage {
        self.kv.usage()
    }

    pub(crate) fn block_size(&self) -> usize {
        self.kv.block_size()
    }

    /// Distinct KV slots holding a running sequence's computed token.
    pub(crate) fn kv_live_tokens(&self) -> usize {
        self.kv.live_tokens(self.running.iter().map(|s| (s.id, s.num_computed)))
    }

    /// Prompt tokens looked up in the prefix cache / found there, since start
    /// (first admissions only).
    pub(crate) fn prefix_counters(&self) -> (u64, u64) {
        (self.prefix_queries, self.prefix_hits)
    }

    /// Index of a running sequence (`running` is sorted by id).
    fn position(&self, id: SeqId) -> Option<usize> {
        self.running.binary_search_by_key(&id, |s| s.id).ok()
    }

    pub(crate) fn get_mut(&mut self, id: SeqId) -> Option<&mut Sequence> {
        let i = self.position(id)?;
        Some(&mut self.running[i])
    }

    /// Removes sequences whose client went away, freeing their blocks now.
    pub(crate) fn remove_cancelled(&mut self) -> Vec<Sequence> {
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
    pub(crate) fn finish(&mut self, id: SeqId) -> Option<Sequence> {
        let i = self.position(id)?;
        self.kv.free(id);
        Some(self.running.remove(i))
    }

    /// Plans one step. Empty when nothing can run.
    pub(crate) fn schedule(&mut self) -> ForwardBatch {
        let mut budget = self.max_batch_tokens;
        let mut planned: Vec<(SeqId, usize)> = Vec::new();
        let mut scheduled: HashSet<SeqId> = HashSet::new();
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
                if n > 0 && self.kv.allocate_slots(id, computed, n).is_ok() {
                    planned.push((id, n));
                    scheduled.insert(id);
                    budget -= n;
                    i += 1;
                    continue;
                }
                preempted = true;
                // `running` is in arrival order: the last unscheduled one is the newest.
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

        while budget > 0 && !preempted && self.running.len() < self.max_running {
            let Some(s) = self.waiting.front_mut() else { break };
            let Ok(cached) = self.kv.admit(s.id, s.cache_domain, &s.tokens, budget) else {
                break;
            };
            let n = (s.tokens.len() - cached).min(budget);
            s.num_computed = cached;
            if s.admitted_at.is_none() {
                let now = Instant::now();
                s.admitted_at = Some(now);
                s.cached_prompt_tokens = cached.min(s.prompt_len);
                self.prefix_queries += s.tokens.len() as u64;
                self.prefix_hits += cached as u64;
                self.first_admissions.push((s.id, s.arrival, now));
            }
            planned.push((s.id, n));
            budget -= n;
            let s = self.waiting.pop_front().expect("front exists");
            let at = self.running.partition_point(|r| r.id < s.id);
            self.running.insert(at, s);
        }

        let entries = planned
            .into_iter()
            .map(|(id, n)| {
                let s = &self.running[self.position(id).expect("planned sequences run")];
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
            block_copies: Vec::new(),
        }
    }

    pub(crate) fn take_first_admissions(&mut self) -> Vec<FirstAdmission> {
        std::mem::take(&mut self.first_admissions)
    }

    /// Marks the batch's tokens computed and offers the newly full blocks to
    /// the prefix cache. Call after a successful forward pass.
    pub(crate) fn complete(&mut self, batch: &ForwardBatch) {
        for e in &batch.entries {
            if let Some(i) = self.position(e.seq_id) {
                let s = &mut self.running[i];
                s.num_computed = e.start_pos + e.tokens.len();
                self.kv.cache_computed(s.id, &s.tokens, s.num_computed);
            }
        }
    }

    /// Drops every sequence and starts over with an empty pool of the same
    /// size (after a panic left the state untrustworthy); counters carry on.
    pub(crate) fn reset(&mut self) {
        self.kv = BlockManager::new(self.kv.num_blocks(), self.kv.block_size());
        self.waiting.clear();
        self.running.clear();
        self.first_admissions.clear();
    }

    fn preempt(&mut self, i: usize) {
        let mut s = self.running.remove(i);
        self.kv.free(s.id);
        s.num_computed = 0;
        self.preemptions += 1;
        self.add(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GenerateRequest;

    fn request(id: SeqId, prompt: Vec<u32>) -> GenerateRequest {
        GenerateRequest {
            request_id: format!("r{id}"),
            prompt_tokens: prompt,
            ..GenerateRequest::default()
        }
    }

    fn seq(id: SeqId, prompt: Vec<u32>) -> Sequence {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        std::mem::forget(rx); // keep the channel open: not cancelled
        Sequence::new(id, request(id, prompt), &[], tx).unwrap()
    }

    fn ids<'a>(seqs: impl IntoIterator<Item = &'a Sequence>) -> Vec<SeqId> {
        seqs.into_iter().map(|s| s.id).collect()
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
        s.add(Sequence::new(1, request(1, vec![1, 2, 3]), &[], tx).unwrap());
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
        // Its computed full blocks [1,2],[3,4] were cached and are reused,
        // but only its first admission counts as a prefix-cache query.
        assert_eq!(plan(&b), vec![(1, 4, 2, true)]);
        assert_eq!(s.prefix_counters(), (5, 0));
    }

    #[test]
    fn the_newest_arrival_is_preempted_not_the_newest_admission() {
        // 4 blocks of 2 tokens. Sequence 3 runs first; sequence 1 (an older
        // arrival, e.g. back from a preemption) is admitted after it.
        let mut s = Scheduler::new(BlockManager::new(4, 2), 100, 8);
        s.add(seq(3, vec![7, 7, 7]));
        let b = s.schedule();
        run(&mut s, &b, 9);
        s.add(seq(1, vec![8, 8, 8]));
        let b = s.schedule();
        assert_eq!(plan(&b), vec![(3, 3, 1, true), (1, 0, 3, true)]);
        run(&mut s, &b, 9);
        assert_eq!(ids(&s.running), vec![1, 3], "running in arrival order");
        // 3 needs a third block and none is free: though admitted first, it
        // is the newest arrival, so it is preempted rather than 1.
        let b = s.schedule();
        assert_eq!(plan(&b), vec![(1, 3, 1, true)]);
        assert_eq!((s.preemptions(), ids(&s.waiting)), (1, vec![3]));
    }

    #[test]
    fn the_waiting_queue_stays_in_arrival_order() {
        let mut s = Scheduler::new(BlockManager::new(4, 2), 100, 8);
        for id in [4, 2, 5, 1] {
            s.add(seq(id, vec![1]));
        }
        assert_eq!(ids(&s.waiting), vec![1, 2, 4, 5]);
    }
}

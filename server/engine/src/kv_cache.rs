//! Paged KV block manager with automatic prefix caching (no tensors: it only
//! hands out block ids; the [`super::runner::ModelRunner`] owns the memory).
//!
//! Owns: one preallocated pool of `num_blocks` blocks of `block_size` tokens,
//! each sequence's block table, and the prefix cache (hash → block).
//!
//! Invariants:
//! - every block is in exactly one of three states: *used* (refcount > 0, in
//!   one or more block tables), *cached* (refcount 0, holds a full block whose
//!   hash is in the cache map; evictable, LRU by the time it was released), or
//!   *free* (refcount 0, no hash);
//! - a block's hash is chained over (parent block hash, the block's token ids),
//!   so equal hashes mean equal whole prefixes; only FULL, COMPUTED blocks are
//!   hashed ([`BlockManager::cache_computed`] runs after the forward pass that
//!   filled them, so no sequence can reuse a block that is still being written);
//! - a sequence never writes into a block another sequence also holds: such a
//!   block is copied first ([`BlockManager::allocate_slots`] returns the copy);
//! - a prefix hit never covers the whole prompt: at least one token is always
//!   computed so the model yields logits.
//!
//! Tested by unit tests on tiny pools (exact block ids, refcounts, eviction
//! order) and a proptest that runs thousands of random admit / grow / fork /
//! compute / free operations while modelling every block's contents as token
//! lists, checking leaks, refcounts, prefix reuse and copy-on-write isolation.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

/// Identifies a sequence inside the engine.
pub type SeqId = u64;

/// Not enough free (or evictable) blocks for the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutOfBlocks;

#[derive(Debug, Clone, Default)]
struct Block {
    ref_count: u32,
    /// Set while the block is registered in the prefix cache.
    hash: Option<u64>,
    /// Key in `evictable` while cached with refcount 0.
    lru_stamp: u64,
}

#[derive(Debug, Clone, Default)]
struct SeqTable {
    blocks: Vec<u32>,
    /// Chained hashes of the sequence's computed full blocks, in order
    /// (kept even when a duplicate block was not registered, for chaining).
    hashes: Vec<u64>,
}

/// Snapshot of the pool for stats and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KvUsage {
    pub total: usize,
    /// Blocks held by at least one sequence.
    pub used: usize,
    /// Unheld blocks that still hold a reusable prefix.
    pub cached: usize,
    /// Unheld blocks without content.
    pub free: usize,
}

/// The block manager. Single-threaded: lives on the engine thread.
#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    blocks: Vec<Block>,
    /// Free blocks without a hash; popped from the end (cheapest to reuse).
    free: Vec<u32>,
    /// Cached blocks with refcount 0, oldest release first (LRU eviction).
    evictable: BTreeMap<u64, u32>,
    next_stamp: u64,
    cache: HashMap<u64, u32>,
    seqs: HashMap<SeqId, SeqTable>,
    prefix_queries: u64,
    prefix_hits: u64,
}

/// Chained block hash over the parent hash and the block's tokens.
fn block_hash(parent: Option<u64>, tokens: &[u32]) -> u64 {
    // DefaultHasher::new() uses fixed keys: deterministic within a build.
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0, "block_size must be > 0");
        Self {
            block_size,
            blocks: vec![Block::default(); num_blocks],
            // Reversed so that block 0 is handed out first (readable tests).
            free: (0..num_blocks as u32).rev().collect(),
            evictable: BTreeMap::new(),
            next_stamp: 0,
            cache: HashMap::new(),
            seqs: HashMap::new(),
            prefix_queries: 0,
            prefix_hits: 0,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks obtainable now without preempting anyone (free + evictable).
    pub fn num_available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    pub fn usage(&self) -> KvUsage {
        let available = self.num_available();
        KvUsage {
            total: self.blocks.len(),
            used: self.blocks.len() - available,
            cached: self.evictable.len(),
            free: self.free.len(),
        }
    }

    /// KV slots holding a computed token, given `(sequence, computed length)` pairs: a block shared by
    /// several sequences counts once, as filled as the furthest of them. With [`Self::usage`] this
    /// gives the pool's internal waste (held slots not holding a token).
    pub fn live_tokens(&self, computed: impl IntoIterator<Item = (SeqId, usize)>) -> usize {
        let bs = self.block_size;
        let mut fill: HashMap<u32, usize> = HashMap::new();
        for (seq, n) in computed {
            let Some(table) = self.seqs.get(&seq) else { continue };
            for (i, &b) in table.blocks.iter().enumerate().take(n.div_ceil(bs)) {
                let f = fill.entry(b).or_default();
                *f = (*f).max(bs.min(n - i * bs));
            }
        }
        fill.values().sum()
    }

    /// Prompt tokens looked up in the prefix cache / found there, since start.
    pub fn prefix_counters(&self) -> (u64, u64) {
        (self.prefix_queries, self.prefix_hits)
    }

    pub fn block_table(&self, seq: SeqId) -> Option<&[u32]> {
        self.seqs.get(&seq).map(|t| t.blocks.as_slice())
    }

    pub fn ref_count(&self, block: u32) -> u32 {
        self.blocks[block as usize].ref_count
    }

    pub fn contains(&self, seq: SeqId) -> bool {
        self.seqs.contains_key(&seq)
    }

    fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Cached blocks matching the longest prefix of `tokens`, leaving at
    /// least one token to compute. Returns (blocks, their chained hashes).
    fn find_prefix(&self, tokens: &[u32]) -> (Vec<u32>, Vec<u64>) {
        let max_blocks = tokens.len().saturating_sub(1) / self.block_size;
        let mut blocks = Vec::new();
        let mut hashes = Vec::new();
        let mut parent = None;
        for chunk in tokens.chunks_exact(self.block_size).take(max_blocks) {
            let h = block_hash(parent, chunk);
            match self.cache.get(&h) {
                Some(&b) => {
                    blocks.push(b);
                    hashes.push(h);
                    parent = Some(h);
                }
                None => break,
            }
        }
        (blocks, hashes)
    }

    /// Admits a new sequence whose known tokens are `tokens`: reuses the
    /// cached prefix and allocates slots for the first `num_new` tokens after
    /// it (capped at the tokens left). All or nothing: on `OutOfBlocks`
    /// nothing changed. Returns the number of tokens served from the cache.
    pub fn admit(&mut self, seq: SeqId, tokens: &[u32], num_new: usize) -> Result<usize, OutOfBlocks> {
        assert!(!self.seqs.contains_key(&seq), "sequence {seq} admitted twice");
        let (hit_blocks, hashes) = self.find_prefix(tokens);
        let cached = hit_blocks.len() * self.block_size;
        let num_new = num_new.min(tokens.len() - cached);
        let needed = self.blocks_for(cached + num_new) - hit_blocks.len();
        // Hit blocks that sit in the evictable list stop being available.
        let revived = hit_blocks
            .iter()
            .filter(|&&b| self.blocks[b as usize].ref_count == 0)
            .count();
        if needed + revived > self.num_available() {
            return Err(OutOfBlocks);
        }
        for &b in &hit_blocks {
            self.acquire(b);
        }
        let mut table = SeqTable {
            blocks: hit_blocks,
            hashes,
        };
        for _ in 0..needed {
            let b = self.pop_free().expect("availability checked above");
            table.blocks.push(b);
        }
        self.seqs.insert(seq, table);
        self.prefix_queries += tokens.len() as u64;
        self.prefix_hits += cached as u64;
        Ok(cached)
    }

    /// Ensures `seq` has slots for positions `0..num_computed + num_new`,
    /// where writing starts at `num_computed`. A block about to be written
    /// that is shared with another sequence is replaced by a private copy;
    /// the returned (src, dst) pairs must be copied before the forward pass.
    /// All or nothing.
    pub fn allocate_slots(
        &mut self,
        seq: SeqId,
        num_computed: usize,
        num_new: usize,
    ) -> Result<Vec<(u32, u32)>, OutOfBlocks> {
        let bs = self.block_size;
        let table = self.seqs.get(&seq).expect("allocate_slots on an unknown sequence");
        let have = table.blocks.len();
        let want = self.blocks_for(num_computed + num_new);
        let extra = want.saturating_sub(have);
        // Existing blocks written by this step (positions num_computed..): the
        // first one may be partially filled and shared (after a fork).
        let first_write = num_computed / bs;
        let shared: Vec<usize> = (first_write..have.min(want))
            .filter(|&i| self.blocks[table.blocks[i] as usize].ref_count > 1)
            .collect();
        if extra + shared.len() > self.num_available() {
            return Err(OutOfBlocks);
        }
        let mut copies = Vec::with_capacity(shared.len());
        for i in shared {
            let dst = self.pop_free().expect("availability checked above");
            let table = self.seqs.get_mut(&seq).expect("checked above");
            let src = std::mem::replace(&mut table.blocks[i], dst);
            self.blocks[src as usize].ref_count -= 1;
            copies.push((src, dst));
        }
        for _ in 0..extra {
            let b = self.pop_free().expect("availability checked above");
            self.seqs.get_mut(&seq).expect("checked above").blocks.push(b);
        }
        Ok(copies)
    }

    /// How many more tokens `seq` could get slots for right now, assuming
    /// no copy-on-write is needed.
    pub fn slot_capacity(&self, seq: SeqId, num_computed: usize) -> usize {
        let have = self.seqs.get(&seq).map_or(0, |t| t.blocks.len());
        (have + self.num_available()) * self.block_size - num_computed
    }

    /// Registers the sequence's full blocks among its first `num_computed`
    /// tokens (whose KV is now written) in the prefix cache.
    pub fn cache_computed(&mut self, seq: SeqId, tokens: &[u32], num_computed: usize) {
        let bs = self.block_size;
        let Some(table) = self.seqs.get_mut(&seq) else { return };
        let full = (num_computed / bs).min(table.blocks.len());
        for i in table.hashes.len()..full {
            let parent = table.hashes.last().copied();
            let h = block_hash(parent, &tokens[i * bs..(i + 1) * bs]);
            table.hashes.push(h);
            let b = table.blocks[i];
            // A block with the same content may already be cached (computed
            // concurrently by another sequence): keep the first, don't alias.
            if self.blocks[b as usize].hash.is_none() && !self.cache.contains_key(&h) {
                self.cache.insert(h, b);
                self.blocks[b as usize].hash = Some(h);
            }
        }
    }

    /// Makes `child` share all of `parent`'s blocks (parallel sampling):
    /// later writes to shared blocks are copied on write.
    pub fn fork(&mut self, parent: SeqId, child: SeqId) {
        assert!(!self.seqs.contains_key(&child), "sequence {child} exists");
        let table = self.seqs.get(&parent).expect("fork of an unknown sequence").clone();
        for &b in &table.blocks {
            self.blocks[b as usize].ref_count += 1;
        }
        self.seqs.insert(child, table);
    }

    /// Releases all of the sequence's blocks (finished, cancelled or
    /// preempted). Cached blocks become evictable, last block first, so a
    /// sequence's tail is evicted before its (more shareable) head.
    pub fn free(&mut self, seq: SeqId) {
        let Some(table) = self.seqs.remove(&seq) else { return };
        for &b in table.blocks.iter().rev() {
            let block = &mut self.blocks[b as usize];
            block.ref_count -= 1;
            if block.ref_count == 0 {
                if block.hash.is_some() {
                    block.lru_stamp = self.next_stamp;
                    self.evictable.insert(self.next_stamp, b);
                    self.next_stamp += 1;
                } else {
                    self.free.push(b);
                }
            }
        }
    }

    fn acquire(&mut self, b: u32) {
        let block = &mut self.blocks[b as usize];
        if block.ref_count == 0 {
            self.evictable.remove(&block.lru_stamp);
        }
        block.ref_count += 1;
    }

    /// Takes a free block, evicting the least recently released cached one
    /// only when no empty block is left. The block comes back with refcount 1.
    fn pop_free(&mut self) -> Option<u32> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.evictable.pop_first()?;
                let h = self.blocks[b as usize]
                    .hash
                    .take()
                    .expect("evictable blocks are hashed");
                self.cache.remove(&h);
                b
            }
        };
        self.blocks[b as usize].ref_count = 1;
        Some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn toks(range: std::ops::Range<u32>) -> Vec<u32> {
        range.collect()
    }

    #[test]
    fn allocates_lowest_ids_first_and_frees_everything() {
        let mut m = BlockManager::new(8, 4);
        assert_eq!(m.admit(1, &toks(0..10), 10), Ok(0));
        assert_eq!(m.block_table(1).unwrap(), &[0, 1, 2]);
        assert_eq!(m.allocate_slots(1, 10, 3), Ok(vec![]));
        assert_eq!(m.block_table(1).unwrap(), &[0, 1, 2, 3]);
        assert_eq!(m.usage().used, 4);
        m.free(1);
        assert_eq!(
            m.usage(),
            KvUsage {
                total: 8,
                used: 0,
                cached: 0,
                free: 8
            }
        );
    }

    /// Block size 4: sequence 1 (10 tokens, computed and cached) and sequence 2, whose 11 tokens share
    /// the first 8 (blocks 0 and 1) and continue in a private block. Returns sequence 2's admission.
    fn shared_prefix_pair() -> (BlockManager, Result<usize, OutOfBlocks>) {
        let mut m = BlockManager::new(8, 4);
        let prompt = toks(0..10);
        m.admit(1, &prompt, 10).unwrap();
        m.cache_computed(1, &prompt, 10);
        let mut other = toks(0..8);
        other.extend([99, 98, 97]);
        let admitted = m.admit(2, &other, 11);
        (m, admitted)
    }

    #[test]
    fn prefix_hit_reuses_full_blocks_and_counts_tokens() {
        let (mut m, admitted) = shared_prefix_pair();
        // Shares blocks 0 and 1 (8 tokens); the partial third block is private.
        assert_eq!(admitted, Ok(8));
        assert_eq!(m.block_table(2).unwrap(), &[0, 1, 3]);
        assert_eq!(
            (m.ref_count(0), m.ref_count(1), m.ref_count(2), m.ref_count(3)),
            (2, 2, 1, 1)
        );
        assert_eq!(m.prefix_counters(), (21, 8));
        // Diverging in the first block: no hit at all.
        assert_eq!(m.admit(3, &[5, 1, 2, 3, 4, 5], 6), Ok(0));
        assert_eq!(m.block_table(3).unwrap(), &[4, 5]);
    }

    #[test]
    fn live_tokens_count_shared_blocks_once_and_partial_blocks_by_fill() {
        let (m, admitted) = shared_prefix_pair();
        admitted.unwrap();
        // Seq 1: 10 computed (4 + 4 + 2); seq 2: 11 (shared 8 + 3 in its own block).
        assert_eq!(m.live_tokens([(1, 10), (2, 11)]), 8 + 2 + 3);
        // Only what is computed counts: seq 2 has computed its cached prefix only.
        assert_eq!(m.live_tokens([(1, 10), (2, 8)]), 10);
        assert_eq!(m.live_tokens([(1, 0), (7, 5)]), 0);
        assert_eq!(m.usage().used * 4 - m.live_tokens([(1, 10), (2, 11)]), 3);
    }

    #[test]
    fn never_reuses_the_block_that_is_the_whole_prompt() {
        let mut m = BlockManager::new(8, 4);
        let prompt = toks(0..8);
        m.admit(1, &prompt, 8).unwrap();
        m.cache_computed(1, &prompt, 8);
        // Both blocks cached, but the last must be computed to get logits.
        assert_eq!(m.admit(2, &prompt, 8), Ok(4));
        assert_eq!(m.block_table(2).unwrap(), &[0, 2]);
    }

    #[test]
    fn cached_blocks_survive_free_and_are_evicted_lru_only_when_needed() {
        let mut m = BlockManager::new(4, 2);
        let a = [1, 2, 3, 4, 5];
        m.admit(1, &a, 5).unwrap(); // blocks 0,1,2
        m.cache_computed(1, &a, 5); // 0 and 1 hashed
        m.free(1);
        // Released tail first: block 1 then block 0 become evictable; 2 is free.
        assert_eq!(
            m.usage(),
            KvUsage {
                total: 4,
                used: 0,
                cached: 2,
                free: 2
            }
        );
        // Two fresh blocks come from the empty pool (2, just released, then 3): no eviction.
        m.admit(2, &[9, 9, 9], 3).unwrap();
        assert_eq!(m.block_table(2).unwrap(), &[2, 3]);
        assert_eq!(m.usage().cached, 2);
        // Next allocation evicts the least recently released: block 1 (the tail).
        m.allocate_slots(2, 3, 2).unwrap();
        assert_eq!(m.block_table(2).unwrap(), &[2, 3, 1]);
        assert_eq!(m.usage().cached, 1);
        // Block 0 (prefix [1,2]) is still a hit; [3,4] was evicted.
        m.free(2);
        assert_eq!(m.admit(3, &a, 5), Ok(2));
        assert_eq!(m.block_table(3).unwrap()[0], 0);
    }

    #[test]
    fn revived_cached_block_is_not_counted_as_available_twice() {
        let mut m = BlockManager::new(2, 2);
        let a = [1, 2, 3];
        m.admit(1, &a, 3).unwrap();
        m.cache_computed(1, &a, 3);
        m.free(1);
        // Hit on block 0 plus one new block: fits exactly.
        assert_eq!(m.admit(2, &a, 3), Ok(2));
        assert_eq!(m.num_available(), 0);
        assert_eq!(m.admit(3, &[7], 1), Err(OutOfBlocks));
        assert!(!m.contains(3));
        assert_eq!(m.allocate_slots(2, 3, 2), Err(OutOfBlocks));
        assert_eq!(m.block_table(2).unwrap(), &[0, 1]);
    }

    #[test]
    fn fork_then_write_copies_the_shared_partial_block() {
        let mut m = BlockManager::new(8, 4);
        m.admit(1, &toks(0..6), 6).unwrap(); // [0, 1], block 1 half full
        m.fork(1, 2);
        assert_eq!(m.ref_count(1), 2);
        // Seq 2 writes position 6 (block 1): gets a private copy.
        assert_eq!(m.allocate_slots(2, 6, 1), Ok(vec![(1, 2)]));
        assert_eq!(m.block_table(2).unwrap(), &[0, 2]);
        assert_eq!((m.ref_count(0), m.ref_count(1), m.ref_count(2)), (2, 1, 1));
        // Seq 1 now owns block 1 alone: writes in place, no copy.
        assert_eq!(m.allocate_slots(1, 6, 1), Ok(vec![]));
        m.free(1);
        m.free(2);
        assert_eq!(m.usage().used, 0);
    }

    /// Random operations against a content model of every physical block.
    #[derive(Debug, Clone)]
    enum Op {
        Admit { prompt: Vec<u32>, chunk: usize },
        Step { pick: usize, n: usize },
        Fork { pick: usize },
        Free { pick: usize },
    }

    fn op() -> impl Strategy<Value = Op> {
        // Small alphabet and shared leading tokens make prefix hits common.
        let prompt = (0u32..3, prop::collection::vec(0u32..3, 1..14)).prop_map(|(head, mut rest)| {
            rest.insert(0, head);
            rest
        });
        prop_oneof![
            3 => (prompt, 1usize..16).prop_map(|(prompt, chunk)| Op::Admit { prompt, chunk }),
            4 => (any::<usize>(), 1usize..6).prop_map(|(pick, n)| Op::Step { pick, n }),
            1 => any::<usize>().prop_map(|pick| Op::Fork { pick }),
            2 => any::<usize>().prop_map(|pick| Op::Free { pick }),
        ]
    }

    struct Live {
        id: SeqId,
        tokens: Vec<u32>,
        computed: usize,
    }

    /// What position `p` of a sequence holds: like real KV, it depends on
    /// the whole prefix, so a block reused under another prefix is caught.
    fn kv(tokens: &[u32], p: usize) -> Option<(u32, u64)> {
        Some((tokens[p], block_hash(None, &tokens[..=p])))
    }

    /// Writes tokens `from..to` of `s` into the modelled pool.
    fn write(store: &mut [Vec<Option<(u32, u64)>>], m: &BlockManager, s: &Live, from: usize, to: usize) {
        let table = m.block_table(s.id).unwrap();
        for p in from..to {
            store[table[p / m.block_size()] as usize][p % m.block_size()] = kv(&s.tokens, p);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
        #[test]
        fn random_ops_keep_contents_refcounts_and_no_leaks(ops in prop::collection::vec(op(), 1..200)) {
            let bs = 4;
            let mut m = BlockManager::new(24, bs);
            let mut store = vec![vec![None; bs]; 24];
            let mut live: Vec<Live> = Vec::new();
            let mut next_id = 0;
            for op in ops {
                match op {
                    Op::Admit { prompt, chunk } => {
                        next_id += 1;
                        let (q0, h0) = m.prefix_counters();
                        if let Ok(cached) = m.admit(next_id, &prompt, chunk) {
                            prop_assert!(cached < prompt.len());
                            prop_assert_eq!(m.prefix_counters(), (q0 + prompt.len() as u64, h0 + cached as u64));
                            let s = Live { id: next_id, tokens: prompt, computed: cached };
                            let end = (cached + chunk).min(s.tokens.len());
                            write(&mut store, &m, &s, cached, end);
                            let s = Live { computed: end, ..s };
                            m.cache_computed(s.id, &s.tokens, s.computed);
                            live.push(s);
                        }
                    }
                    Op::Step { pick, n } if !live.is_empty() => {
                        let i = pick % live.len();
                        let s = &mut live[i];
                        // Decoding past the prompt: invent the next tokens.
                        while s.tokens.len() < s.computed + n {
                            s.tokens.push((s.tokens.len() as u32 * 7 + s.id as u32) % 5);
                        }
                        if let Ok(copies) = m.allocate_slots(s.id, s.computed, n) {
                            for (src, dst) in copies {
                                prop_assert_eq!(m.ref_count(dst), 1);
                                store[dst as usize] = store[src as usize].clone();
                            }
                            let s = &live[i];
                            write(&mut store, &m, s, s.computed, s.computed + n);
                            let s = &mut live[i];
                            s.computed += n;
                            m.cache_computed(s.id, &s.tokens, s.computed);
                        }
                    }
                    Op::Fork { pick } if !live.is_empty() => {
                        let parent = &live[pick % live.len()];
                        next_id += 1;
                        m.fork(parent.id, next_id);
                        let tokens = parent.tokens[..parent.computed].to_vec();
                        live.push(Live { id: next_id, computed: tokens.len(), tokens });
                    }
                    Op::Free { pick } if !live.is_empty() => {
                        let s = live.swap_remove(pick % live.len());
                        m.free(s.id);
                    }
                    _ => {}
                }
                // Every live sequence reads back exactly its own computed tokens.
                for s in &live {
                    let table = m.block_table(s.id).unwrap();
                    prop_assert!(table.len() * bs >= s.computed);
                    for p in 0..s.computed {
                        prop_assert_eq!(store[table[p / bs] as usize][p % bs], kv(&s.tokens, p), "seq {} pos {}", s.id, p);
                    }
                }
                // Refcount of each block = number of tables holding it.
                let mut held = [0u32; 24];
                for s in &live {
                    for &b in m.block_table(s.id).unwrap() { held[b as usize] += 1; }
                }
                for (b, &h) in held.iter().enumerate() {
                    prop_assert_eq!(m.ref_count(b as u32), h);
                }
                let u = m.usage();
                prop_assert_eq!(u.used + u.cached + u.free, u.total);
                prop_assert_eq!(u.used, held.iter().filter(|&&h| h > 0).count());
            }
            for s in live.drain(..) { m.free(s.id); }
            let u = m.usage();
            prop_assert_eq!(u.used, 0);
            prop_assert_eq!(u.cached + u.free, 24);
        }
    }
}

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
//! - a block's hash is chained over (parent hash, the block's token ids); the
//!   chain's root is the sequence's [`CacheDomain`] (tenant salt, adapter), so
//!   two domains never share a block. The hash is SipHash-1-3 keyed with a
//!   random per-manager key, so callers cannot aim for collisions, and a hit is
//!   only taken when the cached block's stored parent hash and token ids equal
//!   the lookup's (a colliding hash is a miss). A sequence whose block collides
//!   registers none of its later blocks, so every registered chain is verified
//!   link by link;
//! - only FULL, COMPUTED blocks are registered ([`BlockManager::cache_computed`]
//!   runs after the forward pass that filled them, so no sequence can reuse a
//!   block that is still being written);
//! - a sequence never writes into a block another sequence also holds: shared
//!   blocks come only from prefix hits, which are full and lie before the
//!   first position the sequence computes;
//! - a prefix hit never covers the whole prompt: at least one token is always
//!   computed so the model yields logits.
//!
//! Tested by unit tests on tiny pools (exact block ids, refcounts, eviction
//! order, domains, forced collisions) and a proptest that runs thousands of
//! random admit / grow / compute / free operations while modelling every
//! block's contents as token lists, checking leaks, refcounts and prefix reuse.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hash, RandomState};

/// Identifies a sequence inside the engine.
pub(crate) type SeqId = u64;

/// Not enough free (or evictable) blocks for the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OutOfBlocks;

/// Whose prefix cache a sequence reads and fills: blocks are shared only
/// between sequences of the same domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub(crate) struct CacheDomain {
    /// 0 = the shared default domain.
    pub(crate) salt: u64,
    /// LoRA slot; None = the base model.
    pub(crate) adapter: Option<u32>,
}

#[derive(Debug, Clone, Default)]
struct Block {
    ref_count: u32,
    /// Set while the block is registered in the prefix cache.
    hash: Option<u64>,
    /// Key in `evictable` while cached with refcount 0.
    lru_stamp: u64,
}

/// What a registered block holds, checked on every hit.
#[derive(Debug)]
struct Cached {
    block: u32,
    parent: u64,
    tokens: Box<[u32]>,
}

#[derive(Debug, Clone, Default)]
struct SeqTable {
    blocks: Vec<u32>,
    /// Hash of the domain: the parent of the first block.
    root: u64,
    /// Chained hashes of the sequence's computed full blocks, in order
    /// (kept even when a duplicate block was not registered, for chaining).
    hashes: Vec<u64>,
    /// A block of this sequence collided with a different cached block: its
    /// later blocks are not registered (their parent is not the cached one).
    collided: bool,
}

/// Snapshot of the pool for stats and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct KvUsage {
    pub(crate) total: usize,
    /// Blocks held by at least one sequence.
    pub(crate) used: usize,
    /// Unheld blocks that still hold a reusable prefix.
    pub(crate) cached: usize,
    /// Unheld blocks without content.
    pub(crate) free: usize,
}

/// The block manager. Single-threaded: lives on the engine thread. `S` is the
/// keyed hash (tests substitute a colliding one).
#[derive(Debug)]
pub(crate) struct BlockManager<S = RandomState> {
    block_size: usize,
    blocks: Vec<Block>,
    /// Free blocks without a hash; popped from the end (cheapest to reuse).
    free: Vec<u32>,
    /// Cached blocks with refcount 0, oldest release first (LRU eviction).
    evictable: BTreeMap<u64, u32>,
    next_stamp: u64,
    cache: HashMap<u64, Cached>,
    seqs: HashMap<SeqId, SeqTable>,
    hasher: S,
}

impl BlockManager {
    /// A pool with a fresh random hash key.
    pub(crate) fn new(num_blocks: usize, block_size: usize) -> Self {
        Self::with_hasher(num_blocks, block_size, RandomState::new())
    }
}

impl<S: BuildHasher> BlockManager<S> {
    pub(crate) fn with_hasher(num_blocks: usize, block_size: usize, hasher: S) -> Self {
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
            hasher,
        }
    }

    pub(crate) fn block_size(&self) -> usize {
        self.block_size
    }

    pub(crate) fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks obtainable now without preempting anyone (free + evictable).
    pub(crate) fn num_available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    pub(crate) fn usage(&self) -> KvUsage {
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
    pub(crate) fn live_tokens(&self, computed: impl IntoIterator<Item = (SeqId, usize)>) -> usize {
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

    pub(crate) fn block_table(&self, seq: SeqId) -> Option<&[u32]> {
        self.seqs.get(&seq).map(|t| t.blocks.as_slice())
    }

    fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    fn root_hash(&self, domain: CacheDomain) -> u64 {
        self.hasher.hash_one(domain)
    }

    /// Chained block hash over the parent hash and the block's tokens.
    fn block_hash(&self, parent: u64, tokens: &[u32]) -> u64 {
        self.hasher.hash_one((parent, tokens))
    }

    /// The cached block holding exactly `tokens` after `parent`, if any.
    fn lookup(&self, hash: u64, parent: u64, tokens: &[u32]) -> Option<u32> {
        self.cache
            .get(&hash)
            .filter(|c| c.parent == parent && *c.tokens == *tokens)
            .map(|c| c.block)
    }

    /// Cached blocks matching the longest prefix of `tokens`, leaving at
    /// least one token to compute. Returns (blocks, their chained hashes).
    fn find_prefix(&self, root: u64, tokens: &[u32]) -> (Vec<u32>, Vec<u64>) {
        let max_blocks = tokens.len().saturating_sub(1) / self.block_size;
        let mut blocks = Vec::new();
        let mut hashes = Vec::new();
        let mut parent = root;
        for chunk in tokens.chunks_exact(self.block_size).take(max_blocks) {
            let h = self.block_hash(parent, chunk);
            let Some(b) = self.lookup(h, parent, chunk) else { break };
            blocks.push(b);
            hashes.push(h);
            parent = h;
        }
        (blocks, hashes)
    }

    /// Admits a sequence whose known tokens are `tokens`: reuses the cached
    /// prefix of its domain and allocates slots for the first `num_new`
    /// tokens after it (capped at the tokens left). All or nothing: on
    /// `OutOfBlocks` nothing changed. Returns the number of tokens served
    /// from the cache.
    pub(crate) fn admit(
        &mut self,
        seq: SeqId,
        domain: CacheDomain,
        tokens: &[u32],
        num_new: usize,
    ) -> Result<usize, OutOfBlocks> {
        assert!(!self.seqs.contains_key(&seq), "sequence {seq} admitted twice");
        let root = self.root_hash(domain);
        let (hit_blocks, hashes) = self.find_prefix(root, tokens);
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
            root,
            hashes,
            collided: false,
        };
        for _ in 0..needed {
            let b = self.pop_free().expect("availability checked above");
            table.blocks.push(b);
        }
        self.seqs.insert(seq, table);
        Ok(cached)
    }

    /// Ensures `seq` has slots for positions `0..num_computed + num_new`.
    /// All or nothing.
    pub(crate) fn allocate_slots(
        &mut self,
        seq: SeqId,
        num_computed: usize,
        num_new: usize,
    ) -> Result<(), OutOfBlocks> {
        let want = self.blocks_for(num_computed + num_new);
        let table = self.seqs.get(&seq).expect("allocate_slots on an unknown sequence");
        debug_assert!(
            table.blocks[(num_computed / self.block_size).min(table.blocks.len())..]
                .iter()
                .all(|&b| self.blocks[b as usize].ref_count == 1),
            "sequence {seq} would write into a shared block"
        );
        let extra = want.saturating_sub(table.blocks.len());
        if extra > self.num_available() {
            return Err(OutOfBlocks);
        }
        for _ in 0..extra {
            let b = self.pop_free().expect("availability checked above");
            self.seqs.get_mut(&seq).expect("checked above").blocks.push(b);
        }
        Ok(())
    }

    /// How many more tokens `seq` could get slots for right now.
    pub(crate) fn slot_capacity(&self, seq: SeqId, num_computed: usize) -> usize {
        let have = self.seqs.get(&seq).map_or(0, |t| t.blocks.len());
        (have + self.num_available()) * self.block_size - num_computed
    }

    /// Registers the sequence's full blocks among its first `num_computed`
    /// tokens (whose KV is now written) in the prefix cache.
    pub(crate) fn cache_computed(&mut self, seq: SeqId, tokens: &[u32], num_computed: usize) {
        let bs = self.block_size;
        let Some(table) = self.seqs.get(&seq) else { return };
        let full = (num_computed / bs).min(table.blocks.len());
        for i in table.hashes.len()..full {
            let table = &self.seqs[&seq];
            let parent = table.hashes.last().copied().unwrap_or(table.root);
            let chunk = &tokens[i * bs..(i + 1) * bs];
            let h = self.block_hash(parent, chunk);
            let b = table.blocks[i];
            let mut collided = table.collided;
            match self.cache.get(&h) {
                // Same content computed concurrently by another sequence: keep
                // the first, don't alias.
                Some(c) if c.parent == parent && *c.tokens == *chunk => {}
                Some(_) => collided = true,
                None if !collided && self.blocks[b as usize].hash.is_none() => {
                    let cached = Cached {
                        block: b,
                        parent,
                        tokens: chunk.into(),
                    };
                    self.cache.insert(h, cached);
                    self.blocks[b as usize].hash = Some(h);
                }
                None => {}
            }
            let table = self.seqs.get_mut(&seq).expect("checked above");
            table.hashes.push(h);
            table.collided = collided;
        }
    }

    /// Releases all of the sequence's blocks (finished, cancelled or
    /// preempted). Cached blocks become evictable, last block first, so a
    /// sequence's tail is evicted before its (more shareable) head.
    pub(crate) fn free(&mut self, seq: SeqId) {
        let Some(table) = self.seqs.remove(&seq) else { return };
        for &b in table.blocks.iter().rev() {
            let block = &mut self.blocks[b as usize];
            debug_assert!(block.ref_count > 0, "block {b} of sequence {seq} released twice");
            let Some(rc) = block.ref_count.checked_sub(1) else {
                // Leave it where it is rather than wrap around to a huge count.
                tracing::error!(block = b, seq, "KV block released more often than acquired");
                continue;
            };
            block.ref_count = rc;
            if rc == 0 {
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
impl<S> BlockManager<S> {
    fn ref_count(&self, block: u32) -> u32 {
        self.blocks[block as usize].ref_count
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::hash::{BuildHasherDefault, Hasher};

    const SHARED: CacheDomain = CacheDomain { salt: 0, adapter: None };

    fn toks(range: std::ops::Range<u32>) -> Vec<u32> {
        range.collect()
    }

    #[test]
    fn allocates_lowest_ids_first_and_frees_everything() {
        let mut m = BlockManager::new(8, 4);
        assert_eq!(m.admit(1, SHARED, &toks(0..10), 10), Ok(0));
        assert_eq!(m.block_table(1).unwrap(), &[0, 1, 2]);
        assert_eq!(m.allocate_slots(1, 10, 3), Ok(()));
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
        m.admit(1, SHARED, &prompt, 10).unwrap();
        m.cache_computed(1, &prompt, 10);
        let mut other = toks(0..8);
        other.extend([99, 98, 97]);
        let admitted = m.admit(2, SHARED, &other, 11);
        (m, admitted)
    }

    #[test]
    fn prefix_hit_reuses_full_blocks() {
        let (mut m, admitted) = shared_prefix_pair();
        // Shares blocks 0 and 1 (8 tokens); the partial third block is private.
        assert_eq!(admitted, Ok(8));
        assert_eq!(m.block_table(2).unwrap(), &[0, 1, 3]);
        assert_eq!(
            (m.ref_count(0), m.ref_count(1), m.ref_count(2), m.ref_count(3)),
            (2, 2, 1, 1)
        );
        // Diverging in the first block: no hit at all.
        assert_eq!(m.admit(3, SHARED, &[5, 1, 2, 3, 4, 5], 6), Ok(0));
        assert_eq!(m.block_table(3).unwrap(), &[4, 5]);
    }

    #[test]
    fn domains_never_share_blocks() {
        let mut m = BlockManager::new(16, 4);
        let prompt = toks(0..10);
        let tenant = |salt| CacheDomain { salt, adapter: None };
        m.admit(1, tenant(7), &prompt, 10).unwrap();
        m.cache_computed(1, &prompt, 10);
        assert_eq!(m.admit(2, tenant(7), &prompt, 10), Ok(8), "same salt");
        assert_eq!(m.admit(3, tenant(8), &prompt, 10), Ok(0), "other salt");
        assert_eq!(
            m.admit(4, SHARED, &prompt, 10),
            Ok(0),
            "the shared domain is a domain too"
        );
        let adapter = CacheDomain {
            salt: 7,
            adapter: Some(1),
        };
        assert_eq!(m.admit(5, adapter, &prompt, 10), Ok(0), "same salt, other adapter");
        // Each domain fills its own cache.
        m.cache_computed(5, &prompt, 10);
        assert_eq!(m.admit(6, adapter, &prompt, 10), Ok(8));
    }

    /// Every hash is 0: each lookup and registration after the first collides.
    #[derive(Default)]
    struct Collide;

    impl Hasher for Collide {
        fn finish(&self) -> u64 {
            0
        }
        fn write(&mut self, _: &[u8]) {}
    }

    #[test]
    fn a_colliding_hash_is_a_miss_and_stops_registration() {
        let mut m = BlockManager::with_hasher(16, 4, BuildHasherDefault::<Collide>::default());
        let a = toks(0..10);
        m.admit(1, SHARED, &a, 10).unwrap();
        m.cache_computed(1, &a, 10);
        // Only a's first block is registered: its second collides with it.
        assert_eq!(m.cache.len(), 1);
        // Different tokens under the same hash: a miss, not a's KV.
        let b = toks(100..110);
        assert_eq!(m.admit(2, SHARED, &b, 10), Ok(0));
        // The same tokens: the first block is verified and reused; the second
        // block's hash finds the first block's entry, whose tokens differ.
        assert_eq!(m.admit(3, SHARED, &a, 10), Ok(4));
        // b collides from its first block on: none of its blocks is registered.
        m.cache_computed(2, &b, 10);
        assert_eq!(m.cache.len(), 1);
        assert_eq!(m.admit(4, SHARED, &b, 10), Ok(0));
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
        m.admit(1, SHARED, &prompt, 8).unwrap();
        m.cache_computed(1, &prompt, 8);
        // Both blocks cached, but the last must be computed to get logits.
        assert_eq!(m.admit(2, SHARED, &prompt, 8), Ok(4));
        assert_eq!(m.block_table(2).unwrap(), &[0, 2]);
    }

    #[test]
    fn cached_blocks_survive_free_and_are_evicted_lru_only_when_needed() {
        let mut m = BlockManager::new(4, 2);
        let a = [1, 2, 3, 4, 5];
        m.admit(1, SHARED, &a, 5).unwrap(); // blocks 0,1,2
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
        m.admit(2, SHARED, &[9, 9, 9], 3).unwrap();
        assert_eq!(m.block_table(2).unwrap(), &[2, 3]);
        assert_eq!(m.usage().cached, 2);
        // Next allocation evicts the least recently released: block 1 (the tail).
        m.allocate_slots(2, 3, 2).unwrap();
        assert_eq!(m.block_table(2).unwrap(), &[2, 3, 1]);
        assert_eq!(m.usage().cached, 1);
        // Block 0 (prefix [1,2]) is still a hit; [3,4] was evicted.
        m.free(2);
        assert_eq!(m.admit(3, SHARED, &a, 5), Ok(2));
        assert_eq!(m.block_table(3).unwrap()[0], 0);
    }

    #[test]
    fn revived_cached_block_is_not_counted_as_available_twice() {
        let mut m = BlockManager::new(2, 2);
        let a = [1, 2, 3];
        m.admit(1, SHARED, &a, 3).unwrap();
        m.cache_computed(1, &a, 3);
        m.free(1);
        // Hit on block 0 plus one new block: fits exactly.
        assert_eq!(m.admit(2, SHARED, &a, 3), Ok(2));
        assert_eq!(m.num_available(), 0);
        assert_eq!(m.admit(3, SHARED, &[7], 1), Err(OutOfBlocks));
        assert!(m.block_table(3).is_none());
        assert_eq!(m.allocate_slots(2, 3, 2), Err(OutOfBlocks));
        assert_eq!(m.block_table(2).unwrap(), &[0, 1]);
    }

    #[test]
    fn a_double_free_is_logged_not_wrapped() {
        let mut m = BlockManager::new(4, 2);
        m.admit(1, SHARED, &[1, 2, 3], 3).unwrap();
        m.free(1);
        // Freeing an unknown (already freed) sequence changes nothing.
        m.free(1);
        assert_eq!(m.usage().free, 4);
        assert!((0..4).all(|b| m.ref_count(b) == 0));
    }

    /// Random operations against a content model of every physical block.
    #[derive(Debug, Clone)]
    enum Op {
        Admit { prompt: Vec<u32>, chunk: usize, salt: u64 },
        Step { pick: usize, n: usize },
        Free { pick: usize },
    }

    fn op() -> impl Strategy<Value = Op> {
        // Small alphabet and shared leading tokens make prefix hits common.
        let prompt = (0u32..3, prop::collection::vec(0u32..3, 1..14)).prop_map(|(head, mut rest)| {
            rest.insert(0, head);
            rest
        });
        prop_oneof![
            3 => (prompt, 1usize..16, 0u64..2).prop_map(|(prompt, chunk, salt)| Op::Admit { prompt, chunk, salt }),
            4 => (any::<usize>(), 1usize..6).prop_map(|(pick, n)| Op::Step { pick, n }),
            2 => any::<usize>().prop_map(|pick| Op::Free { pick }),
        ]
    }

    struct Live {
        id: SeqId,
        salt: u64,
        tokens: Vec<u32>,
        computed: usize,
    }

    /// What position `p` of a sequence holds: like real KV, it depends on the
    /// whole prefix and the domain, so a block reused under another prefix or
    /// in another domain is caught.
    type Slot = Option<(u64, Vec<u32>)>;

    fn kv(s: &Live, p: usize) -> Slot {
        Some((s.salt, s.tokens[..=p].to_vec()))
    }

    /// Writes tokens `from..to` of `s` into the modelled pool.
    fn write(store: &mut [Vec<Slot>], m: &BlockManager, s: &Live, from: usize, to: usize) {
        let table = m.block_table(s.id).unwrap();
        for p in from..to {
            store[table[p / m.block_size()] as usize][p % m.block_size()] = kv(s, p);
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
                    Op::Admit { prompt, chunk, salt } => {
                        next_id += 1;
                        let domain = CacheDomain { salt, adapter: None };
                        if let Ok(cached) = m.admit(next_id, domain, &prompt, chunk) {
                            prop_assert!(cached < prompt.len());
                            let s = Live { id: next_id, salt, tokens: prompt, computed: cached };
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
                        if m.allocate_slots(s.id, s.computed, n).is_ok() {
                            let s = &live[i];
                            write(&mut store, &m, s, s.computed, s.computed + n);
                            let s = &mut live[i];
                            s.computed += n;
                            m.cache_computed(s.id, &s.tokens, s.computed);
                        }
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
                        prop_assert_eq!(&store[table[p / bs] as usize][p % bs], &kv(s, p), "seq {} pos {}", s.id, p);
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

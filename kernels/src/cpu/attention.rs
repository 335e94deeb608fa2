//! Paged attention on the CPU: the kernels the CPU backend runs and the reference for the CUDA ones.
//!
//! KV layout (the engine contract): per layer, a key cache and a value cache, each
//! `[num_blocks, block_size, num_kv_heads, head_dim]` contiguous f32. The token at position `p` of a
//! sequence lives in block `block_table[p / block_size]` at offset `p % block_size`; its *slot* is
//! `block_id * block_size + offset`.
//!
//! - [`reshape_and_cache`] writes freshly computed K/V rows into their slots.
//! - [`paged_attention_prefill`] is varlen causal attention: the queries of sequence `s` (a chunk of
//!   `q_len` tokens ending at position `context_len - 1`) attend to every cached position up to and
//!   including their own. [`paged_attention_decode`] is the `q_len == 1` case.
//! - [`copy_blocks`] applies copy-on-write block copies.
//!
//! Invariants: the kernels read only slots of positions `< context_len` through the block table (tests
//! fill every other slot with NaN to prove it), validate every shape and block id up front and return
//! [`ShapeError`](crate::ShapeError) instead of panicking. Softmax is online per KV block (one rescale per block),
//! inner loops run over contiguous `head_dim` rows, and (query token, KV head) work items run on
//! `threads` threads of the kernels' worker pool (the one `qmatmul` uses, so the two never fight over
//! cores) when the work is large enough to pay for it. The query heads sharing one KV head (GQA) are
//! processed together so each K/V row is loaded once per group, unless there are too few items to
//! occupy every thread (single-stream decode), when each query head is an item of its own.
//!
//! Tested against a naive dense softmax(QKᵀ)V over gathered keys, with shuffled block tables, GQA,
//! partial last blocks and NaN-poisoned unused slots.

use super::activation::exp_fast;
use super::pool::{self, OutPtr};
use crate::error::{check_len, invalid, ShapeError};

/// Read-only view of one layer's paged K/V caches.
#[derive(Debug, Clone, Copy)]
pub struct PagedKv<'a> {
    pub key_cache: &'a [f32],
    pub value_cache: &'a [f32],
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    /// Sliding-window attention (Mistral): a query sees only the last `window` positions, its own
    /// included. `None`: every earlier position.
    pub window: Option<usize>,
}

impl PagedKv<'_> {
    fn num_blocks(&self) -> Result<usize, ShapeError> {
        if self.window == Some(0) {
            return Err(invalid("window", "a sliding window must be > 0 positions"));
        }
        let block_elems = self.block_size * self.num_kv_heads * self.head_dim;
        if block_elems == 0 {
            return Err(invalid("kv", "block_size, num_kv_heads and head_dim must be > 0"));
        }
        if self.key_cache.len() != self.value_cache.len() || !self.key_cache.len().is_multiple_of(block_elems) {
            return Err(invalid(
                "value_cache",
                format!(
                    "key ({}) and value ({}) caches must be equal multiples of block_size*num_kv_heads*head_dim ({block_elems})",
                    self.key_cache.len(),
                    self.value_cache.len()
                ),
            ));
        }
        Ok(self.key_cache.len() / block_elems)
    }
}

/// Below this many multiply-adds a call runs on the calling thread: waking a worker would cost more.
const PARALLEL_MIN_WORK: usize = 1 << 14;
/// Tasks per thread: enough for dynamic claiming to even out causal prefill's growing key counts.
const TASKS_PER_THREAD: usize = 8;

/// Writes `key`/`value` rows (`[num_tokens, num_kv_heads * head_dim]`) into the caches at
/// `slot_mapping[t]`; a negative slot skips the token (padding).
pub fn reshape_and_cache(
    key: &[f32],
    value: &[f32],
    key_cache: &mut [f32],
    value_cache: &mut [f32],
    slot_mapping: &[i64],
    row_len: usize,
) -> Result<(), ShapeError> {
    if row_len == 0 {
        return Err(invalid("row_len", "must be > 0"));
    }
    check_len("key", slot_mapping.len() * row_len, key.len())?;
    check_len("value", key.len(), value.len())?;
    check_len("value_cache", key_cache.len(), value_cache.len())?;
    let num_slots = key_cache.len() / row_len;
    for (t, &slot) in slot_mapping.iter().enumerate() {
        if slot < 0 {
            continue;
        }
        let slot = slot as usize;
        if slot >= num_slots {
            return Err(invalid(
                "slot_mapping",
                format!("slot {slot} of token {t} >= {num_slots} slots"),
            ));
        }
        let (dst, src) = (slot * row_len..(slot + 1) * row_len, t * row_len..(t + 1) * row_len);
        key_cache[dst.clone()].copy_from_slice(&key[src.clone()]);
        value_cache[dst].copy_from_slice(&value[src]);
    }
    Ok(())
}

/// Copies whole blocks `src → dst` in both caches (copy-on-write before a step).
pub fn copy_blocks(
    key_cache: &mut [f32],
    value_cache: &mut [f32],
    block_elems: usize,
    copies: &[(u32, u32)],
) -> Result<(), ShapeError> {
    check_len("value_cache", key_cache.len(), value_cache.len())?;
    if block_elems == 0 || !key_cache.len().is_multiple_of(block_elems) {
        return Err(invalid(
            "block_elems",
            format!("{block_elems} does not divide the cache"),
        ));
    }
    let num_blocks = key_cache.len() / block_elems;
    for &(src, dst) in copies {
        let (src, dst) = (src as usize, dst as usize);
        if src >= num_blocks || dst >= num_blocks {
            return Err(invalid(
                "block_copies",
                format!("({src}, {dst}) out of {num_blocks} blocks"),
            ));
        }
        for cache in [&mut *key_cache, &mut *value_cache] {
            cache.copy_within(src * block_elems..(src + 1) * block_elems, dst * block_elems);
        }
    }
    Ok(())
}

/// Decode attention: one query token per sequence (`q`, `out`: `[num_seqs, num_heads, head_dim]`),
/// attending to the `context_lens[s]` cached positions of sequence `s` (its own included).
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_decode<B: AsRef<[u32]> + Sync>(
    out: &mut [f32],
    q: &[f32],
    num_heads: usize,
    kv: &PagedKv<'_>,
    scale: f32,
    block_tables: &[B],
    context_lens: &[usize],
    threads: usize,
) -> Result<(), ShapeError> {
    let cu: Vec<usize> = (0..=context_lens.len()).collect();
    paged_attention_prefill(out, q, num_heads, kv, scale, block_tables, context_lens, &cu, threads)
}

/// Varlen causal prefill attention. The queries of sequence `s` are rows
/// `cu_seqlens_q[s]..cu_seqlens_q[s + 1]` of `q`/`out` (`[total_tokens, num_heads, head_dim]`); they
/// sit at the last `q_len` positions of its `context_lens[s]` cached tokens, and query `i` attends to
/// positions `0..=context_lens[s] - q_len + i` (the last `kv.window` of them with a sliding window).
/// Their K/V must already be in the cache.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_prefill<B: AsRef<[u32]> + Sync>(
    out: &mut [f32],
    q: &[f32],
    num_heads: usize,
    kv: &PagedKv<'_>,
    scale: f32,
    block_tables: &[B],
    context_lens: &[usize],
    cu_seqlens_q: &[usize],
    threads: usize,
) -> Result<(), ShapeError> {
    if threads == 0 {
        return Err(invalid("threads", "must be > 0"));
    }
    let num_blocks = kv.num_blocks()?;
    let (hd, nkv, bs) = (kv.head_dim, kv.num_kv_heads, kv.block_size);
    if num_heads == 0 || !num_heads.is_multiple_of(nkv) {
        return Err(invalid(
            "num_heads",
            format!("{num_heads} is not a positive multiple of {nkv} KV heads"),
        ));
    }
    let num_seqs = context_lens.len();
    check_len("block_tables", num_seqs, block_tables.len())?;
    check_len("cu_seqlens_q", num_seqs + 1, cu_seqlens_q.len())?;
    if cu_seqlens_q[0] != 0 {
        return Err(invalid("cu_seqlens_q", "must start at 0"));
    }
    // Per query token: (sequence, number of keys it sees).
    let mut token_keys: Vec<(usize, usize)> = Vec::with_capacity(*cu_seqlens_q.last().unwrap_or(&0));
    let mut work = 0usize;
    for s in 0..num_seqs {
        let (lo, hi, ctx) = (cu_seqlens_q[s], cu_seqlens_q[s + 1], context_lens[s]);
        if hi < lo || hi - lo > ctx {
            return Err(invalid(
                "cu_seqlens_q",
                format!("sequence {s}: {} queries for a context of {ctx}", hi.wrapping_sub(lo)),
            ));
        }
        let table = block_tables[s].as_ref();
        let needed = ctx.div_ceil(bs);
        if table.len() < needed {
            return Err(invalid(
                "block_tables",
                format!(
                    "sequence {s}: {} blocks for {ctx} tokens of block size {bs}",
                    table.len()
                ),
            ));
        }
        if let Some(&b) = table[..needed].iter().find(|&&b| b as usize >= num_blocks) {
            return Err(invalid(
                "block_tables",
                format!("sequence {s}: block {b} >= {num_blocks} blocks"),
            ));
        }
        let q_len = hi - lo;
        for i in 0..q_len {
            let n_keys = ctx - q_len + i + 1;
            token_keys.push((s, n_keys));
            work += n_keys;
        }
    }
    let num_tokens = token_keys.len();
    check_len("q", num_tokens * num_heads * hd, q.len())?;
    check_len("out", q.len(), out.len())?;
    let group = num_heads / nkv;
    // Work item = one query token × `heads` query heads sharing one KV head. Whole GQA groups load each
    // K/V row once for all their heads; with too few items to keep every thread busy (single-stream
    // decode: one token × a few KV heads) each query head becomes its own item instead.
    let heads = if num_tokens * nkv >= 2 * threads { group } else { 1 };
    let per_token = num_heads / heads;
    let item = |idx: usize, out: &mut [f32]| {
        let (t, first) = (idx / per_token, (idx % per_token) * heads);
        let (s, n_keys) = token_keys[t];
        let q_rows = &q[(t * num_heads + first) * hd..(t * num_heads + first + heads) * hd];
        let first_key = kv.window.map_or(0, |w| n_keys.saturating_sub(w));
        let table = block_tables[s].as_ref();
        attend(out, q_rows, heads, kv, first / group, table, first_key..n_keys, scale);
    };
    let chunk = heads * hd;
    let items = num_tokens * per_token;
    let n_tasks = if work * num_heads * hd < PARALLEL_MIN_WORK {
        1
    } else {
        items.min(threads * TASKS_PER_THREAD)
    };
    let out_ptr = OutPtr::new(out);
    let task = |i: usize| {
        for idx in i * items / n_tasks..(i + 1) * items / n_tasks {
            // SAFETY: item `idx` owns `out[idx * chunk..(idx + 1) * chunk]` (in bounds: `out.len()` was
            // checked to be `items * chunk`), tasks cover disjoint item ranges, and `pool::run` returns
            // only after every task has finished.
            let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.at(idx * chunk), chunk) };
            item(idx, o);
        }
    };
    pool::run(threads, n_tasks, &task);
    Ok(())
}

/// One query token × one KV head: the `group` query heads sharing that KV head attend to positions
/// `keys` of `table`. Online softmax, rescaled once per block.
#[allow(clippy::too_many_arguments)]
fn attend(
    out: &mut [f32],
    q_rows: &[f32],
    group: usize,
    kv: &PagedKv<'_>,
    kv_head: usize,
    table: &[u32],
    keys: std::ops::Range<usize>,
    scale: f32,
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { attend_avx2(out, q_rows, group, kv, kv_head, table, keys, scale) };
    }
    attend_body(out, q_rows, group, kv, kv_head, table, keys, scale)
}

/// [`attend_body`] compiled for AVX2: the 8-lane `dot`/`axpy` loops become single 256-bit operations
/// (the crate's baseline target only has SSE2). Same operations in the same order: same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_avx2(
    out: &mut [f32],
    q_rows: &[f32],
    group: usize,
    kv: &PagedKv<'_>,
    kv_head: usize,
    table: &[u32],
    keys: std::ops::Range<usize>,
    scale: f32,
) {
    attend_body(out, q_rows, group, kv, kv_head, table, keys, scale)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_body(
    out: &mut [f32],
    q_rows: &[f32],
    group: usize,
    kv: &PagedKv<'_>,
    kv_head: usize,
    table: &[u32],
    keys: std::ops::Range<usize>,
    scale: f32,
) {
    let (hd, nkv, bs) = (kv.head_dim, kv.num_kv_heads, kv.block_size);
    out.fill(0.0);
    let mut max = vec![f32::NEG_INFINITY; group];
    let mut denom = vec![0f32; group];
    let mut scores = vec![0f32; group * bs];
    let blocks = table.iter().enumerate().take(keys.end.div_ceil(bs));
    for (b, &block) in blocks.skip(keys.start / bs) {
        // Offsets of this block inside `keys`.
        let (lo, hi) = (keys.start.saturating_sub(b * bs), bs.min(keys.end - b * bs));
        let row = |off: usize| ((block as usize * bs + off) * nkv + kv_head) * hd;
        for off in lo..hi {
            let k = &kv.key_cache[row(off)..row(off) + hd];
            for h in 0..group {
                scores[h * bs + off] = dot(&q_rows[h * hd..(h + 1) * hd], k) * scale;
            }
        }
        for h in 0..group {
            let sc = &mut scores[h * bs + lo..h * bs + hi];
            let block_max = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let new_max = max[h].max(block_max);
            // exp(-inf) = 0 on the first block: nothing accumulated yet to rescale.
            let correction = (max[h] - new_max).exp();
            if correction != 1.0 {
                out[h * hd..(h + 1) * hd].iter_mut().for_each(|x| *x *= correction);
            }
            denom[h] *= correction;
            // Two passes: the exponentials vectorize, the running sum keeps its order.
            sc.iter_mut().for_each(|p| *p = exp_fast(*p - new_max));
            denom[h] += sc.iter().sum::<f32>();
            max[h] = new_max;
        }
        for off in lo..hi {
            let v = &kv.value_cache[row(off)..row(off) + hd];
            for h in 0..group {
                axpy(&mut out[h * hd..(h + 1) * hd], scores[h * bs + off], v);
            }
        }
    }
    for h in 0..group {
        let inv = 1.0 / denom[h];
        out[h * hd..(h + 1) * hd].iter_mut().for_each(|x| *x *= inv);
    }
}

/// Dot product with 8 independent accumulators so the compiler vectorizes it (no fast-math in Rust).
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    let mut acc = [0f32; 8];
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    y.iter_mut().zip(x).for_each(|(y, x)| *y += a * x);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};

    struct Case {
        num_heads: usize,
        nkv: usize,
        hd: usize,
        bs: usize,
        num_blocks: usize,
        window: Option<usize>,
    }

    /// Naive reference: gather the sequence's keys/values by position, dense softmax(q·k)·v.
    fn reference(
        q: &[f32],
        c: &Case,
        k_cache: &[f32],
        v_cache: &[f32],
        table: &[u32],
        pos: usize,
        head: usize,
    ) -> Vec<f32> {
        let g = head / (c.num_heads / c.nkv);
        let at = |p: usize| ((table[p / c.bs] as usize * c.bs + p % c.bs) * c.nkv + g) * c.hd;
        let first = c.window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let scores: Vec<f64> = (first..=pos)
            .map(|p| (0..c.hd).map(|d| q[d] as f64 * k_cache[at(p) + d] as f64).sum::<f64>() * 0.125)
            .collect();
        let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
        let z: f64 = e.iter().sum();
        (0..c.hd)
            .map(|d| {
                (first..=pos)
                    .map(|p| e[p - first] * v_cache[at(p) + d] as f64)
                    .sum::<f64>()
                    / z
            })
            .map(|x| x as f32)
            .collect()
    }

    fn run_case(c: &Case, seqs: &[(usize, usize)], seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let row = c.nkv * c.hd;
        let cache_len = c.num_blocks * c.bs * row;
        // Unused slots stay NaN: any read outside the sequences' positions poisons the output.
        let mut k_cache = vec![f32::NAN; cache_len];
        let mut v_cache = vec![f32::NAN; cache_len];
        let mut free: Vec<u32> = (0..c.num_blocks as u32).collect();
        free.shuffle(&mut rng);
        let mut tables = Vec::new();
        let mut cu = vec![0usize];
        let mut ctx_lens = Vec::new();
        for &(ctx, q_len) in seqs {
            let table: Vec<u32> = (0..ctx.div_ceil(c.bs)).map(|_| free.pop().unwrap()).collect();
            let slots: Vec<i64> = (0..ctx)
                .map(|p| (table[p / c.bs] as usize * c.bs + p % c.bs) as i64)
                .collect();
            let k: Vec<f32> = (0..ctx * row).map(|_| rng.random_range(-1.0..1.0)).collect();
            let v: Vec<f32> = (0..ctx * row).map(|_| rng.random_range(-1.0..1.0)).collect();
            reshape_and_cache(&k, &v, &mut k_cache, &mut v_cache, &slots, row).unwrap();
            tables.push(table);
            cu.push(cu.last().unwrap() + q_len);
            ctx_lens.push(ctx);
        }
        let total = *cu.last().unwrap();
        let q: Vec<f32> = (0..total * c.num_heads * c.hd)
            .map(|_| rng.random_range(-2.0..2.0))
            .collect();
        let mut out = vec![0f32; q.len()];
        let kv = PagedKv {
            key_cache: &k_cache,
            value_cache: &v_cache,
            num_kv_heads: c.nkv,
            head_dim: c.hd,
            block_size: c.bs,
            window: c.window,
        };
        paged_attention_prefill(&mut out, &q, c.num_heads, &kv, 0.125, &tables, &ctx_lens, &cu, 1).unwrap();
        // Any thread count (which also changes how heads are split into work items) gives the same bits.
        for threads in [2, 3] {
            let mut par = vec![f32::NAN; q.len()];
            paged_attention_prefill(&mut par, &q, c.num_heads, &kv, 0.125, &tables, &ctx_lens, &cu, threads).unwrap();
            assert_eq!(out, par, "{threads} threads");
        }
        for (s, &(ctx, q_len)) in seqs.iter().enumerate() {
            for i in 0..q_len {
                let t = cu[s] + i;
                for h in 0..c.num_heads {
                    let off = (t * c.num_heads + h) * c.hd;
                    let want = reference(
                        &q[off..off + c.hd],
                        c,
                        &k_cache,
                        &v_cache,
                        &tables[s],
                        ctx - q_len + i,
                        h,
                    );
                    for d in 0..c.hd {
                        let (a, b) = (out[off + d], want[d]);
                        assert!(
                            (a - b).abs() <= 1e-5 + 1e-4 * b.abs(),
                            "seq {s} tok {i} head {h} dim {d}: {a} vs {b}"
                        );
                    }
                }
            }
        }
        if seqs.iter().all(|&(_, q_len)| q_len == 1) {
            let mut out2 = vec![0f32; q.len()];
            paged_attention_decode(&mut out2, &q, c.num_heads, &kv, 0.125, &tables, &ctx_lens, 2).unwrap();
            assert_eq!(out, out2);
        }
    }

    #[test]
    fn prefill_matches_dense_reference_gqa_shuffled_blocks() {
        let c = Case {
            num_heads: 6,
            nkv: 2,
            hd: 16,
            bs: 4,
            num_blocks: 64,
            window: None,
        };
        // (context length, query tokens): full prefill, a chunk, a decode, partial last blocks.
        run_case(&c, &[(9, 9), (17, 5), (3, 1), (16, 16), (1, 1)], 1);
    }

    #[test]
    fn decode_matches_reference_and_runs_parallel() {
        // Large enough to take the parallel path.
        let c = Case {
            num_heads: 8,
            nkv: 8,
            hd: 64,
            bs: 16,
            num_blocks: 256,
            window: None,
        };
        run_case(&c, &[(300, 1), (45, 1), (129, 1), (16, 1), (700, 1)], 2);
    }

    #[test]
    fn sliding_window_sees_only_the_last_window_positions() {
        for window in [1, 5, 8, 100] {
            let c = Case {
                num_heads: 4,
                nkv: 2,
                hd: 16,
                bs: 4,
                num_blocks: 64,
                window: Some(window),
            };
            // Windows starting mid-block, on a block boundary, and wider than the context.
            run_case(&c, &[(23, 23), (17, 3), (9, 1), (40, 1)], 4);
        }
    }

    #[test]
    fn simd_and_portable_attend_give_the_same_bits() {
        let mut rng = StdRng::seed_from_u64(5);
        let (nkv, hd, bs, blocks, group) = (2usize, 64usize, 16usize, 8usize, 3usize);
        let len = blocks * bs * nkv * hd;
        let k: Vec<f32> = (0..len).map(|_| rng.random_range(-1.0..1.0)).collect();
        let v: Vec<f32> = (0..len).map(|_| rng.random_range(-1.0..1.0)).collect();
        let q: Vec<f32> = (0..group * hd).map(|_| rng.random_range(-2.0..2.0)).collect();
        let kv = PagedKv {
            key_cache: &k,
            value_cache: &v,
            num_kv_heads: nkv,
            head_dim: hd,
            block_size: bs,
            window: None,
        };
        let table = [3u32, 0, 7, 5, 1, 2, 6, 4];
        for keys in [0..100, 17..128, 40..41] {
            let (mut a, mut b) = (vec![0f32; group * hd], vec![0f32; group * hd]);
            attend(&mut a, &q, group, &kv, 1, &table, keys.clone(), 0.125);
            attend_body(&mut b, &q, group, &kv, 1, &table, keys.clone(), 0.125);
            assert_eq!(a, b, "keys {keys:?}");
        }
    }

    #[test]
    fn mha_head_dim_not_multiple_of_8() {
        let c = Case {
            num_heads: 3,
            nkv: 3,
            hd: 12,
            bs: 8,
            num_blocks: 32,
            window: None,
        };
        run_case(&c, &[(40, 13), (8, 8), (9, 2)], 3);
    }

    #[test]
    fn bad_inputs_are_errors_not_panics() {
        let (k, v) = (vec![0f32; 4 * 2 * 8], vec![0f32; 4 * 2 * 8]);
        let kv = PagedKv {
            key_cache: &k,
            value_cache: &v,
            num_kv_heads: 1,
            head_dim: 8,
            block_size: 2,
            window: None,
        };
        let q = vec![0f32; 8];
        let mut out = vec![0f32; 8];
        // Block id out of range.
        let e = paged_attention_decode(&mut out, &q, 1, &kv, 1.0, &[vec![9u32]], &[2], 1).unwrap_err();
        assert!(e.to_string().contains("block_tables"), "{e}");
        // Table too short for the context.
        let e = paged_attention_decode(&mut out, &q, 1, &kv, 1.0, &[vec![0u32]], &[3], 1).unwrap_err();
        assert!(e.to_string().contains("block_tables"), "{e}");
        // Wrong q length.
        let e = paged_attention_decode(&mut out, &q[..4], 1, &kv, 1.0, &[vec![0u32]], &[1], 1).unwrap_err();
        assert!(matches!(e, ShapeError::Length { what: "q", .. }), "{e}");
        // More queries than context.
        let e = paged_attention_prefill(&mut out, &q, 1, &kv, 1.0, &[vec![0u32]], &[0], &[0, 1], 1).unwrap_err();
        assert!(e.to_string().contains("cu_seqlens_q"), "{e}");
        let no_window = PagedKv { window: Some(0), ..kv };
        let e = paged_attention_decode(&mut out, &q, 1, &no_window, 1.0, &[vec![0u32]], &[1], 1).unwrap_err();
        assert!(e.to_string().contains("window"), "{e}");
        let (mut kc, mut vc) = (k.clone(), v.clone());
        let e = reshape_and_cache(&q, &q, &mut kc, &mut vc, &[8], 8).unwrap_err();
        assert!(e.to_string().contains("slot_mapping"), "{e}");
        let e = copy_blocks(&mut kc, &mut vc, 16, &[(0, 4)]).unwrap_err();
        assert!(e.to_string().contains("block_copies"), "{e}");
    }

    #[test]
    fn copy_blocks_and_negative_slots() {
        let row = 4;
        let (mut kc, mut vc) = (vec![0f32; 3 * 2 * row], vec![0f32; 3 * 2 * row]);
        let k: Vec<f32> = (0..2 * row).map(|x| x as f32).collect();
        let v: Vec<f32> = k.iter().map(|x| -x).collect();
        reshape_and_cache(&k, &v, &mut kc, &mut vc, &[1, -1], row).unwrap();
        assert_eq!(&kc[row..2 * row], &k[..row]);
        assert!(
            kc[2 * row..].iter().all(|&x| x == 0.0),
            "padding token must not be written"
        );
        copy_blocks(&mut kc, &mut vc, 2 * row, &[(0, 2)]).unwrap();
        assert_eq!(kc[..2 * row], kc[4 * row..]);
        assert_eq!(vc[..2 * row], vc[4 * row..]);
    }
}

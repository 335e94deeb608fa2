//! [`LlamaRunner`]: the CPU [`ModelRunner`] — one varlen forward per engine step over a paged KV pool.
//!
//! Owns the KV pool: per layer a key and a value cache `[num_blocks, block_size, num_kv_heads, head_dim]`
//! f32, allocated once by `allocate_kv` and never reallocated or copied whole (copy-on-write copies
//! single blocks). A step concatenates every entry's tokens into one `[total_tokens, hidden]`
//! activation (no padding), writes each layer's new K/V into the slots its block table maps
//! (`reshape_and_cache`), and runs `paged_attention_prefill` (causal, varlen) reading K/V through the
//! block tables. Only the last token of entries with `want_logits` goes through the LM head.
//!
//! Invariants checked per step (errors, not panics): the pool is allocated, every entry has tokens,
//! its block table covers `start_pos + tokens.len()` with in-range block ids, positions stay inside
//! the context length. Tested in `crate::tests` against `Llama::forward_dense` with shuffled block
//! tables, chunked prefill and decode steps, on SmolLM2 and a random tiny safetensors Llama.

use anyhow::{anyhow, bail};
use genai_kernels::cpu::attention::{copy_blocks, paged_attention_prefill, reshape_and_cache, PagedKv};

use super::llama::{Llama, LlamaConfig};
use genai_engine::runner::{ForwardBatch, ModelInfo, ModelRunner};

struct KvPool {
    /// Per layer: (key cache, value cache).
    layers: Vec<(Vec<f32>, Vec<f32>)>,
    num_blocks: usize,
    block_size: usize,
}

pub(crate) struct LlamaRunner {
    model: Llama,
    info: ModelInfo,
    kv: Option<KvPool>,
}

impl LlamaRunner {
    pub(crate) fn new(model: Llama, info: ModelInfo) -> Self {
        Self { model, info, kv: None }
    }
}

/// Elements of one layer's key (or value) cache holding `num_blocks` blocks of `block_size` tokens,
/// after the checks every runner's `allocate_kv` makes.
pub(crate) fn kv_layer_elems(cfg: &LlamaConfig, num_blocks: usize, block_size: usize) -> anyhow::Result<usize> {
    if num_blocks == 0 || block_size == 0 {
        bail!("allocate_kv: num_blocks ({num_blocks}) and block_size ({block_size}) must be > 0");
    }
    num_blocks
        .checked_mul(block_size)
        .and_then(|n| n.checked_mul(cfg.num_kv_heads * cfg.head_dim))
        .ok_or_else(|| anyhow!("allocate_kv: {num_blocks} blocks of {block_size} tokens overflow"))
}

/// Bytes of KV cache one token takes across all layers (f32 K and V).
pub(crate) fn kv_bytes_per_token(model: &Llama) -> usize {
    let c = &model.cfg;
    2 * c.num_layers * c.num_kv_heads * c.head_dim * std::mem::size_of::<f32>()
}

impl ModelRunner for LlamaRunner {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn allocate_kv(&mut self, num_blocks: usize, block_size: usize) -> anyhow::Result<()> {
        let c = &self.model.cfg;
        let per_layer = kv_layer_elems(c, num_blocks, block_size)?;
        // Drop the old pool first so a re-allocation does not briefly need twice the memory.
        self.kv = None;
        // Zeroed allocations are committed lazily by the OS, so untouched blocks cost no RAM.
        let layers = (0..c.num_layers)
            .map(|_| (vec![0f32; per_layer], vec![0f32; per_layer]))
            .collect();
        self.kv = Some(KvPool {
            layers,
            num_blocks,
            block_size,
        });
        Ok(())
    }

    fn forward(&mut self, batch: &ForwardBatch) -> anyhow::Result<Vec<Vec<f32>>> {
        let pool = self.kv.as_mut().ok_or_else(|| anyhow!("forward before allocate_kv"))?;
        let c = &self.model.cfg;
        let (bs, nkv, hd) = (pool.block_size, c.num_kv_heads, c.head_dim);
        let row = nkv * hd;
        for (src, dst) in &batch.block_copies {
            if *src as usize >= pool.num_blocks || *dst as usize >= pool.num_blocks {
                bail!("block_copies: ({src}, {dst}) out of {} blocks", pool.num_blocks);
            }
        }
        for (k, v) in &mut pool.layers {
            copy_blocks(k, v, bs * row, &batch.block_copies)?;
        }
        if batch.entries.is_empty() {
            return Ok(Vec::new());
        }

        let total: usize = batch.entries.iter().map(|e| e.tokens.len()).sum();
        let mut tokens = Vec::with_capacity(total);
        let mut positions = Vec::with_capacity(total);
        let mut slots = Vec::with_capacity(total);
        let mut cu = Vec::with_capacity(batch.entries.len() + 1);
        let mut ctx_lens = Vec::with_capacity(batch.entries.len());
        cu.push(0usize);
        for (i, e) in batch.entries.iter().enumerate() {
            if e.tokens.is_empty() {
                bail!("entry {i} (seq {}): no tokens", e.seq_id);
            }
            let end = e.start_pos + e.tokens.len();
            if end > c.context_length {
                bail!(
                    "entry {i} (seq {}): position {end} beyond context length {}",
                    e.seq_id,
                    c.context_length
                );
            }
            if e.block_table.len() < end.div_ceil(bs) {
                bail!(
                    "entry {i} (seq {}): block_table has {} blocks for {end} tokens of block size {bs}",
                    e.seq_id,
                    e.block_table.len()
                );
            }
            if let Some(b) = e.block_table.iter().find(|&&b| b as usize >= pool.num_blocks) {
                bail!("entry {i} (seq {}): block {b} >= {} blocks", e.seq_id, pool.num_blocks);
            }
            for p in e.start_pos..end {
                positions.push(p);
                slots.push((e.block_table[p / bs] as usize * bs + p % bs) as i64);
            }
            tokens.extend_from_slice(&e.tokens);
            cu.push(tokens.len());
            ctx_lens.push(end);
        }
        let tables: Vec<&[u32]> = batch.entries.iter().map(|e| e.block_table.as_slice()).collect();
        let nh = c.num_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let threads = super::linear::threads();
        let layers = &mut pool.layers;
        let mut attention = |layer: usize, q: &[f32], k: &[f32], v: &[f32], out: &mut [f32]| -> anyhow::Result<()> {
            let (kc, vc) = &mut layers[layer];
            reshape_and_cache(k, v, kc, vc, &slots, row)?;
            let kv = PagedKv {
                key_cache: kc,
                value_cache: vc,
                num_kv_heads: nkv,
                head_dim: hd,
                block_size: bs,
                window: c.sliding_window,
            };
            paged_attention_prefill(out, q, nh, &kv, scale, &tables, &ctx_lens, &cu, threads)?;
            Ok(())
        };
        let hidden = self.model.forward_hidden(&tokens, &positions, &mut attention)?;
        let hs = c.hidden_size;
        let mut rows = Vec::new();
        for (i, e) in batch.entries.iter().enumerate() {
            if e.want_logits {
                let last = cu[i + 1] - 1;
                rows.extend_from_slice(&hidden[last * hs..(last + 1) * hs]);
            }
        }
        self.model.logits(&rows)
    }
}

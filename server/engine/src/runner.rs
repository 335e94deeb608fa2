//! The scheduler → model contract: a plain data batch in, logits out.
//!
//! The scheduler decides *what* runs (which sequences, how many tokens each,
//! which KV blocks they own); a [`ModelRunner`] only runs the forward pass over
//! the paged KV pool it owns. Tests drive the engine with a scripted runner;
//! the real ones are in `genai-models`.

/// Static facts about a loaded generation model the engine needs.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    pub vocab_size: usize,
    /// Tokens that end generation (EOS and end-of-turn ids).
    pub eos_token_ids: Vec<u32>,
    /// Maximum positions the model supports.
    pub context_length: usize,
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Bytes one token occupies in the KV cache across all layers (K and V).
    pub kv_bytes_per_token: usize,
}

/// One sequence's share of a forward pass.
#[derive(Debug, Clone)]
pub struct BatchEntry {
    pub seq_id: u64,
    /// Tokens computed now: a prefill chunk, or the one newest token when decoding.
    pub tokens: Vec<u32>,
    /// Position of `tokens[0]` = tokens of this sequence already in the KV cache.
    pub start_pos: usize,
    /// Physical KV block ids covering positions `0..start_pos + tokens.len()`.
    pub block_table: Vec<u32>,
    /// Whether the logits after the last token are wanted (false for a
    /// non-final prefill chunk).
    pub want_logits: bool,
}

/// Everything one engine step asks of the model.
#[derive(Debug, Clone, Default)]
pub struct ForwardBatch {
    pub entries: Vec<BatchEntry>,
    /// Copy-on-write: copy every layer's K/V of block `src` into block `dst`
    /// before the forward pass. This engine never writes into a shared block,
    /// so it plans none; runners still honour the contract.
    pub block_copies: Vec<(u32, u32)>,
}

/// Runs forward passes over a paged KV pool it owns. Runs on the engine thread only.
pub trait ModelRunner: Send {
    fn info(&self) -> &ModelInfo;

    /// Allocates the KV pool: `num_blocks` blocks of `block_size` tokens.
    /// Called once before the first forward.
    fn allocate_kv(&mut self, num_blocks: usize, block_size: usize) -> anyhow::Result<()>;

    /// Runs one step. Returns one row of `vocab_size` logits per entry with
    /// `want_logits`, in entry order.
    fn forward(&mut self, batch: &ForwardBatch) -> anyhow::Result<Vec<Vec<f32>>>;
}

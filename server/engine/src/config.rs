//! `[engine]`: the scheduler's and the KV cache's sizes.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Tokens per KV-cache block.
    pub block_size: usize,
    /// Memory for the paged KV cache, in MiB (CPU). The pool is preallocated.
    pub kv_cache_mib: usize,
    /// Fraction of free GPU memory for the KV cache (CUDA).
    pub gpu_memory_fraction: f32,
    /// Token budget of one engine step (prefill chunks + decodes).
    pub max_batch_tokens: usize,
    /// Most sequences running at once.
    pub max_running: usize,
    /// Most requests waiting for admission; beyond it submissions are refused.
    pub max_waiting: usize,
    /// Context length cap (0 = the model's own).
    pub max_context: usize,
    /// Default `max_tokens` when a request sets none.
    pub default_max_tokens: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            kv_cache_mib: 512,
            gpu_memory_fraction: 0.9,
            max_batch_tokens: 512,
            max_running: 128,
            max_waiting: 1024,
            max_context: 0,
            default_max_tokens: 256,
        }
    }
}

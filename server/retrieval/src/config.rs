//! `[index]` (the vector store and the chunker) and `[rag]` (retrieval-augmented chat).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `[index]`: the FAISS vector store and the chunker that feeds it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IndexConfig {
    /// Directory holding the persisted index (created on first save).
    pub dir: PathBuf,
    /// FAISS index factory string: "Flat", "IVF{nlist},Flat" or "HNSW{M}".
    pub factory: String,
    /// IVF: inverted lists probed per query.
    pub nprobe: usize,
    /// HNSW: candidate list size at search time.
    pub ef_search: usize,
    /// With metadata filters, fetch this many times k from FAISS first (doubled until k match).
    pub overfetch: usize,
    /// Token budget of one chunk (embedder tokens, special tokens excluded); at most 254.
    pub chunk_tokens: usize,
    /// Tokens of trailing sentences repeated at the start of the next chunk.
    pub chunk_overlap_tokens: usize,
}

impl Default for IndexConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("data/index"),
            factory: "Flat".into(),
            nprobe: 16,
            ef_search: 64,
            overfetch: 4,
            chunk_tokens: 200,
            chunk_overlap_tokens: 40,
        }
    }
}

/// `[rag]`: retrieval-augmented chat.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RagConfig {
    /// Sources put in the prompt.
    pub top_k: usize,
    /// Re-rank with maximal marginal relevance (diversity) before taking top_k.
    pub mmr: bool,
    /// MMR trade-off: 1 = relevance only, 0 = diversity only.
    pub mmr_lambda: f32,
    /// MMR candidate pool: this many times top_k.
    pub mmr_fetch_factor: usize,
    /// Sources scoring below this cosine similarity are dropped.
    pub min_score: f32,
    /// minijinja template file for the system prompt; empty = the built-in one.
    pub template: PathBuf,
}

impl Default for RagConfig {
    fn default() -> Self {
        Self {
            top_k: 4,
            mmr: false,
            mmr_lambda: 0.7,
            mmr_fetch_factor: 4,
            min_score: 0.0,
            template: PathBuf::new(),
        }
    }
}

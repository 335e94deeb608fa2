//! `[models]` (which files, which device, how many threads) and `[embedding]` (the
//! sentence-embedding worker).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// CUDA when built with it and a GPU is present, else CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelsConfig {
    /// Directory the model paths below are relative to.
    pub dir: PathBuf,
    pub device: Device,
    /// CPU threads for model compute; 0 = all cores. The embedder's own pool: `embedding.threads`.
    pub threads: usize,
    pub generation: ModelEntry,
    pub embedding: ModelEntry,
}

/// One served model: the name clients use and where its files are.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    pub name: String,
    /// A file or directory, relative to `models.dir` unless absolute.
    pub path: PathBuf,
}

impl Default for ModelsConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("models"),
            device: Device::Auto,
            threads: 0,
            generation: ModelEntry {
                name: "smollm2-135m-instruct".into(),
                path: PathBuf::from("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"),
            },
            embedding: ModelEntry {
                name: "all-minilm-l6-v2".into(),
                path: PathBuf::from("all-minilm-l6-v2"),
            },
        }
    }
}

impl ModelsConfig {
    pub fn resolve(&self, entry: &ModelEntry) -> PathBuf {
        if entry.path.is_absolute() {
            entry.path.clone()
        } else {
            self.dir.join(&entry.path)
        }
    }
}

/// `[embedding]`: the sentence-embedding worker (micro-batching, priorities, threads).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddingConfig {
    /// Padded tokens (batch size x longest sequence) in one encoder forward pass (one micro-batch).
    pub max_batch_tokens: usize,
    /// How long the worker waits for more requests after the first one arrives, in ms.
    pub max_wait_ms: u64,
    /// Texts queued at most per priority (interactive, bulk); beyond it interactive calls fail
    /// with "overloaded" and bulk calls wait.
    pub max_queue: usize,
    /// CPU threads of the encoder's own kernel pool; 0 = `models.threads`.
    pub threads: usize,
}

impl Default for EmbeddingConfig {
    fn default() -> Self {
        Self {
            max_batch_tokens: 8192,
            max_wait_ms: 2,
            max_queue: 1024,
            threads: 0,
        }
    }
}

impl EmbeddingConfig {
    /// The encoder's thread count: `threads`, else `models_threads` (0 = all cores either way).
    pub fn threads_or(&self, models_threads: usize) -> usize {
        match self.threads {
            0 => models_threads,
            n => n,
        }
    }
}

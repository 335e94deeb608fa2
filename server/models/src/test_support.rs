//! Shared fixtures for other crates' tests and benches: the real MiniLM embedder (loaded once
//! per test binary), the real SmolLM2 tokenizer, and paths into the repository.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use tokenizers::Tokenizer;

use crate::embedder::Embedder;
use crate::gguf::GgufFile;

/// A path relative to the repository root.
pub fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").join(rel)
}

/// The real all-MiniLM-L6-v2 embedder (models/ must hold it).
pub fn embedder() -> Arc<Embedder> {
    static E: OnceLock<Arc<Embedder>> = OnceLock::new();
    E.get_or_init(|| {
        Arc::new(
            Embedder::load(&repo_path("models/all-minilm-l6-v2"))
                .expect("models/all-minilm-l6-v2 (run scripts/fetch-models.sh)"),
        )
    })
    .clone()
}

/// The real SmolLM2-135M-Instruct tokenizer, rebuilt from its GGUF as the server does, and the
/// ids that end generation (the engine's `ModelInfo::eos_token_ids`).
pub fn smollm2_tokenizer() -> (Arc<Tokenizer>, Vec<u32>) {
    let path = repo_path("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    let g = GgufFile::open(&path).expect("models/smollm2-135m-instruct (run scripts/fetch-models.sh)");
    let (tok, info) = crate::tokenizer::from_gguf(&g).expect("the SmolLM2 tokenizer");
    (Arc::new(tok), info.stop_ids)
}

//! Shared fixtures for the retrieval tests: the real MiniLM embedder, loaded
//! once per test binary, and paths into the repository.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use crate::embedder::Embedder;

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

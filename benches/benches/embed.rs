//! Sentence embeddings per second with all-MiniLM-L6-v2 at batch 1, 8, 32 and
//! 128, end to end as the server does it: tokenise, encode, pool, normalise.
//! Sentences are ~43 words (~47 tokens), like the onnxruntime anchor in
//! shared/perf/anchors.md (178 sentences/s at batch 32 on 2 threads).
//!
//! Run: `cargo bench -p genai-benches --bench embed`. The encoder uses every
//! core (2 here, as the anchor); set RAYON_NUM_THREADS=2 too (the tokenizer's
//! batch encoding runs on rayon).

use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use genai_models::embedder::Embedder;

const WORDS: [&str; 24] = [
    "the",
    "model",
    "retrieves",
    "relevant",
    "passages",
    "from",
    "a",
    "large",
    "collection",
    "of",
    "documents",
    "before",
    "answering",
    "questions",
    "about",
    "science",
    "history",
    "and",
    "cooking",
    "with",
    "careful",
    "citations",
    "to",
    "sources",
];

/// Deterministic ~43-word sentences, different from each other.
fn sentences(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            (0..43)
                .map(|j| WORDS[(i * 7 + j * 5 + j / 3) % WORDS.len()])
                .collect::<Vec<_>>()
                .join(" ")
                + "."
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/all-minilm-l6-v2");
    let e = Embedder::load(&dir).expect("models/all-minilm-l6-v2 (scripts/fetch-models.sh)");
    let mut g = c.benchmark_group("embed");
    g.sample_size(10);
    for batch in [1usize, 8, 32, 128] {
        let texts = sentences(batch);
        let refs: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
        let tokens: usize = e.tokenize(&refs).unwrap().iter().map(|s| s.len()).sum();
        eprintln!("batch {batch}: {:.1} tokens per sentence", tokens as f64 / batch as f64);
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_with_input(BenchmarkId::new("minilm_sentences", batch), &refs, |b, refs| {
            b.iter(|| e.embed(refs, 8192).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

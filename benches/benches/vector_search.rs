//! Search latency and QPS of the vector store on random 384-d unit vectors for
//! Flat, IVF and HNSW, with each approximate index's recall@10 against Flat
//! printed before its timings. The path measured is `VectorStore::search`
//! (FAISS search + tenant filter + metadata), as the server runs it.
//!
//! Run: `cargo bench -p genai-benches --bench vector_search`. `GF_BENCH_VECTORS`
//! (default 100000) sets the collection size; `GF_BENCH_FACTORIES` (default
//! "Flat;IVF1024,Flat;HNSW32") the index types, separated by semicolons.

use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use genai_models::embedder::normalize;
use genai_retrieval::config::IndexConfig;
use genai_retrieval::index::{Filter, NewDocument, VectorStore};
use rand::{Rng, SeedableRng};

const DIM: usize = 384;
const QUERIES: usize = 200;

fn unit(rng: &mut impl Rng) -> Vec<f32> {
    let mut v: Vec<f32> = (0..DIM).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    normalize(&mut v);
    v
}

fn build(factory: &str, vectors: &[Vec<f32>]) -> VectorStore {
    let cfg = IndexConfig {
        dir: PathBuf::from("unused"),
        factory: factory.into(),
        nprobe: 16,
        ef_search: 64,
        ..Default::default()
    };
    let store = VectorStore::in_memory(&cfg, DIM).expect("index factory");
    let t = std::time::Instant::now();
    store
        .upsert(NewDocument {
            tenant: String::new(),
            document_id: "bench".into(),
            source: String::new(),
            tags: Vec::new(),
            doc_hash: String::new(),
            chunks: vectors.iter().map(|v| (String::new(), v.clone())).collect(),
        })
        .expect("upsert");
    eprintln!(
        "{factory}: built over {} vectors in {:.1} s",
        vectors.len(),
        t.elapsed().as_secs_f64()
    );
    store
}

fn top10(store: &VectorStore, q: &[f32]) -> Vec<u64> {
    store
        .search(q, 10, &Filter::default())
        .unwrap()
        .into_iter()
        .map(|h| h.id)
        .collect()
}

fn bench(c: &mut Criterion) {
    let n: usize = std::env::var("GF_BENCH_VECTORS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let factories = std::env::var("GF_BENCH_FACTORIES").unwrap_or_else(|_| "Flat;IVF1024,Flat;HNSW32".into());
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let vectors: Vec<Vec<f32>> = (0..n).map(|_| unit(&mut rng)).collect();
    let queries: Vec<Vec<f32>> = (0..QUERIES).map(|_| unit(&mut rng)).collect();
    let flat = build("Flat", &vectors);
    let truth: Vec<Vec<u64>> = queries.iter().map(|q| top10(&flat, q)).collect();
    let mut g = c.benchmark_group("vector_search");
    g.sample_size(20);
    g.throughput(Throughput::Elements(1));
    for factory in factories.split(';') {
        let store = if factory == "Flat" {
            None
        } else {
            Some(build(factory, &vectors))
        };
        let s = store.as_ref().unwrap_or(&flat);
        let found: usize = queries
            .iter()
            .zip(&truth)
            .map(|(q, t)| top10(s, q).iter().filter(|id| t.contains(id)).count())
            .sum();
        eprintln!(
            "{factory}: recall@10 vs Flat = {:.3} ({n} vectors)",
            found as f64 / (10 * QUERIES) as f64
        );
        let mut i = 0;
        g.bench_function(BenchmarkId::new("top10", format!("{factory} n={n}")), |b| {
            b.iter(|| {
                i = (i + 1) % QUERIES;
                s.search(&queries[i], 10, &Filter::default()).unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

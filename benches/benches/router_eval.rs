//! Router evaluation: accuracy of the chat / RAG / agent router on the held-out split of the
//! labelled set (`data/router/queries.jsonl`; the split is `genai_router::dataset::split_of`),
//! and the latency of one routing decision, embedding included.
//!
//! Prints: leave-one-out accuracy on the train split for several `k` (how `DEFAULT_K` was
//! chosen, without looking at the test split); on the test split, accuracy of the full router
//! (rules, then the classifier, as the server runs it, tenant with documents) and of the
//! classifier alone, per-class precision / recall, the confusion matrix and the misrouted
//! queries; how often each rule fires on the whole set and how often it disagrees with the
//! label; that no query goes to RAG for a tenant without documents; and latency p50 / p99 of one
//! decision: rules only, the classifier's dot products only, and the whole decision with the
//! query embedding — directly on the embedder and through the server's batching worker
//! (`EmbedderHandle`, interactive queue, default `embedding.max_wait_ms`).
//!
//! Run: `cargo bench -p genai-benches --bench router_eval` (embeddings of the set are cached in
//! the temp dir).

#[path = "safety/data.rs"]
#[allow(dead_code)] // Shared with the safety benchmark and examples.
mod data;

use std::sync::Arc;
use std::time::Instant;

use genai_models::config::EmbeddingConfig;
use genai_models::embedder::{EmbedderHandle, Priority};
use genai_router::dataset::{self, Example, Split};
use genai_router::{rules, By, Classifier, Context, Decision, Mode};

const DOCS: Context = Context { has_documents: true };
const NO_DOCS: Context = Context { has_documents: false };

fn classifier(train: &[(&Example, &Vec<f32>)], k: usize) -> Classifier {
    let ex = train
        .iter()
        .map(|(e, v)| (e.text.clone(), e.mode, (*v).clone()))
        .collect();
    Classifier::new(ex, k).expect("exemplars")
}

fn route(c: &Classifier, text: &str, v: &[f32], ctx: &Context) -> Decision {
    rules::apply(text, ctx).unwrap_or_else(|| c.classify(v, ctx))
}

/// Accuracy, per-class precision / recall and the confusion matrix of `(truth, predicted)`.
fn report(title: &str, pairs: &[(Mode, Mode)]) -> f64 {
    let idx = |m: Mode| Mode::ALL.iter().position(|x| *x == m).unwrap_or(0);
    let mut cm = [[0usize; 3]; 3];
    for &(t, p) in pairs {
        cm[idx(t)][idx(p)] += 1;
    }
    let correct: usize = (0..3).map(|i| cm[i][i]).sum();
    let acc = correct as f64 / pairs.len().max(1) as f64;
    println!("\n{title}: accuracy {acc:.3} ({correct}/{})", pairs.len());
    println!("  {:<8} {:>9} {:>7} {:>5}", "class", "precision", "recall", "n");
    for m in Mode::ALL {
        let i = idx(m);
        let predicted: usize = (0..3).map(|t| cm[t][i]).sum();
        let actual: usize = cm[i].iter().sum();
        println!(
            "  {:<8} {:>9.3} {:>7.3} {:>5}",
            m.as_str(),
            cm[i][i] as f64 / predicted.max(1) as f64,
            cm[i][i] as f64 / actual.max(1) as f64,
            actual
        );
    }
    println!("  confusion (rows: label, columns: predicted)");
    println!("  {:<8} {:>6} {:>6} {:>6}", "", "chat", "rag", "agent");
    for m in Mode::ALL {
        let r = cm[idx(m)];
        println!("  {:<8} {:>6} {:>6} {:>6}", m.as_str(), r[0], r[1], r[2]);
    }
    acc
}

fn main() {
    let all = dataset::shipped();
    let embedder = Arc::new(data::embedder());
    let texts: Vec<String> = all.iter().map(|e| e.text.clone()).collect();
    let vectors = data::embed_cached(&embedder, &texts);
    let (train, test): (Vec<_>, Vec<_>) = all
        .iter()
        .zip(&vectors)
        .partition(|(e, _)| dataset::split_of(&e.text) == Split::Train);
    println!(
        "labelled set: {} queries ({} train exemplars, {} held out); per class: {}",
        all.len(),
        train.len(),
        test.len(),
        Mode::ALL
            .map(|m| format!("{m} {}", all.iter().filter(|e| e.mode == m).count()))
            .join(", ")
    );

    // k by leave-one-out on the train split (classifier alone).
    println!("\nleave-one-out on the train split (classifier alone):");
    for k in [1, 3, 5, 7, 9, 15] {
        let mut ok = 0;
        for i in 0..train.len() {
            let rest: Vec<_> = train
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .map(|(_, x)| *x)
                .collect();
            ok += usize::from(classifier(&rest, k).classify(train[i].1, &DOCS).mode == train[i].0.mode);
        }
        let mark = if k == Classifier::DEFAULT_K {
            "  <- DEFAULT_K"
        } else {
            ""
        };
        println!("  k = {k:>2}: {:.3}{mark}", ok as f64 / train.len() as f64);
    }

    let c = classifier(&train, Classifier::DEFAULT_K);
    let mut full = Vec::new();
    let mut alone = Vec::new();
    let mut wrong = Vec::new();
    for (e, v) in &test {
        let d = route(&c, &e.text, v, &DOCS);
        full.push((e.mode, d.mode));
        alone.push((e.mode, c.classify(v, &DOCS).mode));
        if d.mode != e.mode {
            wrong.push(format!(
                "  [{} -> {}] {:?} ({}, {:.2})",
                e.mode,
                d.mode,
                e.text,
                d.by.as_str(),
                d.confidence
            ));
        }
    }
    let acc = report("held-out split, full router (rules + classifier)", &full);
    report("held-out split, classifier alone", &alone);
    println!("\nmisrouted held-out queries (label -> routed):");
    for w in &wrong {
        println!("{w}");
    }
    println!(
        "\ntarget accuracy >= 0.90: {}",
        if acc >= 0.9 { "met" } else { "NOT met" }
    );

    // Rules on the whole set (they are not trained; the split does not matter to them).
    let mut fired = std::collections::BTreeMap::<String, (usize, usize)>::new();
    for e in &all {
        if let Some(d) = rules::apply(&e.text, &DOCS) {
            let n = fired.entry(d.reason).or_default();
            n.0 += 1;
            n.1 += usize::from(d.mode != e.mode);
        }
    }
    println!(
        "\nrules on all {} queries (fired / disagree with the label):",
        all.len()
    );
    for (rule, (n, bad)) in &fired {
        println!("  {n:>4} / {bad:>2}  {rule}");
    }

    // Without documents, nothing goes to RAG.
    let to_rag = all
        .iter()
        .zip(&vectors)
        .filter(|(e, v)| route(&c, &e.text, v, &NO_DOCS).mode == Mode::Rag)
        .count();
    println!(
        "\ntenant without documents: {to_rag} of {} queries routed to RAG (must be 0)",
        all.len()
    );
    assert_eq!(to_rag, 0);

    latency(
        &c,
        &embedder,
        &test.iter().map(|(e, _)| e.text.clone()).collect::<Vec<_>>(),
    );
}

/// p50 / p99 of one routing decision over the held-out queries, several rounds.
fn latency(c: &Classifier, embedder: &Arc<genai_models::embedder::Embedder>, queries: &[String]) {
    const ROUNDS: usize = 5;
    let q = embedder.embed(&["warm-up"], 8192).expect("embedding");
    let (mut rules_us, mut classify_us, mut direct_ms) = (vec![], vec![], vec![]);
    let (mut queued_ms, mut unbatched_ms) = (vec![], vec![]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let handle = EmbedderHandle::spawn(embedder.clone(), &EmbeddingConfig::default()).expect("embedder worker");
    // The same worker without its batching window (`embedding.max_wait_ms = 0`).
    let unbatched = EmbeddingConfig {
        max_wait_ms: 0,
        ..EmbeddingConfig::default()
    };
    let unbatched = EmbedderHandle::spawn(embedder.clone(), &unbatched).expect("embedder worker");
    let mut by = [0usize; 3];
    for _ in 0..ROUNDS {
        for text in queries {
            let t = Instant::now();
            let rule = rules::apply(text, &DOCS);
            rules_us.push(t.elapsed().as_secs_f64() * 1e6);
            let t = Instant::now();
            std::hint::black_box(c.classify(&q[0], &DOCS));
            classify_us.push(t.elapsed().as_secs_f64() * 1e6);

            // Whole decision, embedding directly (the compute cost).
            let t = Instant::now();
            let d = rule.clone().unwrap_or_else(|| {
                let v = embedder.embed(&[text.as_str()], 8192).expect("embedding");
                c.classify(&v[0], &DOCS)
            });
            direct_ms.push(t.elapsed().as_secs_f64() * 1e3);
            by[d.by as usize] += 1;

            // Whole decision as the server makes it: the interactive queue of the batching worker.
            for (h, out) in [(&handle, &mut queued_ms), (&unbatched, &mut unbatched_ms)] {
                let t = Instant::now();
                let d = rt.block_on(async {
                    match rules::apply(text, &DOCS) {
                        Some(d) => d,
                        None => {
                            let e = h
                                .embed(vec![text.clone()], Priority::Interactive)
                                .await
                                .expect("embedding");
                            c.classify(&e.vectors[0], &DOCS)
                        }
                    }
                });
                out.push(t.elapsed().as_secs_f64() * 1e3);
                std::hint::black_box(d);
            }
        }
    }
    let n = (ROUNDS * queries.len()) as f64;
    println!(
        "\nlatency of one decision ({} held-out queries x {ROUNDS} rounds; {:.0} % decided by a rule, {:.0} % embedded):",
        queries.len(),
        by[By::Rule as usize] as f64 * 100.0 / n,
        by[By::Classifier as usize] as f64 * 100.0 / n
    );
    println!(
        "  rules only:                         p50 {:>7.1} µs  p99 {:>7.1} µs",
        data::pct(&mut rules_us, 0.5),
        data::pct(&mut rules_us, 0.99)
    );
    println!(
        "  classifier only ({} exemplars):     p50 {:>7.1} µs  p99 {:>7.1} µs",
        c.len(),
        data::pct(&mut classify_us, 0.5),
        data::pct(&mut classify_us, 0.99)
    );
    println!(
        "  whole decision, direct embedding:   p50 {:>7.2} ms  p99 {:>7.2} ms",
        data::pct(&mut direct_ms, 0.5),
        data::pct(&mut direct_ms, 0.99)
    );
    println!(
        "  whole decision, server's queue:     p50 {:>7.2} ms  p99 {:>7.2} ms  (target p99 <= 5 ms; \
         default embedding.max_wait_ms = {})",
        data::pct(&mut queued_ms, 0.5),
        data::pct(&mut queued_ms, 0.99),
        EmbeddingConfig::default().max_wait_ms
    );
    println!(
        "  ... with embedding.max_wait_ms = 0: p50 {:>7.2} ms  p99 {:>7.2} ms",
        data::pct(&mut unbatched_ms, 0.5),
        data::pct(&mut unbatched_ms, 0.99)
    );
}

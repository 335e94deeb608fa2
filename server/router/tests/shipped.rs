//! The shipped labelled set with the real MiniLM embedder: its train split, as the server loads
//! it, routes its held-out split above a floor (the benchmark prints the exact figures; the floor
//! catches a broken set, split, embedder or classifier). FAILS (does not skip) when `models/`
//! lacks the embedder: run `scripts/fetch-models.sh` first.

use std::path::PathBuf;

use genai_models::embedder::Embedder;
use genai_router::dataset::{self, Split};
use genai_router::{rules, Classifier, Context, Mode};

fn embedder() -> Embedder {
    let dir = std::env::var_os("GENAI_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"))
        .join("all-minilm-l6-v2");
    Embedder::load(&dir).unwrap_or_else(|e| panic!("{}: {e} (scripts/fetch-models.sh)", dir.display()))
}

#[test]
fn the_train_split_routes_the_held_out_split_above_a_floor() {
    let e = embedder();
    let embed = |texts: Vec<&str>| e.embed(&texts, 8192).expect("embedding");
    let train = dataset::shipped_split(Split::Train);
    let test = dataset::shipped_split(Split::Test);
    let vectors = embed(train.iter().map(|x| x.text.as_str()).collect());
    let exemplars = train
        .into_iter()
        .zip(vectors)
        .map(|(x, v)| (x.text, x.mode, v))
        .collect();
    let c = Classifier::new(exemplars, Classifier::DEFAULT_K).unwrap();
    let queries = embed(test.iter().map(|x| x.text.as_str()).collect());

    let docs = Context { has_documents: true };
    let no_docs = Context { has_documents: false };
    let mut correct = [0usize; 3];
    let mut total = [0usize; 3];
    for (x, v) in test.iter().zip(&queries) {
        let d = rules::apply(&x.text, &docs).unwrap_or_else(|| c.classify(v, &docs));
        total[x.mode as usize] += 1;
        correct[x.mode as usize] += usize::from(d.mode == x.mode);
        assert!((0.0..=1.0).contains(&d.confidence), "{d:?}");
        let without = rules::apply(&x.text, &no_docs).unwrap_or_else(|| c.classify(v, &no_docs));
        assert_ne!(without.mode, Mode::Rag, "{:?} went to RAG without documents", x.text);
    }
    let accuracy = correct.iter().sum::<usize>() as f64 / total.iter().sum::<usize>() as f64;
    assert!(
        accuracy >= 0.85,
        "held-out accuracy {accuracy:.3} ({correct:?} of {total:?})"
    );
    for m in Mode::ALL {
        let recall = correct[m as usize] as f64 / total[m as usize] as f64;
        assert!(recall >= 0.75, "{m}: recall {recall:.3}");
    }
}

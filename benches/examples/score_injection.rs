//! Prints the injection classifier's score for each line of stdin (our MiniLM embedding of the
//! whole line, the shipped MLP), to pick a `[safety.injection] threshold` on your own traffic:
//! `cut -f1 prompts.tsv | cargo run --release -p genai-benches --example score_injection`.

#[path = "../benches/safety/data.rs"]
#[allow(dead_code)] // The benchmark's data module; this tool needs only the embedder.
mod data;

use std::io::BufRead;

use genai_safety::injection::{InjectionConfig, InjectionDetector};

fn main() {
    let detector = InjectionDetector::new(&InjectionConfig::with_models_dir(&data::models_dir()))
        .unwrap_or_else(|e| panic!("{e}"));
    let embedder = data::embedder();
    for line in std::io::stdin().lock().lines() {
        let text = line.expect("stdin");
        let v = embedder.embed(&[text.as_str()], 8192).expect("embedding");
        let words = if detector.classifiable(&text) {
            ""
        } else {
            " (too short: rules only)"
        };
        println!("{:.3}{words}\t{text}", detector.score(&v[0]));
    }
}

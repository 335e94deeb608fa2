//! Toxicity: a lexicon plus a classifier, both on text (no embedding).
//!
//! **Classifier** ([`ToxicityDetector::score`]): alt-profanity-check 1.9.1's model, converted at
//! fetch time to `models/safety/toxicity/profanity-svm.json` by `scripts/lib/joblib_to_json.py`:
//! scikit-learn's `TfidfVectorizer` (lowercase, token pattern `(?u)\b\w\w+\b`, unigrams, smooth
//! idf, L2 norm) feeding a `CalibratedClassifierCV` of five `LinearSVC` folds with sigmoid
//! calibration. The transform is re-implemented here as sklearn defines it: term counts over the
//! vocabulary × idf, L2-normalised; each fold's decision `coef · x + intercept` becomes
//! `1 / (1 + exp(a·d + b))`, and the probability is the mean over folds. A long text is scored
//! per chunk (the injection stage's sentence grouping) and takes the maximum, so one abusive
//! sentence is not diluted by pages of benign text.
//!
//! **Lexicon** ([`ToxicityDetector::lexicon`]): better-profanity 0.7.0's word list
//! (`profanity_wordlist.txt`, 916 entries, many of them ordinary words such as "breasts" or
//! "drunk") narrowed to the single words that the SVM itself weighs as strongly toxic (mean
//! coefficient over the folds ≥ `lexicon_min_weight`), minus [`AMBIGUOUS`] words with an
//! everyday meaning. Matching is whole-token after NFKC and lowercasing, so "Scunthorpe" or
//! "assessment" never match; obfuscations are folded first: leetspeak inside words (`sh1t`,
//! `a$$`), letters spaced or dotted apart (`f.u.c.k`), stretched letters (`fuuuck`), and masked
//! letters (`f*ck` matches a lexicon word of the same length whose other letters agree).
//!
//! Tested by: the unit tests below (tokenisation, the TF-IDF transform and the calibrated mean
//! on a hand-made model, lexicon folding and look-alikes) and `tests/packaged.rs` (the fetched
//! model's probabilities on sentences match values printed by alt-profanity-check itself).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use regex::Regex;
use serde::Deserialize;
use unicode_normalization::UnicodeNormalization;

use crate::data::{read_to_string, DataError};
use crate::verdict::{Stage, Verdict};

/// Lexicon candidates the SVM weighs high but that have an everyday, literary or identity
/// meaning (anatomy, a name, an animal, "cum laude", "this sucks", mild swearing): left to the
/// classifier, which sees the context.
pub const AMBIGUOUS: &[&str] = &[
    "cock",
    "dick",
    "penis",
    "suck",
    "sucks",
    "jerk",
    "crap",
    "gay",
    "queer",
    "queers",
    "homosexual",
    "hell",
    "damn",
    "goddamn",
    "kill",
    "boobs",
    "butt",
    "pig",
    "fool",
    "liar",
    "dumb",
    "stupid",
    "idiot",
    "loser",
    "ass",
    "asses",
    "arse",
    "jackass",
    "pussy",
    "pussies",
    "nig",
    "bastard",
    "bastards",
    "cum",
    "piss",
    "rapist",
];

#[derive(Debug, Clone, PartialEq)]
pub struct ToxicityConfig {
    /// The converted alt-profanity-check model.
    pub model: PathBuf,
    /// better-profanity's word list (lexicon candidates).
    pub wordlist: PathBuf,
    /// Block when the classifier's probability reaches this.
    pub threshold: f32,
    /// A candidate word joins the lexicon when its mean SVM coefficient reaches this.
    pub lexicon_min_weight: f32,
    /// Longest chunk the classifier scores at once, in bytes.
    pub max_chunk_bytes: usize,
}

impl ToxicityConfig {
    /// The files `scripts/fetch-models.sh` puts under `<dir>/safety/toxicity/`, and defaults.
    pub fn with_models_dir(dir: &Path) -> Self {
        let d = dir.join("safety/toxicity");
        ToxicityConfig {
            model: d.join("profanity-svm.json"),
            wordlist: d.join("profanity_wordlist.txt"),
            threshold: 0.9,
            lexicon_min_weight: 2.5,
            max_chunk_bytes: 400,
        }
    }
}

#[derive(Deserialize)]
struct ModelFile {
    token_pattern: String,
    vocabulary: Vec<String>,
    idf: Vec<f32>,
    folds: Vec<Fold>,
}

#[derive(Debug, Deserialize)]
struct Fold {
    coef: Vec<f32>,
    intercept: f32,
    a: f32,
    b: f32,
}

#[derive(Debug)]
pub struct ToxicityDetector {
    token_re: Regex,
    vocab: HashMap<String, usize>,
    idf: Vec<f32>,
    folds: Vec<Fold>,
    lexicon: HashSet<String>,
    threshold: f32,
    max_chunk_bytes: usize,
}

impl ToxicityDetector {
    pub fn new(cfg: &ToxicityConfig) -> Result<Self, DataError> {
        if !(0.0..=1.0).contains(&cfg.threshold) {
            return Err(DataError::invalid(
                "safety.toxicity.threshold",
                format!("{} is not within [0, 1]", cfg.threshold),
            ));
        }
        if cfg.max_chunk_bytes < 64 {
            return Err(DataError::invalid(
                "safety.toxicity.max_chunk_bytes",
                format!("{} is below 64", cfg.max_chunk_bytes),
            ));
        }
        let what = || cfg.model.display().to_string();
        let m: ModelFile = serde_json::from_str(&read_to_string(&cfg.model)?)
            .map_err(|e| DataError::invalid(what(), e.to_string()))?;
        let n = m.vocabulary.len();
        if m.idf.len() != n || m.folds.is_empty() || m.folds.iter().any(|f| f.coef.len() != n) {
            return Err(DataError::invalid(
                what(),
                format!("{n} terms but idf or fold coefficients of another length"),
            ));
        }
        // sklearn's `(?u)\b\w\w+\b`; the `(?u)` flag is Python's (Rust regexes are Unicode already).
        let pattern = m.token_pattern.strip_prefix("(?u)").unwrap_or(&m.token_pattern);
        let token_re = Regex::new(pattern).map_err(|e| DataError::invalid(what(), format!("token_pattern: {e}")))?;
        let vocab: HashMap<String, usize> = m.vocabulary.into_iter().enumerate().map(|(i, t)| (t, i)).collect();
        let weight = |i: usize| m.folds.iter().map(|f| f.coef[i]).sum::<f32>() / m.folds.len() as f32;
        let lexicon = read_to_string(&cfg.wordlist)?
            .lines()
            .map(|l| l.trim().to_lowercase())
            .filter(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_lowercase()) && !AMBIGUOUS.contains(&w.as_str()))
            .filter(|w| vocab.get(w).is_some_and(|&i| weight(i) >= cfg.lexicon_min_weight))
            .collect::<HashSet<_>>();
        if lexicon.is_empty() {
            return Err(DataError::invalid(
                cfg.wordlist.display().to_string(),
                format!("no word reaches lexicon_min_weight {}", cfg.lexicon_min_weight),
            ));
        }
        Ok(ToxicityDetector {
            token_re,
            vocab,
            idf: m.idf,
            folds: m.folds,
            lexicon,
            threshold: cfg.threshold,
            max_chunk_bytes: cfg.max_chunk_bytes,
        })
    }

    /// The lexicon's words (sorted), for logs and review.
    pub fn lexicon_words(&self) -> Vec<&str> {
        let mut w: Vec<&str> = self.lexicon.iter().map(String::as_str).collect();
        w.sort_unstable();
        w
    }

    /// A block verdict when a lexicon word appears (after folding obfuscations).
    pub fn lexicon(&self, text: &str) -> Option<Verdict> {
        lexicon_tokens(text)
            .iter()
            .any(|t| self.in_lexicon(t))
            .then(|| block("toxicity_lexicon", 1.0))
    }

    fn in_lexicon(&self, token: &str) -> bool {
        if token.contains('*') {
            let n = token.chars().count();
            let letters = token.chars().filter(|&c| c != '*').count();
            // "f*ck", "sh*t": a masked word needs at least two visible letters to be read.
            return n >= 3
                && letters >= 2
                && self
                    .lexicon
                    .iter()
                    .any(|w| w.chars().count() == n && w.chars().zip(token.chars()).all(|(a, b)| b == '*' || a == b));
        }
        self.lexicon.contains(token)
            || [1, 2].into_iter().any(|keep| {
                let s = squeeze(token, keep);
                s != token && self.lexicon.contains(&s)
            })
    }

    /// The classifier's probability for one piece of text (no chunking): sklearn's
    /// `predict_proba(...)[:, 1]`.
    pub fn probability(&self, text: &str) -> f32 {
        let lower = text.to_lowercase();
        let mut counts: HashMap<usize, f32> = HashMap::new();
        for m in self.token_re.find_iter(&lower) {
            if let Some(&i) = self.vocab.get(m.as_str()) {
                *counts.entry(i).or_default() += 1.0;
            }
        }
        let mut x: Vec<(usize, f32)> = counts.into_iter().map(|(i, c)| (i, c * self.idf[i])).collect();
        let norm = x.iter().map(|(_, v)| v * v).sum::<f32>().sqrt();
        if norm > 0.0 {
            x.iter_mut().for_each(|(_, v)| *v /= norm);
        }
        let sum: f32 = self
            .folds
            .iter()
            .map(|f| {
                let d = x.iter().map(|&(i, v)| f.coef[i] * v).sum::<f32>() + f.intercept;
                1.0 / (1.0 + (f.a * d + f.b).exp())
            })
            .sum();
        sum / self.folds.len() as f32
    }

    /// The highest chunk probability of `text`.
    pub fn score(&self, text: &str) -> f32 {
        crate::injection::chunk_text(text, self.max_chunk_bytes)
            .into_iter()
            .map(|c| self.probability(c))
            .fold(0.0, f32::max)
    }

    /// The classifier's verdict against the threshold.
    pub fn classify(&self, text: &str) -> Verdict {
        self.classify_at(text, self.threshold)
    }

    /// [`ToxicityDetector::classify`] against a threshold of the caller's (a tenant's policy).
    pub fn classify_at(&self, text: &str, threshold: f32) -> Verdict {
        Verdict::scored(Stage::Toxicity, "toxicity_classifier", self.score(text), threshold)
    }

    /// Lexicon, then classifier.
    pub fn check(&self, text: &str) -> Verdict {
        self.check_at(text, self.threshold)
    }

    /// [`ToxicityDetector::check`] against a classifier threshold of the caller's.
    pub fn check_at(&self, text: &str, threshold: f32) -> Verdict {
        self.lexicon(text).unwrap_or_else(|| self.classify_at(text, threshold))
    }

    /// The classifier's threshold in force by default.
    pub fn threshold(&self) -> f32 {
        self.threshold
    }
}

fn block(reason: &'static str, score: f32) -> Verdict {
    Verdict::block(Stage::Toxicity, reason, score)
}

/// Runs of 3+ equal characters squeezed to `keep` ("fuuuck" → "fuck" with 1, "asss" → "ass"
/// with 2); shorter runs are left alone.
fn squeeze(s: &str, keep: usize) -> String {
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < chars.len() {
        let run = chars[i..].iter().take_while(|&&c| c == chars[i]).count();
        let n = if run >= 3 { keep } else { run };
        out.extend(std::iter::repeat_n(chars[i], n));
        i += run;
    }
    out
}

/// Lowercased, NFKC-folded tokens with obfuscations undone: leetspeak inside words, single
/// letters separated by one punctuation or space character joined up ("f.u.c.k", "f u c k").
fn lexicon_tokens(text: &str) -> Vec<String> {
    let text: String = text.nfkc().collect::<String>().to_lowercase();
    // Raw tokens: letters, digits and the symbols leetspeak and masking use.
    let raw: Vec<&str> = text
        .split(|c: char| !(c.is_alphanumeric() || matches!(c, '@' | '$' | '*')))
        .filter(|t| !t.is_empty())
        .collect();
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        // Spaced-out letters: 3+ single-character tokens in a row.
        let mut j = i;
        while j < raw.len() && raw[j].chars().count() == 1 {
            j += 1;
        }
        if j - i >= 3 {
            out.push(raw[i..j].concat());
            i = j;
            continue;
        }
        out.push(raw[i].to_string());
        i += 1;
    }
    out.into_iter().map(|t| fold_leet(&t)).collect()
}

/// Leetspeak digits and symbols to letters, in tokens that also have letters.
fn fold_leet(t: &str) -> String {
    if !t.chars().any(char::is_alphabetic) {
        return t.to_string();
    }
    t.chars().map(|c| crate::injection::leet(c).unwrap_or(c)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A detector over a hand-made two-fold model and lexicon.
    fn tiny(threshold: f32) -> ToxicityDetector {
        ToxicityDetector {
            token_re: Regex::new(r"\b\w\w+\b").unwrap(),
            vocab: [("bad", 0), ("good", 1), ("word", 2)]
                .into_iter()
                .map(|(t, i)| (t.to_string(), i))
                .collect(),
            idf: vec![2.0, 1.0, 1.0],
            folds: vec![
                Fold {
                    coef: vec![3.0, -1.0, 0.0],
                    intercept: -1.0,
                    a: -2.0,
                    b: 0.5,
                },
                Fold {
                    coef: vec![2.0, -2.0, 0.5],
                    intercept: -0.5,
                    a: -1.5,
                    b: 0.0,
                },
            ],
            lexicon: ["fuck", "shit", "ass", "cunt"].into_iter().map(String::from).collect(),
            threshold,
            max_chunk_bytes: 64,
        }
    }

    #[test]
    fn tfidf_and_calibrated_mean_follow_sklearn() {
        let d = tiny(0.5);
        // "Bad bad good, a word!": counts bad 2, good 1, word 1 ("a" is one letter: no token).
        // tf-idf = [4, 1, 1] / sqrt(18).
        let n = 18f32.sqrt();
        let x = [4.0 / n, 1.0 / n, 1.0 / n];
        let d1 = 3.0 * x[0] - x[1] - 1.0;
        let d2 = 2.0 * x[0] - 2.0 * x[1] + 0.5 * x[2] - 0.5;
        let p1 = 1.0 / (1.0 + (-2.0 * d1 + 0.5).exp());
        let p2 = 1.0 / (1.0 + (-1.5 * d2).exp());
        let got = d.probability("Bad bad GOOD, a word!");
        assert!((got - (p1 + p2) / 2.0).abs() < 1e-6, "{got}");
        // No known token: the decision is the intercept alone.
        let p0 = (1.0 / (1.0 + (2.0f32 + 0.5).exp()) + 1.0 / (1.0 + (0.75f32).exp())) / 2.0;
        assert!((d.probability("nothing known here") - p0).abs() < 1e-6);
    }

    #[test]
    fn long_texts_take_the_worst_chunk() {
        let d = tiny(0.5);
        let long = format!("{} bad bad bad.", "A good word here. ".repeat(10));
        // Diluted over the whole text the classifier is below its threshold; the worst chunk
        // (the last sentence with at most a few benign ones before it) is not.
        assert!(d.probability(&long) < 0.5, "{}", d.probability(&long));
        assert!(d.score(&long) >= 0.5, "{}", d.score(&long));
    }

    #[test]
    fn lexicon_folds_obfuscations_and_spares_look_alikes() {
        let d = tiny(0.5);
        for toxic in [
            "you piece of sh1t",
            "F.U.C.K off",
            "f u c k this",
            "what the fuuuuck",
            "a$$",
            "sh*t happens",
            "f**k",
            "ＦＵＣＫ",
        ] {
            assert_eq!(d.lexicon(toxic).map(|v| v.reason), Some("toxicity_lexicon"), "{toxic}");
        }
        for fine in [
            "Scunthorpe United won",
            "an assessment of the class",
            "I passed the exam",
            "shiitake mushrooms",
            "a b c",
            "*** bold ***",
            "Essex and Sussex",
            "version 1.2.3",
        ] {
            assert_eq!(d.lexicon(fine), None, "{fine}");
        }
    }

    #[test]
    fn check_orders_lexicon_then_classifier() {
        let d = tiny(0.5);
        assert_eq!(d.check("shit").reason, "toxicity_lexicon");
        assert_eq!(d.check("bad bad bad").reason, "toxicity_classifier");
        let v = tiny(0.99).check("bad bad bad");
        assert_eq!((v.action, v.reason), (crate::verdict::Action::Allow, "none"));
        assert!(v.score.is_some());
    }

    #[test]
    fn config_errors_name_the_field_or_file() {
        let mut cfg = ToxicityConfig::with_models_dir(Path::new("/nonexistent"));
        assert!(ToxicityDetector::new(&cfg)
            .unwrap_err()
            .to_string()
            .contains("profanity-svm.json"));
        cfg.threshold = 2.0;
        assert!(ToxicityDetector::new(&cfg)
            .unwrap_err()
            .to_string()
            .contains("safety.toxicity.threshold"));
    }
}

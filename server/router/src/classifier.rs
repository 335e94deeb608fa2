//! Nearest-exemplar classification: the `k` labelled exemplars most similar to the query
//! (cosine: every vector is unit length) vote for their mode, each with weight
//! `exp(similarity / TEMPERATURE)`, so a close exemplar outweighs several distant ones. The
//! winner's share of the vote is the confidence.
//!
//! Cost per query: one dot product per exemplar (a few hundred × 384 floats: tens of µs) and a
//! partial sort; nothing is allocated per exemplar.

use crate::{By, Context, Decision, Mode};

/// Softmax temperature over cosine similarities of the `k` neighbours.
const TEMPERATURE: f32 = 0.05;

/// Labelled exemplar embeddings.
pub struct Classifier {
    dim: usize,
    /// Unit vectors, row-major, one per exemplar.
    vectors: Vec<f32>,
    modes: Vec<Mode>,
    texts: Vec<String>,
    k: usize,
}

impl Classifier {
    /// Neighbours that vote (chosen by leave-one-out accuracy on the train split; see the
    /// `router_eval` benchmark).
    pub const DEFAULT_K: usize = 7;

    /// `exemplars`: (text, mode, embedding). Vectors are normalised here; all must have the
    /// same, non-zero dimension.
    pub fn new(exemplars: Vec<(String, Mode, Vec<f32>)>, k: usize) -> Result<Self, String> {
        let dim = exemplars.first().map_or(0, |(_, _, v)| v.len());
        if dim == 0 {
            return Err("no exemplars (or empty vectors)".into());
        }
        let mut c = Classifier {
            dim,
            vectors: Vec::with_capacity(exemplars.len() * dim),
            modes: Vec::with_capacity(exemplars.len()),
            texts: Vec::with_capacity(exemplars.len()),
            k: k.max(1),
        };
        for (i, (text, mode, mut v)) in exemplars.into_iter().enumerate() {
            if v.len() != dim {
                return Err(format!("exemplar {i} ({text:?}): dimension {} != {dim}", v.len()));
            }
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            if !norm.is_finite() || norm == 0.0 {
                return Err(format!("exemplar {i} ({text:?}): zero or non-finite vector"));
            }
            v.iter_mut().for_each(|x| *x /= norm);
            c.vectors.extend(v);
            c.modes.push(mode);
            c.texts.push(text);
        }
        Ok(c)
    }

    pub fn len(&self) -> usize {
        self.modes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.modes.is_empty()
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The mode of a unit query vector. Exemplars of modes `ctx` forbids (RAG without documents)
    /// do not vote.
    pub fn classify(&self, query: &[f32], ctx: &Context) -> Decision {
        if query.len() != self.dim {
            return Decision::fallback(format!(
                "classifier: query dimension {} != exemplar dimension {}",
                query.len(),
                self.dim
            ));
        }
        let mut scored: Vec<(f32, usize)> = self
            .vectors
            .chunks_exact(self.dim)
            .enumerate()
            .filter(|&(i, _)| ctx.allows(self.modes[i]))
            .map(|(i, v)| (dot(v, query), i))
            .collect();
        if scored.is_empty() {
            return Decision::fallback("classifier: no exemplar of an allowed mode");
        }
        let k = self.k.min(scored.len());
        let by_similarity = |a: &(f32, usize), b: &(f32, usize)| b.0.total_cmp(&a.0);
        if k < scored.len() {
            scored.select_nth_unstable_by(k - 1, by_similarity);
            scored.truncate(k);
        }
        scored.sort_unstable_by(by_similarity);
        let top = scored[0].0;
        let mut votes = [0f32; 3];
        let mut counts = [0usize; 3];
        for &(sim, i) in &scored {
            // Relative to the best, so exp never overflows.
            votes[self.modes[i].index()] += ((sim - top) / TEMPERATURE).exp();
            counts[self.modes[i].index()] += 1;
        }
        let total: f32 = votes.iter().sum();
        let mode = Mode::ALL
            .into_iter()
            .max_by(|a, b| votes[a.index()].total_cmp(&votes[b.index()]))
            .unwrap_or(Mode::Chat);
        let (nearest_sim, nearest) = scored[0];
        let excluded = if ctx.has_documents {
            ""
        } else {
            " (RAG excluded: the tenant has no documents)"
        };
        Decision {
            mode,
            confidence: votes[mode.index()] / total,
            reason: format!(
                "classifier: {} of the {k} nearest exemplars are {mode}{excluded}; nearest: {:?} ({} {nearest_sim:.2})",
                counts[mode.index()],
                self.texts[nearest],
                self.modes[nearest],
            ),
            by: By::Classifier,
        }
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCS: Context = Context { has_documents: true };

    /// Three well-separated directions per mode, in 4 dimensions.
    fn tiny(k: usize) -> Classifier {
        let ex = |t: &str, m, v: [f32; 4]| (t.to_owned(), m, v.to_vec());
        Classifier::new(
            vec![
                ex("hello", Mode::Chat, [1.0, 0.1, 0.0, 0.0]),
                ex("write a poem", Mode::Chat, [0.9, 0.0, 0.2, 0.0]),
                ex("refund policy", Mode::Rag, [0.0, 1.0, 0.0, 0.1]),
                ex("our handbook", Mode::Rag, [0.1, 0.9, 0.0, 0.0]),
                ex("2+2", Mode::Agent, [0.0, 0.0, 1.0, 0.1]),
                ex("time now", Mode::Agent, [0.0, 0.1, 0.9, 0.0]),
            ],
            k,
        )
        .unwrap()
    }

    fn unit(v: [f32; 4]) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    #[test]
    fn nearest_exemplars_decide_with_a_confidence_and_a_reason() {
        let c = tiny(3);
        let d = c.classify(&unit([0.05, 0.95, 0.05, 0.0]), &DOCS);
        assert_eq!((d.mode, d.by), (Mode::Rag, By::Classifier));
        assert!(d.confidence > 0.9 && d.confidence <= 1.0, "{d:?}");
        assert!(
            d.reason.contains("2 of the 3 nearest exemplars are rag"),
            "{}",
            d.reason
        );
        assert!(
            d.reason.contains("\"our handbook\"") || d.reason.contains("\"refund policy\""),
            "{}",
            d.reason
        );
        assert_eq!(c.classify(&unit([0.0, 0.0, 1.0, 0.0]), &DOCS).mode, Mode::Agent);
        assert_eq!(c.classify(&unit([1.0, 0.0, 0.1, 0.0]), &DOCS).mode, Mode::Chat);
    }

    #[test]
    fn an_ambiguous_query_gets_a_low_confidence() {
        let c = tiny(6);
        let clear = c.classify(&unit([0.0, 0.0, 1.0, 0.0]), &DOCS);
        let torn = c.classify(&unit([0.5, 0.5, 0.5, 0.0]), &DOCS);
        assert!(torn.confidence < clear.confidence, "{torn:?} vs {clear:?}");
        assert!(torn.confidence < 0.6, "{torn:?}");
    }

    #[test]
    fn without_documents_rag_exemplars_do_not_vote() {
        let c = tiny(3);
        let d = c.classify(&unit([0.0, 1.0, 0.0, 0.0]), &Context { has_documents: false });
        assert_ne!(d.mode, Mode::Rag);
        assert!(d.reason.contains("RAG excluded"), "{}", d.reason);
    }

    #[test]
    fn bad_inputs_fall_back_or_are_refused() {
        let c = tiny(3);
        let d = c.classify(&[1.0, 0.0], &DOCS);
        assert_eq!((d.mode, d.by), (Mode::Chat, By::Fallback));
        assert!(Classifier::new(vec![], 3).is_err());
        let mixed = vec![
            ("a".to_owned(), Mode::Chat, vec![1.0, 0.0]),
            ("b".to_owned(), Mode::Rag, vec![1.0, 0.0, 0.0]),
        ];
        assert!(Classifier::new(mixed, 3)
            .err()
            .unwrap_or_default()
            .contains("dimension 3 != 2"));
        let zero = vec![("z".to_owned(), Mode::Chat, vec![0.0, 0.0])];
        assert!(Classifier::new(zero, 3).is_err());
        // k beyond the exemplar count uses them all.
        assert_eq!(tiny(50).classify(&unit([0.0, 0.0, 1.0, 0.0]), &DOCS).mode, Mode::Agent);
    }
}

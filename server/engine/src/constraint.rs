//! The structured-output seam: a per-sequence [`Constraint`] says which tokens may come next.
//!
//! The engine knows nothing of grammars (no llguidance here): `genai-grammar` implements the
//! trait over llguidance; tests implement it with scripted token sets. A sequence with a
//! constraint gets, at every position it samples, the allowed set as a [`TokenMask`]; disallowed
//! logits become -inf before any other sampling stage, so penalties, temperature and
//! top-k/top-p only ever choose among allowed tokens. The sampled token is then committed.
//!
//! Invariants: masks are computed off the engine thread (on the engine's small mask pool) while
//! the forward pass of the same step runs, so a constrained batch costs max(forward, slowest
//! mask), not forward + Σ masks; a constraint is only ever touched by one thread at a time (it is
//! moved out of its sequence for the computation and back after). An error or a panic in a
//! constraint fails only its own sequence. End tokens (EOS, stop token ids) are never committed:
//! the mask allows them when the grammar may end, and sampling one finishes the sequence;
//! [`Constraint::is_finished`] after a commit ends it too, with `Stop`.
//!
//! Tested in the engine's tests (`lib.rs`, a scripted constraint through the real step loop) and
//! with the real llguidance implementation in `genai-grammar`.

/// A set of token ids: bit `i` of the little-endian 32-bit words is token `i`. Ids past the
/// words' end are disallowed, so a model whose logit rows are wider than the tokenizer's
/// vocabulary never samples a padding id under a constraint.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TokenMask {
    words: Vec<u32>,
}

impl TokenMask {
    /// The mask whose bit `i` (word `i / 32`, bit `i % 32`) allows token `i` (llguidance's
    /// `SimpleVob` layout).
    pub fn from_words(words: Vec<u32>) -> Self {
        Self { words }
    }

    /// The mask allowing exactly `ids`.
    pub fn from_ids(ids: impl IntoIterator<Item = u32>) -> Self {
        let mut words = Vec::new();
        for id in ids {
            let w = id as usize / 32;
            if words.len() <= w {
                words.resize(w + 1, 0);
            }
            words[w] |= 1 << (id % 32);
        }
        Self { words }
    }

    pub fn allows(&self, token: u32) -> bool {
        self.words
            .get(token as usize / 32)
            .is_some_and(|w| w & (1 << (token % 32)) != 0)
    }

    /// Sets every disallowed logit to -inf.
    pub(crate) fn apply(&self, logits: &mut [f32]) {
        for (chunk, i) in logits.chunks_mut(32).zip(0..) {
            let word = self.words.get(i).copied().unwrap_or(0);
            if word == u32::MAX {
                continue;
            }
            for (bit, l) in chunk.iter_mut().enumerate() {
                if word & (1 << bit) == 0 {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
    }

    /// Whether any token outside `except` (sorted) is allowed.
    pub(crate) fn allows_other_than(&self, except: &[u32]) -> bool {
        self.words.iter().enumerate().any(|(i, &w)| {
            let mut w = w;
            while w != 0 {
                let id = (i * 32) as u32 + w.trailing_zeros();
                if except.binary_search(&id).is_err() {
                    return true;
                }
                w &= w - 1;
            }
            false
        })
    }
}

/// Restricts the tokens a sequence may generate (structured output). Owned by one sequence;
/// called from one thread at a time, but not always the engine thread (hence `Send`).
pub trait Constraint: Send + std::fmt::Debug {
    /// The tokens allowed at the next position, end tokens (EOS and end-of-turn ids) included
    /// when the output may end here. Called once per sampled position, concurrently with the
    /// forward pass; may be called again for the same position (after a failed step). An error
    /// fails the sequence.
    fn allowed(&mut self) -> Result<TokenMask, String>;

    /// Advances past `token`, which the last mask allowed and which is not an end token. An
    /// error fails the sequence.
    fn commit(&mut self, token: u32) -> Result<(), String>;

    /// True once nothing more may follow: the sequence finishes (`Stop`) after the committed
    /// token.
    fn is_finished(&self) -> bool;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_bits_follow_the_word_layout() {
        let m = TokenMask::from_ids([0, 5, 31, 32, 70]);
        for id in [0, 5, 31, 32, 70] {
            assert!(m.allows(id), "{id}");
        }
        for id in [1, 30, 33, 69, 71, 1000] {
            assert!(!m.allows(id), "{id}");
        }
        assert_eq!(TokenMask::from_words(vec![0b101]), TokenMask::from_ids([0, 2]));
    }

    #[test]
    fn apply_sets_disallowed_logits_to_minus_infinity_including_past_the_mask() {
        let mut logits: Vec<f32> = (0..100).map(|i| i as f32).collect();
        let mut words = vec![u32::MAX, 0];
        words[1] |= 1 << 3; // token 35
        TokenMask::from_words(words).apply(&mut logits);
        for (i, l) in logits.iter().enumerate() {
            if i < 32 || i == 35 {
                assert_eq!(*l, i as f32);
            } else {
                assert_eq!(*l, f32::NEG_INFINITY, "{i}");
            }
        }
    }

    #[test]
    fn allows_other_than_skips_the_listed_ids() {
        let m = TokenMask::from_ids([2, 40]);
        assert!(m.allows_other_than(&[2]));
        assert!(!m.allows_other_than(&[2, 40]));
        assert!(!TokenMask::default().allows_other_than(&[]));
    }
}

//! Token sampling from one row of logits: penalties, temperature, min-p,
//! top-k, top-p, min_tokens masking, seeded RNG and top-n logprobs.
//!
//! Order (vLLM V1's, see its `Sampler` docstring): min_tokens mask →
//! repetition penalty (HF style, on prompt and output) → presence/frequency
//! penalties (OpenAI style, on output) → temperature → (logprobs are taken
//! here) → greedy argmax, or min-p → top-k → top-p → draw. Logprobs are the
//! log-softmax of the *processed* logits (after masking, penalties and
//! temperature; temperature 0 counts as 1), before the min-p/top-k/top-p
//! truncation, so every returned logprob is finite and comparable across
//! requests with different truncation.
//!
//! A row holding NaN or +inf is a model fault: [`SeqSampler::sample`] returns
//! an error (the engine fails that sequence) rather than picking some token.
//! -inf is a masked token; a row with nothing left to draw is an error too.
//!
//! Cost: top-p does not sort the vocabulary. It selects the best candidates
//! into a prefix that grows geometrically (256, ×4) until its mass reaches
//! `top_p`, sorting only that prefix, so it sorts at most four times the
//! nucleus (or 256) plus linear selection passes; the walk over the prefix
//! performs the same float operations as after a full sort, so the nucleus is
//! identical.
//!
//! Determinism: each sequence owns a [`SeqSampler`] whose `ChaCha12Rng` (named,
//! so a `rand` upgrade cannot change the stream) is seeded from `seed` (or from
//! the OS); exactly one uniform draw per non-greedy token, so the output
//! depends only on the sequence's own logits, never on batching or preemption.
//! Tested below on hand-made logits and against a full sort on random rows.

use std::cmp::Ordering;
use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha12Rng;

use super::{SamplingParams, TokenMask};

/// Result of sampling one position.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Sampled {
    pub(crate) token: u32,
    /// Present when the request asked for logprobs: the sampled token's
    /// logprob and the top-n (id, logprob), best first.
    pub(crate) logprobs: Option<(f32, Vec<(u32, f32)>)>,
}

/// Why a row of logits could not be sampled.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum SampleError {
    #[error("the model returned a non-finite logit ({value}) for token {token}")]
    NonFinite { token: u32, value: f32 },
    #[error("every token of the vocabulary is masked: nothing to sample")]
    AllMasked,
}

/// Candidates selected before the first top-p walk; ×4 each time the mass
/// falls short. Small enough that a peaked distribution sorts only a few
/// hundred entries, large enough that a flat one needs few rounds.
const NUCLEUS_FIRST: usize = 256;

/// Per-sequence sampling state.
#[derive(Debug)]
pub(crate) struct SeqSampler {
    rng: ChaCha12Rng,
    /// Output token counts for presence/frequency penalties.
    output_counts: HashMap<u32, u32>,
}

impl SeqSampler {
    pub(crate) fn new(seed: Option<u64>) -> Self {
        let rng = match seed {
            Some(s) => ChaCha12Rng::seed_from_u64(s),
            None => ChaCha12Rng::from_os_rng(),
        };
        Self {
            rng,
            output_counts: HashMap::new(),
        }
    }

    /// Samples the next token. `tokens` = prompt + output so far, of which
    /// `prompt_len` are prompt; `end_ids` are EOS and stop token ids (masked
    /// until `min_tokens` outputs exist); `mask` (structured output) allows
    /// only its tokens, before every other stage.
    pub(crate) fn sample(
        &mut self,
        mut logits: Vec<f32>,
        params: &SamplingParams,
        tokens: &[u32],
        prompt_len: usize,
        end_ids: &[u32],
        mask: Option<&TokenMask>,
    ) -> Result<Sampled, SampleError> {
        if let Some((i, &value)) = logits
            .iter()
            .enumerate()
            .find(|(_, l)| l.is_nan() || **l == f32::INFINITY)
        {
            return Err(SampleError::NonFinite { token: i as u32, value });
        }
        if let Some(mask) = mask {
            mask.apply(&mut logits);
        }
        let num_output = tokens.len() - prompt_len;
        // min_tokens never holds back an end the grammar requires (it would leave nothing).
        if num_output < params.min_tokens && mask.is_none_or(|m| m.allows_other_than(end_ids)) {
            for &id in end_ids {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        if params.repetition_penalty != 1.0 {
            let mut seen = vec![false; logits.len()];
            for &t in tokens {
                if let Some(s) = seen.get_mut(t as usize) {
                    if !*s {
                        *s = true;
                        let l = &mut logits[t as usize];
                        *l = if *l > 0.0 {
                            *l / params.repetition_penalty
                        } else {
                            *l * params.repetition_penalty
                        };
                    }
                }
            }
        }
        if params.presence_penalty != 0.0 || params.frequency_penalty != 0.0 {
            for (&t, &c) in &self.output_counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= params.presence_penalty + params.frequency_penalty * c as f32;
                }
            }
        }
        let greedy = params.temperature < 1e-5;
        if !greedy && params.temperature != 1.0 {
            for l in logits.iter_mut() {
                *l /= params.temperature;
            }
        }
        let best = argmax(&logits).ok_or(SampleError::AllMasked)?;
        let logprobs_of = params.logprobs.map(|n| log_softmax(&logits, n));
        let token = if greedy { best } else { self.draw(&logits, best, params) };
        *self.output_counts.entry(token).or_insert(0) += 1;
        let logprobs = logprobs_of.map(|(lse, top)| (logits[token as usize] - lse, top));
        Ok(Sampled { token, logprobs })
    }

    /// Temperature-scaled logits → truncated distribution → one draw. `best`
    /// is the argmax (its logit is not -inf).
    fn draw(&mut self, logits: &[f32], best: u32, params: &SamplingParams) -> u32 {
        let max = logits[best as usize];
        if max == f32::INFINITY {
            // Scaling overflowed: no distribution to draw from.
            return best;
        }
        // Unnormalised probabilities (the best token has 1). Any fixed order
        // works for the draw; top-k/top-p order by probability, ties by id.
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, (l - max).exp()))
            .collect();
        if params.min_p > 0.0 {
            // Relative to the most likely token (probability 1 here).
            cand.retain(|c| c.1 >= params.min_p);
        }
        if params.top_k > 0 && params.top_k < cand.len() {
            cand.select_nth_unstable_by(params.top_k - 1, by_prob);
            cand.truncate(params.top_k);
        }
        if params.top_p < 1.0 {
            nucleus(&mut cand, params.top_p);
        }
        let mass: f32 = cand.iter().map(|c| c.1).sum();
        let mut u = self.rng.random::<f32>() * mass;
        for &(id, p) in &cand {
            if u < p {
                return id;
            }
            u -= p;
        }
        cand.last().map_or(best, |c| c.0)
    }
}

/// Higher probability first, ties by lower id: a total order, so the nucleus
/// does not depend on how the candidates were permuted before.
fn by_prob(a: &(u32, f32), b: &(u32, f32)) -> Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Truncates `cand` to the smallest [`by_prob`]-ordered prefix whose share of
/// the total mass reaches `top_p` (all of it if rounding never gets there),
/// leaving that prefix sorted. Only a geometrically growing prefix is
/// selected and sorted; every selected element beats every unselected one, so
/// the walk sees exactly the order of a full sort.
fn nucleus(cand: &mut Vec<(u32, f32)>, top_p: f32) {
    let total: f64 = cand.iter().map(|c| f64::from(c.1)).sum();
    let top_p = f64::from(top_p);
    let mut cum = 0.0f64;
    // cand[..sorted] holds the best `sorted` candidates in order.
    let mut sorted = 0;
    let mut end = NUCLEUS_FIRST.min(cand.len());
    while sorted < end {
        let rest = &mut cand[sorted..];
        let take = end - sorted;
        if take < rest.len() {
            rest.select_nth_unstable_by(take - 1, by_prob);
        }
        rest[..take].sort_unstable_by(by_prob);
        for i in sorted..end {
            cum += f64::from(cand[i].1) / total;
            if cum >= top_p {
                cand.truncate(i + 1);
                return;
            }
        }
        sorted = end;
        end = (end * 4).min(cand.len());
    }
}

/// Index of the largest logit (the first on ties); None when all are -inf
/// (or the row is empty).
fn argmax(logits: &[f32]) -> Option<u32> {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    logits
        .get(best)
        .is_some_and(|&l| l > f32::NEG_INFINITY)
        .then_some(best as u32)
}

/// Log-sum-exp of the row and its top-n (id, logprob), best first.
fn log_softmax(logits: &[f32], n: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
    let lse = max + sum.ln();
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let cmp = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    if n > 0 && n < idx.len() {
        idx.select_nth_unstable_by(n - 1, cmp);
    }
    idx.truncate(n);
    idx.sort_unstable_by(cmp);
    // Masked tokens (-inf) are not alternatives: fewer than n when fewer are allowed.
    let top = idx
        .into_iter()
        .filter(|&i| logits[i as usize].is_finite())
        .map(|i| (i, logits[i as usize] - lse))
        .collect();
    (lse, top)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn params() -> SamplingParams {
        SamplingParams::default()
    }

    #[test]
    fn greedy_takes_argmax_and_min_tokens_masks_eos() {
        let mut s = SeqSampler::new(Some(1));
        let logits = vec![5.0, 1.0, 2.0];
        assert_eq!(
            s.sample(logits.clone(), &params(), &[1], 1, &[0], None).unwrap().token,
            0
        );
        let p = SamplingParams {
            min_tokens: 2,
            ..params()
        };
        // One output so far (< 2): EOS (0) masked, next best is 2.
        assert_eq!(s.sample(logits.clone(), &p, &[1, 1], 1, &[0], None).unwrap().token, 2);
        assert_eq!(s.sample(logits, &p, &[1, 1, 1], 1, &[0], None).unwrap().token, 0);
    }

    #[test]
    fn repetition_penalty_is_hf_style() {
        let mut s = SeqSampler::new(Some(1));
        let p = SamplingParams {
            repetition_penalty: 2.0,
            logprobs: Some(3),
            ..params()
        };
        // Token 0 (logit 3 → 1.5) and token 1 (-1 → -2) were seen; 2 (2.0) wins.
        let out = s.sample(vec![3.0, -1.0, 2.0], &p, &[0, 1], 2, &[], None).unwrap();
        assert_eq!(out.token, 2);
        let (lp, top) = out.logprobs.unwrap();
        let lse = (1.5f32.exp() + (-2.0f32).exp() + 2.0f32.exp()).ln();
        assert!((lp - (2.0 - lse)).abs() < 1e-5);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![2, 0, 1]);
        assert!((top[2].1 - (-2.0 - lse)).abs() < 1e-5);
    }

    #[test]
    fn presence_and_frequency_penalties_count_output_only() {
        let mut s = SeqSampler::new(Some(1));
        let p = SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 1.0,
            ..params()
        };
        let mut token = |logits: Vec<f32>, tokens: &[u32]| s.sample(logits, &p, tokens, 1, &[], None).unwrap().token;
        // Prompt contains token 0 but no penalty applies to prompt tokens.
        assert_eq!(token(vec![3.0, 2.0], &[0]), 0);
        // Token 0 emitted once: 3 - 0.5 - 1 = 1.5 < 2.
        assert_eq!(token(vec![3.0, 2.0], &[0, 0]), 1);
        // Both once: 1.5 vs 0.5 → 0; then 0 twice: 3 - 0.5 - 2 = 0.5 vs 2.5 - 1.5 = 1.0 → 1.
        assert_eq!(token(vec![3.0, 2.0], &[0, 0, 1]), 0);
        assert_eq!(token(vec![3.0, 2.5], &[0, 0, 1, 0]), 1);
    }

    #[test]
    fn non_finite_or_fully_masked_rows_are_errors_not_token_zero() {
        for temperature in [0.0, 1.0] {
            let p = SamplingParams {
                temperature,
                logprobs: Some(2),
                ..params()
            };
            let mut s = SeqSampler::new(Some(3));
            let mut sample = |row: Vec<f32>| s.sample(row, &p, &[0], 1, &[], None);
            assert!(matches!(
                sample(vec![1.0, f32::NAN, 2.0]),
                Err(SampleError::NonFinite { token: 1, value }) if value.is_nan()
            ));
            assert_eq!(
                sample(vec![0.0, f32::INFINITY]),
                Err(SampleError::NonFinite {
                    token: 1,
                    value: f32::INFINITY
                })
            );
            assert_eq!(sample(vec![f32::NEG_INFINITY; 4]), Err(SampleError::AllMasked));
            // -inf is a masked token, not a fault.
            assert_eq!(sample(vec![f32::NEG_INFINITY, 0.5]).unwrap().token, 1);
        }
        // Masking the only candidate (min_tokens) leaves nothing to sample.
        let p = SamplingParams {
            min_tokens: 1,
            ..params()
        };
        let mut s = SeqSampler::new(Some(3));
        assert_eq!(
            s.sample(vec![1.0, f32::NEG_INFINITY], &p, &[0], 1, &[0], None),
            Err(SampleError::AllMasked)
        );
    }

    #[test]
    fn a_mask_restricts_every_stage_and_min_tokens_yields_to_a_required_end() {
        // The best logits are disallowed: greedy and sampled draws both stay inside the mask.
        let logits = vec![5.0, 4.0, 1.0, 0.5, 0.2];
        let mask = TokenMask::from_ids([2, 3]);
        let mut s = SeqSampler::new(Some(1));
        assert_eq!(
            s.sample(logits.clone(), &params(), &[9], 1, &[0], Some(&mask))
                .unwrap()
                .token,
            2
        );
        let p = SamplingParams {
            temperature: 2.0,
            seed: Some(1),
            ..params()
        };
        for _ in 0..50 {
            let t = s.sample(logits.clone(), &p, &[9], 1, &[0], Some(&mask)).unwrap().token;
            assert!(t == 2 || t == 3, "{t}");
        }
        // Logprobs are over the allowed tokens only.
        let p = SamplingParams {
            logprobs: Some(5),
            ..params()
        };
        let out = s.sample(logits.clone(), &p, &[9], 1, &[0], Some(&mask)).unwrap();
        let (_, top) = out.logprobs.unwrap();
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), [2, 3]);
        // min_tokens masks the end token while something else is allowed...
        let p = SamplingParams {
            min_tokens: 3,
            ..params()
        };
        let end_or_other = TokenMask::from_ids([0, 4]);
        assert_eq!(
            s.sample(logits.clone(), &p, &[9], 1, &[0], Some(&end_or_other))
                .unwrap()
                .token,
            4
        );
        // ...but not when the grammar allows nothing but the end.
        let only_end = TokenMask::from_ids([0]);
        assert_eq!(s.sample(logits, &p, &[9], 1, &[0], Some(&only_end)).unwrap().token, 0);
    }

    #[test]
    fn same_seed_same_draws_and_truncation_filters_apply() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let p = SamplingParams {
            temperature: 1.5,
            seed: Some(7),
            ..params()
        };
        let run = |p: &SamplingParams| {
            let mut s = SeqSampler::new(p.seed);
            (0..200)
                .map(|_| s.sample(logits.clone(), p, &[0], 1, &[], None).unwrap().token)
                .collect::<Vec<_>>()
        };
        let a = run(&p);
        assert_eq!(a, run(&p));
        assert!(
            a.iter().collect::<std::collections::HashSet<_>>().len() > 10,
            "temperature spreads draws"
        );
        // top_k = 1 is greedy whatever the seed (ties → lowest id: 6).
        let k1 = run(&SamplingParams { top_k: 1, ..p.clone() });
        assert!(k1.iter().all(|&t| t == 6));
        // The max logit (1.8) is shared by ids 6, 13, 20, ...: top_p tiny keeps only id 6.
        let tp = run(&SamplingParams {
            top_p: 1e-3,
            ..p.clone()
        });
        assert!(tp.iter().all(|&t| t == 6));
        // min_p 0.9 keeps only the max-logit tokens (ids ≡ 6 mod 7).
        let mp = run(&SamplingParams {
            min_p: 0.9,
            ..p.clone()
        });
        assert!(mp.iter().all(|&t| t % 7 == 6));
        assert!(mp.iter().collect::<std::collections::HashSet<_>>().len() > 1);
        // top_k = 3 keeps the three best: 6, 13, 20.
        let k3 = run(&SamplingParams { top_k: 3, ..p });
        assert!(k3.iter().all(|t| [6, 13, 20].contains(t)));
    }

    /// Recorded from this implementation.
    const PINNED_DRAWS: [u32; 12] = [133, 526, 248, 542, 868, 636, 990, 405, 969, 34, 617, 414];

    #[test]
    fn the_stream_of_a_seed_is_pinned() {
        // ChaCha12 from `seed_from_u64(42)`: a rand upgrade must not change these.
        let p = SamplingParams {
            temperature: 1.0,
            seed: Some(42),
            ..params()
        };
        let mut s = SeqSampler::new(p.seed);
        let draws: Vec<u32> = (0..12)
            .map(|_| s.sample(vec![0.0; 1000], &p, &[0], 1, &[], None).unwrap().token)
            .collect();
        assert_eq!(draws, PINNED_DRAWS);
    }

    #[test]
    fn min_p_applies_before_top_p() {
        // Relative probabilities 1, 0.5, 0.5, then 100 tokens of 0.01 (mass 1).
        let mut logits = vec![0.0, 0.5f32.ln(), 0.5f32.ln()];
        logits.extend([0.01f32.ln(); 100]);
        let p = SamplingParams {
            temperature: 1.0,
            min_p: 0.4,
            top_p: 0.5,
            seed: Some(5),
            ..params()
        };
        // min-p first leaves mass 2, of which token 0 alone is 0.5: only it is kept.
        // (top-p first would keep tokens 0 and 1 of the total 3, and min-p both of them.)
        let mut s = SeqSampler::new(p.seed);
        for _ in 0..200 {
            assert_eq!(s.sample(logits.clone(), &p, &[0], 1, &[], None).unwrap().token, 0);
        }
    }

    /// The nucleus by sorting every candidate, walked as [`nucleus`] walks it.
    fn nucleus_by_full_sort(mut cand: Vec<(u32, f32)>, top_p: f32) -> Vec<(u32, f32)> {
        let total: f64 = cand.iter().map(|c| f64::from(c.1)).sum();
        cand.sort_unstable_by(by_prob);
        let mut cum = 0.0f64;
        let keep = cand
            .iter()
            .position(|c| {
                cum += f64::from(c.1) / total;
                cum >= f64::from(top_p)
            })
            .map_or(cand.len(), |i| i + 1);
        cand.truncate(keep);
        cand
    }

    fn candidates(logits: &[f32]) -> Vec<(u32, f32)> {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, (l - max).exp()))
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
        /// Random rows up to 6000 entries (several growth rounds), with ties
        /// when `steps` quantizes the logits, peaked and flat alike.
        #[test]
        fn nucleus_equals_the_full_sort(
            logits in prop::collection::vec(-12.0f32..12.0, 1..6000),
            steps in prop_oneof![Just(0u32), 1u32..8],
            scale in prop_oneof![Just(0.05f32), Just(1.0f32), Just(8.0f32)],
            top_p in prop_oneof![0.0001f32..1.0, 0.98f32..1.0],
        ) {
            let row: Vec<f32> = logits
                .iter()
                .map(|&l| if steps == 0 { l * scale } else { (l * steps as f32).round() / steps as f32 * scale })
                .collect();
            let cand = candidates(&row);
            let expected = nucleus_by_full_sort(cand.clone(), top_p);
            // Any prior permutation (top-k's selection) gives the same nucleus.
            for mut c in [cand.clone(), cand.into_iter().rev().collect()] {
                nucleus(&mut c, top_p);
                prop_assert_eq!(&c, &expected);
            }
        }
    }
}

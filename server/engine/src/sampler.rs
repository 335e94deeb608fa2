//! Token sampling from one row of logits: penalties, temperature, top-k,
//! top-p, min-p, min_tokens masking, seeded RNG and top-n logprobs.
//!
//! Order (as vLLM): min_tokens mask → repetition penalty (HF style, on
//! prompt and output) → presence/frequency penalties (OpenAI style, on
//! output) → temperature → (logprobs are taken here) → greedy argmax, or
//! top-k → top-p → min-p → draw. Logprobs are the log-softmax of the *processed* logits
//! (after masking, penalties and temperature; temperature 0 counts as 1),
//! before the top-k/top-p/min-p truncation, so every returned logprob is
//! finite and comparable across requests with different truncation.
//!
//! Determinism: each sequence owns a [`SeqSampler`] whose `StdRng` (ChaCha12)
//! is seeded from `seed` (or from entropy); exactly one uniform draw per
//! non-greedy token, so the output depends only on the sequence's own logits,
//! never on batching or preemption. Tested below on hand-made logits.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::SamplingParams;

/// Result of sampling one position.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// Present when the request asked for logprobs: the sampled token's
    /// logprob and the top-n (id, logprob), best first.
    pub logprobs: Option<(f32, Vec<(u32, f32)>)>,
}

/// Per-sequence sampling state.
#[derive(Debug)]
pub struct SeqSampler {
    rng: StdRng,
    /// Output token counts for presence/frequency penalties.
    output_counts: HashMap<u32, u32>,
}

impl SeqSampler {
    pub fn new(seed: Option<u64>) -> Self {
        let rng = match seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Self {
            rng,
            output_counts: HashMap::new(),
        }
    }

    /// Samples the next token. `tokens` = prompt + output so far, of which
    /// `prompt_len` are prompt; `end_ids` are EOS and stop token ids (masked
    /// until `min_tokens` outputs exist).
    pub fn sample(
        &mut self,
        mut logits: Vec<f32>,
        params: &SamplingParams,
        tokens: &[u32],
        prompt_len: usize,
        end_ids: &[u32],
    ) -> Sampled {
        let num_output = tokens.len() - prompt_len;
        if num_output < params.min_tokens {
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
        let logprobs_of = params.logprobs.map(|n| log_softmax(&logits, n));
        let token = if greedy {
            argmax(&logits)
        } else {
            self.draw(&logits, params)
        };
        *self.output_counts.entry(token).or_insert(0) += 1;
        let logprobs = logprobs_of.map(|(lse, top)| (logits[token as usize] - lse, top));
        Sampled { token, logprobs }
    }

    /// Temperature-scaled logits → truncated distribution → one draw.
    fn draw(&mut self, logits: &[f32], params: &SamplingParams) -> u32 {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            // All masked, or an infinite logit: nothing to draw from.
            return argmax(logits);
        }
        // Unnormalised probabilities (the best token has 1). Any fixed order
        // works for the draw; top-k/top-p order by probability, ties by id.
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, (l - max).exp()))
            .collect();
        let by_prob = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if params.top_k > 0 && params.top_k < cand.len() {
            cand.select_nth_unstable_by(params.top_k - 1, by_prob);
            cand.truncate(params.top_k);
        }
        if params.top_p < 1.0 {
            // Only nucleus sampling needs the full order (49k-entry sorts
            // per token are avoided otherwise).
            cand.sort_unstable_by(by_prob);
            let total: f32 = cand.iter().map(|c| c.1).sum();
            let mut cum = 0.0;
            let keep = cand
                .iter()
                .position(|c| {
                    cum += c.1 / total;
                    cum >= params.top_p
                })
                .map_or(cand.len(), |i| i + 1);
            cand.truncate(keep);
        }
        if params.min_p > 0.0 {
            // Relative to the most likely token (probability 1 before scaling).
            cand.retain(|c| c.1 >= params.min_p);
        }
        let mass: f32 = cand.iter().map(|c| c.1).sum();
        let mut u = self.rng.random::<f32>() * mass;
        for &(id, p) in &cand {
            if u < p {
                return id;
            }
            u -= p;
        }
        cand.last().map_or(0, |c| c.0)
    }
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
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
    let top = idx.into_iter().map(|i| (i, logits[i as usize] - lse)).collect();
    (lse, top)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SamplingParams {
        SamplingParams::default()
    }

    #[test]
    fn greedy_takes_argmax_and_min_tokens_masks_eos() {
        let mut s = SeqSampler::new(Some(1));
        let logits = vec![5.0, 1.0, 2.0];
        assert_eq!(s.sample(logits.clone(), &params(), &[1], 1, &[0]).token, 0);
        let p = SamplingParams {
            min_tokens: 2,
            ..params()
        };
        // One output so far (< 2): EOS (0) masked, next best is 2.
        assert_eq!(s.sample(logits.clone(), &p, &[1, 1], 1, &[0]).token, 2);
        assert_eq!(s.sample(logits, &p, &[1, 1, 1], 1, &[0]).token, 0);
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
        let out = s.sample(vec![3.0, -1.0, 2.0], &p, &[0, 1], 2, &[]);
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
        // Prompt contains token 0 but no penalty applies to prompt tokens.
        assert_eq!(s.sample(vec![3.0, 2.0], &p, &[0], 1, &[]).token, 0);
        // Token 0 emitted once: 3 - 0.5 - 1 = 1.5 < 2.
        assert_eq!(s.sample(vec![3.0, 2.0], &p, &[0, 0], 1, &[]).token, 1);
        // Both once: 1.5 vs 0.5 → 0; then 0 twice: 3 - 0.5 - 2 = 0.5 vs 2.5 - 1.5 = 1.0 → 1.
        assert_eq!(s.sample(vec![3.0, 2.0], &p, &[0, 0, 1], 1, &[]).token, 0);
        assert_eq!(s.sample(vec![3.0, 2.5], &p, &[0, 0, 1, 0], 1, &[]).token, 1);
    }

    #[test]
    fn degenerate_logits_do_not_panic() {
        let mut s = SeqSampler::new(Some(3));
        let p = SamplingParams {
            temperature: 1.0,
            logprobs: Some(2),
            ..params()
        };
        let nan = s.sample(vec![f32::NAN, 1.0, f32::NAN], &p, &[0], 1, &[]);
        assert_eq!(nan.token, 1);
        let masked = s.sample(vec![f32::NEG_INFINITY; 4], &p, &[0], 1, &[]);
        assert!(masked.token < 4);
        assert_eq!(s.sample(vec![0.0, f32::INFINITY], &p, &[0], 1, &[]).token, 1);
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
                .map(|_| s.sample(logits.clone(), p, &[0], 1, &[]).token)
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
}

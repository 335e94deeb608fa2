//! Split-K (flash-decoding) attention on the CPU: the reference of the partitioned decode kernel
//! (`paged_attention_v2_*`) and of its reduction (`paged_attention_reduce_*`).
//!
//! A query attends to its context in partitions of `partition_size` keys. Each partition yields a
//! [`Partial`]: its softmax-normalised output, its max logit `m_p` and `l_p = Σ exp(s - m_p)`.
//! [`combine_partials`] merges them with weights `l_p · exp(m_p - M)` (M = max m_p), which equals
//! one softmax over all keys. Tested in-module against a single-pass softmax(q·Kᵀ)·V in f64, for
//! partition sizes from 1 key to more than the context, and with logits large enough to overflow a
//! naive exp.

use crate::error::{check_len, invalid, ShapeError};

/// Softmax state of one partition of keys.
#[derive(Debug, Clone, PartialEq)]
pub struct Partial {
    /// `Σ softmax_p(s)_j · v_j` over the partition's keys (already divided by `exp_sum`).
    pub out: Vec<f32>,
    /// Largest scaled logit of the partition.
    pub max_logit: f32,
    /// `Σ exp(s_j - max_logit)` over the partition.
    pub exp_sum: f32,
}

/// Attention of `q` over one partition (`keys[j]`, `values[j]`: rows of `q.len()` elements).
pub fn attend_partition(q: &[f32], keys: &[&[f32]], values: &[&[f32]], scale: f32) -> Result<Partial, ShapeError> {
    check_len("values", keys.len(), values.len())?;
    if keys.is_empty() {
        return Err(invalid("keys", "a partition holds at least one key"));
    }
    let mut logits = Vec::with_capacity(keys.len());
    for (j, k) in keys.iter().enumerate() {
        check_len(if j == 0 { "keys" } else { "keys[j]" }, q.len(), k.len())?;
        logits.push(
            q.iter()
                .zip(k.iter())
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum::<f64>()
                * f64::from(scale),
        );
    }
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut out = vec![0.0f64; q.len()];
    let mut sum = 0.0f64;
    for (s, v) in logits.iter().zip(values) {
        check_len("values[j]", q.len(), v.len())?;
        let p = (s - max).exp();
        sum += p;
        for (o, &x) in out.iter_mut().zip(v.iter()) {
            *o += p * f64::from(x);
        }
    }
    Ok(Partial {
        out: out.iter().map(|o| (o / sum) as f32).collect(),
        max_logit: max as f32,
        exp_sum: sum as f32,
    })
}

/// Merges partition states into `out` (what the reduce kernel does for one sequence and head).
pub fn combine_partials(out: &mut [f32], partials: &[Partial]) -> Result<(), ShapeError> {
    if partials.is_empty() {
        return Err(invalid("partials", "at least one partition"));
    }
    for p in partials {
        check_len("partials.out", out.len(), p.out.len())?;
    }
    let max = partials.iter().map(|p| p.max_logit).fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f64> = partials
        .iter()
        .map(|p| f64::from(p.exp_sum) * (f64::from(p.max_logit) - f64::from(max)).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    for (d, o) in out.iter_mut().enumerate() {
        *o = (partials
            .iter()
            .zip(&weights)
            .map(|(p, w)| w * f64::from(p.out[d]))
            .sum::<f64>()
            / total) as f32;
    }
    Ok(())
}

/// Split-K attention of `q` over all `keys`/`values`, `partition_size` keys per partition.
pub fn split_k_attention(
    out: &mut [f32],
    q: &[f32],
    keys: &[&[f32]],
    values: &[&[f32]],
    scale: f32,
    partition_size: usize,
) -> Result<(), ShapeError> {
    if partition_size == 0 {
        return Err(invalid("partition_size", "must be > 0"));
    }
    check_len("values", keys.len(), values.len())?;
    let partials = keys
        .chunks(partition_size)
        .zip(values.chunks(partition_size))
        .map(|(k, v)| attend_partition(q, k, v, scale))
        .collect::<Result<Vec<_>, _>>()?;
    combine_partials(out, &partials)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Single-pass softmax(q·Kᵀ·scale)·V in f64.
    fn naive(q: &[f32], keys: &[Vec<f32>], values: &[Vec<f32>], scale: f32) -> Vec<f64> {
        let s: Vec<f64> = keys
            .iter()
            .map(|k| q.iter().zip(k).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum::<f64>() * f64::from(scale))
            .collect();
        let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
        let z: f64 = e.iter().sum();
        (0..q.len())
            .map(|d| e.iter().zip(values).map(|(p, v)| p * f64::from(v[d])).sum::<f64>() / z)
            .collect()
    }

    #[test]
    fn split_k_equals_single_pass_softmax() {
        let mut rng = rand::rngs::StdRng::from_os_rng();
        for (len, amp) in [(1, 1.0), (7, 1.0), (100, 1.0), (513, 1.0), (300, 40.0)] {
            let d = 64;
            let q: Vec<f32> = (0..d).map(|_| rng.random_range(-amp..amp)).collect();
            let keys: Vec<Vec<f32>> = (0..len)
                .map(|_| (0..d).map(|_| rng.random_range(-amp..amp)).collect())
                .collect();
            let values: Vec<Vec<f32>> = (0..len)
                .map(|_| (0..d).map(|_| rng.random_range(-1.0..1.0)).collect())
                .collect();
            let want = naive(&q, &keys, &values, 0.125);
            let (kr, vr): (Vec<&[f32]>, Vec<&[f32]>) = (
                keys.iter().map(Vec::as_slice).collect(),
                values.iter().map(Vec::as_slice).collect(),
            );
            for part in [1, 3, 16, 512, 1000] {
                let mut out = vec![f32::NAN; d];
                split_k_attention(&mut out, &q, &kr, &vr, 0.125, part).unwrap();
                for (g, w) in out.iter().zip(&want) {
                    assert!(
                        (f64::from(*g) - w).abs() < 1e-5,
                        "len {len} amp {amp} partition {part}: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn bad_arguments_are_named() {
        let mut out = [0.0; 2];
        assert!(matches!(
            split_k_attention(&mut out, &[0.0; 2], &[], &[], 1.0, 0),
            Err(ShapeError::Invalid {
                what: "partition_size",
                ..
            })
        ));
        assert!(matches!(
            combine_partials(&mut out, &[]),
            Err(ShapeError::Invalid { what: "partials", .. })
        ));
        let k: [&[f32]; 1] = [&[1.0, 2.0, 3.0]];
        assert!(matches!(
            attend_partition(&[0.0; 2], &k, &k, 1.0),
            Err(ShapeError::Length { what: "keys", .. })
        ));
    }
}

//! Masked mean pooling + L2 normalisation on the CPU, reference of `cuda/pooling.cu` (the
//! sentence-embedding head: all-MiniLM-L6-v2 pools with the attention mask, then normalises).
//!
//! `hidden` `[batch, seq_len, hidden_size]`, `mask` `[batch, seq_len]` (nonzero = real token),
//! `out` `[batch, hidden_size]`. A row with no real token pools to zeros. The norm is clamped at
//! 1e-12 like `torch.nn.functional.normalize`. Tested in-module: padding never changes the result.

use crate::error::{check_len, invalid, ShapeError};

/// Mean of the unmasked token rows of each sequence, L2-normalised when `normalize`.
pub fn mean_pool(
    out: &mut [f32],
    hidden: &[f32],
    mask: &[u32],
    seq_len: usize,
    hidden_size: usize,
    normalize: bool,
) -> Result<(), ShapeError> {
    if seq_len == 0 || hidden_size == 0 || !mask.len().is_multiple_of(seq_len) {
        return Err(invalid(
            "mask",
            format!("length {} is not a multiple of seq_len {seq_len}", mask.len()),
        ));
    }
    let batch = mask.len() / seq_len;
    check_len("hidden", batch * seq_len * hidden_size, hidden.len())?;
    check_len("out", batch * hidden_size, out.len())?;
    for b in 0..batch {
        let mut sum = vec![0.0f64; hidden_size];
        let mut count = 0usize;
        for t in (0..seq_len).filter(|&t| mask[b * seq_len + t] != 0) {
            count += 1;
            let row = &hidden[(b * seq_len + t) * hidden_size..(b * seq_len + t + 1) * hidden_size];
            for (s, &v) in sum.iter_mut().zip(row) {
                *s += f64::from(v);
            }
        }
        let inv_count = if count > 0 { 1.0 / count as f64 } else { 0.0 };
        let mean: Vec<f64> = sum.iter().map(|s| s * inv_count).collect();
        let scale = if normalize {
            1.0 / mean.iter().map(|m| m * m).sum::<f64>().sqrt().max(1e-12)
        } else {
            1.0
        };
        for (o, m) in out[b * hidden_size..(b + 1) * hidden_size].iter_mut().zip(&mean) {
            *o = (m * scale) as f32;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn padding_is_ignored_and_output_is_unit_length() {
        let mut rng = rand::rngs::StdRng::from_os_rng();
        let (h, real) = (8, 3);
        let hidden: Vec<f32> = (0..real * h).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut short = vec![f32::NAN; h];
        mean_pool(&mut short, &hidden, &[1; 3], real, h, true).unwrap();
        // Same tokens followed by 4 padding rows holding garbage (huge values): same vector.
        let mut padded = hidden.clone();
        padded.extend((0..4 * h).map(|_| 1e6));
        let mut long = vec![f32::NAN; h];
        mean_pool(&mut long, &padded, &[1, 1, 1, 0, 0, 0, 0], 7, h, true).unwrap();
        for (a, b) in short.iter().zip(&long) {
            assert!((a - b).abs() < 1e-6);
        }
        let norm: f32 = long.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
        // Unnormalised = plain mean.
        let mut mean = vec![f32::NAN; h];
        mean_pool(&mut mean, &padded, &[1, 1, 1, 0, 0, 0, 0], 7, h, false).unwrap();
        let want0 = (hidden[0] + hidden[h] + hidden[2 * h]) / 3.0;
        assert!((mean[0] - want0).abs() < 1e-6);
    }

    #[test]
    fn empty_mask_gives_zeros_and_bad_shapes_are_named() {
        let mut out = vec![f32::NAN; 2];
        mean_pool(&mut out, &[1.0, 2.0, 3.0, 4.0], &[0, 0], 2, 2, true).unwrap();
        assert_eq!(out, [0.0, 0.0]);
        assert!(matches!(
            mean_pool(&mut out, &[0.0; 3], &[1, 1], 2, 2, true),
            Err(ShapeError::Length { what: "hidden", .. })
        ));
        assert!(matches!(
            mean_pool(&mut out, &[0.0; 4], &[1, 1, 1], 2, 2, true),
            Err(ShapeError::Invalid { what: "mask", .. })
        ));
    }
}

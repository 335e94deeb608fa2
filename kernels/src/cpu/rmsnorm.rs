//! RMSNorm and fused residual-add + RMSNorm on the CPU (reference of `cuda/norm.cu`).
//!
//! Rows of `weight.len()` elements; `y = x / sqrt(mean(x²) + eps) * weight`, sums in f64 so the
//! reference is more exact than any kernel it checks. Tested in-module against the formula written
//! out element by element, and for the fused form against add-then-norm.

use crate::error::{check_len, invalid, ShapeError};

fn check_rows(what: &'static str, len: usize, hidden: usize) -> Result<(), ShapeError> {
    if hidden == 0 || !len.is_multiple_of(hidden) {
        return Err(invalid(
            what,
            format!("length {len} is not a multiple of hidden size {hidden}"),
        ));
    }
    Ok(())
}

fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ms = row.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / row.len() as f64;
    (1.0 / (ms + f64::from(eps)).sqrt()) as f32
}

/// `out[r] = rms_norm(x[r]) * weight` for every row `r` of `weight.len()` elements.
pub fn rms_norm(out: &mut [f32], x: &[f32], weight: &[f32], eps: f32) -> Result<(), ShapeError> {
    check_rows("x", x.len(), weight.len())?;
    check_len("out", x.len(), out.len())?;
    for (o, xr) in out.chunks_exact_mut(weight.len()).zip(x.chunks_exact(weight.len())) {
        let s = inv_rms(xr, eps);
        for ((o, &v), &w) in o.iter_mut().zip(xr).zip(weight) {
            *o = v * s * w;
        }
    }
    Ok(())
}

/// `residual += x; x = rms_norm(residual) * weight`, row by row (both updated in place).
pub fn fused_add_rms_norm(x: &mut [f32], residual: &mut [f32], weight: &[f32], eps: f32) -> Result<(), ShapeError> {
    check_rows("x", x.len(), weight.len())?;
    check_len("residual", x.len(), residual.len())?;
    for (xr, rr) in x
        .chunks_exact_mut(weight.len())
        .zip(residual.chunks_exact_mut(weight.len()))
    {
        for (r, &v) in rr.iter_mut().zip(xr.iter()) {
            *r += v;
        }
        let s = inv_rms(rr, eps);
        for ((o, &r), &w) in xr.iter_mut().zip(rr.iter()).zip(weight) {
            *o = r * s * w;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect()
    }

    #[test]
    fn matches_the_formula() {
        let mut rng = rand::rngs::StdRng::from_os_rng();
        for hidden in [1, 7, 64, 577] {
            let (x, w) = (random(&mut rng, 3 * hidden), random(&mut rng, hidden));
            let mut out = vec![f32::NAN; x.len()];
            rms_norm(&mut out, &x, &w, 1e-5).unwrap();
            for r in 0..3 {
                let row = &x[r * hidden..(r + 1) * hidden];
                let mut ss = 0.0f32;
                for v in row {
                    ss += v * v;
                }
                let denom = (ss / hidden as f32 + 1e-5).sqrt();
                for i in 0..hidden {
                    let want = row[i] / denom * w[i];
                    let got = out[r * hidden + i];
                    assert!(
                        (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "row {r} dim {i}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn fused_equals_add_then_norm() {
        let mut rng = rand::rngs::StdRng::from_os_rng();
        let hidden = 96;
        let (mut x, mut res, w) = (
            random(&mut rng, 5 * hidden),
            random(&mut rng, 5 * hidden),
            random(&mut rng, hidden),
        );
        let sum: Vec<f32> = x.iter().zip(&res).map(|(a, b)| a + b).collect();
        let mut want = vec![0.0; sum.len()];
        rms_norm(&mut want, &sum, &w, 1e-6).unwrap();
        fused_add_rms_norm(&mut x, &mut res, &w, 1e-6).unwrap();
        assert_eq!(res, sum);
        assert_eq!(x, want);
    }

    #[test]
    fn bad_shapes_are_named_errors() {
        let mut out = vec![0.0; 10];
        assert!(matches!(
            rms_norm(&mut out, &[0.0; 10], &[1.0; 4], 1e-5),
            Err(ShapeError::Invalid { what: "x", .. })
        ));
        assert!(matches!(
            rms_norm(&mut out, &[0.0; 8], &[1.0; 4], 1e-5),
            Err(ShapeError::Length { what: "out", .. })
        ));
        let mut r = vec![0.0; 4];
        assert!(matches!(
            fused_add_rms_norm(&mut [0.0; 8], &mut r, &[1.0; 4], 1e-5),
            Err(ShapeError::Length { what: "residual", .. })
        ));
    }
}

//! SiLU-and-mul (SwiGLU gate) on the CPU, reference of `cuda/activation.cu`.
//!
//! Input rows are `[gate | up]` of `2 * d` elements; `out = silu(gate) * up` with
//! `silu(g) = g / (1 + e^-g)`. Tested in-module against the formula and its limits.

use crate::error::{check_len, invalid, ShapeError};

/// `out[t, i] = silu(x[t, i]) * x[t, d + i]`; `x` is `[tokens, 2 * d]`, `out` `[tokens, d]`.
pub fn silu_and_mul(out: &mut [f32], x: &[f32], d: usize) -> Result<(), ShapeError> {
    if d == 0 || !x.len().is_multiple_of(2 * d) {
        return Err(invalid(
            "x",
            format!("length {} is not a multiple of 2*d = {}", x.len(), 2 * d),
        ));
    }
    check_len("out", x.len() / 2, out.len())?;
    for (o, row) in out.chunks_exact_mut(d).zip(x.chunks_exact(2 * d)) {
        let (gate, up) = row.split_at(d);
        for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
            *o = (f64::from(g) / (1.0 + (-f64::from(g)).exp()) * f64::from(u)) as f32;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_times_up() {
        // silu(0) = 0, silu(large) ≈ large, silu(-large) ≈ 0, silu(1) = 1/(1+1/e).
        let x = [0.0, 1.0, 30.0, -30.0, 5.0, 2.0, 0.5, 7.0];
        let mut out = [f32::NAN; 4];
        silu_and_mul(&mut out, &x, 4).unwrap();
        let silu1 = 1.0 / (1.0 + (-1.0f32).exp());
        assert_eq!(out[0], 0.0);
        assert!((out[1] - 2.0 * silu1).abs() < 1e-6);
        assert!((out[2] - 15.0).abs() < 1e-4);
        assert!(out[3].abs() < 1e-10 && out[3] <= 0.0);
    }

    #[test]
    fn rejects_odd_rows() {
        let mut out = [0.0; 2];
        assert!(matches!(
            silu_and_mul(&mut out, &[0.0; 6], 2),
            Err(ShapeError::Invalid { what: "x", .. })
        ));
        assert!(matches!(
            silu_and_mul(&mut out, &[0.0; 8], 2),
            Err(ShapeError::Length { what: "out", .. })
        ));
    }
}

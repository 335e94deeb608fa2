//! SiLU-and-mul (SwiGLU gate) on the CPU: [`silu_and_mul`], the f64 reference of
//! `cuda/activation.cu`, and [`silu_mul`], the fast f32 path the CPU backend runs, built on
//! [`exp_fast`] (also used by the attention softmax).
//!
//! Input rows are `[gate | up]` of `2 * d` elements; `out = silu(gate) * up` with
//! `silu(g) = g / (1 + e^-g)`. Tested in-module against the formula, its limits and f64 `exp`.

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

/// `e^x` within 2e-7 relative error for x in [-87, 88] (0 below, +inf above), with no branches or
/// calls so that loops over it vectorize (libm's `expf` is a scalar call per element): Cody–Waite
/// reduction `x = n·ln2 + r`, |r| ≤ ln2/2, a degree-7 Taylor polynomial for `e^r`, scaled by `2^n`.
/// `n` is rounded by adding 1.5·2^23, whose sum then holds `n + 2^22` in its low mantissa bits: `2^n`
/// is built from those with integer ops (a float-to-int `as` cast would not vectorize).
#[inline(always)]
pub fn exp_fast(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let xc = x.clamp(-87.0, 88.0);
    let t = xc * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0 / 5040.0;
    let p = p * r + 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    // n is in [-126, 127] after the clamp: rebias to the exponent n + 127.
    let scaled = p * f32::from_bits(t.to_bits().wrapping_sub(0x4B40_0000).wrapping_add(127) << 23);
    if x < -87.0 {
        0.0
    } else if x > 88.0 {
        f32::INFINITY
    } else {
        scaled
    }
}

/// `out[i] = silu(gate[i]) * up[i]` in f32 with [`exp_fast`]: the CPU backend's SwiGLU (the gate and
/// up halves come from separate matmul outputs, so no interleaved rows here).
pub fn silu_mul(out: &mut [f32], gate: &[f32], up: &[f32]) -> Result<(), ShapeError> {
    check_len("up", gate.len(), up.len())?;
    check_len("out", gate.len(), out.len())?;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        unsafe { silu_mul_avx2(out, gate, up) };
        return Ok(());
    }
    silu_mul_body(out, gate, up);
    Ok(())
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn silu_mul_avx2(out: &mut [f32], gate: &[f32], up: &[f32]) {
    silu_mul_body(out, gate, up)
}

#[inline(always)]
fn silu_mul_body(out: &mut [f32], gate: &[f32], up: &[f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + exp_fast(-g)) * u;
    }
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
    fn exp_fast_matches_f64_exp() {
        let mut worst = 0f64;
        for i in -870_000..=880_000 {
            let x = i as f32 * 1e-4;
            let want = f64::from(x).exp();
            worst = worst.max((f64::from(exp_fast(x)) - want).abs() / want);
        }
        assert!(worst < 2e-7, "worst relative error {worst}");
        assert_eq!(exp_fast(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_fast(-100.0), 0.0);
        assert_eq!(exp_fast(100.0), f32::INFINITY);
        assert_eq!(exp_fast(0.0), 1.0);
    }

    #[test]
    fn fast_silu_mul_matches_the_reference() {
        let d = 37;
        let x: Vec<f32> = (0..2 * d).map(|i| (i as f32 - 30.0) * 0.7).collect();
        let (mut want, mut got) = (vec![0f32; d], vec![0f32; d]);
        silu_and_mul(&mut want, &x, d).unwrap();
        silu_mul(&mut got, &x[..d], &x[d..]).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-6 * w.abs().max(1e-3), "{g} vs {w}");
        }
        assert!(silu_mul(&mut got, &x[..d], &x[..d - 1]).is_err());
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

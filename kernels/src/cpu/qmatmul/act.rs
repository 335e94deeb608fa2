//! Activation quantization: f32 rows → per-32 blocks of i8 quants with an
//! f32 scale `d`, the scaled block sum `s = d * Σq` (Q4 min terms) and
//! `c = -128 * Σq` (the exact integer correction of the Q8_0 kernels, whose
//! weights are stored `+128`).
//!
//! Owns the per-thread scratch buffers so that a call allocates nothing once
//! warm. Invariants: quants lie in [-127, 127] (so VNNI/maddubs never
//! saturate), `d = amax / 127` exactly as llama.cpp's `quantize_row_q8_0`
//! (kept in f32, not rounded to f16), rounding is to nearest-even on every
//! path, so the scalar and AVX-512 quantizers produce identical bytes (tested).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::pack::QK;

/// Quantized activations of a whole batch (scratch, reused across calls).
#[derive(Default)]
pub(crate) struct QActs {
    qs: Vec<u8>,
    d: Vec<f32>,
    s: Vec<f32>,
    c: Vec<i32>,
}

/// Borrowed view of quantized activations: row `b` owns `qs[b*cols..]`,
/// `d[b*nb..]`, `s[b*nb..]`, `c[b*nb..]`.
#[derive(Clone, Copy)]
pub(crate) struct Acts<'a> {
    pub qs: &'a [u8],
    pub d: &'a [f32],
    pub s: &'a [f32],
    pub c: &'a [i32],
    pub cols: usize,
    pub nb: usize,
}

impl QActs {
    /// Quantizes `batch` rows of `cols` (a multiple of 32) elements of `x`.
    pub(crate) fn quantize(&mut self, x: &[f32], cols: usize, avx512: bool) -> Acts<'_> {
        let nb = cols / QK;
        let blocks = x.len() / QK;
        self.qs.resize(x.len(), 0);
        self.d.resize(blocks, 0.0);
        self.s.resize(blocks, 0.0);
        self.c.resize(blocks, 0);
        #[cfg(target_arch = "x86_64")]
        if avx512 {
            // SAFETY: the caller checked AVX-512F; all slices hold `blocks` blocks.
            unsafe { quantize_avx512(x, &mut self.qs, &mut self.d, &mut self.s, &mut self.c) };
            return self.view(cols, nb);
        }
        let _ = avx512;
        for (j, (xb, qb)) in x.chunks_exact(QK).zip(self.qs.chunks_exact_mut(QK)).enumerate() {
            let (d, sum) = quantize_block(xb, qb);
            (self.d[j], self.s[j], self.c[j]) = (d, d * sum as f32, -128 * sum);
        }
        self.view(cols, nb)
    }

    fn view(&self, cols: usize, nb: usize) -> Acts<'_> {
        Acts {
            qs: &self.qs,
            d: &self.d,
            s: &self.s,
            c: &self.c,
            cols,
            nb,
        }
    }
}

/// Portable quantizer for one block; returns `(d, Σq)`.
fn quantize_block(x: &[f32], q: &mut [u8]) -> (f32, i32) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (o, &v) in q.iter_mut().zip(x) {
        let qi = (v * id).round_ties_even().clamp(-127.0, 127.0) as i32;
        sum += qi;
        *o = qi as i8 as u8;
    }
    (d, sum)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn quantize_avx512(x: &[f32], qs: &mut [u8], d: &mut [f32], s: &mut [f32], c: &mut [i32]) {
    let (lo, hi) = (_mm512_set1_epi32(-127), _mm512_set1_epi32(127));
    for j in 0..d.len() {
        let p = x.as_ptr().add(j * QK);
        let (v0, v1) = (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)));
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        let dj = amax / 127.0;
        let id = _mm512_set1_ps(if dj != 0.0 { 1.0 / dj } else { 0.0 });
        // cvtps rounds to nearest-even (default MXCSR), like `round_ties_even`.
        let q0 = _mm512_max_epi32(_mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v0, id)), hi), lo);
        let q1 = _mm512_max_epi32(_mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v1, id)), hi), lo);
        let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        let out = qs.as_mut_ptr().add(j * QK);
        _mm_storeu_si128(out.cast(), _mm512_cvtepi32_epi8(q0));
        _mm_storeu_si128(out.add(16).cast(), _mm512_cvtepi32_epi8(q1));
        d[j] = dj;
        s[j] = dj * sum as f32;
        c[j] = -128 * sum;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalar_block_matches_llama_cpp_rule() {
        let x: Vec<f32> = (0..32).map(|i| (i as f32 - 15.5) * 0.37).collect();
        let mut q = [0u8; 32];
        let (d, sum) = quantize_block(&x, &mut q);
        assert_eq!(d, 15.5 * 0.37 / 127.0);
        assert_eq!(q[0] as i8, -127);
        assert_eq!(q[31] as i8, 127);
        assert_eq!(sum, q.iter().map(|&v| i32::from(v as i8)).sum::<i32>());
        for (v, &qi) in x.iter().zip(&q) {
            assert!((v - d * f32::from(qi as i8)).abs() <= d * 0.5 * 1.0001);
        }
    }

    #[test]
    fn zero_block_has_zero_scale() {
        let mut q = [1u8; 32];
        assert_eq!(quantize_block(&[0.0; 32], &mut q), (0.0, 0));
        assert!(q.iter().all(|&v| v == 0));
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_quantizer_is_bit_identical_to_scalar() {
        if !is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: no AVX-512F on this CPU");
            return;
        }
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let x: Vec<f32> = (0..32 * 97)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let v = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                // Some all-zero blocks and exact .5 ties.
                if i / 32 == 5 {
                    0.0
                } else if i % 7 == 0 {
                    (i % 13) as f32 + 0.5
                } else {
                    v * (1 + i % 5) as f32
                }
            })
            .collect();
        let (mut a, mut b) = (QActs::default(), QActs::default());
        let sa = a.quantize(&x, 32 * 97, false);
        let sb = b.quantize(&x, 32 * 97, true);
        assert_eq!(sa.qs, sb.qs);
        assert_eq!(sa.d, sb.d);
        assert_eq!(sa.s, sb.s);
        assert_eq!(sa.c, sb.c);
    }
}

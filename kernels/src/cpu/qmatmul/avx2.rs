//! AVX2 kernels for CPUs without AVX-512 VNNI: the same row-interleaved
//! scheme as the AVX-512 kernel, on half groups of 8 rows per 256-bit
//! register, with `vpmaddubsw` (u8×i8 → i16 pairs) + `vpmaddwd` instead of
//! `vpdpbusd`.
//!
//! No i16 saturation: Q4 pairs are ≤ 2·15·127 = 3810, and the 8 pair sums of
//! a block (≤ 30480) are added in i16 before widening; Q8_0 (stored `q+128`)
//! flips back to signed and uses the `|w| · sign(x, w)` trick (pairs
//! ≤ 2·128·127 = 32512), widening every chunk.

use std::arch::x86_64::*;

use super::pack::{Quant, GROUP};
use super::Job;

/// Batch rows per register tile (16 ymm registers: 8 hold the weights).
const NB_MAX: usize = 4;
/// Rows per 256-bit register.
const HALF: usize = GROUP / 2;

/// Computes output rows of groups `g0..g1` for the whole batch.
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C, and `job` is validated (see `Job`).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn run_groups(job: &Job<'_>, g0: usize, g1: usize) {
    for g in g0..g1 {
        for h in 0..(job.rows - g * GROUP).min(GROUP).div_ceil(HALF) {
            let mut b = 0;
            while b < job.batch {
                let n = (job.batch - b).min(NB_MAX);
                macro_rules! tiles {
                    ($f:ident $(, $c:literal)?) => {
                        match n {
                            1 => $f::<1 $(, $c)?>(job, g, h, b),
                            2 => $f::<2 $(, $c)?>(job, g, h, b),
                            3 => $f::<3 $(, $c)?>(job, g, h, b),
                            _ => $f::<NB_MAX $(, $c)?>(job, g, h, b),
                        }
                    };
                }
                match job.quant {
                    Quant::Q4_0 => tiles!(q4_tile, false),
                    Quant::Q4_1 => tiles!(q4_tile, true),
                    Quant::Q8_0 => tiles!(q8_tile),
                }
                b += n;
            }
        }
    }
}

/// Broadcasts the 4 activation bytes at `p` to all 8 lanes.
macro_rules! bx {
    ($p:expr) => {
        _mm256_set1_epi32(($p as *const i32).read_unaligned())
    };
}

/// Writes the 8 lanes of `acc` to rows `g*16 + h*8..` of batch row `b`.
#[target_feature(enable = "avx2")]
unsafe fn store(job: &Job<'_>, g: usize, h: usize, b: usize, acc: __m256) {
    let r0 = g * GROUP + h * HALF;
    let valid = (job.rows - r0).min(HALF);
    let p = job.out.at(b * job.rows + r0);
    if valid == HALF {
        _mm256_storeu_ps(p, acc);
    } else {
        let mut tmp = [0f32; HALF];
        _mm256_storeu_ps(tmp.as_mut_ptr(), acc);
        std::ptr::copy_nonoverlapping(tmp.as_ptr(), p, valid);
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_tile<const NB: usize, const HAS_M: bool>(job: &Job<'_>, g: usize, h: usize, b0: usize) {
    let lay = job.lay;
    let acts = &job.acts;
    let group = job.packed.as_ptr().add(g * lay.stride);
    let xq: [*const u8; NB] = std::array::from_fn(|t| acts.qs.as_ptr().add((b0 + t) * acts.cols));
    let xd: [*const f32; NB] = std::array::from_fn(|t| acts.d.as_ptr().add((b0 + t) * acts.nb));
    let xs: [*const f32; NB] = std::array::from_fn(|t| acts.s.as_ptr().add((b0 + t) * acts.nb));
    let nib = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); NB];
    for j in 0..lay.nb {
        let q = group.add(j * lay.qs_block + h * 32);
        let (c0, c1, c2, c3) = (
            _mm256_load_si256(q.cast()),
            _mm256_load_si256(q.add(64).cast()),
            _mm256_load_si256(q.add(128).cast()),
            _mm256_load_si256(q.add(192).cast()),
        );
        let lo = [
            _mm256_and_si256(c0, nib),
            _mm256_and_si256(c1, nib),
            _mm256_and_si256(c2, nib),
            _mm256_and_si256(c3, nib),
        ];
        let hi = [
            _mm256_and_si256(_mm256_srli_epi16::<4>(c0), nib),
            _mm256_and_si256(_mm256_srli_epi16::<4>(c1), nib),
            _mm256_and_si256(_mm256_srli_epi16::<4>(c2), nib),
            _mm256_and_si256(_mm256_srli_epi16::<4>(c3), nib),
        ];
        let dv = _mm256_cvtph_ps(_mm_load_si128(group.add(lay.d_off + j * 32 + h * 16).cast()));
        let mv = if HAS_M {
            _mm256_cvtph_ps(_mm_load_si128(group.add(lay.aux_off + j * 32 + h * 16).cast()))
        } else {
            _mm256_mul_ps(dv, _mm256_set1_ps(-8.0))
        };
        for t in 0..NB {
            let x = xq[t].add(j * 32);
            let mut p = _mm256_maddubs_epi16(lo[0], bx!(x));
            p = _mm256_add_epi16(p, _mm256_maddubs_epi16(lo[1], bx!(x.add(4))));
            p = _mm256_add_epi16(p, _mm256_maddubs_epi16(lo[2], bx!(x.add(8))));
            p = _mm256_add_epi16(p, _mm256_maddubs_epi16(lo[3], bx!(x.add(12))));
            p = _mm256_add_epi16(p, _mm256_maddubs_epi16(hi[0], bx!(x.add(16))));
            p = _mm256_add_epi16(p, _mm256_maddubs_epi16(hi[1], bx!(x.add(20))));
            p = _mm256_add_epi16(p, _mm256_maddubs_epi16(hi[2], bx!(x.add(24))));
            p = _mm256_add_epi16(p, _mm256_maddubs_epi16(hi[3], bx!(x.add(28))));
            let isum = _mm256_madd_epi16(p, ones);
            let scale = _mm256_mul_ps(dv, _mm256_set1_ps(*xd[t].add(j)));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, acc[t]);
            acc[t] = _mm256_fmadd_ps(mv, _mm256_set1_ps(*xs[t].add(j)), acc[t]);
        }
    }
    for (t, a) in acc.into_iter().enumerate() {
        store(job, g, h, b0 + t, a);
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_tile<const NB: usize>(job: &Job<'_>, g: usize, h: usize, b0: usize) {
    let lay = job.lay;
    let acts = &job.acts;
    let group = job.packed.as_ptr().add(g * lay.stride);
    let xq: [*const u8; NB] = std::array::from_fn(|t| acts.qs.as_ptr().add((b0 + t) * acts.cols));
    let xd: [*const f32; NB] = std::array::from_fn(|t| acts.d.as_ptr().add((b0 + t) * acts.nb));
    let ones = _mm256_set1_epi16(1);
    let flip = _mm256_set1_epi8(i8::MIN);
    let mut acc = [_mm256_setzero_ps(); NB];
    for j in 0..lay.nb {
        let q = group.add(j * lay.qs_block + h * 32);
        let dv = _mm256_cvtph_ps(_mm_load_si128(group.add(lay.d_off + j * 32 + h * 16).cast()));
        let mut isum = [_mm256_setzero_si256(); NB];
        for c in 0..8 {
            let w = _mm256_xor_si256(_mm256_load_si256(q.add(c * 64).cast()), flip);
            let aw = _mm256_abs_epi8(w);
            for t in 0..NB {
                let sx = _mm256_sign_epi8(bx!(xq[t].add(j * 32 + c * 4)), w);
                isum[t] = _mm256_add_epi32(isum[t], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), ones));
            }
        }
        for t in 0..NB {
            let scale = _mm256_mul_ps(dv, _mm256_set1_ps(*xd[t].add(j)));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), scale, acc[t]);
        }
    }
    for (t, a) in acc.into_iter().enumerate() {
        store(job, g, h, b0 + t, a);
    }
}

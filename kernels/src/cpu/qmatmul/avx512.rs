//! AVX-512 VNNI kernels: one 512-bit register holds the 16 rows of a group,
//! so each `vpdpbusd` multiplies 4 consecutive weights of 16 rows by the same
//! 4 activation bytes (broadcast) and no horizontal reduction is ever needed.
//!
//! Per block and group the weights are loaded and unpacked once into
//! registers and reused for a tile of up to [`NB_MAX`] batch rows.
//! Weights are the unsigned operand (Q4 nibbles 0..15, Q8_0 stored `q+128`),
//! activations the signed one. The Q4_1 min (and the Q4_0 `-8` offset) is
//! added as `m * s`; the Q8_0 accumulator starts at `-128 * Σq_x` (exact).

use std::arch::x86_64::*;

use super::pack::GROUP;
use super::Job;

/// Batch rows per register tile (weights of a block stay in 8 registers). At 8
/// rows the accumulators spill to the stack (measured: ~20-30 % slower at
/// batch 64).
const NB_MAX: usize = 4;

/// Computes output rows of groups `g0..g1` for the whole batch.
///
/// # Safety
/// The CPU supports AVX-512F/BW/VNNI and `job` is validated (see `Job`).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(crate) unsafe fn run_groups(job: &Job<'_>, g0: usize, g1: usize) {
    use super::pack::Quant;
    for g in g0..g1 {
        let mut b = 0;
        while b < job.batch {
            let n = (job.batch - b).min(NB_MAX);
            macro_rules! tiles {
                ($f:ident $(, $c:literal)?) => {
                    match n {
                        1 => $f::<1 $(, $c)?>(job, g, b),
                        2 => $f::<2 $(, $c)?>(job, g, b),
                        3 => $f::<3 $(, $c)?>(job, g, b),
                        _ => $f::<NB_MAX $(, $c)?>(job, g, b),
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

/// Broadcasts the 4 activation bytes at `p` to all 16 lanes.
macro_rules! bx {
    ($p:expr) => {
        _mm512_set1_epi32(($p as *const i32).read_unaligned())
    };
}

/// Writes the 16 lanes of `acc` to rows `g*16..` of batch row `b` (masked at the matrix end).
#[target_feature(enable = "avx512f")]
unsafe fn store(job: &Job<'_>, g: usize, b: usize, acc: __m512) {
    let valid = (job.rows - g * GROUP).min(GROUP);
    let p = job.out.at(b * job.rows + g * GROUP);
    if valid == GROUP {
        _mm512_storeu_ps(p, acc);
    } else {
        _mm512_mask_storeu_ps(p, ((1u32 << valid) - 1) as u16, acc);
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn q4_tile<const NB: usize, const HAS_M: bool>(job: &Job<'_>, g: usize, b0: usize) {
    let lay = job.lay;
    let acts = &job.acts;
    let group = job.packed.as_ptr().add(g * lay.stride);
    let xq: [*const u8; NB] = std::array::from_fn(|t| acts.qs.as_ptr().add((b0 + t) * acts.cols));
    let xd: [*const f32; NB] = std::array::from_fn(|t| acts.d.as_ptr().add((b0 + t) * acts.nb));
    let xs: [*const f32; NB] = std::array::from_fn(|t| acts.s.as_ptr().add((b0 + t) * acts.nb));
    let nib = _mm512_set1_epi8(0x0F);
    let zero = _mm512_setzero_si512();
    let mut acc = [_mm512_setzero_ps(); NB];
    for j in 0..lay.nb {
        let q = group.add(j * lay.qs_block).cast::<__m512i>();
        // No closures here: they would not inherit the target features.
        let (c0, c1, c2, c3) = (
            _mm512_load_si512(q),
            _mm512_load_si512(q.add(1)),
            _mm512_load_si512(q.add(2)),
            _mm512_load_si512(q.add(3)),
        );
        let lo = [
            _mm512_and_si512(c0, nib),
            _mm512_and_si512(c1, nib),
            _mm512_and_si512(c2, nib),
            _mm512_and_si512(c3, nib),
        ];
        let hi = [
            _mm512_and_si512(_mm512_srli_epi16::<4>(c0), nib),
            _mm512_and_si512(_mm512_srli_epi16::<4>(c1), nib),
            _mm512_and_si512(_mm512_srli_epi16::<4>(c2), nib),
            _mm512_and_si512(_mm512_srli_epi16::<4>(c3), nib),
        ];
        let dv = _mm512_cvtph_ps(_mm256_load_si256(group.add(lay.d_off + j * 32).cast()));
        let mv = if HAS_M {
            _mm512_cvtph_ps(_mm256_load_si256(group.add(lay.aux_off + j * 32).cast()))
        } else {
            _mm512_mul_ps(dv, _mm512_set1_ps(-8.0))
        };
        for t in 0..NB {
            let x = xq[t].add(j * 32);
            let mut s0 = _mm512_dpbusd_epi32(zero, lo[0], bx!(x));
            let mut s1 = _mm512_dpbusd_epi32(zero, hi[0], bx!(x.add(16)));
            s0 = _mm512_dpbusd_epi32(s0, lo[1], bx!(x.add(4)));
            s1 = _mm512_dpbusd_epi32(s1, hi[1], bx!(x.add(20)));
            s0 = _mm512_dpbusd_epi32(s0, lo[2], bx!(x.add(8)));
            s1 = _mm512_dpbusd_epi32(s1, hi[2], bx!(x.add(24)));
            s0 = _mm512_dpbusd_epi32(s0, lo[3], bx!(x.add(12)));
            s1 = _mm512_dpbusd_epi32(s1, hi[3], bx!(x.add(28)));
            let scale = _mm512_mul_ps(dv, _mm512_set1_ps(*xd[t].add(j)));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), scale, acc[t]);
            acc[t] = _mm512_fmadd_ps(mv, _mm512_set1_ps(*xs[t].add(j)), acc[t]);
        }
    }
    for (t, a) in acc.into_iter().enumerate() {
        store(job, g, b0 + t, a);
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn q8_tile<const NB: usize>(job: &Job<'_>, g: usize, b0: usize) {
    let lay = job.lay;
    let acts = &job.acts;
    let group = job.packed.as_ptr().add(g * lay.stride);
    let xq: [*const u8; NB] = std::array::from_fn(|t| acts.qs.as_ptr().add((b0 + t) * acts.cols));
    let xd: [*const f32; NB] = std::array::from_fn(|t| acts.d.as_ptr().add((b0 + t) * acts.nb));
    let xc: [*const i32; NB] = std::array::from_fn(|t| acts.c.as_ptr().add((b0 + t) * acts.nb));
    let zero = _mm512_setzero_si512();
    let mut acc = [_mm512_setzero_ps(); NB];
    for j in 0..lay.nb {
        let q = group.add(j * lay.qs_block).cast::<__m512i>();
        let w = [
            _mm512_load_si512(q),
            _mm512_load_si512(q.add(1)),
            _mm512_load_si512(q.add(2)),
            _mm512_load_si512(q.add(3)),
            _mm512_load_si512(q.add(4)),
            _mm512_load_si512(q.add(5)),
            _mm512_load_si512(q.add(6)),
            _mm512_load_si512(q.add(7)),
        ];
        let dv = _mm512_cvtph_ps(_mm256_load_si256(group.add(lay.d_off + j * 32).cast()));
        for t in 0..NB {
            let x = xq[t].add(j * 32);
            // Σ (w+128)·x = Σ w·x + 128·Σx: start from -128·Σx.
            let mut s0 = _mm512_dpbusd_epi32(_mm512_set1_epi32(*xc[t].add(j)), w[0], bx!(x));
            let mut s1 = _mm512_dpbusd_epi32(zero, w[4], bx!(x.add(16)));
            s0 = _mm512_dpbusd_epi32(s0, w[1], bx!(x.add(4)));
            s1 = _mm512_dpbusd_epi32(s1, w[5], bx!(x.add(20)));
            s0 = _mm512_dpbusd_epi32(s0, w[2], bx!(x.add(8)));
            s1 = _mm512_dpbusd_epi32(s1, w[6], bx!(x.add(24)));
            s0 = _mm512_dpbusd_epi32(s0, w[3], bx!(x.add(12)));
            s1 = _mm512_dpbusd_epi32(s1, w[7], bx!(x.add(28)));
            let scale = _mm512_mul_ps(dv, _mm512_set1_ps(*xd[t].add(j)));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), scale, acc[t]);
        }
    }
    for (t, a) in acc.into_iter().enumerate() {
        store(job, g, b0 + t, a);
    }
}

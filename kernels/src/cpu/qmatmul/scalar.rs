//! Portable kernel over the packed layout: the fallback on CPUs without
//! AVX2, and the integer-exact twin of the SIMD kernels (same per-block i32
//! dot products, same scale/min arithmetic), so the SIMD paths are tested
//! against it with a tight tolerance.

use half::f16;

use super::pack::{Quant, GROUP, QK};
use super::Job;

/// Computes output rows of groups `g0..g1` for the whole batch.
pub(crate) fn run_groups(job: &Job<'_>, g0: usize, g1: usize) {
    let lay = job.lay;
    let acts = &job.acts;
    for g in g0..g1 {
        let group = &job.packed[g * lay.stride..][..lay.stride];
        let half_at = |off: usize| f16::from_le_bytes([group[off], group[off + 1]]).to_f32();
        for rr in 0..(job.rows - g * GROUP).min(GROUP) {
            for b in 0..job.batch {
                let xq = &acts.qs[b * acts.cols..][..acts.cols];
                let mut acc = 0f32;
                for j in 0..lay.nb {
                    let slot = (j * GROUP + rr) * 2;
                    let d = half_at(lay.d_off + slot);
                    let quants = &group[j * lay.qs_block..][..lay.qs_block];
                    let x = &xq[j * QK..][..QK];
                    let mut isum = 0i32;
                    for c in 0..lay.qs_block / 64 {
                        for i in 0..4 {
                            let q = quants[c * 64 + rr * 4 + i];
                            let e = 4 * c + i;
                            isum += match job.quant {
                                Quant::Q4_0 | Quant::Q4_1 => {
                                    i32::from(q & 0x0F) * i32::from(x[e] as i8)
                                        + i32::from(q >> 4) * i32::from(x[e + 16] as i8)
                                }
                                Quant::Q8_0 => i32::from((q ^ 0x80) as i8) * i32::from(x[e] as i8),
                            };
                        }
                    }
                    let bi = b * lay.nb + j;
                    acc += isum as f32 * (d * acts.d[bi]);
                    match job.quant {
                        Quant::Q4_0 => acc += -8.0 * d * acts.s[bi],
                        Quant::Q4_1 => acc += half_at(lay.aux_off + slot) * acts.s[bi],
                        Quant::Q8_0 => {}
                    }
                }
                // SAFETY: (b, g*16+rr) is inside `out` and owned by this group's task.
                unsafe { job.out.write(b * job.rows + g * GROUP + rr, acc) };
            }
        }
    }
}

//! Weight repacking: GGUF row-major blocks → row-interleaved groups.
//!
//! Owns the packed layout every kernel reads (see the module doc of
//! `qmatmul` for the picture) and its inverse (`dequantize_row`).
//! Invariants: a group always holds [`GROUP`] rows (rows past the end of the
//! matrix are zero: zero scales, zero quants), every group starts on a 64-byte
//! boundary, and the layout is a pure function of (qtype, rows, cols).
//! Tested through `dequantize_row` against candle's dequantization of the
//! same raw bytes (bit-exact) and through every kernel test.

use half::f16;

use super::QType;

/// The block-quantized subset of [`QType`]: the formats that get packed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Quant {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl Quant {
    pub(crate) fn of(qtype: QType) -> Option<Self> {
        match qtype {
            QType::Q4_0 => Some(Self::Q4_0),
            QType::Q4_1 => Some(Self::Q4_1),
            QType::Q8_0 => Some(Self::Q8_0),
            QType::F32 => None,
        }
    }

    pub(crate) fn qtype(self) -> QType {
        match self {
            Self::Q4_0 => QType::Q4_0,
            Self::Q4_1 => QType::Q4_1,
            Self::Q8_0 => QType::Q8_0,
        }
    }
}

/// Rows per interleaved group: one 512-bit register of i32/f32 lanes.
pub(crate) const GROUP: usize = 16;
/// Elements per quantization block (all supported block formats).
pub(crate) const QK: usize = 32;

/// Byte geometry of one packed group for a matrix with `nb` blocks per row.
///
/// A group is `[quants: nb × qs_block][scales d: nb × 16 × f16][mins m: nb × 16 × f16]`:
/// - quants of block `j` are `qs_block / 64` chunks of 64 bytes; in chunk `c`
///   row `rr` owns bytes `rr*4 .. rr*4+4`, which are bytes `4c .. 4c+4` of that
///   row's ggml `qs` array (Q4: low nibbles = elements `4c..4c+4`, high nibbles =
///   elements `16+4c..16+4c+4`; Q8_0: elements `4c..4c+4`, stored `q + 128` as
///   unsigned bytes so that they can be the unsigned operand of `vpdpbusd`);
/// - only Q4_1 has the `m` table (`aux_off`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Layout {
    pub nb: usize,
    pub qs_block: usize,
    pub d_off: usize,
    pub aux_off: usize,
    pub stride: usize,
    pub groups: usize,
}

impl Layout {
    pub(crate) fn new(quant: Quant, rows: usize, cols: usize) -> Self {
        let nb = cols / QK;
        let (qs_block, has_aux) = match quant {
            Quant::Q4_0 => (GROUP * 16, false),
            Quant::Q4_1 => (GROUP * 16, true),
            Quant::Q8_0 => (GROUP * 32, false),
        };
        let d_off = nb * qs_block;
        let aux_off = d_off + nb * GROUP * 2;
        let end = if has_aux { aux_off + nb * GROUP * 2 } else { aux_off };
        Self {
            nb,
            qs_block,
            d_off,
            aux_off,
            stride: end.div_ceil(64) * 64,
            groups: rows.div_ceil(GROUP),
        }
    }
}

/// 64-byte aligned storage unit, so that every group starts on a cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Line([u8; 64]);

/// A zero-initialised, 64-byte aligned byte buffer.
pub(crate) struct AlignedBytes {
    lines: Vec<Line>,
}

impl AlignedBytes {
    fn zeroed(len: usize) -> Self {
        Self {
            lines: vec![Line([0; 64]); len.div_ceil(64)],
        }
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: `Line` is 64 plain bytes with no padding; the Vec owns `len * 64` initialised bytes.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<u8>(), self.lines.len() * 64) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, with unique access through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<u8>(), self.lines.len() * 64) }
    }
}

/// Bytes of one ggml block of `qtype` (F32: one element).
pub(crate) fn type_size(qtype: QType) -> usize {
    match qtype {
        QType::Q4_0 => 18,
        QType::Q4_1 => 20,
        QType::Q8_0 => 34,
        QType::F32 => 4,
    }
}

/// Repacks validated raw ggml blocks (`rows * cols / 32` blocks, row-major).
pub(crate) fn pack(quant: Quant, lay: &Layout, rows: usize, data: &[u8]) -> AlignedBytes {
    let ts = type_size(quant.qtype());
    let mut buf = AlignedBytes::zeroed(lay.groups * lay.stride);
    let dst = buf.as_mut_slice();
    for r in 0..rows {
        let group = &mut dst[(r / GROUP) * lay.stride..][..lay.stride];
        let rr = r % GROUP;
        for j in 0..lay.nb {
            let blk = &data[(r * lay.nb + j) * ts..][..ts];
            let slot = (j * GROUP + rr) * 2;
            group[lay.d_off + slot..][..2].copy_from_slice(&blk[0..2]);
            let qs = match quant {
                Quant::Q4_0 => &blk[2..18],
                Quant::Q4_1 => {
                    group[lay.aux_off + slot..][..2].copy_from_slice(&blk[2..4]);
                    &blk[4..20]
                }
                Quant::Q8_0 => &blk[2..34],
            };
            // Flipping the top bit maps i8 q to the u8 q + 128 (and back).
            let flip = if quant == Quant::Q8_0 { 0x80 } else { 0 };
            let quants = &mut group[j * lay.qs_block..][..lay.qs_block];
            for (c, four) in qs.chunks_exact(4).enumerate() {
                for (dst, &q) in quants[c * 64 + rr * 4..][..4].iter_mut().zip(four) {
                    *dst = q ^ flip;
                }
            }
        }
    }
    buf
}

/// Dequantizes packed row `r` into `out` (`cols` elements), with the same
/// arithmetic as ggml/candle (`q * d + m`, `(q - 8) * d`, `q * d`).
pub(crate) fn dequantize_row(quant: Quant, lay: &Layout, packed: &[u8], r: usize, out: &mut [f32]) {
    let group = &packed[(r / GROUP) * lay.stride..][..lay.stride];
    let rr = r % GROUP;
    let half_at = |off: usize| f16::from_le_bytes([group[off], group[off + 1]]).to_f32();
    for j in 0..lay.nb {
        let slot = (j * GROUP + rr) * 2;
        let d = half_at(lay.d_off + slot);
        let quants = &group[j * lay.qs_block..][..lay.qs_block];
        let y = &mut out[j * QK..][..QK];
        for c in 0..lay.qs_block / 64 {
            for i in 0..4 {
                let q = quants[c * 64 + rr * 4 + i];
                let e = 4 * c + i;
                match quant {
                    Quant::Q4_0 => {
                        y[e] = (i16::from(q & 0x0F) - 8) as f32 * d;
                        y[e + 16] = (i16::from(q >> 4) - 8) as f32 * d;
                    }
                    Quant::Q4_1 => {
                        let m = half_at(lay.aux_off + slot);
                        y[e] = f32::from(q & 0x0F) * d + m;
                        y[e + 16] = f32::from(q >> 4) * d + m;
                    }
                    Quant::Q8_0 => y[e] = f32::from((q ^ 0x80) as i8) * d,
                }
            }
        }
    }
}

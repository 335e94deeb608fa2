//! Quantized matrix multiplication `out = x · Wᵀ` for GGUF weights on the CPU.
//!
//! # Formats
//! Weights arrive as raw ggml blocks, row-major (`rows` = out features, each
//! row = `cols / 32` blocks): Q4_0 `{f16 d; u8 qs[16]}` → `(q - 8)·d`,
//! Q4_1 `{f16 d; f16 m; u8 qs[16]}` → `q·d + m`, Q8_0 `{f16 d; i8 qs[32]}` →
//! `q·d`; in Q4 blocks the low nibbles are elements 0..15 and the high nibbles
//! 16..31. F32 (little-endian) is accepted too and multiplied in f32.
//! [`QMatrix::new`] repacks the blocks once into groups of 16 rows whose
//! quants are interleaved 4 bytes per row (see `pack::Layout`), scales and
//! mins in separate per-block tables: a kernel then loads 64 bytes holding
//! the same 4 columns of 16 rows (Q8_0 quants stored `+128`, unsigned). Same
//! size as the GGUF bytes; the raw bytes are not kept.
//!
//! # Algorithm (llama.cpp's, with a batch-reusing tile)
//! 1. Each activation row is quantized once per call to Q8 blocks: per 32
//!    values `d = amax/127`, `q = round(x/d)` ∈ [-127, 127] and `s = d·Σq`.
//! 2. Per block, integer dot products of the unsigned weight quants (Q4
//!    nibbles, Q8_0 `q+128`) × the signed activation quants (Q8_0 corrected
//!    exactly in i32 by `-128·Σq_x`), then `acc += dot·(d_w·d_x)`
//!    (+ `m_w·s_x` for Q4_1, `-8·d_w·s_x` for Q4_0).
//!    AVX-512 VNNI: `vpdpbusd` on 16 rows × 4 bytes with the activation bytes
//!    broadcast (no horizontal sums); AVX2: `vpmaddubsw` + `vpmaddwd` on 8
//!    rows; a portable scalar kernel otherwise. Chosen at run time
//!    ([`Isa::detect`]); [`qmatmul_with_isa`] forces one (tests use it).
//! 3. The weights of one block of a group are unpacked into registers once
//!    and used against a tile of up to 4 batch rows; the group's
//!    weights (≤ 16 KiB for 1536 columns) stay in L1 across the batch tiles.
//!
//! # Error bound
//! The only approximation is step 1: `|x - d·q| ≤ d/2`, so for every output
//! `|out - exact| ≤ Σ_blocks (amax_block(x) / 254) · Σ_block |w|` plus f32
//! rounding (~1e-6 relative); the weights are used exactly. This is the same
//! error llama.cpp has (it also rounds `d` to f16; we keep it in f32). The
//! tests assert this bound against [`qmatmul_reference`] (f64 dot products of
//! the dequantized weights), and that every SIMD path matches the scalar
//! kernel within f32 rounding. On real SmolLM2 tensors with non-grid
//! activations the relative L2 error is ~4e-3 (Q4_1) to ~6e-3 (Q8_0).
//!
//! # Threading
//! Output rows are split into contiguous ranges of groups, claimed
//! dynamically by `threads` participants: the caller plus persistent workers
//! of a process-wide pool (`pool`). Workers spin ~200 µs after a job, then
//! park; the caller never waits for a worker to wake. Every output element
//! is computed by exactly one task with the same code, so results are
//! bit-identical for any `threads`. Small products run on the caller alone.
//! Under oversubscription (other busy processes on the cores) a worker
//! descheduled mid-task delays the caller by a scheduler slice, as with any
//! fork-join pool: pass `threads` ≤ the cores really free.
//!
//! # Tests
//! `tests.rs`: dequantization bit-exact against candle, randomized products
//! for every qtype/ISA/shape/batch against the reference and the bound,
//! thread-count invariance, argument validation, the real SmolLM2 tensors.

mod act;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod pack;
mod scalar;
#[cfg(test)]
mod tests;

use std::cell::RefCell;

use super::pool::{self, OutPtr};

use act::{Acts, QActs};
use pack::{AlignedBytes, Layout, Quant, QK};

/// Weight storage formats (ggml type names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QType {
    Q4_0,
    Q4_1,
    Q8_0,
    F32,
}

impl QType {
    /// Elements per block (the granularity of `cols`).
    pub fn block_size(self) -> usize {
        match self {
            QType::F32 => 1,
            _ => QK,
        }
    }

    /// Bytes per block in the GGUF encoding.
    pub fn type_size(self) -> usize {
        pack::type_size(self)
    }
}

/// Instruction set a kernel runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable Rust, any CPU.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// x86-64 AVX-512 F/BW + VNNI.
    Avx512Vnni,
}

impl Isa {
    /// The best instruction set this CPU supports.
    pub fn detect() -> Isa {
        [Isa::Avx512Vnni, Isa::Avx2]
            .into_iter()
            .find(|isa| isa.is_available())
            .unwrap_or(Isa::Scalar)
    }

    /// Whether this CPU can run kernels for `self`.
    pub fn is_available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Isa::Scalar => true,
                Isa::Avx2 => {
                    is_x86_feature_detected!("avx2")
                        && is_x86_feature_detected!("fma")
                        && is_x86_feature_detected!("f16c")
                }
                Isa::Avx512Vnni => {
                    is_x86_feature_detected!("avx512f")
                        && is_x86_feature_detected!("avx512bw")
                        && is_x86_feature_detected!("avx512vnni")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Scalar
        }
    }
}

/// Invalid arguments; every variant names the offending field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QMatmulError {
    #[error("{field} must be greater than 0")]
    Zero { field: &'static str },
    #[error("cols = {cols} is not a multiple of the {qtype:?} block size {block}")]
    ColsNotBlockMultiple { qtype: QType, cols: usize, block: usize },
    #[error("{field}: expected {expected} {unit}, got {got}")]
    Length {
        field: &'static str,
        expected: usize,
        got: usize,
        unit: &'static str,
    },
    #[error("{field}: size overflows usize")]
    Overflow { field: &'static str },
    #[error("row = {row} is out of range for a matrix of {rows} rows")]
    RowOutOfRange { row: usize, rows: usize },
    #[error("isa = {isa:?} is not supported by this CPU")]
    IsaUnavailable { isa: Isa },
}

/// A weight matrix (`rows` out features × `cols` in features), repacked for the kernels.
pub struct QMatrix {
    qtype: QType,
    rows: usize,
    cols: usize,
    store: Store,
}

enum Store {
    Packed {
        quant: Quant,
        lay: Layout,
        bytes: AlignedBytes,
    },
    F32(Vec<f32>),
}

fn mul(field: &'static str, a: usize, b: usize) -> Result<usize, QMatmulError> {
    a.checked_mul(b).ok_or(QMatmulError::Overflow { field })
}

fn check_len(field: &'static str, expected: usize, got: usize, unit: &'static str) -> Result<(), QMatmulError> {
    if expected == got {
        Ok(())
    } else {
        Err(QMatmulError::Length {
            field,
            expected,
            got,
            unit,
        })
    }
}

impl QMatrix {
    /// Validates and repacks `data`: raw GGUF/ggml bytes of `rows × cols`
    /// elements of `qtype`, row-major (`rows · cols / 32` blocks).
    pub fn new(qtype: QType, rows: usize, cols: usize, data: &[u8]) -> Result<Self, QMatmulError> {
        if rows == 0 {
            return Err(QMatmulError::Zero { field: "rows" });
        }
        if cols == 0 {
            return Err(QMatmulError::Zero { field: "cols" });
        }
        let block = qtype.block_size();
        if !cols.is_multiple_of(block) {
            return Err(QMatmulError::ColsNotBlockMultiple { qtype, cols, block });
        }
        let expected = mul("data", mul("data", rows, cols / block)?, qtype.type_size())?;
        check_len("data", expected, data.len(), "bytes")?;
        let store = match Quant::of(qtype) {
            Some(quant) => {
                let lay = Layout::new(quant, rows, cols);
                // The packed size is at most ~1.3x the raw size plus one group, which fits if `data` did.
                Store::Packed {
                    quant,
                    lay,
                    bytes: pack::pack(quant, &lay, rows, data),
                }
            }
            None => Store::F32(
                data.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            ),
        };
        Ok(Self {
            qtype,
            rows,
            cols,
            store,
        })
    }

    pub fn qtype(&self) -> QType {
        self.qtype
    }

    /// Out features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// In features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held by the repacked weights (for memory accounting).
    pub fn storage_bytes(&self) -> usize {
        match &self.store {
            Store::Packed { bytes, .. } => bytes.as_slice().len(),
            Store::F32(v) => v.len() * 4,
        }
    }

    /// Dequantizes row `row` into `out` (`cols` elements), bit-identical to
    /// ggml's dequantization; e.g. the token-embedding lookup of a tied matrix.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) -> Result<(), QMatmulError> {
        if row >= self.rows {
            return Err(QMatmulError::RowOutOfRange { row, rows: self.rows });
        }
        check_len("out", self.cols, out.len(), "elements")?;
        match &self.store {
            Store::Packed { quant, lay, bytes } => pack::dequantize_row(*quant, lay, bytes.as_slice(), row, out),
            Store::F32(v) => out.copy_from_slice(&v[row * self.cols..][..self.cols]),
        }
        Ok(())
    }

    fn check_args(&self, x: &[f32], batch: usize, out: &[f32]) -> Result<(), QMatmulError> {
        check_len("x", mul("x", batch, self.cols)?, x.len(), "elements (batch × cols)")?;
        check_len(
            "out",
            mul("out", batch, self.rows)?,
            out.len(),
            "elements (batch × rows)",
        )
    }
}

/// One validated product for the packed kernels: `acts` holds `batch` rows of
/// `lay.nb` blocks, `packed` holds `lay.groups` groups, `out` `batch × rows`.
pub(crate) struct Job<'a> {
    pub quant: Quant,
    pub lay: &'a Layout,
    pub packed: &'a [u8],
    pub acts: Acts<'a>,
    pub rows: usize,
    pub batch: usize,
    pub out: OutPtr,
}

/// Products smaller than this many multiply-adds run on the calling thread:
/// below it, handing work to another core costs more than it saves.
const PAR_MIN_MACS: usize = 1 << 17;
/// Tasks per participating thread, so that an unevenly fast thread delays little.
const TASKS_PER_THREAD: usize = 4;
/// Smallest task worth a claim (a contended cache line costs ~0.1-0.2 µs).
const MIN_TASK_MACS: usize = 1 << 16;

thread_local! {
    static SCRATCH: RefCell<QActs> = RefCell::new(QActs::default());
}

/// `out[b*rows + r] = Σ_k x[b*cols + k] · W[r, k]` for `b < batch`, with the
/// best kernel for this CPU on up to `threads` threads (the caller included).
pub fn qmatmul(w: &QMatrix, x: &[f32], batch: usize, out: &mut [f32], threads: usize) -> Result<(), QMatmulError> {
    qmatmul_with_isa(Isa::detect(), w, x, batch, out, threads)
}

/// [`qmatmul`] with an explicit instruction set (e.g. `Isa::Scalar` to test
/// or to rule out the SIMD kernels); fails if the CPU lacks it.
pub fn qmatmul_with_isa(
    isa: Isa,
    w: &QMatrix,
    x: &[f32],
    batch: usize,
    out: &mut [f32],
    threads: usize,
) -> Result<(), QMatmulError> {
    if threads == 0 {
        return Err(QMatmulError::Zero { field: "threads" });
    }
    if !isa.is_available() {
        return Err(QMatmulError::IsaUnavailable { isa });
    }
    w.check_args(x, batch, out)?;
    if batch == 0 {
        return Ok(());
    }
    let macs = w.rows.saturating_mul(w.cols).saturating_mul(batch);
    let units = w.rows.div_ceil(pack::GROUP);
    let n_tasks = if threads == 1 || macs < PAR_MIN_MACS {
        1
    } else {
        units.min(threads * TASKS_PER_THREAD).min(macs / MIN_TASK_MACS)
    };
    let range = |i: usize| (i * units / n_tasks, (i + 1) * units / n_tasks);
    let out_ptr = OutPtr::new(out);
    match &w.store {
        Store::F32(v) => {
            let task = |i: usize| {
                let (g0, g1) = range(i);
                let r1 = (g1 * pack::GROUP).min(w.rows);
                f32_rows(isa, v, w.rows, w.cols, x, batch, g0 * pack::GROUP..r1, out_ptr);
            };
            pool::run(threads, n_tasks, &task);
        }
        Store::Packed { quant, lay, bytes } => SCRATCH.with_borrow_mut(|scratch| {
            let acts = scratch.quantize(x, w.cols, isa == Isa::Avx512Vnni);
            let job = Job {
                quant: *quant,
                lay,
                packed: bytes.as_slice(),
                acts,
                rows: w.rows,
                batch,
                out: out_ptr,
            };
            let task = |i: usize| {
                let (g0, g1) = range(i);
                match isa {
                    Isa::Scalar => scalar::run_groups(&job, g0, g1),
                    // SAFETY: `isa` is available (checked above) and `job` was validated.
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => unsafe { avx2::run_groups(&job, g0, g1) },
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512Vnni => unsafe { avx512::run_groups(&job, g0, g1) },
                    #[cfg(not(target_arch = "x86_64"))]
                    _ => scalar::run_groups(&job, g0, g1),
                }
            };
            pool::run(threads, n_tasks, &task);
        }),
    }
    Ok(())
}

/// Runs `task(i)` for every `i < n_tasks` on up to `threads` threads of the
/// kernels' pool (the caller included), returning when all have finished. For
/// the row passes around the products (norms, activations, attention), so that
/// one set of threads runs a whole forward pass. Busy pool (another caller's
/// job in flight): the tasks run on the calling thread.
pub fn parallel_for(threads: usize, n_tasks: usize, task: &(dyn Fn(usize) + Sync)) {
    pool::run(threads, n_tasks, task)
}

/// F32 weights: plain dot products, vectorized by the compiler per ISA.
#[allow(clippy::too_many_arguments)]
fn f32_rows(
    isa: Isa,
    w: &[f32],
    rows: usize,
    cols: usize,
    x: &[f32],
    batch: usize,
    range: std::ops::Range<usize>,
    out: OutPtr,
) {
    #[inline(always)]
    fn body(w: &[f32], rows: usize, cols: usize, x: &[f32], batch: usize, range: std::ops::Range<usize>, out: OutPtr) {
        for r in range {
            let wr = &w[r * cols..][..cols];
            for b in 0..batch {
                let xb = &x[b * cols..][..cols];
                let mut acc = [0f32; 16];
                let (cw, cx) = (wr.chunks_exact(16), xb.chunks_exact(16));
                let tail: f32 = cw.remainder().iter().zip(cx.remainder()).map(|(a, b)| a * b).sum();
                for (a, b) in cw.zip(cx) {
                    for i in 0..16 {
                        acc[i] += a[i] * b[i];
                    }
                }
                // SAFETY: (b, r) is inside `out` and `r` belongs to this task's range.
                unsafe { out.write(b * rows + r, acc.iter().sum::<f32>() + tail) };
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512(
            w: &[f32],
            rows: usize,
            cols: usize,
            x: &[f32],
            batch: usize,
            range: std::ops::Range<usize>,
            out: OutPtr,
        ) {
            body(w, rows, cols, x, batch, range, out)
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(
            w: &[f32],
            rows: usize,
            cols: usize,
            x: &[f32],
            batch: usize,
            range: std::ops::Range<usize>,
            out: OutPtr,
        ) {
            body(w, rows, cols, x, batch, range, out)
        }
        // SAFETY: the caller checked that `isa` is available.
        match isa {
            Isa::Avx512Vnni => return unsafe { avx512(w, rows, cols, x, batch, range, out) },
            Isa::Avx2 => return unsafe { avx2(w, rows, cols, x, batch, range, out) },
            Isa::Scalar => {}
        }
    }
    body(w, rows, cols, x, batch, range, out)
}

/// Scalar reference: dequantize each row (ggml arithmetic) and take f64 dot
/// products with the unquantized activations. Slow; for tests and checks.
pub fn qmatmul_reference(w: &QMatrix, x: &[f32], batch: usize, out: &mut [f32]) -> Result<(), QMatmulError> {
    w.check_args(x, batch, out)?;
    let mut row = vec![0f32; w.cols];
    for r in 0..w.rows {
        w.dequantize_row(r, &mut row)?;
        for b in 0..batch {
            let xb = &x[b * w.cols..][..w.cols];
            out[b * w.rows + r] = row
                .iter()
                .zip(xb)
                .map(|(&a, &v)| f64::from(a) * f64::from(v))
                .sum::<f64>() as f32;
        }
    }
    Ok(())
}

//! The BERT encoder's forward pass, written out by hand for the CPU: the hot
//! path of [`super::embedder::Embedder`].
//!
//! Layout: a batch is *packed*: the real tokens of all sequences are rows of
//! one `[n, hidden]` matrix (no padding anywhere). Everything but attention is
//! per token; attention runs per (sequence, head) over that sequence's rows.
//!
//! - Linear layers: `genai_kernels::cpu::qmatmul` (Q8_0 weights quantized once
//!   at load, activations quantized per 32-value block per call; AVX-512 VNNI /
//!   AVX2 / scalar picked at run time) on the kernels' persistent pool. Layers
//!   whose input width is not a multiple of 32 stay f32.
//! - Bias + GELU, bias + residual + LayerNorm and attention (scores, softmax,
//!   context) are fused row passes, compiled for AVX-512F, AVX2+FMA and
//!   baseline x86-64 (or the target's baseline) and chosen at run time.
//!
//! Invariants: a sequence's hidden states do not depend on the other sequences
//! in the batch or on the thread count (every op is row-local except attention,
//! which reads only its own sequence; qmatmul is bit-identical across threads).
//!
//! Tested by: the embedder's tests (parity with sentence-transformers vectors)
//! and the tests below: each fused op against a plain scalar formula, and the
//! whole forward pass against candle f32 reference (`embedder`'s candle BERT)
//! on the real model.

use std::cell::RefCell;
use std::ops::Range;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};
use genai_kernels::cpu::activation::exp_fast;
use genai_kernels::cpu::qmatmul::{parallel_for, qmatmul, QMatrix, QType};

use crate::EmbedError;

type Result<T> = std::result::Result<T, EmbedError>;

fn model_err(e: impl std::fmt::Display) -> EmbedError {
    EmbedError::Model(e.to_string())
}

/// Instruction set the fused row passes were compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    Base,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Isa {
    pub(crate) fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
                return Isa::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Base
    }
}

/// Defines `fn $name(isa: Isa, args..)` whose body is compiled three times
/// (AVX-512F, AVX2+FMA, baseline) so the compiler vectorises it per ISA.
macro_rules! multiversion {
    ($(#[$m:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        fn $name(isa: Isa, $($arg: $ty),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v4($($arg: $ty),*) { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v3($($arg: $ty),*) { body($($arg),*) }
                match isa {
                    // SAFETY: `isa` came from `Isa::detect` on this CPU.
                    Isa::Avx512 => return unsafe { v4($($arg),*) },
                    Isa::Avx2 => return unsafe { v3($($arg),*) },
                    Isa::Base => {}
                }
            }
            let _ = isa;
            body($($arg),*)
        }
    };
}

/// BERT hyper-parameters the forward pass needs (from `config.json`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub hidden: usize,
    pub heads: usize,
    pub layers: usize,
    pub eps: f32,
    pub max_positions: usize,
}

/// `y = x · Wᵀ` (bias applied by the fused pass that follows).
struct Linear {
    w: QMatrix,
    b: Vec<f32>,
    /// Second product with the activations' quantization residual (see `forward`).
    two_pass: bool,
}

impl Linear {
    /// Loads `name.weight` (`[out, in]`) and `name.bias` of one or more layers
    /// stacked along `out` (Q, K and V become one product).
    fn load(st: &MmapedSafetensors, names: &[String], two_pass: bool) -> Result<Self> {
        let (mut w, mut b, mut rows, mut cols) = (Vec::new(), Vec::new(), 0, 0);
        for name in names {
            let wt = load_f32(st, &format!("{name}.weight"))?;
            let (r, c) = match wt.1.as_slice() {
                &[r, c] => (r, c),
                s => return Err(model_err(format!("{name}.weight: expected 2 dims, got {s:?}"))),
            };
            if cols != 0 && c != cols {
                return Err(model_err(format!("{name}.weight: {c} columns, expected {cols}")));
            }
            let bias = load_f32(st, &format!("{name}.bias"))?.0;
            if bias.len() != r {
                return Err(model_err(format!("{name}.bias: {} values, expected {r}", bias.len())));
            }
            (rows, cols) = (rows + r, c);
            w.extend_from_slice(&wt.0);
            b.extend_from_slice(&bias);
        }
        let w = if cols.is_multiple_of(32) {
            QMatrix::new(QType::Q8_0, rows, cols, &quantize_q8_0(&w))
        } else {
            QMatrix::new(
                QType::F32,
                rows,
                cols,
                &w.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>(),
            )
        }
        .map_err(|e| model_err(format!("{}: {e}", names.join("+"))))?;
        let two_pass = two_pass && w.qtype() == QType::Q8_0;
        Ok(Self { w, b, two_pass })
    }

    fn out_dim(&self) -> usize {
        self.w.rows()
    }

    fn in_dim(&self) -> usize {
        self.w.cols()
    }

    /// `out[n, out_dim] = x[n, in_dim] · Wᵀ` (no bias). Two-pass layers also
    /// multiply the residual `x - Q(x)` of qmatmul's activation quantization
    /// `Q` (rebuilt bit for bit by `quant_residual_rows`) and add it: the
    /// activations then carry ~1/254 of their one-pass error, leaving the
    /// weights' Q8_0 rounding. Used for Q/K/V, whose errors the softmax
    /// amplifies (one-pass: sentence cosine to sentence-transformers down to
    /// 0.9990; two-pass: 0.9995).
    fn forward(
        &self,
        isa: Isa,
        x: &[f32],
        n: usize,
        out: &mut Vec<f32>,
        extra: &mut Vec<f32>,
        threads: usize,
    ) -> Result<()> {
        out.resize(n * self.out_dim(), 0.0);
        qmatmul(&self.w, x, n, out, threads).map_err(model_err)?;
        if !self.two_pass {
            return Ok(());
        }
        let k = self.in_dim();
        extra.resize(n * k + n * self.out_dim(), 0.0);
        let (res, prod) = extra.split_at_mut(n * k);
        let (tasks, range) = ranges(n, threads, 16);
        let rp = SharedMut(res.as_mut_ptr());
        parallel_for(threads, tasks, &|i| {
            let r = range(i);
            // SAFETY: rows `r` of `res` belong to this task alone.
            let dst = unsafe { rp.slice(r.start * k, r.len() * k) };
            quant_residual_rows(isa, &x[r.start * k..r.end * k], dst);
        });
        qmatmul(&self.w, res, n, prod, threads).map_err(model_err)?;
        let (tasks, range) = ranges(out.len(), threads, 4096);
        let op = SharedMut(out.as_mut_ptr());
        let prod = &*prod;
        parallel_for(threads, tasks, &|i| {
            let r = range(i);
            // SAFETY: elements `r` of `out` belong to this task alone.
            let dst = unsafe { op.slice(r.start, r.len()) };
            add_rows(isa, dst, &prod[r]);
        });
        Ok(())
    }
}

multiversion! {
    /// `r = x - d·q` per 32-value block, with `d = amax/127` and
    /// `q = round_half_even(x/d)` clamped to ±127: qmatmul's activation
    /// quantization (`act::quantize_block`), so `Q(x) + r == x` up to f32 rounding.
    fn quant_residual_rows(x: &[f32], r: &mut [f32]) {
        for (xb, rb) in x.chunks_exact(32).zip(r.chunks_exact_mut(32)) {
            let mut amax = 0f32;
            for &v in xb {
                amax = amax.max(v.abs());
            }
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            for (o, &v) in rb.iter_mut().zip(xb) {
                *o = v - (v * id).round_ties_even().clamp(-127.0, 127.0) * d;
            }
        }
    }
}

multiversion! {
    /// `y += x`.
    fn add_rows(y: &mut [f32], x: &[f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y += x;
        }
    }
}

/// ggml Q8_0 blocks (`{f16 d; i8 q[32]}`, `d = amax / 127`, `q = round(x / d)`),
/// as llama.cpp's `quantize_row_q8_0_ref`.
pub(crate) fn quantize_q8_0(w: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(w.len() / 32 * 34);
    for block in w.chunks_exact(32) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|&v| (v * id).round() as i8 as u8));
    }
    out
}

fn load_f32(st: &MmapedSafetensors, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
    let t = st
        .load(name, &Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F32))
        .map_err(|e| model_err(format!("{name}: {e}")))?;
    let dims = t.dims().to_vec();
    let v = t.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(model_err)?;
    Ok((v, dims))
}

struct Norm {
    w: Vec<f32>,
    b: Vec<f32>,
}

impl Norm {
    fn load(st: &MmapedSafetensors, name: &str, hidden: usize) -> Result<Self> {
        let (w, b) = (
            load_f32(st, &format!("{name}.weight"))?.0,
            load_f32(st, &format!("{name}.bias"))?.0,
        );
        if w.len() != hidden || b.len() != hidden {
            return Err(model_err(format!("{name}: expected {hidden} weights and biases")));
        }
        Ok(Self { w, b })
    }
}

struct Layer {
    qkv: Linear,
    attn_out: Linear,
    ln_attn: Norm,
    inter: Linear,
    out: Linear,
    ln_out: Norm,
}

/// Reusable activation buffers (one forward pass at a time uses them; a
/// concurrent caller allocates its own).
#[derive(Default)]
struct Scratch {
    qkv: Vec<f32>,
    ctx: Vec<f32>,
    tmp: Vec<f32>,
    inter: Vec<f32>,
    extra: Vec<f32>,
}

/// A loaded BERT encoder (weights repacked for the kernels).
pub(crate) struct Encoder {
    dims: Dims,
    word: Vec<f32>,
    position: Vec<f32>,
    token_type0: Vec<f32>,
    ln_emb: Norm,
    layers: Vec<Layer>,
    isa: Isa,
    threads: usize,
    scratch: parking_lot::Mutex<Scratch>,
}

/// Token rows per feed-forward chunk (256 x 1536 f32 intermediate = 1.5 MiB).
const FFN_ROWS: usize = 256;

/// Raw pointer that tasks on other threads write disjoint parts of.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: every task writes a range no other task touches (see each use).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// `len` values from element `start`.
    ///
    /// # Safety
    /// In bounds of the buffer, and no other task touches them meanwhile.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, start: usize, len: usize) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

/// Splits `0..n` into at most `4 * threads` ranges of at least `min` items.
fn ranges(n: usize, threads: usize, min: usize) -> (usize, impl Fn(usize) -> Range<usize>) {
    let tasks = (n / min.max(1)).clamp(1, (4 * threads).max(1));
    (tasks, move |i| i * n / tasks..(i + 1) * n / tasks)
}

impl Encoder {
    /// Loads the weights under `prefix` ("" or "bert.") of a BERT checkpoint.
    pub(crate) fn load(st: &MmapedSafetensors, prefix: &str, dims: Dims) -> Result<Self> {
        let p = |n: &str| format!("{prefix}{n}");
        let h = dims.hidden;
        let word = load_f32(st, &p("embeddings.word_embeddings.weight"))?.0;
        let position = load_f32(st, &p("embeddings.position_embeddings.weight"))?.0;
        let token_types = load_f32(st, &p("embeddings.token_type_embeddings.weight"))?.0;
        if word.len() % h != 0 || position.len() < dims.max_positions * h || token_types.len() < h {
            return Err(model_err(
                "embedding tables do not match hidden_size / max_position_embeddings",
            ));
        }
        let mut layers = Vec::with_capacity(dims.layers);
        for i in 0..dims.layers {
            let l = p(&format!("encoder.layer.{i}"));
            let layer = Layer {
                qkv: Linear::load(
                    st,
                    &["query", "key", "value"].map(|n| format!("{l}.attention.self.{n}")),
                    true,
                )?,
                attn_out: Linear::load(st, &[format!("{l}.attention.output.dense")], false)?,
                ln_attn: Norm::load(st, &format!("{l}.attention.output.LayerNorm"), h)?,
                inter: Linear::load(st, &[format!("{l}.intermediate.dense")], false)?,
                out: Linear::load(st, &[format!("{l}.output.dense")], false)?,
                ln_out: Norm::load(st, &format!("{l}.output.LayerNorm"), h)?,
            };
            let ffn = layer.inter.out_dim();
            if layer.qkv.out_dim() != 3 * h
                || layer.qkv.in_dim() != h
                || (layer.attn_out.in_dim(), layer.attn_out.out_dim()) != (h, h)
                || layer.inter.in_dim() != h
                || (layer.out.in_dim(), layer.out.out_dim()) != (ffn, h)
            {
                return Err(model_err(format!("{l}: weight shapes do not match hidden_size {h}")));
            }
            layers.push(layer);
        }
        Ok(Self {
            dims,
            word,
            position,
            token_type0: token_types[..h].to_vec(),
            ln_emb: Norm::load(st, &p("embeddings.LayerNorm"), h)?,
            layers,
            isa: Isa::detect(),
            threads: 1,
            scratch: parking_lot::Mutex::new(Scratch::default()),
        })
    }

    pub(crate) fn set_threads(&mut self, threads: usize) {
        self.threads = threads.max(1);
    }

    #[cfg(test)]
    pub(crate) fn set_isa(&mut self, isa: Isa) {
        self.isa = isa;
    }

    /// Last hidden states of the packed batch: `[Σ len, hidden]`, sequence `i`
    /// at rows `Σ_{j<i} len_j ..`. Every sequence must be non-empty and at most
    /// `max_positions` long, and every id inside the vocabulary.
    pub(crate) fn forward(&self, seqs: &[&[u32]]) -> Result<Vec<f32>> {
        let Dims { hidden: h, heads, .. } = self.dims;
        let vocab = self.word.len() / h;
        let mut offsets = Vec::with_capacity(seqs.len() + 1);
        offsets.push(0usize);
        for s in seqs {
            if s.is_empty() || s.len() > self.dims.max_positions {
                return Err(EmbedError::invalid(
                    "input",
                    format!(
                        "sequence of {} tokens (1..={} allowed)",
                        s.len(),
                        self.dims.max_positions
                    ),
                ));
            }
            if let Some(&id) = s.iter().find(|&&id| id as usize >= vocab) {
                return Err(EmbedError::invalid(
                    "input",
                    format!("token id {id} >= vocabulary size {vocab}"),
                ));
            }
            offsets.push(offsets[offsets.len() - 1] + s.len());
        }
        let n = offsets[seqs.len()];
        let mut x = vec![0f32; n * h];
        for (s, ids) in seqs.iter().enumerate() {
            for (pos, &id) in ids.iter().enumerate() {
                let row = &mut x[(offsets[s] + pos) * h..][..h];
                let (w, p) = (&self.word[id as usize * h..][..h], &self.position[pos * h..][..h]);
                for i in 0..h {
                    row[i] = w[i] + p[i] + self.token_type0[i];
                }
            }
        }
        let zeros = vec![0f32; h];
        self.add_norm(&mut x, &zeros, None, &self.ln_emb, n);

        let mut guard = self.scratch.try_lock();
        let mut own = Scratch::default();
        let sc = guard.as_deref_mut().unwrap_or(&mut own);
        let t = self.threads;
        for l in &self.layers {
            l.qkv.forward(self.isa, &x, n, &mut sc.qkv, &mut sc.extra, t)?;
            sc.ctx.resize(n * h, 0.0);
            self.attention(&sc.qkv, &l.qkv.b, &offsets, &mut sc.ctx, heads);
            l.attn_out
                .forward(self.isa, &sc.ctx, n, &mut sc.tmp, &mut sc.extra, t)?;
            self.add_norm(&mut x, &l.attn_out.b, Some(&sc.tmp), &l.ln_attn, n);
            // The feed-forward block in row chunks: its 4x-wide activations stay
            // in L2, and qmatmul's activation quantization (on the calling
            // thread) stays short enough that the pool's workers do not park.
            for rows in x.chunks_mut(FFN_ROWS * h) {
                let m = rows.len() / h;
                l.inter.forward(self.isa, rows, m, &mut sc.inter, &mut sc.extra, t)?;
                self.bias_gelu(&mut sc.inter, &l.inter.b, m);
                l.out.forward(self.isa, &sc.inter, m, &mut sc.tmp, &mut sc.extra, t)?;
                self.add_norm(rows, &l.out.b, Some(&sc.tmp), &l.ln_out, m);
            }
        }
        Ok(x)
    }

    /// `x[r] = LayerNorm(x[r] + add[r] + bias)` for every row (`add` absent: 0).
    fn add_norm(&self, x: &mut [f32], bias: &[f32], add: Option<&[f32]>, norm: &Norm, n: usize) {
        let h = self.dims.hidden;
        let (tasks, range) = ranges(n, self.threads, 16);
        let xp = SharedMut(x.as_mut_ptr());
        let (isa, eps) = (self.isa, self.dims.eps);
        parallel_for(self.threads, tasks, &|i| {
            let r = range(i);
            // SAFETY: rows `r` of `x` belong to this task alone.
            let x = unsafe { xp.slice(r.start * h, r.len() * h) };
            let add = add.map(|a| &a[r.start * h..r.end * h]);
            add_norm_rows(isa, x, add, bias, &norm.w, &norm.b, h, eps);
        });
    }

    /// `y = gelu(y + bias)` in place over `n` rows.
    fn bias_gelu(&self, y: &mut [f32], bias: &[f32], n: usize) {
        let w = bias.len();
        let (tasks, range) = ranges(n, self.threads, 8);
        let yp = SharedMut(y.as_mut_ptr());
        let isa = self.isa;
        parallel_for(self.threads, tasks, &|i| {
            let r = range(i);
            // SAFETY: rows `r` of `y` belong to this task alone.
            let y = unsafe { yp.slice(r.start * w, r.len() * w) };
            bias_gelu_rows(isa, y, bias);
        });
    }

    /// Multi-head self-attention of each sequence over its own rows of `qkv`
    /// (`[n, 3h]`: Q | K | V before bias), context into `ctx` (`[n, h]`).
    fn attention(&self, qkv: &[f32], bias: &[f32], offsets: &[usize], ctx: &mut [f32], heads: usize) {
        thread_local! {
            static BUF: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
        }
        let h = self.dims.hidden;
        let hd = h / heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let seqs = offsets.len() - 1;
        let cp = SharedMut(ctx.as_mut_ptr());
        let isa = self.isa;
        // One task per sequence walks all its heads over rows that stay in
        // cache after the first head; split by head only when there are too
        // few sequences to keep every thread busy.
        let per_task = if seqs >= 4 * self.threads { heads } else { 1 };
        let groups = heads / per_task;
        parallel_for(self.threads, seqs * groups, &|task| {
            let (s, g) = (task / groups, task % groups);
            let rows = offsets[s]..offsets[s + 1];
            BUF.with_borrow_mut(|buf| {
                let l = rows.len();
                buf.resize(attend_scratch(l, hd), 0.0);
                for head in g * per_task..(g + 1) * per_task {
                    // SAFETY: this call writes columns `head*hd..` of rows `rows`
                    // only; tasks differ in sequence or heads, so writes are disjoint.
                    attend(isa, qkv, bias, h, hd, head, rows.start, l, scale, buf, cp);
                }
            });
        });
    }
}

/// Lanes of the explicit accumulators below: one AVX-512 register (two AVX2
/// ones). Float sums are not reassociated by the compiler, so the vector
/// reductions are written out as 16 independent partial sums.
const LANES: usize = 16;

/// Σ f(x) over `x` with 16 partial sums (vectorises; see [`LANES`]).
#[inline(always)]
fn sum_by(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for c in chunks {
        for u in 0..LANES {
            acc[u] += f(c[u]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

multiversion! {
    /// LayerNorm of `x[r] + add[r] + bias` into `x[r]`, row by row.
    fn add_norm_rows(x: &mut [f32], add: Option<&[f32]>, bias: &[f32], w: &[f32], b: &[f32], h: usize, eps: f32) {
        let (w, b, bias) = (&w[..h], &b[..h], &bias[..h]);
        for (r, row) in x.chunks_exact_mut(h).enumerate() {
            match add {
                Some(a) => {
                    for ((v, &a), &c) in row.iter_mut().zip(&a[r * h..][..h]).zip(bias) {
                        *v += a + c;
                    }
                }
                None => {
                    for (v, &c) in row.iter_mut().zip(bias) {
                        *v += c;
                    }
                }
            }
            let mean = sum_by(row, |v| v) / h as f32;
            let var = sum_by(row, |v| (v - mean) * (v - mean)) / h as f32;
            let rstd = 1.0 / (var + eps).sqrt();
            for ((v, &w), &b) in row.iter_mut().zip(w).zip(b) {
                *v = (*v - mean) * rstd * w + b;
            }
        }
    }
}

multiversion! {
    /// `y = gelu(y + bias)` over rows of `bias.len()` values.
    fn bias_gelu_rows(y: &mut [f32], bias: &[f32]) {
        for row in y.chunks_exact_mut(bias.len()) {
            for (v, &c) in row.iter_mut().zip(bias) {
                *v = gelu(*v + c);
            }
        }
    }
}

/// Keys of one head padded to a multiple of [`LANES`] (pads score -inf).
fn padded(l: usize) -> usize {
    l.div_ceil(LANES) * LANES
}

/// Queries per register block in attention: 8 independent accumulator
/// chains hide the FMA latency.
const QB: usize = 8;

/// Scratch floats `attend` needs for a sequence of `l` tokens and head size `hd`.
fn attend_scratch(l: usize, hd: usize) -> usize {
    let (lq, lp) = (l.div_ceil(QB) * QB, padded(l));
    lq * hd + hd * lp + l * hd + lq * lp
}

multiversion! {
    /// One head of one sequence: `softmax(q·kᵀ·scale)·v` for its `l` rows from
    /// `row0`; `buf` (at least `attend_scratch(l, hd)` floats) holds the
    /// queries (`[lq, hd]`, zero rows up to a multiple of [`QB`]), the keys
    /// transposed (`[hd, padded(l)]`, zero-padded), the values (`[l, hd]`)
    /// and the scores (`[lq, padded(l)]`).
    fn attend(
        qkv: &[f32],
        bias: &[f32],
        h: usize,
        hd: usize,
        head: usize,
        row0: usize,
        l: usize,
        scale: f32,
        buf: &mut [f32],
        ctx: SharedMut,
    ) {
        let (lq, lp) = (l.div_ceil(QB) * QB, padded(l));
        let (qc, kc, vc) = (head * hd, h + head * hd, 2 * h + head * hd);
        let (qm, rest) = buf.split_at_mut(lq * hd);
        let (kt, rest) = rest.split_at_mut(hd * lp);
        let (v, rest) = rest.split_at_mut(l * hd);
        let sm = &mut rest[..lq * lp];
        qm[l * hd..].fill(0.0);
        kt.fill(0.0);
        for j in 0..l {
            let row = &qkv[(row0 + j) * 3 * h..][..3 * h];
            for ((o, &x), &c) in qm[j * hd..][..hd].iter_mut().zip(&row[qc..][..hd]).zip(&bias[qc..][..hd]) {
                *o = (x + c) * scale;
            }
            for d in 0..hd {
                kt[d * lp + j] = row[kc + d] + bias[kc + d];
            }
            for ((o, &x), &c) in v[j * hd..][..hd].iter_mut().zip(&row[vc..][..hd]).zip(&bias[vc..][..hd]) {
                *o = x + c;
            }
        }
        // Scores: QB queries x LANES keys per register block, summed over the head dimension.
        for qb in (0..lq).step_by(QB) {
            let q = &qm[qb * hd..][..QB * hd];
            for c in 0..lp / LANES {
                let mut acc = [[0f32; LANES]; QB];
                for d in 0..hd {
                    let k = &kt[d * lp + c * LANES..][..LANES];
                    for r in 0..QB {
                        let qd = q[r * hd + d];
                        for u in 0..LANES {
                            acc[r][u] = qd.mul_add(k[u], acc[r][u]);
                        }
                    }
                }
                for (r, a) in acc.iter().enumerate() {
                    sm[(qb + r) * lp + c * LANES..][..LANES].copy_from_slice(a);
                }
            }
        }
        // Softmax per real query (padded keys -> 0); rows scaled to sum 1.
        for row in sm.chunks_exact_mut(lp).take(l) {
            row[l..].fill(f32::NEG_INFINITY);
            let mut mx = [f32::NEG_INFINITY; LANES];
            for c in row.chunks_exact(LANES) {
                for u in 0..LANES {
                    mx[u] = mx[u].max(c[u]);
                }
            }
            let max = mx.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            for s in row.iter_mut() {
                *s = exp_fast(*s - max);
            }
            row[l..].fill(0.0);
            let inv = 1.0 / sum_by(row, |p| p);
            for s in row.iter_mut() {
                *s *= inv;
            }
        }
        // Context: QB queries x LANES head dims per register block, summed over the keys.
        let full = hd / LANES * LANES;
        for qb in (0..lq).step_by(QB) {
            let rows = (l - qb.min(l)).min(QB);
            for c in 0..hd / LANES {
                let mut acc = [[0f32; LANES]; QB];
                for j in 0..l {
                    let vj = &v[j * hd + c * LANES..][..LANES];
                    for r in 0..QB {
                        let p = sm[(qb + r) * lp + j];
                        for u in 0..LANES {
                            acc[r][u] = p.mul_add(vj[u], acc[r][u]);
                        }
                    }
                }
                for (r, a) in acc.iter().enumerate().take(rows) {
                    // SAFETY: see `Encoder::attention`; row `row0 + qb + r` < n and
                    // these head columns are in bounds of `ctx` (`[n, h]`).
                    unsafe { ctx.slice((row0 + qb + r) * h + qc + c * LANES, LANES) }.copy_from_slice(a);
                }
            }
            for r in 0..rows {
                // SAFETY: as above.
                let dst = unsafe { ctx.slice((row0 + qb + r) * h + qc, hd) };
                for (d, o) in dst.iter_mut().enumerate().skip(full) {
                    let mut acc = 0f32;
                    for j in 0..l {
                        acc = sm[(qb + r) * lp + j].mul_add(v[j * hd + d], acc);
                    }
                    *o = acc;
                }
            }
        }
    }
}

#[inline(always)]
pub(crate) fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7), branch-free so loops vectorise.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    (1.0 - poly * exp_fast(-a * a)).copysign(x)
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    fn isas() -> Vec<Isa> {
        let mut v = vec![Isa::Base];
        v.extend(Some(Isa::detect()).filter(|i| *i != Isa::Base));
        v
    }

    fn random(rng: &mut rand::rngs::StdRng, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-scale..scale)).collect()
    }

    /// Attention of one sequence against a plain f64 softmax(q·kᵀ/√hd)·v,
    /// for lengths around the register blocks and head sizes with and without
    /// a partial lane block.
    #[test]
    fn attention_matches_naive_softmax_attention() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for &(heads, hd) in &[(2usize, 32usize), (3, 20)] {
            let h = heads * hd;
            for &l in &[1usize, 5, 16, 17, 47] {
                let qkv = random(&mut rng, l * 3 * h, 2.0);
                let bias = random(&mut rng, 3 * h, 0.5);
                let scale = 1.0 / (hd as f32).sqrt();
                for isa in isas() {
                    let mut ctx = vec![f32::NAN; l * h];
                    let cp = SharedMut(ctx.as_mut_ptr());
                    for head in 0..heads {
                        let mut buf = vec![0f32; attend_scratch(l, hd)];
                        attend(isa, &qkv, &bias, h, hd, head, 0, l, scale, &mut buf, cp);
                    }
                    let at = |i: usize, c: usize| f64::from(qkv[i * 3 * h + c] + bias[c]);
                    for head in 0..heads {
                        for i in 0..l {
                            let s: Vec<f64> = (0..l)
                                .map(|j| {
                                    (0..hd)
                                        .map(|d| at(i, head * hd + d) * at(j, h + head * hd + d))
                                        .sum::<f64>()
                                        * f64::from(scale)
                                })
                                .collect();
                            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                            let z: f64 = s.iter().map(|v| (v - m).exp()).sum();
                            for d in 0..hd {
                                let want: f64 = (0..l)
                                    .map(|j| (s[j] - m).exp() / z * at(j, 2 * h + head * hd + d))
                                    .sum();
                                let got = f64::from(ctx[i * h + head * hd + d]);
                                assert!(
                                    (got - want).abs() < 1e-4,
                                    "{isa:?} heads {heads} hd {hd} l {l}: ({i}, {head}, {d}) {got} vs {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn row_passes_match_scalar_formulas() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (rows, h) = (3, 40);
        let x0 = random(&mut rng, rows * h, 3.0);
        let add = random(&mut rng, rows * h, 1.0);
        let (bias, w, b) = (
            random(&mut rng, h, 1.0),
            random(&mut rng, h, 2.0),
            random(&mut rng, h, 1.0),
        );
        for isa in isas() {
            let mut x = x0.clone();
            add_norm_rows(isa, &mut x, Some(&add), &bias, &w, &b, h, 1e-12);
            for r in 0..rows {
                let v: Vec<f64> = (0..h)
                    .map(|i| f64::from(x0[r * h + i] + add[r * h + i] + bias[i]))
                    .collect();
                let mean = v.iter().sum::<f64>() / h as f64;
                let var = v.iter().map(|a| (a - mean) * (a - mean)).sum::<f64>() / h as f64;
                for i in 0..h {
                    let want = (v[i] - mean) / var.sqrt() * f64::from(w[i]) + f64::from(b[i]);
                    assert!(
                        (f64::from(x[r * h + i]) - want).abs() < 1e-4,
                        "{isa:?} layernorm ({r}, {i})"
                    );
                }
            }
            let mut y = x0.clone();
            bias_gelu_rows(isa, &mut y, &bias);
            for (i, (&got, &x)) in y.iter().zip(&x0).enumerate() {
                let want = gelu(x + bias[i % h]);
                assert!((got - want).abs() < 1e-6, "{isa:?} gelu {i}");
            }
        }
    }

    /// Weights exactly representable in Q8_0 (integers with a 127 in every
    /// block, so d = 1): the one-pass product carries only the activation
    /// rounding, the two-pass product almost none of it.
    #[test]
    fn two_pass_products_remove_the_activation_rounding() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let (rows, cols, n) = (48, 96, 5);
        let mut w: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-127i32..=127) as f32)
            .collect();
        w.chunks_exact_mut(32).for_each(|b| b[0] = 127.0);
        let x = random(&mut rng, n * cols, 4.0);
        let exact: Vec<f64> = (0..n * rows)
            .map(|i| {
                let (b, r) = (i / rows, i % rows);
                (0..cols)
                    .map(|k| f64::from(x[b * cols + k]) * f64::from(w[r * cols + k]))
                    .sum()
            })
            .collect();
        let scale = exact.iter().fold(0f64, |m, v| m.max(v.abs()));
        for isa in isas() {
            let mut worst = [0f64; 2];
            for (p, two_pass) in [false, true].into_iter().enumerate() {
                let lin = Linear {
                    w: QMatrix::new(QType::Q8_0, rows, cols, &quantize_q8_0(&w)).unwrap(),
                    b: vec![0.0; rows],
                    two_pass,
                };
                let (mut out, mut extra) = (Vec::new(), Vec::new());
                lin.forward(isa, &x, n, &mut out, &mut extra, 2).unwrap();
                worst[p] = out
                    .iter()
                    .zip(&exact)
                    .map(|(&o, e)| (f64::from(o) - e).abs())
                    .fold(0.0, f64::max)
                    / scale;
            }
            assert!(worst[1] < 2e-5, "{isa:?}: two-pass relative error {}", worst[1]);
            assert!(
                worst[0] > 20.0 * worst[1],
                "{isa:?}: one-pass {} vs two-pass {}",
                worst[0],
                worst[1]
            );
        }
    }
}

//! Llama-architecture decoder (SmolLM2, Llama 2/3, Mistral, Qwen2) on the CPU.
//!
//! Owns the weights and the per-token math: embedding, RMSNorm, q/k/v projections (Qwen2 biases),
//! RoPE (interleaved pairs for llama.cpp-converted Llama GGUFs, whose Q/K rows were permuted at
//! conversion; half-split "NeoX" pairs for HF safetensors and Qwen2 GGUFs; llama3 and linear scaling),
//! GQA attention, SwiGLU MLP and a tied or untied LM head. Attention itself is a callback, so one layer
//! implementation serves both the paged batched forward (`crate::paged`) and the dense single-sequence
//! reference forward (`Llama::forward_dense`, test builds only) the tests compare it with.
//!
//! Loads from GGUF (quantized Q4_0/Q4_1/Q8_0/Q4_K/Q6_K … via candle's `QMatMul`, f16/f32 dequantized)
//! or from an HF directory (config.json + *.safetensors, f32/f16/bf16 converted to f32). Activations
//! are f32 `[tokens, features]` row-major `Vec<f32>`; every matmul goes through [`Linear`].

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::gguf::GgufFile;
use super::linear::{concat_qtensors, Linear};
use genai_kernels::cpu::activation::silu_mul;

/// Which element pairs RoPE rotates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RopeStyle {
    /// `(x[2i], x[2i+1])`: llama.cpp's Llama GGUFs (Q/K rows permuted by the converter).
    Interleaved,
    /// `(x[i], x[i + d/2])`: HF checkpoints, Qwen2 GGUFs.
    Neox,
}

#[derive(Debug, Clone)]
pub(crate) struct Rope {
    pub(crate) style: RopeStyle,
    /// Rotated dimensions per head (≤ head_dim).
    pub(crate) dim: usize,
    /// `dim / 2` inverse frequencies, scaling already applied.
    pub(crate) inv_freq: Vec<f64>,
    /// Linear scaling: positions are multiplied by `1 / factor`.
    pub(crate) pos_scale: f64,
}

impl Rope {
    fn new(style: RopeStyle, dim: usize, theta: f64) -> Self {
        let inv_freq = (0..dim / 2)
            .map(|i| theta.powf(-((2 * i) as f64) / dim as f64))
            .collect();
        Self {
            style,
            dim,
            inv_freq,
            pos_scale: 1.0,
        }
    }

    /// Llama 3.1 frequency-dependent scaling (HF `rope_type: llama3`).
    fn llama3(&mut self, factor: f64, low: f64, high: f64, original_ctx: f64) {
        let (low_wavelen, high_wavelen) = (original_ctx / low, original_ctx / high);
        for f in &mut self.inv_freq {
            let wavelen = 2.0 * std::f64::consts::PI / *f;
            if wavelen > low_wavelen {
                *f /= factor;
            } else if wavelen >= high_wavelen {
                let smooth = (original_ctx / wavelen - low) / (high - low);
                *f = (1.0 - smooth) * *f / factor + smooth * *f;
            }
        }
    }

    /// cos/sin tables `[positions, dim/2]` for one forward (shared by all layers).
    pub(crate) fn tables(&self, positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let half = self.dim / 2;
        let (mut cos, mut sin) = (
            Vec::with_capacity(positions.len() * half),
            Vec::with_capacity(positions.len() * half),
        );
        for &p in positions {
            for &f in &self.inv_freq {
                let a = p as f64 * self.pos_scale * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        (cos, sin)
    }

    /// The CUDA rotary kernel's table (`genai_kernels::cuda::rotary_embedding`): f32
    /// `[max_position, dim]`, per position the `dim/2` cosines then the `dim/2` sines of the same
    /// angles as [`Rope::tables`] (scaling included).
    #[cfg(any(test, feature = "cuda"))]
    pub(crate) fn cos_sin_cache(&self, max_position: usize) -> Vec<f32> {
        let mut t = Vec::with_capacity(max_position * self.dim);
        for p in 0..max_position {
            let (cos, sin) = self.tables(&[p]);
            t.extend(cos);
            t.extend(sin);
        }
        t
    }

    /// Rotates `x: [tokens, heads, head_dim]` in place.
    pub(crate) fn apply(&self, x: &mut [f32], heads: usize, head_dim: usize, cos: &[f32], sin: &[f32]) {
        let half = self.dim / 2;
        for (t, tok) in x.chunks_exact_mut(heads * head_dim).enumerate() {
            let (c, s) = (&cos[t * half..(t + 1) * half], &sin[t * half..(t + 1) * half]);
            for h in tok.chunks_exact_mut(head_dim) {
                for i in 0..half {
                    let (a, b) = match self.style {
                        RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                        RopeStyle::Neox => (i, i + half),
                    };
                    let (x0, x1) = (h[a], h[b]);
                    h[a] = x0 * c[i] - x1 * s[i];
                    h[b] = x0 * s[i] + x1 * c[i];
                }
            }
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct LlamaConfig {
    pub(crate) vocab_size: usize,
    pub(crate) hidden_size: usize,
    pub(crate) intermediate_size: usize,
    pub(crate) num_layers: usize,
    pub(crate) num_heads: usize,
    pub(crate) num_kv_heads: usize,
    pub(crate) head_dim: usize,
    pub(crate) rms_eps: f32,
    pub(crate) context_length: usize,
    pub(crate) rope: Rope,
    /// Sliding-window attention (Mistral v0.1): each token sees only this many latest positions.
    pub(crate) sliding_window: Option<usize>,
}

impl LlamaConfig {
    fn validate(&self) -> anyhow::Result<()> {
        let pos = |v: usize, what: &str| {
            if v == 0 {
                Err(anyhow!("model config: {what} must be > 0"))
            } else {
                Ok(())
            }
        };
        pos(self.vocab_size, "vocab_size")?;
        pos(self.hidden_size, "hidden_size")?;
        pos(self.num_layers, "num_layers")?;
        pos(self.num_heads, "num_heads")?;
        pos(self.num_kv_heads, "num_kv_heads")?;
        pos(self.head_dim, "head_dim")?;
        if self.sliding_window == Some(0) {
            bail!("model config: sliding_window must be > 0");
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            bail!(
                "model config: num_heads {} not a multiple of num_kv_heads {}",
                self.num_heads,
                self.num_kv_heads
            );
        }
        if self.rope.dim > self.head_dim || !self.rope.dim.is_multiple_of(2) {
            bail!(
                "model config: rope dimension {} must be even and ≤ head_dim {}",
                self.rope.dim,
                self.head_dim
            );
        }
        Ok(())
    }
}

/// A token-embedding table: quantized rows are dequantized on lookup only.
#[derive(Debug, Clone)]
enum Embedding {
    Quantized(std::sync::Arc<QTensor>),
    Dense(Tensor),
}

impl Embedding {
    fn lookup(&self, ids: &[u32]) -> anyhow::Result<Vec<f32>> {
        let ids = Tensor::new(ids, &Device::Cpu)?;
        let rows = match self {
            Self::Quantized(q) => q.embedding(&ids)?,
            Self::Dense(t) => t.index_select(&ids, 0)?,
        };
        Ok(rows.flatten_all()?.to_vec1()?)
    }
}

/// Several projections of the same input: one fused matmul when their weights stack, else one each.
#[derive(Debug, Clone)]
enum MultiLinear {
    Fused { linear: Linear, widths: Vec<usize> },
    Split(Vec<Linear>),
}

impl MultiLinear {
    /// GGUF weights (+ optional biases): stacked into one quantized matmul when their types match
    /// and either all or none have a bias.
    fn from_gguf(parts: Vec<(Arc<QTensor>, Option<Tensor>)>) -> anyhow::Result<Self> {
        let with_bias = parts.iter().filter(|p| p.1.is_some()).count();
        if with_bias == 0 || with_bias == parts.len() {
            let qs: Vec<Arc<QTensor>> = parts.iter().map(|p| p.0.clone()).collect();
            if let Some(stacked) = concat_qtensors(&qs)? {
                let widths = qs
                    .iter()
                    .map(|q| q.shape().dims2().map(|d| d.0))
                    .collect::<Result<Vec<_>, _>>()?;
                let bias = match with_bias {
                    0 => None,
                    _ => Some(Tensor::cat(
                        &parts.iter().filter_map(|p| p.1.clone()).collect::<Vec<_>>(),
                        0,
                    )?),
                };
                return Ok(Self::Fused {
                    linear: Linear::from_qtensor(stacked, bias)?,
                    widths,
                });
            }
        }
        Ok(Self::Split(
            parts
                .into_iter()
                .map(|(w, b)| Linear::from_qtensor(w, b))
                .collect::<anyhow::Result<_>>()?,
        ))
    }

    /// Dense weights: always stacked (biases all-or-none, else split).
    fn from_dense(parts: Vec<(Tensor, Option<Tensor>)>) -> anyhow::Result<Self> {
        let with_bias = parts.iter().filter(|p| p.1.is_some()).count();
        if with_bias != 0 && with_bias != parts.len() {
            return Ok(Self::Split(
                parts
                    .into_iter()
                    .map(|(w, b)| Linear::from_tensor(w, b))
                    .collect::<candle_core::Result<_>>()?,
            ));
        }
        let widths = parts.iter().map(|p| p.0.dim(0)).collect::<Result<Vec<_>, _>>()?;
        let w = Tensor::cat(&parts.iter().map(|p| p.0.clone()).collect::<Vec<_>>(), 0)?;
        let bias = match with_bias {
            0 => None,
            _ => Some(Tensor::cat(
                &parts.iter().filter_map(|p| p.1.clone()).collect::<Vec<_>>(),
                0,
            )?),
        };
        Ok(Self::Fused {
            linear: Linear::from_tensor(w, bias)?,
            widths,
        })
    }

    /// Returns each projection's output `[tokens, out_i]`.
    fn forward(&self, x: &Tensor, tokens: usize) -> anyhow::Result<Vec<Vec<f32>>> {
        match self {
            Self::Split(parts) => parts.iter().map(|p| to_vec(p.forward(x)?)).collect(),
            Self::Fused { linear, widths } => {
                let y = to_vec(linear.forward(x)?)?;
                let total = linear.out_features();
                let mut outs: Vec<Vec<f32>> = widths.iter().map(|w| Vec::with_capacity(w * tokens)).collect();
                for row in y.chunks_exact(total) {
                    let mut off = 0;
                    for (o, &w) in outs.iter_mut().zip(widths) {
                        o.extend_from_slice(&row[off..off + w]);
                        off += w;
                    }
                }
                Ok(outs)
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Layer {
    attn_norm: Vec<f32>,
    qkv: MultiLinear,
    wo: Linear,
    ffn_norm: Vec<f32>,
    gate_up: MultiLinear,
    down: Linear,
}

/// Attention callback: `(layer, q [T, heads·hd], k [T, kv_heads·hd], v, out [T, heads·hd])`, q/k
/// already rotated.
pub(crate) type AttentionFn<'a> = dyn FnMut(usize, &[f32], &[f32], &[f32], &mut [f32]) -> anyhow::Result<()> + 'a;

#[derive(Debug, Clone)]
pub(crate) struct Llama {
    pub(crate) cfg: LlamaConfig,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    lm_head: Linear,
}

fn to_vec(t: Tensor) -> anyhow::Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// Reads a small GGUF tensor (norm weights, rope factors) as f32.
pub(crate) fn gguf_f32(g: &mut GgufFile, name: &str) -> anyhow::Result<Vec<f32>> {
    let q = g.tensor(name)?;
    to_vec(q.dequantize(&Device::Cpu)?).with_context(|| format!("tensor {name}"))
}

impl Llama {
    /// Reads and validates the model config of a Llama-family GGUF (shared with the CUDA loader).
    pub(crate) fn gguf_config(g: &mut GgufFile) -> anyhow::Result<LlamaConfig> {
        let arch = g.str("general.architecture")?.to_string();
        let style = match arch.as_str() {
            "llama" => RopeStyle::Interleaved,
            "qwen2" => RopeStyle::Neox,
            other => bail!(
                "GGUF {}: architecture {other} is not supported (llama, qwen2)",
                g.path.display()
            ),
        };
        let k = |s: &str| format!("{arch}.{s}");
        let hidden_size = g.usize(&k("embedding_length"))?;
        let num_heads = g.usize(&k("attention.head_count"))?;
        let head_dim = g.usize_or(&k("attention.key_length"), hidden_size / num_heads.max(1))?;
        let vocab_size = match g.usize_or(&k("vocab_size"), 0)? {
            0 => g.array("tokenizer.ggml.tokens")?.len(),
            n => n,
        };
        let mut rope = Rope::new(
            style,
            g.usize_or(&k("rope.dimension_count"), head_dim)?,
            g.f32_or(&k("rope.freq_base"), 10_000.0)? as f64,
        );
        match g.opt_str(&k("rope.scaling.type"))? {
            None | Some("none") => {}
            Some("linear") => rope.pos_scale = 1.0 / g.f32(&k("rope.scaling.factor"))? as f64,
            Some(other) => bail!("GGUF {}: rope.scaling.type {other} is not supported", g.path.display()),
        }
        // Llama 3.1 conversions store the per-frequency divisors as a tensor.
        if g.has_tensor("rope_freqs.weight") {
            let factors = gguf_f32(g, "rope_freqs.weight")?;
            if factors.len() != rope.inv_freq.len() {
                bail!(
                    "GGUF tensor rope_freqs.weight: {} factors for rope dim {}",
                    factors.len(),
                    rope.dim
                );
            }
            rope.inv_freq
                .iter_mut()
                .zip(&factors)
                .for_each(|(f, d)| *f /= *d as f64);
        }
        let cfg = LlamaConfig {
            vocab_size,
            hidden_size,
            intermediate_size: g.usize(&k("feed_forward_length"))?,
            num_layers: g.usize(&k("block_count"))?,
            num_heads,
            num_kv_heads: g.usize_or(&k("attention.head_count_kv"), num_heads)?,
            head_dim,
            rms_eps: g.f32_or(&k("attention.layer_norm_rms_epsilon"), 1e-5)?,
            context_length: g.usize_or(&k("context_length"), 4096)?,
            rope,
            sliding_window: match g.usize_or(&k("attention.sliding_window"), 0)? {
                0 => None,
                w => Some(w),
            },
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Loads a Llama-family GGUF (architectures `llama` — incl. Mistral conversions — and `qwen2`).
    /// `dequantize`: convert every matmul weight to f32 at load (the exact f32 path, no activation
    /// quantization; for reference comparisons — 4-8x the memory, slower).
    pub(crate) fn from_gguf(g: &mut GgufFile, dequantize: bool) -> anyhow::Result<Self> {
        let q_linear = |w: Arc<QTensor>, b: Option<Tensor>| -> anyhow::Result<Linear> {
            if dequantize {
                Ok(Linear::from_tensor(w.dequantize(&Device::Cpu)?, b)?)
            } else {
                Linear::from_qtensor(w, b)
            }
        };
        let q_multi = |parts: Vec<(Arc<QTensor>, Option<Tensor>)>| -> anyhow::Result<MultiLinear> {
            if dequantize {
                let dense = parts
                    .into_iter()
                    .map(|(w, b)| Ok((w.dequantize(&Device::Cpu)?, b)))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                MultiLinear::from_dense(dense)
            } else {
                MultiLinear::from_gguf(parts)
            }
        };
        let cfg = Self::gguf_config(g)?;
        let embed_q = g.tensor("token_embd.weight")?;
        let lm_head = match g.opt_tensor("output.weight")? {
            Some(w) => q_linear(w, None)?,
            None => q_linear(embed_q.clone(), None)?,
        };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let l = LayerTensors::from_gguf(g, i)?;
            layers.push(Layer {
                attn_norm: l.attn_norm,
                qkv: q_multi(l.qkv)?,
                wo: q_linear(l.o.0, l.o.1)?,
                ffn_norm: l.ffn_norm,
                gate_up: q_multi(l.gate_up)?,
                down: q_linear(l.down.0, l.down.1)?,
            });
        }
        let norm = gguf_f32(g, "output_norm.weight")?;
        let model = Self {
            embed: Embedding::Quantized(embed_q),
            layers,
            norm,
            lm_head,
            cfg,
        };
        model.check_shapes()?;
        Ok(model)
    }

    /// Loads an HF directory: config.json + one or more *.safetensors (f32/f16/bf16 → f32).
    pub(crate) fn from_safetensors(dir: &Path) -> anyhow::Result<Self> {
        let HfModel {
            cfg,
            qkv_bias: bias,
            tie_word_embeddings,
        } = HfModel::read(dir)?;
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        let mut w: HashMap<String, Tensor> = HashMap::new();
        for f in &files {
            let ts =
                candle_core::safetensors::load(f, &Device::Cpu).with_context(|| format!("loading {}", f.display()))?;
            w.extend(ts);
        }
        let mut take = |name: &str| -> anyhow::Result<Tensor> {
            let t = w
                .remove(name)
                .ok_or_else(|| anyhow!("{}: tensor {name} missing", dir.display()))?;
            Ok(t.to_dtype(DType::F32)?)
        };
        let embed = take("model.embed_tokens.weight")?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let l = LayerTensors::from_hf(&mut take, i, bias)?;
            layers.push(Layer {
                attn_norm: l.attn_norm,
                qkv: MultiLinear::from_dense(l.qkv)?,
                wo: Linear::from_tensor(l.o.0, l.o.1)?,
                ffn_norm: l.ffn_norm,
                gate_up: MultiLinear::from_dense(l.gate_up)?,
                down: Linear::from_tensor(l.down.0, l.down.1)?,
            });
        }
        let norm = to_vec(take("model.norm.weight")?)?;
        let lm_head = if tie_word_embeddings {
            Linear::from_tensor(embed.clone(), None)?
        } else {
            Linear::from_tensor(take("lm_head.weight")?, None)?
        };
        let model = Self {
            embed: Embedding::Dense(embed),
            layers,
            norm,
            lm_head,
            cfg,
        };
        model.check_shapes()?;
        Ok(model)
    }

    /// Catches a config/weights mismatch at load instead of a shape error mid-request.
    fn check_shapes(&self) -> anyhow::Result<()> {
        let c = &self.cfg;
        let want = |what: &str, got: usize, exp: usize| {
            if got != exp {
                Err(anyhow!("model weights: {what} has {got} features, config says {exp}"))
            } else {
                Ok(())
            }
        };
        want("lm_head out", self.lm_head.out_features(), c.vocab_size)?;
        want("lm_head in", self.lm_head.in_features(), c.hidden_size)?;
        want("output norm", self.norm.len(), c.hidden_size)?;
        let qkv = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim;
        for (i, l) in self.layers.iter().enumerate() {
            let widths: Vec<usize> = match &l.qkv {
                MultiLinear::Fused { widths, .. } => widths.clone(),
                MultiLinear::Split(p) => p.iter().map(|p| p.out_features()).collect(),
            };
            want(&format!("layer {i} q+k+v"), widths.iter().sum(), qkv)?;
            want(&format!("layer {i} q"), widths[0], c.num_heads * c.head_dim)?;
            want(
                &format!("layer {i} attn_output in"),
                l.wo.in_features(),
                c.num_heads * c.head_dim,
            )?;
            want(
                &format!("layer {i} ffn_down in"),
                l.down.in_features(),
                c.intermediate_size,
            )?;
            want(&format!("layer {i} attn_norm"), l.attn_norm.len(), c.hidden_size)?;
        }
        Ok(())
    }

    /// Runs all layers over `tokens` at `positions` and returns the final hidden states (before the
    /// output norm) `[T, hidden]`. `attention` computes each layer's attention output.
    pub(crate) fn forward_hidden(
        &self,
        tokens: &[u32],
        positions: &[usize],
        attention: &mut AttentionFn<'_>,
    ) -> anyhow::Result<Vec<f32>> {
        let c = &self.cfg;
        let t = tokens.len();
        if let Some(&bad) = tokens.iter().find(|&&id| id as usize >= c.vocab_size) {
            bail!("token id {bad} out of vocabulary ({})", c.vocab_size);
        }
        let mut x = self.embed.lookup(tokens)?;
        let (cos, sin) = c.rope.tables(positions);
        let (q_dim, kv_dim) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let mut h = vec![0f32; t * c.hidden_size];
        for (li, l) in self.layers.iter().enumerate() {
            rms_norm(&x, &l.attn_norm, c.rms_eps, &mut h);
            let ht = Tensor::from_slice(&h, (t, c.hidden_size), &Device::Cpu)?;
            let mut qkv = l.qkv.forward(&ht, t)?.into_iter();
            let (mut q, mut k, v) = match (qkv.next(), qkv.next(), qkv.next()) {
                (Some(q), Some(k), Some(v)) => (q, k, v),
                _ => bail!("layer {li}: q/k/v projection count"),
            };
            c.rope.apply(&mut q, c.num_heads, c.head_dim, &cos, &sin);
            c.rope.apply(&mut k, c.num_kv_heads, c.head_dim, &cos, &sin);
            let mut attn = vec![0f32; t * q_dim];
            debug_assert_eq!(k.len(), t * kv_dim);
            attention(li, &q, &k, &v, &mut attn)?;
            let o = to_vec(l.wo.forward(&Tensor::from_vec(attn, (t, q_dim), &Device::Cpu)?)?)?;
            x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);

            rms_norm(&x, &l.ffn_norm, c.rms_eps, &mut h);
            let ht = Tensor::from_slice(&h, (t, c.hidden_size), &Device::Cpu)?;
            let gu = l.gate_up.forward(&ht, t)?;
            let mut act = vec![0f32; gu[0].len()];
            silu_mul(&mut act, &gu[0], &gu[1])?;
            let d = to_vec(
                l.down
                    .forward(&Tensor::from_vec(act, (t, c.intermediate_size), &Device::Cpu)?)?,
            )?;
            x.iter_mut().zip(&d).for_each(|(x, d)| *x += d);
        }
        Ok(x)
    }

    /// Output norm + LM head over selected hidden rows `[n, hidden]` → one logits row per input row.
    pub(crate) fn logits(&self, hidden_rows: &[f32]) -> anyhow::Result<Vec<Vec<f32>>> {
        let hs = self.cfg.hidden_size;
        let n = hidden_rows.len() / hs;
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut h = vec![0f32; hidden_rows.len()];
        rms_norm(hidden_rows, &self.norm, self.cfg.rms_eps, &mut h);
        let y = to_vec(self.lm_head.forward(&Tensor::from_vec(h, (n, hs), &Device::Cpu)?)?)?;
        Ok(y.chunks_exact(self.cfg.vocab_size).map(<[f32]>::to_vec).collect())
    }

    /// Reference forward of one whole sequence from position 0, no paging: plain causal attention over
    /// contiguous K/V. Returns the logits after the last token. Slow; for tests.
    #[cfg(test)]
    pub(crate) fn forward_dense(&self, tokens: &[u32]) -> anyhow::Result<Vec<f32>> {
        let c = &self.cfg;
        let t = tokens.len();
        if t == 0 {
            bail!("forward_dense: empty sequence");
        }
        let positions: Vec<usize> = (0..t).collect();
        let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let scale = 1.0 / (hd as f32).sqrt();
        let mut attention = |_: usize, q: &[f32], k: &[f32], v: &[f32], out: &mut [f32]| -> anyhow::Result<()> {
            for i in 0..t {
                for h in 0..nh {
                    let g = h / (nh / nkv);
                    let qr = &q[(i * nh + h) * hd..(i * nh + h + 1) * hd];
                    let first = c.sliding_window.map_or(0, |w| (i + 1).saturating_sub(w));
                    let scores: Vec<f32> = (first..=i)
                        .map(|j| {
                            let kr = &k[(j * nkv + g) * hd..(j * nkv + g + 1) * hd];
                            qr.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() * scale
                        })
                        .collect();
                    let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
                    let z: f32 = e.iter().sum();
                    let o = &mut out[(i * nh + h) * hd..(i * nh + h + 1) * hd];
                    for (j, p) in (first..).zip(&e) {
                        let vr = &v[(j * nkv + g) * hd..(j * nkv + g + 1) * hd];
                        o.iter_mut().zip(vr).for_each(|(o, v)| *o += p / z * v);
                    }
                }
            }
            Ok(())
        };
        let x = self.forward_hidden(tokens, &positions, &mut attention)?;
        let mut rows = self.logits(&x[(t - 1) * c.hidden_size..])?;
        rows.pop().ok_or_else(|| anyhow!("forward_dense: no logits"))
    }
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    for (xr, or) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / n as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        or.iter_mut().zip(xr).zip(w).for_each(|((o, x), w)| *o = x * inv * w);
    }
}

/// What the loaders need from an HF directory's `config.json` (shared with the CUDA loader).
pub(crate) struct HfModel {
    pub(crate) cfg: LlamaConfig,
    /// q/k/v projections carry biases (Qwen2, or `attention_bias`).
    pub(crate) qkv_bias: bool,
    pub(crate) tie_word_embeddings: bool,
}

impl HfModel {
    pub(crate) fn read(dir: &Path) -> anyhow::Result<Self> {
        let cfg_path = dir.join("config.json");
        let hf: HfConfig = serde_json::from_slice(
            &std::fs::read(&cfg_path).with_context(|| format!("reading {}", cfg_path.display()))?,
        )
        .with_context(|| format!("parsing {}", cfg_path.display()))?;
        let cfg = hf.to_config()?;
        cfg.validate()?;
        Ok(Self {
            cfg,
            qkv_bias: hf.attention_bias.unwrap_or(hf.model_type == "qwen2"),
            tie_word_embeddings: hf.tie_word_embeddings,
        })
    }
}

/// A weight and its optional bias.
pub(crate) type WeightBias<W> = (W, Option<Tensor>);

/// One decoder layer's tensors read from a checkpoint: matmul weights as stored (`W`: a dense
/// `Tensor` or a GGUF `QTensor`; each loader converts them its own way), norms as f32.
pub(crate) struct LayerTensors<W> {
    pub(crate) attn_norm: Vec<f32>,
    /// q, k, v projections.
    pub(crate) qkv: Vec<WeightBias<W>>,
    pub(crate) o: WeightBias<W>,
    pub(crate) ffn_norm: Vec<f32>,
    /// gate, up projections.
    pub(crate) gate_up: Vec<WeightBias<W>>,
    pub(crate) down: WeightBias<W>,
}

impl LayerTensors<Tensor> {
    /// Layer `i` of an HF checkpoint, through `take`, which fails naming a missing tensor.
    pub(crate) fn from_hf(
        take: &mut impl FnMut(&str) -> anyhow::Result<Tensor>,
        i: usize,
        qkv_bias: bool,
    ) -> anyhow::Result<Self> {
        let p = format!("model.layers.{i}");
        let mut lin = |name: &str, bias: bool| -> anyhow::Result<WeightBias<Tensor>> {
            let w = take(&format!("{p}.{name}.weight"))?;
            let b = if bias {
                Some(take(&format!("{p}.{name}.bias"))?)
            } else {
                None
            };
            Ok((w, b))
        };
        let qkv = vec![
            lin("self_attn.q_proj", qkv_bias)?,
            lin("self_attn.k_proj", qkv_bias)?,
            lin("self_attn.v_proj", qkv_bias)?,
        ];
        let o = lin("self_attn.o_proj", false)?;
        let gate_up = vec![lin("mlp.gate_proj", false)?, lin("mlp.up_proj", false)?];
        let down = lin("mlp.down_proj", false)?;
        let mut norm = |name: &str| -> anyhow::Result<Vec<f32>> {
            to_vec(take(&format!("{p}.{name}.weight"))?.to_dtype(DType::F32)?)
        };
        Ok(Self {
            attn_norm: norm("input_layernorm")?,
            qkv,
            o,
            ffn_norm: norm("post_attention_layernorm")?,
            gate_up,
            down,
        })
    }
}

impl LayerTensors<Arc<QTensor>> {
    /// Layer `i` (`blk.{i}.*`) of a Llama-family GGUF; biases (Qwen2's q/k/v) dequantized.
    pub(crate) fn from_gguf(g: &mut GgufFile, i: usize) -> anyhow::Result<Self> {
        let p = |s: &str| format!("blk.{i}.{s}");
        let mut lin = |name: &str| -> anyhow::Result<WeightBias<Arc<QTensor>>> {
            let w = g.tensor(&p(&format!("{name}.weight")))?;
            let b = match g.opt_tensor(&p(&format!("{name}.bias")))? {
                Some(b) => Some(b.dequantize(&Device::Cpu)?),
                None => None,
            };
            Ok((w, b))
        };
        let qkv = vec![lin("attn_q")?, lin("attn_k")?, lin("attn_v")?];
        let gate_up = vec![lin("ffn_gate")?, lin("ffn_up")?];
        let o = lin("attn_output")?;
        let down = lin("ffn_down")?;
        Ok(Self {
            attn_norm: gguf_f32(g, &p("attn_norm.weight"))?,
            qkv,
            o,
            ffn_norm: gguf_f32(g, &p("ffn_norm.weight"))?,
            gate_up,
            down,
        })
    }
}

/// The fields of an HF `config.json` this model reads.
#[derive(Debug, Deserialize)]
struct HfConfig {
    #[serde(default)]
    model_type: String,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f32,
    #[serde(default = "default_theta")]
    rope_theta: f64,
    #[serde(default = "default_ctx")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    attention_bias: Option<bool>,
    rope_scaling: Option<HfRopeScaling>,
    /// Mistral v0.1 sets it; Qwen2 sets it too but gates it with `use_sliding_window`.
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct HfRopeScaling {
    #[serde(alias = "type")]
    rope_type: String,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<f64>,
}

fn default_eps() -> f32 {
    1e-5
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_ctx() -> usize {
    4096
}

impl HfConfig {
    fn to_config(&self) -> anyhow::Result<LlamaConfig> {
        match self.model_type.as_str() {
            "llama" | "mistral" | "qwen2" | "" => {}
            other => bail!("config.json: model_type {other} is not supported (llama, mistral, qwen2)"),
        }
        let head_dim = self
            .head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1));
        let mut rope = Rope::new(RopeStyle::Neox, head_dim, self.rope_theta);
        if let Some(s) = &self.rope_scaling {
            let need = |v: Option<f64>, f: &str| v.ok_or_else(|| anyhow!("config.json: rope_scaling.{f} missing"));
            match s.rope_type.as_str() {
                "default" => {}
                "linear" => rope.pos_scale = 1.0 / need(s.factor, "factor")?,
                "llama3" => rope.llama3(
                    need(s.factor, "factor")?,
                    need(s.low_freq_factor, "low_freq_factor")?,
                    need(s.high_freq_factor, "high_freq_factor")?,
                    need(s.original_max_position_embeddings, "original_max_position_embeddings")?,
                ),
                other => bail!("config.json: rope_scaling.rope_type {other} is not supported"),
            }
        }
        Ok(LlamaConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim,
            rms_eps: self.rms_norm_eps,
            context_length: self.max_position_embeddings,
            rope,
            sliding_window: self.sliding_window.filter(|_| self.use_sliding_window.unwrap_or(true)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_styles_rotate_the_documented_pairs() {
        let mut r = Rope::new(RopeStyle::Interleaved, 4, 10_000.0);
        let (c, s) = r.tables(&[1]);
        let mut x = vec![1.0, 0.0, 1.0, 0.0];
        r.apply(&mut x, 1, 4, &c, &s);
        // Pair 0 rotates by 1 rad, pair 1 by 1e-2 rad.
        assert!(
            (x[0] - 1f32.cos()).abs() < 1e-6 && (x[1] - 1f32.sin()).abs() < 1e-6,
            "{x:?}"
        );
        assert!((x[3] - 0.01f32.sin()).abs() < 1e-6, "{x:?}");
        r.style = RopeStyle::Neox;
        let mut y = vec![1.0, 1.0, 0.0, 0.0];
        r.apply(&mut y, 1, 4, &c, &s);
        assert!(
            (y[2] - 1f32.sin()).abs() < 1e-6 && (y[3] - 0.01f32.sin()).abs() < 1e-6,
            "{y:?}"
        );
    }

    #[test]
    fn cos_sin_cache_matches_the_kernel_reference_table_and_tables() {
        let r = Rope::new(RopeStyle::Neox, 8, 10_000.0);
        let got = r.cos_sin_cache(5);
        let want = genai_kernels::cpu::rotary::rope_cos_sin_cache(5, 8, 10_000.0);
        assert_eq!(got.len(), want.len());
        assert!(
            got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-6),
            "{got:?} vs {want:?}"
        );
        let mut scaled = r.clone();
        scaled.pos_scale = 0.25;
        let (cos, sin) = scaled.tables(&[3]);
        assert_eq!(&scaled.cos_sin_cache(4)[3 * 8..], [cos, sin].concat().as_slice());
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let mut r = Rope::new(RopeStyle::Neox, 128, 500_000.0);
        let orig = r.inv_freq.clone();
        r.llama3(8.0, 1.0, 4.0, 8192.0);
        assert_eq!(r.inv_freq[0], orig[0]);
        assert!((r.inv_freq[63] - orig[63] / 8.0).abs() < 1e-12);
    }
}

//! [`CudaRunner`]: the GPU [`ModelRunner`] (feature `cuda`) — the same varlen paged forward as the
//! CPU [`LlamaRunner`](super::paged::LlamaRunner), with weights and KV cache on one CUDA device.
//!
//! Weights: GGUF quantized matrices stay quantized on the device and run through candle's CUDA
//! quantized matmul (on f32 activations, the one input type all its paths accept); f16/f32/bf16
//! GGUF tensors and safetensors weights become dense matrices in the activation dtype `T` (cuBLAS
//! through candle). q/k/v and gate/up are stacked into one matmul where the weights allow, as on
//! the CPU. `T` is f16 for GGUF (llama.cpp's KV type; bf16 for Qwen2, whose activations can
//! exceed f16's range) and f16 safetensors, bf16 otherwise.
//!
//! One step, mapped onto `genai_kernels::cuda` (all launches on candle's stream of this device):
//! embeddings (candle `index_select`) → `rms_norm` → per layer: QKV matmul (candle), split into
//! contiguous q/k/v, `rotary_embedding` (f32 cos/sin table built from the model's own RoPE, so
//! llama3/linear scaling match the CPU), `reshape_and_cache` into this layer's paged caches,
//! attention, o_proj (candle), `fused_add_rms_norm`, gate/up matmul, `silu_and_mul`, down matmul,
//! `fused_add_rms_norm` with the next layer's (or the final) norm → LM head over the last token of
//! each entry with `want_logits` → f32 logits copied to the host.
//!
//! Attention: tokens are laid out decode entries first (one token each), then prefill entries
//! ([`step_plan`], which also validates the batch), so the decode rows are one contiguous block
//! for `paged_attention_decode` (split-K above [`genai_kernels::cuda::PARTITION_SIZE`] keys) and
//! the rest one block for the varlen causal `paged_attention_prefill`. Each group gets its own [`AttentionMetadata`], uploaded once per step.
//!
//! Invariants: the KV pool is per layer a key and a value cache `[num_blocks, block_size,
//! num_kv_heads, head_dim]` in `T` (the kernels' layout), allocated once by `allocate_kv`;
//! copy-on-write copies (`ForwardBatch::block_copies`) are applied in order to every layer before the
//! step. Every index the kernels trust (block tables, slots, positions) is validated on the host
//! first (here, and again by the kernel wrappers), so bad input is an error, not a device fault.
//! candle owns matmul outputs, so rows a kernel updates in place (q/k for RoPE, the residual-stream
//! input of the fused add + norm) are copied into buffers we own first.
//!
//! Tests: the host-side layout is `step_plan`'s unit tests and the RoPE table
//! `Rope::cos_sin_cache`'s; the rest needs a GPU. CI runs `cargo clippy --features cuda`
//! (`scripts/check-kernels.sh`); greedy parity with the CPU runner on SmolLM2 (and the embedder's)
//! is `scripts/gpu-check.sh run` (section "server parity") on a GPU host.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{CudaDevice, DType, Device, Module, Tensor};
use cudarc::driver::{CudaSlice, CudaStream};
use genai_kernels::cpu::rotary::{Rope as KernelRope, RopeLayout};
use genai_kernels::cuda::{AttentionMetadata, CudaKernels, DecodeVariant, PagedCache, Positions, SlotMapping};

use super::gguf::GgufFile;
use super::linear::concat_qtensors;
use super::llama::{gguf_f32, HfModel, LayerTensors, Llama, LlamaConfig, RopeStyle};
use super::paged::kv_layer_elems;
use super::step_plan;
use crate::gpu::{with_slice, wrap, GpuFloat};
use genai_engine::runner::{ForwardBatch, ModelInfo, ModelRunner};
use genai_engine::EngineConfig;

/// A loaded CUDA model, type-erased over its activation dtype.
pub(crate) struct CudaLoad {
    pub(crate) cfg: LlamaConfig,
    pub(crate) kv_bytes_per_token: usize,
    /// KV-cache budget: free device memory after loading × `engine.gpu_memory_fraction`, less the
    /// activation reserve of [`activation_reserve`].
    pub(crate) kv_cache_mib: usize,
    runner: Box<dyn FnOnce(ModelInfo) -> Box<dyn ModelRunner> + Send>,
}

impl CudaLoad {
    pub(crate) fn into_runner(self, info: ModelInfo) -> Box<dyn ModelRunner> {
        (self.runner)(info)
    }
}

fn erase<T: GpuFloat>(model: CudaLlama<T>, engine: &EngineConfig) -> anyhow::Result<CudaLoad> {
    let kv_cache_mib = model.kv_cache_mib(engine)?;
    Ok(CudaLoad {
        cfg: model.cfg.clone(),
        kv_bytes_per_token: model.kv_bytes_per_token(),
        kv_cache_mib,
        runner: Box::new(move |info| Box::new(CudaRunner { model, info, kv: None })),
    })
}

/// Opens GPU `ordinal` with its own stream (one stream per model: every launch and copy of the
/// model is ordered on it, whichever thread issues it).
fn open_device(ordinal: usize) -> anyhow::Result<Device> {
    Device::new_cuda_with_stream(ordinal).with_context(|| format!("opening CUDA device {ordinal}"))
}

/// Refuses, before any weight is uploaded, what the kernels cannot run.
fn check_supported(cfg: &LlamaConfig) -> anyhow::Result<()> {
    if cfg.head_dim != 64 && cfg.head_dim != 128 {
        bail!(
            "model head_dim {} is not supported on CUDA (the attention kernels exist for 64 and 128); use --device cpu",
            cfg.head_dim
        );
    }
    // The CUDA attention kernels have no window mask yet; attending past the window would be wrong.
    if let Some(w) = cfg.sliding_window.filter(|&w| w < cfg.context_length) {
        bail!("sliding-window attention ({w} positions) is not supported on CUDA yet; use --device cpu");
    }
    Ok(())
}

/// Loads a Llama-family GGUF onto GPU `ordinal`: f16 activations and KV cache (llama.cpp's KV type,
/// 3 more mantissa bits than bf16), except Qwen2, whose residual stream can exceed f16's range.
pub(crate) fn load_gguf(g: &mut GgufFile, ordinal: usize, engine: &EngineConfig) -> anyhow::Result<CudaLoad> {
    if g.str("general.architecture")? == "qwen2" {
        erase(CudaLlama::<half::bf16>::from_gguf(g, ordinal)?, engine)
    } else {
        erase(CudaLlama::<half::f16>::from_gguf(g, ordinal)?, engine)
    }
}

/// Loads an HF safetensors directory onto GPU `ordinal` (f16 if its weights are f16, else bf16).
pub(crate) fn load_safetensors(dir: &Path, ordinal: usize, engine: &EngineConfig) -> anyhow::Result<CudaLoad> {
    let tensors = read_safetensors(dir)?;
    let f16 = tensors
        .get("model.embed_tokens.weight")
        .is_some_and(|t| t.dtype() == DType::F16);
    if f16 {
        erase(CudaLlama::<half::f16>::from_safetensors(dir, tensors, ordinal)?, engine)
    } else {
        erase(
            CudaLlama::<half::bf16>::from_safetensors(dir, tensors, ordinal)?,
            engine,
        )
    }
}

fn read_safetensors(dir: &Path) -> anyhow::Result<HashMap<String, Tensor>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    let mut w = HashMap::new();
    for f in &files {
        w.extend(candle_core::safetensors::load(f, &Device::Cpu).with_context(|| format!("loading {}", f.display()))?);
    }
    Ok(w)
}

/// One projection on the device. Input and output `[tokens, features]` in `T`.
enum GpuLinear {
    /// GGML-quantized weight: candle's CUDA quantized matmul on f32 activations.
    Quant { w: QMatMul, bias: Option<Tensor> },
    /// Dense `[out, in]` weight in `T` (cuBLAS).
    Dense { w: Tensor, bias: Option<Tensor> },
}

impl GpuLinear {
    fn from_qtensor<T: GpuFloat>(q: &QTensor, bias: Option<Tensor>, dev: &Device) -> anyhow::Result<Self> {
        let bias = bias.map(|b| to_dev::<T>(&b, dev)).transpose()?;
        match q.dtype() {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => Ok(Self::Dense {
                w: to_dev::<T>(&q.dequantize(&Device::Cpu)?, dev)?,
                bias,
            }),
            dtype => {
                let storage = QStorage::from_data(q.data()?, dev, dtype)?;
                let w = QMatMul::from_arc(Arc::new(QTensor::new(storage, q.shape().clone())?))?;
                Ok(Self::Quant { w, bias })
            }
        }
    }

    fn from_dense<T: GpuFloat>(w: &Tensor, bias: Option<Tensor>, dev: &Device) -> anyhow::Result<Self> {
        Ok(Self::Dense {
            w: to_dev::<T>(w, dev)?,
            bias: bias.map(|b| to_dev::<T>(&b, dev)).transpose()?,
        })
    }

    fn out_features(&self) -> anyhow::Result<usize> {
        Ok(match self {
            Self::Quant {
                w: QMatMul::QTensor(q), ..
            } => q.shape().dims2()?.0,
            Self::Quant {
                w: QMatMul::Tensor(w) | QMatMul::TensorF16(w),
                ..
            }
            | Self::Dense { w, .. } => w.dims2()?.0,
        })
    }

    /// `[tokens, in]` in `T` → `[tokens, out]` in `T`.
    fn forward<T: GpuFloat>(&self, x: &Tensor) -> anyhow::Result<Tensor> {
        match self {
            Self::Quant { .. } => Ok(self.forward_f32(x)?.to_dtype(T::DTYPE)?),
            Self::Dense { w, bias } => {
                let y = x.matmul(&w.t()?)?;
                Ok(match bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                })
            }
        }
    }

    /// `[tokens, in]` in `T` → `[tokens, out]` in f32 (the LM head: quantized heads keep their f32
    /// output, so near-tied logits are not rounded to `T` before sampling).
    fn forward_f32(&self, x: &Tensor) -> anyhow::Result<Tensor> {
        let (y, bias) = match self {
            Self::Quant { w, bias } => (w.forward(&x.to_dtype(DType::F32)?)?.to_dtype(DType::F32)?, bias),
            Self::Dense { w, bias } => (x.matmul(&w.t()?)?.to_dtype(DType::F32)?, bias),
        };
        Ok(match bias {
            Some(b) => y.broadcast_add(&b.to_dtype(DType::F32)?)?,
            None => y,
        })
    }
}

/// Host tensor → device tensor in `T`.
fn to_dev<T: GpuFloat>(t: &Tensor, dev: &Device) -> anyhow::Result<Tensor> {
    Ok(t.to_dtype(T::DTYPE)?.to_device(dev)?)
}

/// Projections of one input: a single stacked matmul (`widths` = each projection's share of its
/// output columns) or one matmul each.
struct Proj {
    parts: Vec<GpuLinear>,
    widths: Vec<usize>,
}

impl Proj {
    /// GGUF weights: stacked when their GGML types match and biases are all-or-none.
    fn from_gguf<T: GpuFloat>(parts: Vec<(Arc<QTensor>, Option<Tensor>)>, dev: &Device) -> anyhow::Result<Self> {
        let widths = parts
            .iter()
            .map(|p| p.0.shape().dims2().map(|d| d.0))
            .collect::<Result<Vec<_>, _>>()?;
        let with_bias = parts.iter().filter(|p| p.1.is_some()).count();
        if with_bias == 0 || with_bias == parts.len() {
            let qs: Vec<Arc<QTensor>> = parts.iter().map(|p| p.0.clone()).collect();
            if let Some(stacked) = concat_qtensors(&qs)? {
                let bias = cat_biases(&parts)?;
                return Ok(Self {
                    parts: vec![GpuLinear::from_qtensor::<T>(&stacked, bias, dev)?],
                    widths,
                });
            }
        }
        let parts = parts
            .into_iter()
            .map(|(w, b)| GpuLinear::from_qtensor::<T>(&w, b, dev))
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { parts, widths })
    }

    /// Dense weights: always stacked when biases are all-or-none.
    fn from_dense<T: GpuFloat>(parts: Vec<(Tensor, Option<Tensor>)>, dev: &Device) -> anyhow::Result<Self> {
        let widths = parts.iter().map(|p| p.0.dim(0)).collect::<Result<Vec<_>, _>>()?;
        let with_bias = parts.iter().filter(|p| p.1.is_some()).count();
        if with_bias == 0 || with_bias == parts.len() {
            let ws: Vec<Tensor> = parts.iter().map(|p| p.0.to_dtype(T::DTYPE)).collect::<Result<_, _>>()?;
            let bias = cat_biases(&parts)?;
            return Ok(Self {
                parts: vec![GpuLinear::from_dense::<T>(&Tensor::cat(&ws, 0)?, bias, dev)?],
                widths,
            });
        }
        let parts = parts
            .into_iter()
            .map(|(w, b)| GpuLinear::from_dense::<T>(&w, b, dev))
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { parts, widths })
    }

    fn width(&self) -> usize {
        self.widths.iter().sum()
    }

    /// Each projection's output, contiguous `[tokens, width_i]`.
    fn forward_split<T: GpuFloat>(&self, x: &Tensor) -> anyhow::Result<Vec<Tensor>> {
        if self.parts.len() == self.widths.len() {
            return self.parts.iter().map(|p| p.forward::<T>(x)).collect();
        }
        let y = self.parts[0].forward::<T>(x)?;
        let mut off = 0;
        let mut outs = Vec::with_capacity(self.widths.len());
        for &w in &self.widths {
            outs.push(y.narrow(1, off, w)?.contiguous()?);
            off += w;
        }
        Ok(outs)
    }

    /// All projections side by side, `[tokens, sum(widths)]` (gate then up for `silu_and_mul`).
    fn forward_cat<T: GpuFloat>(&self, x: &Tensor) -> anyhow::Result<Tensor> {
        if self.parts.len() == 1 {
            return self.parts[0].forward::<T>(x);
        }
        let outs = self.forward_split::<T>(x)?;
        Ok(Tensor::cat(&outs, 1)?)
    }
}

fn cat_biases<W>(parts: &[(W, Option<Tensor>)]) -> anyhow::Result<Option<Tensor>> {
    let bs: Vec<Tensor> = parts.iter().filter_map(|p| p.1.clone()).collect();
    if bs.is_empty() {
        return Ok(None);
    }
    let bs = bs
        .iter()
        .map(|b| b.to_dtype(DType::F32))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(Tensor::cat(&bs, 0)?))
}

struct GpuLayer<T> {
    attn_norm: CudaSlice<T>,
    qkv: Proj,
    wo: GpuLinear,
    ffn_norm: CudaSlice<T>,
    gate_up: Proj,
    down: GpuLinear,
}

/// Llama-family weights on one CUDA device, plus the kernels and the RoPE table.
struct CudaLlama<T> {
    cfg: LlamaConfig,
    device: Device,
    cuda: CudaDevice,
    kernels: CudaKernels,
    /// Token embeddings `[vocab, hidden]` in `T`.
    embed: Tensor,
    layers: Vec<GpuLayer<T>>,
    norm: CudaSlice<T>,
    lm_head: GpuLinear,
    rope: KernelRope,
    /// f32 `[context_length, rope.dim]`: per position the cosines, then the sines.
    cos_sin: CudaSlice<f32>,
}

/// What a loader hands [`CudaLlama::assemble`] for one layer (host tensors, any float dtype).
struct HostLayer {
    attn_norm: Vec<f32>,
    qkv: Proj,
    wo: GpuLinear,
    ffn_norm: Vec<f32>,
    gate_up: Proj,
    down: GpuLinear,
}

impl<T: GpuFloat> CudaLlama<T> {
    fn from_gguf(g: &mut GgufFile, ordinal: usize) -> anyhow::Result<Self> {
        let cfg = Llama::gguf_config(g)?;
        check_supported(&cfg)?;
        let device = open_device(ordinal)?;
        let embed_q = g.tensor("token_embd.weight")?;
        let embed = to_dev::<T>(&embed_q.dequantize(&Device::Cpu)?, &device)?;
        let lm_head = match g.opt_tensor("output.weight")? {
            Some(w) => GpuLinear::from_qtensor::<T>(&w, None, &device)?,
            None => GpuLinear::from_qtensor::<T>(&embed_q, None, &device)?,
        };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let l = LayerTensors::from_gguf(g, i)?;
            layers.push(HostLayer {
                attn_norm: l.attn_norm,
                qkv: Proj::from_gguf::<T>(l.qkv, &device)?,
                wo: GpuLinear::from_qtensor::<T>(&l.o.0, l.o.1, &device)?,
                ffn_norm: l.ffn_norm,
                gate_up: Proj::from_gguf::<T>(l.gate_up, &device)?,
                down: GpuLinear::from_qtensor::<T>(&l.down.0, l.down.1, &device)?,
            });
        }
        let norm = gguf_f32(g, "output_norm.weight")?;
        Self::assemble(cfg, device, embed, layers, norm, lm_head)
    }

    fn from_safetensors(dir: &Path, mut w: HashMap<String, Tensor>, ordinal: usize) -> anyhow::Result<Self> {
        let HfModel {
            cfg,
            qkv_bias,
            tie_word_embeddings,
        } = HfModel::read(dir)?;
        check_supported(&cfg)?;
        let device = open_device(ordinal)?;
        let mut take = |name: &str| -> anyhow::Result<Tensor> {
            w.remove(name)
                .ok_or_else(|| anyhow!("{}: tensor {name} missing", dir.display()))
        };
        let f32_vec = |t: Tensor| -> anyhow::Result<Vec<f32>> { Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?) };
        let embed_host = take("model.embed_tokens.weight")?;
        let embed = to_dev::<T>(&embed_host, &device)?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let l = LayerTensors::from_hf(&mut take, i, qkv_bias)?;
            layers.push(HostLayer {
                attn_norm: l.attn_norm,
                qkv: Proj::from_dense::<T>(l.qkv, &device)?,
                wo: GpuLinear::from_dense::<T>(&l.o.0, l.o.1, &device)?,
                ffn_norm: l.ffn_norm,
                gate_up: Proj::from_dense::<T>(l.gate_up, &device)?,
                down: GpuLinear::from_dense::<T>(&l.down.0, l.down.1, &device)?,
            });
        }
        let norm = f32_vec(take("model.norm.weight")?)?;
        let lm_head = if tie_word_embeddings {
            // Shares the embedding's device memory.
            GpuLinear::Dense {
                w: embed.clone(),
                bias: None,
            }
        } else {
            GpuLinear::from_dense::<T>(&take("lm_head.weight")?, None, &device)?
        };
        Self::assemble(cfg, device, embed, layers, norm, lm_head)
    }

    /// Uploads the norms and the RoPE table, loads the kernels and checks every shape against the
    /// config (a mismatch fails at load, not mid-request).
    fn assemble(
        cfg: LlamaConfig,
        device: Device,
        embed: Tensor,
        host_layers: Vec<HostLayer>,
        norm: Vec<f32>,
        lm_head: GpuLinear,
    ) -> anyhow::Result<Self> {
        let cuda = device.as_cuda_device()?.clone();
        let kernels = CudaKernels::new(cuda.cuda_stream()).context("loading the CUDA kernels")?;
        let stream = kernels.stream().clone();
        let want = |what: &str, got: usize, exp: usize| {
            if got != exp {
                Err(anyhow!("model weights: {what} has {got} features, config says {exp}"))
            } else {
                Ok(())
            }
        };
        let c = &cfg;
        want("token embeddings", embed.dims2()?.1, c.hidden_size)?;
        want("lm_head out", lm_head.out_features()?, c.vocab_size)?;
        want("output norm", norm.len(), c.hidden_size)?;
        let upload = |v: &[f32]| -> anyhow::Result<CudaSlice<T>> {
            let v: Vec<T> = v.iter().map(|&x| T::from_f32(x)).collect();
            Ok(stream.clone_htod(&v)?)
        };
        let mut layers = Vec::with_capacity(host_layers.len());
        for (i, l) in host_layers.into_iter().enumerate() {
            want(
                &format!("layer {i} q+k+v"),
                l.qkv.width(),
                (c.num_heads + 2 * c.num_kv_heads) * c.head_dim,
            )?;
            want(&format!("layer {i} q"), l.qkv.widths[0], c.num_heads * c.head_dim)?;
            want(
                &format!("layer {i} gate+up"),
                l.gate_up.width(),
                2 * c.intermediate_size,
            )?;
            want(&format!("layer {i} gate"), l.gate_up.widths[0], c.intermediate_size)?;
            want(
                &format!("layer {i} attn_output out"),
                l.wo.out_features()?,
                c.hidden_size,
            )?;
            want(
                &format!("layer {i} ffn_down out"),
                l.down.out_features()?,
                c.hidden_size,
            )?;
            want(&format!("layer {i} attn_norm"), l.attn_norm.len(), c.hidden_size)?;
            want(&format!("layer {i} ffn_norm"), l.ffn_norm.len(), c.hidden_size)?;
            layers.push(GpuLayer {
                attn_norm: upload(&l.attn_norm)?,
                qkv: l.qkv,
                wo: l.wo,
                ffn_norm: upload(&l.ffn_norm)?,
                gate_up: l.gate_up,
                down: l.down,
            });
        }
        if layers.is_empty() {
            bail!("model config: num_layers must be > 0");
        }
        let rope = KernelRope {
            head_dim: c.head_dim,
            rot_dim: c.rope.dim,
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            layout: match c.rope.style {
                RopeStyle::Interleaved => RopeLayout::Interleaved,
                RopeStyle::Neox => RopeLayout::Neox,
            },
        };
        let cos_sin = stream.clone_htod(&c.rope.cos_sin_cache(c.context_length))?;
        let norm = upload(&norm)?;
        // Loading is asynchronous on the stream: surface any upload fault here, not in the first step.
        stream.synchronize()?;
        Ok(Self {
            cfg,
            device,
            cuda,
            kernels,
            embed,
            layers,
            norm,
            lm_head,
            rope,
            cos_sin,
        })
    }

    fn kv_bytes_per_token(&self) -> usize {
        let c = &self.cfg;
        2 * c.num_layers * c.num_kv_heads * c.head_dim * std::mem::size_of::<T>()
    }

    /// KV budget in MiB: free device memory × `engine.gpu_memory_fraction`, less the activation
    /// reserve.
    fn kv_cache_mib(&self, engine: &EngineConfig) -> anyhow::Result<usize> {
        let (free, total) = self.kernels.stream().context().mem_get_info()?;
        let budget = (free as f64 * f64::from(engine.gpu_memory_fraction)) as usize;
        let reserve = activation_reserve(&self.cfg, engine);
        let mib = budget.saturating_sub(reserve) >> 20;
        if mib == 0 {
            bail!(
                "GPU memory: {} MiB free of {} MiB after loading the model; \
                 engine.gpu_memory_fraction = {} leaves nothing for the KV cache after a {} MiB activation reserve",
                free >> 20,
                total >> 20,
                engine.gpu_memory_fraction,
                reserve >> 20
            );
        }
        tracing::info!(
            free_mib = free >> 20,
            total_mib = total >> 20,
            kv_cache_mib = mib,
            "GPU memory after loading weights"
        );
        Ok(mib)
    }
}

/// Device memory a step may need besides weights and KV cache: every per-token activation of the
/// widest step (`engine.max_batch_tokens`) a few times over in f32 (the quantized matmuls' inputs
/// and outputs are f32), the logits of `engine.max_running` rows, and 512 MiB for cuBLAS
/// workspaces, module images and allocator slack. A deliberate over-estimate.
fn activation_reserve(c: &LlamaConfig, engine: &EngineConfig) -> usize {
    let qkv = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim;
    let per_token = 4 * 4 * (3 * c.hidden_size + qkv + 3 * c.intermediate_size);
    let logits = engine.max_running * c.vocab_size * 4 * 3;
    engine.max_batch_tokens * per_token + logits + (512 << 20)
}

/// A copy of `t`'s elements in a buffer we own (so a kernel may update it in place).
fn owned<T: GpuFloat>(t: &Tensor, stream: &Arc<CudaStream>) -> anyhow::Result<CudaSlice<T>> {
    with_slice(t, |s| Ok(stream.clone_dtod(s)?))
}

/// Copies block `src` of a cache over block `dst` (`block` elements each), through a scratch copy
/// because a buffer cannot be borrowed as source and destination at once.
fn copy_block<T: GpuFloat>(
    stream: &Arc<CudaStream>,
    cache: &mut CudaSlice<T>,
    src: usize,
    dst: usize,
    block: usize,
) -> anyhow::Result<()> {
    let tmp = stream.clone_dtod(&cache.slice(src * block..(src + 1) * block))?;
    stream.memcpy_dtod(&tmp, &mut cache.slice_mut(dst * block..(dst + 1) * block))?;
    Ok(())
}

struct KvPool<T> {
    /// Per layer: (key cache, value cache).
    layers: Vec<(CudaSlice<T>, CudaSlice<T>)>,
    num_blocks: usize,
    block_size: usize,
}

/// The CUDA [`ModelRunner`].
struct CudaRunner<T> {
    model: CudaLlama<T>,
    info: ModelInfo,
    kv: Option<KvPool<T>>,
}

/// Per-step attention inputs shared by all layers.
struct StepAttention {
    /// Decode entries (one token each): the first `decode_tokens` rows.
    decode: Option<AttentionMetadata>,
    /// Prefill entries: the remaining rows.
    prefill: Option<AttentionMetadata>,
    decode_tokens: usize,
}

impl<T: GpuFloat> CudaLlama<T> {
    /// Attention over this layer's caches for all `tokens` rows of `q` (`[tokens, heads·hd]`).
    fn attention(
        &self,
        q: &CudaSlice<T>,
        cache: &PagedCache<'_, T>,
        step: &StepAttention,
        tokens: usize,
    ) -> anyhow::Result<CudaSlice<T>> {
        let k = &self.kernels;
        let stream = k.stream();
        let c = &self.cfg;
        let (nh, w) = (c.num_heads, c.num_heads * c.head_dim);
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        let mut out = stream.alloc_zeros::<T>(tokens * w)?;
        match (&step.decode, &step.prefill) {
            (Some(d), None) => k.paged_attention_decode(&mut out, q, cache, d, nh, scale, DecodeVariant::Auto)?,
            (None, Some(p)) => k.paged_attention_prefill(&mut out, q, cache, p, nh, scale)?,
            (Some(d), Some(p)) => {
                // The kernels take whole buffers: split q into the decode and prefill rows, run
                // each, and place both results back in row order.
                let split = step.decode_tokens * w;
                let qd = stream.clone_dtod(&q.slice(..split))?;
                let qp = stream.clone_dtod(&q.slice(split..))?;
                let mut od = stream.alloc_zeros::<T>(split)?;
                let mut op = stream.alloc_zeros::<T>(tokens * w - split)?;
                k.paged_attention_decode(&mut od, &qd, cache, d, nh, scale, DecodeVariant::Auto)?;
                k.paged_attention_prefill(&mut op, &qp, cache, p, nh, scale)?;
                stream.memcpy_dtod(&od, &mut out.slice_mut(..split))?;
                stream.memcpy_dtod(&op, &mut out.slice_mut(split..))?;
            }
            (None, None) => bail!("internal: attention step without sequences"),
        }
        Ok(out)
    }

    /// Decoder layer `li` over `h` (its normed input, consumed): adds its attention and MLP outputs
    /// to `residual` and returns the next normed input (normed with the next layer's input norm, or
    /// the final norm after the last layer).
    fn layer(
        &self,
        li: usize,
        h: CudaSlice<T>,
        residual: &mut CudaSlice<T>,
        kv: &mut (CudaSlice<T>, CudaSlice<T>),
        step: &Step,
    ) -> anyhow::Result<CudaSlice<T>> {
        let c = &self.cfg;
        let (hs, row, tokens) = (c.hidden_size, c.num_kv_heads * c.head_dim, step.tokens);
        let stream = self.kernels.stream();
        let l = &self.layers[li];
        let qkv = l.qkv.forward_split::<T>(&wrap(h, &self.cuda, tokens, hs)?)?;
        let [q_t, k_t, v_t] =
            <[Tensor; 3]>::try_from(qkv).map_err(|_| anyhow!("layer {li}: q/k/v projection count"))?;
        let mut q = owned::<T>(&q_t, stream)?;
        let mut k = owned::<T>(&k_t, stream)?;
        drop((q_t, k_t));
        self.kernels
            .rotary_embedding(&self.rope, &step.positions, &mut q, &mut k, &self.cos_sin)?;
        let (kc, vc) = kv;
        with_slice::<T, _>(&v_t, |v| {
            Ok(self.kernels.reshape_and_cache(&k, v, kc, vc, &step.slots, row)?)
        })?;
        drop(v_t);
        let cache = PagedCache {
            key_cache: kc,
            value_cache: vc,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
        };
        let attn = self.attention(&q, &cache, &step.attention, tokens)?;
        let o =
            l.wo.forward::<T>(&wrap(attn, &self.cuda, tokens, c.num_heads * c.head_dim)?)?;
        let mut x = owned::<T>(&o, stream)?;
        drop(o);
        self.kernels
            .fused_add_rms_norm(&mut x, residual, &l.ffn_norm, c.rms_eps)?;
        let gu = l.gate_up.forward_cat::<T>(&wrap(x, &self.cuda, tokens, hs)?)?;
        let mut act = stream.alloc_zeros::<T>(tokens * c.intermediate_size)?;
        with_slice::<T, _>(&gu, |g| {
            Ok(self.kernels.silu_and_mul(&mut act, g, c.intermediate_size)?)
        })?;
        drop(gu);
        let d = l
            .down
            .forward::<T>(&wrap(act, &self.cuda, tokens, c.intermediate_size)?)?;
        let mut x = owned::<T>(&d, stream)?;
        drop(d);
        let next_norm = self.layers.get(li + 1).map_or(&self.norm, |n| &n.attn_norm);
        self.kernels
            .fused_add_rms_norm(&mut x, residual, next_norm, c.rms_eps)?;
        Ok(x)
    }
}

/// Everything a step's layers share: uploaded once per step.
struct Step {
    tokens: usize,
    positions: Positions,
    slots: SlotMapping,
    attention: StepAttention,
}

impl<T: GpuFloat> ModelRunner for CudaRunner<T> {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn allocate_kv(&mut self, num_blocks: usize, block_size: usize) -> anyhow::Result<()> {
        let c = &self.model.cfg;
        let per_layer = kv_layer_elems(c, num_blocks, block_size)?;
        // Free the old pool first so a re-allocation does not briefly need twice the memory.
        self.kv = None;
        let stream = self.model.kernels.stream();
        let layers = (0..c.num_layers)
            .map(|_| Ok((stream.alloc_zeros::<T>(per_layer)?, stream.alloc_zeros::<T>(per_layer)?)))
            .collect::<anyhow::Result<Vec<_>>>()
            .with_context(|| {
                format!(
                    "allocating {} MiB of KV cache on the GPU",
                    (2 * c.num_layers * per_layer * std::mem::size_of::<T>()) >> 20
                )
            })?;
        self.kv = Some(KvPool {
            layers,
            num_blocks,
            block_size,
        });
        Ok(())
    }

    fn forward(&mut self, batch: &ForwardBatch) -> anyhow::Result<Vec<Vec<f32>>> {
        let stream = self.model.kernels.stream().clone();
        let c = self.model.cfg.clone();
        let (num_blocks, bs) = {
            let pool = self.kv.as_mut().ok_or_else(|| anyhow!("forward before allocate_kv"))?;
            let block = pool.block_size * c.num_kv_heads * c.head_dim;
            for (src, dst) in &batch.block_copies {
                if *src as usize >= pool.num_blocks || *dst as usize >= pool.num_blocks {
                    bail!("block_copies: ({src}, {dst}) out of {} blocks", pool.num_blocks);
                }
            }
            for &(src, dst) in &batch.block_copies {
                if src == dst {
                    continue;
                }
                for (k, v) in &mut pool.layers {
                    copy_block(&stream, k, src as usize, dst as usize, block)?;
                    copy_block(&stream, v, src as usize, dst as usize, block)?;
                }
            }
            (pool.num_blocks, pool.block_size)
        };
        let entries = &batch.entries;
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let plan = step_plan::plan(batch, c.vocab_size, c.context_length, num_blocks, bs)?;
        let t = plan.tokens.len();
        let num_decode = plan.num_decode;
        let kernels = &self.model.kernels;
        let positions = kernels.positions(&plan.positions, c.context_length)?;
        let slots = kernels.slot_mapping(&plan.slots, num_blocks * bs)?;
        let tables: Vec<&[u32]> = plan.order.iter().map(|&i| entries[i].block_table.as_slice()).collect();
        let meta = |r: std::ops::Range<usize>| -> anyhow::Result<Option<AttentionMetadata>> {
            if r.is_empty() {
                return Ok(None);
            }
            Ok(Some(kernels.attention_metadata(
                &tables[r.clone()],
                &plan.context_lens[r.clone()],
                &plan.query_lens[r],
                num_blocks,
                bs,
            )?))
        };
        let step = Step {
            tokens: t,
            positions,
            slots,
            attention: StepAttention {
                decode: meta(0..num_decode)?,
                prefill: meta(num_decode..entries.len())?,
                decode_tokens: num_decode,
            },
        };

        let m = &self.model;
        let pool = self.kv.as_mut().ok_or_else(|| anyhow!("forward before allocate_kv"))?;
        let ids = Tensor::from_slice(&plan.tokens, (t,), &m.device)?;
        let x0 = m.embed.index_select(&ids, 0)?;
        let mut residual = owned::<T>(&x0, &stream)?;
        drop(x0);
        let mut h = stream.alloc_zeros::<T>(t * c.hidden_size)?;
        m.kernels
            .rms_norm(&mut h, &residual, &m.layers[0].attn_norm, c.rms_eps)?;
        for (li, kv) in pool.layers.iter_mut().enumerate() {
            h = m.layer(li, h, &mut residual, kv, &step)?;
        }
        // `h` is now the final-normed hidden state of every token.
        let rows: Vec<u32> = entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.want_logits)
            .map(|(i, _)| plan.last_row[i] as u32)
            .collect();
        if rows.is_empty() {
            // Nothing to read back: still surface this step's device errors now.
            stream.synchronize()?;
            return Ok(Vec::new());
        }
        let n = rows.len();
        let h = wrap(h, &m.cuda, t, c.hidden_size)?;
        let sel = h.index_select(&Tensor::from_slice(&rows, (n,), &m.device)?, 0)?;
        let logits = m.lm_head.forward_f32(&sel)?;
        Ok(logits.to_vec2::<f32>()?)
    }
}

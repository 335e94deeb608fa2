//! Sentence embeddings: a BERT-family encoder (all-MiniLM-L6-v2 and kin),
//! pooled and normalised exactly as sentence-transformers does, and
//! [`EmbedderHandle`], the dynamic batcher that serves concurrent callers.
//!
//! On the CPU the forward pass is [`super::encoder`] (hand-written, Q8_0 VNNI
//! products). On CUDA (feature `cuda`) it is a plain candle f32 BERT on its own
//! stream (candle's softmax and exact GELU) whose mean pooling + L2
//! normalisation is our fused `mean_pool` kernel, so only the pooled vectors
//! come back to the host; CLS pooling copies the hidden states back and pools
//! on the CPU. That candle BERT is also the CPU encoder's test reference.
//!
//! Invariants:
//! - Padding never reaches the vectors: the tokenizer's own padding is switched
//!   off and the encoder packs the real tokens of a batch without any padding,
//!   attending within each sequence only.
//! - Sequences are truncated to `sentence_bert_config.json`'s `max_seq_length`.
//! - Every returned vector has unit L2 norm (or is all zeros for a zero vector).
//! - A sentence's vector does not depend on the batch it was computed in.
//! - The handle tokenizes each text once, off the async workers; the worker
//!   answers every job exactly once with its vectors in its caller's order,
//!   skips jobs whose caller has gone away, and serves queued interactive texts
//!   before bulk ones, one micro-batch (`max_batch_tokens`) at a time.
//! - A panic inside a micro-batch fails that batch's jobs only; `is_up` turns
//!   false once the worker thread has exited for any reason.
//!
//! Tested by: parity with sentence-transformers reference vectors
//! (`tests/data/embedding_reference.json`, cosine >= 0.999), agreement with the
//! candle f32 reference encoder, batch-invariance (a sentence embeds the same
//! alone or in a batch), concurrent handle calls against direct calls, and the
//! worker's scheduling through test hooks: a query overtaking a bulk job, the
//! per-priority queue bounds, a panicking batch, a dead worker.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use genai_kernels::cpu::pool::Lane;
use serde::Deserialize;
use tokenizers::{Tokenizer, TruncationParams};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore, TryAcquireError};

use super::encoder::{Dims, Encoder};
use crate::config::EmbeddingConfig;
use crate::device::ComputeDevice;
use crate::EmbedError;

type Result<T> = std::result::Result<T, EmbedError>;

fn model_err(e: impl std::fmt::Display) -> EmbedError {
    EmbedError::Model(e.to_string())
}

#[derive(Debug, Deserialize)]
struct BertConfig {
    hidden_size: usize,
    num_attention_heads: usize,
    num_hidden_layers: usize,
    layer_norm_eps: f64,
    max_position_embeddings: usize,
    #[serde(default = "default_act")]
    hidden_act: String,
}

fn default_act() -> String {
    "gelu".into()
}

#[derive(Debug, Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
}

#[derive(Debug, Deserialize)]
struct SentenceBertConfig {
    max_seq_length: usize,
}

/// How token states become one sentence vector (`1_Pooling/config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pooling {
    Mean,
    Cls,
}

/// Pools token states into sentence vectors and L2-normalises them, as
/// sentence-transformers' `Pooling` + `Normalize` modules do. Mean pooling is
/// the shared CPU reference `genai_kernels::cpu::pooling::mean_pool` (mean
/// over the sequence's tokens, norm clamped at 1e-12); CLS takes the first token.
///
/// `hidden` holds the packed token states of the batch (`[Σ lens, dim]`
/// row-major, sequence `i` starting at row `Σ_{j<i} lens[j]`, no padding).
pub(crate) fn pool_and_normalize(
    hidden: &[f32],
    lens: &[usize],
    dim: usize,
    pooling: Pooling,
) -> Result<Vec<Vec<f32>>> {
    let rows: usize = lens.iter().sum();
    if dim == 0 || hidden.len() != rows * dim {
        return Err(EmbedError::invalid(
            "hidden",
            format!("{} values for {rows} token rows of width {dim}", hidden.len()),
        ));
    }
    let mut start = 0;
    let mut out = Vec::with_capacity(lens.len());
    for &len in lens {
        let states = &hidden[start * dim..(start + len) * dim];
        let mut v = vec![0f32; dim];
        match pooling {
            Pooling::Mean if len > 0 => {
                genai_kernels::cpu::pooling::mean_pool(&mut v, states, &vec![1; len], len, dim, true)
                    .map_err(|e| model_err(format!("pooling: {e}")))?
            }
            Pooling::Cls if len > 0 => {
                v.copy_from_slice(&states[..dim]);
                normalize(&mut v);
            }
            _ => {}
        }
        out.push(v);
        start += len;
    }
    Ok(out)
}

/// In-place L2 normalisation (torch's `F.normalize`: divides by max(norm, 1e-12)).
pub fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
}

/// Where the forward pass runs.
enum Backend {
    Cpu(Encoder),
    #[cfg(feature = "cuda")]
    Cuda {
        bert: candle_bert::Bert,
        /// Our kernels on the encoder's stream: fused mean pooling.
        kernels: genai_kernels::cuda::CudaKernels,
    },
}

/// The encoder plus its tokenizer, pooling and sequence limit. Synchronous and
/// `Sync`: one forward pass per call; callers batch (see [`EmbedderHandle`]).
pub struct Embedder {
    backend: Backend,
    hidden: usize,
    tokenizer: Tokenizer,
    pooling: Pooling,
    /// Longest sequence (special tokens included) the encoder sees.
    max_seq_len: usize,
}

impl Embedder {
    /// Loads a sentence-transformers model directory: `model.safetensors`,
    /// `config.json`, `tokenizer.json`, `1_Pooling/config.json` and
    /// `sentence_bert_config.json` (the last two optional: mean pooling and the
    /// model's position limit otherwise). Runs on the CPU.
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_on(dir, ComputeDevice::Cpu)
    }

    /// [`Embedder::load`] on `device` (a CUDA device needs a `cuda` build).
    pub fn load_on(dir: &Path, device: ComputeDevice) -> Result<Self> {
        let read = |name: &str| -> Result<String> {
            let p = dir.join(name);
            std::fs::read_to_string(&p).map_err(|e| model_err(format!("{}: {e}", p.display())))
        };
        let cfg: BertConfig =
            serde_json::from_str(&read("config.json")?).map_err(|e| model_err(format!("config.json: {e}")))?;
        let pooling = if dir.join("1_Pooling/config.json").is_file() {
            let pc: PoolingConfig = serde_json::from_str(&read("1_Pooling/config.json")?)
                .map_err(|e| model_err(format!("1_Pooling/config.json: {e}")))?;
            match (
                pc.pooling_mode_mean_tokens,
                pc.pooling_mode_cls_token,
                pc.pooling_mode_max_tokens || pc.pooling_mode_mean_sqrt_len_tokens,
            ) {
                (true, false, false) => Pooling::Mean,
                (false, true, false) => Pooling::Cls,
                _ => {
                    return Err(model_err(
                        "1_Pooling/config.json: only a single mean or cls pooling mode is supported",
                    ))
                }
            }
        } else {
            Pooling::Mean
        };
        let max_seq_len = if dir.join("sentence_bert_config.json").is_file() {
            let sc: SentenceBertConfig = serde_json::from_str(&read("sentence_bert_config.json")?)
                .map_err(|e| model_err(format!("sentence_bert_config.json: {e}")))?;
            sc.max_seq_length
        } else {
            cfg.max_position_embeddings
        }
        .min(cfg.max_position_embeddings);
        if cfg.hidden_act != "gelu" {
            return Err(model_err(format!(
                "config.json hidden_act {:?} is not supported (only \"gelu\")",
                cfg.hidden_act
            )));
        }
        if cfg.num_attention_heads == 0
            || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
            || cfg.hidden_size / cfg.num_attention_heads > 256
        {
            return Err(model_err(
                "config.json: hidden_size must be a multiple of num_attention_heads, with heads of at most 256",
            ));
        }
        let backend = match device {
            ComputeDevice::Cpu => Backend::Cpu(Self::load_cpu(dir, &cfg, max_seq_len)?),
            #[cfg(feature = "cuda")]
            ComputeDevice::Cuda { ordinal } => {
                // Its own stream: the embedder runs beside the generation engine.
                let dev = candle_core::Device::new_cuda_with_stream(ordinal).map_err(model_err)?;
                let kernels = match &dev {
                    candle_core::Device::Cuda(d) => genai_kernels::cuda::CudaKernels::new(d.cuda_stream())
                        .map_err(|e| model_err(format!("loading the CUDA kernels: {e}")))?,
                    _ => return Err(model_err("a CUDA device was asked for, candle made another")),
                };
                Backend::Cuda {
                    bert: candle_bert::Bert::load(dir, &cfg, dev)?,
                    kernels,
                }
            }
            #[cfg(not(feature = "cuda"))]
            ComputeDevice::Cuda { .. } => {
                return Err(model_err(
                    "this binary was built without CUDA support (rebuild with `--features cuda`)",
                ))
            }
        };
        let tk_path = dir.join("tokenizer.json");
        let mut tokenizer =
            Tokenizer::from_file(&tk_path).map_err(|e| model_err(format!("{}: {e}", tk_path.display())))?;
        // The shipped tokenizer.json pads every input to 128: we pad per batch instead.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_seq_len,
                ..Default::default()
            }))
            .map_err(model_err)?;
        Ok(Self {
            backend,
            hidden: cfg.hidden_size,
            tokenizer,
            pooling,
            max_seq_len,
        }
        .with_threads(0))
    }

    /// The hand-written CPU encoder from `model.safetensors`.
    fn load_cpu(dir: &Path, cfg: &BertConfig, max_seq_len: usize) -> Result<Encoder> {
        let (st, prefix) = open_safetensors(dir)?;
        let dims = Dims {
            hidden: cfg.hidden_size,
            heads: cfg.num_attention_heads,
            layers: cfg.num_hidden_layers,
            eps: cfg.layer_norm_eps as f32,
            max_positions: max_seq_len,
        };
        Encoder::load(&st, prefix, dims)
    }

    /// Compute threads of a forward pass (the caller plus the kernels' pool
    /// workers; default and 0: all cores), i.e. `models.threads`.
    /// No effect on CUDA.
    // Only a `cuda` build has a second backend.
    #[cfg_attr(not(feature = "cuda"), allow(irrefutable_let_patterns))]
    pub fn with_threads(mut self, threads: usize) -> Self {
        if let Backend::Cpu(e) = &mut self.backend {
            e.set_threads(match threads {
                0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
                n => n,
            });
        }
        self
    }

    /// Vector dimension.
    pub fn dim(&self) -> usize {
        self.hidden
    }

    /// Token ids with special tokens, truncated to `max_seq_len`. Sequential
    /// on the calling thread: `encode_batch` would fan out on rayon, whose idle
    /// workers then spin and yield on the cores the encoder's pool needs
    /// (batch-32 throughput swung between ~205 and ~280 sentences/s with it).
    pub fn tokenize(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        texts
            .iter()
            .map(|t| {
                let enc = self.tokenizer.encode_fast(*t, true).map_err(model_err)?;
                Ok(enc.get_ids().to_vec())
            })
            .collect()
    }

    /// Number of tokens of `text` without special tokens and without truncation
    /// (the chunker's budget unit).
    pub fn count_tokens(&self, text: &str) -> Result<usize> {
        let enc = self.tokenizer.encode_fast(text, false).map_err(model_err)?;
        // With truncation on, the overflow holds the rest of a long text.
        Ok(enc.get_ids().len() + enc.get_overflowing().iter().map(|o| o.get_ids().len()).sum::<usize>())
    }

    /// One forward pass over already tokenized sequences (packed, no
    /// padding). An empty sequence embeds to the zero vector.
    pub(crate) fn embed_tokens(&self, seqs: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        if let Some(s) = seqs.iter().find(|s| s.len() > self.max_seq_len) {
            return Err(EmbedError::invalid(
                "input",
                format!("sequence of {} tokens exceeds {}", s.len(), self.max_seq_len),
            ));
        }
        let real: Vec<&[u32]> = seqs.iter().copied().filter(|s| !s.is_empty()).collect();
        if real.is_empty() {
            return Ok(vec![vec![0f32; self.dim()]; seqs.len()]);
        }
        let pooled = match &self.backend {
            Backend::Cpu(encoder) => {
                let hidden = encoder.forward(&real)?;
                let lens: Vec<usize> = real.iter().map(|s| s.len()).collect();
                pool_and_normalize(&hidden, &lens, self.dim(), self.pooling)?
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda { bert, kernels } => self.embed_cuda(bert, kernels, &real)?,
        };
        if pooled.len() != real.len() || pooled.iter().any(|v| v.len() != self.dim()) {
            return Err(model_err(format!(
                "the encoder returned {} vectors for {} sequences",
                pooled.len(),
                real.len()
            )));
        }
        let mut pooled = pooled.into_iter();
        Ok(seqs
            .iter()
            .map(|s| match s.is_empty() {
                true => vec![0f32; self.dim()],
                false => pooled.next().unwrap_or_default(),
            })
            .collect())
    }

    /// One padded forward pass of the candle BERT on the GPU, then pooling.
    #[cfg(feature = "cuda")]
    fn embed_cuda(
        &self,
        bert: &candle_bert::Bert,
        kernels: &genai_kernels::cuda::CudaKernels,
        seqs: &[&[u32]],
    ) -> Result<Vec<Vec<f32>>> {
        let (b, t, dim) = (seqs.len(), seqs.iter().map(|s| s.len()).max().unwrap_or(1), self.dim());
        let mut ids = vec![0u32; b * t];
        let mut mask = vec![0u32; b * t];
        for (i, s) in seqs.iter().enumerate() {
            ids[i * t..i * t + s.len()].copy_from_slice(s);
            mask[i * t..i * t + s.len()].fill(1);
        }
        let hidden = bert.forward(&ids, &mask, b, t).map_err(model_err)?;
        if self.pooling == Pooling::Mean {
            return gpu_mean_pool(kernels, &hidden, &mask, t, dim);
        }
        let hidden = hidden
            .flatten_all()
            .and_then(|h| h.to_vec1::<f32>())
            .map_err(model_err)?;
        let mut packed = Vec::with_capacity(seqs.iter().map(|s| s.len()).sum::<usize>() * dim);
        for (i, s) in seqs.iter().enumerate() {
            packed.extend_from_slice(&hidden[i * t * dim..(i * t + s.len()) * dim]);
        }
        let lens: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
        pool_and_normalize(&packed, &lens, dim, self.pooling)
    }

    /// Tokenises and embeds `texts` in one call, sorted by length and split so
    /// that no forward pass exceeds `max_batch_tokens` padded tokens.
    pub fn embed(&self, texts: &[&str], max_batch_tokens: usize) -> Result<Vec<Vec<f32>>> {
        let seqs = self.tokenize(texts)?;
        let refs: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
        self.embed_sorted(&refs, max_batch_tokens)
    }

    /// Embeds sequences in length order, micro-batched by padded tokens, and
    /// returns the vectors in input order.
    fn embed_sorted(&self, seqs: &[&[u32]], max_batch_tokens: usize) -> Result<Vec<Vec<f32>>> {
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        order.sort_by_key(|&i| seqs[i].len());
        let mut out: Vec<Vec<f32>> = vec![Vec::new(); seqs.len()];
        let mut start = 0;
        while start < order.len() {
            // Sorted ascending: the last sequence in the group is the longest.
            let mut end = start + 1;
            while end < order.len() && (end + 1 - start) * seqs[order[end]].len() <= max_batch_tokens {
                end += 1;
            }
            let group: Vec<&[u32]> = order[start..end].iter().map(|&i| seqs[i]).collect();
            for (v, &i) in self.embed_tokens(&group)?.into_iter().zip(&order[start..end]) {
                out[i] = v;
            }
            start = end;
        }
        Ok(out)
    }
}

/// Masked mean + L2 normalisation of `hidden` (`[b * t, dim]` f32 on the device) with our fused
/// kernel; only the `b` pooled vectors are copied back.
#[cfg(feature = "cuda")]
fn gpu_mean_pool(
    k: &genai_kernels::cuda::CudaKernels,
    hidden: &candle_core::Tensor,
    mask: &[u32],
    t: usize,
    dim: usize,
) -> Result<Vec<Vec<f32>>> {
    let run = || -> anyhow::Result<Vec<f32>> {
        let stream = k.stream();
        let mask_d = stream.clone_htod(mask)?;
        let mut out = stream.alloc_zeros::<f32>(mask.len() / t * dim)?;
        crate::gpu::with_slice::<f32, _>(hidden, |h| Ok(k.mean_pool(&mut out, h, &mask_d, t, dim, true)?))?;
        Ok(stream.clone_dtoh(&out)?)
    };
    let flat = run().map_err(|e| model_err(format!("pooling on the GPU: {e}")))?;
    Ok(flat.chunks(dim).map(<[f32]>::to_vec).collect())
}
/// Memory-maps `dir/model.safetensors` and finds its tensor-name prefix: sentence-transformers
/// checkpoints have none, HF `BertModel` ones have "bert.".
fn open_safetensors(dir: &Path) -> Result<(candle_core::safetensors::MmapedSafetensors, &'static str)> {
    let path = dir.join("model.safetensors");
    // SAFETY: the file is memory-mapped read-only; the model files are not modified while the
    // server runs (the registry owns them), and the CPU encoder copies its weights at load.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(&path) }
        .map_err(|e| model_err(format!("{}: {e}", path.display())))?;
    let prefix = if st.get("embeddings.word_embeddings.weight").is_ok() {
        ""
    } else {
        "bert."
    };
    Ok((st, prefix))
}

/// Metric names the embedder records (the server's catalogue lists them).
pub mod metric_names {
    /// Gauge: 1 while the embedding worker thread runs, 0 once it has exited.
    pub const EMBEDDER_UP: &str = "genai_embedder_up";
    /// Counter: micro-batches whose forward pass panicked (their jobs got an error).
    pub const EMBEDDER_PANICS: &str = "genai_embedder_panics_total";
}

/// How urgently a caller needs its vectors. The worker serves every queued
/// `Interactive` text before any `Bulk` one, a micro-batch at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// Someone is waiting: search and RAG queries, the embeddings API.
    Interactive,
    /// Background work: document ingest.
    Bulk,
}

/// The vectors of one [`EmbedderHandle::embed`] call, in input order, and the
/// tokens the model processed for them (special tokens included, after truncation).
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    pub vectors: Vec<Vec<f32>>,
    pub tokens: usize,
}

/// State shared by the handles and the worker thread.
struct Shared {
    /// False once the worker thread has exited (normally or by a panic).
    up: AtomicBool,
    /// Room for queued texts, per priority (`Priority as usize`).
    room: [Arc<Semaphore>; 2],
    #[cfg(test)]
    hooks: tests::Hooks,
}

/// One `embed` call inside the worker.
struct Job {
    priority: Priority,
    seqs: Vec<Vec<u32>>,
    /// Indices into `seqs`, shortest first, so a micro-batch takes similar
    /// lengths (less padding on CUDA); `next` of them are handed out.
    order: Vec<usize>,
    next: usize,
    /// Filled by index as micro-batches finish; `done` of them so far.
    vectors: Vec<Vec<f32>>,
    done: usize,
    tokens: usize,
    reply: oneshot::Sender<Result<Embeddings>>,
    /// The job's room in its queue, given back when it is answered or dropped.
    _room: OwnedSemaphorePermit,
}

/// Cloneable async front of one [`Embedder`]. Callers' texts are tokenized
/// once, on tokio's blocking pool, and queued by priority to one worker thread
/// that runs them in micro-batches of at most `embedding.max_batch_tokens`
/// padded tokens: interactive texts first, then bulk ones, so a query waits
/// at most one micro-batch behind a large ingest. A panic in a micro-batch
/// fails that batch's jobs; the worker goes on.
#[derive(Clone)]
pub struct EmbedderHandle {
    embedder: Arc<Embedder>,
    tx: mpsc::Sender<Job>,
    shared: Arc<Shared>,
    /// Texts one priority may have queued (`embedding.max_queue`).
    max_queue: usize,
}

fn stopped() -> EmbedError {
    EmbedError::Unavailable("the embedding worker has stopped".into())
}

impl EmbedderHandle {
    /// Starts the worker thread (on the kernels' embed lane). It stops when the
    /// last handle is dropped.
    pub fn spawn(embedder: Arc<Embedder>, cfg: &EmbeddingConfig) -> Result<Self> {
        // acquire_many takes a u32.
        let max_queue = cfg.max_queue.clamp(1, u32::MAX as usize);
        let shared = Arc::new(Shared {
            up: AtomicBool::new(true),
            room: [Arc::new(Semaphore::new(max_queue)), Arc::new(Semaphore::new(max_queue))],
            #[cfg(test)]
            hooks: Default::default(),
        });
        let (tx, rx) = mpsc::channel::<Job>();
        let (worker, state) = (embedder.clone(), shared.clone());
        let (max_tokens, max_wait) = (cfg.max_batch_tokens, Duration::from_millis(cfg.max_wait_ms));
        std::thread::Builder::new()
            .name("embed-batcher".into())
            .spawn(move || batch_loop(&worker, &rx, max_tokens, max_wait, state))
            .map_err(|e| EmbedError::Unavailable(format!("starting the embedding worker: {e}")))?;
        Ok(Self {
            embedder,
            tx,
            shared,
            max_queue,
        })
    }

    pub fn embedder(&self) -> &Arc<Embedder> {
        &self.embedder
    }

    /// False once the worker thread has exited: every `embed` then fails.
    pub fn is_up(&self) -> bool {
        self.shared.up.load(Ordering::Acquire)
    }

    /// Embeds `texts` (any number: the worker splits them into micro-batches).
    /// `Interactive` calls fail with `Overloaded` when their queue has no room
    /// for the texts; `Bulk` calls wait for room. A call with more texts than
    /// `embedding.max_queue` waits for (or needs) the whole queue.
    pub async fn embed(&self, texts: Vec<String>, priority: Priority) -> Result<Embeddings> {
        if texts.is_empty() {
            return Ok(Embeddings {
                vectors: Vec::new(),
                tokens: 0,
            });
        }
        if !self.is_up() {
            return Err(stopped());
        }
        let want = texts.len().min(self.max_queue) as u32;
        let room = self.shared.room[priority as usize].clone();
        let permit = match priority {
            Priority::Interactive => room.try_acquire_many_owned(want).map_err(|e| match e {
                TryAcquireError::NoPermits => EmbedError::Overloaded("the embedding queue is full".into()),
                TryAcquireError::Closed => stopped(),
            })?,
            Priority::Bulk => room.acquire_many_owned(want).await.map_err(|_| stopped())?,
        };
        let embedder = self.embedder.clone();
        let seqs = tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
            embedder.tokenize(&refs)
        })
        .await
        .map_err(|e| EmbedError::Unavailable(format!("the tokenizing task failed: {e}")))??;
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        order.sort_by_key(|&i| seqs[i].len());
        let (reply, rx) = oneshot::channel();
        let job = Job {
            priority,
            tokens: seqs.iter().map(|s| s.len()).sum(),
            vectors: vec![Vec::new(); seqs.len()],
            seqs,
            order,
            next: 0,
            done: 0,
            reply,
            _room: permit,
        };
        self.tx.send(job).map_err(|_| stopped())?;
        #[cfg(test)]
        self.shared.hooks.sent.fetch_add(1, Ordering::AcqRel);
        rx.await
            .map_err(|_| EmbedError::Unavailable("the embedding worker dropped the request".into()))?
    }
}

/// Marks the worker down when its thread ends, however it ends.
struct UpGuard(Arc<Shared>);

impl Drop for UpGuard {
    fn drop(&mut self) {
        self.0.up.store(false, Ordering::Release);
        // Bulk callers waiting for room get "stopped" instead of waiting forever.
        self.0.room.iter().for_each(|r| r.close());
        metrics::gauge!(metric_names::EMBEDDER_UP).set(0.0);
        if std::thread::panicking() {
            tracing::error!("the embedding worker thread panicked and stopped");
        }
    }
}

/// The worker's queues, `Priority as usize` first to last.
#[derive(Default)]
struct Queues([VecDeque<Job>; 2]);

impl Queues {
    fn push(&mut self, job: Job) {
        self.0[job.priority as usize].push_back(job);
    }

    fn is_empty(&self) -> bool {
        self.0.iter().all(|q| q.is_empty())
    }

    /// Tokens not yet handed out to a micro-batch.
    fn tokens_left(&self) -> usize {
        self.jobs()
            .map(|j| j.order[j.next..].iter().map(|&i| j.seqs[i].len()).sum::<usize>())
            .sum()
    }

    fn jobs(&self) -> impl Iterator<Item = &Job> {
        self.0.iter().flatten()
    }

    /// A caller that went away needs no answer: don't spend compute on it.
    fn drop_cancelled(&mut self) {
        self.0.iter_mut().for_each(|q| q.retain(|j| !j.reply.is_closed()));
    }

    /// The next micro-batch: `(queue, job position, sequence index)` in queue
    /// order (interactive jobs first, each job's remaining sequences shortest
    /// first), as many as fit `max_tokens` padded tokens (at least one).
    /// The jobs it touches are a prefix of each queue.
    fn take(&mut self, max_tokens: usize) -> Vec<(usize, usize, usize)> {
        let mut batch = Vec::new();
        let mut longest = 0;
        for (q, jobs) in self.0.iter_mut().enumerate() {
            for (pos, job) in jobs.iter_mut().enumerate() {
                while let Some(&i) = job.order.get(job.next) {
                    let len = job.seqs[i].len().max(longest);
                    if !batch.is_empty() && (batch.len() + 1) * len > max_tokens {
                        return batch;
                    }
                    longest = len;
                    batch.push((q, pos, i));
                    job.next += 1;
                }
            }
        }
        batch
    }

    /// Stores a micro-batch's vectors and answers the jobs it completed.
    fn finish(&mut self, batch: &[(usize, usize, usize)], vectors: Vec<Vec<f32>>) {
        for (&(q, pos, i), v) in batch.iter().zip(vectors) {
            let job = &mut self.0[q][pos];
            job.vectors[i] = v;
            job.done += 1;
        }
        for jobs in &mut self.0 {
            while jobs.front().is_some_and(|j| j.done == j.seqs.len()) {
                if let Some(j) = jobs.pop_front() {
                    let _ = j.reply.send(Ok(Embeddings {
                        vectors: j.vectors,
                        tokens: j.tokens,
                    }));
                }
            }
        }
    }

    /// Fails every job that had a sequence in `batch` with `error()`.
    fn fail(&mut self, batch: &[(usize, usize, usize)], error: impl Fn() -> EmbedError) {
        for (q, jobs) in self.0.iter_mut().enumerate() {
            let touched = batch.iter().filter(|b| b.0 == q).map(|b| b.1 + 1).max().unwrap_or(0);
            for j in jobs.drain(..touched) {
                let _ = j.reply.send(Err(error()));
            }
        }
    }
}

/// The same error again, for each job of a failed micro-batch.
fn copy(e: &EmbedError) -> EmbedError {
    match e {
        EmbedError::InvalidArgument { field, message } => EmbedError::invalid(field.clone(), message.clone()),
        EmbedError::Overloaded(m) => EmbedError::Overloaded(m.clone()),
        EmbedError::Unavailable(m) => EmbedError::Unavailable(m.clone()),
        EmbedError::Model(m) => EmbedError::Model(m.clone()),
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(|s| s.as_str()))
        .unwrap_or("non-string panic payload")
}

/// The worker thread: micro-batches until every handle is gone.
fn batch_loop(
    embedder: &Embedder,
    rx: &mpsc::Receiver<Job>,
    max_tokens: usize,
    max_wait: Duration,
    shared: Arc<Shared>,
) {
    let _up = UpGuard(shared.clone());
    // Its own kernel pool: encoder matmuls never take the engine's threads.
    genai_kernels::cpu::pool::set_thread_lane(Lane::Embed);
    metrics::gauge!(metric_names::EMBEDDER_UP).set(1.0);
    let mut queues = Queues::default();
    loop {
        if queues.is_empty() {
            let Ok(job) = rx.recv() else {
                return; // every handle is gone
            };
            queues.push(job);
            // Let concurrent callers join the first micro-batch.
            let deadline = Instant::now() + max_wait;
            while queues.tokens_left() < max_tokens {
                let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                    break;
                };
                match rx.recv_timeout(left) {
                    Ok(j) => queues.push(j),
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                }
            }
        }
        // Jobs that arrived during the last micro-batch: an interactive one goes next.
        while let Ok(j) = rx.try_recv() {
            queues.push(j);
        }
        #[cfg(test)]
        shared.hooks.after_drain();
        queues.drop_cancelled();
        let batch = queues.take(max_tokens);
        if batch.is_empty() {
            continue;
        }
        let seqs: Vec<&[u32]> = batch
            .iter()
            .map(|&(q, pos, i)| queues.0[q][pos].seqs[i].as_slice())
            .collect();
        let result = catch_unwind(AssertUnwindSafe(|| {
            #[cfg(test)]
            shared.hooks.before_forward(&batch);
            embedder.embed_tokens(&seqs)
        }));
        match result {
            Ok(Ok(vectors)) => queues.finish(&batch, vectors),
            Ok(Err(e)) => queues.fail(&batch, || copy(&e)),
            Err(payload) => {
                let msg = panic_message(&*payload);
                tracing::error!(panic = msg, sequences = batch.len(), "embedding micro-batch panicked");
                metrics::counter!(metric_names::EMBEDDER_PANICS).increment(1);
                let msg = format!("internal embedder error (the batch panicked: {msg})");
                queues.fail(&batch, || EmbedError::Model(msg.clone()));
            }
        }
    }
}

/// A plain candle f32 BERT: the CUDA forward pass and the CPU encoder's test reference.
#[cfg(any(test, feature = "cuda"))]
mod candle_bert {
    use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor};
    use rayon::prelude::*;

    use super::{model_err, open_safetensors, BertConfig, Path, Result};
    use crate::encoder::gelu;
    use genai_kernels::cpu::activation::exp_fast;

    /// A dense layer with its weight stored transposed (`[in, out]`, contiguous) so
    /// the forward pass is one plain row-major matmul.
    struct Dense {
        wt: Tensor,
        b: Tensor,
    }

    impl Dense {
        fn load(st: &candle_core::safetensors::MmapedSafetensors, name: &str, dev: &Device) -> Result<Self> {
            let w = st.load(&format!("{name}.weight"), dev).map_err(model_err)?;
            let b = st.load(&format!("{name}.bias"), dev).map_err(model_err)?;
            Ok(Self {
                wt: w.t().and_then(|t| t.contiguous()).map_err(model_err)?,
                b,
            })
        }

        /// Concatenates several layers' outputs (Q, K, V) into one matmul.
        fn fused(parts: Vec<Dense>) -> Result<Self> {
            let wts: Vec<&Tensor> = parts.iter().map(|d| &d.wt).collect();
            let bs: Vec<&Tensor> = parts.iter().map(|d| &d.b).collect();
            Ok(Self {
                wt: Tensor::cat(&wts, 1).map_err(model_err)?,
                b: Tensor::cat(&bs, 0).map_err(model_err)?,
            })
        }

        /// `x`: `[rows, in]` -> `[rows, out]`.
        fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
            x.matmul(&self.wt)?.broadcast_add(&self.b)
        }
    }

    struct Norm {
        w: Tensor,
        b: Tensor,
        eps: f32,
    }

    impl Norm {
        fn load(st: &candle_core::safetensors::MmapedSafetensors, name: &str, eps: f64, dev: &Device) -> Result<Self> {
            Ok(Self {
                w: st.load(&format!("{name}.weight"), dev).map_err(model_err)?,
                b: st.load(&format!("{name}.bias"), dev).map_err(model_err)?,
                eps: eps as f32,
            })
        }

        fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
            candle_nn::ops::layer_norm(x, &self.w, &self.b, self.eps)
        }
    }

    struct Layer {
        qkv: Dense,
        attn_out: Dense,
        ln_attn: Norm,
        inter: Dense,
        out: Dense,
        ln_out: Norm,
    }

    /// The BERT encoder: embeddings, then `num_hidden_layers` post-norm blocks.
    pub(crate) struct Bert {
        word: Tensor,
        position: Tensor,
        token_type0: Tensor,
        ln_emb: Norm,
        layers: Vec<Layer>,
        heads: usize,
        hidden: usize,
        device: Device,
    }

    impl Bert {
        pub(crate) fn load(dir: &Path, cfg: &BertConfig, device: Device) -> Result<Self> {
            if cfg.hidden_act != "gelu" {
                return Err(model_err(format!(
                    "config.json hidden_act {:?} is not supported (only \"gelu\")",
                    cfg.hidden_act
                )));
            }
            if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
                return Err(model_err(
                    "config.json: hidden_size must be a multiple of num_attention_heads",
                ));
            }
            let (st, prefix) = open_safetensors(dir)?;
            let p = |n: &str| format!("{prefix}{n}");
            let load = |n: &str| st.load(&p(n), &device).map_err(model_err);
            let token_types = load("embeddings.token_type_embeddings.weight")?;
            let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
            for i in 0..cfg.num_hidden_layers {
                let l = p(&format!("encoder.layer.{i}"));
                layers.push(Layer {
                    qkv: Dense::fused(vec![
                        Dense::load(&st, &format!("{l}.attention.self.query"), &device)?,
                        Dense::load(&st, &format!("{l}.attention.self.key"), &device)?,
                        Dense::load(&st, &format!("{l}.attention.self.value"), &device)?,
                    ])?,
                    attn_out: Dense::load(&st, &format!("{l}.attention.output.dense"), &device)?,
                    ln_attn: Norm::load(
                        &st,
                        &format!("{l}.attention.output.LayerNorm"),
                        cfg.layer_norm_eps,
                        &device,
                    )?,
                    inter: Dense::load(&st, &format!("{l}.intermediate.dense"), &device)?,
                    out: Dense::load(&st, &format!("{l}.output.dense"), &device)?,
                    ln_out: Norm::load(&st, &format!("{l}.output.LayerNorm"), cfg.layer_norm_eps, &device)?,
                });
            }
            Ok(Self {
                word: load("embeddings.word_embeddings.weight")?,
                position: load("embeddings.position_embeddings.weight")?,
                token_type0: token_types.get(0).map_err(model_err)?,
                ln_emb: Norm::load(&st, &p("embeddings.LayerNorm"), cfg.layer_norm_eps, &device)?,
                layers,
                heads: cfg.num_attention_heads,
                hidden: cfg.hidden_size,
                device,
            })
        }

        /// `ids`: `b` rows of `t` ids (right-padded); `mask`: 1 for real tokens.
        /// Returns the last hidden states, `[b * t, hidden]` f32 on the model's device.
        pub(crate) fn forward(&self, ids: &[u32], mask: &[u32], b: usize, t: usize) -> candle_core::Result<Tensor> {
            let cpu = self.device.is_cpu();
            let (h, nh) = (self.hidden, self.heads);
            let hd = h / nh;
            let ids_t = Tensor::from_slice(ids, (b * t,), &self.device)?;
            let pos = self.position.narrow(0, 0, t)?;
            let x = self.word.index_select(&ids_t, 0)?.reshape((b, t, h))?;
            let x = x.broadcast_add(&pos)?.broadcast_add(&self.token_type0)?;
            let mut x = self.ln_emb.forward(&x)?.reshape((b * t, h))?;
            // Additive key bias: 0 for real tokens, a large negative number for padding.
            let bias: Vec<f32> = mask.iter().map(|&m| if m == 0 { -1e9 } else { 0.0 }).collect();
            let bias = Tensor::from_vec(bias, (b, 1, 1, t), &self.device)?;
            let scale = 1.0 / (hd as f64).sqrt();
            for l in &self.layers {
                let qkv = l.qkv.forward(&x)?.reshape((b, t, 3, nh, hd))?;
                let head = |i: usize| qkv.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2)?.contiguous();
                let (q, k, v) = (head(0)?, head(1)?, head(2)?);
                let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&bias)?;
                let probs = if cpu {
                    scores.apply_op1_no_bwd(&SoftmaxLastDim)?
                } else {
                    candle_nn::ops::softmax_last_dim(&scores)?
                };
                let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((b * t, h))?;
                let a = l.attn_out.forward(&ctx)?;
                x = l.ln_attn.forward(&(a + &x)?)?;
                let i = l.inter.forward(&x)?;
                let i = if cpu {
                    i.apply_op1_no_bwd(&GeluErf)?
                } else {
                    i.gelu_erf()?
                };
                let o = l.out.forward(&i)?;
                x = l.ln_out.forward(&(o + &x)?)?;
            }
            Ok(x)
        }
    }

    /// The f32 elements a custom op reads: its input must be contiguous.
    fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg(format!("{op}: input must be contiguous")))?;
        Ok(&storage.as_slice::<f32>()?[start..end])
    }

    /// Exact-form GELU, `0.5 x (1 + erf(x / sqrt 2))`, in f32 with a vectorisable
    /// erf (max abs error ~2e-7) split across rayon threads. candle's `gelu_erf`
    /// evaluates erf through scalar f64 `exp` and took ~15% of the forward pass.
    pub(crate) struct GeluErf;

    impl CustomOp1 for GeluErf {
        fn name(&self) -> &'static str {
            "gelu-erf-f32"
        }

        fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            let x = contiguous_f32(storage, layout, "gelu")?;
            let mut out = vec![0f32; x.len()];
            out.par_chunks_mut(4096)
                .zip(x.par_chunks(4096))
                .for_each(|(o, x)| o.iter_mut().zip(x).for_each(|(o, &v)| *o = gelu(v)));
            Ok((CpuStorage::F32(out), layout.shape().clone()))
        }
    }

    /// Row softmax over the last dimension with the polynomial `exp_fast`.
    /// Padded keys carry a -1e9 bias, and libm's `expf` takes a slow underflow path
    /// for each of them (~15% of the forward pass with candle's softmax).
    pub(crate) struct SoftmaxLastDim;

    impl CustomOp1 for SoftmaxLastDim {
        fn name(&self) -> &'static str {
            "softmax-last-dim-f32"
        }

        fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            let x = contiguous_f32(storage, layout, "softmax")?;
            let n = layout.shape().dims().last().copied().unwrap_or(1).max(1);
            let mut out = vec![0f32; x.len()];
            out.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(o, x)| {
                let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for (o, &v) in o.iter_mut().zip(x) {
                    *o = exp_fast(v - max);
                    sum += *o;
                }
                let inv = 1.0 / sum;
                o.iter_mut().for_each(|o| *o *= inv);
            });
            Ok((CpuStorage::F32(out), layout.shape().clone()))
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::encoder::{self, gelu};
    use crate::test_support::{embedder, repo_path};

    fn cosine(a: &[f32], b: &[f32]) -> f32 {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
        dot / (na * nb)
    }

    #[derive(Deserialize)]
    struct Reference {
        sentences: Vec<String>,
        vectors: Vec<Vec<f32>>,
    }

    #[test]
    fn matches_sentence_transformers_reference() {
        let text = std::fs::read_to_string(repo_path("tests/data/embedding_reference.json")).unwrap();
        let r: Reference = serde_json::from_str(&text).unwrap();
        assert!(r.sentences.len() >= 20);
        let e = embedder();
        let refs: Vec<&str> = r.sentences.iter().map(|s| s.as_str()).collect();
        // Batched (with padding inside the batch) and one at a time must both match.
        let batched = e.embed(&refs, 8192).unwrap();
        for (i, (got, want)) in batched.iter().zip(&r.vectors).enumerate() {
            let c = cosine(got, want);
            assert!(c >= 0.999, "sentence {i} {:?}: cosine {c}", r.sentences[i]);
            let alone = e.embed(&refs[i..=i], 8192).unwrap();
            assert!(
                cosine(&alone[0], got) >= 0.9999,
                "sentence {i} differs alone vs batched"
            );
        }
    }

    #[test]
    fn vectors_are_unit_norm_and_long_inputs_truncate() {
        let e = embedder();
        let long = "word ".repeat(2000);
        let v = e.embed(&["hello", &long], 8192).unwrap();
        for x in &v {
            let n: f32 = x.iter().map(|a| a * a).sum::<f32>().sqrt();
            assert!((n - 1.0).abs() < 1e-4, "norm {n}");
        }
        assert_eq!(e.tokenize(&[&long]).unwrap()[0].len(), e.max_seq_len);
        assert!(e.count_tokens(&long).unwrap() >= 2000);
    }

    #[test]
    fn fast_gelu_matches_exact_erf_gelu() {
        let mut worst = 0f64;
        for i in -20_000..=20_000 {
            let x = i as f32 * 0.0007; // -14 .. 14
            let exact = {
                let d = x as f64;
                0.5 * d * (1.0 + libm_erf(d / std::f64::consts::SQRT_2))
            };
            let err = (gelu(x) as f64 - exact).abs() / exact.abs().max(1.0);
            worst = worst.max(err);
        }
        assert!(worst < 1e-6, "worst relative error {worst}");
        let t = Tensor::new(&[[-3.0f32, -0.5], [0.0, 2.0]], &Device::Cpu).unwrap();
        let want = t.gelu_erf().unwrap().to_vec2::<f32>().unwrap();
        let got = t
            .apply_op1_no_bwd(&candle_bert::GeluErf)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }
    }

    #[test]
    fn fast_softmax_matches_candle_and_zeroes_masked_keys() {
        let t = Tensor::new(&[[1.0f32, 2.0, -1e9, 0.5], [-3.0, 40.0, 39.5, -1e9]], &Device::Cpu).unwrap();
        let want = candle_nn::ops::softmax_last_dim(&t).unwrap().to_vec2::<f32>().unwrap();
        let got = t
            .apply_op1_no_bwd(&candle_bert::SoftmaxLastDim)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }
        assert!(got[0][2] < 1e-30 && got[1][3] < 1e-30);
        assert!((got[1].iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    /// Reference erf in f64 (candle's own, via its unary op on a 1-element tensor).
    fn libm_erf(x: f64) -> f64 {
        Tensor::new(&[x], &Device::Cpu)
            .unwrap()
            .erf()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()[0]
    }

    #[test]
    fn pooling_uses_each_sequences_own_rows() {
        // Packed rows: sequence 0 = 2 tokens, sequence 1 = 1 token, sequence 2 = empty.
        let hidden = [1.0, 0.0, 3.0, 0.0, 0.0, 2.0];
        let v = pool_and_normalize(&hidden, &[2, 1, 0], 2, Pooling::Mean).unwrap();
        assert!((v[0][0] - 1.0).abs() < 1e-6 && v[0][1].abs() < 1e-6);
        assert!(v[1][0].abs() < 1e-6 && (v[1][1] - 1.0).abs() < 1e-6);
        assert_eq!(v[2], vec![0.0, 0.0]);
        let mean = pool_and_normalize(&[4.0, 4.0, 2.0, -4.0], &[2], 2, Pooling::Mean).unwrap();
        assert!((mean[0][0] - 1.0).abs() < 1e-6 && mean[0][1].abs() < 1e-6, "{mean:?}");
        let cls = pool_and_normalize(&[3.0, 4.0, 2.0, -4.0], &[2], 2, Pooling::Cls).unwrap();
        assert!(
            (cls[0][0] - 0.6).abs() < 1e-6 && (cls[0][1] - 0.8).abs() < 1e-6,
            "{cls:?}"
        );
        assert!(pool_and_normalize(&hidden, &[2, 2], 2, Pooling::Mean).is_err());
    }

    /// The hand-written encoder (every row-pass ISA this CPU has) against the
    /// candle f32 reference on real sentences: Q8_0 products keep each
    /// sentence vector within cosine 0.999 and token states close.
    #[test]
    #[cfg_attr(not(feature = "cuda"), allow(irrefutable_let_patterns))]
    fn encoder_matches_candle_reference() {
        let dir = repo_path("models/all-minilm-l6-v2");
        let cfg: BertConfig = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        let reference = candle_bert::Bert::load(&dir, &cfg, Device::Cpu).unwrap();
        let mut e = Embedder::load(&dir).unwrap();
        let texts = [
            "A short one.",
            "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
            "Retrieval augmented generation grounds answers in documents.",
        ];
        let seqs = e.tokenize(&texts).unwrap();
        let refs: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
        let (b, t, h) = (seqs.len(), seqs.iter().map(|s| s.len()).max().unwrap(), e.dim());
        let mut ids = vec![0u32; b * t];
        let mut mask = vec![0u32; b * t];
        for (i, s) in seqs.iter().enumerate() {
            ids[i * t..i * t + s.len()].copy_from_slice(s);
            mask[i * t..i * t + s.len()].fill(1);
        }
        let want = reference
            .forward(&ids, &mask, b, t)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut isas = vec![encoder::Isa::Base];
        isas.extend(
            [encoder::Isa::detect()]
                .into_iter()
                .filter(|i| *i != encoder::Isa::Base),
        );
        let mut first: Option<Vec<f32>> = None;
        for isa in isas {
            let Backend::Cpu(enc) = &mut e.backend else {
                unreachable!("loaded on the CPU")
            };
            enc.set_isa(isa);
            let got = enc.forward(&refs).unwrap();
            let mut row = 0;
            for (i, s) in seqs.iter().enumerate() {
                for p in 0..s.len() {
                    let g = &got[row * h..][..h];
                    let w = &want[(i * t + p) * h..][..h];
                    assert!(
                        cosine(g, w) > 0.995,
                        "{isa:?}: sentence {i} token {p}: {}",
                        cosine(g, w)
                    );
                    row += 1;
                }
            }
            let pooled = e.embed_tokens(&refs).unwrap();
            let lens: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
            let mut want_packed = Vec::new();
            for (i, s) in seqs.iter().enumerate() {
                want_packed.extend_from_slice(&want[i * t * h..(i * t + s.len()) * h]);
            }
            let want_pooled = pool_and_normalize(&want_packed, &lens, h, e.pooling).unwrap();
            for (i, (g, w)) in pooled.iter().zip(&want_pooled).enumerate() {
                assert!(cosine(g, w) >= 0.999, "{isa:?}: sentence {i}: {}", cosine(g, w));
            }
            // The ISAs differ only in f32 rounding (FMA or not).
            match &first {
                None => first = Some(got),
                Some(f) => {
                    let worst = f.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                    assert!(worst < 1e-3, "{isa:?} vs Base: max abs difference {worst}");
                }
            }
        }
    }

    #[test]
    fn bad_token_ids_and_empty_sequences_are_handled() {
        let e = embedder();
        let err = e.embed_tokens(&[&[101, 1_000_000, 102]]).unwrap_err();
        assert!(err.to_string().contains("token id 1000000"), "{err}");
        let v = e.embed_tokens(&[&[], &[101, 7592, 102]]).unwrap();
        assert_eq!(v[0], vec![0.0; e.dim()]);
        assert!((v[1].iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-4);
    }

    /// Test hooks inside the worker (see `batch_loop`).
    #[derive(Default)]
    pub(super) struct Hooks {
        /// Jobs handed to the worker so far.
        pub(super) sent: AtomicUsize,
        /// The worker waits before each forward pass while this is set.
        hold: AtomicBool,
        /// Panic inside the next micro-batch.
        panic_next: AtomicBool,
        /// Panic in the worker loop itself, outside the per-batch guard.
        die: AtomicBool,
        /// Each micro-batch's sequences by queue (0 interactive, 1 bulk), in order.
        batches: parking_lot::Mutex<Vec<Vec<usize>>>,
    }

    impl Hooks {
        pub(super) fn after_drain(&self) {
            if self.die.load(Ordering::Acquire) {
                panic!("injected failure of the embedding worker");
            }
        }

        pub(super) fn before_forward(&self, batch: &[(usize, usize, usize)]) {
            self.batches.lock().push(batch.iter().map(|b| b.0).collect());
            while self.hold.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(1));
            }
            if self.panic_next.swap(false, Ordering::AcqRel) {
                panic!("injected panic in a micro-batch");
            }
        }
    }

    fn handle(max_batch_tokens: usize, max_queue: usize) -> EmbedderHandle {
        let cfg = EmbeddingConfig {
            max_batch_tokens,
            max_wait_ms: 0,
            max_queue,
            threads: 0,
        };
        EmbedderHandle::spawn(embedder(), &cfg).unwrap()
    }

    fn hooks(h: &EmbedderHandle) -> &Hooks {
        &h.shared.hooks
    }

    /// Polls `cond` every millisecond for up to 20 s.
    async fn until(what: &str, cond: impl Fn() -> bool) {
        let t0 = Instant::now();
        while !cond() {
            assert!(t0.elapsed() < Duration::from_secs(20), "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_handle_calls_match_direct_calls() {
        let e = embedder();
        let cfg = EmbeddingConfig {
            max_batch_tokens: 512,
            max_wait_ms: 20,
            max_queue: 64,
            threads: 0,
        };
        let h = EmbedderHandle::spawn(e.clone(), &cfg).unwrap();
        let texts: Vec<String> = (0..12)
            .map(|i| format!("sentence number {i} {}", "about retrieval ".repeat(i % 5)))
            .collect();
        let tasks: Vec<_> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let h = h.clone();
                let t = t.clone();
                let p = if i % 2 == 0 {
                    Priority::Interactive
                } else {
                    Priority::Bulk
                };
                tokio::spawn(async move { h.embed(vec![t], p).await })
            })
            .collect();
        for (task, t) in tasks.into_iter().zip(&texts) {
            let got = task.await.unwrap().unwrap();
            let want = e.embed(&[t.as_str()], 8192).unwrap();
            assert!(cosine(&got.vectors[0], &want[0]) > 0.9999, "{t}");
            assert_eq!(got.tokens, e.tokenize(&[t.as_str()]).unwrap()[0].len());
        }
        let none = h.embed(Vec::new(), Priority::Interactive).await.unwrap();
        assert!(none.vectors.is_empty() && none.tokens == 0);
        assert!(h.is_up());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tokens_count_special_tokens_and_truncation() {
        let e = embedder();
        let h = handle(8192, 64);
        let long = "word ".repeat(2000);
        let out = h
            .embed(vec!["hello".into(), long.clone()], Priority::Interactive)
            .await
            .unwrap();
        // [CLS] hello [SEP], and the long text cut to the model's window.
        assert_eq!(out.tokens, 3 + e.max_seq_len);
        assert_eq!(out.vectors.len(), 2);
        let want = e.embed(&["hello", &long], 8192).unwrap();
        assert!(cosine(&out.vectors[1], &want[1]) > 0.9999);
    }

    /// A query sent while a large bulk job runs is computed in the very next
    /// micro-batch, ahead of the bulk job's remaining texts.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_interactive_query_overtakes_a_bulk_job() {
        let e = embedder();
        // Short texts (about 10 tokens): about 25 per micro-batch, 8 micro-batches.
        let h = handle(256, 1024);
        hooks(&h).hold.store(true, Ordering::Release);
        let bulk_texts: Vec<String> = (0..200)
            .map(|i| format!("bulk chunk number {i} of the ingest"))
            .collect();
        let bulk = tokio::spawn({
            let (h, t) = (h.clone(), bulk_texts.clone());
            async move { h.embed(t, Priority::Bulk).await }
        });
        // The worker holds the bulk job's first micro-batch.
        until("the first micro-batch", || !hooks(&h).batches.lock().is_empty()).await;
        let query = tokio::spawn({
            let h = h.clone();
            async move { h.embed(vec!["what causes tides?".into()], Priority::Interactive).await }
        });
        until("the query to be queued", || hooks(&h).sent.load(Ordering::Acquire) == 2).await;
        hooks(&h).hold.store(false, Ordering::Release);
        let q = query.await.unwrap().unwrap();
        let b = bulk.await.unwrap().unwrap();
        let batches = hooks(&h).batches.lock().clone();
        assert!(batches[0].iter().all(|&q| q == 1), "{batches:?}");
        assert_eq!(
            batches[1][0], 0,
            "the query is first in the next micro-batch: {batches:?}"
        );
        assert_eq!(batches[1].iter().filter(|&&q| q == 0).count(), 1);
        assert!(batches.len() > 3 && batches[2..].iter().flatten().all(|&q| q == 1));
        let want = e.embed(&["what causes tides?"], 8192).unwrap();
        assert!(cosine(&q.vectors[0], &want[0]) > 0.9999);
        assert_eq!(b.vectors.len(), 200);
        let refs: Vec<&str> = bulk_texts.iter().map(|s| s.as_str()).collect();
        for (i, (got, want)) in b.vectors.iter().zip(e.embed(&refs, 8192).unwrap()).enumerate() {
            assert!(cosine(got, &want) > 0.9999, "bulk text {i}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_queues_bound_texts_per_priority() {
        let h = handle(8192, 4);
        hooks(&h).hold.store(true, Ordering::Release);
        let texts = |n: usize| (0..n).map(|i| format!("text {i}")).collect::<Vec<_>>();
        let spawn = |n, p| {
            let h = h.clone();
            let t = texts(n);
            tokio::spawn(async move { h.embed(t, p).await })
        };
        let bulk = spawn(4, Priority::Bulk);
        let query = spawn(3, Priority::Interactive);
        until("both jobs queued", || hooks(&h).sent.load(Ordering::Acquire) == 2).await;
        // A full bulk queue does not refuse queries; a full interactive queue does.
        let e = h.embed(texts(2), Priority::Interactive).await.unwrap_err();
        assert!(matches!(e, EmbedError::Overloaded(_)), "{e}");
        // A bulk call waits for room instead.
        let waiting = spawn(1, Priority::Bulk);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            hooks(&h).sent.load(Ordering::Acquire),
            2,
            "the second bulk call must wait"
        );
        hooks(&h).hold.store(false, Ordering::Release);
        assert_eq!(bulk.await.unwrap().unwrap().vectors.len(), 4);
        assert_eq!(query.await.unwrap().unwrap().vectors.len(), 3);
        assert_eq!(waiting.await.unwrap().unwrap().vectors.len(), 1);
        // More texts than the whole queue: admitted alone.
        assert_eq!(h.embed(texts(9), Priority::Interactive).await.unwrap().vectors.len(), 9);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_micro_batch_fails_its_jobs_and_the_worker_goes_on() {
        let h = handle(8192, 64);
        hooks(&h).panic_next.store(true, Ordering::Release);
        let e = h.embed(vec!["boom".into()], Priority::Interactive).await.unwrap_err();
        assert!(
            matches!(&e, EmbedError::Model(m) if m.contains("panicked") && m.contains("injected panic")),
            "{e}"
        );
        assert!(h.is_up());
        let ok = h.embed(vec!["still here".into()], Priority::Bulk).await.unwrap();
        assert_eq!(ok.vectors.len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_worker_is_reported_and_refuses_work() {
        let h = handle(8192, 64);
        assert!(h.is_up());
        hooks(&h).die.store(true, Ordering::Release);
        let e = h.embed(vec!["x".into()], Priority::Interactive).await.unwrap_err();
        assert!(matches!(e, EmbedError::Unavailable(_)), "{e}");
        until("the worker to be down", || !h.is_up()).await;
        let e = h.embed(vec!["y".into()], Priority::Bulk).await.unwrap_err();
        assert!(e.to_string().contains("has stopped"), "{e}");
    }
}

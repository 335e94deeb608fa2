//! The models crate: model families and their loaders (GGUF, safetensors), tokenizers and chat templates.
//!
//! [`load_on`] turns a located [`GenerationModel`] into a [`LoadedModel`]: the paged
//! [`ModelRunner`] of the resolved device (CPU: `paged::LlamaRunner` over `llama::Llama`; CUDA,
//! feature `cuda`: `cuda_runner::CudaRunner`), whose [`ModelInfo`] the engine sizes its KV cache
//! from, the tokenizer rebuilt from the same file and the chat template. See `README.md` in this
//! directory for the data flow and the tests.
//!
//! Items are `pub(crate)` unless another crate uses them, so the dead-code lint sees the rest.

pub mod chat_template;
pub mod config;
#[cfg(feature = "cuda")]
mod cuda_runner;
pub mod device;
pub mod embedder;
mod encoder;
mod gguf;
#[cfg(feature = "cuda")]
mod gpu;
mod linear;
mod llama;
mod paged;
pub mod prompt;
pub mod registry;
// Only the CUDA runner lays steps out this way; its tests run in every build.
#[cfg(any(test, feature = "cuda"))]
mod step_plan;
mod tokenizer;

#[cfg(any(test, feature = "test-support"))]
pub mod test_support;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use anyhow::Context;

use crate::device::ComputeDevice;
use crate::registry::{GenerationModel, WeightsFormat};
use chat_template::ChatTemplate;
use genai_engine::runner::{ModelInfo, ModelRunner};
use genai_engine::EngineConfig;

/// Used when a model ships no chat template (base models): plain ChatML.
const CHATML: &str = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}\
{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

pub struct LoadedModel {
    pub runner: Box<dyn ModelRunner>,
    pub tokenizer: Arc<tokenizers::Tokenizer>,
    pub chat_template: ChatTemplate,
    /// KV-cache budget chosen by the device (CUDA: free GPU memory × `engine.gpu_memory_fraction`);
    /// `None` = `engine.kv_cache_mib`.
    pub kv_cache_mib: Option<usize>,
}

/// The weights on their device, before the runner is built.
enum Weights {
    Cpu(llama::Llama),
    #[cfg(feature = "cuda")]
    Cuda(cuda_runner::CudaLoad),
}

impl Weights {
    fn cfg(&self) -> &llama::LlamaConfig {
        match self {
            Self::Cpu(m) => &m.cfg,
            #[cfg(feature = "cuda")]
            Self::Cuda(l) => &l.cfg,
        }
    }

    fn kv_bytes_per_token(&self) -> usize {
        match self {
            Self::Cpu(m) => paged::kv_bytes_per_token(m),
            #[cfg(feature = "cuda")]
            Self::Cuda(l) => l.kv_bytes_per_token,
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn no_cuda() -> anyhow::Error {
    anyhow::anyhow!("this binary was built without CUDA support (rebuild with `--features cuda`)")
}

/// Sets the CPU thread count for candle's matmuls and our rayon kernels. Must run before the first
/// model computation: both pools read it once, when first used.
fn configure_threads(threads: usize) {
    linear::set_threads(threads);
    if threads == 0 {
        return;
    }
    // Edition 2021: set_var is safe; this runs at startup, before the engine thread exists.
    for var in ["RAYON_NUM_THREADS", "CANDLE_NUM_THREADS"] {
        std::env::set_var(var, threads.to_string());
    }
    if rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .is_err()
    {
        tracing::warn!(
            threads,
            "rayon pool already started; models.threads applies only to candle's own pool"
        );
    }
}

/// Loads the generation model on `device`. `threads`: CPU threads (0 = all cores); `engine`: the
/// GPU memory fraction and step sizes a CUDA KV budget is derived from.
pub fn load_on(
    files: &GenerationModel,
    threads: usize,
    device: ComputeDevice,
    engine: &EngineConfig,
) -> anyhow::Result<LoadedModel> {
    configure_threads(threads);
    #[cfg(not(feature = "cuda"))]
    let _ = engine;
    let (weights, tok, tinfo, template_src) = match &files.weights {
        WeightsFormat::Gguf(path) => {
            let mut g = gguf::GgufFile::open(path)?;
            let weights = match device {
                ComputeDevice::Cpu => Weights::Cpu(llama::Llama::from_gguf(&mut g, false)?),
                #[cfg(feature = "cuda")]
                ComputeDevice::Cuda { ordinal } => Weights::Cuda(cuda_runner::load_gguf(&mut g, ordinal, engine)?),
                #[cfg(not(feature = "cuda"))]
                ComputeDevice::Cuda { .. } => return Err(no_cuda()),
            };
            let (tok, tinfo) = tokenizer::from_gguf(&g)?;
            let src = g.opt_str("tokenizer.chat_template")?.map(str::to_string);
            (weights, tok, tinfo, src)
        }
        WeightsFormat::Safetensors(dir) => {
            let weights = match device {
                ComputeDevice::Cpu => Weights::Cpu(llama::Llama::from_safetensors(dir)?),
                #[cfg(feature = "cuda")]
                ComputeDevice::Cuda { ordinal } => Weights::Cuda(cuda_runner::load_safetensors(dir, ordinal, engine)?),
                #[cfg(not(feature = "cuda"))]
                ComputeDevice::Cuda { .. } => return Err(no_cuda()),
            };
            let (tok, tinfo, tcfg) = tokenizer::from_hf_dir(dir)?;
            let src = match tcfg.get("chat_template") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                // Newer configs list named templates; "default" is the chat one.
                Some(serde_json::Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
                _ => None,
            };
            (weights, tok, tinfo, src)
        }
    };
    let template_src = template_src.unwrap_or_else(|| {
        tracing::warn!(model = %files.name, "no chat template in the model files; using ChatML");
        CHATML.to_string()
    });
    let name_of = |t: &Option<(u32, String)>| t.as_ref().map(|t| t.1.clone()).unwrap_or_default();
    let chat_template = ChatTemplate::new(&template_src, &name_of(&tinfo.bos), &name_of(&tinfo.eos))
        .with_context(|| format!("model {}", files.name))?;
    let c = weights.cfg();
    let info = ModelInfo {
        name: files.name.clone(),
        vocab_size: c.vocab_size,
        eos_token_ids: tinfo.stop_ids,
        context_length: c.context_length,
        num_layers: c.num_layers,
        num_kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
        kv_bytes_per_token: weights.kv_bytes_per_token(),
    };
    let (runner, kv_cache_mib): (Box<dyn ModelRunner>, _) = match weights {
        Weights::Cpu(model) => (Box::new(paged::LlamaRunner::new(model, info)), None),
        #[cfg(feature = "cuda")]
        Weights::Cuda(load) => {
            let mib = load.kv_cache_mib;
            (load.into_runner(info), Some(mib))
        }
    };
    Ok(LoadedModel {
        runner,
        tokenizer: Arc::new(tok),
        chat_template,
        kv_cache_mib,
    })
}

/// Errors of the sentence embedder. `InvalidArgument` always names the field.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("invalid {field}: {message}")]
    InvalidArgument { field: String, message: String },
    #[error("overloaded: {0}")]
    Overloaded(String),
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("embedding model: {0}")]
    Model(String),
}

impl EmbedError {
    pub(crate) fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }
}

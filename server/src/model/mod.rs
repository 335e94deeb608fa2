//! Model families and their loaders (GGUF, safetensors), tokenizers and chat templates.
//!
//! [`load`] turns a located [`GenerationModel`] into a [`LoadedModel`]: the CPU paged
//! [`ModelRunner`](crate::engine::runner::ModelRunner) ([`paged::LlamaRunner`] over [`llama::Llama`]),
//! the tokenizer rebuilt from the same file, the chat template, and the [`ModelInfo`] the engine
//! sizes its KV cache from. See `README.md` in this directory for the data flow and the tests.

pub mod chat_template;
pub mod gguf;
pub mod linear;
pub mod llama;
pub mod paged;
pub mod tokenizer;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use anyhow::Context;

use crate::engine::runner::{ModelInfo, ModelRunner};
use crate::registry::{GenerationModel, WeightsFormat};
use chat_template::ChatTemplate;
use tokenizer::TokenizerInfo;

/// Used when a model ships no chat template (base models): plain ChatML.
const CHATML: &str = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}\
{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

pub struct LoadedModel {
    pub runner: Box<dyn ModelRunner>,
    pub tokenizer: Arc<tokenizers::Tokenizer>,
    pub chat_template: ChatTemplate,
    pub tokenizer_info: TokenizerInfo,
    pub info: ModelInfo,
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

/// Loads the generation model with `threads` CPU threads (0 = all cores).
pub fn load(files: &GenerationModel, threads: usize) -> anyhow::Result<LoadedModel> {
    configure_threads(threads);
    let (model, tok, tinfo, template_src) = match &files.weights {
        WeightsFormat::Gguf(path) => {
            let mut g = gguf::GgufFile::open(path)?;
            let model = llama::Llama::from_gguf(&mut g, false)?;
            let (tok, tinfo) = tokenizer::from_gguf(&g)?;
            let src = g.opt_str("tokenizer.chat_template")?.map(str::to_string);
            (model, tok, tinfo, src)
        }
        WeightsFormat::Safetensors(dir) => {
            let model = llama::Llama::from_safetensors(dir)?;
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
            (model, tok, tinfo, src)
        }
    };
    let template_src = template_src.unwrap_or_else(|| {
        tracing::warn!(model = %files.name, "no chat template in the model files; using ChatML");
        CHATML.to_string()
    });
    let name_of = |t: &Option<(u32, String)>| t.as_ref().map(|t| t.1.clone()).unwrap_or_default();
    let chat_template = ChatTemplate::new(&template_src, &name_of(&tinfo.bos), &name_of(&tinfo.eos))
        .with_context(|| format!("model {}", files.name))?;
    let c = &model.cfg;
    let info = ModelInfo {
        name: files.name.clone(),
        vocab_size: c.vocab_size,
        eos_token_ids: tinfo.stop_ids.clone(),
        context_length: c.context_length,
        num_layers: c.num_layers,
        num_kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
        kv_bytes_per_token: paged::kv_bytes_per_token(&model),
    };
    Ok(LoadedModel {
        runner: Box::new(paged::LlamaRunner::new(model, info.clone())),
        tokenizer: Arc::new(tok),
        chat_template,
        tokenizer_info: tinfo,
        info,
    })
}

//! Builds the model's `tokenizers::Tokenizer` and finds its special tokens.
//!
//! GGUF: rebuilt from the file's own metadata (`tokenizer.ggml.model = "gpt2"`: byte-level BPE from
//! `tokens` + `merges`; token types CONTROL/USER_DEFINED become added tokens so they encode to single
//! ids; the pre-tokenizer regex follows `tokenizer.ggml.pre` like llama.cpp; `add_bos_token` adds a
//! BOS post-processor). HF directories: `tokenizer.json` + `tokenizer_config.json`.
//! Chat prompts rendered by the template already contain their special tokens (BOS too, when the
//! template writes it), so encode them with `add_special_tokens = false`, as HF's
//! `apply_chat_template` does.
//!
//! Tested on the real SmolLM2 GGUF against ids from the reference HF tokenizer.

use std::path::Path;

use anyhow::{anyhow, bail, Context};
use candle_core::quantized::gguf_file::Value;
use serde_json::{json, Value as Json};
use tokenizers::Tokenizer;

use super::gguf::GgufFile;

/// Special tokens the engine and the chat template need.
#[derive(Debug, Clone, Default)]
pub(crate) struct TokenizerInfo {
    pub(crate) bos: Option<(u32, String)>,
    pub(crate) eos: Option<(u32, String)>,
    /// Every id that ends generation: EOS plus end-of-turn tokens present in the vocabulary.
    pub(crate) stop_ids: Vec<u32>,
}

/// End-of-turn markers of common chat formats; any present in the vocabulary also stops generation.
const END_OF_TURN: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
];

fn stop_ids(tok: &Tokenizer, eos: Option<u32>) -> Vec<u32> {
    let mut ids: Vec<u32> = eos.into_iter().collect();
    for t in END_OF_TURN {
        if let Some(id) = tok.token_to_id(t) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    ids
}

/// llama.cpp's pre-tokenizer regexes, keyed by `tokenizer.ggml.pre`.
fn pre_tokenizer(pre: &str) -> Json {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |re: &str| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false});
    match pre {
        "llama3" | "llama-bpe" | "falcon3" | "pixtral" => {
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3), byte_level(false)]})
        }
        "qwen2" | "deepseek-r1-qwen" => json!({"type": "Sequence", "pretokenizers": [split(QWEN2), byte_level(false)]}),
        // GPT-2 regex after splitting every digit (StarCoder family, SmolLM).
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => json!({
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]
        }),
        _ => byte_level(true),
    }
}

/// Rebuilds the tokenizer stored in a GGUF's metadata.
pub(crate) fn from_gguf(g: &GgufFile) -> anyhow::Result<(Tokenizer, TokenizerInfo)> {
    let model = g.str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        bail!(
            "GGUF {}: tokenizer.ggml.model {model} is not supported (gpt2 byte-level BPE); serve the HF directory with tokenizer.json instead",
            g.path.display()
        );
    }
    let strings = |key: &str| -> anyhow::Result<Vec<String>> {
        g.array(key)?
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(anyhow!(
                    "GGUF metadata {key}: expected strings, got {:?}",
                    other.value_type()
                )),
            })
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let types: Vec<i64> = if g.has("tokenizer.ggml.token_type") {
        g.array("tokenizer.ggml.token_type")?
            .iter()
            .map(|v| {
                v.to_i32()
                    .map(i64::from)
                    .map_err(|e| anyhow!("GGUF metadata tokenizer.ggml.token_type: {e}"))
            })
            .collect::<anyhow::Result<_>>()?
    } else {
        vec![1; tokens.len()]
    };
    if types.len() != tokens.len() {
        bail!("GGUF metadata: {} token types for {} tokens", types.len(), tokens.len());
    }
    let vocab: serde_json::Map<String, Json> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    // Types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    let added: Vec<Json> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, &ty))| ty == 3 || ty == 4)
        .map(|(i, (t, &ty))| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": ty == 3})
        })
        .collect();
    let id_of = |key: &str| -> anyhow::Result<Option<(u32, String)>> {
        if !g.has(key) {
            return Ok(None);
        }
        let id = g.usize(key)?;
        let tok = tokens
            .get(id)
            .ok_or_else(|| anyhow!("GGUF metadata {key}: id {id} outside the vocabulary"))?;
        Ok(Some((id as u32, tok.clone())))
    };
    let bos = id_of("tokenizer.ggml.bos_token_id")?;
    let eos = id_of("tokenizer.ggml.eos_token_id")?;
    let add_bos = g.bool_or("tokenizer.ggml.add_bos_token", false)? && bos.is_some();
    let post = match (&bos, add_bos) {
        (Some((id, tok)), true) => json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": tok, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {tok.clone(): {"id": tok, "ids": [id], "tokens": [tok]}}
        }),
        _ => json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true}),
    };
    let pre = g.opt_str("tokenizer.ggml.pre")?.unwrap_or("default");
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer(pre),
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges
        }
    });
    let tok = Tokenizer::from_bytes(serde_json::to_vec(&spec)?)
        .map_err(|e| anyhow!("GGUF {}: building the tokenizer from metadata: {e}", g.path.display()))?;
    let stop = stop_ids(&tok, eos.as_ref().map(|e| e.0));
    Ok((
        tok,
        TokenizerInfo {
            bos,
            eos,
            stop_ids: stop,
        },
    ))
}

/// A special token in tokenizer_config.json: a string or `{"content": ...}`.
fn token_str(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// Loads `tokenizer.json` from an HF directory; special tokens from `tokenizer_config.json`,
/// extra EOS ids from `generation_config.json`/`config.json`.
pub(crate) fn from_hf_dir(dir: &Path) -> anyhow::Result<(Tokenizer, TokenizerInfo, Json)> {
    let path = dir.join("tokenizer.json");
    let tok = Tokenizer::from_file(&path).map_err(|e| anyhow!("loading {}: {e}", path.display()))?;
    let read_json = |name: &str| -> anyhow::Result<Json> {
        let p = dir.join(name);
        if !p.is_file() {
            return Ok(Json::Null);
        }
        serde_json::from_slice(&std::fs::read(&p)?).with_context(|| format!("parsing {}", p.display()))
    };
    let tcfg = read_json("tokenizer_config.json")?;
    let with_id = |s: Option<String>| s.and_then(|s| tok.token_to_id(&s).map(|id| (id, s)));
    let bos = with_id(token_str(tcfg.get("bos_token")));
    let eos = with_id(token_str(tcfg.get("eos_token")));
    let mut stop = stop_ids(&tok, eos.as_ref().map(|e| e.0));
    for name in ["generation_config.json", "config.json"] {
        let ids = match read_json(name)?.get("eos_token_id") {
            Some(Json::Number(n)) => n.as_u64().into_iter().collect(),
            Some(Json::Array(a)) => a.iter().filter_map(Json::as_u64).collect(),
            _ => Vec::new(),
        };
        for id in ids {
            let id = u32::try_from(id).with_context(|| format!("{name}: eos_token_id {id}"))?;
            if !stop.contains(&id) {
                stop.push(id);
            }
        }
    }
    Ok((
        tok,
        TokenizerInfo {
            bos,
            eos,
            stop_ids: stop,
        },
        tcfg,
    ))
}

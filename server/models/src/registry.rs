//! Locates and validates the served models' files before anything loads them,
//! so a missing or corrupt file is one clear error naming the path and the fix.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use crate::config::{ModelEntry, ModelsConfig};

const FIX: &str = "run scripts/fetch-models.sh";

/// How a generation model is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightsFormat {
    /// One GGUF file (quantized weights, tokenizer and chat template inside).
    Gguf(PathBuf),
    /// A Hugging Face directory: config.json, tokenizer.json, *.safetensors.
    Safetensors(PathBuf),
}

#[derive(Debug, Clone)]
pub struct GenerationModel {
    pub name: String,
    pub weights: WeightsFormat,
}

#[derive(Debug, Clone)]
pub struct EmbeddingModel {
    pub name: String,
    pub dir: PathBuf,
}

#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub generation: GenerationModel,
    pub embedding: EmbeddingModel,
}

/// Finds both models and checks their files are present and well-formed.
pub fn locate(cfg: &ModelsConfig) -> anyhow::Result<ModelFiles> {
    Ok(ModelFiles {
        generation: locate_generation(cfg, &cfg.generation)?,
        embedding: locate_embedding(cfg, &cfg.embedding)?,
    })
}

fn locate_generation(cfg: &ModelsConfig, entry: &ModelEntry) -> anyhow::Result<GenerationModel> {
    let path = cfg.resolve(entry);
    let weights = if path.is_dir() {
        let ggufs = files_with_ext(&path, "gguf")?;
        match ggufs.first() {
            Some(g) => WeightsFormat::Gguf(g.clone()),
            None => {
                require_file(&path.join("config.json"))?;
                require_file(&path.join("tokenizer.json"))?;
                let st = files_with_ext(&path, "safetensors")?;
                if st.is_empty() {
                    bail!(
                        "no .gguf or .safetensors weights in {} ({FIX}, or point models.generation.path at a model)",
                        path.display()
                    );
                }
                for f in &st {
                    check_safetensors(f)?;
                }
                WeightsFormat::Safetensors(path)
            }
        }
    } else {
        WeightsFormat::Gguf(path)
    };
    if let WeightsFormat::Gguf(f) = &weights {
        check_gguf(f)?;
    }
    Ok(GenerationModel {
        name: entry.name.clone(),
        weights,
    })
}

fn locate_embedding(cfg: &ModelsConfig, entry: &ModelEntry) -> anyhow::Result<EmbeddingModel> {
    let dir = cfg.resolve(entry);
    if !dir.is_dir() {
        bail!(
            "embedding model directory {} not found ({FIX}, or set models.embedding.path)",
            dir.display()
        );
    }
    let config = dir.join("config.json");
    require_file(&config)?;
    serde_json::from_slice::<serde_json::Value>(&std::fs::read(&config)?)
        .map_err(|e| anyhow::anyhow!("{} is not valid JSON ({e}); {FIX}", config.display()))?;
    let tokenizer = dir.join("tokenizer.json");
    require_file(&tokenizer)?;
    serde_json::from_slice::<serde_json::Value>(&std::fs::read(&tokenizer)?)
        .map_err(|e| anyhow::anyhow!("{} is not valid JSON ({e}); {FIX}", tokenizer.display()))?;
    check_safetensors(&dir.join("model.safetensors"))?;
    Ok(EmbeddingModel {
        name: entry.name.clone(),
        dir,
    })
}

fn require_file(p: &Path) -> anyhow::Result<()> {
    if !p.is_file() {
        bail!("model file {} not found ({FIX})", p.display());
    }
    Ok(())
}

fn files_with_ext(dir: &Path, ext: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    v.sort();
    Ok(v)
}

/// Parses the GGUF header and tensor index and checks every tensor's data lies
/// inside the file (a truncated download fails here, not at the first request).
fn check_gguf(p: &Path) -> anyhow::Result<()> {
    require_file(p)?;
    let len = std::fs::metadata(p)?.len();
    let mut r = BufReader::new(File::open(p)?);
    let content = candle_core::quantized::gguf_file::Content::read(&mut r)
        .map_err(|e| anyhow::anyhow!("{} is not a valid GGUF file ({e}); {FIX}", p.display()))?;
    for (name, info) in &content.tensor_infos {
        let elems = info.shape.elem_count();
        let bytes = elems / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
        let end = content.tensor_data_offset + info.offset + bytes as u64;
        if end > len {
            bail!(
                "{} is truncated (tensor {name} ends at byte {end} of {len}); {FIX}",
                p.display()
            );
        }
    }
    Ok(())
}

/// Reads the safetensors header and checks the data section has the declared size.
fn check_safetensors(p: &Path) -> anyhow::Result<()> {
    require_file(p)?;
    let bad = |why: String| anyhow::anyhow!("{} is not a valid safetensors file ({why}); {FIX}", p.display());
    let len = std::fs::metadata(p)?.len();
    let mut f = File::open(p)?;
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|e| bad(e.to_string()))?;
    let header_len = u64::from_le_bytes(n);
    if header_len > 100 << 20 || 8 + header_len > len {
        return Err(bad(format!("header length {header_len} out of range")));
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header).map_err(|e| bad(e.to_string()))?;
    let json: serde_json::Value = serde_json::from_slice(&header).map_err(|e| bad(e.to_string()))?;
    let end = json
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(_, t)| t.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .unwrap_or(0);
    if 8 + header_len + end > len {
        return Err(bad(format!(
            "truncated: data ends at {} of {len} bytes",
            8 + header_len + end
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path) -> ModelsConfig {
        ModelsConfig {
            dir: dir.to_path_buf(),
            ..Default::default()
        }
    }

    #[test]
    fn missing_files_name_path_and_fix() {
        let d = tempfile::tempdir().unwrap();
        let e = locate(&cfg(d.path())).unwrap_err().to_string();
        assert!(e.contains("SmolLM2-135M-Instruct.Q4_1.gguf") && e.contains(FIX), "{e}");
    }

    #[test]
    fn corrupt_gguf_is_rejected() {
        let d = tempfile::tempdir().unwrap();
        let c = cfg(d.path());
        let p = c.resolve(&c.generation);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, b"not a gguf at all").unwrap();
        let e = locate(&c).unwrap_err().to_string();
        assert!(e.contains("not a valid GGUF") && e.contains(FIX), "{e}");
    }

    #[test]
    fn truncated_safetensors_is_rejected() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.safetensors");
        let header = br#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&[0u8; 8]);
        std::fs::write(&p, &bytes).unwrap();
        let e = check_safetensors(&p).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        bytes.extend_from_slice(&[0u8; 8]);
        std::fs::write(&p, &bytes).unwrap();
        check_safetensors(&p).unwrap();
    }
}

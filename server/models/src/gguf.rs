//! Typed access to a GGUF file's metadata and tensors.
//!
//! Every getter names the missing or mistyped key in its error, so a model converted with unusual
//! metadata fails at load with the key to look at. Tested through the model and tokenizer tests on
//! the real SmolLM2 GGUF.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, Context};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::QTensor;
use candle_core::Device;

pub(crate) struct GgufFile {
    pub(crate) path: PathBuf,
    pub(crate) content: Content,
    reader: BufReader<File>,
}

impl GgufFile {
    pub(crate) fn open(path: &Path) -> anyhow::Result<Self> {
        let mut reader = BufReader::new(File::open(path).with_context(|| format!("opening {}", path.display()))?);
        let content =
            Content::read(&mut reader).map_err(|e| anyhow!("{} is not a valid GGUF file: {e}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
            reader,
        })
    }

    fn value(&self, key: &str) -> anyhow::Result<&Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| anyhow!("GGUF {}: metadata key {key} missing", self.path.display()))
    }

    fn typed<'a, T>(&'a self, key: &str, f: impl FnOnce(&'a Value) -> candle_core::Result<T>) -> anyhow::Result<T> {
        f(self.value(key)?).map_err(|e| anyhow!("GGUF {}: metadata key {key}: {e}", self.path.display()))
    }

    pub(crate) fn has(&self, key: &str) -> bool {
        self.content.metadata.contains_key(key)
    }

    /// Any integer type, as usize.
    pub(crate) fn usize(&self, key: &str) -> anyhow::Result<usize> {
        let v = self.value(key)?;
        let n = match v {
            Value::U8(x) => *x as u64,
            Value::U16(x) => *x as u64,
            Value::U32(x) => *x as u64,
            Value::U64(x) => *x,
            Value::I8(x) => u64::try_from(*x).unwrap_or(u64::MAX),
            Value::I16(x) => u64::try_from(*x).unwrap_or(u64::MAX),
            Value::I32(x) => u64::try_from(*x).unwrap_or(u64::MAX),
            Value::I64(x) => u64::try_from(*x).unwrap_or(u64::MAX),
            other => {
                return Err(anyhow!(
                    "GGUF {}: metadata key {key}: expected an integer, got {:?}",
                    self.path.display(),
                    other.value_type()
                ))
            }
        };
        usize::try_from(n)
            .ok()
            .filter(|&n| n != usize::MAX)
            .ok_or_else(|| anyhow!("GGUF {}: metadata key {key}: {v:?} out of range", self.path.display()))
    }

    pub(crate) fn usize_or(&self, key: &str, default: usize) -> anyhow::Result<usize> {
        if self.has(key) {
            self.usize(key)
        } else {
            Ok(default)
        }
    }

    pub(crate) fn f32(&self, key: &str) -> anyhow::Result<f32> {
        match self.value(key)? {
            Value::F64(x) => Ok(*x as f32),
            _ => self.typed(key, |v| v.to_f32()),
        }
    }

    pub(crate) fn f32_or(&self, key: &str, default: f32) -> anyhow::Result<f32> {
        if self.has(key) {
            self.f32(key)
        } else {
            Ok(default)
        }
    }

    pub(crate) fn bool_or(&self, key: &str, default: bool) -> anyhow::Result<bool> {
        if self.has(key) {
            self.typed(key, |v| v.to_bool())
        } else {
            Ok(default)
        }
    }

    pub(crate) fn str(&self, key: &str) -> anyhow::Result<&str> {
        self.typed(key, |v| v.to_string().map(|s| s.as_str()))
    }

    pub(crate) fn opt_str(&self, key: &str) -> anyhow::Result<Option<&str>> {
        if self.has(key) {
            self.str(key).map(Some)
        } else {
            Ok(None)
        }
    }

    pub(crate) fn array(&self, key: &str) -> anyhow::Result<&Vec<Value>> {
        self.typed(key, |v| v.to_vec())
    }

    pub(crate) fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    pub(crate) fn tensor(&mut self, name: &str) -> anyhow::Result<Arc<QTensor>> {
        let t = self
            .content
            .tensor(&mut self.reader, name, &Device::Cpu)
            .map_err(|e| anyhow!("GGUF {}: tensor {name}: {e}", self.path.display()))?;
        Ok(Arc::new(t))
    }

    pub(crate) fn opt_tensor(&mut self, name: &str) -> anyhow::Result<Option<Arc<QTensor>>> {
        if self.has_tensor(name) {
            self.tensor(name).map(Some)
        } else {
            Ok(None)
        }
    }
}

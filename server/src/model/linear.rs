//! The one linear-layer type every projection of every model goes through.
//!
//! Owns a weight `[out_features, in_features]` (GGML-quantized, or dense f32) and an optional bias.
//! Keeping all matmuls behind [`Linear::forward`] is what lets a faster batched CPU kernel
//! (`genai_kernels::cpu::qmatmul`) or a GPU path be swapped in at one place.
//! Inputs are `[tokens, in_features]` f32 on the CPU; outputs `[tokens, out_features]` f32.
//! Tested through the model tests (paged vs dense forward, greedy generation).

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Module, Tensor};

#[derive(Debug, Clone)]
pub struct Linear {
    weight: QMatMul,
    bias: Option<Tensor>,
    out_features: usize,
    in_features: usize,
}

impl Linear {
    /// A GGUF weight (`[out, in]` in candle's order). f16/f32 tensors are dequantized to f32 once.
    pub fn from_qtensor(weight: Arc<QTensor>, bias: Option<Tensor>) -> candle_core::Result<Self> {
        let (out_features, in_features) = weight.shape().dims2()?;
        Ok(Self {
            weight: QMatMul::from_arc(weight)?,
            bias: bias.map(|b| b.to_dtype(DType::F32)).transpose()?,
            out_features,
            in_features,
        })
    }

    /// A dense weight `[out, in]` of any float dtype; computes in f32.
    pub fn from_tensor(weight: Tensor, bias: Option<Tensor>) -> candle_core::Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        Ok(Self {
            weight: QMatMul::Tensor(weight.to_dtype(DType::F32)?.contiguous()?),
            bias: bias.map(|b| b.to_dtype(DType::F32)).transpose()?,
            out_features,
            in_features,
        })
    }

    /// Stacks the rows of several linears with the same input (q/k/v, gate/up) into one, so a single
    /// matmul quantizes the activations once. Returns `None` when they cannot be fused (different
    /// quantization types, or some with a bias and some without).
    pub fn fuse_rows(parts: &[&Linear]) -> candle_core::Result<Option<Linear>> {
        let first = parts.first().map(|p| p.in_features);
        if parts
            .iter()
            .any(|p| Some(p.in_features) != first || p.bias.is_some() != parts[0].bias.is_some())
        {
            return Ok(None);
        }
        let out_features = parts.iter().map(|p| p.out_features).sum();
        let in_features = parts[0].in_features;
        let weight = match parts.iter().map(|p| &p.weight).collect::<Vec<_>>().as_slice() {
            [QMatMul::QTensor(w0), ..] => {
                let mut qs = Vec::with_capacity(parts.len());
                for p in parts {
                    match &p.weight {
                        QMatMul::QTensor(w) if w.dtype() == w0.dtype() => qs.push(w.clone()),
                        _ => return Ok(None),
                    }
                }
                let mut bytes = Vec::new();
                for w in &qs {
                    bytes.extend_from_slice(&w.data()?);
                }
                let storage = QStorage::from_data(Cow::Owned(bytes), &Device::Cpu, w0.dtype())?;
                QMatMul::QTensor(Arc::new(QTensor::new(storage, (out_features, in_features))?))
            }
            ws => {
                let mut ts = Vec::with_capacity(ws.len());
                for w in ws {
                    match w {
                        QMatMul::Tensor(t) => ts.push(t.clone()),
                        _ => return Ok(None),
                    }
                }
                QMatMul::Tensor(Tensor::cat(&ts, 0)?)
            }
        };
        let bias = match parts[0].bias {
            Some(_) => Some(Tensor::cat(
                &parts.iter().filter_map(|p| p.bias.clone()).collect::<Vec<_>>(),
                0,
            )?),
            None => None,
        };
        Ok(Some(Linear {
            weight,
            bias,
            out_features,
            in_features,
        }))
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// `x @ Wᵀ + b` for `x: [tokens, in_features]` f32.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.weight.forward(x)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_rows_equal_separate_outputs() {
        let dev = Device::Cpu;
        let w1 = Tensor::arange(0f32, 64.0 * 32.0, &dev)
            .unwrap()
            .reshape((64, 32))
            .unwrap();
        let w2 = (w1.clone() * -0.5).unwrap().narrow(0, 0, 32).unwrap();
        let x = Tensor::arange(0f32, 3.0 * 32.0, &dev)
            .unwrap()
            .reshape((3, 32))
            .unwrap();
        for quantized in [false, true] {
            let mk = |w: &Tensor| {
                if quantized {
                    let q = QTensor::quantize(&(w / 1000.0).unwrap(), candle_core::quantized::GgmlDType::Q8_0).unwrap();
                    Linear::from_qtensor(Arc::new(q), None).unwrap()
                } else {
                    Linear::from_tensor(
                        w.clone(),
                        Some(Tensor::ones(w.dim(0).unwrap(), DType::F32, &dev).unwrap()),
                    )
                    .unwrap()
                }
            };
            let (a, b) = (mk(&w1), mk(&w2));
            let fused = Linear::fuse_rows(&[&a, &b]).unwrap().unwrap();
            assert_eq!(fused.out_features(), 96);
            let want = Tensor::cat(&[a.forward(&x).unwrap(), b.forward(&x).unwrap()], 1).unwrap();
            let got = fused.forward(&x).unwrap();
            let diff = (want - got)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-3, "quantized={quantized}: {diff}");
        }
    }
}
#[cfg(test)]
mod probe {
    use super::*;
    use candle_core::quantized::GgmlDType;
    #[test]
    fn probe_fuse() {
        let dev = Device::Cpu;
        for dt in [GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q4_0] {
            let w1 = Tensor::randn(0f32, 1.0, (192, 576), &dev).unwrap();
            let w2 = Tensor::randn(0f32, 1.0, (64, 576), &dev).unwrap();
            let a = Linear::from_qtensor(Arc::new(QTensor::quantize(&w1, dt).unwrap()), None).unwrap();
            let b = Linear::from_qtensor(Arc::new(QTensor::quantize(&w2, dt).unwrap()), None).unwrap();
            let f = Linear::fuse_rows(&[&a, &b]).unwrap().unwrap();
            for m in [1usize, 3, 8, 33] {
                let x = Tensor::randn(0f32, 1.0, (m, 576), &dev).unwrap();
                let want = Tensor::cat(&[a.forward(&x).unwrap(), b.forward(&x).unwrap()], 1).unwrap();
                let got = f.forward(&x).unwrap();
                let d = (&want - &got)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                println!("{dt:?} m={m} fused diff={d}");
            }
        }
    }
}

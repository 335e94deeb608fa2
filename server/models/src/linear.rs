//! The one linear-layer type every projection of every model goes through.
//!
//! Owns a weight `[out_features, in_features]` and an optional bias. GGUF Q4_0/Q4_1/Q8_0 weights run
//! on our batched CPU kernel (`genai_kernels::cpu::qmatmul`, repacked once at load); other GGML types
//! (K-quants …) on candle's `QMatMul`; dense weights (safetensors, f16/f32 GGUF tensors) in f32 through
//! candle's gemm. Inputs are `[tokens, in_features]` f32 on the CPU; outputs `[tokens, out_features]`.
//! Projections sharing an input (q/k/v, gate/up) are stacked at load by [`concat_qtensors`] /
//! `Tensor::cat` so one matmul quantizes the activations once.
//! Tested here (kernel and candle paths agree, stacking is exact) and through the model tests.

use std::borrow::Cow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use genai_kernels::cpu::qmatmul::{qmatmul, QMatrix, QType};

/// Threads the CPU kernels (qmatmul here, paged attention in `paged`) use; set once by `crate::load_on`.
static THREADS: AtomicUsize = AtomicUsize::new(0);

/// Sets the CPU kernels' thread count (0 = all cores).
pub(crate) fn set_threads(threads: usize) {
    THREADS.store(threads, Ordering::Relaxed);
}

pub(crate) fn threads() -> usize {
    match THREADS.load(Ordering::Relaxed) {
        0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        n => n,
    }
}

#[derive(Clone)]
enum Weight {
    /// Our batched kernel (Q4_0/Q4_1/Q8_0).
    Kernel(Arc<QMatrix>),
    /// candle: other GGML types, or dense f32.
    Candle(QMatMul),
}

#[derive(Clone)]
pub(crate) struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    out_features: usize,
    in_features: usize,
}

impl std::fmt::Debug for Linear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.weight {
            Weight::Kernel(w) => format!("kernel {:?}", w.qtype()),
            Weight::Candle(QMatMul::QTensor(q)) => format!("candle {:?}", q.dtype()),
            Weight::Candle(_) => "candle f32".to_string(),
        };
        f.debug_struct("Linear")
            .field("weight", &kind)
            .field("out", &self.out_features)
            .field("in", &self.in_features)
            .finish()
    }
}

fn f32_bias(b: Option<Tensor>) -> candle_core::Result<Option<Tensor>> {
    b.map(|b| b.to_dtype(DType::F32)).transpose()
}

impl Linear {
    /// A GGUF weight (`[out, in]` in candle's order). f16/f32 tensors are dequantized to f32 once.
    pub(crate) fn from_qtensor(weight: Arc<QTensor>, bias: Option<Tensor>) -> anyhow::Result<Self> {
        let (out_features, in_features) = weight.shape().dims2()?;
        let qtype = match weight.dtype() {
            GgmlDType::Q4_0 => Some(QType::Q4_0),
            GgmlDType::Q4_1 => Some(QType::Q4_1),
            GgmlDType::Q8_0 => Some(QType::Q8_0),
            _ => None,
        };
        let weight = match qtype {
            Some(q) => Weight::Kernel(Arc::new(QMatrix::new(q, out_features, in_features, &weight.data()?)?)),
            None => Weight::Candle(QMatMul::from_arc(weight)?),
        };
        Ok(Self {
            weight,
            bias: f32_bias(bias)?,
            out_features,
            in_features,
        })
    }

    /// A dense weight `[out, in]` of any float dtype; computes in f32.
    pub(crate) fn from_tensor(weight: Tensor, bias: Option<Tensor>) -> candle_core::Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        Ok(Self {
            weight: Weight::Candle(QMatMul::Tensor(weight.to_dtype(DType::F32)?.contiguous()?)),
            bias: f32_bias(bias)?,
            out_features,
            in_features,
        })
    }

    pub(crate) fn out_features(&self) -> usize {
        self.out_features
    }

    pub(crate) fn in_features(&self) -> usize {
        self.in_features
    }

    /// `x @ Wᵀ + b` for `x: [tokens, in_features]` f32.
    pub(crate) fn forward(&self, x: &Tensor) -> anyhow::Result<Tensor> {
        let y = match &self.weight {
            Weight::Candle(w) => w.forward(x)?,
            Weight::Kernel(w) => {
                let (batch, k) = x.dims2()?;
                let xs = x.flatten_all()?.to_vec1::<f32>()?;
                debug_assert_eq!(k, self.in_features);
                let mut out = vec![0f32; batch * self.out_features];
                qmatmul(w, &xs, batch, &mut out, threads())?;
                Tensor::from_vec(out, (batch, self.out_features), &Device::Cpu)?
            }
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// Stacks the rows of same-type quantized weights `[out_i, in]` into one `[Σ out_i, in]` tensor
/// (GGML rows are independent runs of blocks, so this is a byte concatenation). `None` when the
/// types or input widths differ.
pub(crate) fn concat_qtensors(parts: &[Arc<QTensor>]) -> anyhow::Result<Option<Arc<QTensor>>> {
    let Some(first) = parts.first() else {
        return Ok(None);
    };
    let (_, in_features) = first.shape().dims2()?;
    let mut rows = 0;
    let mut bytes = Vec::new();
    for p in parts {
        let (out, inp) = p.shape().dims2()?;
        if p.dtype() != first.dtype() || inp != in_features {
            return Ok(None);
        }
        rows += out;
        bytes.extend_from_slice(&p.data()?);
    }
    let storage = QStorage::from_data(Cow::Owned(bytes), &Device::Cpu, first.dtype())?;
    Ok(Some(Arc::new(QTensor::new(storage, (rows, in_features))?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        d / b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn kernel_and_candle_paths_agree_and_stacking_is_exact() {
        let dev = Device::Cpu;
        let w1 = Tensor::randn(0f32, 1.0, (96, 64), &dev).unwrap();
        let w2 = Tensor::randn(0f32, 1.0, (32, 64), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (5, 64), &dev).unwrap();
        for dt in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (q1, q2) = (
                Arc::new(QTensor::quantize(&w1, dt).unwrap()),
                Arc::new(QTensor::quantize(&w2, dt).unwrap()),
            );
            let kernel = Linear::from_qtensor(q1.clone(), None).unwrap();
            assert!(matches!(kernel.weight, Weight::Kernel(_)));
            // Same quantized weights on candle's path: both quantize activations to 8 bits per 32.
            let candle = QMatMul::from_arc(q1.clone()).unwrap().forward(&x).unwrap();
            let dense = Linear::from_tensor(q1.dequantize(&dev).unwrap(), None)
                .unwrap()
                .forward(&x)
                .unwrap();
            let got = kernel.forward(&x).unwrap();
            assert!(
                max_rel(&got, &dense) < 2e-2,
                "{dt:?} vs dequantized: {}",
                max_rel(&got, &dense)
            );
            assert!(
                max_rel(&got, &candle) < 2e-2,
                "{dt:?} vs candle: {}",
                max_rel(&got, &candle)
            );
            let fused = Linear::from_qtensor(concat_qtensors(&[q1, q2.clone()]).unwrap().unwrap(), None).unwrap();
            let second = Linear::from_qtensor(q2, None).unwrap();
            let want = Tensor::cat(&[got, second.forward(&x).unwrap()], 1).unwrap();
            assert_eq!(max_rel(&fused.forward(&x).unwrap(), &want), 0.0, "{dt:?}");
        }
        let q4k =
            Arc::new(QTensor::quantize(&Tensor::randn(0f32, 1.0, (8, 256), &dev).unwrap(), GgmlDType::Q4K).unwrap());
        let q8 =
            Arc::new(QTensor::quantize(&Tensor::randn(0f32, 1.0, (8, 256), &dev).unwrap(), GgmlDType::Q8_0).unwrap());
        assert!(concat_qtensors(&[q4k.clone(), q8]).unwrap().is_none());
        assert!(matches!(
            Linear::from_qtensor(q4k, None).unwrap().weight,
            Weight::Candle(_)
        ));
    }

    #[test]
    fn bias_is_added() {
        let dev = Device::Cpu;
        let w = Tensor::eye(3, DType::F32, &dev).unwrap();
        let l = Linear::from_tensor(w, Some(Tensor::new(&[1f32, 2.0, 3.0], &dev).unwrap())).unwrap();
        let y = l.forward(&Tensor::new(&[[1f32, 1.0, 1.0]], &dev).unwrap()).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), vec![vec![2.0, 3.0, 4.0]]);
    }
}

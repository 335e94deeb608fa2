//! candle <-> cudarc interop (feature `cuda`): our kernels take `CudaSlice`s, candle's matmuls take
//! and return `Tensor`s. Shared by the CUDA runner and the embedder's GPU pooling, so neither
//! depends on the other.

use anyhow::bail;
use candle_core::cuda_backend::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, Storage, Tensor};
use cudarc::driver::CudaSlice;
use genai_kernels::cuda::CudaDtype;

/// Activation / KV-cache element types: both our kernels and candle's CUDA backend know them.
pub(crate) trait GpuFloat: CudaDtype + candle_core::WithDType + CudaDType {}
impl GpuFloat for half::f16 {}
impl GpuFloat for half::bf16 {}
impl GpuFloat for f32 {}

/// A device buffer of ours as a `[rows, cols]` candle tensor (moves it; no copy).
pub(crate) fn wrap<T: GpuFloat>(
    s: CudaSlice<T>,
    cuda: &CudaDevice,
    rows: usize,
    cols: usize,
) -> anyhow::Result<Tensor> {
    if s.len() != rows * cols {
        bail!("internal: buffer of {} elements wrapped as {rows}x{cols}", s.len());
    }
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(s, cuda.clone()));
    Ok(Tensor::from_storage(storage, (rows, cols), BackpropOp::none(), false))
}

/// Runs `f` on the device buffer holding exactly `t`'s elements in row-major order (copying `t`
/// into a fresh buffer first when it is a strided or offset view).
pub(crate) fn with_slice<T: GpuFloat, R>(
    t: &Tensor,
    f: impl FnOnce(&CudaSlice<T>) -> anyhow::Result<R>,
) -> anyhow::Result<R> {
    {
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(cs) = &*storage else {
            bail!(
                "internal: expected a CUDA tensor, got one on {:?}",
                t.device().location()
            );
        };
        let s = cs.as_cuda_slice::<T>()?;
        if layout.is_contiguous() && layout.start_offset() == 0 && s.len() == t.elem_count() {
            return f(s);
        }
    }
    let fresh = t.force_contiguous()?;
    let (storage, _) = fresh.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        bail!("internal: expected a CUDA tensor");
    };
    f(cs.as_cuda_slice::<T>()?)
}

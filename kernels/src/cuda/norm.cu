// RMSNorm and fused residual-add + RMSNorm over rows of `hidden` elements.
//
// One block per row (token). A row of a hidden state is at most a few thousand elements, so one
// block of 256 threads covers it in a handful of coalesced strided passes; the sum of squares is a
// block reduction (warp shuffles, then one float per warp in shared memory).
//
// The fused kernel exists to save a round trip through device memory: the residual add, its store
// and the normalisation happen in one launch, and the second pass over the row re-reads the freshly
// written residual from L1/L2 rather than DRAM.
#include "common.cuh"

namespace gf {

template <typename T>
__device__ void rms_norm_impl(T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ weight,
                              float eps, int hidden) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * hidden;
  float sq = 0.f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    const float v = to_float(xr[i]);
    sq += v * v;
  }
  const float inv_rms = rsqrtf(block_sum(sq, scratch) / hidden + eps);
  T* orow = out + row * hidden;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x)
    orow[i] = from_float<T>(to_float(xr[i]) * inv_rms * to_float(weight[i]));
}

// residual <- x + residual (rounded to T); x <- rms_norm(residual) * weight.
// The sum of squares uses the unrounded f32 sum, the output the stored (rounded) residual, so the
// result equals rms_norm applied to what the next layer will read as its residual, up to one rounding.
template <typename T>
__device__ void fused_add_rms_norm_impl(T* __restrict__ x, T* __restrict__ residual, const T* __restrict__ weight,
                                        float eps, int hidden) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  T* xr = x + row * hidden;
  T* rr = residual + row * hidden;
  float sq = 0.f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    const float v = to_float(xr[i]) + to_float(rr[i]);
    sq += v * v;
    rr[i] = from_float<T>(v);
  }
  // block_sum's barrier also orders the residual stores above before the reads below (each thread
  // re-reads only its own elements anyway).
  const float inv_rms = rsqrtf(block_sum(sq, scratch) / hidden + eps);
  for (int i = threadIdx.x; i < hidden; i += blockDim.x)
    xr[i] = from_float<T>(to_float(rr[i]) * inv_rms * to_float(weight[i]));
}

}  // namespace gf

#define GF_NORM(S, T)                                                                                      \
  extern "C" __global__ void rms_norm_##S(T* out, const T* x, const T* weight, float eps, int hidden) {    \
    gf::rms_norm_impl<T>(out, x, weight, eps, hidden);                                                     \
  }                                                                                                        \
  extern "C" __global__ void fused_add_rms_norm_##S(T* x, T* residual, const T* weight, float eps,         \
                                                    int hidden) {                                          \
    gf::fused_add_rms_norm_impl<T>(x, residual, weight, eps, hidden);                                      \
  }
GF_FOR_EACH_DTYPE(GF_NORM)

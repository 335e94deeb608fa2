// Shared helpers of the GenAI Factory kernels: scalar conversions, 16-byte vector access and
// warp/block reductions.
//
// Every kernel computes in f32 and stores in the tensor's own type (f32, f16 or bf16), so the
// conversions below are the only place where the storage type matters. Kernels that stream
// contiguous rows move them as 16-byte vectors (`Vec16`): one `LDG.128` per thread is the widest
// global access and lets a warp cover 512 contiguous bytes per instruction.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace gf {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// 16 bytes of T: 4 f32 or 8 f16/bf16. Loaded and stored as one uint4 so the compiler emits a single
// 128-bit access; callers guarantee 16-byte alignment (row lengths are multiples of the vector).
template <typename T> struct Vec16 {
  static constexpr int N = 16 / sizeof(T);
  union {
    uint4 raw;
    T v[N];
  };
  __device__ __forceinline__ void load(const T* p) { raw = *reinterpret_cast<const uint4*>(p); }
  __device__ __forceinline__ void store(T* p) const { *reinterpret_cast<uint4*>(p) = raw; }
  __device__ __forceinline__ void zero() { raw = make_uint4(0, 0, 0, 0); }
  __device__ __forceinline__ float get(int i) const { return to_float(v[i]); }
};

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) x += __shfl_xor_sync(0xffffffffu, x, mask);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, mask));
  return x;
}

// Sum over the whole block; every thread gets the result. `scratch` holds one float per warp.
// Two barriers: one before reading the per-warp partials, one so that a second call may reuse
// `scratch` safely.
__device__ __forceinline__ float block_sum(float x, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int num_warps = (blockDim.x + 31) >> 5;
  x = warp_sum(x);
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < num_warps; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

}  // namespace gf

// Instantiates `MACRO(suffix, type)` once per storage type; the suffix is part of every exported
// kernel name (e.g. `rms_norm_bf16`) and matches `CudaDtype::NAME` on the Rust side.
#define GF_FOR_EACH_DTYPE(MACRO) \
  MACRO(f32, float)              \
  MACRO(f16, __half)             \
  MACRO(bf16, __nv_bfloat16)

// Embedding pooling: masked mean over the tokens of each sequence, then (optionally) L2
// normalisation, fused so the pooled vector never goes back to device memory before it is final.
//
// hidden `[batch, seq_len, hidden_size]` (T), mask `[batch, seq_len]` (u32, nonzero = real token),
// out `[batch, hidden_size]` f32. A sequence whose mask is all zero pools to the zero vector.
//
// One block per sequence; each thread owns the dims tid, tid + blockDim, ... and walks the tokens,
// so for every token the block reads one contiguous, coalesced hidden row. The squared norm is a
// block reduction; the final scale is applied by the thread that owns the dim (no extra barrier).
#include "common.cuh"

namespace gf {

template <typename T>
__device__ void mean_pool_impl(float* __restrict__ out, const T* __restrict__ hidden, const uint32_t* __restrict__ mask,
                               int seq_len, int hidden_size, int normalize) {
  __shared__ float scratch[32];
  const int64_t b = blockIdx.x;
  const uint32_t* m = mask + b * seq_len;
  const T* h = hidden + b * int64_t(seq_len) * hidden_size;
  float* o = out + b * hidden_size;
  int count = 0;
  for (int t = 0; t < seq_len; ++t) count += m[t] != 0;
  const float inv_count = count > 0 ? 1.f / count : 0.f;
  float sq = 0.f;
  for (int d = threadIdx.x; d < hidden_size; d += blockDim.x) {
    float sum = 0.f;
    for (int t = 0; t < seq_len; ++t)
      if (m[t] != 0) sum += to_float(h[int64_t(t) * hidden_size + d]);
    const float mean = sum * inv_count;
    o[d] = mean;
    sq += mean * mean;
  }
  if (normalize) {
    // Same clamp as torch.nn.functional.normalize (eps 1e-12), so a zero vector stays zero.
    const float inv_norm = 1.f / fmaxf(sqrtf(block_sum(sq, scratch)), 1e-12f);
    for (int d = threadIdx.x; d < hidden_size; d += blockDim.x) o[d] *= inv_norm;
  }
}

}  // namespace gf

#define GF_POOL(S, T)                                                                                         \
  extern "C" __global__ void mean_pool_##S(float* out, const T* hidden, const uint32_t* mask, int seq_len,    \
                                           int hidden_size, int normalize) {                                 \
    gf::mean_pool_impl<T>(out, hidden, mask, seq_len, hidden_size, normalize);                               \
  }
GF_FOR_EACH_DTYPE(GF_POOL)

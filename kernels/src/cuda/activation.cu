// SiLU-and-mul (the SwiGLU gate): out[t, i] = silu(x[t, i]) * x[t, d + i] for x = [gate | up] rows
// of 2*d elements.
//
// Purely memory-bound: one block per token, threads stride over the d outputs so both input halves
// and the output are read/written coalesced. Computed in f32 and rounded once.
#include "common.cuh"

namespace gf {

template <typename T>
__device__ void silu_and_mul_impl(T* __restrict__ out, const T* __restrict__ x, int d) {
  const int64_t t = blockIdx.x;
  const T* gate = x + t * 2 * d;
  const T* up = gate + d;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    const float g = to_float(gate[i]);
    // expf, not __expf: the fast intrinsic loses accuracy for large |g| where silu saturates.
    out[t * d + i] = from_float<T>(g / (1.f + expf(-g)) * to_float(up[i]));
  }
}

}  // namespace gf

#define GF_ACT(S, T) \
  extern "C" __global__ void silu_and_mul_##S(T* out, const T* x, int d) { gf::silu_and_mul_impl<T>(out, x, d); }
GF_FOR_EACH_DTYPE(GF_ACT)

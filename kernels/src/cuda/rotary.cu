// Rotary position embedding, applied in place to the query and key heads of each token.
//
// `cos_sin_cache` is f32 `[max_position, rot_dim]`: the first rot_dim/2 entries of a row are the
// cosines, the next rot_dim/2 the sines (kept in f32 whatever the activation type, so large
// positions keep their angle precision). Only the first `rot_dim` dims of a head rotate (partial
// rotary); the rest pass through.
// Layouts: neox pairs dim i with dim i + rot_dim/2; GPT-J ("interleaved") pairs 2i with 2i+1.
//
// One block per token; threads stride over (head, pair) so each pair is rotated by exactly one
// thread and the token's cos/sin row is read once per pair from L1.
#include "common.cuh"

namespace gf {

template <typename T>
__device__ __forceinline__ void rotate_pair(T* head, const float* cos_sin, int i, int half_rot, bool is_neox) {
  const int xi = is_neox ? i : 2 * i;
  const int yi = is_neox ? i + half_rot : 2 * i + 1;
  const float c = cos_sin[i], s = cos_sin[half_rot + i];
  const float x = to_float(head[xi]), y = to_float(head[yi]);
  head[xi] = from_float<T>(x * c - y * s);
  head[yi] = from_float<T>(y * c + x * s);
}

template <typename T>
__device__ void rotary_impl(const uint32_t* __restrict__ positions, T* __restrict__ query, T* __restrict__ key,
                            const float* __restrict__ cos_sin_cache, int rot_dim, int head_dim, int num_heads,
                            int num_kv_heads, int is_neox) {
  const int64_t t = blockIdx.x;
  const float* cs = cos_sin_cache + int64_t(positions[t]) * rot_dim;
  const int half_rot = rot_dim / 2;
  const int nq = num_heads * half_rot;
  const int total = (num_heads + num_kv_heads) * half_rot;
  for (int j = threadIdx.x; j < total; j += blockDim.x) {
    if (j < nq) {
      rotate_pair(query + (t * num_heads + j / half_rot) * head_dim, cs, j % half_rot, half_rot, is_neox != 0);
    } else {
      const int k = j - nq;
      rotate_pair(key + (t * num_kv_heads + k / half_rot) * head_dim, cs, k % half_rot, half_rot, is_neox != 0);
    }
  }
}

}  // namespace gf

#define GF_ROTARY(S, T)                                                                                         \
  extern "C" __global__ void rotary_embedding_##S(const uint32_t* positions, T* query, T* key,                  \
                                                  const float* cos_sin_cache, int rot_dim, int head_dim,        \
                                                  int num_heads, int num_kv_heads, int is_neox) {               \
    gf::rotary_impl<T>(positions, query, key, cos_sin_cache, rot_dim, head_dim, num_heads, num_kv_heads,       \
                       is_neox);                                                                                \
  }
GF_FOR_EACH_DTYPE(GF_ROTARY)

// reshape_and_cache: scatter the K/V rows of freshly computed tokens into the paged cache.
//
// Layout (engine contract): per layer, key and value cache each `[num_blocks, block_size,
// num_kv_heads, head_dim]`, so a slot (block_id * block_size + offset) owns one contiguous row of
// `row_len = num_kv_heads * head_dim` elements and the scatter is a row copy. A negative slot
// marks a padding token and is skipped.
//
// One block per token; when the row length is a multiple of the 16-byte vector (always true for
// head dims 64/128) the copy moves 16-byte vectors, otherwise single elements.
#include "common.cuh"

namespace gf {

template <typename T>
__device__ void reshape_and_cache_impl(const T* __restrict__ key, const T* __restrict__ value, T* __restrict__ key_cache,
                                       T* __restrict__ value_cache, const int64_t* __restrict__ slot_mapping,
                                       int row_len) {
  const int64_t t = blockIdx.x;
  const int64_t slot = slot_mapping[t];
  if (slot < 0) return;
  const T* ks = key + t * row_len;
  const T* vs = value + t * row_len;
  T* kd = key_cache + slot * row_len;
  T* vd = value_cache + slot * row_len;
  constexpr int N = Vec16<T>::N;
  if (row_len % N == 0) {
    for (int i = threadIdx.x * N; i < row_len; i += blockDim.x * N) {
      Vec16<T> k, v;
      k.load(ks + i);
      v.load(vs + i);
      k.store(kd + i);
      v.store(vd + i);
    }
  } else {
    for (int i = threadIdx.x; i < row_len; i += blockDim.x) {
      kd[i] = ks[i];
      vd[i] = vs[i];
    }
  }
}

}  // namespace gf

#define GF_CACHE(S, T)                                                                                        \
  extern "C" __global__ void reshape_and_cache_##S(const T* key, const T* value, T* key_cache, T* value_cache, \
                                                   const int64_t* slot_mapping, int row_len) {                \
    gf::reshape_and_cache_impl<T>(key, value, key_cache, value_cache, slot_mapping, row_len);                \
  }
GF_FOR_EACH_DTYPE(GF_CACHE)

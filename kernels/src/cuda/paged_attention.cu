// Decode paged attention: one query token per sequence attends to its `context_len` cached tokens,
// read through the sequence's block table. Two launch shapes share one body:
//
//   v1   grid (num_heads, num_seqs):                 one block does a whole sequence/head and
//        writes `out` directly. Best when there are enough (seq, head) pairs to fill the GPU.
//   v2   grid (num_heads, num_seqs, max_partitions): split-K (flash-decoding). Each block does one
//        partition of `partition_size` tokens and writes a normalised partial output plus its
//        softmax max and sum; `paged_attention_reduce` combines the partitions. Long contexts with
//        few sequences otherwise leave most SMs idle.
//
// Work mapping. Decode attention is bound by reading K and V (2 * ctx * head_dim elements per
// head). A "token group" of HEAD_DIM / VEC lanes holds one head row: each lane loads one 16-byte
// vector of K and of V, so a group reads a whole 128/256-byte row with fully coalesced 128-bit
// loads (8 lanes for f16 head_dim 64, 16 for head_dim 128, 16/32 for f32). A warp therefore works
// on 2-4 tokens at once, and each group processes UNROLL tokens per iteration with all their K and
// V loads issued before the first use, so 2*UNROLL independent 16-byte loads per lane are in flight
// to hide DRAM latency.
//
// Softmax. Each group keeps its own online-softmax state (running max m, running sum l, and the
// un-normalised weighted V sum for its VEC dims) over the tokens it saw; no logits go through
// shared memory and no context length limit exists. At the end the groups' states are merged in
// shared memory with the usual rescaling by exp(m_g - M).
//
// GQA: query head h reads KV head h / (num_heads / num_kv_heads). The blocks of the query heads of
// one KV head are adjacent in blockIdx.x and run concurrently, so the repeated K/V reads mostly hit
// L2.
//
// Unused cache slots are never read: only tokens < context_len are touched, through the table.
#include "common.cuh"

namespace gf {

constexpr int DECODE_THREADS = 128;  // 4 warps: enough loads in flight per SM with several blocks resident.
constexpr int DECODE_UNROLL = 4;
// Asking for 6 resident blocks (24 warps/SM) lets ptxas use up to 80 registers: without a minimum it
// stopped at 64 and spilled a few bytes in the split-K variant on sm_80.
constexpr int DECODE_MIN_BLOCKS = 6;

template <typename T, int HEAD_DIM, bool PARTITIONED>
__device__ void paged_attention_decode_impl(T* __restrict__ out, float* __restrict__ tmp_out,
                                            float* __restrict__ max_logits, float* __restrict__ exp_sums,
                                            const T* __restrict__ q, const T* __restrict__ key_cache,
                                            const T* __restrict__ value_cache,
                                            const uint32_t* __restrict__ block_tables,
                                            const uint32_t* __restrict__ context_lens, int num_kv_heads, float scale,
                                            int max_blocks_per_seq, int block_size, int partition_size) {
  constexpr int VEC = Vec16<T>::N;
  constexpr int TPT = HEAD_DIM / VEC;  // lanes per token group
  static_assert(HEAD_DIM % VEC == 0 && TPT <= 32 && 32 % TPT == 0, "head_dim must map onto a warp");
  constexpr int GROUPS_PER_WARP = 32 / TPT;
  constexpr int NUM_GROUPS = (DECODE_THREADS / 32) * GROUPS_PER_WARP;

  const int head = blockIdx.x, seq = blockIdx.y, part = blockIdx.z;
  const int num_heads = gridDim.x;
  const int ctx = context_lens[seq];
  int start = 0, end = ctx;
  if (PARTITIONED) {
    start = part * partition_size;
    if (start >= ctx) return;  // this sequence has fewer partitions than the grid
    end = min(ctx, start + partition_size);
  }
  const int kv_head = head / (num_heads / num_kv_heads);
  const int lane = threadIdx.x & 31;
  const int group = (threadIdx.x >> 5) * GROUPS_PER_WARP + lane / TPT;
  const int sub = lane % TPT;  // which 16-byte slice of the head row this lane owns

  float qf[VEC];
  {
    Vec16<T> qv;
    qv.load(q + (int64_t(seq) * num_heads + head) * HEAD_DIM + sub * VEC);
#pragma unroll
    for (int i = 0; i < VEC; ++i) qf[i] = qv.get(i) * scale;
  }

  const uint32_t* table = block_tables + int64_t(seq) * max_blocks_per_seq;
  const int64_t head_off = int64_t(kv_head) * HEAD_DIM + sub * VEC;
  float m = -INFINITY, l = 0.f, acc[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc[i] = 0.f;

  // The trip count is uniform across the block (only `valid` differs per group), so every lane
  // reaches the shuffles below.
  for (int base = start; base < end; base += NUM_GROUPS * DECODE_UNROLL) {
    Vec16<T> kv[DECODE_UNROLL], vv[DECODE_UNROLL];
    bool valid[DECODE_UNROLL];
#pragma unroll
    for (int u = 0; u < DECODE_UNROLL; ++u) {
      const int t = base + u * NUM_GROUPS + group;
      valid[u] = t < end;
      if (valid[u]) {
        const int64_t slot = int64_t(table[t / block_size]) * block_size + t % block_size;
        const int64_t idx = slot * num_kv_heads * HEAD_DIM + head_off;
        kv[u].load(key_cache + idx);
        vv[u].load(value_cache + idx);
      }
    }
    float s[DECODE_UNROLL];
    float tile_max = -INFINITY;
#pragma unroll
    for (int u = 0; u < DECODE_UNROLL; ++u) {
      float dot = 0.f;
      if (valid[u]) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) dot += qf[i] * kv[u].get(i);
      }
      // Reduce across the TPT lanes of the group (xor masks below TPT stay inside the group).
#pragma unroll
      for (int mask = TPT / 2; mask > 0; mask >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, mask);
      s[u] = valid[u] ? dot : -INFINITY;
      tile_max = fmaxf(tile_max, s[u]);
    }
    const float m_new = fmaxf(m, tile_max);
    // m == -inf only before the group's first valid token: the old state is empty, scale it by 0.
    const float corr = m == -INFINITY ? 0.f : __expf(m - m_new);
    l *= corr;
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] *= corr;
#pragma unroll
    for (int u = 0; u < DECODE_UNROLL; ++u) {
      if (valid[u]) {
        const float p = __expf(s[u] - m_new);
        l += p;
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] += p * vv[u].get(i);
      }
    }
    m = m_new;
  }

  // Merge the groups' softmax states.
  __shared__ float s_m[NUM_GROUPS], s_l[NUM_GROUPS];
  __shared__ float s_acc[NUM_GROUPS][HEAD_DIM];
  if (sub == 0) {
    s_m[group] = m;
    s_l[group] = l;
  }
#pragma unroll
  for (int i = 0; i < VEC; ++i) s_acc[group][sub * VEC + i] = acc[i];
  __syncthreads();

  float gmax = -INFINITY;
#pragma unroll
  for (int g = 0; g < NUM_GROUPS; ++g) gmax = fmaxf(gmax, s_m[g]);
  // Weights are recomputed inside the dim loop rather than kept in a NUM_GROUPS array: with
  // HEAD_DIM <= DECODE_THREADS each thread does one dim, and the array would spill.
  float denom = 0.f;
#pragma unroll
  for (int g = 0; g < NUM_GROUPS; ++g) denom += s_m[g] == -INFINITY ? 0.f : __expf(s_m[g] - gmax) * s_l[g];
  const float inv = denom > 0.f ? 1.f / denom : 0.f;  // empty context: output zeros
  const int64_t row = int64_t(seq) * num_heads + head;
  for (int d = threadIdx.x; d < HEAD_DIM; d += DECODE_THREADS) {
    float num = 0.f;
#pragma unroll
    for (int g = 0; g < NUM_GROUPS; ++g) num += s_m[g] == -INFINITY ? 0.f : __expf(s_m[g] - gmax) * s_acc[g][d];
    if (PARTITIONED) {
      tmp_out[(row * gridDim.z + part) * HEAD_DIM + d] = num * inv;
    } else {
      out[row * HEAD_DIM + d] = from_float<T>(num * inv);
    }
  }
  if (PARTITIONED && threadIdx.x == 0) {
    max_logits[row * gridDim.z + part] = gmax;
    exp_sums[row * gridDim.z + part] = denom;
  }
}

// Combines the partitions of v2: out = sum_p w_p * tmp_p / sum_p w_p with w_p = l_p * exp(m_p - M),
// M the max over the sequence's partitions. One block per (head, seq); each thread recomputes the
// (few) weights itself, which costs less than a shared-memory round trip with a barrier.
template <typename T>
__device__ void paged_attention_reduce_impl(T* __restrict__ out, const float* __restrict__ tmp_out,
                                            const float* __restrict__ max_logits, const float* __restrict__ exp_sums,
                                            const uint32_t* __restrict__ context_lens, int head_dim,
                                            int partition_size, int max_partitions) {
  const int head = blockIdx.x, seq = blockIdx.y, num_heads = gridDim.x;
  const int num_parts = (int(context_lens[seq]) + partition_size - 1) / partition_size;
  const int64_t row = int64_t(seq) * num_heads + head;
  const float* ml = max_logits + row * max_partitions;
  const float* es = exp_sums + row * max_partitions;
  float gmax = -INFINITY;
  for (int p = 0; p < num_parts; ++p) gmax = fmaxf(gmax, ml[p]);
  float denom = 0.f;
  for (int p = 0; p < num_parts; ++p) denom += es[p] * __expf(ml[p] - gmax);
  const float inv = denom > 0.f ? 1.f / denom : 0.f;
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float num = 0.f;
    for (int p = 0; p < num_parts; ++p) num += es[p] * __expf(ml[p] - gmax) * tmp_out[(row * max_partitions + p) * head_dim + d];
    out[row * head_dim + d] = from_float<T>(num * inv);
  }
}

}  // namespace gf

#define GF_DECODE(S, T, D)                                                                                      \
  extern "C" __global__ void __launch_bounds__(gf::DECODE_THREADS, gf::DECODE_MIN_BLOCKS) paged_attention_v1_##S##_hd##D(             \
      T* out, const T* q, const T* key_cache, const T* value_cache, const uint32_t* block_tables,               \
      const uint32_t* context_lens, int num_kv_heads, float scale, int max_blocks_per_seq, int block_size) {    \
    gf::paged_attention_decode_impl<T, D, false>(out, nullptr, nullptr, nullptr, q, key_cache, value_cache,     \
                                                 block_tables, context_lens, num_kv_heads, scale,               \
                                                 max_blocks_per_seq, block_size, 0);                            \
  }                                                                                                             \
  extern "C" __global__ void __launch_bounds__(gf::DECODE_THREADS, gf::DECODE_MIN_BLOCKS) paged_attention_v2_##S##_hd##D(             \
      float* tmp_out, float* max_logits, float* exp_sums, const T* q, const T* key_cache,                       \
      const T* value_cache, const uint32_t* block_tables, const uint32_t* context_lens, int num_kv_heads,       \
      float scale, int max_blocks_per_seq, int block_size, int partition_size) {                                \
    gf::paged_attention_decode_impl<T, D, true>(nullptr, tmp_out, max_logits, exp_sums, q, key_cache,           \
                                                value_cache, block_tables, context_lens, num_kv_heads, scale,   \
                                                max_blocks_per_seq, block_size, partition_size);                \
  }
#define GF_DECODE_ALL(S, T) GF_DECODE(S, T, 64) GF_DECODE(S, T, 128)                                          \
  extern "C" __global__ void paged_attention_reduce_##S(T* out, const float* tmp_out, const float* max_logits,  \
                                                        const float* exp_sums, const uint32_t* context_lens,    \
                                                        int head_dim, int partition_size, int max_partitions) { \
    gf::paged_attention_reduce_impl<T>(out, tmp_out, max_logits, exp_sums, context_lens, head_dim,              \
                                       partition_size, max_partitions);                                         \
  }
GF_FOR_EACH_DTYPE(GF_DECODE_ALL)

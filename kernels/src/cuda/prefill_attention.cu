// Prefill (varlen, causal) attention over the paged KV cache, flash-attention style.
//
// Batch layout: the query tokens of all sequences are concatenated, `q`/`out` are
// `[total_tokens, num_heads, head_dim]`, and sequence s owns rows cu_seqlens_q[s] ..
// cu_seqlens_q[s+1]. Its K/V (this chunk's included: reshape_and_cache runs first) live in the
// paged cache; the chunk's q_len queries sit at the LAST q_len of its context_lens[s] positions,
// so query i (position ctx - q_len + i) attends to positions 0 ..= ctx - q_len + i. This covers
// plain prompts (q_len == ctx), chunked prefill and prefix-cache hits (q_len < ctx) alike.
//
// Tiling. Grid (query tiles, heads, seqs); a block of 4 warps owns BM query rows of one head and
// streams the keys in tiles of BN = 32 positions:
//   * K/V tiles are gathered from their cache blocks with 16-byte loads (each key row is a
//     contiguous head_dim run) into shared memory. Rows are padded by one 16-byte vector so the
//     QK^T reads below, where lane j reads row j, hit 8 different 4-bank groups per quarter-warp
//     (conflict-free) instead of all landing in the same bank.
//   * S = QK^T: lane j of a warp computes column j for the warp's ROWS query rows (Q reads are
//     warp-wide broadcasts). The row max and sum of the online softmax are then warp shuffles
//     across the 32 columns: no shared-memory round trip for the statistics.
//   * O += P V: P goes through a small per-warp shared tile so that every lane can read p[r][j]
//     as a broadcast; lane owns head_dim/32 consecutive output dims, so V reads are row-contiguous.
// Only key tiles up to the tile's last query position are visited (causal skipping), and key
// positions >= the causal bound are never loaded (the tile is zero-filled there), so stale or NaN
// data in unused cache slots cannot leak in through 0 * NaN.
//
// This is a CUDA-core (FFMA) kernel: readable and exact in f32 accumulation, but it leaves the
// tensor cores idle. Moving S and O onto mma.sync / wgmma is the next step for long prompts.
#include "common.cuh"

namespace gf {

constexpr int PREFILL_WARPS = 4;
constexpr int PREFILL_BN = 32;  // key tile = one column per lane

// Rows per warp: 8 for 2-byte types; 4 for f32 so the static shared tiles stay under 48 KB.
template <typename T> struct PrefillRows { static constexpr int value = sizeof(T) == 4 ? 4 : 8; };

template <typename T, int HEAD_DIM>
__device__ void prefill_impl(T* __restrict__ out, const T* __restrict__ q, const T* __restrict__ key_cache,
                             const T* __restrict__ value_cache, const uint32_t* __restrict__ block_tables,
                             const uint32_t* __restrict__ context_lens, const uint32_t* __restrict__ cu_seqlens_q,
                             int num_kv_heads, float scale, int max_blocks_per_seq, int block_size) {
  constexpr int ROWS = PrefillRows<T>::value;
  constexpr int BM = PREFILL_WARPS * ROWS;
  constexpr int BN = PREFILL_BN;
  constexpr int VEC = Vec16<T>::N;
  constexpr int VECS_PER_ROW = HEAD_DIM / VEC;
  constexpr int STRIDE = HEAD_DIM + VEC;  // padded row, see the bank-conflict note above
  constexpr int DPL = HEAD_DIM / 32;      // output dims per lane
  constexpr int THREADS = PREFILL_WARPS * 32;

  __shared__ __align__(16) T s_q[BM * STRIDE];
  __shared__ __align__(16) T s_k[BN * STRIDE];
  __shared__ __align__(16) T s_v[BN * STRIDE];
  __shared__ float s_p[BM][BN];

  const int tile = blockIdx.x, head = blockIdx.y, seq = blockIdx.z;
  const int num_heads = gridDim.y;
  const int q_begin = cu_seqlens_q[seq];
  const int q_len = int(cu_seqlens_q[seq + 1]) - q_begin;
  const int row0 = tile * BM;
  if (row0 >= q_len) return;  // the grid is sized for the longest sequence
  const int rows_here = min(BM, q_len - row0);
  const int ctx = context_lens[seq];
  const int first_pos = ctx - q_len;                    // position of query row 0
  const int kv_end = first_pos + row0 + rows_here;      // causal bound of the whole tile (exclusive)
  const int kv_head = head / (num_heads / num_kv_heads);
  const uint32_t* table = block_tables + int64_t(seq) * max_blocks_per_seq;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

  for (int i = threadIdx.x; i < BM * VECS_PER_ROW; i += THREADS) {
    const int r = i / VECS_PER_ROW, c = i % VECS_PER_ROW;
    Vec16<T> v;
    if (r < rows_here)
      v.load(q + (int64_t(q_begin + row0 + r) * num_heads + head) * HEAD_DIM + c * VEC);
    else
      v.zero();
    v.store(s_q + r * STRIDE + c * VEC);
  }

  // Per-row state of this warp's rows. A row past q_len gets position -1: every key is masked.
  int qpos[ROWS];
  float m[ROWS], l[ROWS], acc[ROWS][DPL];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int row = warp * ROWS + r;
    qpos[r] = row < rows_here ? first_pos + row0 + row : -1;
    m[r] = -INFINITY;
    l[r] = 0.f;  // lane-local partial sum; reduced across the warp once at the end
#pragma unroll
    for (int i = 0; i < DPL; ++i) acc[r][i] = 0.f;
  }

  for (int kt = 0; kt < kv_end; kt += BN) {
    __syncthreads();  // the previous K/V tile (and s_q on the first pass) is complete / consumed
    for (int i = threadIdx.x; i < BN * VECS_PER_ROW; i += THREADS) {
      const int j = i / VECS_PER_ROW, c = i % VECS_PER_ROW;
      const int pos = kt + j;
      Vec16<T> kv, vv;
      if (pos < kv_end) {
        const int64_t slot = int64_t(table[pos / block_size]) * block_size + pos % block_size;
        const int64_t idx = (slot * num_kv_heads + kv_head) * HEAD_DIM + c * VEC;
        kv.load(key_cache + idx);
        vv.load(value_cache + idx);
      } else {
        kv.zero();
        vv.zero();
      }
      kv.store(s_k + j * STRIDE + c * VEC);
      vv.store(s_v + j * STRIDE + c * VEC);
    }
    __syncthreads();

    // S = Q K^T for this warp's rows; lane = key column.
    float s[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) s[r] = 0.f;
#pragma unroll 4
    for (int c = 0; c < VECS_PER_ROW; ++c) {
      Vec16<T> kv;
      kv.load(s_k + lane * STRIDE + c * VEC);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        Vec16<T> qv;
        qv.load(s_q + (warp * ROWS + r) * STRIDE + c * VEC);
#pragma unroll
        for (int i = 0; i < VEC; ++i) s[r] += qv.get(i) * kv.get(i);
      }
    }

    const int kpos = kt + lane;
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const float sr = kpos <= qpos[r] ? s[r] * scale : -INFINITY;
      const float m_new = fmaxf(m[r], warp_max(sr));
      const float p = sr == -INFINITY ? 0.f : __expf(sr - m_new);
      const float corr = m[r] == -INFINITY ? 0.f : __expf(m[r] - m_new);
      l[r] = l[r] * corr + p;
      m[r] = m_new;
#pragma unroll
      for (int i = 0; i < DPL; ++i) acc[r][i] *= corr;
      s_p[warp * ROWS + r][lane] = p;
    }
    __syncwarp();

    // O += P V; lane owns dims lane*DPL .. lane*DPL + DPL.
#pragma unroll 4
    for (int j = 0; j < BN; ++j) {
      float vf[DPL];
#pragma unroll
      for (int i = 0; i < DPL; ++i) vf[i] = to_float(s_v[j * STRIDE + lane * DPL + i]);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const float p = s_p[warp * ROWS + r][j];
#pragma unroll
        for (int i = 0; i < DPL; ++i) acc[r][i] += p * vf[i];
      }
    }
  }

#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const float denom = warp_sum(l[r]);  // every valid row saw at least its own position
    if (qpos[r] < 0) continue;
    const float inv = 1.f / denom;
    T* o = out + (int64_t(q_begin + row0 + warp * ROWS + r) * num_heads + head) * HEAD_DIM + lane * DPL;
#pragma unroll
    for (int i = 0; i < DPL; ++i) o[i] = from_float<T>(acc[r][i] * inv);
  }
}

}  // namespace gf

#define GF_PREFILL(S, T, D)                                                                                     \
  extern "C" __global__ void __launch_bounds__(gf::PREFILL_WARPS * 32) paged_attention_prefill_##S##_hd##D(    \
      T* out, const T* q, const T* key_cache, const T* value_cache, const uint32_t* block_tables,               \
      const uint32_t* context_lens, const uint32_t* cu_seqlens_q, int num_kv_heads, float scale,                \
      int max_blocks_per_seq, int block_size) {                                                                 \
    gf::prefill_impl<T, D>(out, q, key_cache, value_cache, block_tables, context_lens, cu_seqlens_q,            \
                           num_kv_heads, scale, max_blocks_per_seq, block_size);                                \
  }
#define GF_PREFILL_ALL(S, T) GF_PREFILL(S, T, 64) GF_PREFILL(S, T, 128)
GF_FOR_EACH_DTYPE(GF_PREFILL_ALL)

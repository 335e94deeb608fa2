// A tiny SIMT emulator that runs the CUDA kernels of src/cuda on the CPU, for checking their
// indexing, masking and synchronisation logic on machines without a GPU (CI).
//
// Each CUDA thread of a block is a std::thread; __syncthreads is a block-wide std::barrier,
// __syncwarp a warp-wide one, and __shfl_xor_sync exchanges values through a per-block array between
// two warp barriers (so it is only valid where every lane of the warp reaches the shuffle, which
// the kernels guarantee anyway). `__shared__` becomes `static`: blocks run one after another, so a
// function-local static is exactly one block's shared memory. Timing means nothing here; results
// do: the arithmetic is the kernels' own f32 code, except __expf which maps to expf.
#pragma once

#include <barrier>
#include <cmath>
#include <memory>
#include <thread>
#include <vector>

// The CUDA headers first, with their own host definitions of the qualifiers; ours replace them after.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_functions.h>
#include <vector_types.h>

struct EmuDim3 {
  unsigned x = 1, y = 1, z = 1;
};
inline thread_local EmuDim3 threadIdx, blockIdx;
inline EmuDim3 gridDim, blockDim;

struct EmuBlock {
  explicit EmuBlock(unsigned threads) : block(threads), slots(threads) {
    for (unsigned w = 0; w < (threads + 31) / 32; ++w) warps.push_back(std::make_unique<std::barrier<>>(32));
  }
  std::barrier<> block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<float> slots;
};
inline EmuBlock* emu_block = nullptr;

inline void __syncthreads() { emu_block->block.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu_block->warps[threadIdx.x / 32]->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int mask) {
  const unsigned t = threadIdx.x;
  emu_block->slots[t] = v;
  __syncwarp();
  const float r = emu_block->slots[(t & ~31u) | ((t & 31u) ^ unsigned(mask))];
  __syncwarp();
  return r;
}
inline float __expf(float x) { return expf(x); }
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline int min(int a, int b) { return a < b ? a : b; }

#undef __global__
#undef __device__
#undef __forceinline__
#undef __shared__
#undef __align__
#undef __launch_bounds__
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

// Runs `kernel()` over the grid. The block's threads are spawned once per launch and walk the
// blocks in order together; the barrier after each block keeps the shared-memory statics of one
// block from being overwritten while another thread still reads them. Block sizes must be
// multiples of 32.
template <typename F>
void emu_launch(EmuDim3 grid, unsigned threads, F kernel) {
  gridDim = grid;
  blockDim = EmuDim3{threads, 1, 1};
  EmuBlock block(threads);
  emu_block = &block;
  std::vector<std::thread> ts;
  for (unsigned t = 0; t < threads; ++t)
    ts.emplace_back([&, t] {
      threadIdx = EmuDim3{t, 0, 0};
      for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
          for (unsigned x = 0; x < grid.x; ++x) {
            blockIdx = EmuDim3{x, y, z};
            kernel();
            __syncthreads();
          }
    });
  for (auto& th : ts) th.join();
}

#!/usr/bin/env bash
# CI check of the CUDA kernels on a machine without a GPU:
#   1. makes the pip CUDA 13.4 toolchain available (cached; see cuda-toolchain.sh),
#   2. compiles every kernels/src/cuda/*.cu to PTX for sm_80 and sm_90 (warnings are errors),
#   3. assembles each PTX with `ptxas -v` and prints registers / spills / shared memory per kernel,
#      failing on any error (and on any spill unless GF_ALLOW_SPILLS=1),
#   4. runs the attention / norm / pooling kernels on the CPU under the SIMT emulator
#      (kernels/emu: every CUDA thread a std::thread) against naive double references, which checks
#      their indexing, masking and barriers without a GPU (~25 s),
#   5. runs `cargo check -p genai-kernels --features cuda` (build.rs + the cudarc wrappers),
#   6. runs `cargo clippy -p genai-models -p genai-factory --features cuda --all-targets -- -D warnings`
#      (a `cargo check` plus lints): the CUDA runner, the candle/cudarc interop and the embedder's
#      GPU path live in genai-models (its tests included); the server's `cuda` feature forwards to
#      it (candle's own kernels compile for CUDA_COMPUTE_CAP, default 90 = H100/H200; ~8 min cold,
#      cached afterwards). No link: libcuda/cuBLAS are absent here.
#   7. type-checks and lints the `faiss-gpu` code (GPU vector search, in genai-retrieval) without
#      building FAISS: in a scratch copy of the tracked files whose `faiss` dependency is not
#      `static`, faiss-sys only emits link flags, so `cargo clippy --features faiss-gpu` needs no
#      FAISS GPU build (which compiles FAISS's CUDA sources: far beyond this budget, see
#      kernels/README.md).
# Release profile, like CI's other cargo steps and scripts/test.sh, so one profile builds the deps once.
# Idempotent; reruns are fast (toolchain cached, ~2 s per file and arch).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/cuda-toolchain.sh
gf_cuda_toolchain
echo "nvcc: $(nvcc --version | tail -2 | head -1)"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
spills=0
for src in kernels/src/cuda/*.cu; do
  name="$(basename "$src" .cu)"
  for arch in 80 90; do
    nvcc --ptx -O3 -std=c++17 -lineinfo -Werror all-warnings -arch="sm_$arch" -o "$work/$name.sm_$arch.ptx" "$src"
    ptxas -v -O3 -arch="sm_$arch" -o "$work/$name.sm_$arch.cubin" "$work/$name.sm_$arch.ptx" 2>"$work/log"
    # One line per kernel: name, registers, spills, shared memory.
    awk -v arch="sm_$arch" '
      /Compiling entry function/ { match($0, /'\''[^'\'']*'\''/); k = substr($0, RSTART + 1, RLENGTH - 2) }
      /bytes spill stores/ { st = $5; ld = $9 }
      /Used [0-9]+ registers/ {
        match($0, /Used [0-9]+ registers/); r = substr($0, RSTART + 5, RLENGTH - 15)
        sm = "0"; if (match($0, /[0-9]+ bytes smem/)) sm = substr($0, RSTART, RLENGTH - 11)
        printf "%-40s %s regs %4s  spill st/ld %s/%s  smem %s\n", k, arch, r, st, ld, sm
      }' "$work/log"
    if grep -Eq '[1-9][0-9]* bytes spill (stores|loads)' "$work/log"; then spills=1; fi
  done
done
if [ "$spills" = 1 ] && [ "${GF_ALLOW_SPILLS:-0}" != 1 ]; then
  echo "error: register spills above (set GF_ALLOW_SPILLS=1 to accept)" >&2
  exit 1
fi
echo "== emulated kernels (CPU) =="
"${CXX:-g++}" -std=c++20 -O2 -pthread -I"$CUDA_HOME/include" -o "$work/emu_check" kernels/emu/check.cpp
"$work/emu_check"
cargo check --release -p genai-kernels --features cuda
echo "== cargo clippy -p genai-models -p genai-factory --features cuda --all-targets =="
CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" cargo clippy --release -p genai-models -p genai-factory --features cuda \
  --all-targets -- -D warnings
echo "== cargo clippy -p genai-retrieval -p genai-factory --features faiss-gpu (scratch copy, faiss not static) =="
# A fixed path (tar keeps mtimes) so reruns reuse the previous check.
scratch="$(realpath -m "${CARGO_TARGET_DIR:-target}")/faiss-gpu-src"
rm -rf "$scratch" && mkdir -p "$scratch"
git ls-files -z | tar --null -T - -cf - | tar -xf - -C "$scratch"
sed -i 's/^faiss = { version = "\([^"]*\)", features = \["static"\] }$/faiss = { version = "\1" }/' "$scratch/Cargo.toml"
grep -q '^faiss = { version = "[^"]*" }$' "$scratch/Cargo.toml" ||
  { echo "error: could not drop the static feature of faiss in the scratch Cargo.toml" >&2; exit 1; }
(cd "$scratch" && CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" cargo clippy --release -p genai-retrieval -p genai-factory \
  --features faiss-gpu --all-targets -- -D warnings)
echo "check-kernels: OK"

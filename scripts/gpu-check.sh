#!/usr/bin/env bash
# GPU tests of genai-kernels and the server's CUDA engine, built on a machine without a GPU and run
# on one that has it.
#
#   scripts/gpu-check.sh build   # here: kernel test binary + `genai-factory` built with `--features cuda`
#                                # + the models, into $CARGO_TARGET_DIR/gpu-check/
#   scripts/gpu-check.sh run     # on the GPU host, from the copied directory (no Rust needed)
#
# run: 1. the kernel tests (every kernel vs its CPU reference), with GENAI_REQUIRE_GPU=1 so that a
#         host whose GPU or driver does not work fails instead of skipping; then the decode
#         bandwidth benchmark (an ignored test), whose figures land in decode-bandwidth.json
#         (next to this script, or in $GF_REPORT_DIR);
#      2. server parity: the same binary serves SmolLM2 + MiniLM twice, `--device cpu` and
#         `--device cuda`, and the same greedy completions and embeddings are compared
#         (gpu-parity.py: identical first tokens on every prompt, identical full greedy completions on
#         most, embedding cosine >= 0.999). GF_SKIP_SERVER=1 skips it; GF_SKIP_BUILD_SERVER=1 skips
#         building the server in `build`.
#
# build: cudarc links libcuda (and libnvrtc; the server also cuBLAS/cuBLASLt/cuRAND) dynamically, as candle does. A CPU machine has
# neither, so link-time stubs are generated from the symbol names of cudarc's own bindings (every
# function returns an error; the sonames are the real ones, libcuda.so.1 / libnvrtc.so.13, so on the
# GPU host the dynamic loader binds the real driver). The stubs are only on the link path
# (LIBRARY_PATH) and never shipped.
# run: needs the NVIDIA driver (libcuda.so.1) and libnvrtc.so.13 (any CUDA 13 toolkit, or the pip
# wheel nvidia-cuda-nvrtc); the common locations are added to LD_LIBRARY_PATH. Without the driver
# it exits 1: a GPU check that ran nothing must not pass.
set -euo pipefail
mode="${1:-build}"
here="$(cd "$(dirname "$0")" && pwd)"

if [ "$mode" = run ]; then
  dir="${2:-$here}"
  for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
    $(python3 -c 'import nvidia, os; print(" ".join(os.path.join(p, "cu13", "lib") for p in nvidia.__path__))' 2>/dev/null || true); do
    [ -d "$d" ] && LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
  done
  export LD_LIBRARY_PATH
  if ! ldconfig -p 2>/dev/null | grep -q 'libcuda.so.1' && ! ls /usr/lib*/libcuda.so.1 /usr/lib/x86_64-linux-gnu/libcuda.so.1 >/dev/null 2>&1; then
    echo "error: libcuda.so.1 (the NVIDIA driver) not found on this host; run this on a GPU host with the driver installed" >&2
    exit 1
  fi
  # cuBLAS/cuRAND for the server: the pip wheels (nvidia-cublas, nvidia-curand) if installed.
  for d in $(python3 -c 'import nvidia, os, glob; print(" ".join(sorted(set(os.path.dirname(p) for p in glob.glob(os.path.join(nvidia.__path__[0], "*", "lib", "libcublas*.so*")) + glob.glob(os.path.join(nvidia.__path__[0], "*", "lib", "libcurand*.so*"))))))' 2>/dev/null || true); do
    LD_LIBRARY_PATH="$d:$LD_LIBRARY_PATH"
  done
  export LD_LIBRARY_PATH
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  # Set for the test binary only: the server (below) refuses unknown GENAI_* variables.
  GENAI_REQUIRE_GPU=1 "$dir/genai-kernels-gpu-tests" --test-threads=1 --nocapture
  report="${GF_REPORT_DIR:-$dir}/decode-bandwidth.json"
  GENAI_REQUIRE_GPU=1 GENAI_BANDWIDTH_REPORT="$report" \
    "$dir/genai-kernels-gpu-tests" --ignored --exact decode_bandwidth --test-threads=1 --nocapture
  echo "decode bandwidth report: $report"
  if [ "${GF_SKIP_SERVER:-0}" = 1 ] || [ ! -x "$dir/genai-factory" ]; then
    echo "server parity: skipped (GF_SKIP_SERVER=1 or no $dir/genai-factory)"
    exit 0
  fi
  echo "== server parity: --device cpu vs --device cuda =="
  exec python3 "$dir/gpu-parity.py" "$dir/genai-factory" "$dir/models"
fi

[ "$mode" = build ] || { echo "usage: $0 [build|run [DIR]]" >&2; exit 2; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$here/.."
. scripts/cuda-toolchain.sh
gf_cuda_toolchain
stubs="${GF_CUDA_CACHE:-$HOME/.cache/cuda13}/link-stubs"
cudarc_src="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.10 2>/dev/null | head -1)"
if [ -z "$cudarc_src" ]; then cargo fetch >/dev/null; cudarc_src="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.10 | head -1)"; fi
mkdir -p "$stubs"
make_stub() { # lib soname bindings.rs prefix
  grep -oE "pub unsafe fn $4[A-Za-z0-9_]*" "$3" | awk '{print $4}' | sort -u |
    awk '{printf "int %s(void) { return 999; }\n", $1}' >"$stubs/$1.c"
  cc -shared -fPIC -Wl,-soname,"$2" -o "$stubs/$1.so" "$stubs/$1.c"
  ln -sf "$1.so" "$stubs/$2" # for the smoke run below
}
make_stub libcuda libcuda.so.1 "$cudarc_src/src/driver/sys/mod.rs" cu
make_stub libnvrtc libnvrtc.so.13 "$cudarc_src/src/nvrtc/sys/mod.rs" nvrtc
make_stub libcublas libcublas.so.13 "$cudarc_src/src/cublas/sys/mod.rs" cublas
make_stub libcublasLt libcublasLt.so.13 "$cudarc_src/src/cublaslt/sys/mod.rs" cublasLt
make_stub libcurand libcurand.so.10 "$cudarc_src/src/curand/sys/mod.rs" curand
# candle's kernels library links the CUDA runtime itself (-lcudart): the toolchain's real one, which
# needs no driver to load (its soname libcudart.so.13 binds the GPU host's toolkit at run time).
ln -sf "$CUDA_HOME/lib/libcudart.so.13" "$stubs/libcudart.so"
ln -sf "$CUDA_HOME/lib/libcudart.so.13" "$stubs/libcudart.so.13"
export LIBRARY_PATH="$stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
bin="$(cargo test -p genai-kernels --features cuda --test gpu --no-run --message-format=json |
  python3 -c 'import sys, json
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "gpu": print(m["executable"])')"
out="${CARGO_TARGET_DIR:-target}/gpu-check"
mkdir -p "$out"
cp "$bin" "$out/genai-kernels-gpu-tests"
cp scripts/gpu-check.sh "$out/"
# Smoke runs against the stubs (no driver here): the binary must start and every test skip, and
# with GENAI_REQUIRE_GPU=1 (as `run` sets it) it must fail instead.
smoke="$(LD_LIBRARY_PATH="$stubs" env -u GENAI_REQUIRE_GPU "$out/genai-kernels-gpu-tests" --test-threads=1 --nocapture 2>&1 || true)"
grep -q 'SKIP: CUDA driver unavailable' <<<"$smoke" ||
  { echo "error: the test binary did not start and skip against the link stubs" >&2; exit 1; }
if LD_LIBRARY_PATH="$stubs" GENAI_REQUIRE_GPU=1 "$out/genai-kernels-gpu-tests" --test-threads=1 >/dev/null 2>&1; then
  echo "error: the test binary passed without a driver under GENAI_REQUIRE_GPU=1" >&2
  exit 1
fi
cp scripts/gpu-parity.py "$out/"
if [ "${GF_SKIP_BUILD_SERVER:-0}" != 1 ]; then
  # The server with the CUDA engine (H100/H200: sm_90 for candle's kernels), plus the two models.
  CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" cargo build --release -p genai-factory --features cuda
  cp "${CARGO_TARGET_DIR:-target}/release/genai-factory" "$out/"
  mkdir -p "$out/models"
  cp -rL models/smollm2-135m-instruct models/all-minilm-l6-v2 "$out/models/"
  # Smoke run against the stubs (every driver call fails): the binary must start, and
  # `--device cuda` must stop at startup naming the reason.
  smoke="$(cd "$work" && LD_LIBRARY_PATH="$stubs" GENAI_INDEX__DIR="$work/index" "$out/genai-factory" serve \
    --device cuda --models-dir "$out/models" --http-addr 127.0.0.1:0 --grpc-addr 127.0.0.1:0 2>&1 || true)"
  grep -q 'but the CUDA driver is unavailable' <<<"$smoke" ||
    { echo "error: the server did not refuse --device cuda against the link stubs:" >&2; echo "$smoke" >&2; exit 1; }
fi
echo "built $out; copy it to the GPU host and run: ./gpu-check.sh run"

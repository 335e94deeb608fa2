# Sourced by check-kernels.sh and gpu-check.sh: makes a CUDA 13.4 toolchain available without a GPU
# or a system toolkit. Uses $CUDA_HOME when it already has nvcc; otherwise installs the pip CUDA 13
# toolchain (the exact, pinned command from shared/design/environment.md) into
# ${GF_CUDA_CACHE:-$HOME/.cache/cuda13} once, and exports CUDA_HOME/CUDA_PATH/CUDA_ROOT and PATH.
# 13.4.x is pinned because cudarc 0.19.10 knows CUDA versions up to 13.4.

gf_cuda_toolchain() {
  if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
    export CUDA_PATH="$CUDA_HOME" CUDA_ROOT="$CUDA_HOME" PATH="$CUDA_HOME/bin:$PATH"
    return 0
  fi
  local dir="${GF_CUDA_CACHE:-$HOME/.cache/cuda13}"
  local root="$dir/nvidia/cu13"
  if [ ! -x "$root/bin/nvcc" ] || [ ! -x "$root/bin/ptxas" ] || [ ! -x "$root/nvvm/bin/cicc" ]; then
    echo "installing the pip CUDA 13.4 toolchain into $dir" >&2
    # One pip command: a second --target install into the same dir would skip nvidia/.
    python3 -m pip install --quiet --no-deps --target "$dir" \
      nvidia-cuda-nvcc==13.4.92 nvidia-nvvm==13.4.92 nvidia-cuda-crt==13.4.92 nvidia-cuda-runtime==13.4.92 \
      nvidia-cuda-cccl==13.3.5.0.6 nvidia-cuda-nvrtc==13.4.92 nvidia-curand==10.4.5.25 >&2
  fi
  export CUDA_HOME="$root" CUDA_PATH="$root" CUDA_ROOT="$root" PATH="$root/bin:$PATH"
}

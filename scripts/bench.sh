#!/usr/bin/env bash
# All CPU benchmarks in one quiet run (nothing else may run on the machine meanwhile):
#   1. generation side by side with llama.cpp (../shared/perf/compare.sh: fresh server per point,
#      same prompts, same streaming OpenAI load client), 1/4/16/64 streams, 128 new tokens;
#   2. prefill: TTFT of a ~512-token prompt over gRPC (genai-load), against llama-bench pp512 and tg128;
#   3. embeddings/s (criterion, batch 1/8/32/128) and vector search on 100k 384-d vectors (criterion);
#   4. the chat / RAG / agent router: held-out accuracy and the latency of one decision.
# Usage: scripts/bench.sh [OUT_DIR]   (figures land in OUT_DIR, default bench-results/)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench-results}
mkdir -p "$OUT"
SHARED=${SHARED:-../shared}
cargo build --release -p genai-factory -p genai-benches --bins
BIN=${CARGO_TARGET_DIR:-target}/release

echo "== 1. generation vs llama.cpp =="
"$SHARED/perf/compare.sh" "${POINTS:-1:8 4:16 16:48 64:128}" 128 | tee "$OUT/compare.txt"

echo "== 2. prefill and single-sequence decode =="
LLAMA_BENCH=$(find "$HOME/.cache/genai-factory-anchor" -name llama-bench -type f | head -n1)
if [ -n "$LLAMA_BENCH" ]; then
  "$LLAMA_BENCH" -m models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf -t 2 -p 512 -n 128 -r 3 | tee "$OUT/llama-bench.txt"
fi
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
G=$(port); H=$(port)
"$BIN/genai-factory" serve --grpc-addr 127.0.0.1:$G --http-addr 127.0.0.1:$H >"$OUT/prefill-server.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
until curl -sf 127.0.0.1:$H/health >/dev/null; do sleep 0.2; done
python3 - "$OUT/prompt512.txt" <<'PY'
import sys
words = ("the quick brown fox jumps over the lazy dog while the river keeps running to the sea " * 40).split()
open(sys.argv[1], "w").write(" ".join(words[:500]) + "\n")
PY
for r in 1 2 3; do
  "$BIN/genai-load" --addr http://127.0.0.1:$G -c 1 -n 1 --max-tokens 1 --prompts "$OUT/prompt512.txt" \
    --json-out "$OUT/prefill-$r.json" | head -n 2
  "$BIN/genai-load" --addr http://127.0.0.1:$G -c 1 -n 2 --max-tokens 128 --json-out "$OUT/decode-$r.json" | head -n 3
done
kill $PID; wait $PID 2>/dev/null || true

echo "== 3. embeddings and vector search =="
cargo bench -p genai-benches --bench embed 2>&1 | grep -E "minilm|thrpt|time:" | tee "$OUT/embed.txt"
cargo bench -p genai-benches --bench vector_search 2>&1 | grep -Ev "^(Gnuplot|Benchmarking|Found|  [0-9]+ \()" | tee "$OUT/vector_search.txt"

echo "== 4. router =="
cargo bench -p genai-benches --bench router_eval 2>&1 | grep -Ev "^\s*(Compiling|Finished|Running)" | tee "$OUT/router.txt"

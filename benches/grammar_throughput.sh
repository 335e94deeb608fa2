#!/usr/bin/env bash
# Decode throughput with and without a structured-output constraint, at 1 and 16 streams.
#
# Starts one server (the given binary, default models), then alternates genai-load runs without
# and with a grammar (ROUNDS times each point, so machine drift hits both sides alike) and prints
# every run's output tokens/s and the medians. The grammar is JSON lines under a schema
# (`start: (%json{…} "\n")+`), which may always continue: with min_tokens = max_tokens (genai-load
# --grammar sets it) every request yields exactly MAX_TOKENS constrained tokens, as the
# unconstrained side does with ignore_eos.
#
# Usage: benches/grammar_throughput.sh [BIN] [GENAI_LOAD]
#   BIN        the genai-factory binary (default target/release/genai-factory)
#   GENAI_LOAD the load generator (default target/release/genai-load)
#   env: ROUNDS (3), MAX_TOKENS (128), REQ1 (6 requests at 1 stream), REQ16 (32 at 16 streams)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${1:-$root/target/release/genai-factory}
load=${2:-$root/target/release/genai-load}
rounds=${ROUNDS:-3}
max_tokens=${MAX_TOKENS:-128}
work=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; rm -rf "$work"' EXIT

cat >"$work/grammar.lark" <<'EOF'
start: (item "\n")+
item: %json {"type": "object", "properties": {"name": {"type": "string"}, "city": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 120}, "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}}}, "required": ["name", "city", "age", "tags"], "additionalProperties": false, "x-guidance": {"whitespace_flexible": false}}
EOF

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
grpc=127.0.0.1:$(port)
http=127.0.0.1:$(port)
(cd "$work" && exec "$bin" serve --grpc-addr "$grpc" --http-addr "$http" --models-dir "$root/models" >"$work/server.log" 2>&1) &
pid=$!
for _ in $(seq 1 600); do
  curl -sf "http://$http/health" >/dev/null 2>&1 && break
  sleep 0.5
done
curl -sf "http://$http/health" >/dev/null || { tail -20 "$work/server.log"; exit 1; }

run() { # concurrency requests [--grammar file]
  local c=$1 n=$2
  shift 2
  "$load" --addr "http://$grpc" -c "$c" -n "$n" --max-tokens "$max_tokens" --json-out "$work/r.json" "$@" >/dev/null
  python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); assert r["errors"]=={} or not r["errors"], r["errors"]; print("%.1f" % r["output_tokens_per_s"])' "$work/r.json"
}
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

# One warm-up request each way (first-touch of the model pages, the grammar compiler's caches).
run 1 1 >/dev/null
run 1 1 --grammar "$work/grammar.lark" >/dev/null
for c in 1 16; do
  n=$([ "$c" = 1 ] && echo "${REQ1:-6}" || echo "${REQ16:-32}")
  free=() constrained=()
  for _ in $(seq 1 "$rounds"); do
    free+=("$(run "$c" "$n")")
    constrained+=("$(run "$c" "$n" --grammar "$work/grammar.lark")")
  done
  mf=$(median "${free[@]}")
  mc=$(median "${constrained[@]}")
  loss=$(python3 -c "print('%.1f' % (100 * (1 - $mc / $mf)))")
  echo "streams=$c free tok/s [${free[*]}] median $mf | constrained tok/s [${constrained[*]}] median $mc | loss $loss %"
done

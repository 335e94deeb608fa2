#!/usr/bin/env bash
# Runs the whole test suite: unit, property and end-to-end tests (the e2e tests
# start the real binary with the real models). Installs what is missing first, then requires it
# (GENAI_REQUIRE_TOOLS=1): a test whose external tool is missing fails rather than passing unchecked.
# Release mode: the e2e tests run real inference, and one profile builds the deps once.
set -euo pipefail
source "$(dirname "$0")/lib/deps.sh"
cd "$GF_ROOT"
ensure_apt test
ensure_test_python
ensure_models
export GENAI_REQUIRE_TOOLS=1
cargo test --release --workspace "$@" 2>&1 | tee "$GF_CACHE/last-test.log"
echo "== test summary =="
grep -E '^ +(Running|Doc-tests) |^test result:' "$GF_CACHE/last-test.log"

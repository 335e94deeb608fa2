#!/usr/bin/env bash
# Installs what is missing (apt packages, the default models), builds the release
# binary and starts the server on the default models. Extra arguments go to
# `genai-factory serve` (e.g. --http-addr 0.0.0.0:8080).
set -euo pipefail
source "$(dirname "$0")/lib/deps.sh"
cd "$GF_ROOT"
ensure_apt
ensure_models
cargo build --release -p genai-factory
exec "${CARGO_TARGET_DIR:-target}/release/genai-factory" serve "$@"

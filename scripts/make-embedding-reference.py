#!/usr/bin/env python3
"""Writes tests/data/embedding_reference.json: sentence vectors of
all-MiniLM-L6-v2 computed by sentence-transformers (an implementation
independent of ours), for the Rust parity test (cosine >= 0.999).

Setup (CPU, offline, model from the local directory):
    python3 -m venv /root/.cache/st-venv
    /root/.cache/st-venv/bin/pip install sentence-transformers
    HF_HUB_OFFLINE=1 /root/.cache/st-venv/bin/python scripts/make-embedding-reference.py
"""
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from sentence_transformers import SentenceTransformer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "all-minilm-l6-v2")
OUT = os.path.join(ROOT, "tests", "data", "embedding_reference.json")

# Short and long, punctuation, digits, casing, accents, non-Latin script and
# one sentence over 256 tokens (truncation must match).
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello!",
    "a",
    "FAISS performs efficient similarity search over dense vectors.",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The mitochondria is the powerhouse of the cell.",
    "In 1969, Apollo 11 landed the first humans on the Moon.",
    "Rust guarantees memory safety without a garbage collector.",
    "Preheat the oven to 220 degrees Celsius and bake the bread for 35 minutes.",
    "Café, naïve, résumé and jalapeño carry accents.",
    "東京は日本の首都です。",
    "Transformers use self-attention to weigh the relevance of every token to every other token.",
    "The stock market fell 3.2% on Tuesday after the central bank raised interest rates.",
    "   leading and trailing spaces   ",
    "E-mail me at someone@example.com or call +1 (555) 010-9999.",
    "UPPER CASE TEXT SHOULD EMBED LIKE LOWER CASE TEXT",
    "Gradient descent updates parameters in the direction of the negative gradient.",
    "The Great Wall of China stretches for thousands of kilometres across northern China.",
    "Tennis players serve alternately; a game is won by the first to four points with a two-point lead.",
    "Mean pooling averages token embeddings, weighted by the attention mask, before L2 normalisation.",
    " ".join(["Long inputs are truncated to the model's maximum sequence length."] * 40),
]


def main() -> int:
    model = SentenceTransformer(MODEL, device="cpu")
    vectors = model.encode(SENTENCES, batch_size=8, normalize_embeddings=True, convert_to_numpy=True)
    data = {
        "model": "all-minilm-l6-v2",
        "generator": "sentence-transformers (scripts/make-embedding-reference.py)",
        "max_seq_length": model.max_seq_length,
        "sentences": SENTENCES,
        "vectors": [[round(float(x), 7) for x in v] for v in vectors],
    }
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {len(SENTENCES)} vectors of dimension {vectors.shape[1]} to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

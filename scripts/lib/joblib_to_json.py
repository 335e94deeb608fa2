#!/usr/bin/env python3
"""Converts alt-profanity-check's scikit-learn joblib files into one JSON file that
genai-safety's toxicity classifier reads, with the Python standard library only (no
scikit-learn, numpy or joblib: CI stays light).

Reads the pickles with stub classes; joblib writes each numpy array's raw bytes right after
its `NumpyArrayWrapper` in the stream (after an alignment pad), which is what `load_build`
picks up. Only what inference needs is kept: the TfidfVectorizer's settings, vocabulary and
idf, and for each of the CalibratedClassifierCV's folds the LinearSVC's coef/intercept and the
sigmoid calibrator's a/b (probability = mean over folds of 1 / (1 + exp(a * decision + b))).

Usage: joblib_to_json.py VECTORIZER.joblib MODEL.joblib OUT.json
"""
import json
import pickle
import struct
import sys


class Stub:
    def __init__(self, *args, **_kw):
        self.args = args
        self.state = None

    def __setstate__(self, state):
        self.state = state


class Dtype(Stub):
    pass


class ArrayWrapper(Stub):
    pass


class Scalar(Stub):
    """numpy's `multiarray.scalar(dtype, bytes)`: reconstructed at once."""

    def __new__(cls, dtype, raw):
        assert dtype.args[0] == "f8", dtype.args
        return struct.unpack("<d", raw)[0]


_FORMATS = {"f8": "d", "f4": "f", "i8": "q", "i4": "i"}


class Unpickler(pickle._Unpickler):  # the pure-Python one: its dispatch table is patchable
    def __init__(self, f):
        super().__init__(f)
        self.raw = f

    def find_class(self, module, name):
        if module.startswith("numpy") and name == "dtype":
            return Dtype
        if module.startswith("numpy") and name == "scalar":
            return Scalar
        if name == "NumpyArrayWrapper":
            return ArrayWrapper
        return type(name, (Stub,), {"qualname": f"{module}.{name}"})

    def load_build(self):
        super().load_build()
        obj = self.stack[-1]
        if not isinstance(obj, ArrayWrapper):
            return
        st = obj.state
        if st.get("numpy_array_alignment_bytes"):
            pad = self.raw.read(1)[0]
            self.raw.read(pad)
        dtype = st["dtype"].args[0]
        n = 1
        for dim in st["shape"]:
            n *= dim
        fmt = _FORMATS[dtype]
        data = self.raw.read(n * struct.calcsize(fmt))
        self.stack[-1] = {"shape": list(st["shape"]), "data": list(struct.unpack(f"<{n}{fmt}", data))}

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = load_build


def load(path):
    with open(path, "rb") as f:
        return Unpickler(f).load()


def main(vec_path, model_path, out_path):
    vec = load(vec_path).state
    tfidf = vec["_tfidf"].state
    expect = {"analyzer": "word", "lowercase": True, "ngram_range": (1, 1), "binary": False,
              "strip_accents": None, "norm": "l2", "use_idf": True, "sublinear_tf": False}
    for key, want in expect.items():
        if vec[key] != want:
            sys.exit(f"unsupported TfidfVectorizer setting {key}={vec[key]!r} (want {want!r})")
    vocab = vec["vocabulary_"]
    terms = [None] * len(vocab)
    for term, idx in vocab.items():
        terms[idx] = term
    idf = tfidf["idf_"]["data"]
    assert len(idf) == len(terms) and None not in terms
    model = load(model_path).state
    if model["method"] != "sigmoid":
        sys.exit(f"unsupported calibration {model['method']!r}")
    folds = []
    for cc in model["calibrated_classifiers_"]:
        svc = cc.state["estimator"].state
        (cal,) = cc.state["calibrators"]
        assert svc["coef_"]["shape"] == [1, len(terms)]
        folds.append({
            "coef": svc["coef_"]["data"],
            "intercept": svc["intercept_"]["data"][0],
            "a": cal.state["a_"],
            "b": cal.state["b_"],
        })
    out = {
        "source": "alt-profanity-check (TfidfVectorizer + CalibratedClassifierCV(LinearSVC), sklearn "
                  + vec["_sklearn_version"] + ")",
        "token_pattern": vec["token_pattern"],
        "vocabulary": terms,
        "idf": idf,
        "folds": folds,
    }
    with open(out_path, "w") as f:
        json.dump(out, f, separators=(",", ":"))


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])

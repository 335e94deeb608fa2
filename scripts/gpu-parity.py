#!/usr/bin/env python3
"""Server parity on a GPU host: the same `genai-factory` binary (built with `--features cuda`) serves
the same models with `--device cpu` and with `--device cuda`; greedy completions and embeddings must
agree.

usage: gpu-parity.py BINARY MODELS_DIR

Pass criteria (printed per prompt):
  - every prompt: the first generated token is the same (compared as the text of a 1-token greedy
    completion), and each device is deterministic (two identical requests give identical text);
  - at least 3 of the 5 prompts: the whole 24-token greedy completion is identical (the CPU runs f32
    activations, the GPU f16: a late near-tie may flip one greedy choice, an early or systematic
    difference is a bug);
  - every sentence: cosine(CPU embedding, GPU embedding) >= 0.999.
Exit 0 on pass, 1 on failure. Uses only the standard library.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at a temperature of",
    "Once upon a time, in a small village,",
    "The three primary colors are",
]
SENTENCES = [
    "The cat sits on the mat.",
    "GPU kernels for paged attention.",
    "A quick brown fox jumps over the lazy dog.",
    "Retrieval-augmented generation grounds answers in documents.",
]


def post(port, path, body):
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def start(binary, models, device, http_port, grpc_port, work):
    env = dict(os.environ, GENAI_INDEX__DIR=os.path.join(work, f"index-{device}"), RUST_LOG="info")
    log = open(os.path.join(work, f"server-{device}.log"), "w")
    proc = subprocess.Popen(
        [binary, "serve", "--device", device, "--models-dir", models,
         "--http-addr", f"127.0.0.1:{http_port}", "--grpc-addr", f"127.0.0.1:{grpc_port}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{device} server exited with {proc.returncode}; log: {log.name}\n"
                             + open(log.name).read()[-4000:])
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/ready", timeout=2) as r:
                if r.status == 200:
                    return proc
        except Exception:
            pass
        time.sleep(1)
    raise SystemExit(f"{device} server not ready after 300 s; log: {log.name}")


def stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def complete(port, prompt, n):
    r = post(port, "/v1/completions", {"prompt": prompt, "max_tokens": n, "temperature": 0})
    return r["choices"][0]["text"]


def embed(port):
    r = post(port, "/v1/embeddings", {"input": SENTENCES})
    return [d["embedding"] for d in sorted(r["data"], key=lambda d: d["index"])]


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    na = sum(x * x for x in a) ** 0.5
    nb = sum(y * y for y in b) ** 0.5
    return dot / max(na * nb, 1e-12)


def collect(port):
    first = [complete(port, p, 1) for p in PROMPTS]
    full = [complete(port, p, 24) for p in PROMPTS]
    again = [complete(port, p, 24) for p in PROMPTS]
    return {"first": first, "full": full, "deterministic": full == again, "emb": embed(port)}


def main():
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    binary, models = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
    work = tempfile.mkdtemp(prefix="gf-parity-")
    results = {}
    for device, (http, grpc) in (("cpu", (18180, 15051)), ("cuda", (18181, 15052))):
        proc = start(binary, models, device, http, grpc, work)
        try:
            results[device] = collect(http)
        finally:
            stop(proc)
    cpu, gpu = results["cpu"], results["cuda"]
    ok = True
    for dev in ("cpu", "cuda"):
        if not results[dev]["deterministic"]:
            print(f"FAIL {dev}: two identical greedy requests gave different text")
            ok = False
    same_full = 0
    for i, p in enumerate(PROMPTS):
        first_ok = cpu["first"][i] == gpu["first"][i]
        full_ok = cpu["full"][i] == gpu["full"][i]
        same_full += full_ok
        ok &= first_ok
        print(f"{'ok  ' if first_ok else 'FAIL'} first token {'same' if first_ok else 'differs'}, "
              f"full completion {'same' if full_ok else 'differs'}: {p!r}")
        print(f"     cpu : {cpu['full'][i]!r}\n     cuda: {gpu['full'][i]!r}")
    if same_full < 3:
        print(f"FAIL only {same_full}/5 full greedy completions identical (need 3)")
        ok = False
    for s, a, b in zip(SENTENCES, cpu["emb"], gpu["emb"]):
        c = cosine(a, b)
        print(f"{'ok  ' if c >= 0.999 else 'FAIL'} embedding cosine {c:.6f}: {s!r}")
        ok &= c >= 0.999
    print("server parity:", "PASS" if ok else "FAIL", f"(logs in {work})")
    if ok:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

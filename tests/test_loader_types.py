"""The patched loader registers per-expert types itself (patches/0002): any consumer of the patched runtime
computes a mixed file correctly, or refuses it with a clear error, never garbage and never a crash.

Every load runs in a child process: a crash there is a failed test, not a dead pytest.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from synthetic import copy_gguf

from edgemoe_llamacpp import runtime
from edgemoe_llamacpp.cli import main as cli
from edgemoe_llamacpp.gguf.layout import read_layout

pytestmark = pytest.mark.skipif(not runtime.patched(), reason="needs llama-cpp-python built with patches/")

PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    "
N_TOKENS = 24
# different types per expert in every stacked tensor, shifted per layer
PLAN_TYPES = ("Q4_K", "Q6_K", "Q3_K", "Q8_0", "Q2_K", "Q5_K")
# one expert per type: every vec_dot type ggml-cpu has (F32, F16, BF16, Q8_0, Q8_1, Q8_K) in one tensor
MANY_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
              "Q6_K", "IQ4_NL", "IQ4_XS", "Q8_0")

CHILD = r"""
import json, sys
import numpy as np
import llama_cpp
from edgemoe_llamacpp import runtime
from edgemoe_llamacpp.engine.llama import Llama, llama_params

args = json.loads(sys.argv[1])

def logits(llm):
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), (llm.n_vocab(),)).astype(np.float64)

if args["engine"] == "edgemoe":
    llm = Llama(args["path"], n_ctx=256, verbose=False)
else:
    with llama_params(use_extra_bufts=args["bufts"]):
        llm = llama_cpp.Llama(model_path=args["path"], n_ctx=256, verbose=False, use_mmap=args["mmap"])
llm.eval(llm.tokenize(args["prompt"].encode()))
rows, tokens = [logits(llm)], []
for i in range(args["n"]):
    # greedy, or forced along another run's tokens (to score that sequence)
    tokens.append(args["tokens"][i] if args.get("tokens") else int(rows[-1].argmax()))
    llm.eval([tokens[-1]])
    rows.append(logits(llm))
np.save(args["out"], np.stack(rows))
libs = {}
for line in open("/proc/self/maps"):
    parts = line.split(None, 5)
    if len(parts) == 6 and parts[5].rsplit("/", 1)[-1].startswith("libggml-cpu"):
        libs[parts[4]] = parts[5].strip()
print(json.dumps({"tokens": tokens, "patched": runtime.patched(), "library": runtime.loaded_library("libggml-cpu"),
                  "mapped_ggml_cpu": sorted(libs.values()), "prefix": sys.prefix,
                  "llama_cpp": llama_cpp.__file__}))
"""


def child(args: dict, python: str = sys.executable, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-c", CHILD, json.dumps(args)], capture_output=True, text=True, timeout=timeout,
                          check=False)


def run(path, out: Path, *, engine: str = "plain", bufts: bool = False, tokens=None, python: str = sys.executable,
        mmap: bool = True):
    """Greedy tokens (or the forced `tokens`), logits (N_TOKENS + 1, vocab), and what the child saw."""
    r = child({"path": str(path), "engine": engine, "bufts": bufts, "prompt": PROMPT, "n": N_TOKENS,
               "tokens": tokens, "out": str(out), "mmap": mmap}, python=python)
    assert r.returncode == 0, f"{engine} bufts={bufts} exited {r.returncode}:\n{r.stderr[-3000:]}"
    info = json.loads(r.stdout.strip().splitlines()[-1])
    return info["tokens"], np.load(out), info


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(p || q) per row, from logits."""
    def logsoftmax(x):
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    lp, lq = logsoftmax(p_logits), logsoftmax(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(axis=1)


def convert_with_plan(fixture_path: Path, out: Path, types_for, uniform: dict | None = None) -> Path:
    """`edgemoe convert --plan`: expert e of a tensor of layer L at types_for(L, e), or every expert of the tensors
    `uniform` names at the type it gives."""
    layout = read_layout(fixture_path)
    uniform = uniform or {}
    plan = {t.name: [uniform[t.name]] * t.count if t.name in uniform else [types_for(t.layer, e) for e in range(t.count)]
            for t in layout.expert_tensors}
    (out.parent / "plan.json").write_text(json.dumps(plan))
    assert cli(["convert", str(fixture_path), str(out), "--plan", str(out.parent / "plan.json")]) == 0
    return out


@pytest.fixture(scope="module")
def mixed(fixture_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("loader") / "mixed.gguf"
    return convert_with_plan(fixture_path, out, lambda layer, e: PLAN_TYPES[(e + layer) % len(PLAN_TYPES)])


def reference_run(path: Path, out: Path):
    """edgemoe_llamacpp.Llama on a mixed file, no budget: greedy tokens and logits."""
    tokens, logits, info = run(path, out, engine="edgemoe")
    assert info["patched"] and np.isfinite(logits).all()
    return tokens, logits


@pytest.fixture(scope="module")
def reference(mixed, tmp_path_factory):
    return reference_run(mixed, tmp_path_factory.mktemp("ref") / "edgemoe.npy")


@pytest.fixture(scope="module")
def q4k_slots(fixture_path, tmp_path_factory) -> Path:
    """Mixed tensors declared at Q4_K (a type the CPU repack takes), beside uniform Q4_K ones (which it does take)."""
    layout = read_layout(fixture_path)
    down = {t.name: "Q4_K" for t in layout.expert_tensors if "down" in t.name}
    out = tmp_path_factory.mktemp("q4k") / "q4k-slots.gguf"
    return convert_with_plan(fixture_path, out, lambda layer, e: ("Q4_K", "Q2_K", "Q3_K")[(e + layer) % 3], down)


def loader_log(path: Path, bufts: bool) -> str:
    code = ("from edgemoe_llamacpp.engine.llama import llama_params\nimport llama_cpp\n"
            f"with llama_params(use_extra_bufts={bufts}):\n"
            f"    llama_cpp.Llama(model_path={str(path)!r}, n_ctx=64, verbose=True)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stderr


@pytest.mark.parametrize("bufts", [False, True], ids=["repack-off", "repack-on"])
@pytest.mark.parametrize("which", ["q8_0-slots", "q4_k-slots"])
def test_plain_llama_cpp_computes_a_mixed_file(mixed, reference, q4k_slots, fixture_path, tmp_path, bufts, which):
    """(a) plain llama_cpp.Llama: the same greedy tokens and logits as edgemoe; close to the source file."""
    path, want = (mixed, reference) if which == "q8_0-slots" else \
        (q4k_slots, reference_run(q4k_slots, tmp_path / "edgemoe.npy"))
    if which == "q4_k-slots":
        log = loader_log(path, bufts)
        n_mixed = sum(t.types is not None for t in read_layout(path).expert_tensors)
        assert f"{n_mixed} stacked expert tensors with per-expert types" in log
        # with repack on, the uniform Q4_K tensors are repacked and the mixed ones are kept in the file's layout
        assert ("CPU_REPACK model buffer size" in log) == bufts
    tokens, logits, _ = run(path, tmp_path / "plain.npy", bufts=bufts)
    assert tokens == want[0]
    assert np.isfinite(logits).all()
    assert np.abs(logits - want[1]).max() <= 1e-3 * np.abs(want[1]).max()
    # the source (Q8_0 experts) scored on the same tokens: the mixed file is a requantization of it
    _, source, _ = run(fixture_path, tmp_path / "source.npy", bufts=bufts, tokens=tokens)
    divergence = kl(source, logits)
    assert divergence.mean() < 0.02 and divergence.max() < 0.1, divergence
    assert (source.argmax(1) == logits.argmax(1)).mean() >= 0.9


def test_a_mixed_file_loaded_without_mmap(mixed, reference, tmp_path):
    """Read into an allocated CPU buffer instead of mapped: the slots keep the file's layout; same output."""
    tokens, logits, _ = run(mixed, tmp_path / "no-mmap.npy", bufts=True, mmap=False)
    assert tokens == reference[0]
    assert np.abs(logits - reference[1]).max() <= 1e-3 * np.abs(reference[1]).max()


def test_many_distinct_types_in_one_tensor(fixture_path, tmp_path):
    """Experts at 15 types and every vec_dot type ggml-cpu has, in every tensor: plain = edgemoe, near the source."""
    path = convert_with_plan(fixture_path, tmp_path / "many.gguf", lambda layer, e: MANY_TYPES[(e + layer) % 16])
    layout = read_layout(path)
    assert {t.type for t in layout.expert_tensors} == {"F32"} and len(set(layout.expert_tensors[0].types)) == 15
    want, want_logits, _ = run(path, tmp_path / "edgemoe.npy", engine="edgemoe")
    got, got_logits, _ = run(path, tmp_path / "plain.npy", bufts=True)
    assert got == want and np.isfinite(got_logits).all()
    assert np.abs(got_logits - want_logits).max() <= 1e-3 * np.abs(want_logits).max()
    _, source, _ = run(fixture_path, tmp_path / "source.npy", tokens=got)
    assert kl(source, got_logits).mean() < 0.01


def venv_root() -> Path | None:
    return Path(sys.prefix) if sys.prefix != sys.base_prefix else None


@pytest.mark.skipif(venv_root() is None, reason="runs only inside a virtual environment")
@pytest.mark.parametrize("engine", ["edgemoe", "plain"])
def test_venv_reached_through_a_symlink(mixed, reference, tmp_path, engine):
    """(b) the interpreter reached through a symlink to the venv: one copy of ggml-cpu, the right output."""
    link = tmp_path / "venv-link"
    link.symlink_to(venv_root().resolve(), target_is_directory=True)
    python = link / "bin" / Path(sys.executable).name
    tokens, logits, info = run(mixed, tmp_path / "linked.npy", engine=engine, python=str(python))
    assert info["prefix"] == str(link)                       # the venv was reached through the link
    assert len(info["mapped_ggml_cpu"]) == 1, info            # one copy of ggml-cpu in the process
    assert os.path.realpath(info["mapped_ggml_cpu"][0]) == info["library"]
    assert info["patched"]
    assert tokens == reference[0] and np.isfinite(logits).all()
    assert np.abs(logits - reference[1]).max() <= 1e-3 * np.abs(reference[1]).max()


# ---------------------------------------------------------------- files the patched loader must refuse

def rewrite(src: Path, dst: Path, kv: dict) -> Path:
    """A copy of the GGUF `src` with metadata keys replaced: key -> (value, type, sub_type), or None to drop."""
    copy_gguf(src, dst, kv=kv)
    return dst


def plain_load(path: Path) -> subprocess.CompletedProcess:
    code = ("import llama_cpp\n"
            "try:\n"
            f"    llm = llama_cpp.Llama(model_path={str(path)!r}, n_ctx=64, verbose=True)\n"
            "except ValueError as e:\n"
            "    print('ValueError:', e); raise SystemExit(3)\n"
            "print('tokens', llm.tokenize(b'import os'))\n"
            "llm.eval(llm.tokenize(b'import os'))\n"
            "print('evaluated')\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)


def assert_refused(r: subprocess.CompletedProcess, *messages: str) -> None:
    assert r.returncode == 3, f"exit {r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
    assert "ValueError" in r.stdout
    for m in messages:
        assert m in r.stderr, f"{m!r} not in:\n{r.stderr[-3000:]}"


TYPES_KEY = "edgemoe.expert_types.blk.1.ffn_up_exps.weight"
FEATURES = "edgemoe.required_features"
A = GGUFValueType.ARRAY
I32 = GGUFValueType.INT32


def test_unknown_required_feature_is_refused(mixed, tmp_path):
    """(c) a feature this build does not know: llama_model_load fails with a message, ValueError in Python."""
    assert GGUFReader(mixed).fields[FEATURES].contents() == ["expert_types"]
    bad = rewrite(mixed, tmp_path / "future.gguf",
                  {FEATURES: (["expert_types", "quantum_experts"], A, GGUFValueType.STRING)})
    assert_refused(plain_load(bad), "requires the edgemoe feature 'quantum_experts'",
                   "does not support")
    bad = rewrite(mixed, tmp_path / "ints.gguf", {FEATURES: ([1, 2], A, I32)})
    assert_refused(plain_load(bad), "edgemoe.required_features must be an array of strings")


def test_per_expert_types_need_the_feature(mixed, tmp_path):
    """Types without the feature that says how to read them: refused, whether the key is absent (a file written
    before it existed) or lists other features."""
    assert_refused(plain_load(rewrite(mixed, tmp_path / "old.gguf", {FEATURES: None})),
                   "does not require the edgemoe feature 'expert_types'")
    bad = rewrite(mixed, tmp_path / "lowbit-only.gguf", {FEATURES: (["lowbit"], A, GGUFValueType.STRING)})
    assert_refused(plain_load(bad), "does not require the edgemoe feature 'expert_types'")


def hostile_types(n_expert: int) -> dict:
    good = [int(GGMLQuantizationType.Q4_K)] * n_expert
    return {
        "too-short": (good[:-1], I32, "lists 15 types for 16 experts"),
        "too-long": (good + [12], I32, "lists 17 types for 16 experts"),
        "one": (good[:1], I32, "lists 1 types for 16 experts"),
        "unknown-id": (good[:5] + [99] + good[6:], I32, "expert 5 has unknown ggml type 99"),
        "removed-type": (good[:3] + [4] + good[4:], I32, "expert 3 has unknown ggml type 4"),
        "negative": (good[:1] + [-1] + good[2:], I32, "expert 1 has unknown ggml type -1"),
        "huge-u64": (good[:1] + [2**64 - 1] + good[2:], GGUFValueType.UINT64, "expert 1 has unknown ggml type"),
        "too-big-for-slot": (good[:7] + [int(GGMLQuantizationType.F32)] + good[8:], I32,
                             "expert 7 at f32 does not fit its 69632-byte slot"),
        "no-cpu-kernel": (good[:2] + [int(GGMLQuantizationType.I8)] + good[3:], I32,
                          "the CPU backend has no kernel for one of them"),
        "floats": ([4.0] * n_expert, GGUFValueType.FLOAT32, "must be an array of integers"),
        "strings": (["Q4_K"] * n_expert, GGUFValueType.STRING, "must be an array of integers"),
        "scalar": (12, I32, "must be an array of integers"),
    }


@pytest.mark.parametrize("case", list(hostile_types(16)))
def test_hostile_per_expert_types_are_refused(mixed, tmp_path, case):
    """(d) per-expert type arrays that do not describe the tensor: refused with a clear error, never an abort."""
    value, sub, message = hostile_types(16)[case]
    spec = (value, sub) if case == "scalar" else (value, A, sub)
    bad = rewrite(mixed, tmp_path / f"{case}.gguf", {TYPES_KEY: spec})
    assert_refused(plain_load(bad), message)


def test_types_for_a_tensor_that_is_not_a_stack_of_experts(mixed, tmp_path):
    q8 = int(GGMLQuantizationType.Q8_0)
    bad = rewrite(mixed, tmp_path / "dense.gguf", {"edgemoe.expert_types.blk.0.attn_q.weight": ([q8], A, I32)})
    assert_refused(plain_load(bad), "is not a stack of experts")
    bad = rewrite(mixed, tmp_path / "nothing.gguf", {"edgemoe.expert_types.blk.9.ffn_up_exps.weight": ([q8], A, I32)})
    assert_refused(plain_load(bad), "the file has no tensor 'blk.9.ffn_up_exps.weight'")


REGISTRY = r"""
import ctypes, json
from edgemoe_llamacpp import runtime
buf = ctypes.create_string_buffer(1 << 16)
base = ctypes.addressof(buf)
ptr = [base + 1024 * e for e in range(4)]
out = {}
def attempt(name, fn, *args):
    try:
        fn(*args); out[name] = "ok"
    except RuntimeError as e:
        out[name] = str(e)
attempt("unknown type", runtime.register_expert_types, base, 256, [12, 12, 99, 12], ptr)
attempt("no kernel (Q8_1)", runtime.register_expert_types, base, 256, [12, 12, 9, 12], ptr)
attempt("blocks do not divide rows", runtime.register_expert_types, base, 96, [12, 12, 12, 12], ptr)
attempt("null pointer", runtime.register_expert_types, base, 256, [12, 12, 12, 12], ptr[:3] + [0])
attempt("no experts", runtime.register_expert_types, base, 256, [], [])
attempt("set on nothing", runtime.set_expert, base, 0, 12, ptr[0])
out["lookup nothing"] = runtime.lookup_expert(base, 0)
attempt("check nothing", runtime.check_registered, "blk.0.x", base, [12], [ptr[0]])
attempt("register", runtime.register_expert_types, base, 256, [12, 8, 14, 10], ptr)
out["lookup 1"] = runtime.lookup_expert(base, 1) == (8, ptr[1])
attempt("check", runtime.check_registered, "blk.0.x", base, [12, 8, 14, 10], ptr)
attempt("check other types", runtime.check_registered, "blk.0.x", base, [12, 12, 14, 10], ptr)
attempt("set out of range", runtime.set_expert, base, 4, 12, ptr[0])
attempt("set bad type", runtime.set_expert, base, 0, 9, ptr[0])
attempt("set", runtime.set_expert, base, 0, 0, ptr[3])
out["lookup 0"] = runtime.lookup_expert(base, 0) == (0, ptr[3])
attempt("lookup out of range", runtime.lookup_expert, base, 7)
out["unregister"] = runtime.unregister_expert_types(base)
out["again"] = runtime.unregister_expert_types(base)
out["lookup gone"] = runtime.lookup_expert(base, 0)
print(json.dumps(out))
"""


def test_registry_api_validates_its_arguments():
    """The C API checks every count, type and pointer and returns an error: no abort."""
    r = subprocess.run([sys.executable, "-c", REGISTRY], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    for case in ("unknown type", "no kernel (Q8_1)", "blocks do not divide rows", "set bad type"):
        assert "cannot compute" in out[case], (case, out[case])
    for case in ("null pointer", "no experts", "set out of range", "lookup out of range"):
        assert "invalid arguments" in out[case], (case, out[case])
    assert "no tensor registered" in out["set on nothing"]
    # the check edgemoe_llamacpp.Llama makes after a load: the registry llama.cpp computes with holds the file's types
    assert out["check"] == "ok"
    assert "blk.0.x: llama.cpp's ggml-cpu" in out["check nothing"] and "nothing registered" in out["check nothing"]
    assert "type 8 at" in out["check other types"] and "expected type 12" in out["check other types"]
    assert out["lookup nothing"] is None and out["lookup gone"] is None
    assert out["register"] == out["set"] == "ok" and out["lookup 1"] and out["lookup 0"]
    assert out["unregister"] is True and out["again"] is False


# ---------------------------------------------------------------- llama-cpp-python's own server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_llama_cpp_server_computes_a_mixed_file(mixed, reference, tmp_path):
    """`python -m llama_cpp.server` on a mixed file: the greedy completion is edgemoe's."""
    pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    pytest.importorskip("sse_starlette")
    pytest.importorskip("pydantic_settings")
    port = free_port()
    with open(tmp_path / "server.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(mixed), "--n_ctx", "256",
                                 "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
        try:
            text = complete(port, proc, tmp_path / "server.log")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    want = detokenize(mixed, reference[0][:12])
    assert text == want


def complete(port: int, proc: subprocess.Popen, log: Path) -> str:
    """The greedy completion of PROMPT, once the server answers."""
    body = json.dumps({"prompt": PROMPT, "max_tokens": 12, "temperature": 0.0, "repeat_penalty": 1.0}).encode()
    deadline = time.monotonic() + 120
    while True:
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as resp:
                return json.loads(resp.read())["choices"][0]["text"]
        except OSError:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not answer"
            time.sleep(0.5)


def detokenize(path: Path, tokens: list[int]) -> str:
    code = ("import json, sys, llama_cpp\n"
            f"llm = llama_cpp.Llama(model_path={str(path)!r}, vocab_only=True, verbose=False)\n"
            f"print(json.dumps(llm.detokenize({tokens!r}).decode('utf-8', 'replace')))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)

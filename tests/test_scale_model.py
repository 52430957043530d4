"""tools/make_scale_model.py: a 2-layer variant of every preset loads in stock llama.cpp and in edgemoe with the
geometry and types of its model, finite weights and finite logits, and the same greedy tokens in both."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import stock

from edgemoe_llamacpp.engine.generate import greedy
from edgemoe_llamacpp.engine.llama import Llama
from edgemoe_llamacpp.gguf.layout import read_layout
from edgemoe_llamacpp.pages import PAGE

TOOL = Path(__file__).resolve().parent.parent / "tools" / "make_scale_model.py"
PROMPT = "import os\n\n\ndef main():\n"

# preset -> (arch, MoE layers of a 2-layer variant, experts, top-k, expert types gate/up/down, embedding width)
EXPECT = {
    "qwen3-30b-a3b": ("qwen3moe", (0, 1), 128, 8, ("Q4_K", "Q4_K", "Q6_K"), 2048),
    "qwen3-30b-a3b-narrow": ("qwen3moe", (0, 1), 128, 8, ("Q4_K", "Q4_K", "Q6_K"), 512),
    "olmoe-1b-7b": ("olmoe", (0, 1), 64, 8, ("Q4_K", "Q4_K", "Q6_K"), 2048),
    "deepseek-v2-lite": ("deepseek2", (1,), 64, 6, ("Q4_K", "Q4_K", "Q8_0"), 2048),   # 1408-wide rows: no K-quant
    "gpt-oss-20b": ("gpt-oss", (0, 1), 32, 4, ("MXFP4", "MXFP4", "MXFP4"), 2880),
    "mixtral-8x7b": ("llama", (0, 1), 8, 2, ("Q4_K", "Q4_K", "Q6_K"), 4096),
}


def make(preset: str, out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), preset, "--out", str(out), *args], capture_output=True,
                          text=True, timeout=600, check=False)


@pytest.fixture(scope="module", params=list(EXPECT))
def scale_model(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("scale") / f"{request.param}-2l.gguf"
    proc = make(request.param, out, "--layers", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    yield request.param, out, info
    out.unlink()


def test_geometry_types_and_page_aligned_experts(scale_model):
    preset, path, info = scale_model
    arch, moe_layers, n_expert, k, types, n_embd = EXPECT[preset]
    layout = read_layout(path)
    assert (layout.arch, layout.n_layer, layout.moe_layers, layout.n_expert, layout.n_expert_used) == \
        (arch, 2, moe_layers, n_expert, k)
    weights = {t.name.split(".")[2]: t.type for t in layout.expert_tensors if t.name.endswith(".weight")}
    assert (weights["ffn_gate_exps"], weights["ffn_up_exps"], weights["ffn_down_exps"]) == types
    assert info["bytes"] == layout.file_size and info["n_expert"] == n_expert
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.alignment"].contents() == PAGE
    assert int(reader.fields[f"{arch}.embedding_length"].contents()) == n_embd
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == 4096          # the fixture's vocabulary
    starts = [r.offset for x in layout.experts for r in x.ranges]
    if preset in ("gpt-oss-20b", "qwen3-30b-a3b-narrow"):   # MXFP4 2880 x 2880: 4,406,400 bytes; the narrow
        # preset's Q6_K down, 512 rows of 256: 107,520 bytes -- experts of no whole pages
        assert all(t.offset % PAGE == 0 for t in layout.expert_tensors)
    else:
        assert all(s % PAGE == 0 for s in starts) and all(t.stride % PAGE == 0 for t in layout.expert_tensors)


def test_weights_are_finite_and_scaled(scale_model):
    """Every tensor's first and last rows dequantize to finite values; random weights have the standard
    deviation of their init (1/sqrt(row length)), norms are ones."""
    _, path, _ = scale_model
    reader = gguf.GGUFReader(path)
    for t in reader.tensors:
        rows = t.data.reshape(-1, t.data.shape[-1])
        sample = np.concatenate([rows[:64], rows[-64:]])
        w = gguf.quants.dequantize(sample, t.tensor_type).astype(np.float64)
        assert np.isfinite(w).all(), t.name
        row = int(t.shape[0])
        if t.name.endswith("norm.weight"):
            assert (w == 1).all(), t.name
        elif t.name == "token_embd.weight":
            assert 0.8 < w.std() < 1.25, t.name
        elif t.name.endswith(".weight") and "sinks" not in t.name and len(t.shape) > 1:
            assert 0.8 < w.std() * math.sqrt(row) < 1.25, (t.name, w.std() * math.sqrt(row))


@pytest.mark.stock
def test_stock_and_edgemoe_agree(scale_model, tmp_path):
    """The same greedy tokens and logits through stock llama_cpp.Llama (a child process) and
    edgemoe_llamacpp.Llama holding half the experts, both computing from the file (llama.cpp's CPU repack off);
    finite logits with the repack on too.

    With the repack on, stock computes Q4_K and MXFP4 with other kernels, whose rounding can flip a random
    router's near-tied choice, so its tokens may differ from the first one on: compared only repack off."""
    _, path, _ = scale_model
    want_tokens, want_logits = stock.greedy(path, PROMPT, 6, tmp_path / "logits.npy", n_ctx=128, repack=False)
    llm = Llama(str(path), memory_budget="50%", n_ctx=128, verbose=False)
    try:
        tokens, logits = greedy(llm, PROMPT, 6)
        misses = llm.edgemoe_stats()["total"]["misses"]
    finally:
        llm.close()
    assert np.isfinite(logits).all() and logits.std() > 0.1     # logits that tell tokens apart
    assert tokens == want_tokens and misses > 0
    np.testing.assert_array_equal(logits, want_logits)
    repacked_tokens, repacked = stock.greedy(path, PROMPT, 6, tmp_path / "repacked.npy", n_ctx=128)
    assert np.isfinite(repacked).all() and len(repacked_tokens) == 6


def test_refuses_bad_requests(tmp_path):
    proc = make("deepseek-v2-lite", tmp_path / "x.gguf", "--layers", "1")
    assert proc.returncode == 2 and proc.stderr.strip() == "error: deepseek-v2-lite takes --layers 2..27, not 1"
    (tmp_path / "exists.gguf").write_bytes(b"keep")
    proc = make("olmoe-1b-7b", tmp_path / "exists.gguf", "--layers", "2")
    assert proc.returncode == 2 and "exists; pass --force" in proc.stderr
    assert (tmp_path / "exists.gguf").read_bytes() == b"keep"


def test_sigterm_while_writing_leaves_no_temporary(tmp_path):
    """A file of tens of GB is written to a temporary beside it: SIGTERM (kill, timeout) removes it, as Ctrl-C
    does, instead of leaving it until the next write to that name."""
    import signal
    import time

    out = tmp_path / "big.gguf"
    proc = subprocess.Popen([sys.executable, str(TOOL), "qwen3-30b-a3b", "--layers", "8", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".big.gguf.*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, f"ended before it wrote: {proc.communicate()}"
    time.sleep(0.3)                                      # well into the tensors
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, (proc.returncode, err[-2000:])
    assert list(tmp_path.iterdir()) == []

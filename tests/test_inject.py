"""Routing from a trace (benchmarks and replay): llama.cpp computes the trace's experts, in both engines."""
import json
import subprocess
import sys

import numpy as np
import pytest
from stock import check

from edgemoe_llamacpp import Llama
from edgemoe_llamacpp.bench import stock_env
from edgemoe_llamacpp.generate import last_logits
from edgemoe_llamacpp.layout import read_layout
from edgemoe_llamacpp.routing_trace import RoutingTrace

PROMPT = "import os\nimport sys\n\n\ndef "
N = 12

CHILD = r"""
import json, sys
import numpy as np
from edgemoe_llamacpp.llama import stock_llama

a = json.loads(sys.argv[1])
llm = stock_llama(a["path"], use_extra_bufts=False, route_trace=a["trace"], n_ctx=256, verbose=False)
def logits():
    return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),)).copy()
llm.eval(llm.tokenize(a["prompt"].encode()))
tokens, rows = [], [logits()]
for _ in range(a["n"]):
    tokens.append(int(rows[-1].argmax()))
    llm.eval([tokens[-1]])
    rows.append(logits())
np.save(a["out"], np.stack(rows))
print(json.dumps({"tokens": tokens, "injected": llm.edgemoe_injector.injected}))
"""


def random_trace(layout, n_tokens: int, seed: int) -> RoutingTrace:
    """Experts no router of the fixture would pick together: each row k distinct experts drawn uniformly."""
    rng = np.random.default_rng(seed)
    layers = layout.moe_layers
    ids = np.stack([np.stack([rng.permutation(layout.n_expert)[:layout.n_expert_used] for _ in layers])
                    for _ in range(n_tokens)]).astype(np.int32)
    return RoutingTrace(ids=ids, layers=tuple(layers), n_expert=layout.n_expert, source=f"test seed={seed}")


def greedy(llm, prompt: str, n: int) -> tuple[list[int], np.ndarray]:
    llm.eval(llm.tokenize(prompt.encode()))
    rows = [last_logits(llm).copy()]
    tokens = []
    for _ in range(n):
        tokens.append(int(rows[-1].argmax()))
        llm.eval([tokens[-1]])
        rows.append(last_logits(llm).copy())
    return tokens, np.stack(rows)


@pytest.fixture(scope="module")
def trace(fixture_path, tmp_path_factory):
    layout = read_layout(fixture_path)
    t = random_trace(layout, 64, seed=3)
    path = tmp_path_factory.mktemp("trace") / "trace.npz"
    t.save(path)
    return t, path


def test_llama_cpp_computes_the_trace_experts(fixture_path, trace):
    t, path = trace
    llm = Llama(str(fixture_path), route_trace=path, record_routing=True, n_ctx=256, verbose=False)
    greedy(llm, PROMPT, N)
    n_prompt = len(llm.tokenize(PROMPT.encode()))
    stats = llm.edgemoe_stats()
    recorded = llm.edgemoe_trace()
    llm.close()
    assert stats["routing"] == "injected: test seed=3"
    # read back at every topk node after the overwrite: per evaluation, per layer, the rows of its positions
    layers = list(t.layers)
    pos, evals = 0, 0
    for i, (layer, rows) in enumerate(recorded):
        rows = np.array(rows)
        if layer == layers[0]:
            start, width = pos, len(rows)
            pos += width
            evals += 1
        want = t.ids[np.arange(start, start + width) % t.n_tokens, layers.index(layer)]
        assert (rows == want[len(want) - len(rows):]).all(), (i, layer)
    assert evals == 1 + N and pos == n_prompt + N


def test_injected_routing_changes_the_output(fixture_path, trace):
    _, path = trace
    own = Llama(str(fixture_path), n_ctx=256, verbose=False)
    _, la = greedy(own, PROMPT, 4)
    own.close()
    injected = Llama(str(fixture_path), route_trace=path, n_ctx=256, verbose=False)
    _, lb = greedy(injected, PROMPT, 4)
    injected.close()
    assert not np.allclose(la, lb)       # the injection reaches the computation


@pytest.mark.stock
@pytest.mark.repack_off
def test_stock_and_edgemoe_agree_under_the_trace(fixture_path, trace, tmp_path):
    _, path = trace
    out = tmp_path / "stock.npy"
    args = {"path": str(fixture_path), "trace": str(path), "prompt": PROMPT, "n": N, "out": str(out)}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True,
                          env=stock_env(), timeout=600, check=False)
    check(proc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    llm = Llama(str(fixture_path), route_trace=path, memory_budget="50%", n_ctx=256, verbose=False)
    tokens, logits = greedy(llm, PROMPT, N)
    llm.close()
    assert info["injected"] > 0
    assert tokens == info["tokens"]
    np.testing.assert_array_equal(logits, np.load(out))

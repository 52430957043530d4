"""Routing from a trace (benchmarks and replay): llama.cpp computes the trace's experts, in both engines."""

import numpy as np
import pytest
import stock

from edgemoe_bench.inject import trace_injector
from edgemoe_bench.routing_trace import RoutingTrace
from edgemoe_llamacpp import Llama
from edgemoe_llamacpp.engine.generate import last_logits
from edgemoe_llamacpp.gguf.layout import read_layout

PROMPT = "import os\nimport sys\n\n\ndef "
N = 12


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
    llm = Llama(str(fixture_path), route_injector=trace_injector(path, fixture_path), record_routing=True, n_ctx=256, verbose=False)
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
    injected = Llama(str(fixture_path), route_injector=trace_injector(path, fixture_path), n_ctx=256, verbose=False)
    _, lb = greedy(injected, PROMPT, 4)
    injected.close()
    assert not np.allclose(la, lb)       # the injection reaches the computation


@pytest.mark.stock
@pytest.mark.repack_off
def test_stock_and_edgemoe_agree_under_the_trace(fixture_path, trace, tmp_path):
    _, path = trace
    want_tokens, want_logits, injected = stock.greedy_injected(fixture_path, path, PROMPT, N, tmp_path / "stock.npy")
    llm = Llama(str(fixture_path), route_injector=trace_injector(path, fixture_path), memory_budget="50%", n_ctx=256, verbose=False)
    tokens, logits = greedy(llm, PROMPT, N)
    llm.close()
    assert injected > 0
    assert tokens == want_tokens
    np.testing.assert_array_equal(logits, want_logits)


def test_generate_measures_both_engines_under_a_trace(fixture_path, trace):
    """What `edgemoe run --route-trace` and the bench call (here in one process, llama_cpp.Llama on this runtime,
    repack off): the stock side has the injecting hook and no cache; both say they were injected, agree, and
    edgemoe's decode time splits into its parts."""
    from edgemoe_llamacpp.engine.generate import generate

    _, path = trace
    runs = {True: generate(str(fixture_path), PROMPT, max_tokens=6, stock=True,
                           route_injector=trace_injector(path, fixture_path),
                           use_extra_bufts=False),
            False: generate(str(fixture_path), PROMPT, max_tokens=6, route_injector=trace_injector(path, fixture_path))}
    assert runs[True]["text"] == runs[False]["text"]
    assert all(r["routing"].startswith("injected") for r in runs.values())
    parts = runs[False]["decode_ms_per_token"]
    assert sum(parts.values()) == pytest.approx(1e3 / runs[False]["decode_tok_s"])
    assert "decode_ms_per_token" not in runs[True]

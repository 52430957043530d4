"""The runtime's expert filter (patches/0005): a layer whose chosen experts are all resident passes in C and is
logged; the hook catches up after the evaluation. Everything it counts and records must be what the hook counts
and records when Python sees every layer."""
import numpy as np
import pytest

from edgemoe_llamacpp import runtime
from edgemoe_llamacpp.engine import hook as hook_mod
from edgemoe_llamacpp.engine.generate import greedy
from edgemoe_llamacpp.engine.hook import logged_routes
from edgemoe_llamacpp.engine.llama import Llama

PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    "
N_TOKENS = 24
COUNTS = ("hits", "misses", "bytes_fetched", "bytes_evicted")


def run(path, budget, policy="distance"):
    llm = Llama(str(path), memory_budget=budget, policy=policy, record_routing=True, n_ctx=256, verbose=False)
    try:
        tokens, logits = greedy(llm, PROMPT, N_TOKENS)
        stats, trace = llm.edgemoe_stats(), llm.edgemoe_trace()
        return {"tokens": tokens, "logits": logits, "stats": stats, "trace": trace,
                "calls": llm.edgemoe.hook.calls}
    finally:
        llm.close()


def python_sees_every_layer(monkeypatch):
    monkeypatch.setattr(runtime, "eval_expert_filter", lambda: None)


def assert_same_run(got, want):
    assert got["tokens"] == want["tokens"]
    np.testing.assert_array_equal(got["logits"], want["logits"])
    assert got["trace"] == want["trace"]
    assert got["stats"]["routes"] == want["stats"]["routes"] == len(want["trace"])
    for g, w in zip(got["stats"]["layers"], want["stats"]["layers"], strict=True):
        assert {k: g[k] for k in COUNTS} == {k: w[k] for k in COUNTS}, g["layer"]


@pytest.fixture(scope="module")
def require_filter():
    if runtime.eval_expert_filter() is None:
        pytest.skip("the runtime lacks llama_eval_expert_filter (patches/0005)")


@pytest.mark.parametrize(("budget", "policy"), [(None, "distance"), ("50%", "distance"), ("25%", "lru")])
def test_layers_that_pass_in_c_count_and_record_as_python_would(fixture_path, monkeypatch, require_filter,
                                                                 budget, policy):
    got = run(fixture_path, budget, policy)
    with monkeypatch.context() as m:
        python_sees_every_layer(m)
        want = run(fixture_path, budget, policy)
    assert_same_run(got, want)
    assert want["calls"] == len(want["trace"])            # without the filter Python sees every layer
    layers_with_a_miss = sum(1 for r in got["stats"]["layers"] if r["misses"])
    assert got["calls"] < len(got["trace"])               # with it, some layers never reach Python
    if budget is None:
        # the load read the whole file, so every expert starts resident and ready: no misses, and no layer
        # reaches Python at all (before 0005's ready-at-attach, each first touch was a miss handed to Python)
        assert layers_with_a_miss == 0
        assert got["calls"] == 0
    else:
        assert got["calls"] >= layers_with_a_miss


def test_a_full_log_hands_the_layer_to_python(fixture_path, monkeypatch, require_filter):
    """Room for one decoded layer (3 + k ints) only: the next layer finds the log full and calls Python, which
    drains the log first, so the policy still sees the layers in order."""
    monkeypatch.setattr(hook_mod, "LOG_INTS", 3 + 2)
    small = run(fixture_path, "50%")
    monkeypatch.undo()
    python_sees_every_layer(monkeypatch)
    assert_same_run(small, run(fixture_path, "50%"))


def test_logged_routes_parses_prompt_and_decode_entries():
    log = np.array([3, 2, 2, 5, 1, 7, 0, 4, 1, 2, 9, 11], dtype=np.int32)
    got = [(layer, ids.tolist()) for layer, ids in logged_routes(log)]
    assert got == [(3, [[5, 1], [7, 0]]), (4, [[9, 11]])]

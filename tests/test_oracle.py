"""The oracle predictor (edgemoe_bench.oracle): the injected trace's experts of later layers, each kept with the
recall asked for; through the real llama.cpp, every expert a perfect oracle prefetches is used, and prefetching
changes no logit."""
import numpy as np
import pytest
from test_inject import PROMPT, greedy, random_trace

from edgemoe_bench.inject import TraceInjector, trace_injector
from edgemoe_bench.oracle import OraclePredictor
from edgemoe_llamacpp import Llama
from edgemoe_llamacpp.gguf.layout import read_layout

N = 10


def test_guesses_keep_the_recall_asked_for_and_fill_with_experts_not_chosen(fixture_path):
    layout = read_layout(fixture_path)
    trace = random_trace(layout, 16, seed=5)
    k, E = layout.n_expert_used, layout.n_expert
    for recall in (1.0, 0.75, 0.5, 0.0):
        oracle = OraclePredictor(layout, TraceInjector(trace), recall=recall, seed=1)
        kept = []
        for position in range(2000):
            true = trace.ids[position % 16, 3]
            guess = oracle.guess(position, 3, true)
            assert len(guess) == k and len(set(guess.tolist())) == k and ((0 <= guess) & (guess < E)).all()
            kept.append(np.isin(true, guess).mean())
            assert (oracle.guess(position, 3, true) == guess).all()          # one draw per (token, layer)
        assert np.mean(kept) == pytest.approx(recall, abs=0.03), recall
    with pytest.raises(ValueError, match="recall"):
        OraclePredictor(layout, TraceInjector(trace), recall=1.5)


def test_oracle_predicts_the_next_layers_of_the_token_being_decoded(fixture_path, tmp_path):
    layout = read_layout(fixture_path)
    trace = random_trace(layout, 64, seed=7)
    path = tmp_path / "trace.npz"
    trace.save(path)
    injector = trace_injector(path, fixture_path)
    oracle = OraclePredictor(layout, injector, recall=1.0)
    seen = []
    llm = Llama(str(fixture_path), route_injector=injector, prefetch_predictor=oracle, memory_budget="50%", prefetch_depth=2,
                n_ctx=256, verbose=False)
    predict = oracle.predict

    def spy(layer, depth):
        out = predict(layer, depth)
        first, rows = injector.evaluating
        seen.append((first + len(rows) - 1, layer, depth, out))
        return out

    oracle.predict = spy
    tokens, rows = greedy(llm, PROMPT, N)
    stats = llm.edgemoe_stats()
    llm.close()
    layers = list(layout.moe_layers)
    assert seen and stats["predictor"] == "oracle" and stats["prefetch_depth"] == 2
    for position, layer, depth, out in seen:
        target = layers.index(layer) + depth
        if target < len(layers):
            assert sorted(out.tolist()) == sorted(trace.ids[position % 64, target].tolist())
        else:
            assert len(out) == 0
    total = stats["total"]
    assert total["prefetches"] > 0 and total["prefetch_wasted"] == 0
    # the same tokens and logits as without prefetch
    plain = Llama(str(fixture_path), route_injector=trace_injector(path, fixture_path), memory_budget="50%",
                  n_ctx=256, verbose=False)
    tokens2, rows2 = greedy(plain, PROMPT, N)
    plain.close()
    assert tokens == tokens2 and np.array_equal(rows, rows2)

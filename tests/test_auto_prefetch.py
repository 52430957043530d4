"""predictor="auto" (cache.auto): gate lookahead watched on the first decoded tokens, then prefetch on where its
recall passes the crossover and reads leave compute time to hide in, off elsewhere; the output never changes."""
import numpy as np
import pytest

from edgemoe_llamacpp.cache import auto
from edgemoe_llamacpp.cache.auto import CROSSOVER_RECALL, AutoLookahead
from edgemoe_llamacpp.cache.predict import Lookahead, Predictor
from edgemoe_llamacpp.gguf.layout import read_layout


class Scripted(Predictor):
    """Guesses the next layer's true experts for the first `right` of k slots, wrong ones for the rest."""
    name = "scripted"

    def __init__(self, layout, truth, right):
        super().__init__(layout)
        self.truth, self.right, self.token = truth, right, 0

    def predict(self, layer, depth):
        true = self.truth[self.token, self.pos[layer] + depth]
        wrong = np.setdiff1d(np.arange(self.n_expert), true)
        return np.concatenate([true[: self.right], wrong[: len(true) - self.right]])


class FakeCache:
    def __init__(self):
        self.cost = {0: 1}
        self.prefetched = []

    def enable_prefetch(self, _):
        pass

    def prefetch(self, layer, experts):
        self.prefetched.append((layer, list(experts)))


def watch(fixture_path, monkeypatch, *, right, token_ms, wait_ms, tokens=24):
    """Decode `tokens` tokens of random routing through an AutoLookahead whose clock and stall are scripted: each
    token takes token_ms, of which wait_ms waiting for reads."""
    layout = read_layout(fixture_path)
    k, L = layout.n_expert_used, len(layout.moe_layers)
    rng = np.random.default_rng(0)
    truth = np.stack([[rng.permutation(layout.n_expert)[:k] for _ in range(L)] for _ in range(tokens)])
    predictor, cache = Scripted(layout, truth, right), FakeCache()
    clock = {"now": 0.0, "stall": 0.0}
    monkeypatch.setattr(auto.time, "perf_counter", lambda: clock["now"])
    decided = []
    la = AutoLookahead(Lookahead(predictor, cache, layout, depth=1), lambda: clock["stall"], decided.append, watch=8)
    la(layout.moe_layers[0], truth[0, :2].reshape(2, -1)[:, :k])          # a prompt batch: not watched
    for t in range(tokens):
        predictor.token = t
        for pos, layer in enumerate(layout.moe_layers):
            la(layer, truth[t, pos][None, :])
        clock["now"] += token_ms / 1e3
        clock["stall"] += wait_ms / 1e3
    return la, cache, decided


def test_on_where_recall_passes_and_reads_leave_compute_idle(fixture_path, monkeypatch):
    k = read_layout(fixture_path).n_expert_used
    la, cache, decided = watch(fixture_path, monkeypatch, right=k, token_ms=100, wait_ms=30)
    assert decided == [True] and la.decision["prefetch"] is True and la.state == "on"
    assert la.decision["recall"] == 1.0 and la.decision["read_wait_ms"] == pytest.approx(30)
    assert la.decision["compute_ms"] == pytest.approx(70) and la.decision["watched_tokens"] >= 8
    assert cache.prefetched                           # prefetching from the decision on
    assert la.depth == 1


@pytest.mark.parametrize(("right", "token_ms", "wait_ms", "reason"), [
    (0, 100, 30, "below the crossover"),              # wrong guesses
    ("all", 100, 1, "nothing to hide"),               # reads wait 1% of the token
    ("all", 100, 60, "the disk is the bottleneck"),  # reads wait longer than computing takes
])
def test_off_elsewhere(fixture_path, monkeypatch, right, token_ms, wait_ms, reason):
    k = read_layout(fixture_path).n_expert_used
    la, cache, decided = watch(fixture_path, monkeypatch, right=k if right == "all" else right, token_ms=token_ms,
                               wait_ms=wait_ms)
    assert decided == [False] and la.state == "off" and reason in la.decision["why"]
    assert not cache.prefetched and la.depth == 0


def test_recall_is_the_share_of_right_guesses(fixture_path, monkeypatch):
    k = read_layout(fixture_path).n_expert_used
    la, _, _ = watch(fixture_path, monkeypatch, right=k // 2, token_ms=100, wait_ms=30)
    assert la.decision["recall"] == pytest.approx((k // 2) / k)
    assert la.decision["prefetch"] is ((k // 2) / k >= CROSSOVER_RECALL)


@pytest.mark.runtime
def test_auto_keeps_tokens_and_logits_and_reports_its_decision(fixture_path):
    from edgemoe_llamacpp import Llama
    from edgemoe_llamacpp.engine.generate import greedy

    runs, python_calls = {}, {}
    for predictor in (None, "auto"):
        llm = Llama(str(fixture_path), memory_budget="25%", predictor=predictor, n_ctx=256, verbose=False)
        runs[predictor] = greedy(llm, "import os\nimport sys\n\n\ndef ", 40), llm.edgemoe_stats()
        python_calls[predictor] = llm.edgemoe.hook.calls
        llm.close()
    (tokens, logits), stats = runs["auto"]
    assert tokens == runs[None][0][0] and np.array_equal(logits, runs[None][0][1])
    decision = stats["auto_prefetch"]
    assert stats["predictor"] == "auto" and isinstance(decision["prefetch"], bool) and decision["why"]
    assert 0 <= decision["recall"] <= 1 and decision["watched_tokens"] >= 8
    assert (stats["total"]["prefetches"] > 0) is decision["prefetch"]
    assert stats["routes"] == runs[None][1]["routes"]
    if not decision["prefetch"]:        # off: resident layers pass in C again, as with no predictor at all
        assert python_calls[None] < python_calls["auto"] < stats["routes"]


@pytest.mark.runtime
def test_auto_is_the_default_and_without_a_budget_prefetches_nothing(fixture_path):
    from edgemoe_llamacpp import Llama

    llm = Llama(str(fixture_path), n_ctx=128, verbose=False)
    llm.create_completion("import os\n", max_tokens=4)
    stats = llm.edgemoe_stats()
    llm.close()
    assert stats["predictor"] == "auto"
    assert stats["auto_prefetch"] == {"prefetch": False, "why": "every expert stays resident: nothing to prefetch"}
    assert stats["total"]["prefetches"] == 0 and stats["hook_native_filter"]

"""Memory pressure beyond the budget (cache/reclaim.py), on the real llama.cpp and the trained fixture: pages of
experts the cache holds are taken from under it, as the kernel's reclaim takes them when the budget and
llama.cpp's other memory do not fit the device. The cache must notice from llama.cpp's page faults, release what
was taken, give up that much of its capacity, and compute the same tokens and logits as stock throughout."""
import numpy as np
import pytest

from edgemoe_llamacpp.cache import reclaim
from edgemoe_llamacpp.engine.generate import greedy, last_logits
from edgemoe_llamacpp.engine.llama import Llama, stock_llama

PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    "
N_TOKENS = 24


def take_from_under(llm) -> int:
    """Drop the pages of every expert the cache holds without telling it (what reclaim does); the bytes taken."""
    cache = llm.edgemoe.cache
    cache.storage.settle()
    held = [u for u in cache.ledger.resident if u not in cache.inflight]
    cache.storage.drop_spans([s for u in held for s in cache.storage.spans[u]])
    return sum(cache.storage.cost[u] for u in held)


@pytest.fixture(scope="module")
def stock_greedy(fixture_path):
    stock = stock_llama(fixture_path, use_extra_bufts=False, n_ctx=256, verbose=False)
    out = greedy(stock, PROMPT, N_TOKENS)
    stock.close()
    return out


@pytest.mark.parametrize(("where", "budget"), [("decode", "50%"), ("prompt", "50%"), ("decode", "100%")])
def test_experts_taken_from_under_the_cache_are_found_released_and_given_up(fixture_path, stock_greedy, where,
                                                                            budget):
    """Decode: the next token's faults on the taken pages make the cache look before the token after. A prompt: a
    batch's faults make it look at its next MoE layer. Either way the ledger agrees with mincore afterwards, the
    capacity is lower by what was taken (never below one layer's chosen experts), and the output is stock's. A
    budget that holds every expert gives way too."""
    want_tokens, want_logits = stock_greedy
    llm = Llama(str(fixture_path), memory_budget=budget, n_ctx=256, verbose=False)
    cache = llm.edgemoe.cache
    capacity = cache.capacity
    tokens = llm.tokenize(PROMPT.encode())
    if where == "decode":
        llm.eval(tokens)
        assert cache.check_reclaim() == 0                        # nothing taken: no look (no faults)
        taken = take_from_under(llm)
        got, rows = [], [last_logits(llm)]
        for _ in range(N_TOKENS):
            got.append(int(rows[-1].argmax()))
            llm.eval([got[-1]])
            rows.append(last_logits(llm))
        assert got == want_tokens
        np.testing.assert_array_equal(np.stack(rows), want_logits)
    else:
        llm.eval(tokens[:8])
        taken = take_from_under(llm)
        llm.eval(tokens[8:])                  # one batch of the rest: its layers meet the taken experts
    stats = llm.edgemoe_stats()
    cache.storage.settle()
    still_missing = reclaim.missing_bytes(cache.storage, list(cache.ledger.resident))
    llm.close()
    t = stats["total"]
    assert taken > 0 and t["reclaimed"] > 0 and 0 < t["reclaimed_bytes"] <= taken
    assert stats["capacity_given_up_bytes"] == capacity - cache.capacity > 0
    assert cache.capacity >= cache.min_budget
    assert still_missing == {}                                  # every expert the ledger holds is in memory


def test_faults_that_are_not_the_caches_make_it_look_less_often(fixture_path, monkeypatch):
    """Compute faults with every held expert still in memory (a dense page, another mapping): nothing is released,
    the capacity stays, and the next look waits for twice as many faults."""
    llm = Llama(str(fixture_path), memory_budget="50%", n_ctx=256, verbose=False)
    cache = llm.edgemoe.cache
    llm.eval(llm.tokenize(PROMPT.encode()))
    capacity, faults = cache.capacity, cache._compute_faults()
    monkeypatch.setattr(cache, "_compute_faults", lambda: faults + reclaim.RECLAIM_FAULTS)
    assert cache.check_reclaim() == 0
    assert cache.capacity == capacity and cache._faults_step == 2 * reclaim.RECLAIM_FAULTS
    llm.close()


def test_missing_bytes_counts_the_pages_taken_expert_by_expert(fixture_path):
    """One page taken from one held expert, two from another: missing_bytes names those two, with their bytes, and
    no other (the same mincore, asked per expert, agrees)."""
    from edgemoe_llamacpp import pages

    llm = Llama(str(fixture_path), memory_budget="50%", n_ctx=256, verbose=False)
    cache = llm.edgemoe.cache
    llm.eval(llm.tokenize(PROMPT.encode()))
    cache.storage.settle()
    held = sorted(cache.ledger.resident)
    assert len(held) > 4 and reclaim.missing_bytes(cache.storage, held) == {}
    one, two = held[1], held[-2]
    (_, b), *_ = cache.storage.spans[one]
    cache.storage.drop_spans([(b - pages.PAGE, b)])
    *_, (c, _) = cache.storage.spans[two]
    cache.storage.drop_spans([(c, c + 2 * pages.PAGE)])
    got = reclaim.missing_bytes(cache.storage, held)
    by_expert = {u for u in held if not cache.storage.in_memory(u)}
    llm.close()
    assert got == {one: pages.PAGE, two: 2 * pages.PAGE} and set(got) == by_expert

"""The hook and the residency manager on the real llama.cpp and the trained fixture."""
import ctypes
import os
import re
import shutil
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from synthetic import write_gguf

from edgemoe_llamacpp import limits, pages, runtime
from edgemoe_llamacpp.cache.residency import parse_budget, tensor_span
from edgemoe_llamacpp.engine.generate import greedy
from edgemoe_llamacpp.engine.hook import read_ids
from edgemoe_llamacpp.engine.llama import Llama, llama_params, stock_llama
from edgemoe_llamacpp.errors import BudgetError, NotMoEError
from edgemoe_llamacpp.gguf.layout import read_layout

PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    "
N_TOKENS = 64


def test_same_tokens_and_logits_as_stock_at_25_percent(fixture_path):
    stock = stock_llama(fixture_path, use_extra_bufts=False, n_ctx=256, verbose=False)
    want_tokens, want_logits = greedy(stock, PROMPT, N_TOKENS)
    stock.close()
    llm = Llama(str(fixture_path), memory_budget="25%", n_ctx=256, verbose=False)
    tokens, logits = greedy(llm, PROMPT, N_TOKENS)
    total = llm.edgemoe_stats()["total"]
    llm.close()
    assert len(set(want_tokens)) > 10 and np.ptp(want_logits[-1]) > 1    # real text, real logits
    assert tokens == want_tokens
    np.testing.assert_array_equal(logits, want_logits)     # every step, including the final logits
    assert total["misses"] > 0 and total["bytes_evicted"] > 0


def expert_pages_in_memory(layout, base: int) -> int:
    """Bytes of expert tensor pages the kernel reports resident, computed here from the layout alone."""
    return sum(pages.resident_bytes(base + a, b - a)
               for a, b in (tensor_span(t.offset, t.nbytes) for t in layout.expert_tensors))


@pytest.mark.parametrize("fresh_copy", [False, True], ids=["fixture", "just-written-copy"])
def test_budget_holds_by_mincore_after_every_token(fixture_path, tmp_path, fresh_copy):
    if fresh_copy:       # its pages are dirty in the page cache, as after a download or a git clone
        path = tmp_path / "copy.gguf"
        shutil.copyfile(fixture_path, path)
    else:
        path = fixture_path
    layout = read_layout(path)
    llm = Llama(str(path), memory_budget="25%", n_ctx=256, verbose=False)
    (start, _, offset, _), = pages.file_mappings(path)[:1]
    base = start - offset
    budget = llm.edgemoe_stats()["budget_bytes"]
    # the load's large folios straddling a tensor edge are split at start-up (848 KB of this file's expert
    # pages stayed pinned before): every expert page can be dropped, and the cache starts empty
    pinned = llm.edgemoe_stats()["pinned_edge_bytes"]
    assert pinned == 0
    assert expert_pages_in_memory(layout, base) == 0
    seen = []
    for i, _ in enumerate(llm.generate(llm.tokenize(PROMPT.encode()), temp=0.0)):
        seen.append(expert_pages_in_memory(layout, base))
        if i + 1 == N_TOKENS:
            break
    stats = llm.edgemoe_stats()
    llm.close()
    assert max(seen) <= budget, (max(seen), budget, pinned)      # pinned edge pages included
    assert max(seen) >= budget // 2          # the measurement sees the experts the cache holds
    assert stats["total"]["misses"] > 0 and stats["total"]["bytes_evicted"] > 0
    assert stats["resident_expert_bytes"] <= budget


def test_strided_ids_are_the_routers_top_k(fixture_path):
    """Independent check of read_ids: the chosen ids are the top-k of the router probabilities."""
    layout = read_layout(fixture_path)
    probs: dict[int, np.ndarray] = {}
    checked = []

    def cb(t, ask, _):
        name = ctypes.string_at(t + runtime.T_NAME, runtime.GGML_MAX_NAME).split(b"\0", 1)[0]
        m = re.fullmatch(rb"ffn_moe_(probs|topk)-(\d+)", name)
        if ask:
            return m is not None
        layer = int(m.group(2))
        if name.startswith(b"ffn_moe_probs-"):
            ne = (ctypes.c_int64 * 2).from_address(t + runtime.T_NE)
            data = ctypes.c_void_p.from_address(t + runtime.T_DATA).value
            probs[layer] = np.ctypeslib.as_array((ctypes.c_float * (ne[0] * ne[1])).from_address(data)) \
                .reshape(ne[1], ne[0]).copy()
        else:
            ids = read_ids(t)
            top = np.argsort(-probs[layer], axis=1, kind="stable")[:, : layout.n_expert_used]
            checked.append((ids.shape, np.array_equal(np.sort(ids, 1), np.sort(top, 1))))
        return True

    callback = llama_cpp.ggml_backend_sched_eval_callback(cb)
    with llama_params(use_extra_bufts=False, cb_eval=callback):
        llm = llama_cpp.Llama(str(fixture_path), n_ctx=256, verbose=False)
    llm.eval(llm.tokenize(PROMPT.encode()))     # a prompt batch: T rows, stride n_expert * 4
    llm.eval([llm.tokenize(b" x")[0]])          # one token
    llm.close()
    assert len(checked) == 2 * layout.n_layer
    assert checked[0][0][0] > 1 and checked[-1][0] == (1, layout.n_expert_used)
    assert all(ok for _, ok in checked)


def test_budget_smaller_than_a_layer_is_refused(fixture_path):
    with pytest.raises(BudgetError, match="cannot hold one layer"):
        Llama(str(fixture_path), memory_budget="100KB", verbose=False)


def test_not_moe_is_refused(tmp_path):
    path = write_gguf(tmp_path / "dense.gguf", "llama", {"block_count": 1}, {"token_embd.weight": (64, 32)})
    with pytest.raises(NotMoEError):
        Llama(str(path), memory_budget="50%", verbose=False)


@pytest.mark.parametrize(("text", "want"), [
    ("50%", 500), ("100%", 1000), ("1KiB", 1024), ("1.5kb", 1500), ("2MB", 2_000_000), ("3GiB", 3 * 2**30),
    (4096, 4096), (None, None), ("none", None)])
def test_parse_budget(text, want):
    assert parse_budget(text, expert_bytes=1000) == want


@pytest.mark.parametrize("text", ["-1", "abc", "200%", "0", "5 parsecs", "0%"])
def test_parse_budget_rejects(text):
    with pytest.raises(BudgetError):
        parse_budget(text, expert_bytes=1000)


def test_policies_same_output_and_distance_reads_less_than_lru(fixture_path):
    """The policy changes what is read, never what is computed."""
    runs = {}
    for policy in ("lru", "distance"):
        llm = Llama(str(fixture_path), memory_budget="25%", policy=policy, n_ctx=256, verbose=False)
        runs[policy] = greedy(llm, PROMPT, N_TOKENS), llm.edgemoe_stats()["total"]
        llm.close()
    (tok_lru, logits_lru), lru = runs["lru"]
    (tok_dist, logits_dist), dist = runs["distance"]
    assert tok_lru == tok_dist
    np.testing.assert_array_equal(logits_lru, logits_dist)
    assert dist["bytes_fetched"] < lru["bytes_fetched"], (dist, lru)


def test_package_exports_the_drop_in():
    import edgemoe_llamacpp

    assert edgemoe_llamacpp.Llama is Llama and issubclass(Llama, llama_cpp.Llama)


def test_memory_limit_below_dense_weights_is_refused_up_front(fixture_path, monkeypatch):

    layout = read_layout(fixture_path)
    monkeypatch.setattr(limits, "memory_limit", lambda: layout.dense_bytes // 2)
    with pytest.raises(BudgetError, match="dense weights"):
        Llama(str(fixture_path), memory_budget="50%", verbose=False)


def test_memory_limit_reads_this_process_cgroup():

    limit = limits.memory_limit()
    assert limit is None or 0 < limit < limits.UNLIMITED


@pytest.fixture(scope="module")
def stock_greedy(fixture_path):
    stock = stock_llama(fixture_path, use_extra_bufts=False, n_ctx=256, verbose=False)
    try:
        return greedy(stock, PROMPT, N_TOKENS)
    finally:
        stock.close()


@pytest.mark.parametrize(("policy", "predictor", "depth"), [
    ("lfu", None, 1), ("hobbit", None, 1), ("distance", "gate", 1), ("hobbit", "gate", 3),
    ("lru", "table", 2), ("lfu", "frequency", 3)])
def test_policies_and_prefetch_leave_tokens_and_logits_unchanged(fixture_path, stock_greedy, policy, predictor,
                                                                  depth):
    want_tokens, want_logits = stock_greedy
    llm = Llama(str(fixture_path), memory_budget="25%", policy=policy, predictor=predictor, prefetch_depth=depth,
                n_ctx=256, verbose=False)
    tokens, logits = greedy(llm, PROMPT, N_TOKENS)
    total = llm.edgemoe_stats()["total"]
    llm.close()
    assert tokens == want_tokens
    np.testing.assert_array_equal(logits, want_logits)
    assert total["misses"] > 0 and total["bytes_evicted"] > 0
    if predictor is not None:       # prefetches happened, some were used, some were wasted
        assert total["prefetches"] > 0 and total["prefetch_used"] > 0 and total["prefetch_wasted"] > 0
        assert total["prefetch_used"] + total["prefetch_wasted"] <= total["prefetches"]


class Measured(Llama):
    """After every layer's routing, fetch and prefetch: the expert pages the kernel reports in memory."""

    def __init__(self, *args, **kwargs):
        self.seen = []
        super().__init__(*args, **kwargs)
        route = self.edgemoe.on_route

        def on_route(layer, ids, hidden=None, weights=None):
            route(layer, ids, hidden, weights)
            self.seen.append(self.measure())

        self.edgemoe.on_route = on_route

    def measure(self):
        return expert_pages_in_memory(self.edgemoe.layout, self.edgemoe.cache.base)


@pytest.mark.parametrize("depth", [1, 3])
def test_budget_holds_by_mincore_after_every_layer_with_prefetch(fixture_path, depth):
    llm = Measured(str(fixture_path), memory_budget="25%", predictor="gate", prefetch_depth=depth, n_ctx=256,
                   verbose=False)
    seen = llm.seen
    budget = llm.edgemoe_stats()["budget_bytes"]
    for i, _ in enumerate(llm.generate(llm.tokenize(PROMPT.encode()), temp=0.0)):
        if i + 1 == N_TOKENS:
            break
    stats = llm.edgemoe_stats()
    llm.close()
    total = stats["total"]
    assert total["prefetches"] > N_TOKENS and total["prefetch_used"] > N_TOKENS // 2, total
    assert len(seen) == N_TOKENS * len(llm.edgemoe.layout.moe_layers)    # the prompt, then N_TOKENS - 1 tokens
    assert max(seen) <= budget, (max(seen), budget)
    assert max(seen) >= budget // 2


def mapped_fraction(base: int, spans) -> float:
    """Share of the pages in `spans` (file offsets, mapped at base) that are in this process's page table
    (/proc/self/pagemap's present bit): mapped, not merely in the page cache."""
    numbers = [(base + a) // pages.PAGE + i for a, b in spans for i in range((b - a) // pages.PAGE)]
    with open("/proc/self/pagemap", "rb") as f:
        present = 0
        for page in numbers:
            f.seek(page * 8)
            present += int.from_bytes(f.read(8), "little") >> 63
    return present / len(numbers)


def test_overlapped_reads_leave_the_mapping_to_llama_cpps_faults(fixture_path):
    """A miss returns once its reads are queued: its pages are not yet in llama.cpp's page table, and the layer's
    own page faults map them as it computes (waiting for pages still being read). Waiting for every read maps
    them all before the layer runs. The tokens and logits are the same either way."""
    out = {}
    for overlap in (True, False):
        llm = Llama(str(fixture_path), memory_budget="25%", n_ctx=256, verbose=False)
        cache = llm.edgemoe.cache
        cache.overlap_reads = overlap
        fetch, mapped = cache.storage.fetch, []

        def watched(uids, *, wait=True, fetch=fetch, mapped=mapped, cache=cache):
            n = fetch(uids, wait=wait)
            mapped.append(mapped_fraction(cache.base, [s for u in uids for s in cache.storage.spans[u]]))
            return n

        cache.storage.fetch = watched
        out[overlap] = (*greedy(llm, PROMPT, 16), mapped)
        llm.close()
    (tokens, logits, mapped), (want_tokens, want_logits, waited) = out[True], out[False]
    assert len(mapped) > 10 and len(waited) > 10
    assert min(waited) == 1.0                         # waited for: every page mapped before the layer runs
    assert np.median(mapped) < 0.1                    # queued: llama.cpp maps them itself
    assert tokens == want_tokens
    np.testing.assert_array_equal(logits, want_logits)


def test_a_sigint_during_an_evaluation_is_deferred_to_its_end():
    """What sigint_deferred promises, in-process: the signal calls on_sigint where it lands (no KeyboardInterrupt
    inside the body, where a ctypes callback would swallow it) and is raised once the body ends."""
    import os
    import signal

    from edgemoe_llamacpp.engine.interrupt import sigint_deferred

    seen, after = [], []
    # Python's own handler, as an interactive run has it (a job started in the background has SIGINT ignored)
    started_with = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), sigint_deferred(lambda: seen.append("stop")):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):        # Python runs the handler at its next instructions: it must not raise here
                sum(range(10))
            after.append(list(seen))
        assert after == [["stop"]] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, started_with)


def test_a_sigint_stops_the_evaluation_at_the_next_layer_and_leaves_the_llama_as_it_was(fixture_path):
    """SIGINT while a budgeted Llama evaluates: llama.cpp stops after the layer the hook was in (no later layer
    is routed), KeyboardInterrupt is raised, n_tokens stays where it was, and the Llama generates as before."""
    import os
    import signal

    llm = Llama(str(fixture_path), memory_budget="25%", n_ctx=256, verbose=False)
    want = greedy(llm, PROMPT, 8)[0]
    tokens = llm.tokenize(PROMPT.encode())
    llm.reset()
    llm.eval(tokens[:3])
    hook, routed = llm.edgemoe.hook, []
    on_route = hook.on_route

    def interrupting(layer, *args):
        routed.append(layer)
        os.kill(os.getpid(), signal.SIGINT)
        on_route(layer, *args)

    hook.on_route = interrupting
    started_with = signal.signal(signal.SIGINT, signal.default_int_handler)    # as in the test above
    try:
        with pytest.raises(KeyboardInterrupt):
            llm.eval(tokens[3:])
    finally:
        signal.signal(signal.SIGINT, started_with)
    hook.on_route = on_route
    assert len(routed) == 1 and llm.n_tokens == 3
    assert greedy(llm, PROMPT, 8)[0] == want
    llm.close()


@pytest.mark.parametrize("make", [lambda path: Llama(path, memory_budget="25%", n_ctx=64),
                                  lambda path: stock_llama(path, n_ctx=64)], ids=["edgemoe", "stock"])
def test_a_sigint_while_a_llama_loads_stops_the_load_and_is_raised(fixture_path, make):
    """SIGINT landing in llama.cpp's log callback as the model loads (verbose=True, the default: the CLI contract
    found it at `edgemoe serve`): KeyboardInterrupt is raised once the constructor returns, not printed and
    swallowed by ctypes, and llama.cpp stops at its next progress report, before any context is made."""
    import signal

    from llama_cpp import _logger

    lines = []

    @llama_cpp.llama_log_callback
    def interrupting(_level, text, _user_data):
        if not lines:
            os.kill(os.getpid(), signal.SIGINT)
        lines.append(text.decode(errors="replace"))

    started_with = signal.signal(signal.SIGINT, signal.default_int_handler)    # as in the tests above
    llama_cpp.llama_log_set(interrupting, ctypes.c_void_p(0))
    try:
        with pytest.raises(KeyboardInterrupt):
            make(str(fixture_path))
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        signal.signal(signal.SIGINT, started_with)
    assert lines and not any("llama_context" in line for line in lines), "".join(lines)[-2000:]
    llm = Llama(str(fixture_path), memory_budget="25%", n_ctx=64, verbose=False)      # and the next load is whole
    assert len(greedy(llm, PROMPT, 4)[0]) == 4
    llm.close()


LONG_PROMPT = Path(os.__file__).read_text()[:3000]       # some 900 tokens of real Python: two prompt batches


@pytest.mark.parametrize("budget", ["25%", "50%"])
def test_a_long_prompt_reads_each_next_layer_ahead_with_tokens_and_logits_unchanged(fixture_path, budget):
    """A prompt of several batches at a budget: every MoE layer after the first of a batch finds its experts read
    ahead (one request while the layer before computed), the budget holds by mincore after every layer, and the
    tokens and logits are stock's."""
    stock = stock_llama(fixture_path, use_extra_bufts=False, n_ctx=1024, verbose=False)
    want_tokens, want_logits = greedy(stock, LONG_PROMPT, 8)
    stock.close()
    llm = Measured(str(fixture_path), memory_budget=budget, n_ctx=1024, verbose=False)
    tokens, logits = greedy(llm, LONG_PROMPT, 8)
    seen = llm.seen
    llm.close()
    assert tokens == want_tokens
    np.testing.assert_array_equal(logits, want_logits)
    llm = Measured(str(fixture_path), memory_budget=budget, n_ctx=1024, verbose=False)
    prompt = llm.tokenize(LONG_PROMPT.encode())
    llm.eval(prompt)                                  # the prompt alone, in batches of 512
    stats = llm.edgemoe_stats()
    seen += llm.seen
    layers = llm.edgemoe.layout.moe_layers
    llm.close()
    assert len(prompt) > 512
    assert max(seen) <= stats["budget_bytes"]
    # each batch read every layer but its first ahead, as much as the budget leaves beside the layer computing:
    # most of those layers' experts were found read ahead, few missed
    later = [x for x in stats["layers"] if x["layer"] in layers[1:]]
    used, missed = sum(x["prefetch_used"] for x in later), sum(x["misses"] for x in later)
    assert used >= 3 * missed, later
    assert all(x["prefetch_used"] > 0 for x in later), later

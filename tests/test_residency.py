"""The cache's incremental policies choose the victims the old sort chose, on invented routing and on the
fixture's routing recorded through llama.cpp; and a batch's policy work does not grow with the experts held.

`SortingCache` is the reference: the bookkeeping and eviction order of ExpertCache as they were before the
policies became incremental (ensure, prefetch, _evict_to, _eviction_order, _keep_score, _hobbit_score copied
from edgemoe_llamacpp/residency.py at 419ab44), with storage taken out, and since extended as the cache was:
a prompt batch counts each expert once per token that chose it (decayed by the token's age), and "nextuse"
sorts by its estimated next use. It sorts every resident expert for each eviction. One difference, deliberate: a layer's chosen experts are visited in the order asked; the old
code iterated a set (hash order). That order only decides which of the experts chosen at the same step counts
as more recently used, a tie either way; the reference visits them in the new order too. (Replaying the
fixture with tools/policy_replay.py, the new code visiting in the old hash order gave all 252 figures of the
old code exactly; in the order asked, decode misses moved by 0.2% on average, at most 1.7%, either way.)
One tie resolves differently by construction, and these traces cannot reach it: "distance" orders a layer by
uses, the old sort by the float (weight + uses) / steps, which rounds two different counts to one value once
they are below 2**-53 of the weight (an expert unused for about 700 tokens); the old sort then fell back to
recency.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest

from edgemoe_bench.replay import ReplayCache, ReplayStorage, synthetic_layout
from edgemoe_llamacpp.cache.hobbit import HOBBIT_WEIGHTS
from edgemoe_llamacpp.cache.policies import POLICIES
from edgemoe_llamacpp.gguf.layout import ExpertUID
from edgemoe_llamacpp.pages import PAGE


class SortingCache:
    """The reference model (see the module docstring). Logs every eviction in `log`."""

    def __init__(self, new: ReplayCache):
        self.cost, self.capacity, self.min_budget = new.cost, new.capacity, new.min_budget
        self.substitute, self.policy = new.substitute, new.policy
        self.use_decay = getattr(new.eviction, "use_decay", 0.95)
        self.layer_pos = dict(new.layer_pos)
        self.resident: OrderedDict = OrderedDict()
        self.resident_bytes = 0
        self.uses, self.count, self.seq_count, self.last_use = {}, {}, {}, {}
        self.weight, self.step, self.current = 1.0, 0, 0
        self.inflight, self.unused, self.max_inflight = set(), set(), 0
        self._needed: set = set()
        self.log: list = []

    def ensure_ids(self, layer, ids, above=None):
        if len(ids) == 1:
            return self.ensure(layer, ids[0], above)
        ages: dict = {}                 # a prompt batch: each expert counted once per token that chose it
        for r, row in enumerate(ids.tolist()):
            for e in row:
                ages.setdefault(e, []).append(len(ids) - 1 - r)
        return self.ensure(layer, sorted(ages), above, ages)

    def ensure(self, layer, experts, above=None, ages=None):
        self.current = self.layer_pos[layer]
        if self.current == 0:
            self._next_token()
        self.step += 1
        low, needed = set(), {}
        for e in experts:
            uid = ExpertUID(layer, int(e))
            if (uid not in self.resident and above is not None and self.substitute is not None
                    and above.get(int(e), 0.0) > self.substitute and uid._replace(low=True) in self.cost):
                uid = uid._replace(low=True)
                low.add(int(e))
            needed[uid] = None
        self._needed = set(needed)
        missing = []
        for uid in needed:
            self._count_use(uid, ages[uid.expert] if ages else [0])
            if uid in self.resident:
                self.resident.move_to_end(uid)
                if uid in self.unused:
                    self.unused.discard(uid)
                    self.inflight.discard(uid)
            else:
                missing.append(uid)
        if missing:
            self._evict_to(self.capacity - sum(self.cost[u] for u in missing), keep=self._needed)
            for u in missing:
                self.resident[u] = self.cost[u]
                self.resident_bytes += self.cost[u]
        return low

    def _count_use(self, uid, ages):
        self.uses[uid] = self.uses.get(uid, 0.0) + self.weight * sum(self.use_decay ** a for a in ages)
        self.count[uid] = self.count.get(uid, 0) + len(ages)
        self.seq_count[uid] = self.seq_count.get(uid, 0) + len(ages)
        self.last_use[uid] = self.step

    def new_sequence(self):
        self.seq_count.clear()
        self.last_use.clear()

    def enable_prefetch(self, max_inflight):
        self.max_inflight = max_inflight

    def prefetch(self, layer, experts):
        if not self.max_inflight:
            return
        bound = min(self.max_inflight, self.capacity - self.min_budget)
        if bound <= 0:
            return
        self.inflight.clear()                    # _reap: a replayed read is done at once
        for e in experts:
            uid = ExpertUID(layer, int(e))
            if uid in self.resident:
                continue
            cost = self.cost[uid]
            if sum(self.cost[u] for u in self.inflight) + cost > bound:
                return
            if not self._evict_to(self.capacity - cost, keep=self._needed | set(self.inflight)):
                return
            self.resident[uid] = cost
            self.resident_bytes += cost
            self.unused.add(uid)
            self.inflight.add(uid)

    def _evict_to(self, target, keep):
        if self.resident_bytes <= target:
            return True
        order = self._eviction_order()
        order.sort(key=self.inflight.__contains__)
        for uid in order:
            if self.resident_bytes <= target:
                return True
            if uid in keep:
                continue
            self.evict(uid)
        return self.resident_bytes <= target

    def _eviction_order(self):
        if self.policy == "lru":
            return list(self.resident)
        if self.policy == "lfu":
            return sorted(self.resident, key=lambda u: self.count.get(u, 0))
        if self.policy == "hobbit":
            top = max(self.seq_count.values(), default=0)
            return sorted(self.resident, key=lambda u: self._hobbit_score(u, top))
        if self.policy == "nextuse":
            return sorted(self.resident, key=self._next_use_score)
        return sorted(self.resident, key=self._keep_score)

    def _next_token(self):
        self.weight /= self.use_decay
        if self.weight > 1e100:
            self.uses = {u: v / self.weight for u, v in self.uses.items()}
            self.weight = 1.0

    def _keep_score(self, uid):
        return (self.weight + self.uses.get(uid, 0.0)) / self._layer_steps(uid)

    def _next_use_score(self, uid):
        p = (1.0 - self.use_decay) * self.uses.get(uid, 0.0) / self.weight
        if p <= 0.0:
            return -math.inf
        return -(self._layer_steps(uid) + len(self.layer_pos) * (1.0 / p - 1.0))

    def _layer_steps(self, uid):
        n = len(self.layer_pos)
        return (self.layer_pos[uid[0]] - self.current) % n or n

    def _hobbit_score(self, uid, top):
        w_recency, w_freq, w_dist = HOBBIT_WEIGHTS
        recency = self.last_use.get(uid, 0) / self.step if self.step else 0.0
        freq = self.seq_count.get(uid, 0) / top if top else 0.0
        near = 1.0 - self._layer_steps(uid) / len(self.layer_pos)
        return w_recency * recency + w_freq * freq + w_dist * near

    def evict(self, uid):
        self.inflight.discard(uid)
        self.unused.discard(uid)
        self.resident_bytes -= self.resident.pop(uid)
        self.log.append(uid)


class LoggingCache(ReplayCache):
    """The cache under test, logging its evictions as the reference does."""

    def __init__(self, *args, **kwargs):
        self.log: list = []
        super().__init__(*args, **kwargs)
        self.headroom = 0           # the reference evicts only on a miss, as the cache did before evicting ahead

    def evict(self, uid):
        self.log.append(uid)
        super().evict(uid)


def invented_routing(rng, n_layers, n_expert, k, sequences, prompt, tokens):
    """Steps (layer, ids (T, k), new sequence?) with skewed, sticky choices: each layer favours a few experts
    and a token repeats some of the last token's."""
    steps = []
    popularity = rng.dirichlet(np.full(n_expert, 0.3), size=n_layers)
    for _ in range(sequences):
        last = [rng.choice(n_expert, k, replace=False, p=popularity[i]) for i in range(n_layers)]
        for t in range(tokens + 1):
            for i in range(n_layers):
                rows = []
                for _ in range(prompt if t == 0 else 1):
                    keep = [e for e in last[i] if rng.random() < 0.4]
                    p = popularity[i].copy()
                    p[keep] = 0
                    fresh = rng.choice(n_expert, k - len(keep), replace=False, p=p / p.sum())
                    last[i] = np.array(keep + fresh.tolist())
                    rows.append(last[i])
                steps.append((i, np.array(rows), t == 0 and i == 0))
    return steps


def replay_both(layout, budget, policy, steps, *, rng, depth=0, substitute=None, decay=None):
    """Run `steps` through the cache and the reference with the same prefetches and substitution weights;
    return both logs of evictions."""
    new = LoggingCache(layout, budget, policy=policy, substitute=substitute, use_decay=decay)
    old = SortingCache(new)
    k = layout.n_expert_used
    if depth:
        for cache in (new, old):
            cache.enable_prefetch(depth * k * max(new.cost.values()))
    layers = layout.moe_layers
    for s, (layer, ids, first) in enumerate(steps):
        if first:
            new.new_sequence()
            old.new_sequence()
        above = None
        if substitute is not None:
            above = {int(e): float(w) for e, w in zip(ids.ravel(), rng.random(ids.size))}
        assert new.ensure_ids(layer, ids, above) == old.ensure_ids(layer, ids, above)
        if depth and len(ids) == 1:
            for d in range(1, depth + 1):
                if s + d < len(steps) and layers.index(layer) + d < len(layers):
                    # a guess: the experts that layer will choose, one of them replaced by another
                    guess = steps[s + d][1][0].tolist()
                    guess[rng.integers(k)] = int(rng.integers(layout.n_expert))
                    new.prefetch(layers[layers.index(layer) + d], guess)
                    old.prefetch(layers[layers.index(layer) + d], guess)
        assert new.resident.keys() == old.resident.keys(), f"step {s}: resident sets differ"
    new.close()
    return new, old


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("fraction", [0.2, 0.5])
@pytest.mark.parametrize("depth", [0, 2])
def test_invented_routing_evicts_as_the_sorting_cache(policy, fraction, depth):
    rng = np.random.default_rng([POLICIES.index(policy), int(fraction * 10), depth])
    n_layers, n_expert, k = 6, 16, 2
    pages = rng.integers(1, 4, (n_layers, n_expert)).tolist()      # experts of different sizes
    layout = synthetic_layout(n_layers, n_expert, k, pages=pages)
    steps = invented_routing(rng, n_layers, n_expert, k, sequences=3, prompt=4, tokens=100)
    new, old = replay_both(layout, int(layout.expert_bytes * fraction), policy, steps, rng=rng, depth=depth)
    assert len(old.log) > 50
    assert new.log == old.log
    if depth:
        assert new.stats.total().prefetch_used > 0 and new.stats.total().prefetch_wasted > 0


@pytest.mark.parametrize("policy", POLICIES)
def test_substitution_evicts_as_the_sorting_cache(policy):
    rng = np.random.default_rng(7)
    layout = synthetic_layout(4, 16, 4, pages=rng.integers(2, 4, (4, 16)).tolist(), low_pages=1)
    steps = invented_routing(rng, 4, 16, 4, sequences=2, prompt=3, tokens=50)
    new, old = replay_both(layout, layout.expert_bytes // 3, policy, steps, rng=rng, depth=1, substitute=0.5)
    assert new.stats.total().substituted > 0 and len(old.log) > 100
    assert new.log == old.log


def test_distance_rescales_its_counts_and_still_evicts_as_the_sorting_cache():
    """A decay of 0.3 makes the weight of a use pass 1e100 after 191 tokens: the counts are rescaled."""
    rng = np.random.default_rng(3)
    layout = synthetic_layout(3, 8, 2)
    steps = invented_routing(rng, 3, 8, 2, sequences=1, prompt=2, tokens=250)
    new, old = replay_both(layout, layout.expert_bytes // 2, "distance", steps, rng=rng, decay=0.3)
    assert new.eviction.weight < 1e100 ** 0.5 and old.weight == new.eviction.weight
    assert new.log == old.log


@pytest.fixture(scope="module")
def fixture_routing(fixture_path):
    """Steps of two greedy completions of the fixture, recorded by the hook through the real llama.cpp."""
    from edgemoe_llamacpp.engine.generate import greedy
    from edgemoe_llamacpp.engine.llama import Llama

    llm = Llama(str(fixture_path), memory_budget=None, record_routing=True, n_ctx=256, verbose=False)
    steps = []
    for prompt in ("import os\nimport sys\n\n\ndef main(argv):\n    ", "class Parser:\n    def "):
        start = len(llm.edgemoe_trace())
        greedy(llm, prompt, 48)
        trace = llm.edgemoe_trace()[start:]
        steps += [(layer, np.array(ids), i == 0) for i, (layer, ids) in enumerate(trace)]
    layout = llm.edgemoe.layout
    llm.close()
    return layout, steps


@pytest.mark.parametrize("policy", POLICIES)
def test_fixture_routing_evicts_as_the_sorting_cache(fixture_routing, policy):
    layout, steps = fixture_routing
    assert sum(len(ids) > 1 for _, ids, _ in steps) >= 2       # prompt batches as well as decoding
    for fraction, depth in ((0.25, 0), (0.5, 1), (0.5, 3)):
        rng = np.random.default_rng(0)
        new, old = replay_both(layout, int(layout.expert_bytes * fraction), policy, steps, rng=rng, depth=depth)
        assert len(old.log) > 50
        assert new.log == old.log, (fraction, depth)


def test_a_prediction_evicted_for_an_earlier_one_is_read_again_as_before():
    """One walk of the order serves a whole prefetch as the old loop of evictions did: predicting (2, 8) then
    (2, 14) evicts the resident (2, 14) for (2, 8) under LRU and reads it back; a prediction there is no room
    for (3 pages beside a prompt batch's 6 in an 8-page budget) still evicts all it may, and reads nothing."""
    layout = synthetic_layout(3, 16, 2, pages=[[1] * 16, [1] * 16, [1] * 8 + [3] + [1] * 7])
    new = LoggingCache(layout, 8 * 4096, policy="lru")
    old = SortingCache(new)
    for cache in (new, old):
        cache.enable_prefetch(1 << 30)
        for layer, ids in ((2, [14, 1]), (0, [0, 1]), (1, [0, 1]), (0, [2, 3])):
            cache.ensure(layer, ids)                       # 8 pages, (2, 14) the least recently used
        cache.prefetch(2, [8, 14])
        cache.ensure(1, [2, 3, 4, 5, 6, 7])
        cache.prefetch(2, [8])
    assert new.log == old.log == [(2, 14, False), (2, 1, False), (0, 0, False), (0, 1, False),
                                  (1, 0, False), (1, 1, False), (0, 2, False), (0, 3, False), (2, 8, False),
                                  (2, 14, False)]
    assert new.stats.total().prefetches == 2 and new.resident_bytes == 6 * 4096


def miss_8(cache, step, rng):
    """Step `step` of a cycle through the layers: 8 experts of the layer that are not resident."""
    layer = step % len(cache.layer_pos)
    out = [e for e in range(cache.layout.n_expert) if (layer, e, False) not in cache.resident]
    cache.ensure(layer, rng.choice(out, 8, replace=False))


@pytest.mark.parametrize("policy", POLICIES)
def test_policy_work_per_ensure_does_not_grow_with_the_experts_held(policy):
    """A full cache at 50% of 48 layers x E experts, 8 misses a layer: the heap operations and scores one
    ensure costs stay under L + k log2 n and the same as n, the experts held, grows from 1k to 6k (the old
    sort: n log2 n, 77k at 6k). HOBBIT also orders the experts of a layer it evicts from: + 2 x n / L."""
    per_ensure = {}
    for n_expert in (42, 128, 256):
        layout = synthetic_layout(48, n_expert, 8)
        cache = ReplayCache(layout, layout.expert_bytes // 2, policy=policy)
        rng = np.random.default_rng(0)
        step = 0
        while cache.stats.total().bytes_evicted == 0 or step % 48:          # full, and a whole token more
            miss_8(cache, step, rng)
            step += 1
        ops = cache.eviction.ops
        for i in range(96):
            miss_8(cache, step + i, rng)
        n = len(cache.resident)
        per_ensure[n] = (cache.eviction.ops - ops) / 96
        assert per_ensure[n] < 48 + 8 * math.log2(n) + (2 * n / 48 if policy == "hobbit" else 0), per_ensure
    assert sorted(per_ensure) == [1008 - 8, 3072 - 8, 6144 - 8]     # less the headroom: one layer's 8 chosen
    if policy != "hobbit":
        assert max(per_ensure.values()) < 1.1 * min(per_ensure.values()), per_ensure


class DropCounting(ReplayStorage):
    """Counts the experts dropped on the hook's thread (drop) and handed to the drop thread (drop_later)."""

    def _open(self, threads, prefetch_threads):
        super()._open(threads, prefetch_threads)
        self.now, self.later = [], []

    def drop(self, uid, resident=()):
        self.now.append(uid)

    def drop_later(self, uids, resident=()):
        self.later.extend(uids)


@pytest.mark.parametrize("policy", POLICIES)
def test_room_for_the_next_layer_is_made_ahead_and_dropped_off_the_hook_thread(policy):
    """After every layer the cache holds at most its capacity less one layer's chosen experts, freed by the
    policy among the experts this layer did not choose; their pages go to the drop thread. A layer that misses
    no more than that then reads at once: nothing is dropped on the hook's thread."""
    layout = synthetic_layout(4, 16, 2)

    class Cache(ReplayCache):
        storage_class = DropCounting

    cache = Cache(layout, layout.expert_bytes // 2, policy=policy)
    assert cache.headroom == cache.min_budget == 2 * 4096
    rng = np.random.default_rng(0)
    for step in range(400):
        layer = step % 4
        ids = rng.choice(16, 2, replace=False)
        cache.ensure(layer, ids)
        assert all((layer, int(e), False) in cache.resident for e in ids)
        assert cache.resident_bytes <= cache.capacity - cache.headroom
    assert cache.storage.now == []
    assert len(cache.storage.later) == cache.stats.total().bytes_evicted // 4096 > 100
    cache.headroom = 0                              # evicting only on a miss: every drop on the hook's thread
    for step in range(400):
        cache.ensure(step % 4, rng.choice(16, 2, replace=False))
    assert len(cache.storage.now) > 100


def test_a_budget_that_holds_every_expert_keeps_no_room_and_evicts_nothing():
    """Room is made ahead only where eviction can happen: with every expert fitting, each is missed once, at
    its first use, and none is evicted."""
    layout = synthetic_layout(4, 16, 2)
    cache = ReplayCache(layout, layout.expert_bytes, policy="nextuse")
    assert cache.headroom == 0
    rng = np.random.default_rng(0)
    seen = set()
    for step in range(400):
        ids = rng.choice(16, 2, replace=False)
        cache.ensure(step % 4, ids)
        seen.update((step % 4, int(e)) for e in ids)
    assert cache.stats.total().bytes_evicted == 0
    assert cache.stats.total().misses == len(seen)


class SubmitCounting(ReplayStorage):
    """Counts read requests: one per expert (submit) or one for many (submit_many)."""

    def _open(self, threads, prefetch_threads):
        super()._open(threads, prefetch_threads)
        self.requests = []

    def submit_many(self, uids):
        self.requests.append(list(uids))
        return super().submit_many(uids)


class BatchCache(ReplayCache):
    storage_class = SubmitCounting


def test_a_prompt_batch_reads_the_next_layer_whole_in_one_request():
    layout = synthetic_layout(4, 16, 2)
    cache = BatchCache(layout, 40 * PAGE)
    ids = np.random.default_rng(0).integers(0, 16, (64, 2))     # 64 tokens: (14/16)^64 leaves out ~0.02%
    cache.ensure_ids(0, ids)
    cache.prefetch_batch(0, len(ids))
    assert cache.storage.requests == [[ExpertUID(1, e) for e in range(16)]]
    assert set(cache.inflight) == {ExpertUID(1, e) for e in range(16)}
    assert cache.resident_bytes <= cache.capacity
    cache.ensure_ids(1, ids)            # the next layer's experts are resident: hits, no demand read
    layer = cache.stats.layers[1]
    assert layer.misses == 0 and layer.prefetch_used == len(np.unique(ids))
    cache.prefetch_batch(3, len(ids))   # past the last layer: nothing
    cache.prefetch_batch(1, 4)          # a few tokens use few experts: nothing
    assert len(cache.storage.requests) == 1


def test_a_batch_reads_no_more_than_the_budget_leaves():
    layout = synthetic_layout(4, 16, 2)
    cache = BatchCache(layout, 24 * PAGE)
    ids = np.random.default_rng(1).integers(0, 16, (64, 2))
    cache.ensure_ids(0, ids)
    cache.prefetch_batch(0, len(ids))
    assert cache.resident_bytes <= cache.capacity
    assert all(u in cache.resident for u in cache._needed)      # this layer's experts were not evicted for it
    assert 0 < len(cache.storage.requests[0]) < 16


def test_an_expert_drops_no_edge_page_a_resident_neighbour_shares():
    """Experts that are not whole pages share an edge page with each neighbour: evicting one keeps that page while
    the neighbour is resident."""
    storage = ReplayStorage(synthetic_layout(1, 4, 1))
    a, b, c = (ExpertUID(0, e) for e in range(3))
    # as if each expert ran a page into the next: 0 [p, p+2P), 1 [p+P, p+3P), 2 [p+2P, p+4P)
    start = storage.spans[a][0][0]
    storage.spans = {u: [(start + i * PAGE, start + (i + 2) * PAGE)] for i, u in enumerate((a, b, c))}
    storage.edge_owners = {}
    for u, spans in storage.spans.items():
        for x, y in spans:
            storage.edge_owners.setdefault(x, []).append(u)
            storage.edge_owners.setdefault(y - PAGE, []).append(u)
    assert storage.unshared_spans(b, {}) == [(start + PAGE, start + 3 * PAGE)]
    assert storage.unshared_spans(b, {a: 1}) == [(start + 2 * PAGE, start + 3 * PAGE)]
    assert storage.unshared_spans(b, {a: 1, c: 1}) == []

"""Recorded routing replayed through the expert cache's real policies and predictors, without llama.cpp,
memory or storage: how many experts a budget misses, prefetches and wastes (tools/policy_replay.py).

A step is (layer, ids (T, k), hidden (T, n_embd) or None), in the order the hook saw them; one-token steps
are decoding. `ForesightCache` is the default policy told the exact routing of the next tokens: how far ahead
a predictor would have to see to approach Belady's floor. `synthetic_layout` makes a layout with no file
behind it, for replays of invented routing and for benchmarks of the bookkeeping.
"""
from __future__ import annotations

import contextlib
from concurrent.futures import Future

from edgemoe_llamacpp.cache.policies import Policy
from edgemoe_llamacpp.cache.predict import Lookahead, Predictor
from edgemoe_llamacpp.cache.residency import ExpertCache, make_policy
from edgemoe_llamacpp.cache.storage import ExpertStorage
from edgemoe_llamacpp.gguf.layout import ExpertTensor, ExpertUID, LowCopy, MoELayout
from edgemoe_llamacpp.pages import PAGE


def synthetic_layout(n_layers: int, n_expert: int, k: int, *, pages=None, low_pages: int = 0) -> MoELayout:
    """`n_layers` MoE layers of `n_expert` experts, top-`k`: one stacked tensor per layer, expert e of layer
    i taking pages[i][e] pages (default 1), in slots of the layer's largest; with `low_pages`, low-bit copies
    of that many pages each. Nothing is read from the path it names."""
    tensors, offset = [], PAGE
    for layer in range(n_layers):
        sizes = tuple(PAGE * (pages[layer][e] if pages else 1) for e in range(n_expert))
        stride = max(sizes)
        low = None
        if low_pages:
            low = LowCopy(offset + stride * n_expert, low_pages * PAGE, "Q2_K", low_pages * PAGE)
        tensors.append(ExpertTensor(f"blk.{layer}.ffn_exps.weight", layer, offset, stride * n_expert, stride, "F16",
                                    0, n_expert, ("F16",) * n_expert if pages else None, sizes if pages else None,
                                    low))
        offset += (stride + low_pages * PAGE) * n_expert
    expert_bytes = sum(t.stored_bytes for t in tensors)
    return MoELayout(path="<synthetic>", arch="synthetic", n_layer=n_layers, n_expert=n_expert, n_expert_used=k,
                     file_size=offset, data_offset=PAGE, dense_bytes=PAGE, expert_bytes=expert_bytes,
                     expert_tensors=tuple(tensors))


class ReplayStorage(ExpertStorage):
    """Pages and costs only: fetches and drops touch neither memory nor the file (which need not exist)."""

    def _open(self, threads, prefetch_threads):
        self.fds = []
        self.major_faults = 0

    def fetch(self, uids, *, wait=True):
        return sum(self.cost[u] for u in uids)

    def submit(self, uid):
        return self.submit_many([uid])

    def submit_many(self, uids):
        done = Future()
        done.set_result(sum(self.cost[u] for u in uids))
        return done

    def drop(self, uid, resident=()):
        pass

    def drop_later(self, uids, resident=()):
        pass

    def settle(self):
        pass

    def close(self):
        pass


class ReplayCache(ExpertCache):
    """The cache's bookkeeping and policy over ReplayStorage; `use_decay` for a decaying policy (None: its
    default)."""

    storage_class = ReplayStorage

    def __init__(self, *args, use_decay: float | None = None, **kwargs):
        self.use_decay = use_decay
        super().__init__(*args, **kwargs)

    def _make_policy(self, name):
        return make_policy(name, self.layer_pos, use_decay=self.use_decay)


class Foresight(Policy):
    """`inner`'s order, except that experts the next `horizon_steps` steps of `future` need go last,
    farthest next use first (Belady inside the horizon); `i` is the step being served."""

    def __init__(self, inner: Policy, future: list[set], horizon_steps: int):
        super().__init__(inner.layer_pos)
        self.inner, self.future, self.horizon_steps, self.i = inner, future, horizon_steps, 0

    def begin(self, pos):
        self.inner.begin(pos)

    def new_sequence(self):
        self.inner.new_sequence()

    def use(self, uid, n=1.0):
        self.inner.use(uid, n)

    def token_weights(self, ages):
        return self.inner.token_weights(ages)

    def add(self, uid):
        self.inner.add(uid)

    def remove(self, uid):
        self.inner.remove(uid)

    def clear(self):
        self.inner.clear()

    def order_key(self, uid):
        return self.inner.order_key(uid)

    def ranked(self):
        next_use: dict = {}
        for j in range(self.i + 1, min(len(self.future), self.i + 1 + self.horizon_steps)):
            for u in self.future[j]:
                next_use.setdefault(u, j)
        later = []
        with contextlib.closing(self.inner.ranked()) as order:
            for uid in order:
                if uid in next_use:
                    later.append(uid)
                else:
                    yield uid
        later.sort(key=lambda u: -next_use[u])      # stable: ties keep the inner order
        yield from later


class ForesightCache(ReplayCache):
    """The default policy with exact knowledge of the routing `horizon_steps` steps ahead."""

    def __init__(self, *args, future: list[set], horizon_steps: int, **kwargs):
        self.future, self.horizon_steps = future, horizon_steps
        super().__init__(*args, **kwargs)

    def _make_policy(self, name):
        return Foresight(super()._make_policy(name), self.future, self.horizon_steps)

    def ensure_ids(self, layer, ids, above=None):
        out = super().ensure_ids(layer, ids, above)
        self.eviction.i += 1
        return out


COUNTS = ("misses", "prefetches", "prefetch_wasted")


def replay(layout: MoELayout, budget: int, policy: str, steps: list, *, predictor: Predictor | None = None,
           depth: int = 0, use_decay: float | None = None, horizon: int = 0) -> dict:
    """Decode counts (one-token steps) over one recorded sequence: misses, prefetches, wasted prefetches.
    `horizon` > 0 replays ForesightCache seeing that many tokens ahead."""
    if horizon:
        future = [{ExpertUID(layer, int(e)) for e in ids.ravel()} for layer, ids, _ in steps]
        cache = ForesightCache(layout, budget, policy=policy, future=future, use_decay=use_decay,
                               horizon_steps=horizon * len(layout.moe_layers))
    else:
        cache = ReplayCache(layout, budget, policy=policy, use_decay=use_decay)
    ahead = Lookahead(predictor, cache, layout, depth) if predictor is not None else None
    out = dict.fromkeys(COUNTS, 0)
    for layer, ids, hidden in steps:
        before = cache.stats.total()
        cache.ensure_ids(layer, ids)
        if ahead is not None:
            ahead(layer, ids, hidden)
        if len(ids) == 1:
            after = cache.stats.total()
            for k in out:
                out[k] += getattr(after, k) - getattr(before, k)
    cache.close()
    return out

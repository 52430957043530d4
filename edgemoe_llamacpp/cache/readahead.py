"""Reads ahead of need: the experts a predictor expects in the next layers, and during a prompt batch the next
layer's experts (nearly all of which the batch uses). ExpertCache is a ReadAhead: this half owns the reads in
flight (`inflight`, `max_inflight`) and uses the cache's ledger, eviction order, storage, capacity, min_budget,
mode, layer positions, the experts the current layer needs (`_needed`) and `evict`."""
from __future__ import annotations

import contextlib
import time
from concurrent.futures import Future

from edgemoe_llamacpp.cache.ledger import LayerStats
from edgemoe_llamacpp.gguf.layout import ExpertUID

# a prompt batch reads a later layer's experts whole once it will use at least this share of them (expected)
BATCH_COVERAGE = 0.9


class ReadAhead:
    inflight: dict[ExpertUID, Future]       # prefetch reads not yet waited for
    max_inflight: int                       # bytes in flight at most; 0 = prefetch off

    def enable_prefetch(self, max_inflight: int) -> None:
        """Allow up to `max_inflight` bytes of prefetch reads at once (never more than the budget leaves
        beside the largest set of experts one layer may need). Nothing to prefetch without a budget, or with
        one that holds every expert."""
        if self.mode.streams:
            self.max_inflight = max_inflight

    def prefetch(self, layer: int, experts) -> None:
        """Start reading predicted `experts` of a later `layer` in the background, best first. Room is made by
        the policy, but never by evicting the experts the current layer needs or reads still in flight; the
        predictions from the first that does not fit (in flight at most, or in what eviction can free) on
        are dropped. One walk of the policy's order serves them all, as if each evicted in turn."""
        if not self.max_inflight:
            return
        bound = min(self.max_inflight, self.capacity - self.min_budget)
        if bound > 0:
            self._read_ahead(layer, experts, bound, together=False)

    def prefetch_batch(self, after: int, tokens: int) -> None:
        """A prompt batch of `tokens` tokens is computing MoE layer `after`: read the next MoE layer's experts now,
        in one pass of large sequential reads, if the batch will use nearly all of them (k of n experts per
        token: each is left out by all T tokens with probability (1 - k/n)^T; read when that is under
        BATCH_COVERAGE's complement). Room: the budget less the current layer's experts; never those or reads
        in flight."""
        k, n = self.layout.n_expert_used, self.layout.n_expert
        pos = self.layer_pos[after] + 1
        if not self.mode.streams or pos == len(self.layer_pos) or \
                (1 - k / n) ** tokens > 1 - BATCH_COVERAGE:
            return
        layer = self.layout.moe_layers[pos]
        bound = self.capacity - sum(self.storage.cost[u] for u in self._needed)
        if bound > 0:
            self._read_ahead(layer, range(n), bound, together=True)

    def _read_ahead(self, layer: int, experts, bound: int, *, together: bool) -> None:
        """prefetch's walk: `experts` of `layer` best first, up to `bound` bytes in flight; together=True reads them
        as one request (storage.submit_many) instead of one per expert."""
        self._reap()
        cost, resident = self.storage.cost, self.ledger.resident
        keep = self._needed | self.inflight.keys()
        in_flight = sum(cost[u] for u in self.inflight)
        held = self.ledger.resident_bytes          # less the victims so far, plus the predictions taken
        victims: dict[ExpertUID, None] = {}
        batch: dict[ExpertUID, None] = {}
        with contextlib.closing(self.eviction.ranked()) as order:
            for e in experts:
                uid = ExpertUID(layer, int(e))
                if uid in batch or (uid in resident and uid not in victims):
                    continue
                if in_flight + cost[uid] > bound:
                    break
                while held > self.capacity - cost[uid] and (v := next(order, None)) is not None:
                    if v not in keep:
                        victims[v] = None
                        held -= resident[v]
                if held > self.capacity - cost[uid]:
                    break
                batch[uid] = None
                held += cost[uid]
                in_flight += cost[uid]
        for uid in victims:
            self.evict(uid)
        for uid in batch:
            self.ledger.admit_prefetch(uid, cost[uid])
            self.eviction.add(uid)
        if together and batch:
            read = self.storage.submit_many(list(batch))
            self.inflight.update(dict.fromkeys(batch, read))
            return
        for uid in batch:
            self.inflight[uid] = self.storage.submit(uid)

    def _reap(self) -> None:
        for uid in [u for u, f in self.inflight.items() if f.done()]:
            self.inflight.pop(uid).result()

    def _wait(self, uid: ExpertUID, st: LayerStats) -> bool:
        """Wait for a prefetch of `uid` still in flight; True if llama.cpp had to wait."""
        fut = self.inflight.pop(uid, None)
        if fut is None:
            return False
        late = not fut.done()
        t0 = time.perf_counter()
        fut.result()
        st.stall_s += time.perf_counter() - t0
        return late

"""The expert cache's accounting: which experts the budget holds at what page cost, and what serving the
layers has cost (hits, misses, bytes fetched and evicted, stall seconds, prefetches used and wasted)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from edgemoe_llamacpp.gguf.layout import ExpertUID


@dataclass
class LayerStats:
    hits: int = 0
    misses: int = 0
    bytes_fetched: int = 0          # read on demand, while llama.cpp waits
    bytes_evicted: int = 0
    stall_s: float = 0.0            # the hook making room and fetching (reads overlapped: queuing them), and
                                    # waiting for prefetches still in flight
    evict_s: float = 0.0            # ... of which dropping victims to make room
    prefetches: int = 0             # experts read ahead on a prediction
    prefetch_bytes: int = 0
    prefetch_used: int = 0          # prefetched experts chosen before they were evicted
    prefetch_late: int = 0          # ... of which llama.cpp had to wait for the read to finish
    prefetch_wasted: int = 0        # prefetched experts evicted unused (mispredictions)
    prefetch_wasted_bytes: int = 0
    substituted: int = 0            # chosen experts that ran from their low-bit copies
    substituted_bytes: int = 0      # ... of which read, in bytes
    reclaimed: int = 0              # experts the cache held whose pages the kernel took (memory pressure)
    reclaimed_bytes: int = 0        # ... the bytes it took


@dataclass
class CacheStats:
    layers: dict[int, LayerStats] = field(default_factory=dict)

    def total(self) -> LayerStats:
        t = LayerStats()
        for s in self.layers.values():
            for f in fields(LayerStats):
                setattr(t, f.name, getattr(t, f.name) + getattr(s, f.name))
        return t


class Ledger:
    """Resident experts and their cost in bytes (what the budget counts, reads in flight included), and the
    per-layer statistics of serving them."""

    def __init__(self, layers, n_expert: int):
        self.resident: dict[ExpertUID, int] = {}
        self.resident_bytes = 0
        self.unused: set[ExpertUID] = set()          # prefetched, not chosen yet
        self.stats = CacheStats({layer: LayerStats() for layer in layers})
        # ready[layer, e] = 1: the full-precision expert is resident and read (the runtime's filter, patches/0005,
        # lets a layer whose chosen experts are all ready pass without calling the hook)
        self.ready = np.zeros((max(layers, default=-1) + 1, n_expert), dtype=np.uint8)

    def hit(self, uid: ExpertUID) -> bool:
        """`uid` was chosen and is resident; True if it is a prefetched expert's first use."""
        st = self.stats.layers[uid.layer]
        st.hits += 1
        if uid not in self.unused:
            return False
        self.unused.discard(uid)
        st.prefetch_used += 1
        self._mark(uid, 1)          # waited for by the caller
        return True

    def admit(self, uid: ExpertUID, cost: int, ready: bool = True) -> None:
        self.resident[uid] = cost
        self.resident_bytes += cost
        if ready:
            self._mark(uid, 1)

    def admit_prefetch(self, uid: ExpertUID, cost: int) -> None:
        """Counted from the start of its read: the budget covers reads in flight."""
        self.admit(uid, cost, ready=False)
        self.unused.add(uid)
        st = self.stats.layers[uid.layer]
        st.prefetches += 1
        st.prefetch_bytes += cost

    def release(self, uid: ExpertUID) -> None:
        cost = self.resident.pop(uid)
        self.resident_bytes -= cost
        self._mark(uid, 0)
        st = self.stats.layers[uid.layer]
        st.bytes_evicted += cost
        if uid in self.unused:
            self.unused.discard(uid)
            st.prefetch_wasted += 1
            st.prefetch_wasted_bytes += cost

    def clear(self) -> None:
        """Nothing is resident (the statistics stay)."""
        self.resident.clear()
        self.unused.clear()
        self.resident_bytes = 0
        self.ready[...] = 0

    def _mark(self, uid: ExpertUID, ready: int) -> None:
        if not uid.low:
            self.ready[uid.layer, uid.expert] = ready

    def kept_bytes(self, uids) -> int:
        """Resident bytes of those of `uids` that are resident."""
        return sum(self.resident[u] for u in uids if u in self.resident)

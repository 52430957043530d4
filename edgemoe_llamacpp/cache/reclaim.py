"""Memory pressure beyond the budget: the kernel reclaiming pages of experts the cache counts as resident.

The budget is what the user allows the experts; the device (its RAM, or the cgroup's memory limit) must hold it
beside everything else the process needs. When that does not fit (a long prompt's compute buffers, a larger KV
cache, another process), the kernel reclaims file pages, and the cache's experts are file pages. An expert the
ledger holds and the kernel took is read back by llama.cpp's page faults one page at a time (the expert ranges are
MADV_RANDOM): a prompt of 2048 tokens prefilled at 0.6x stock that way, with a million single-page faults.

So the cache watches for it, cheaply: page faults taken while llama.cpp computes (the process's major faults less
those of the cache's own reads) are the sign. When they grow, one mincore pass over the resident experts finds what
the kernel took; those experts are released (read again in large requests when next chosen) and the capacity
drops by the bytes taken, so the cache holds no more than the device lets it. ExpertCache is a Reclaim: this
half uses its ledger, storage, capacity, min_budget, mode, reads in flight (`inflight`) and `evict`."""
from __future__ import annotations

import bisect
import logging
import resource

import numpy as np

from edgemoe_llamacpp import pages
from edgemoe_llamacpp.cache.storage import ExpertStorage
from edgemoe_llamacpp.gguf.layout import ExpertUID

log = logging.getLogger(__name__)

# compute faults since the last look that make the cache look (pages; doubled each time it finds nothing taken)
RECLAIM_FAULTS = 256
MINCORE_GAP = 0              # missing_bytes asks the kernel for pages between two spans this close


class Reclaim:
    reclaimed_capacity = 0                      # bytes the capacity gave up to memory pressure
    _faults_seen: int | None = None             # compute faults at the last look; None: not watching (no budget)
    _faults_step = RECLAIM_FAULTS

    def watch_reclaim(self) -> None:
        """Start counting compute faults from now (after the load, which reads the dense weights)."""
        self._faults_seen = self._compute_faults()

    def _compute_faults(self) -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_majflt - self.storage.major_faults

    def check_reclaim(self) -> int:
        """If llama.cpp took page faults since the last look, find the experts the kernel reclaimed, release them
        and lower the capacity by the bytes taken (never below one layer's chosen experts). The bytes taken.
        A budget that holds every expert (BudgetMode.HOLDS_ALL) evicts from then on, as the capacity asks."""
        if self._faults_seen is None:           # no budget: the kernel's mapping serves the experts
            return 0
        faults = self._compute_faults()
        if faults - self._faults_seen < self._faults_step:
            return 0
        self._faults_seen = faults
        self.storage.settle()                   # drops in flight are of released experts: none is counted twice
        lost = missing_bytes(self.storage, [u for u in self.ledger.resident if u not in self.inflight])
        if not lost:
            self._faults_step *= 2              # the faults are not the cache's (a dense page, say): look less often
            return 0
        self._faults_step = RECLAIM_FAULTS
        taken = sum(lost.values())
        for uid, missing in lost.items():
            st = self.ledger.stats.layers[uid.layer]
            st.reclaimed += 1
            st.reclaimed_bytes += missing
            self.evict(uid)
        capacity = max(self.min_budget, self.capacity - taken)
        if capacity < self.capacity:
            if not self.reclaimed_capacity:
                log.warning("memory pressure: the kernel reclaimed %.0f MiB of the experts the cache held (the memory "
                            "budget and llama.cpp's other memory do not fit what this process may use); the cache "
                            "now holds at most %.0f MiB", taken / 2**20, capacity / 2**20)
            self.reclaimed_capacity += self.capacity - capacity
            self.capacity = capacity
        return taken


def missing_bytes(storage: ExpertStorage, uids) -> dict[ExpertUID, int]:
    """Those of `uids` (experts of `storage`) with pages not in memory, and how many bytes of theirs are missing:
    one mincore call per run of their pages in one tensor (spans at most MINCORE_GAP apart joined: the kernel's
    time is per page asked, so scattered experts are asked for alone)."""
    tensors = sorted(storage.tensor_spans.values())
    starts = [a for a, _ in tensors]
    by_tensor: dict[int, list[tuple[int, int, ExpertUID]]] = {}
    for uid in uids:
        for a, b in storage.spans[uid]:
            if b > a:
                by_tensor.setdefault(bisect.bisect_right(starts, a) - 1, []).append((a, b, uid))
    runs: list[tuple[int, int]] = []            # (first byte, end) of each mincore call
    first, end, owners = [], [], []             # each span's first and end page in the calls' pages, end to end
    at = 0
    for spans in by_tensor.values():
        spans.sort()
        for i, (a, b, uid) in enumerate(spans):
            if not i or a - runs[-1][1] > MINCORE_GAP:
                at += (runs[-1][1] - runs[-1][0]) // pages.PAGE if runs else 0
                runs.append((a, b))
            runs[-1] = (runs[-1][0], max(runs[-1][1], b))
            first.append(at + (a - runs[-1][0]) // pages.PAGE)
            end.append(at + (b - runs[-1][0]) // pages.PAGE)
            owners.append(uid)
    present = np.frombuffer(pages.mincore_runs([(storage.address(a), b - a) for a, b in runs]), np.uint8) & 1
    counted = np.concatenate(([0], np.cumsum(present, dtype=np.int64)))
    first_a, end_a = np.array(first, dtype=np.int64), np.array(end, dtype=np.int64)
    gone = (end_a - first_a) - (counted[end_a] - counted[first_a])
    out: dict[ExpertUID, int] = {}
    for i in np.flatnonzero(gone):
        out[owners[i]] = out.get(owners[i], 0) + int(gone[i]) * pages.PAGE
    return out

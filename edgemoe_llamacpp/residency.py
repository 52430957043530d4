"""The expert cache: which experts are resident, the memory budget, fetch and evict.

An expert is resident when the page-cache pages of its byte ranges are. Fetching reads those exact
ranges (readahead(2) of each range, then MADV_POPULATE_READ on llama.cpp's mapping from parallel threads;
`pread` where that is unavailable; adjacent ranges merged so a prompt batch reads a layer sequentially); evicting
drops the pages from llama.cpp's mapping (`MADV_DONTNEED`) and from the page cache (`POSIX_FADV_DONTNEED`).
Costs are counted in whole pages, the unit the kernel keeps, so `mincore` can check the bookkeeping.
All madvise/fadvise calls of the project live here.
"""
from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields

from . import runtime
from .errors import ArgumentError, BudgetError
from .layout import LOWBIT, MoELayout

log = logging.getLogger(__name__)

ExpertUID = tuple   # (layer, expert), or (layer, expert, LOW) for its low-bit copy
LOW = "low"
READ_CHUNK = 1 << 20          # one pread asks for at most this: full disk speed, little buffer memory
POLICIES = ("distance", "lru", "lfu", "hobbit")
# "distance" forgets: each token, earlier uses count this much less. Chosen by replaying the routing of 40
# windows of held-out text at 25% and 50% budgets (tools/policy_replay.py --validation 40 --decays):
# 0.95 missed the fewest of {0.8, 0.9, 0.95, 0.98} (50%: 4.55 misses/token against 4.68 at 0.9).
USE_DECAY = 0.95
# "hobbit": keep priority = weighted recency + frequency + nearness of the expert's layer, each in [0, 1],
# counted from the start of the sequence (HOBBIT's multidimensional cache, without its precision term).
HOBBIT_WEIGHTS = (1.0, 1.0, 1.0)     # (recency, frequency, layer distance)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


def parse_budget(value: str | float | None, expert_bytes: int) -> int | None:
    """Bytes from 123, "800MB", "1.5GiB" or "50%" (of expert bytes); None or "none" for no limit."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        n = float(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%|[a-zA-Z]*)\s*", str(value))
        if not m:
            raise BudgetError(f"memory budget {value!r} is not a size (e.g. 800MB, 1.5GiB) or a percentage")
        number, unit = float(m.group(1)), m.group(2).lower()
        if unit == "%":
            if number > 100:
                raise BudgetError(f"memory budget {value!r} is over 100% of the expert bytes")
            n = number / 100 * expert_bytes
        elif unit in _UNITS:
            n = number * _UNITS[unit]
        else:
            raise BudgetError(f"memory budget {value!r} has an unknown unit {m.group(2)!r}")
    if not math.isfinite(n):
        raise BudgetError(f"memory budget {str(value)[:40]!r} is not a finite size")
    if n <= 0:
        raise BudgetError(f"memory budget {str(value)[:40]!r} must be positive")
    return int(n)


@dataclass
class LayerStats:
    hits: int = 0
    misses: int = 0
    bytes_fetched: int = 0          # read on demand, while llama.cpp waits
    bytes_evicted: int = 0
    stall_s: float = 0.0            # llama.cpp waiting for fetches, and for prefetches still in flight
    prefetches: int = 0             # experts read ahead on a prediction
    prefetch_bytes: int = 0
    prefetch_used: int = 0          # prefetched experts chosen before they were evicted
    prefetch_late: int = 0          # ... of which llama.cpp had to wait for the read to finish
    prefetch_wasted: int = 0        # prefetched experts evicted unused (mispredictions)
    prefetch_wasted_bytes: int = 0
    substituted: int = 0            # chosen experts that ran from their low-bit copies
    substituted_bytes: int = 0      # ... of which read, in bytes


@dataclass
class CacheStats:
    layers: dict[int, LayerStats] = field(default_factory=dict)

    def total(self) -> LayerStats:
        t = LayerStats()
        for s in self.layers.values():
            for f in fields(LayerStats):
                setattr(t, f.name, getattr(t, f.name) + getattr(s, f.name))
        return t


def tensor_span(offset: int, size: int) -> tuple[int, int]:
    """The whole pages inside a tensor. A page it shares with a neighbour tensor counts as dense: dropping it
    would make the neighbour fault, and the fault's read-around would pull experts back in."""
    return -(-offset // runtime.PAGE) * runtime.PAGE, (offset + size) // runtime.PAGE * runtime.PAGE


def clip(span: tuple[int, int], bounds: tuple[int, int]) -> tuple[int, int]:
    a = max(span[0], bounds[0])
    return a, max(a, min(span[1], bounds[1]))


class ExpertCache:
    """Resident experts under a byte budget, evicted by a policy, fetched/dropped in llama.cpp's file mapping."""

    def __init__(self, layout: MoELayout, budget: int | None, *, policy: str = "distance", threads: int = 4,
                 prefetch_threads: int = 2, substitute: float | None = None):
        if policy not in POLICIES:
            raise ArgumentError(f"unknown cache policy {policy!r}; choose from {', '.join(POLICIES)}")
        self.layout = layout
        self.budget = budget
        self.policy = policy
        self.substitute = substitute       # run a missed expert low when the experts above it weigh more
        self.base = 0                                 # address of file offset 0 in llama.cpp's mapping
        # Fetch into llama.cpp's mapping (readahead + MADV_POPULATE_READ): the experts arrive mapped and
        # referenced, so memory pressure reclaims other pages first, and no copy is made. Measured under a
        # 50% cgroup limit: 4.5 tok/s and 2,408 major faults/token against 3.2 and 4,334 with pread.
        self.populate = True
        self.fd = os.open(layout.path, os.O_RDONLY)
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)   # our reads: exact ranges, no readahead
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="edgemoe-fetch")
        self._local = threading.local()
        self.resident: OrderedDict[ExpertUID, int] = OrderedDict()   # uid -> page cost, LRU first
        self.uses: dict[ExpertUID, float] = {}      # times chosen, older tokens weigh less ("distance")
        self.weight = 1.0                           # what one use counts now: grows by 1/use_decay a token
        self.use_decay = USE_DECAY
        self.count: dict[ExpertUID, int] = {}       # times chosen ("lfu")
        self.seq_count: dict[ExpertUID, int] = {}   # times chosen in this sequence ("hobbit")
        self.last_use: dict[ExpertUID, int] = {}    # the step of the last choice in this sequence ("hobbit")
        self.step = 0                               # layer evaluations so far
        # prefetch: reads in flight on their own threads (so demand fetches never queue behind them)
        self.prefetch_pool = ThreadPoolExecutor(max_workers=prefetch_threads, thread_name_prefix="edgemoe-pre")
        self.inflight: dict[ExpertUID, Future] = {}
        self.unused: set[ExpertUID] = set()         # prefetched, not chosen yet
        self.max_inflight = 0                       # bytes in flight at most; 0 = prefetch off
        self._needed: set[ExpertUID] = set()        # the experts of the layer llama.cpp is about to compute
        self.layer_pos = {layer: i for i, layer in enumerate(layout.moe_layers)}
        self.current = 0                                                # position of the layer being served
        self.resident_bytes = 0
        self.stats = CacheStats({layer: LayerStats() for layer in layout.moe_layers})
        self.tensor_spans = {t.name: tensor_span(t.offset, t.nbytes) for t in layout.expert_tensors}
        self.tensor_spans |= {LOWBIT + t.name: tensor_span(t.low.offset, t.low.stride * t.count)
                              for t in layout.expert_tensors if t.low is not None}
        self.pinned_edge_bytes = 0    # edge pages the kernel would not drop (see drop_all): counted as dense
        self._set_spans()
        # the least a budget must hold: the largest experts one token can choose in one layer
        k = layout.n_expert_used
        self.min_budget = max(sum(sorted(c for uid, c in self.cost.items() if uid[0] == layer and len(uid) == 2)[-k:])
                              for layer in layout.moe_layers)
        if budget is not None and budget >= layout.expert_bytes:
            # every expert may be resident; page rounding counts pages shared by two experts twice
            self.budget = budget = max(budget, self._all_experts_cost())
        self.capacity = budget          # what eviction holds experts to (the budget less pinned pages)
        if budget is None or budget >= self.full_cost:
            self.substitute = None      # nothing is ever missed for long: every expert runs at full precision
        if budget is not None and budget < self.min_budget:
            self.close()                # the file and the reader threads are already open
            raise BudgetError(f"memory budget {budget:,} bytes cannot hold one layer's {layout.n_expert_used} "
                              f"chosen experts ({self.min_budget:,} bytes)")

    def _set_spans(self) -> None:
        """Each expert's pages (whole pages inside its tensor's span) and their cost."""
        self.spans: dict[ExpertUID, list[tuple[int, int]]] = {}
        self.cost: dict[ExpertUID, int] = {}
        for x in self.layout.experts:
            spans = [clip(runtime.page_span(r.offset, r.size), self.tensor_spans[r.tensor]) for r in x.ranges]
            self.spans[(x.layer, x.expert)] = spans
            self.cost[(x.layer, x.expert)] = sum(b - a for a, b in spans)
        self.full_cost = sum(self.cost.values())
        for (layer, e), ranges in self.layout.low_experts.items():
            spans = [clip(runtime.page_span(r.offset, r.size), self.tensor_spans[r.tensor]) for r in ranges]
            self.spans[(layer, e, LOW)] = spans
            self.cost[(layer, e, LOW)] = sum(b - a for a, b in spans)

    def attach(self, mapping_base: int, mapped: tuple[int, int] | None = None) -> None:
        """Bind to llama.cpp's mapping of the file. A budget that holds every expert keeps what the load
        read; a smaller one starts empty (a partial keep would leave large page-cache folios straddling
        kept and dropped experts, resident but unaccounted)."""
        self.base = mapping_base
        self.mapped = mapped or (0, self.layout.file_size)     # the file bytes llama.cpp keeps mapped
        if self.budget is None:
            return
        if self.budget >= self._all_experts_cost():
            self._drop([s for name, s in self.tensor_spans.items() if name.startswith(LOWBIT)])
            for uid in self.spans:
                if len(uid) == 2 and self._in_memory(uid):
                    self.resident[uid] = self.cost[uid]
                    self.resident_bytes += self.cost[uid]
        else:
            self.drop_all()

    def _all_experts_cost(self) -> int:
        """Every expert at full precision (low-bit copies are never needed then)."""
        return self.full_cost

    def _in_memory(self, uid: ExpertUID) -> bool:
        return all(runtime.resident_bytes(self.base + a, b - a) == b - a for a, b in self.spans[uid])

    # ------------------------------------------------------------------ the hook's calls
    def ensure_ids(self, layer: int, ids, above: dict[int, float] | None = None) -> set[int]:
        """`ids` is the (tokens, k) array of a topk node; a prompt batch asks for its union."""
        return self.ensure(layer, ids[0] if len(ids) == 1 else sorted(set(ids.ravel().tolist())), above)

    def ensure(self, layer: int, experts, above: dict[int, float] | None = None) -> set[int]:
        """Make `experts` of `layer` resident before llama.cpp computes them; evict by the policy to fit.

        With substitution on and `above` (expert -> gate weight ranked above it, substitute.weight_above), a
        missed expert above the threshold is served by its low-bit copy. Returns the experts served low."""
        st = self.stats.layers[layer]
        self.current = self.layer_pos[layer]
        if self.current == 0:
            self._next_token()
        self.step += 1
        low = set()
        self._needed = set()
        for e in experts:
            uid = (layer, int(e))
            if (uid not in self.resident and above is not None and self.substitute is not None
                    and above.get(int(e), 0.0) > self.substitute and (layer, int(e), LOW) in self.cost):
                uid = (layer, int(e), LOW)
                low.add(int(e))
            self._needed.add(uid)
        st.substituted += len(low)
        missing = []
        for uid in self._needed:
            self._count_use(uid)
            if uid in self.resident:
                self.resident.move_to_end(uid)
                st.hits += 1
                if uid in self.unused:
                    self.unused.discard(uid)
                    st.prefetch_used += 1
                    st.prefetch_late += self._wait(uid, st)
            else:
                missing.append(uid)
        if not missing:
            return low
        st.misses += len(missing)
        need = sum(self.cost[u] for u in missing)
        if self.budget is not None:    # with no limit, llama.cpp's mapping serves first touches: just count
            t0 = time.perf_counter()
            self._evict_to(self.capacity - need, keep=self._needed)
            st.bytes_fetched += self._fetch(missing)
            st.substituted_bytes += sum(self.cost[u] for u in missing if len(u) == 3)
            st.stall_s += time.perf_counter() - t0
        for u in missing:
            self.resident[u] = self.cost[u]
        self.resident_bytes += need
        return low

    def _count_use(self, uid: ExpertUID) -> None:
        self.uses[uid] = self.uses.get(uid, 0.0) + self.weight
        self.count[uid] = self.count.get(uid, 0) + 1
        self.seq_count[uid] = self.seq_count.get(uid, 0) + 1
        self.last_use[uid] = self.step

    def new_sequence(self) -> None:
        """A new prompt: per-sequence statistics ("hobbit") start again."""
        self.seq_count.clear()
        self.last_use.clear()

    # ------------------------------------------------------------------ prefetch
    def enable_prefetch(self, max_inflight: int) -> None:
        """Allow up to `max_inflight` bytes of prefetch reads at once (never more than the budget leaves
        beside the largest set of experts one layer may need). Nothing to prefetch without a budget, or with
        one that holds every expert."""
        if self.budget is not None and self.budget < self._all_experts_cost():
            self.max_inflight = max_inflight

    def prefetch(self, layer: int, experts) -> None:
        """Start reading predicted `experts` of a later `layer` in the background, best first. Room is made by
        the policy, but never by evicting the experts the current layer needs or reads still in flight; a
        prediction that does not fit under the in-flight bound is dropped."""
        if not self.max_inflight:
            return
        bound = min(self.max_inflight, self.capacity - self.min_budget)
        if bound <= 0:
            return
        self._reap()
        st = self.stats.layers[layer]
        for e in experts:
            uid = (layer, int(e))
            if uid in self.resident:
                continue
            cost = self.cost[uid]
            if sum(self.cost[u] for u in self.inflight) + cost > bound:
                return
            if not self._evict_to(self.capacity - cost, keep=self._needed | set(self.inflight)):
                return
            self.resident[uid] = cost            # counted now: the budget covers reads in flight
            self.resident_bytes += cost
            self.unused.add(uid)
            self.inflight[uid] = self._submit_prefetch(uid)
            st.prefetches += 1
            st.prefetch_bytes += cost

    def _submit_prefetch(self, uid: ExpertUID) -> Future:
        return self.prefetch_pool.submit(self._read_expert, uid)

    def _read_expert(self, uid: ExpertUID) -> int:
        chunks = self._chunks([uid])
        try:
            if self.populate:
                for off, size in chunks:
                    runtime.readahead(self.fd, off, size)
                return sum(self._populate(c) for c in chunks)
        except OSError as e:
            log.debug("prefetch of %s by mapping failed (%s): pread", uid, e)
        return sum(self._read(c) for c in chunks)

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

    # ------------------------------------------------------------------ fetch and evict
    def _chunks(self, uids: list[ExpertUID]) -> list[tuple[int, int]]:
        spans = sorted(s for u in uids for s in self.spans[u])
        merged: list[list[int]] = []
        for a, b in spans:                      # adjacent experts of one tensor become one sequential read
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        return [(off, min(READ_CHUNK, b - off)) for a, b in merged for off in range(a, b, READ_CHUNK)]

    def _fetch(self, uids: list[ExpertUID]) -> int:
        chunks = self._chunks(uids)
        if self.populate:
            try:
                for off, size in chunks:       # queue every read at once, then map them as they land
                    runtime.readahead(self.fd, off, size)
                return sum(self.pool.map(self._populate, chunks))
            except OSError as e:               # MADV_POPULATE_READ needs Linux 5.14
                log.warning("mapped fetch unavailable (%s): reading with pread", e)
                self.populate = False
        return sum(self.pool.map(self._read, chunks))

    def _populate(self, chunk: tuple[int, int]) -> int:
        off, size = chunk
        runtime.madvise(self.base + off, size, runtime.MADV_POPULATE_READ)
        return size

    def _read(self, chunk: tuple[int, int]) -> int:
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = bytearray(READ_CHUNK)
        off, size = chunk
        return os.preadv(self.fd, [memoryview(buf)[:size]], off)

    def _evict_to(self, target: int, keep: set[ExpertUID]) -> bool:
        """Evict by the policy until `target` bytes are resident, sparing `keep`; False if it cannot."""
        if self.resident_bytes <= target:
            return True
        order = self._eviction_order()
        order.sort(key=self.inflight.__contains__)      # reads in flight last: evicting one waits for it
        for uid in order:
            if self.resident_bytes <= target:
                return True
            if uid in keep:
                continue
            self.evict(uid)
        return self.resident_bytes <= target

    def _eviction_order(self) -> list[ExpertUID]:
        """Resident experts, first to evict first. Sorts are stable over the LRU order, so ties go LRU."""
        if self.policy == "lru":
            return list(self.resident)
        if self.policy == "lfu":
            return sorted(self.resident, key=lambda u: self.count.get(u, 0))
        if self.policy == "hobbit":
            top = max(self.seq_count.values(), default=0)
            return sorted(self.resident, key=lambda u: self._hobbit_score(u, top))
        return sorted(self.resident, key=self._keep_score)

    def _next_token(self) -> None:
        """Decay every use count by use_decay at once by making new uses weigh more."""
        self.weight /= self.use_decay
        if self.weight > 1e100:
            self.uses = {u: v / self.weight for u, v in self.uses.items()}
            self.weight = 1.0

    def _keep_score(self, uid: ExpertUID) -> float:
        """Layers run in a cycle, so an expert's next chance of use is when its layer next runs: keep the
        often-chosen experts of layers coming soon (Belady's rule with frequency standing in for the future).
        The layer being served is `current`; it runs again after a full cycle."""
        return (self.weight + self.uses.get(uid, 0.0)) / self._layer_steps(uid)

    def _layer_steps(self, uid: ExpertUID) -> int:
        """MoE layers until the expert's layer runs again (the current one: a whole cycle)."""
        n = len(self.layer_pos)
        return (self.layer_pos[uid[0]] - self.current) % n or n

    def _hobbit_score(self, uid: ExpertUID, top: int) -> float:
        """HOBBIT's keep priority: recency, frequency in this sequence (`top`: the highest count), and
        nearness of the expert's layer."""
        w_recency, w_freq, w_dist = HOBBIT_WEIGHTS
        recency = self.last_use.get(uid, 0) / self.step if self.step else 0.0
        freq = self.seq_count.get(uid, 0) / top if top else 0.0
        near = 1.0 - self._layer_steps(uid) / len(self.layer_pos)
        return w_recency * recency + w_freq * freq + w_dist * near

    def evict(self, uid: ExpertUID) -> None:
        fut = self.inflight.pop(uid, None)
        if fut is not None and not fut.cancel():
            fut.result()                 # a read still running would map the pages again after the drop
        cost = self.resident.pop(uid)
        self.resident_bytes -= cost
        st = self.stats.layers[uid[0]]
        st.bytes_evicted += cost
        if uid in self.unused:
            self.unused.discard(uid)
            st.prefetch_wasted += 1
            st.prefetch_wasted_bytes += cost
        self._drop(self.spans[uid])

    def _drop(self, spans) -> None:
        for a, b in spans:
            runtime.madvise(self.base + a, b - a, runtime.MADV_DONTNEED)
            runtime.fadvise_dontneed(self.fd, a, b - a)

    def drop_all(self) -> None:
        """Start-up: release every expert page the load pulled in; the cache starts empty."""
        runtime.flush(self.fd)      # dirty pages (a file just written or copied) cannot be dropped
        whole = list(self.tensor_spans.values())
        self._drop(whole)
        self._split_edge_folios(whole)
        # Whatever edge pages still would not drop (a folio another process maps, say) stay resident for good:
        # count them as dense and leave them out of every expert's span.
        for name, (a, b) in self.tensor_spans.items():
            vec = runtime.mincore_pages(self.base + a, b - a)
            lead = min(len(vec) - len(vec.lstrip(b"\x01")), runtime.MAX_FOLIO_PAGES)
            trail = min(len(vec) - len(vec.rstrip(b"\x01")), runtime.MAX_FOLIO_PAGES, len(vec) - lead)
            self.tensor_spans[name] = (a + lead * runtime.PAGE, b - trail * runtime.PAGE)
            self.pinned_edge_bytes += (lead + trail) * runtime.PAGE
        self._set_spans()
        # those pages are expert-file pages in memory: they come out of the budget
        self.capacity = self.budget - self.pinned_edge_bytes
        if self.capacity < self.min_budget:
            raise BudgetError(f"memory budget leaves {self.capacity:,} bytes for experts after "
                              f"{self.pinned_edge_bytes:,} bytes of edge pages the kernel keeps; one layer's "
                              f"chosen experts need {self.min_budget:,}")
        # Faults on expert pages read the page, no read-around: over the whole tensors, edge pages included.
        # Those stay resident only as long as the kernel keeps their folio (reclaim may take it later); a fault
        # on one then reads that page alone, not a read-ahead window of neighbouring experts (8 MB here).
        for a, b in whole:
            runtime.madvise(self.base + a, b - a, runtime.MADV_RANDOM)
        self.resident.clear()
        self.resident_bytes = 0

    def _split_edge_folios(self, spans: list[tuple[int, int]]) -> None:
        """The load reads the file in large page-cache folios (up to 2 MiB, naturally aligned); one that
        straddles a tensor edge stays mapped for its dense part and cannot be dropped. Unmap and drop the
        aligned block around each edge, then read its dense pages back one page at a time (this fd reads
        without readahead): the block's folios then end at the edge, and its expert pages can be dropped."""
        block = runtime.MAX_FOLIO_PAGES * runtime.PAGE
        edges = {x for span in spans for x in span if x % block}
        for x in sorted(edges):
            lo, hi = clip((x // block * block, x // block * block + block), self.mapped)
            dense = [(lo, hi)]
            for a, b in spans:
                dense = [piece for c, d in dense for piece in ((c, min(d, a)), (max(c, b), d)) if piece[0] < piece[1]]
            self._drop([(lo, hi)])
            for a, b in dense:
                for off in range(a, b, READ_CHUNK):
                    os.pread(self.fd, min(READ_CHUNK, b - off), off)
            runtime.madvise(self.base + lo, hi - lo, runtime.MADV_RANDOM)

    # ------------------------------------------------------------------ measurement
    def measured_resident_bytes(self) -> int:
        """Expert bytes in memory as the kernel reports them (mincore over every expert tensor)."""
        return sum(runtime.resident_bytes(self.base + a, b - a) for a, b in self.tensor_spans.values())

    def summary(self) -> dict:
        tot = self.stats.total()
        lookups = tot.hits + tot.misses
        return {
            "budget_bytes": self.budget, "policy": self.policy, "resident_expert_bytes": self.resident_bytes,
            "substitute": self.substitute, "lowbit_type": self.layout.lowbit_type,
            "resident_experts": len(self.resident), "expert_bytes": self.layout.expert_bytes,
            "pinned_edge_bytes": self.pinned_edge_bytes,
            "total": {**asdict(tot), "hit_rate": tot.hits / lookups if lookups else None},
            "layers": [{"layer": layer, **asdict(s)} for layer, s in self.stats.layers.items()],
        }

    def close(self) -> None:
        self.prefetch_pool.shutdown(wait=True, cancel_futures=True)
        self.pool.shutdown(wait=True)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

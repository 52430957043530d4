"""The expert cache: which experts are resident under the memory budget, fetched on demand and ahead of time,
evicted by a policy.

`ExpertCache` is the face the hook, Llama and the tools see; the work is in three parts:
    storage.py        each expert's pages; fetch, drop, mincore, the start-up drop (ExpertStorage)
    policies.py       which resident expert goes first (LRU, LFU, distance; HOBBIT in hobbit.py)
    ledger.py         resident experts and their cost, hits, misses, bytes, stall time (Ledger, CacheStats)
The cache chooses victims once per batch (one `ensure`, one `prefetch`) from the policy's incremental order.
"""
from __future__ import annotations

import enum
import logging
import math
import re
import time
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from edgemoe_llamacpp.cache.hobbit import Hobbit
from edgemoe_llamacpp.cache.ledger import Ledger
from edgemoe_llamacpp.cache.policies import LFU, LRU, POLICIES, USE_DECAY, Distance, NextUse, Policy
from edgemoe_llamacpp.cache.readahead import ReadAhead
from edgemoe_llamacpp.cache.reclaim import Reclaim
from edgemoe_llamacpp.cache.spans import tensor_span
from edgemoe_llamacpp.cache.storage import ExpertStorage
from edgemoe_llamacpp.errors import ArgumentError, BudgetError
from edgemoe_llamacpp.gguf.layout import ExpertUID, MoELayout

# what callers import from here: the cache, its options and the page arithmetic tests check it with
__all__ = ["DEFAULT_POLICY", "POLICIES", "USE_DECAY", "Budget", "BudgetMode", "ExpertCache", "ExpertUID",
           "make_policy", "parse_budget", "read_budget", "tensor_span"]
log = logging.getLogger(__name__)

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


@dataclass(frozen=True)
class Budget:
    """A memory budget as given: a size in bytes, or a share of the model's expert bytes (`share`, in (0, 1])."""

    size: float | None = None
    share: float | None = None

    def bytes_for(self, expert_bytes: int) -> int:
        return int(self.size if self.share is None else self.share * expert_bytes)


def read_budget(value: str | float | None) -> Budget | None:
    """The budget of 123, "800MB", "1.5GiB" or "50%" (of the expert bytes); None or "none" for no limit. An empty
    string is refused: an unset variable or a lost argument must not silently lift the limit."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    if isinstance(value, str) and not value.strip():
        raise BudgetError(f"memory budget {value!r} is empty: give a size (800MB, 1.5GiB), a share of the expert "
                          f"bytes (50%), or none for no limit")
    share = None
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
            n = share = number / 100
        elif unit in _UNITS:
            n = number * _UNITS[unit]
        else:
            raise BudgetError(f"memory budget {value!r} has an unknown unit {m.group(2)!r}")
    if not math.isfinite(n):
        raise BudgetError(f"memory budget {str(value)[:40]!r} is not a finite size")
    if n <= 0:
        raise BudgetError(f"memory budget {str(value)[:40]!r} must be positive")
    return Budget(share=share) if share is not None else Budget(size=n)


def parse_budget(value: str | float | None, expert_bytes: int) -> int | None:
    """Bytes of the budget `value` (read_budget) for a model of `expert_bytes` expert bytes; None for no limit."""
    budget = read_budget(value)
    return None if budget is None else budget.bytes_for(expert_bytes)


def make_policy(name: str, layer_pos: dict[int, int], *, use_decay: float | None = None) -> Policy:
    """The eviction policy called `name` (one of POLICIES) over the MoE layers at `layer_pos`; `use_decay`
    for a decaying one (None: its own default)."""
    if name in ("distance", "nextuse"):
        cls = Distance if name == "distance" else NextUse
        return cls(layer_pos) if use_decay is None else cls(layer_pos, use_decay=use_decay)
    return {"lru": LRU, "lfu": LFU, "hobbit": Hobbit}[name](layer_pos)


DEFAULT_POLICY = "nextuse"


def settle_budget(budget: int | None, layout: MoELayout, full: int) -> tuple[int | None, BudgetMode]:
    """The budget the cache holds, and its mode, for a budget asked of a model whose experts cost `full` bytes
    in whole pages. One that reaches every expert byte holds every expert: it is what they cost (page rounding
    counts pages shared by two experts twice), 100% or 1TiB alike; more is memory no expert will ever take."""
    if budget is not None and budget >= layout.expert_bytes:
        if budget > full:
            log.warning("memory budget %s bytes is more than every expert of %s takes: capped at %s bytes "
                        "(every expert, as 100%%)", f"{budget:,}", layout.path, f"{full:,}")
        budget = full
    mode = BudgetMode.UNLIMITED if budget is None else \
        BudgetMode.HOLDS_ALL if budget >= full else BudgetMode.STREAMING
    return budget, mode


class BudgetMode(enum.Enum):
    """What a budget asks of the cache, decided once (ExpertCache.mode) from the budget and what every expert
    costs in whole pages."""

    UNLIMITED = "none"          # no budget: experts are tracked, llama.cpp's mapping serves them, none is evicted
    HOLDS_ALL = "all"           # a budget that holds every expert: what the load read stays, nothing is evicted
    STREAMING = "streaming"     # experts are fetched on demand and ahead, and evicted to hold the budget

    @property
    def streams(self) -> bool:
        return self is BudgetMode.STREAMING


class ExpertCache(ReadAhead, Reclaim):
    """Resident experts under a byte budget, evicted by a policy, fetched/dropped in llama.cpp's file mapping."""

    storage_class = ExpertStorage

    def __init__(self, layout: MoELayout, budget: int | None, *, policy: str = DEFAULT_POLICY, threads: int = 4,
                 prefetch_threads: int = 2, substitute: float | None = None):
        if policy not in POLICIES:
            raise ArgumentError(f"unknown cache policy {policy!r}; choose from {', '.join(POLICIES)}")
        self.layout = layout
        self.budget = budget
        self.policy = policy
        self.substitute = substitute       # run a missed expert low when the experts above it weigh more
        self.layer_pos = {layer: i for i, layer in enumerate(layout.moe_layers)}
        self.eviction = self._make_policy(policy)
        self.ledger = Ledger(layout.moe_layers, layout.n_expert)
        self.storage = self.storage_class(layout, threads=threads, prefetch_threads=prefetch_threads)
        # A miss returns once its reads are queued: llama.cpp's page faults wait for each page as the layer
        # computes, so the layer's work on what is in memory overlaps the reads. Every page a chosen expert
        # spans is read by that layer's matmuls, so its reads have landed before any later ensure may evict it.
        # False: wait for every read before the layer runs.
        self.overlap_reads = True
        self.inflight: dict[ExpertUID, Future] = {}   # prefetch reads not yet waited for
        self.max_inflight = 0                       # bytes in flight at most; 0 = prefetch off
        self._needed: set[ExpertUID] = set()        # the experts of the layer llama.cpp is about to compute
        self.min_budget = self.storage.one_layer_cost()    # the least a budget must hold
        self.budget, self.mode = settle_budget(budget, layout, self.storage.full_cost)
        budget = self.capacity = self.budget
        # Room kept free for the next layer's misses: after each layer, eviction brings the experts down to the
        # capacity less this, and their pages are dropped on the drop thread while llama.cpp computes; the next
        # layer's misses then read at once instead of dropping first. One layer's chosen experts at most.
        self.headroom = self.min_budget
        if not self.mode.streams:
            self.substitute = None      # nothing is ever missed for long: every expert runs at full precision
            self.headroom = 0           # nor evicted: every expert fits
        if budget is not None and budget < self.min_budget:
            self.close()                # the file and the reader threads are already open
            raise BudgetError(f"memory budget {budget:,} bytes cannot hold one layer's {layout.n_expert_used} "
                              f"chosen experts ({self.min_budget:,} bytes)")

    def _make_policy(self, name: str) -> Policy:
        return make_policy(name, self.layer_pos)

    # the parts' figures, under the names the cache has always had
    cost = property(lambda self: self.storage.cost, doc="expert -> its cost in bytes (whole pages)")
    base = property(lambda self: self.storage.base, doc="address of (the first) file's offset 0 in llama.cpp's mapping")
    pinned_edge_bytes = property(lambda self: self.storage.pinned_edge_bytes)
    resident = property(lambda self: self.ledger.resident, doc="resident expert -> its cost")
    resident_bytes = property(lambda self: self.ledger.resident_bytes)
    stats = property(lambda self: self.ledger.stats)

    def attach(self, bases, mapped=None) -> None:
        """Bind to llama.cpp's mappings of the model's files (storage.attach: per file, the address of its offset 0
        and the offsets it keeps mapped). No budget, or one that holds every expert, keeps what the
        load read: those experts start resident (and ready, so the runtime's filter lets their layers pass
        from the first token), and only an expert the load left out is a miss at its first touch. A smaller
        budget starts empty (a partial keep would leave large page-cache folios straddling kept and dropped
        experts, resident but unaccounted)."""
        self.storage.attach(bases, mapped)
        if self.mode.streams:
            self.drop_all()
            return
        if self.mode is BudgetMode.HOLDS_ALL:
            self.storage.drop_low_copies()
        for uid, cost in self.storage.cost.items():
            if not uid.low and self.storage.in_memory(uid):
                self.ledger.admit(uid, cost)
                self.eviction.add(uid)

    def drop_all(self) -> None:
        """Start-up: release every expert page the load pulled in; the cache starts empty. Edge pages the
        kernel keeps are expert-file pages in memory: they come out of the budget."""
        self.storage.drop_all()
        self.capacity = self.budget - self.storage.pinned_edge_bytes
        if self.capacity < self.min_budget:
            raise BudgetError(f"memory budget leaves {self.capacity:,} bytes for experts after "
                              f"{self.storage.pinned_edge_bytes:,} bytes of edge pages the kernel keeps; one "
                              f"layer's chosen experts need {self.min_budget:,}")
        self.ledger.clear()
        self.eviction.clear()

    # ------------------------------------------------------------------ the hook's calls
    def ensure_ids(self, layer: int, ids, above: dict[int, float] | None = None) -> set[int]:
        """`ids` is the (tokens, k) array of a topk node; a prompt batch asks for its union."""
        if len(ids) == 1:
            return self.ensure(layer, ids[0], above)
        # a prompt batch: its union, each expert used once per token that chose it (weighed by age)
        experts, where = np.unique(ids, return_inverse=True)
        ages = np.repeat(np.arange(len(ids) - 1, -1, -1), ids.shape[1])
        uses = np.bincount(where.ravel(), weights=self.eviction.token_weights(ages), minlength=len(experts))
        return self.ensure(layer, experts.tolist(), above, uses.tolist())

    def ensure(self, layer: int, experts, above: dict[int, float] | None = None, uses=None) -> set[int]:
        """Make `experts` of `layer` resident before llama.cpp computes them; evict by the policy to fit.
        `uses`, beside `experts`, is what each choice counts (a prompt batch's tokens); 1 each by default.

        With substitution on and `above` (expert -> gate weight ranked above it, substitute.weight_above), a
        missed expert above the threshold is served by its low-bit copy. Returns the experts served low."""
        st = self.ledger.stats.layers[layer]
        self.eviction.begin(self.layer_pos[layer])
        needed, low = self._choose(layer, experts, above)
        self._needed = set(needed)
        st.substituted += len(low)
        resident, missing = self.ledger.resident, []
        weight = dict(zip(experts, uses, strict=True)) if uses is not None else None
        for uid in needed:
            self.eviction.use(uid, 1.0 if weight is None else weight[uid.expert])
            if uid not in resident:
                missing.append(uid)
            elif self.ledger.hit(uid):
                st.prefetch_late += self._wait(uid, st)
        if not missing:
            self._evict_ahead()
            return low
        st.misses += len(missing)
        cost = self.storage.cost
        need = sum(cost[u] for u in missing)
        if self.mode is not BudgetMode.UNLIMITED:   # without, llama.cpp's mapping serves first touches: count
            t0 = time.perf_counter()
            self._evict_to(self.capacity - need, keep=self._needed)
            st.evict_s += time.perf_counter() - t0
            st.bytes_fetched += self.storage.fetch(missing, wait=not self.overlap_reads)
            st.substituted_bytes += sum(cost[u] for u in missing if u.low)
            st.stall_s += time.perf_counter() - t0
        for u in missing:
            self.ledger.admit(u, cost[u])
            self.eviction.add(u)
        self._evict_ahead()
        return low

    def hits(self, layer: int, ids) -> None:
        """Layer `layer` ran `ids` ((tokens, k)), every one of them ready (the runtime's filter let it pass):
        counted, and ordered by the policy as ensure_ids would. With no budget nothing is ever evicted, so the
        policy's order is never consulted: only the count is kept."""
        if self.mode is not BudgetMode.UNLIMITED:
            self.ensure_ids(layer, ids)
            return
        self.ledger.stats.layers[layer].hits += ids.shape[1] if len(ids) == 1 else len(np.unique(ids))

    def _choose(self, layer: int, experts, above: dict[int, float] | None) -> tuple[list[ExpertUID], set[int]]:
        """The experts to serve, in the order asked (each once), a missed one by its low-bit copy where
        substitution says so; and the experts served low."""
        needed: dict[ExpertUID, None] = {}
        low = set()
        for e in experts:
            uid = ExpertUID(layer, int(e))
            if (uid not in self.ledger.resident and above is not None and self.substitute is not None
                    and above.get(uid.expert, 0.0) > self.substitute and uid._replace(low=True) in self.storage.cost):
                uid = uid._replace(low=True)
                low.add(uid.expert)
            needed[uid] = None
        return list(needed), low

    def new_sequence(self) -> None:
        """A new prompt: per-sequence statistics ("hobbit") start again."""
        self.eviction.new_sequence()

    # ------------------------------------------------------------------ evict
    def _evict_to(self, target: int, keep: set[ExpertUID]) -> None:
        """Evict by the policy until at most `target` bytes are resident, sparing `keep` (as near as it can)."""
        over = self.ledger.resident_bytes - target
        if over > 0:
            for uid in self.eviction.victims(over, self.ledger.resident, keep, self.inflight):
                self.evict(uid)

    def _evict_ahead(self) -> None:
        """Bring the experts down to the capacity less the headroom, sparing this layer's and those in flight;
        the victims' pages drop on the drop thread (the next read waits for them: storage.settle)."""
        if not self.headroom:
            return
        over = self.ledger.resident_bytes - (self.capacity - self.headroom)
        if over <= 0:
            return
        victims = self.eviction.victims(over, self.ledger.resident, self._needed | self.inflight.keys(), ())
        for uid in victims:
            self._release(uid)
        if victims:
            self.storage.drop_later(victims, self.ledger.resident)

    def evict(self, uid: ExpertUID) -> None:
        fut = self.inflight.pop(uid, None)
        if fut is not None and (fut in self.inflight.values() or not fut.cancel()):
            fut.result()                 # a read still running would map the pages again after the drop (a read
                                         # of several experts is waited for, never cancelled)
        self._release(uid)
        self.storage.drop(uid, self.ledger.resident)

    def _release(self, uid: ExpertUID) -> None:
        """`uid` is no longer resident for the ledger (and the runtime's ready table) and the policy."""
        self.ledger.release(uid)
        self.eviction.remove(uid)

    # ------------------------------------------------------------------ measurement
    def measured_resident_bytes(self, file: int | None = None) -> int:
        """Expert bytes in memory as the kernel reports them (mincore over every expert tensor; of the model's
        file `file` alone if given)."""
        return self.storage.measured_resident_bytes(file)

    def close(self) -> None:
        self.storage.close()

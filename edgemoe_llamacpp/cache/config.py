"""The expert cache's options in one frozen record: what `Llama`, the CLI, the server, the benchmark and the
tools pass along, checked once when it is made.

Each field's `help` is the text the CLI and the server show for it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from edgemoe_llamacpp.cache.auto import AUTO
from edgemoe_llamacpp.cache.dense_hold import HOLD_MODES, check_mode
from edgemoe_llamacpp.cache.predict import MAX_DEPTH, PREDICTORS
from edgemoe_llamacpp.cache.residency import DEFAULT_POLICY, POLICIES, ExpertCache, read_budget
from edgemoe_llamacpp.checks import is_int, is_real
from edgemoe_llamacpp.errors import ArgumentError, BudgetError, EdgeMoEError
from edgemoe_llamacpp.gguf.layout import MoELayout

MAX_THREADS = 1024


@dataclass(frozen=True)
class CacheConfig:
    """How a Llama keeps its experts: the memory budget, the eviction policy, prefetch and substitution."""

    memory_budget: str | int | None = field(default=None, metadata={
        "help": "Expert memory: bytes, 800MB, 1.5GiB or 50% of the expert bytes; unset for no limit."})
    policy: str = field(default=DEFAULT_POLICY, metadata={
        "choices": POLICIES,
        "help": f"Which expert to evict: {', '.join(POLICIES)} (nextuse: the one whose next use, estimated from "
                "how often it is chosen and when its layer runs again, lies farthest)."})
    predictor: str | None = field(default=AUTO, metadata={
        "choices": (AUTO, *PREDICTORS), "unset": True,
        "help": f"Predict the next layers' experts and read them ahead: {', '.join(PREDICTORS)}; {AUTO}: gate "
                "where prefetch pays, decided on the first decoded tokens under a budget (its recall and whether "
                "reads leave compute time to hide in); none for no prefetch."})
    prefetch_depth: int = field(default=1, metadata={"range": (1, MAX_DEPTH), "help": "MoE layers ahead to prefetch."})
    prefetch_threads: int = field(default=2, metadata={"range": (1, MAX_THREADS),
                                                       "help": "Background readers for prefetches."})
    fetch_threads: int = field(default=4, metadata={"range": (1, MAX_THREADS),
                                                    "help": "Parallel readers for expert fetches."})
    hold_dense: str = field(default="auto", metadata={
        "choices": HOLD_MODES,
        "help": "Under a budget, hold the dense weights where the kernel cannot reclaim them: mlock, copy (an "
                "anonymous copy), auto (mlock where allowed, else copy) or off."})
    substitute: float | None = field(default=None, metadata={
        "range": (0.0, 1.0), "open_high": True,
        "help": "Run a missed expert from its low-bit copy (convert --lowbit) when the experts ranked above it "
                "carry more than this share of the gate weight; changes the output. Unset: never."})

    def __post_init__(self) -> None:
        if not isinstance(self.policy, str) or self.policy not in POLICIES:
            raise ArgumentError(f"unknown cache policy {self.policy!r}; choose from {', '.join(POLICIES)}")
        choices = self.option("predictor")["choices"]
        if self.predictor is not None and (not isinstance(self.predictor, str) or self.predictor not in choices):
            raise ArgumentError(f"unknown predictor {self.predictor!r}; choose from {', '.join(choices)} or None")
        for name in ("fetch_threads", "prefetch_threads", "prefetch_depth"):      # the bounds: the fields' own
            (lo, hi), value = self.option(name)["range"], getattr(self, name)
            if not is_int(value) or not lo <= value <= hi:
                raise ArgumentError(f"{name} must be an integer from {lo} to {hi}, not {value!r}")
        check_mode(self.hold_dense)
        if self.substitute is not None and not (is_real(self.substitute) and 0 <= self.substitute < 1):
            raise ArgumentError(f"substitute is a share of the gate weight in [0, 1), not {self.substitute!r}")
        budget = self.memory_budget
        if isinstance(budget, (float, np.floating)) and not math.isfinite(budget):
            raise BudgetError(f"memory budget {budget} is not a finite size")
        # checked once, before the model is known; a share of the expert bytes is resolved by budget_for
        object.__setattr__(self, "_budget", read_budget(budget))

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def help(cls, name: str) -> str:
        return cls.option(name)["help"]

    @classmethod
    def option(cls, name: str) -> dict:
        """What the CLI's flags and the server's settings are made from: a field's `help`, and its `choices` (a
        tuple of strings; `unset`: None, spelled "none", is one too) or `range` ((low, high), high excluded with
        `open_high`); memory_budget has neither (a size or a share, read by read_budget)."""
        return dict(next(f.metadata for f in fields(cls) if f.name == name))

    def to_dict(self, *, budget: bool = True) -> dict:
        """The fields by name (JSON-able); budget=False leaves memory_budget out (a benchmark records its budgets
        apart)."""
        out = asdict(self)
        if not budget:
            del out["memory_budget"]
        return out

    def budget_for(self, layout: MoELayout) -> int | None:
        """The budget in bytes for the model of `layout` (None: no limit), once these options are known to suit
        it: substitution needs a file with low-bit copies."""
        budget = None if self._budget is None else self._budget.bytes_for(layout.expert_bytes)
        if self.substitute is not None and not layout.lowbit_type:
            raise EdgeMoEError(f"{layout.path} has no low-bit copies of its experts to substitute; write them "
                               f"with: edgemoe convert IN OUT --uniform TYPE --lowbit Q2_K")
        return budget

    def make_cache(self, layout: MoELayout, cache_class: type[ExpertCache] = ExpertCache, **extra) -> ExpertCache:
        """The expert cache of `layout` under these options (`extra`: a subclass's own arguments); a budget that
        cannot hold one layer's chosen experts is refused here."""
        return cache_class(layout, self.budget_for(layout), policy=self.policy, threads=self.fetch_threads,
                           prefetch_threads=self.prefetch_threads, substitute=self.substitute, **extra)

    @classmethod
    def take(cls, kwargs: dict, cache: CacheConfig | None = None) -> CacheConfig:
        """The options of a call that takes `cache=CacheConfig(...)` or the options as keywords (memory_budget=,
        policy=, ...), not both. The keywords are taken out of `kwargs`."""
        given = {name: kwargs.pop(name) for name in cls.names() if name in kwargs}
        if cache is None:
            return cls(**given)
        if not isinstance(cache, cls):
            raise ArgumentError(f"cache must be a CacheConfig, not {type(cache).__name__}")
        if given:
            raise ArgumentError(f"give the cache options once: cache=CacheConfig(...) or {', '.join(given)}=..., "
                                f"not both")
        return cache

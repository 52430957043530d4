"""`edgemoe_llamacpp.Llama`: llama-cpp-python's Llama with experts streamed under a memory budget."""
from __future__ import annotations

import contextlib
import logging
import os
import threading

import llama_cpp
import llama_cpp.llama_cpp as lc

from . import cgroup, quant, runtime
from .errors import BudgetError, EdgeMoEError, MixedTypesError
from .hook import ExpertHook
from .layout import MoELayout, read_layout
from .predict import Lookahead, make_predictor
from .residency import ExpertCache, parse_budget
from .substitute import ExpertPointers, weight_above

_params_lock = threading.Lock()
PREFETCH_ENV = "LLAMA_MMAP_PREFETCH"     # read by the patched loader (patches/0003)
log = logging.getLogger(__name__)


@contextlib.contextmanager
def llama_params(*, use_extra_bufts: bool | None = None, cb_eval=None, mmap_prefetch: bool = True):
    """Make llama.cpp's default model/context params carry our settings while a Llama is built.

    `Llama()` has no keyword for either: it asks `llama_*_default_params()` at call time.
    mmap_prefetch=False maps the file without reading it whole at load (patched runtime, patches/0003).
    """
    orig_model, orig_ctx = lc.llama_model_default_params, lc.llama_context_default_params
    orig_env = os.environ.get(PREFETCH_ENV)

    def model_params():
        p = orig_model()
        if use_extra_bufts is not None:
            p.use_extra_bufts = use_extra_bufts
        return p

    def context_params():
        p = orig_ctx()
        if cb_eval is not None:
            p.cb_eval = cb_eval
            p.cb_eval_user_data = None
        return p

    with _params_lock:
        lc.llama_model_default_params, lc.llama_context_default_params = model_params, context_params
        if not mmap_prefetch:
            os.environ[PREFETCH_ENV] = "0"
        try:
            yield
        finally:
            lc.llama_model_default_params, lc.llama_context_default_params = orig_model, orig_ctx
            if orig_env is None:
                os.environ.pop(PREFETCH_ENV, None)
            else:
                os.environ[PREFETCH_ENV] = orig_env


class _TypeRegistry:
    """The patched kernel's per-expert types, for every live Llama of this process."""

    def __init__(self):
        self._by_owner: dict[int, list[tuple[int, list[int], list[int]]]] = {}

    def add(self, owner: object, layout: MoELayout, mapping_base: int, every: bool = False) -> None:
        """Register the tensors with per-expert types, or (every=True, for substitution) every stacked one."""
        entries = []
        for t in layout.expert_tensors:
            if t.types is None and not (every and t.low is not None):
                continue
            types = [int(quant.qtype(t.slice(e).type)) for e in range(t.count)]
            pointers = [mapping_base + t.slice(e).offset for e in range(t.count)]
            entries.append((mapping_base + t.offset, types, pointers))
        for entry in entries:
            runtime.register_expert_types(*entry)
        self._by_owner[id(owner)] = entries

    def remove(self, owner: object) -> None:
        if self._by_owner.pop(id(owner), None) is None:
            return
        runtime.clear_expert_types()
        for entries in self._by_owner.values():
            for entry in entries:
                runtime.register_expert_types(*entry)


_types = _TypeRegistry()


def _check_mapped(layout: MoELayout, mappings, model_path) -> None:
    """Every expert byte, low-bit copies included, must lie in llama.cpp's mapping (it unmaps the parts of
    the file before its first tensor and after its last) before any pointer into it is used."""
    offsets = sorted((off, off + end - start) for start, end, off, _ in mappings)
    ranges = [r for x in layout.experts for r in x.ranges]
    ranges += [r for rs in layout.low_experts.values() for r in rs]
    for r in ranges:
        if not any(a <= r.offset and r.offset + r.size <= b for a, b in offsets):
            raise EdgeMoEError(f"{model_path}: {r.tensor} bytes [{r.offset}, {r.offset + r.size}) are outside "
                               f"llama.cpp's mapping of the file; rewrite it with this edgemoe's convert")


def require_runtime_for(layout: MoELayout) -> None:
    if layout.mixed and not runtime.patched():
        raise MixedTypesError(f"{layout.path} gives experts of one tensor different types; this "
                              f"llama-cpp-python ({llama_cpp.__version__}) is not built with edgemoe's patches "
                              f"and would compute garbage from it. Build it: python tools/build_runtime.py")
    if layout.lowbit_type and not runtime.patched():
        raise MixedTypesError(f"{layout.path} carries low-bit copies of its experts; this llama-cpp-python "
                              f"({llama_cpp.__version__}) is not built with edgemoe's patches and refuses such a "
                              f"file. Build it: python tools/build_runtime.py")


def stock_llama(model_path: str, *, use_extra_bufts: bool = True, **kwargs) -> llama_cpp.Llama:
    """Plain llama-cpp-python, optionally without the CPU repack (the same compute path edgemoe uses)."""
    layout = read_layout(model_path)
    if layout.needs_patched_runtime:
        what = "per-expert types" if layout.mixed else "low-bit copies of its experts"
        raise MixedTypesError(f"{model_path} has {what}: only edgemoe_llamacpp.Llama runs it")
    with llama_params(use_extra_bufts=use_extra_bufts):
        return llama_cpp.Llama(model_path=str(model_path), **kwargs)


class Llama(llama_cpp.Llama):
    """Drop-in `llama_cpp.Llama` for MoE GGUFs: same constructor and methods, plus

    memory_budget: bytes held by experts in memory: an int, "1.5GiB", "800MB", or "50%" of the expert
        bytes; None for no limit (experts are still tracked).
    policy: which expert to evict: "distance" (default: the least often chosen, weighted by how soon its
        layer runs again), "lru", "lfu" or "hobbit" (recency + frequency + layer distance, per sequence).
    fetch_threads: parallel readers for expert fetches.
    predictor: guess the next layers' experts and read them ahead while this layer computes: "gate"
        (the next routers applied to this layer's FFN input), "table" (co-occurrence counts, learned as it
        runs), "frequency", or None (no prefetch). Needs a memory budget below 100%.
    prefetch_depth: how many MoE layers ahead to prefetch (1-3).
    prefetch_threads: background readers for prefetches.
    substitute: run a missed expert from its low-bit copy (a file from `edgemoe convert --lowbit`) when the
        experts ranked above it carry more than this share of the token's gate weight (HOBBIT; 0.6 is its
        Mixtral setting); None (default) runs every expert at full precision: output identical to stock.
    record_routing: keep every layer's chosen experts (`edgemoe_trace()`), for profiles and benchmarks.
    """

    def __init__(self, model_path: str, *args, memory_budget: str | int | None = None, policy: str = "distance",
                 fetch_threads: int = 4, record_routing: bool = False, predictor: str | None = None,
                 prefetch_depth: int = 1, prefetch_threads: int = 2, substitute: float | None = None, **kwargs):
        if kwargs.get("use_mmap") is False or kwargs.get("use_mlock"):
            raise EdgeMoEError("edgemoe streams experts through llama.cpp's file mapping: use_mmap must stay "
                               "on and use_mlock off")
        layout = read_layout(model_path)
        require_runtime_for(layout)
        budget = parse_budget(memory_budget, layout.expert_bytes)
        if substitute is not None:
            if not layout.lowbit_type:
                raise EdgeMoEError(f"{model_path} has no low-bit copies of its experts to substitute; write them "
                                   f"with: edgemoe convert IN OUT --uniform TYPE --lowbit Q2_K")
            if not 0 <= substitute < 1:
                raise EdgeMoEError(f"substitute is a share of the gate weight in [0, 1), not {substitute}")
        self._edgemoe_layout = layout
        self._edgemoe_pointers = None
        self._edgemoe_cache = cache = ExpertCache(layout, budget, policy=policy, threads=fetch_threads,
                                                  prefetch_threads=prefetch_threads, substitute=substitute)
        limit = cgroup.memory_limit()
        if limit is not None and limit < layout.dense_bytes + cache.min_budget:
            cache.close()
            raise BudgetError(f"this process may use {limit:,} bytes (its cgroup's memory limit), but "
                              f"{model_path} needs at least {layout.dense_bytes + cache.min_budget:,}: "
                              f"{layout.dense_bytes:,} of dense weights and {cache.min_budget:,} for one "
                              f"layer's chosen experts")
        self._edgemoe_trace: list[tuple[int, list[list[int]]]] | None = [] if record_routing else None
        self._edgemoe_lookahead, self._edgemoe_predictor = None, predictor
        if predictor is not None:
            try:
                pred = make_predictor(predictor, model_path, layout)
                self._edgemoe_lookahead = Lookahead(pred, cache, layout, prefetch_depth)
            except BaseException:
                cache.close()
                raise
        hidden = self._edgemoe_lookahead.predictor.hidden_node if self._edgemoe_lookahead else None
        self._edgemoe_hook = hook = ExpertHook(on_route=self._on_route, hidden_node=hidden,
                                               want_weights=cache.substitute is not None)
        before = set(runtime.file_mappings(model_path))
        if before:
            log.warning("%s is already mapped in this process: pages another instance keeps mapped cannot be "
                        "dropped, so the memory budget may not hold", model_path)
        try:
            if budget is not None and budget < layout.expert_bytes and not before:
                # Pages of the file already cached (just written, downloaded, or read by an earlier run) can sit
                # in large folios; once llama.cpp maps its dense tensors, a folio shared with expert bytes can
                # no longer be dropped. Drop them while nothing maps the file: the load then reads it in
                # readahead-sized folios and the start-up drop (cache.attach) releases all but the edges.
                cgroup.drop_file_cache(model_path)
            # The load still reads the whole file (llama.cpp's MAP_POPULATE): mapped without it
            # (LLAMA_MMAP_PREFETCH=0, patches/0003), the dense weights' first faults read around into expert
            # pages after the start-up drop, and the budget no longer holds.
            with llama_params(use_extra_bufts=False, cb_eval=hook.callback):
                super().__init__(model_path, *args, **kwargs)
            new = [m for m in runtime.file_mappings(model_path) if m not in before]
            if not new or any("w" in perms for *_, perms in new):
                raise EdgeMoEError(f"{model_path}: llama.cpp did not map the file read-only; cannot stream")
            base = new[0][0] - new[0][2]
            _check_mapped(layout, new, model_path)
            if layout.mixed or cache.substitute is not None:
                _types.add(self, layout, base, every=cache.substitute is not None)
            if cache.substitute is not None:
                self._edgemoe_pointers = ExpertPointers(layout, base)
            cache.attach(base, mapped=(min(off for _, _, off, _ in new),
                                       max(off + end - start for start, end, off, _ in new)))
        except BaseException:
            self.close()
            raise

    def _on_route(self, layer: int, ids, hidden=None, weights=None) -> None:
        if self._edgemoe_trace is not None:
            self._edgemoe_trace.append((layer, ids.tolist()))
        above = None if weights is None else weight_above(ids, weights)
        low = self._edgemoe_cache.ensure_ids(layer, ids, above)
        if self._edgemoe_pointers is not None:
            self._edgemoe_pointers.point(layer, ids.ravel().tolist(), low)
        if self._edgemoe_lookahead is not None:
            self._edgemoe_lookahead(layer, ids, hidden)

    def edgemoe_trace(self) -> list[tuple[int, list[list[int]]]]:
        """(layer, chosen experts per token) for every MoE layer evaluation, in order (record_routing=True)."""
        if self._edgemoe_trace is None:
            raise EdgeMoEError("routing was not recorded: construct with record_routing=True")
        return self._edgemoe_trace

    def reset(self) -> None:
        super().reset()
        cache = getattr(self, "_edgemoe_cache", None)
        if cache is not None:
            cache.new_sequence()

    def eval(self, tokens) -> None:
        super().eval(tokens)
        self._edgemoe_hook.take_error()

    def edgemoe_stats(self) -> dict:
        """Per-layer and total hits, misses, bytes fetched/evicted, stall seconds, resident expert bytes."""
        return {"routes": self._edgemoe_hook.routes, **self._edgemoe_cache.summary(),
                "predictor": self._edgemoe_predictor,
                "prefetch_depth": self._edgemoe_lookahead.depth if self._edgemoe_lookahead else 0}

    def close(self) -> None:
        cache = getattr(self, "_edgemoe_cache", None)
        if cache is not None:
            cache.close()                 # first: prefetch reads in flight finish before the mapping goes
        if hasattr(self, "_stack"):       # absent when a bad file or budget stopped __init__ early
            super().close()
        _types.remove(self)

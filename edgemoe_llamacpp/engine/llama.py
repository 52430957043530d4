"""`edgemoe_llamacpp.Llama`: llama-cpp-python's Llama with experts streamed under a memory budget."""
from __future__ import annotations

import contextlib
import logging
import os
import threading

import llama_cpp
import llama_cpp.llama_cpp as lc

from edgemoe_llamacpp import limits, pages, runtime
from edgemoe_llamacpp.cache.config import CacheConfig
from edgemoe_llamacpp.cache.residency import BudgetMode
from edgemoe_llamacpp.engine.engine import ExpertEngine
from edgemoe_llamacpp.engine.hook import ExpertHook
from edgemoe_llamacpp.engine.injection import InjectedLlama
from edgemoe_llamacpp.engine.interrupt import sigint_deferred
from edgemoe_llamacpp.engine.safe import SafeLlama
from edgemoe_llamacpp.errors import EdgeMoEError, MixedTypesError
from edgemoe_llamacpp.gguf import quant
from edgemoe_llamacpp.gguf.layout import MoELayout, read_layout

_params_lock = threading.Lock()
PREFETCH_ENV = "LLAMA_MMAP_PREFETCH"     # read by the patched loader (patches/0003)
log = logging.getLogger(__name__)


@contextlib.contextmanager
def llama_params(*, use_extra_bufts: bool | None = None, cb_eval=None, cb_eval_user_data: int | None = None,
                 mmap_prefetch: bool = True):
    """Make llama.cpp's default model/context params carry our settings while a Llama is built.

    `Llama()` has no keyword for either: it asks `llama_*_default_params()` at call time.
    mmap_prefetch=False maps the file without reading it whole at load (patched runtime, patches/0003).

    A Ctrl-C meanwhile stops the load at llama.cpp's next progress report and is raised once the constructor
    returns: raised where it lands, often inside llama.cpp's log callback (llama-cpp-python's, verbose=True),
    ctypes would print the KeyboardInterrupt and swallow it, and the program would go on as if never interrupted.
    """
    orig_model, orig_ctx = lc.llama_model_default_params, lc.llama_context_default_params
    orig_env = os.environ.get(PREFETCH_ENV)
    interrupted = threading.Event()
    progress = lc.llama_progress_callback(lambda _progress, _user_data: not interrupted.is_set())

    def model_params():
        p = orig_model()
        if use_extra_bufts is not None:
            p.use_extra_bufts = use_extra_bufts
        p.progress_callback = progress          # llama.cpp stops loading when it returns false
        return p

    def context_params():
        p = orig_ctx()
        if cb_eval is not None:
            p.cb_eval = cb_eval
            p.cb_eval_user_data = cb_eval_user_data
        return p

    with _params_lock:
        lc.llama_model_default_params, lc.llama_context_default_params = model_params, context_params
        if not mmap_prefetch:
            os.environ[PREFETCH_ENV] = "0"
        try:
            with sigint_deferred(interrupted.set):
                yield
        finally:
            lc.llama_model_default_params, lc.llama_context_default_params = orig_model, orig_ctx
            if orig_env is None:
                os.environ.pop(PREFETCH_ENV, None)
            else:
                os.environ[PREFETCH_ENV] = orig_env


class _TypeRegistry:
    """The patched kernel's per-expert types. The patched loader registers them when it loads a file that requires
    them (`edgemoe.required_features`) and drops them when the model is freed (patches/0002); this checks, for
    every live Llama of this process, that the copy of ggml-cpu llama.cpp computes with holds them."""

    def __init__(self):
        self._by_owner: dict[int, list[tuple[str, int, list[int], list[int]]]] = {}

    def add(self, owner: object, layout: MoELayout, bases: list[int], every: bool = False) -> None:
        """Check the tensors with per-expert types, or (every=True, for substitution) every stacked one with
        low-bit copies, are registered at the file's types and slots (`bases`: per file of the model, the
        address of its offset 0 in llama.cpp's mapping)."""
        entries = []
        for t in layout.expert_tensors:
            if t.types is None and not (every and t.low is not None):
                continue
            types = [int(quant.qtype(t.slice(e).type)) for e in range(t.count)]
            pointers = [bases[t.file] + t.slice(e).offset for e in range(t.count)]
            entries.append((t.name, bases[t.file] + t.offset, types, pointers))
        try:
            for entry in entries:
                runtime.check_registered(*entry)
        except RuntimeError as e:
            raise EdgeMoEError(f"{layout.path}: {e}") from None
        self._by_owner[id(owner)] = entries

    def remove(self, owner: object) -> None:
        self._by_owner.pop(id(owner), None)      # the loader unregistered them with the model


_types = _TypeRegistry()


def _check_mapped(layout: MoELayout, mappings) -> None:
    """Every expert byte, low-bit copies included, must lie in llama.cpp's mapping of its file (`mappings[i]`: file
    i's; llama.cpp unmaps the parts of a file before its first tensor and after its last) before any pointer into
    it is used."""
    offsets = [sorted((off, off + end - start) for start, end, off, _ in rows) for rows in mappings]
    ranges = [r for x in layout.experts for r in x.ranges]
    ranges += [r for rs in layout.low_experts.values() for r in rs]
    for r in ranges:
        if not any(a <= r.offset and r.offset + r.size <= b for a, b in offsets[r.file]):
            raise EdgeMoEError(f"{layout.files[r.file]}: {r.tensor} bytes [{r.offset}, {r.offset + r.size}) are "
                               f"outside llama.cpp's mapping of the file; rewrite it with this edgemoe's convert")


def _new_mappings(layout: MoELayout, before: list[set]) -> list[list[tuple[int, int, int, str]]]:
    """Per file of the model, the mappings llama.cpp made of it (those not in `before`), checked read-only and
    covering every expert byte."""
    new = [[m for m in pages.file_mappings(path) if m not in seen]
           for path, seen in zip(layout.files, before, strict=True)]
    for path, rows in zip(layout.files, new, strict=True):
        if not rows or any("w" in perms for *_, perms in rows):
            raise EdgeMoEError(f"{path}: llama.cpp did not map the file read-only; cannot stream")
    _check_mapped(layout, new)
    return new


def require_runtime_for(layout: MoELayout) -> None:
    if layout.mixed and not runtime.patched():
        raise MixedTypesError(f"{layout.path} gives experts of one tensor different types; this "
                              f"llama-cpp-python ({llama_cpp.__version__}) is not built with edgemoe's patches "
                              f"and would compute garbage from it. Build it: edgemoe build-runtime")
    if layout.lowbit_type and not runtime.patched():
        raise MixedTypesError(f"{layout.path} carries low-bit copies of its experts; this llama-cpp-python "
                              f"({llama_cpp.__version__}) is not built with edgemoe's patches and refuses such a "
                              f"file. Build it: edgemoe build-runtime")
    if any(t.low is not None and t.low.file != 0 for t in layout.expert_tensors):
        raise MixedTypesError(f"{layout.path} keeps low-bit copies outside shard 1, where llama.cpp's patched loader "
                              f"counts them as weights and refuses the model; convert it again with this edgemoe")
    if layout.needs_patched_runtime and "required_features" not in (layout.edgemoe or {}):
        raise MixedTypesError(f"{layout.path} was written by an older edgemoe convert: it does not name the features "
                              f"it needs (edgemoe.required_features), so llama.cpp refuses it. Convert it again")


def stock_llama(model_path: str, *, use_extra_bufts: bool = True, route_injector=None,
                **kwargs) -> llama_cpp.Llama:
    """Plain llama-cpp-python, optionally without the CPU repack (the same compute path edgemoe uses), and for
    benchmarks optionally computing an injector's routing (injection.InjectedLlama, no cache)."""
    layout = read_layout(model_path)
    if layout.needs_patched_runtime:
        what = "per-expert types" if layout.mixed else "low-bit copies of its experts"
        raise MixedTypesError(f"{model_path} has {what}: only edgemoe_llamacpp.Llama runs it")
    if route_injector is None:
        with llama_params(use_extra_bufts=use_extra_bufts):
            return llama_cpp.Llama(model_path=layout.path, **kwargs)
    hook = ExpertHook(inject=route_injector)
    with llama_params(use_extra_bufts=use_extra_bufts, **hook.cb_eval_args()):
        return InjectedLlama(model_path=layout.path, hook=hook, **kwargs)


class Llama(SafeLlama):
    """Drop-in `llama_cpp.Llama` for MoE GGUFs: same constructor and methods, plus the expert cache's options,
    as keywords or as one `cache=CacheConfig(...)`, not both: memory_budget, policy, predictor, prefetch_depth,
    prefetch_threads, fetch_threads, hold_dense and substitute (what each means and takes: CacheConfig's fields,
    edgemoe_llamacpp.cache.config, whose help the CLI and the server show too). With no substitute the output is
    stock's, token for token.

    record_routing: keep every layer's chosen experts (`edgemoe_trace()`), for profiles and benchmarks.
    route_injector: benchmarks and replay only: an injector (engine.injection; edgemoe_bench.inject.trace_injector
        makes one from a routing trace) whose experts replace the router's choice at every MoE layer. The output
        is then not the model's own; `edgemoe_stats()["routing"]` says "injected: <source>".
    prefetch_predictor: research only: a Predictor object (cache.predict) to prefetch with instead of the cache's named one
        (edgemoe_bench.oracle's reads the injected routing ahead).

    The experts are streamed by `llm.edgemoe`, an ExpertEngine (engine.engine: its cache, hook, lookahead and
    figures). Unlike llama_cpp.Llama, it is safe to share (engine.safe.SafeLlama): calls are serialised, a call
    after close() raises LlamaClosedError, and arguments llama.cpp would crash on raise ArgumentError first.
    """

    def __init__(self, model_path: str, *args, cache: CacheConfig | None = None, record_routing: bool = False,
                 route_injector=None, prefetch_predictor=None, **kwargs):
        self._guarded()
        config = CacheConfig.take(kwargs, cache)         # checked before any file is read
        if kwargs.get("use_mmap") is False or kwargs.get("use_mlock"):
            raise EdgeMoEError("edgemoe streams experts through llama.cpp's file mapping: use_mmap must stay "
                               "on and use_mlock off")
        layout = read_layout(model_path)
        require_runtime_for(layout)
        self.edgemoe = engine = ExpertEngine(layout, config, record_routing=record_routing,
                                             route_injector=route_injector, prefetch_predictor=prefetch_predictor)
        before = [set(pages.file_mappings(path)) for path in layout.files]
        if any(before):
            log.warning("%s is already mapped in this process: pages another instance keeps mapped cannot be "
                        "dropped, so the memory budget may not hold", model_path)
        try:
            if engine.mode.streams and not any(before):
                # Pages of the file already cached (just written, downloaded, or read by an earlier run) can sit
                # in large folios; once llama.cpp maps its dense tensors, a folio shared with expert bytes can
                # no longer be dropped. Drop them while nothing maps the file: the load then reads it in
                # readahead-sized folios and the start-up drop (cache.attach) releases all but the edges.
                for path in layout.files:
                    limits.drop_file_cache(path)
            # Under a budget the file is mapped without llama.cpp's whole-file read (LLAMA_MMAP_PREFETCH=0,
            # patches/0003); loading.read_dense then reads the dense bytes only, with read-around off.
            # llama.cpp opens a split model's shard 1 and finds the others by name.
            with llama_params(use_extra_bufts=False, mmap_prefetch=engine.mode is BudgetMode.UNLIMITED,
                              **engine.hook.cb_eval_args()):
                super().__init__(layout.path, *args, **kwargs)
            new = _new_mappings(layout, before)
            if layout.mixed or engine.cache.substitute is not None:
                _types.add(self, layout, [rows[0][0] - rows[0][2] for rows in new],
                           every=engine.cache.substitute is not None)
            engine.attach(new)
        except BaseException:
            self.close()
            raise
        engine.snapshot = engine.counters()

    # what SafeLlama tells of evaluations
    def _evaluating(self):
        return self.edgemoe.evaluating(self.n_tokens)

    def _evaluated(self, tokens) -> None:
        self.edgemoe.tokens.evaluated(tokens)
        self.edgemoe.snapshot = self.edgemoe.counters()

    def _sampled(self, token: int) -> None:
        self.edgemoe.tokens.sampled(token)

    def _new_sequence(self) -> None:
        self.edgemoe.cache.new_sequence()

    @property
    def route_injector(self):
        """The injector computing this Llama's routing (None: the router's own)."""
        return self.edgemoe.injector

    def edgemoe_trace(self) -> list[tuple[int, list[list[int]]]]:
        """(layer, chosen experts per token) for every MoE layer evaluation, in order (record_routing=True)."""
        with self._edgemoe_call():
            return self.edgemoe.routing()

    def edgemoe_stats(self) -> dict:
        """Per-layer and total hits, misses, bytes fetched/evicted, stall seconds, resident expert bytes; tokens
        evaluated for prompts and tokens sampled.

        Never waits: while another thread is inside a call, it returns the figures as of the last evaluation."""
        return self._edgemoe_guard.read(self.edgemoe.stats, lambda: self.edgemoe.stats(self.edgemoe.snapshot))

    def edgemoe_measured_resident_bytes(self) -> int:
        """Expert bytes in memory as the kernel reports them (mincore over every expert tensor, drops in flight
        finished first): what the memory budget must hold, checked rather than counted."""
        with self._edgemoe_call():
            return self.edgemoe.measured_resident_bytes()

    def __getstate__(self) -> dict:
        """llama_cpp.Llama pickles its constructor arguments (unpickling loads the model again): ours too."""
        with self._edgemoe_call():
            return {**super().__getstate__(), **self.edgemoe.config.to_dict(),
                    "record_routing": self.edgemoe.record is not None, "route_injector": self.edgemoe.injector}

    def _closing(self) -> None:
        engine = self.__dict__.get("edgemoe")
        if engine is not None:
            engine.close()                    # first: prefetch reads in flight finish before the mapping goes

    def _closed(self) -> None:
        _types.remove(self)

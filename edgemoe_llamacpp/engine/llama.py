"""`edgemoe_llamacpp.Llama`: llama-cpp-python's Llama with experts streamed under a memory budget."""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from dataclasses import dataclass, field

import jinja2
import llama_cpp
import llama_cpp.llama_cpp as lc

from edgemoe_llamacpp import limits, pages, runtime
from edgemoe_llamacpp.cache.config import CacheConfig
from edgemoe_llamacpp.cache.dense_hold import DenseHold
from edgemoe_llamacpp.cache.predict import Lookahead, make_predictor
from edgemoe_llamacpp.cache.residency import BudgetMode
from edgemoe_llamacpp.engine import loading
from edgemoe_llamacpp.engine.arguments import (
    ArgumentChecks,
    bind,
    check_context,
    check_sample_position,
    context_errors,
    is_int,
)
from edgemoe_llamacpp.engine.guard import CallGuard, Stream, serialised
from edgemoe_llamacpp.engine.hook import ExpertHook
from edgemoe_llamacpp.engine.injection import InjectedLlama, routing_label
from edgemoe_llamacpp.engine.sampling import sample_within_grammar
from edgemoe_llamacpp.engine.substitute import ExpertPointers, weight_above
from edgemoe_llamacpp.errors import ArgumentError, BudgetError, EdgeMoEError, MixedTypesError
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
            p.cb_eval_user_data = cb_eval_user_data
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


@dataclass
class TokenCounts:
    """Tokens a Llama evaluated for prompts and tokens it sampled, since it was loaded (what `edgemoe serve`'s
    /metrics reports as prompt tokens processed and tokens generated)."""

    prompt: int = 0                 # evaluated, other than a token just sampled (a reused prefix is not)
    generated: int = 0              # sampled
    _last: int | None = field(default=None, repr=False)    # the token sampled last, until it is evaluated

    def sampled(self, token: int) -> None:
        self.generated += 1
        self._last = token

    def evaluated(self, tokens) -> None:
        n = len(tokens)
        if n and self._last is not None and tokens[0] == self._last:
            n -= 1                  # the sampled token, fed back
        self._last = None
        self.prompt += n


class Llama(llama_cpp.Llama):
    """Drop-in `llama_cpp.Llama` for MoE GGUFs: same constructor and methods, plus the expert cache's options,
    as keywords or as one `cache=CacheConfig(...)` (edgemoe_llamacpp.cache.config), not both:

    memory_budget: bytes held by experts in memory: an int, "1.5GiB", "800MB", or "50%" of the expert
        bytes; None for no limit (experts are still tracked).
    policy: which expert to evict: "nextuse" (default: the one whose next use, estimated from how often it
        is chosen and when its layer runs again, lies farthest), "distance" (the least often chosen, weighted
        by how soon its layer runs again), "lru", "lfu" or "hobbit" (recency + frequency + layer distance,
        per sequence).
    fetch_threads: parallel readers for expert fetches (default 4).
    predictor: guess the next layers' experts and read them ahead while this layer computes: "gate"
        (the next routers applied to this layer's FFN input), "table" (co-occurrence counts, learned as it
        runs), "frequency", or None (no prefetch). Needs a memory budget below 100%.
    prefetch_depth: how many MoE layers ahead to prefetch (1-3, default 1).
    prefetch_threads: background readers for prefetches (default 2).
    substitute: run a missed expert from its low-bit copy (a file from `edgemoe convert --lowbit`) when the
        experts ranked above it carry more than this share of the token's gate weight (HOBBIT; 0.6 is its
        Mixtral setting); None (default) runs every expert at full precision: output identical to stock.
    record_routing: keep every layer's chosen experts (`edgemoe_trace()`), for profiles and benchmarks.
    route_injector: benchmarks and replay only: an injector (engine.injection; edgemoe_bench.inject.trace_injector
        makes one from a routing trace) whose experts replace the router's choice at every MoE layer. The output
        is then not the model's own; `edgemoe_stats()["routing"]` says "injected: <source>".

    Unlike llama_cpp.Llama, it is safe to share: calls on one instance are serialised by a lock (a stream
    takes it for each step), a call after close() raises LlamaClosedError, and arguments llama.cpp would crash
    on (token ids outside the vocabulary, a grammar that does not parse, non-finite sampling values, an
    empty prompt) raise ArgumentError, a ValueError, before anything runs; a streamed completion checks its
    prompt against the context window when it is created, not at its first chunk.
    """

    def __init__(self, model_path: str, *args, cache: CacheConfig | None = None, record_routing: bool = False,
                 route_injector=None, **kwargs):
        self._edgemoe_guard = CallGuard()        # one call at a time; closed; the open stream
        self._edgemoe_formatting = False         # a chat handler is formatting messages, no completion yet
        self._edgemoe_logits: tuple[int, int] | None = None   # token positions whose logits sample() may use
        self._edgemoe_tokens = TokenCounts()
        self._edgemoe_config = config = CacheConfig.take(kwargs, cache)   # checked before any file is read
        self._edgemoe_record_routing = record_routing
        if kwargs.get("use_mmap") is False or kwargs.get("use_mlock"):
            raise EdgeMoEError("edgemoe streams experts through llama.cpp's file mapping: use_mmap must stay "
                               "on and use_mlock off")
        layout = read_layout(model_path)
        require_runtime_for(layout)
        self._edgemoe_layout = layout
        self._edgemoe_pointers = None
        self._edgemoe_injector = route_injector
        self._edgemoe_dense = DenseHold("off", 0, [])    # dense pages held from reclaim (under a budget)
        self._edgemoe_cache = cache = config.make_cache(layout)
        limit = limits.memory_limit()
        if limit is not None and limit < layout.dense_bytes + cache.min_budget:
            cache.close()
            raise BudgetError(f"this process may use {limit:,} bytes (its cgroup's memory limit), but "
                              f"{model_path} needs at least {layout.dense_bytes + cache.min_budget:,}: "
                              f"{layout.dense_bytes:,} of dense weights and {cache.min_budget:,} for one "
                              f"layer's chosen experts")
        self._edgemoe_trace: list[tuple[int, list[list[int]]]] | None = [] if record_routing else None
        self._edgemoe_lookahead = None
        if config.predictor is not None:
            try:
                pred = make_predictor(config.predictor, model_path, layout)
                self._edgemoe_lookahead = Lookahead(pred, cache, layout, config.prefetch_depth)
            except BaseException:
                cache.close()
                raise
        hidden = self._edgemoe_lookahead.predictor.hidden_node if self._edgemoe_lookahead else None
        self._edgemoe_hook = hook = ExpertHook(on_route=self._on_route, hidden_node=hidden,
                                               want_weights=cache.substitute is not None,
                                               inject=self._edgemoe_injector)
        if self._edgemoe_lookahead is None and cache.substitute is None:
            # no layer needs Python when its experts are all resident: the runtime lets it pass (patches/0005)
            hook.pass_resident(cache.ledger.ready, self._on_logged)
        before = [set(pages.file_mappings(path)) for path in layout.files]
        if any(before):
            log.warning("%s is already mapped in this process: pages another instance keeps mapped cannot be "
                        "dropped, so the memory budget may not hold", model_path)
        try:
            if cache.mode.streams and not any(before):
                # Pages of the file already cached (just written, downloaded, or read by an earlier run) can sit
                # in large folios; once llama.cpp maps its dense tensors, a folio shared with expert bytes can
                # no longer be dropped. Drop them while nothing maps the file: the load then reads it in
                # readahead-sized folios and the start-up drop (cache.attach) releases all but the edges.
                for path in layout.files:
                    limits.drop_file_cache(path)
            # Under a budget the file is mapped without llama.cpp's whole-file read (LLAMA_MMAP_PREFETCH=0,
            # patches/0003); loading.read_dense then reads the dense bytes only, with read-around off.
            # llama.cpp opens a split model's shard 1 and finds the others by name.
            with llama_params(use_extra_bufts=False, mmap_prefetch=cache.mode is BudgetMode.UNLIMITED, **hook.cb_eval_args()):
                super().__init__(layout.path, *args, **kwargs)
            # llama.cpp pads the context (to 256 tokens); llama-cpp-python takes the padded size as its window
            # but sizes its token buffer by the n_ctx asked for, and a prompt between the two overran that
            # buffer (ValueError deep in eval). The window is what the buffer holds.
            self._n_ctx = min(self._n_ctx, len(self.input_ids))
            new = _new_mappings(layout, before)
            bases = [rows[0][0] - rows[0][2] for rows in new]
            if cache.mode is not BudgetMode.UNLIMITED:
                loading.read_dense(layout, new)
            if layout.mixed or cache.substitute is not None:
                _types.add(self, layout, bases, every=cache.substitute is not None)
            if cache.substitute is not None:
                self._edgemoe_pointers = ExpertPointers(layout, bases)
            cache.attach(bases, mapped=[(min(off for _, _, off, _ in rows),
                                         max(off + end - start for start, end, off, _ in rows)) for rows in new])
            if cache.mode.streams:
                self._edgemoe_dense = loading.hold_dense(layout, new, config.hold_dense)
        except BaseException:
            self.close()
            raise
        self._edgemoe_checks = ArgumentChecks(n_vocab=self._n_vocab, vocab=self._model.vocab,
                                              logits_all=self._logits_all,
                                              embeddings=bool(self.context_params.embeddings))
        self._edgemoe_snapshot = self._counters()

    # ------------------------------------------------------------------ one call at a time
    def _edgemoe_call(self, generation: bool = False):
        """The guard's `call`: the instance lock for one call; yields True for the outermost call."""
        return self._edgemoe_guard.call(generation)

    def _open_stream(self, gen) -> Stream:
        with context_errors():
            return self._edgemoe_guard.open_stream(gen)

    # ------------------------------------------------------------------ generation
    def create_completion(self, *args, **kwargs):
        with self._edgemoe_call(generation=True) as outer:
            self._edgemoe_formatting = False       # a chat handler got this far: its messages are formatted
            call = bind(llama_cpp.Llama.create_completion, self, args, kwargs)
            self._edgemoe_checks.completion(call)
            with context_errors():
                result = super().create_completion(**call)
            return self._open_stream(result) if call["stream"] and outer else result

    def __call__(self, *args, **kwargs):
        return self.create_completion(*args, **kwargs)

    def create_chat_completion(self, *args, **kwargs):
        with self._edgemoe_call(generation=True) as outer:
            call = bind(llama_cpp.Llama.create_chat_completion, self, args, kwargs)
            if not isinstance(call["messages"], list):
                raise ArgumentError("messages must be a list")
            if call["logprobs"]:
                self._edgemoe_checks.logprobs("top_logprobs", call["top_logprobs"])
            self._edgemoe_formatting = True
            try:
                result = super().create_chat_completion(**call)
            except (ValueError, TypeError, LookupError, AttributeError, jinja2.TemplateError) as e:
                if not self._edgemoe_formatting or isinstance(e, EdgeMoEError):
                    raise
                raise ArgumentError(f"these messages do not fit the model's chat format ({type(e).__name__}: "
                                    f"{str(e)[:200]})") from e
            finally:
                self._edgemoe_formatting = False
            return self._open_stream(result) if call["stream"] and outer else result

    def generate(self, *args, **kwargs):
        with self._edgemoe_call(generation=True) as outer:
            if not outer:
                return super().generate(*args, **kwargs)
            call = bind(llama_cpp.Llama.generate, self, args, kwargs)
            tokens = call["tokens"]
            self._edgemoe_checks.tokens(tokens, "tokens")
            if len(tokens) == 0 and self.n_tokens == 0:
                raise ArgumentError("generate() needs at least one token to start from")
            check_context(len(tokens), self._n_ctx)
            self._edgemoe_checks.sampling(call, llama_cpp.Llama.generate)
            return self._edgemoe_guard.open_stream(super().generate(**call), prime=False)

    def create_embedding(self, *args, **kwargs):
        with self._edgemoe_call(generation=True) as outer:
            if outer:
                self._edgemoe_checks.embedding(bind(llama_cpp.Llama.create_embedding, self, args, kwargs)["input"])
            with self._edgemoe_hook.evaluation():
                return super().create_embedding(*args, **kwargs)

    def embed(self, *args, **kwargs):
        with self._edgemoe_call(generation=True) as outer:
            if outer:
                self._edgemoe_checks.embedding(bind(llama_cpp.Llama.embed, self, args, kwargs)["input"])
            with self._edgemoe_hook.evaluation():
                return super().embed(*args, **kwargs)

    # ------------------------------------------------------------------ evaluation
    def eval(self, tokens) -> None:
        with self._edgemoe_call(generation=True) as outer:
            if outer:
                self._edgemoe_checks.tokens(tokens, "tokens")
                check_context(self.n_tokens + len(tokens), self._n_ctx)
            if self._edgemoe_injector is not None:
                self._edgemoe_injector.position = self.n_tokens
            before = self.n_tokens
            try:
                with self._edgemoe_hook.evaluation():
                    super().eval(tokens)
            except BaseException:
                # interrupted or failed part-way: the tokens' cache entries are incomplete; the next eval
                # overwrites them (llama-cpp-python clears the cache from n_tokens on)
                self.n_tokens, self._edgemoe_logits = before, None
                raise
            self._edgemoe_tokens.evaluated(tokens)
            if len(tokens):
                last = len(tokens) % self.n_batch or self.n_batch   # llama.cpp keeps the last batch's logits
                self._edgemoe_logits = (self.n_tokens - (last if self._logits_all else 1), self.n_tokens)
            self._edgemoe_snapshot = self._counters()

    def sample(self, *args, **kwargs):
        with self._edgemoe_call(generation=True) as outer:
            if outer:
                call = bind(llama_cpp.Llama.sample, self, args, kwargs)
                self._edgemoe_checks.sampling(call, llama_cpp.Llama.sample)
                check_sample_position(call["idx"], self._edgemoe_logits)
                args, kwargs = (), call
            token = super().sample(*args, **kwargs)
            self._edgemoe_tokens.sampled(token)
            return token

    def _init_sampler(self, *args, **kwargs):
        sampler = super()._init_sampler(*args, **kwargs)
        if kwargs.get("grammar") is not None:
            sampler.sample = functools.partial(sample_within_grammar, sampler, n_vocab=self._n_vocab,
                                               eos=self._token_eos)
        return sampler

    def reset(self) -> None:
        with self._edgemoe_call(generation=True):
            super().reset()
            self._edgemoe_logits = None
            self._edgemoe_cache.new_sequence()

    def load_state(self, state) -> None:
        with self._edgemoe_call(generation=True):
            super().load_state(state)
            self._edgemoe_logits = None

    # ------------------------------------------------------------------ tokens
    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        with self._edgemoe_call() as outer:
            if outer and not isinstance(text, bytes):
                raise ArgumentError(f"tokenize() takes UTF-8 bytes, not {type(text).__name__}")
            return super().tokenize(text, add_bos, special)

    def detokenize(self, tokens, prev_tokens=None, special: bool = False) -> bytes:
        with self._edgemoe_call() as outer:
            if outer:            # llama.cpp aborts the process on an id outside the vocabulary
                self._edgemoe_checks.tokens(tokens, "tokens")
                if prev_tokens is not None:
                    self._edgemoe_checks.tokens(prev_tokens, "prev_tokens")
            return super().detokenize(tokens, prev_tokens, special)

    def set_seed(self, seed: int) -> None:
        with self._edgemoe_call():
            if not is_int(seed):
                raise ArgumentError(f"seed must be an integer, not {seed!r}")
            super().set_seed(seed)

    save_state = serialised(llama_cpp.Llama.save_state)
    set_cache = serialised(llama_cpp.Llama.set_cache)
    n_ctx = serialised(llama_cpp.Llama.n_ctx)
    n_embd = serialised(llama_cpp.Llama.n_embd)
    n_vocab = serialised(llama_cpp.Llama.n_vocab)
    tokenizer = serialised(llama_cpp.Llama.tokenizer)
    token_eos = serialised(llama_cpp.Llama.token_eos)
    token_bos = serialised(llama_cpp.Llama.token_bos)
    token_nl = serialised(llama_cpp.Llama.token_nl)
    pooling_type = serialised(llama_cpp.Llama.pooling_type)

    # ------------------------------------------------------------------ edgemoe
    def _on_route(self, layer: int, ids, hidden=None, weights=None) -> None:
        if self._edgemoe_trace is not None:
            self._edgemoe_trace.append((layer, ids.tolist()))
        above = None if weights is None else weight_above(ids, weights)
        low = self._edgemoe_cache.ensure_ids(layer, ids, above)
        if len(ids) > 1:                    # a prompt batch: the next layer's experts are read while this computes
            self._edgemoe_cache.prefetch_batch(layer, len(ids))
        if self._edgemoe_pointers is not None:
            self._edgemoe_pointers.point(layer, ids.ravel().tolist(), low)
        if self._edgemoe_lookahead is not None:
            self._edgemoe_lookahead(layer, ids, hidden)

    def _on_logged(self, layer: int, ids) -> None:
        if self._edgemoe_trace is not None:
            self._edgemoe_trace.append((layer, ids.tolist()))
        self._edgemoe_cache.hits(layer, ids)

    @property
    def route_injector(self):
        """The injector computing this Llama's routing (None: the router's own)."""
        return self._edgemoe_injector

    def edgemoe_trace(self) -> list[tuple[int, list[list[int]]]]:
        """(layer, chosen experts per token) for every MoE layer evaluation, in order (record_routing=True)."""
        with self._edgemoe_call():
            if self._edgemoe_trace is None:
                raise EdgeMoEError("routing was not recorded: construct with record_routing=True")
            self._edgemoe_hook.drain()
            return self._edgemoe_trace

    def _counters(self) -> tuple:
        """The figures edgemoe_stats() reports, copied cheaply: taken after every evaluation (a dict of the
        cache's totals there would cost a large share of a small model's token), formatted when read."""
        hook, tokens = self._edgemoe_hook, self._edgemoe_tokens
        hook.drain()
        return (hook.routes, hook.us_per_call, tokens.prompt, tokens.generated, self._edgemoe_cache.counters())

    def _stats(self, counters: tuple) -> dict:
        routes, us_per_call, prompt, generated, cache = counters
        return {"routes": routes, "hook_us_per_layer": us_per_call, "hook_native_filter": self._edgemoe_hook.native_filter,
                **self._edgemoe_cache.summary(cache),
                "predictor": self._edgemoe_config.predictor,
                "routing": routing_label(self._edgemoe_injector),
                "prefetch_depth": self._edgemoe_lookahead.depth if self._edgemoe_lookahead else 0,
                "dense_hold": self._edgemoe_dense.to_dict(),
                "tokens": {"prompt": prompt, "generated": generated}}

    def edgemoe_stats(self) -> dict:
        """Per-layer and total hits, misses, bytes fetched/evicted, stall seconds, resident expert bytes; tokens
        evaluated for prompts and tokens sampled.

        Never waits: while another thread is inside a call, it returns the figures as of the last evaluation."""
        return self._edgemoe_guard.read(lambda: self._stats(self._counters()),
                                        lambda: self._stats(self._edgemoe_snapshot))

    def edgemoe_measured_resident_bytes(self) -> int:
        """Expert bytes in memory as the kernel reports them (mincore over every expert tensor, drops in flight
        finished first): what the memory budget must hold, checked rather than counted."""
        with self._edgemoe_call():
            return self._edgemoe_cache.measured_resident_bytes()

    def __getstate__(self) -> dict:
        """llama_cpp.Llama pickles its constructor arguments (unpickling loads the model again): ours too."""
        with self._edgemoe_call():
            return {**super().__getstate__(), **self._edgemoe_config.to_dict(),
                    "record_routing": self._edgemoe_record_routing, "route_injector": self._edgemoe_injector}

    def close(self) -> None:
        """Free the model; waits for a call in progress. Later calls raise LlamaClosedError."""
        guard = self.__dict__.get("_edgemoe_guard")
        with guard.closing() if guard is not None else contextlib.nullcontext(True) as first:
            if not first:
                return
            cache = getattr(self, "_edgemoe_cache", None)
            if cache is not None:
                cache.close()                 # first: prefetch reads in flight finish before the mapping goes
            if hasattr(self, "_stack"):       # absent when a bad file or budget stopped __init__ early
                super().close()
            _types.remove(self)

"""`edgemoe_llamacpp.Llama`: llama-cpp-python's Llama with experts streamed under a memory budget."""
from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import inspect
import logging
import math
import os
import re
import threading
import weakref

import jinja2
import llama_cpp
import llama_cpp.llama_cpp as lc
import numpy as np

from . import cgroup, quant, runtime
from .errors import (
    ArgumentError,
    BudgetError,
    ContextLengthError,
    EdgeMoEError,
    LlamaBusyError,
    LlamaClosedError,
    MixedTypesError,
)
from .hook import ExpertHook
from .layout import MoELayout, read_layout
from .predict import MAX_DEPTH, PREDICTORS, Lookahead, make_predictor
from .residency import POLICIES, ExpertCache, parse_budget
from .substitute import ExpertPointers, weight_above

_params_lock = threading.Lock()
PREFETCH_ENV = "LLAMA_MMAP_PREFETCH"     # read by the patched loader (patches/0003)
log = logging.getLogger(__name__)
CONTEXT_EXCEEDED = re.compile(r"Requested tokens \((\d+)\) exceed context window of (\d+)")
MAX_THREADS = 1024
# llama.cpp parses GBNF recursively, one C++ frame per nesting level: deep nesting overflows the thread's stack
MAX_GRAMMAR_DEPTH = 64
MAX_GRAMMAR_BYTES = 1 << 20


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
    """The patched kernel's per-expert types. The patched loader registers them when it loads a file that requires
    them (`edgemoe.required_features`) and drops them when the model is freed (patches/0002); this checks, for
    every live Llama of this process, that the copy of ggml-cpu llama.cpp computes with holds them."""

    def __init__(self):
        self._by_owner: dict[int, list[tuple[str, int, list[int], list[int]]]] = {}

    def add(self, owner: object, layout: MoELayout, mapping_base: int, every: bool = False) -> None:
        """Check the tensors with per-expert types, or (every=True, for substitution) every stacked one with
        low-bit copies, are registered at the file's types and slots."""
        entries = []
        for t in layout.expert_tensors:
            if t.types is None and not (every and t.low is not None):
                continue
            types = [int(quant.qtype(t.slice(e).type)) for e in range(t.count)]
            pointers = [mapping_base + t.slice(e).offset for e in range(t.count)]
            entries.append((t.name, mapping_base + t.offset, types, pointers))
        try:
            for entry in entries:
                runtime.check_registered(*entry)
        except RuntimeError as e:
            raise EdgeMoEError(f"{layout.path}: {e}") from None
        self._by_owner[id(owner)] = entries

    def remove(self, owner: object) -> None:
        self._by_owner.pop(id(owner), None)      # the loader unregistered them with the model


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
    if layout.needs_patched_runtime and "required_features" not in (layout.edgemoe or {}):
        raise MixedTypesError(f"{layout.path} was written by an older edgemoe convert: it does not name the features "
                              f"it needs (edgemoe.required_features), so llama.cpp refuses it. Convert it again")


def stock_llama(model_path: str, *, use_extra_bufts: bool = True, **kwargs) -> llama_cpp.Llama:
    """Plain llama-cpp-python, optionally without the CPU repack (the same compute path edgemoe uses)."""
    layout = read_layout(model_path)
    if layout.needs_patched_runtime:
        what = "per-expert types" if layout.mixed else "low-bit copies of its experts"
        raise MixedTypesError(f"{model_path} has {what}: only edgemoe_llamacpp.Llama runs it")
    with llama_params(use_extra_bufts=use_extra_bufts):
        return llama_cpp.Llama(model_path=str(model_path), **kwargs)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


def check_options(*, memory_budget, policy, fetch_threads, predictor, prefetch_depth, prefetch_threads,
                  substitute) -> None:
    """edgemoe's constructor options, refused with a clear error before any file is read."""
    if isinstance(memory_budget, (float, np.floating)) and not math.isfinite(memory_budget):
        raise BudgetError(f"memory budget {memory_budget} is not a finite size")
    if policy not in POLICIES:
        raise BudgetError(f"unknown cache policy {policy!r}; choose from {', '.join(POLICIES)}")
    if predictor is not None and predictor not in PREDICTORS:
        raise ArgumentError(f"unknown predictor {predictor!r}; choose from {', '.join(PREDICTORS)} or None")
    for name, value, hi in (("fetch_threads", fetch_threads, MAX_THREADS),
                            ("prefetch_threads", prefetch_threads, MAX_THREADS),
                            ("prefetch_depth", prefetch_depth, MAX_DEPTH)):
        if not _is_int(value) or not 1 <= value <= hi:
            raise ArgumentError(f"{name} must be an integer from 1 to {hi}, not {value!r}")
    if substitute is not None and not (_is_real(substitute) and 0 <= substitute < 1):
        raise ArgumentError(f"substitute is a share of the gate weight in [0, 1), not {substitute!r}")


def grammar_depth(text: str) -> int:
    """The deepest parenthesis nesting of a GBNF grammar (quoted strings, character classes and comments
    skipped), which is how deep llama.cpp's parser recurses."""
    depth = deepest = i = 0
    while i < len(text):
        c = text[i]
        if c in "\"[":
            close, i = '"' if c == '"' else "]", i + 1
            while i < len(text) and text[i] != close:
                i += 2 if text[i] == "\\" else 1
        elif c == "#":
            while i < len(text) and text[i] not in "\r\n":
                i += 1
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth -= 1
        i += 1
    return deepest


@functools.cache
def _signature(fn) -> inspect.Signature:
    return inspect.signature(fn)


def _bind(fn, self, args, kwargs) -> dict:
    """Every argument of a call of llama_cpp.Llama.`fn`, by name, defaults filled in."""
    bound = _signature(fn).bind(self, *args, **kwargs)
    bound.apply_defaults()
    return {k: v for k, v in bound.arguments.items() if k != "self"}


@contextlib.contextmanager
def _context_errors():
    """llama-cpp-python's "Requested tokens (N) exceed context window of M" as a ContextLengthError."""
    try:
        yield
    except ValueError as e:
        if isinstance(e, EdgeMoEError) or not CONTEXT_EXCEEDED.search(str(e)):
            raise
        raise ContextLengthError(f"{e}: shorten the prompt, or load the model with a larger n_ctx") from None


_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])   # llama_token_data


def _sample_within_grammar(sampler, ctx, idx: int, n_vocab: int, eos: int) -> int:
    """llama_sampler_sample, except that a grammar that admits no token ends the text (`eos`) instead of
    aborting the process: llama.cpp would accept the -inf token its dist sampler drew anyway, find no grammar
    stack left, and throw through its C API ("Unexpected empty grammar stack")."""
    logits = lc.llama_get_logits_ith(ctx.ctx, idx)
    if not logits:
        raise ArgumentError(f"no logits at position {idx} to sample from")
    cur = np.empty(n_vocab, dtype=_TOKEN_DATA)
    cur["id"] = np.arange(n_vocab, dtype=np.int32)
    cur["logit"] = np.ctypeslib.as_array(logits, shape=(n_vocab,))
    cur["p"] = 0.0
    cur_p = lc.llama_token_data_array(data=cur.ctypes.data_as(lc.llama_token_data_p), size=n_vocab, selected=-1,
                                      sorted=False)
    lc.llama_sampler_apply(sampler.sampler, ctypes.byref(cur_p))
    if not 0 <= cur_p.selected < cur_p.size:
        raise RuntimeError(f"llama.cpp's samplers selected no token ({cur_p.selected})")
    chosen = cur_p.data[cur_p.selected]
    if math.isinf(chosen.logit) and chosen.logit < 0:
        if eos < 0:
            raise ArgumentError("the grammar admits no token after this text, and the model has no end token")
        log.warning("the grammar admits no token after this text: ending it")
        return eos
    lc.llama_sampler_accept(sampler.sampler, chosen.id)
    return chosen.id


class _Stream:
    """A streamed completion, or generate(), of one Llama.

    Each step runs under the Llama's lock, so the steps may come from different threads (the server takes
    them from its threadpool). Until it ends it is the Llama's open stream: a new generation started by the
    thread that last stepped it ends it (that thread moved on); one from another thread is refused."""

    _NOTHING = object()

    def __init__(self, llama: Llama, gen):
        self._llama, self._gen = llama, gen
        self._first = _Stream._NOTHING
        self.done = self.superseded = False
        self.thread = threading.get_ident()

    def __iter__(self):
        return self

    def __next__(self):
        return self.send(None)

    def send(self, value):
        with self._llama._edgemoe_call():
            if self.superseded:
                raise LlamaBusyError("this stream was ended by a later generation on the same Llama, which runs "
                                     "one generation at a time")
            if self.done:
                raise StopIteration
            self.thread = threading.get_ident()
            if self._first is not _Stream._NOTHING:
                first, self._first = self._first, _Stream._NOTHING
                return first
            try:
                return self._gen.send(value)
            except BaseException:
                self.done = True
                raise

    def prime(self) -> None:
        """Run to the first item now (the caller holds the lock), so that what fails before generation starts
        (the context window, the arguments) fails in the call that opened the stream."""
        try:
            self._first = next(self._gen)
        except StopIteration:
            self.done = True
        except BaseException:
            self.done = True
            raise

    def close(self, superseded: bool = False) -> None:
        with self._llama._edgemoe_lock:
            if not self.done:
                self.done, self.superseded = True, superseded
                self._gen.close()


def _serialised(name: str, generation: bool = False):
    """llama_cpp.Llama.`name`, called under the instance lock and refused once the Llama is closed."""
    base = getattr(llama_cpp.Llama, name)

    @functools.wraps(base)
    def method(self, *args, **kwargs):
        with self._edgemoe_call(generation=generation):
            return base(self, *args, **kwargs)
    return method


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

    Unlike llama_cpp.Llama, it is safe to share: calls on one instance are serialised by a lock (a stream
    takes it for each step), a call after close() raises LlamaClosedError, and arguments llama.cpp would crash
    on (token ids outside the vocabulary, a grammar that does not parse, non-finite sampling values, an
    empty prompt) raise ArgumentError, a ValueError, before anything runs; a streamed completion checks its
    prompt against the context window when it is created, not at its first chunk.
    """

    def __init__(self, model_path: str, *args, memory_budget: str | int | None = None, policy: str = "distance",
                 fetch_threads: int = 4, record_routing: bool = False, predictor: str | None = None,
                 prefetch_depth: int = 1, prefetch_threads: int = 2, substitute: float | None = None, **kwargs):
        self._edgemoe_lock = threading.RLock()   # held by every call, and by each step of a stream
        self._edgemoe_closed = False
        self._edgemoe_depth = 0                  # calls in progress (nested ones come from llama-cpp-python)
        self._edgemoe_stream: weakref.ref | None = None
        self._edgemoe_formatting = False         # a chat handler is formatting messages, no completion yet
        self._edgemoe_logits: tuple[int, int] | None = None   # token positions whose logits sample() may use
        options = {"memory_budget": memory_budget, "policy": policy, "fetch_threads": fetch_threads,
                   "predictor": predictor, "prefetch_depth": prefetch_depth, "prefetch_threads": prefetch_threads,
                   "substitute": substitute}
        check_options(**options)
        self._edgemoe_options = {**options, "record_routing": record_routing}   # for pickling
        if kwargs.get("use_mmap") is False or kwargs.get("use_mlock"):
            raise EdgeMoEError("edgemoe streams experts through llama.cpp's file mapping: use_mmap must stay "
                               "on and use_mlock off")
        layout = read_layout(model_path)
        require_runtime_for(layout)
        budget = parse_budget(memory_budget, layout.expert_bytes)
        if substitute is not None and not layout.lowbit_type:
            raise EdgeMoEError(f"{model_path} has no low-bit copies of its experts to substitute; write them "
                               f"with: edgemoe convert IN OUT --uniform TYPE --lowbit Q2_K")
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
        self._edgemoe_snapshot = self._stats_now()

    # ------------------------------------------------------------------ one call at a time
    @contextlib.contextmanager
    def _edgemoe_call(self, generation: bool = False):
        """Hold the instance lock for a call; yields True for the outermost call (the caller's, not one
        llama-cpp-python makes from inside another). A generation first ends or refuses an open stream."""
        with self._edgemoe_lock:
            if self._edgemoe_closed:
                raise LlamaClosedError("this Llama is closed")
            outer = self._edgemoe_depth == 0
            if generation and outer:
                self._end_open_stream()
            self._edgemoe_depth += 1
            try:
                yield outer
            finally:
                self._edgemoe_depth -= 1

    def _end_open_stream(self) -> None:
        stream = self._edgemoe_stream() if self._edgemoe_stream is not None else None
        if stream is None or stream.done:
            self._edgemoe_stream = None
            return
        if stream.thread != threading.get_ident():
            raise LlamaBusyError("this Llama is streaming a completion for another thread, and runs one generation "
                                 "at a time: finish or close() that stream first, or give each thread its own Llama")
        stream.close(superseded=True)
        self._edgemoe_stream = None

    def _open_stream(self, gen) -> _Stream:
        stream = _Stream(self, gen)
        with _context_errors():
            stream.prime()
        self._edgemoe_stream = weakref.ref(stream)
        return stream

    # ------------------------------------------------------------------ argument checks
    def _check_tokens(self, tokens, what: str) -> None:
        n = self._n_vocab
        try:
            bad = [t for t in tokens if not _is_int(t) or not 0 <= t < n]
        except TypeError:
            raise ArgumentError(f"{what} must be a list of token ids") from None
        if bad:
            shown = ", ".join(repr(t)[:24] for t in bad[:4])
            raise ArgumentError(f"{what}: token ids are integers from 0 to {n - 1} (this model's vocabulary), "
                                f"not {shown}")

    @staticmethod
    def _check_text(what: str, text) -> None:
        if not isinstance(text, str):
            raise ArgumentError(f"{what} must be a string, not {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ArgumentError(f"{what} is not valid Unicode text (it holds a lone surrogate)") from None

    def _check_sampling(self, args: dict, fn) -> None:
        """Sampling arguments of a call of llama_cpp.Llama.`fn` (bound by name); None means the default."""
        defaults = _signature(fn).parameters
        for name in ("temperature", "temp", "top_p", "min_p", "typical_p", "frequency_penalty", "presence_penalty",
                     "repeat_penalty", "tfs_z", "mirostat_tau", "mirostat_eta"):
            if name not in args:
                continue
            if args[name] is None:
                args[name] = defaults[name].default
            elif not _is_real(args[name]):
                raise ArgumentError(f"{name} must be a finite number, not {args[name]!r}")
        if "top_k" in args and not _is_int(args["top_k"]):
            raise ArgumentError(f"top_k must be an integer, not {args['top_k']!r}")
        if args.get("mirostat_mode", 0) not in (0, 1, 2) or isinstance(args.get("mirostat_mode"), bool):
            raise ArgumentError(f"mirostat_mode is 0, 1 or 2, not {args['mirostat_mode']!r}")
        if args.get("seed") is not None and not _is_int(args["seed"]):
            raise ArgumentError(f"seed must be an integer, not {args['seed']!r}")
        self._check_logit_bias(args.get("logit_bias"))
        self._check_grammar(args.get("grammar"))

    def _check_logit_bias(self, bias) -> None:
        if bias is None:
            return
        if not isinstance(bias, dict):
            raise ArgumentError("logit_bias maps token ids to biases")
        for key, value in bias.items():
            if isinstance(key, str) and re.fullmatch(r"\s*[+-]?\d{1,12}\s*", key):
                key = int(key)
            if not _is_int(key) or not 0 <= key < self._n_vocab:
                raise ArgumentError(f"logit_bias: token ids are integers from 0 to {self._n_vocab - 1} (this "
                                    f"model's vocabulary), not {str(key)[:24]!r}")
            if not _is_real(value):
                raise ArgumentError(f"logit_bias: the bias of token {key} must be a finite number, not {value!r}")

    def _check_grammar(self, grammar) -> None:
        """Parse it with llama.cpp now: a grammar it refuses would be a NULL sampler, and a crash, later."""
        if grammar is None:
            return
        text, root = getattr(grammar, "_grammar", None), getattr(grammar, "_root", None)
        if not isinstance(text, str) or not isinstance(root, str):
            raise ArgumentError(f"grammar must be a llama_cpp.LlamaGrammar, not {type(grammar).__name__}")
        self._check_text("grammar", text)
        if len(text.encode("utf-8")) > MAX_GRAMMAR_BYTES:
            raise ArgumentError(f"the grammar is longer than {MAX_GRAMMAR_BYTES:,} bytes")
        if grammar_depth(text) > MAX_GRAMMAR_DEPTH:
            raise ArgumentError(f"the grammar nests parentheses deeper than {MAX_GRAMMAR_DEPTH} levels")
        sampler = lc.llama_sampler_init_grammar(self._model.vocab, text.encode("utf-8"), root.encode("utf-8"))
        if not sampler:
            raise ArgumentError("the grammar does not parse as GBNF (llama.cpp's parser printed why to the log)")
        lc.llama_sampler_free(sampler)

    def _check_completion(self, args: dict) -> None:
        prompt = args["prompt"]
        if isinstance(prompt, str):
            self._check_text("prompt", prompt)
        elif isinstance(prompt, list):
            self._check_tokens(prompt, "prompt")
        else:
            raise ArgumentError(f"prompt must be a string or a list of token ids, not {type(prompt).__name__}")
        if args["suffix"] is not None:
            self._check_text("suffix", args["suffix"])
        if len(prompt) == 0:     # llama-cpp-python would start from a BOS token it never evaluates
            raise ArgumentError("the prompt is empty: give at least one token (text, or a list of token ids "
                                "such as [BOS])")
        stop = args["stop"]
        for s in [stop] if isinstance(stop, str) else (stop or []):
            self._check_text("stop", s)
        if args["max_tokens"] is not None and not _is_int(args["max_tokens"]):
            raise ArgumentError(f"max_tokens must be an integer or None, not {args['max_tokens']!r}")
        self._check_logprobs("logprobs", args["logprobs"])
        self._check_sampling(args, llama_cpp.Llama.create_completion)

    def _check_logprobs(self, what: str, n) -> None:
        if n is None:
            return
        if not _is_int(n) or not 0 <= n <= self._n_vocab:
            raise ArgumentError(f"{what} must be an integer from 0 to {self._n_vocab}, not {n!r}")
        if not self._logits_all:
            raise ArgumentError(f"{what} needs the model loaded with logits_all=True")

    # ------------------------------------------------------------------ generation
    def create_completion(self, *args, **kwargs):
        with self._edgemoe_call(generation=True) as outer:
            self._edgemoe_formatting = False       # a chat handler got this far: its messages are formatted
            call = _bind(llama_cpp.Llama.create_completion, self, args, kwargs)
            self._check_completion(call)
            with _context_errors():
                result = super().create_completion(**call)
            return self._open_stream(result) if call["stream"] and outer else result

    def __call__(self, *args, **kwargs):
        return self.create_completion(*args, **kwargs)

    def create_chat_completion(self, *args, **kwargs):
        with self._edgemoe_call(generation=True) as outer:
            call = _bind(llama_cpp.Llama.create_chat_completion, self, args, kwargs)
            if not isinstance(call["messages"], list):
                raise ArgumentError("messages must be a list")
            if call["logprobs"]:
                self._check_logprobs("top_logprobs", call["top_logprobs"])
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
            call = _bind(llama_cpp.Llama.generate, self, args, kwargs)
            tokens = call["tokens"]
            self._check_tokens(tokens, "tokens")
            if len(tokens) == 0 and self.n_tokens == 0:
                raise ArgumentError("generate() needs at least one token to start from")
            if len(tokens) > self._n_ctx:
                raise ContextLengthError(f"Requested tokens ({len(tokens)}) exceed context window of {self._n_ctx}")
            self._check_sampling(call, llama_cpp.Llama.generate)
            stream = _Stream(self, super().generate(**call))
            self._edgemoe_stream = weakref.ref(stream)
            return stream

    def create_embedding(self, *args, **kwargs):
        with self._edgemoe_call(generation=True) as outer:
            if outer:
                self._check_embedding(_bind(llama_cpp.Llama.create_embedding, self, args, kwargs)["input"])
            return super().create_embedding(*args, **kwargs)

    def embed(self, *args, **kwargs):
        with self._edgemoe_call(generation=True) as outer:
            if outer:
                self._check_embedding(_bind(llama_cpp.Llama.embed, self, args, kwargs)["input"])
            return super().embed(*args, **kwargs)

    def _check_embedding(self, inputs) -> None:
        if not self.context_params.embeddings:
            raise ArgumentError("this model was loaded without embedding=True, so it gives no embeddings")
        inputs = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(inputs, list) or not inputs:
            raise ArgumentError("input must be a string or a non-empty list of strings")
        for text in inputs:
            self._check_text("input", text)
            if not text:
                raise ArgumentError("input holds an empty string: there is nothing to embed")

    # ------------------------------------------------------------------ evaluation
    def eval(self, tokens) -> None:
        with self._edgemoe_call(generation=True) as outer:
            if outer:
                self._check_tokens(tokens, "tokens")
                if self.n_tokens + len(tokens) > self._n_ctx:
                    raise ContextLengthError(f"Requested tokens ({self.n_tokens + len(tokens)}) exceed context "
                                             f"window of {self._n_ctx}")
            super().eval(tokens)
            self._edgemoe_hook.take_error()
            if len(tokens):
                last = len(tokens) % self.n_batch or self.n_batch   # llama.cpp keeps the last batch's logits
                self._edgemoe_logits = (self.n_tokens - (last if self._logits_all else 1), self.n_tokens)
            self._edgemoe_snapshot = self._stats_now()

    def sample(self, *args, **kwargs):
        with self._edgemoe_call(generation=True) as outer:
            if not outer:
                return super().sample(*args, **kwargs)
            call = _bind(llama_cpp.Llama.sample, self, args, kwargs)
            self._check_sampling(call, llama_cpp.Llama.sample)
            if self._edgemoe_logits is None:
                raise ArgumentError("sample() needs logits: eval() tokens first")
            lo, hi = self._edgemoe_logits
            if call["idx"] is not None and not (_is_int(call["idx"]) and lo <= call["idx"] < hi):
                raise ArgumentError(f"sample(idx=...) must be a position with logits, from {lo} to {hi - 1}")
            return super().sample(**call)

    def _init_sampler(self, *args, **kwargs):
        sampler = super()._init_sampler(*args, **kwargs)
        if kwargs.get("grammar") is not None:
            sampler.sample = functools.partial(_sample_within_grammar, sampler, n_vocab=self._n_vocab,
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
                self._check_tokens(tokens, "tokens")
                if prev_tokens is not None:
                    self._check_tokens(prev_tokens, "prev_tokens")
            return super().detokenize(tokens, prev_tokens, special)

    def set_seed(self, seed: int) -> None:
        with self._edgemoe_call():
            if not _is_int(seed):
                raise ArgumentError(f"seed must be an integer, not {seed!r}")
            super().set_seed(seed)

    save_state = _serialised("save_state")
    set_cache = _serialised("set_cache")
    n_ctx = _serialised("n_ctx")
    n_embd = _serialised("n_embd")
    n_vocab = _serialised("n_vocab")
    tokenizer = _serialised("tokenizer")
    token_eos = _serialised("token_eos")
    token_bos = _serialised("token_bos")
    token_nl = _serialised("token_nl")
    pooling_type = _serialised("pooling_type")

    # ------------------------------------------------------------------ edgemoe
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
        with self._edgemoe_call():
            if self._edgemoe_trace is None:
                raise EdgeMoEError("routing was not recorded: construct with record_routing=True")
            return self._edgemoe_trace

    def _stats_now(self) -> dict:
        return {"routes": self._edgemoe_hook.routes, **self._edgemoe_cache.summary(),
                "predictor": self._edgemoe_predictor,
                "prefetch_depth": self._edgemoe_lookahead.depth if self._edgemoe_lookahead else 0}

    def edgemoe_stats(self) -> dict:
        """Per-layer and total hits, misses, bytes fetched/evicted, stall seconds, resident expert bytes.

        Never waits: while another thread is inside a call, it returns the figures as of the last evaluation."""
        if self._edgemoe_lock.acquire(blocking=False):
            try:
                if self._edgemoe_closed:
                    raise LlamaClosedError("this Llama is closed")
                return self._stats_now()
            finally:
                self._edgemoe_lock.release()
        if self._edgemoe_closed:
            raise LlamaClosedError("this Llama is closed")
        return copy.deepcopy(self._edgemoe_snapshot)

    def __getstate__(self) -> dict:
        """llama_cpp.Llama pickles its constructor arguments (unpickling loads the model again): ours too."""
        with self._edgemoe_call():
            return {**super().__getstate__(), **self._edgemoe_options}

    def close(self) -> None:
        """Free the model; waits for a call in progress. Later calls raise LlamaClosedError."""
        lock = self.__dict__.get("_edgemoe_lock")
        with lock if lock is not None else contextlib.nullcontext():
            if self.__dict__.get("_edgemoe_closed"):
                return
            self._edgemoe_closed = True
            cache = getattr(self, "_edgemoe_cache", None)
            if cache is not None:
                cache.close()                 # first: prefetch reads in flight finish before the mapping goes
            if hasattr(self, "_stack"):       # absent when a bad file or budget stopped __init__ early
                super().close()
            _types.remove(self)

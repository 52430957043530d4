"""One generation, stock or edgemoe, with the figures people compare: speed, storage reads, expert stats."""
from __future__ import annotations

import codecs
import os
import resource
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import numpy.ctypeslib  # numpy loads these two lazily, at llama-cpp-python's first evaluation: loaded here,
import numpy.ma  # their files are never read inside a measured prefill (which counts its storage reads)
import psutil

from edgemoe_llamacpp import runtime
from edgemoe_llamacpp.errors import EdgeMoEError, NonFiniteError

if TYPE_CHECKING:
    from edgemoe_llamacpp.cache.config import CacheConfig


def kv_cache_bytes(path: str, n_ctx: int) -> int:
    """F16 K and V for every layer at n_ctx (llama.cpp's default cache type); of a split model, from shard 1's
    metadata (the only shard that has it)."""
    from edgemoe_llamacpp.gguf.header import read_header
    from edgemoe_llamacpp.gguf.layout import read_layout

    fields = read_header(read_layout(path).path).fields
    arch = fields["general.architecture"].contents()

    def get(key, default=None):
        f = fields.get(f"{arch}.{key}")
        v = f.contents() if f is not None else default
        return max(v) if isinstance(v, list) else v

    n_embd, n_head = get("embedding_length"), get("attention.head_count")
    n_kv = get("attention.head_count_kv", n_head)
    k_len = get("attention.key_length", n_embd // n_head)
    v_len = get("attention.value_length", n_embd // n_head)
    return 2 * get("block_count") * n_ctx * n_kv * (k_len + v_len)


def check_context_memory(model: str, n_ctx: int) -> None:
    """Refuse a context whose KV cache cannot fit in the memory this machine has free (llama.cpp would
    allocate it and the kernel would kill the process). A file that is no MoE GGUF is refused first."""
    from edgemoe_llamacpp.gguf.layout import read_layout

    read_layout(model)
    try:
        need = kv_cache_bytes(model, n_ctx)
    except (KeyError, TypeError, ZeroDivisionError, ValueError):
        return                                  # no attention metadata to size it from: llama.cpp decides
    free = psutil.virtual_memory().available
    if need > free:
        raise EdgeMoEError(f"a context of {n_ctx:,} tokens needs {need:,} bytes of KV cache, more than the "
                           f"{free:,} bytes of memory available; use a smaller n_ctx")


class _EvalClock:
    """Wraps a Llama's `eval` to time the prompt (the first evaluation) apart from decoding (the rest):
    llama.cpp's own counters call a one-token prompt a decode step."""

    def __init__(self, llm):
        self.llm, self.eval, self.calls, self.after_prompt = llm, llm.eval, [], None
        engine = getattr(llm, "edgemoe", None)            # stock has none
        self.cache = engine.cache if engine is not None else None
        self.hook = engine.hook if engine is not None else None
        self.waits_after_prompt = None

    def __call__(self, tokens) -> None:
        start = time.perf_counter()
        self.eval(tokens)
        self.calls.append((len(tokens), time.perf_counter() - start))
        check_finite(self.llm, last_logits(self.llm))
        if self.after_prompt is None:
            self.after_prompt = _io(self.cache)
            self.waits_after_prompt = self._waits()

    def _waits(self) -> tuple[float, float] | None:
        """(seconds in the hook's Python, of which waiting for reads) so far; None for stock."""
        if self.hook is None:
            return None
        self.hook.drain()
        return self.hook.hook_ns / 1e9, sum(s.stall_s for s in self.cache.stats.layers.values())

    def breakdown(self) -> dict:
        """Decoding's time per token (ms): waiting for expert reads (stall), the hook's own Python (hook_cpu),
        and the rest (compute: llama.cpp, and llama-cpp-python's per-token work)."""
        end, start = self._waits(), self.waits_after_prompt
        decode = self.calls[1:]
        if end is None or start is None or not decode:
            return {}
        n, t = len(decode), sum(t for _, t in decode)
        hook, stall = end[0] - start[0], end[1] - start[1]
        return {"stall": 1e3 * stall / n, "hook_cpu": 1e3 * (hook - stall) / n, "compute": 1e3 * (t - hook) / n}

    def figures(self) -> dict:
        (n_prompt, t_prompt), decode = (self.calls[0] if self.calls else (0, 0.0)), self.calls[1:]
        t_decode = sum(t for _, t in decode)
        return {"prefill_tok_s": n_prompt / t_prompt if t_prompt else 0.0,
                "decode_tok_s": len(decode) / t_decode if t_decode else 0.0,
                "decode_evals": len(decode), "prefill_s": t_prompt, "decode_s": t_decode}


class _TextStream:
    """Wraps a Llama's `sample` to pass each sampled token's text to `on_text` as llama.cpp samples it, whole
    characters only (one split across tokens waits for its last byte). What it passes adds up to the
    completion's text: that is these pieces joined, less the end-of-generation token, which it skips too."""

    def __init__(self, llm, on_text: Callable[[str], None]):
        import llama_cpp

        self.sample, self.llm, self.on_text = llm.sample, llm, on_text
        self.is_end = lambda token: llama_cpp.llama_vocab_is_eog(llm._model.vocab, token)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")    # as the completion decodes

    def __call__(self, *args, **kwargs) -> int:
        token = self.sample(*args, **kwargs)
        if not self.is_end(token):
            text = self.decoder.decode(self.llm.detokenize([token]))
            if text:
                self.on_text(text)
        return token


def check_room(llm, prompt: str) -> None:
    """The prompt must leave room in the context to generate."""
    n_prompt = len(llm.tokenize(prompt.encode()))
    window = min(llm.n_ctx(), len(llm.input_ids))   # llama.cpp pads n_ctx; llama-cpp-python's buffer does not
    if n_prompt >= window:
        raise EdgeMoEError(f"the prompt is {n_prompt} tokens; it does not fit a context of {window} "
                           f"with room to generate (raise --n-ctx)")


def generate(model: str, prompt: str, *, max_tokens: int, cache: CacheConfig | None = None, stock: bool = False,
             n_ctx: int = 512, n_threads: int | None = None, temperature: float = 0.0, seed: int = 0,
             repeat_penalty: float = 1.0, record_routing: bool = False, route_injector=None, prefetch_predictor=None,
             use_extra_bufts: bool = False, on_text: Callable[[str], None] | None = None, **llama_kwargs) -> dict:
    """Generate once and measure: load time and bytes, prompt and decode speed, storage bytes read and major faults
    for the prompt and for decoding, and edgemoe's expert statistics (its experts kept as `cache` says).
    `route_injector`: both engines compute its routing (engine.injection); `prefetch_predictor`: edgemoe prefetches with it
    (a Predictor object, research). `use_extra_bufts`: stock with llama.cpp's
    CPU repack (off by default: the compute path edgemoe uses). `on_text`: called with the text as it comes."""
    from edgemoe_llamacpp.engine.injection import routing_label
    from edgemoe_llamacpp.engine.llama import Llama, stock_llama

    if not prompt or max_tokens < 1:
        raise EdgeMoEError("the prompt is empty" if not prompt else f"max_tokens must be at least 1, not {max_tokens}")
    threads = n_threads or os.cpu_count() or 1
    kwargs = dict(n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, seed=seed, verbose=False,
                  **llama_kwargs)
    check_context_memory(model, n_ctx)      # reads the layout first: a bad file fails here, stock or not
    loading = _io(), time.perf_counter()
    try:
        llm = stock_llama(model, use_extra_bufts=use_extra_bufts, route_injector=route_injector, **kwargs) \
            if stock else Llama(model, cache=cache, record_routing=record_routing, route_injector=route_injector,
                                prefetch_predictor=prefetch_predictor, **kwargs)
    except EdgeMoEError:
        raise                               # ours (some are ValueErrors too) already say what is wrong
    except ValueError as e:
        raise EdgeMoEError(f"{model}: llama.cpp could not load it ({e})") from None
    try:
        load_s, load_read = time.perf_counter() - loading[1], _io()[0] - loading[0][0]
        check_room(llm, prompt)
        clock = llm.eval = _EvalClock(llm)
        if on_text is not None:
            llm.sample = _TextStream(llm, on_text)
        reads = clock.cache
        start = _io(reads)
        out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=temperature, seed=seed,
                                    repeat_penalty=repeat_penalty)
        end = _io(reads)
        first = clock.after_prompt or end
        choice = out["choices"][0]
        result = {
            "engine": "stock" if stock else "edgemoe", "cpu_repack": stock and use_extra_bufts,
            "model": str(model), "text": choice["text"],
            "finish_reason": choice["finish_reason"], "prompt_tokens": out["usage"]["prompt_tokens"],
            "tokens": out["usage"]["completion_tokens"], **clock.figures(),
            "load_s": load_s, "load_read_bytes": load_read,
            "routing": routing_label(getattr(llm, "route_injector", None)),
            "storage_read_bytes": end[0] - start[0],
            "prefill_read_bytes": first[0] - start[0], "decode_read_bytes": end[0] - first[0],
            "major_faults": end[1] - start[1], "decode_major_faults": end[1] - first[1],
            # faults while computing: the process's less those of edgemoe's reader threads (stock: all of them)
            "decode_compute_major_faults": end[1] - end[2] - (first[1] - first[2]),
        }
        result["rss_anon_bytes"] = _rss_anon()
        result["runtime"] = runtime.runtime_info()
        if not stock:
            result.update(_engine_figures(llm, clock, record_routing))
        return result
    finally:
        llm.close()


def _engine_figures(llm, clock: _EvalClock, record_routing: bool) -> dict:
    """What an edgemoe run adds: the expert statistics, decode time by part, and the routing if recorded."""
    stats = llm.edgemoe_stats()
    out = {"stats": stats, "hook_us_per_layer": stats["hook_us_per_layer"], "decode_ms_per_token": clock.breakdown()}
    if record_routing:
        out["trace"] = llm.edgemoe_trace()
    return out


def _io(cache=None) -> tuple[int, int, int]:
    """(bytes this process read from storage, major page faults, those of them taken by `cache`'s reader threads)
    so far."""
    readers = 0 if cache is None else cache.storage.major_faults
    return (psutil.Process().io_counters().read_bytes, resource.getrusage(resource.RUSAGE_SELF).ru_majflt,
            readers)


def _rss_anon() -> int:
    """Anonymous memory of this process (heap, llama.cpp buffers): what a memory limit must leave room for
    besides the model's file pages."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def last_logits(llm) -> np.ndarray:
    """Logits of the last evaluated token, read from the context (llama-cpp-python 0.3.36 fills
    `Llama.scores` only with logits_all=True)."""
    return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),)).copy()


def check_finite(llm, logits: np.ndarray) -> None:
    """Refuse logits that are not all finite: a damaged file (NaN weights) would otherwise decode to nothing, or
    to a perplexity of nan, and report success."""
    if not np.isfinite(logits).all():
        raise NonFiniteError(f"{llm.model_path}: llama.cpp computed non-finite logits: the file's weights are "
                             f"damaged (`edgemoe verify` names the tensor, for a file edgemoe wrote)")


def greedy(llm, prompt: str, n: int) -> tuple[list[int], np.ndarray]:
    """n argmax tokens after `prompt`, and the logits before each and after the last: (n + 1, vocab)."""
    llm.reset()
    llm.eval(llm.tokenize(prompt.encode()))
    tokens, rows = [], [last_logits(llm)]
    for _ in range(n):
        tokens.append(int(rows[-1].argmax()))
        llm.eval([tokens[-1]])
        rows.append(last_logits(llm))
    return tokens, np.stack(rows)

"""One generation, stock or edgemoe, with the figures people compare: speed, storage reads, expert stats."""
from __future__ import annotations

import os
import resource

import llama_cpp
import numpy as np
import psutil

from . import runtime
from .errors import EdgeMoEError


def _perf(llm) -> llama_cpp.llama_perf_context_data:
    return llama_cpp.llama_perf_context(llm._ctx.ctx)


def generate(model: str, prompt: str, *, max_tokens: int, memory_budget=None, stock: bool = False,
             n_ctx: int = 512, n_threads: int | None = None, temperature: float = 0.0, seed: int = 0,
             repeat_penalty: float = 1.0, record_routing: bool = False, policy: str = "distance",
             predictor: str | None = None, prefetch_depth: int = 1, substitute: float | None = None,
             **llama_kwargs) -> dict:
    """Generate once and measure: tok/s (llama.cpp's own timers), storage bytes read and major faults of
    this process for the prompt and for decoding, and the expert statistics (edgemoe)."""
    from .layout import read_layout
    from .llama import Llama, stock_llama

    threads = n_threads or os.cpu_count() or 1
    kwargs = dict(n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, seed=seed, verbose=False,
                  **llama_kwargs)
    if stock:
        read_layout(model)      # the same clear errors for a bad file
    try:
        llm = stock_llama(model, **kwargs) if stock else \
            Llama(model, memory_budget=memory_budget, record_routing=record_routing, policy=policy,
                  predictor=predictor, prefetch_depth=prefetch_depth, substitute=substitute, **kwargs)
    except ValueError as e:
        raise EdgeMoEError(f"{model}: llama.cpp could not load it ({e})") from None
    try:
        llama_cpp.llama_perf_context_reset(llm._ctx.ctx)
        start = _io()
        first = None
        pieces, finish = [], None
        for chunk in llm.create_completion(prompt, max_tokens=max_tokens, temperature=temperature, seed=seed,
                                           repeat_penalty=repeat_penalty, stream=True):
            if first is None:
                first = _io()             # the prompt is evaluated and the first token sampled
            pieces.append(chunk["choices"][0]["text"])
            finish = chunk["choices"][0]["finish_reason"] or finish
        end = _io()
        first = first or end
        perf = _perf(llm)
        result = {
            "engine": "stock" if stock else "edgemoe", "model": str(model), "text": "".join(pieces),
            "finish_reason": finish, "prompt_tokens": perf.n_p_eval, "tokens": perf.n_eval + 1,
            "prefill_tok_s": perf.n_p_eval / perf.t_p_eval_ms * 1e3 if perf.t_p_eval_ms else 0.0,
            "decode_tok_s": perf.n_eval / perf.t_eval_ms * 1e3 if perf.t_eval_ms else 0.0,
            "decode_evals": perf.n_eval,
            "storage_read_bytes": end[0] - start[0],
            "prefill_read_bytes": first[0] - start[0], "decode_read_bytes": end[0] - first[0],
            "major_faults": end[1] - start[1], "decode_major_faults": end[1] - first[1],
        }
        result["rss_anon_bytes"] = _rss_anon()
        result["runtime"] = runtime.runtime_info()
        if not stock:
            result["stats"] = llm.edgemoe_stats()
            if record_routing:
                result["trace"] = llm.edgemoe_trace()
        return result
    finally:
        llm.close()


def _io() -> tuple[int, int]:
    """(bytes this process read from storage, major page faults) so far."""
    return psutil.Process().io_counters().read_bytes, resource.getrusage(resource.RUSAGE_SELF).ru_majflt


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

"""One generation, stock or edgemoe, with the figures people compare: speed, storage reads, expert stats."""
from __future__ import annotations

import os

import llama_cpp
import psutil

from .errors import EdgeMoEError


def _perf(llm) -> llama_cpp.llama_perf_context_data:
    return llama_cpp.llama_perf_context(llm._ctx.ctx)


def generate(model: str, prompt: str, *, max_tokens: int, memory_budget=None, stock: bool = False,
             n_ctx: int = 512, n_threads: int | None = None, temperature: float = 0.0, seed: int = 0,
             **llama_kwargs) -> dict:
    from .layout import read_layout
    from .llama import Llama, stock_llama

    threads = n_threads or os.cpu_count() or 1
    kwargs = dict(n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, seed=seed, verbose=False,
                  **llama_kwargs)
    if stock:
        read_layout(model)      # the same clear errors for a bad file
    try:
        llm = stock_llama(model, **kwargs) if stock else Llama(model, memory_budget=memory_budget, **kwargs)
    except ValueError as e:
        raise EdgeMoEError(f"{model}: llama.cpp could not load it ({e})") from None
    try:
        io0 = psutil.Process().io_counters().read_bytes
        llama_cpp.llama_perf_context_reset(llm._ctx.ctx)
        out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=temperature, seed=seed)
        perf = _perf(llm)
        read = psutil.Process().io_counters().read_bytes - io0
        result = {
            "engine": "stock" if stock else "edgemoe", "model": str(model), "text": out["choices"][0]["text"],
            "tokens": out["usage"]["completion_tokens"], "prompt_tokens": out["usage"]["prompt_tokens"],
            "prefill_tok_s": perf.n_p_eval / perf.t_p_eval_ms * 1e3 if perf.t_p_eval_ms else 0.0,
            "decode_tok_s": perf.n_eval / perf.t_eval_ms * 1e3 if perf.t_eval_ms else 0.0,
            "storage_read_bytes": read,
        }
        if not stock:
            result["stats"] = llm.edgemoe_stats()
        return result
    finally:
        llm.close()

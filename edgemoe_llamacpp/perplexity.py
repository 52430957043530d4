"""`edgemoe ppl`: perplexity on held-out text through llama-cpp-python (edgemoe's Llama, any file)."""
from __future__ import annotations

import math

import numpy as np
from tqdm import tqdm

from . import corpus


def window_nll(llm, window: list[int]) -> float:
    """Summed negative log-likelihood of window[1:] given its prefix (needs logits_all=True)."""
    llm.reset()
    llm.eval(window)
    n = len(window)
    logits = np.asarray(llm.scores[: n - 1], dtype=np.float64)
    logits -= logits.max(1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return float(-logp[np.arange(n - 1), window[1:]].sum())


def perplexity(model_path: str, *, texts=None, tokens: int = 16384, n_ctx: int = 512,
               progress: bool = True, **llama_kwargs) -> dict:
    """Perplexity in independent windows of n_ctx tokens; default text: the validation split."""
    from .llama import Llama

    llm = Llama(model_path, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False, **llama_kwargs)
    try:
        ids = corpus.tokens(llm, texts if texts is not None else corpus.split_texts("validation"), tokens)
        starts = range(0, len(ids) - n_ctx + 1, n_ctx)
        if not starts:
            raise ValueError(f"the text gives {len(ids)} tokens, fewer than one window of {n_ctx}")
        nll = sum(window_nll(llm, ids[s:s + n_ctx])
                  for s in tqdm(starts, desc="perplexity", unit="window", disable=not progress))
    finally:
        llm.close()
    count = len(starts) * (n_ctx - 1)
    return {"model": str(model_path), "perplexity": math.exp(nll / count), "tokens": count,
            "windows": len(starts), "n_ctx": n_ctx}

"""`edgemoe ppl`: perplexity on held-out text through llama-cpp-python (edgemoe's Llama, any file)."""
from __future__ import annotations

import math

import numpy as np
from tqdm import tqdm

from edgemoe_llamacpp import corpus


def window_logp(llm, window: list[int]) -> np.ndarray:
    """Log-probabilities [n-1, vocab] of every next token of `window` (needs logits_all=True)."""
    from edgemoe_llamacpp.engine.generate import check_finite

    llm.reset()
    llm.eval(window)
    logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)
    check_finite(llm, logits)
    logits -= logits.max(1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(1, keepdims=True))


def perplexity(model_path: str, *, texts=None, tokens: int = 16384, n_ctx: int = 512, reference: str | None = None,
               batch: int | None = None, progress: bool = True, **llama_kwargs) -> dict:
    """Perplexity in independent windows of n_ctx tokens; default text: the validation split.

    `batch` tokens are evaluated at once (default: a whole window); batch=1 scores the way decoding runs,
    one token per evaluation, so per-token decisions (substitution) act as they would when generating.

    With `reference` (e.g. the file a converted model came from), also the mean KL divergence
    KL(reference || model) per token and how often both put the same token first.
    """
    return perplexities([model_path], texts=texts, tokens=tokens, n_ctx=n_ctx, reference=reference, batch=batch,
                        progress=progress, **llama_kwargs)[0]


def perplexities(model_paths: list[str], *, texts=None, tokens: int = 16384, n_ctx: int = 512,
                 reference: str | None = None, batch: int | None = None, progress: bool = True,
                 **llama_kwargs) -> list[dict]:
    """`perplexity` of several models on the same windows, the reference evaluated once per window.
    Each result also lists every window's summed negative log-likelihood (`window_nll`) and, with a reference,
    its summed KL divergence from the reference (`window_kld`), for paired comparisons between models."""
    from edgemoe_llamacpp.engine.generate import check_context_memory
    from edgemoe_llamacpp.engine.llama import Llama

    batch = batch or n_ctx
    for path in model_paths:
        check_context_memory(path, n_ctx)

    def load(path, **kw):
        return Llama(path, n_ctx=n_ctx, n_batch=batch, logits_all=True, verbose=False, **kw)

    llms, ref, stats = [], None, []
    try:
        for path in model_paths:
            llms.append(load(path, **llama_kwargs))
        ref = load(reference, n_threads=llama_kwargs.get("n_threads")) if reference else None
        ids = corpus.tokens(llms[0], texts if texts is not None else corpus.split_texts("validation"), tokens)
        parts = corpus.windows(ids, n_ctx)
        nll = np.zeros((len(llms), len(parts)))
        kld, same = np.zeros((len(llms), len(parts))), np.zeros(len(llms))
        rows = np.arange(n_ctx - 1)
        for w, window in enumerate(tqdm(parts, desc="perplexity", unit="window", disable=not progress)):
            ref_logp = window_logp(ref, window) if ref is not None else None
            for m, llm in enumerate(llms):
                logp = window_logp(llm, window)
                nll[m, w] = -logp[rows, window[1:]].sum()
                if ref_logp is not None:
                    kld[m, w] = float((np.exp(ref_logp) * (ref_logp - logp)).sum())
                    same[m] += float((ref_logp.argmax(1) == logp.argmax(1)).sum())
        stats = [llm.edgemoe_stats() for llm in llms]
    finally:
        for llm in llms:
            llm.close()
        if ref is not None:
            ref.close()
    count = len(parts) * (n_ctx - 1)
    out = []
    for m, path in enumerate(model_paths):
        r = {"model": str(path), "perplexity": math.exp(nll[m].sum() / count), "tokens": count,
             "windows": len(parts), "n_ctx": n_ctx, "batch": batch, "stats": stats[m],
             "window_nll": nll[m].round(4).tolist()}
        if ref is not None:
            r.update(reference=str(reference), kld=kld[m].sum() / count, same_top1=same[m] / count,
                     window_kld=kld[m].round(6).tolist())
        out.append(r)
    return out


def paired_difference(nll: list[float], rival_nll: list[float], tokens: int) -> dict:
    """Mean difference in negative log-likelihood per token between two models scored on the same windows
    (`window_nll` of `perplexities`), and its standard error from the spread of the per-window differences:
    a perplexity difference told from noise."""
    diff = np.asarray(nll, dtype=np.float64) - np.asarray(rival_nll, dtype=np.float64)
    return {"delta_nll_per_token": float(diff.sum() / tokens),
            "standard_error": float(diff.std(ddof=1) * np.sqrt(len(diff)) / tokens)}

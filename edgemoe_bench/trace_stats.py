"""Locality statistics of a routing trace: how often experts come back, how skewed their use is, how well one
layer's choice tells the next layer's. Pure numpy on `ids` (tokens, n_moe_layers, k); `RoutingTrace.stats`
is the public entry and documents each figure.
"""
from __future__ import annotations

import numpy as np

# the parameters of the statistics, chosen to match the published figures they are compared with (trace_gen.py)
WINDOW = 8            # "80% of selections come back within 8 tokens"
COVER = 0.9           # "65 of 128 experts cover 90% of routing"
RESIDENCY = 0.4       # "LRU with 40% of each layer's experts resident"


def membership(ids: np.ndarray, n_expert: int) -> np.ndarray:
    """(tokens, k) expert ids of one layer -> (tokens, n_expert) bool: was expert e chosen at token t."""
    m = np.zeros((len(ids), n_expert), dtype=bool)
    m[np.arange(len(ids))[:, None], ids] = True
    return m


def repeat_next(m: np.ndarray) -> float | None:
    """Share of the selections at tokens 1.. whose expert was also chosen at the token before."""
    if len(m) < 2:
        return None
    return float((m[1:] & m[:-1]).sum() / m[1:].sum())


def within_window(m: np.ndarray, window: int) -> float | None:
    """Share of the selections at tokens `window`.. whose expert was chosen at any of the `window` tokens before."""
    if len(m) <= window:
        return None
    c = np.zeros((len(m) + 1, m.shape[1]), dtype=np.int32)
    np.cumsum(m, axis=0, out=c[1:])
    seen = c[window:-1] - c[:-window - 1]          # row i: uses in tokens [i, i + window), before token i + window
    return float((m[window:] & (seen > 0)).sum() / m[window:].sum())


def adjacent_jaccard(m: np.ndarray) -> float | None:
    """Mean over tokens 1.. of |S_t & S_t-1| / |S_t | S_t-1|, S_t the set chosen at token t."""
    if len(m) < 2:
        return None
    inter = (m[1:] & m[:-1]).sum(1)
    union = (m[1:] | m[:-1]).sum(1)
    return float((inter / union).mean())


def coverage(m: np.ndarray) -> np.ndarray:
    """Share of all selections that go to the top-N experts by use, for N = 1..n_expert."""
    counts = np.sort(m.sum(0))[::-1]
    return np.cumsum(counts) / counts.sum()


def experts_for(cov: np.ndarray, share: float) -> int:
    """The fewest experts whose selections make up `share` of the layer's (top experts by use)."""
    return int(np.searchsorted(cov, share - 1e-12) + 1)


def lru_hits(ids: np.ndarray, n_expert: int, capacity: int) -> np.ndarray:
    """Per layer: share of selections an LRU cache of `capacity` experts per layer already holds.

    The cache starts empty; each token's k experts are looked up, then all become the most recently used
    (a hit needs no fetch; a miss is fetched). An LRU cache that admits every use holds exactly the
    `capacity` experts used most recently, so expert e is resident iff fewer than `capacity` experts were
    used after e's last use. Compulsory misses count."""
    n_tok, n_layer, k = ids.shape
    last = np.full((n_layer, n_expert), -1, dtype=np.int64)      # stamp of each expert's last use, -1 never
    slots = np.arange(k, dtype=np.int64)
    hits = np.zeros(n_layer, dtype=np.int64)
    for t in range(n_tok):
        sel = ids[t]                                             # (layers, k)
        used = np.take_along_axis(last, sel, 1)                  # (layers, k)
        newer = (last[:, None, :] > used[:, :, None]).sum(-1)    # experts used since: (layers, k)
        hits += ((used >= 0) & (newer < capacity)).sum(1)
        np.put_along_axis(last, sel, t * k + slots, 1)
    return hits / (n_tok * k)


def _recall(fit_a: np.ndarray, fit_b: np.ndarray, test_a: np.ndarray, test_b: np.ndarray, n_expert: int
            ) -> tuple[int, int]:
    """(hits of the co-occurrence table, hits of naming the most used experts) on the test tokens; ids (tokens, k).
    Counted with bincount and gathers, not matrix products: on a busy machine BLAS's threads made those the
    slowest part of the statistics."""
    k = fit_a.shape[1]
    pairs = (fit_a[:, :, None] * n_expert + fit_b[:, None, :]).ravel()
    table = np.bincount(pairs, minlength=n_expert * n_expert).reshape(n_expert, n_expert).astype(np.float32)
    scores = table[test_a].sum(1)                                        # (tokens, n_expert), exact counts
    pred = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    popular = np.argsort(-np.bincount(fit_b.ravel(), minlength=n_expert), kind="stable")[:k]
    actual = membership(test_b, n_expert)
    return int(actual[np.arange(len(pred))[:, None], pred].sum()), int(actual[:, popular].sum())


def layer_recall(ids_a: np.ndarray, ids_b: np.ndarray, n_expert: int) -> tuple[float, float] | None:
    """How well a co-occurrence table predicts layer b's set from layer a's (same token; ids (tokens, k)).

    The table counts, over one half of the tokens, how often expert i of layer a and expert j of layer b were
    chosen together. On the other half, layer b's predicted set is the k experts with the largest summed
    counts over the experts layer a chose; recall is the share of b's actual choices it names. Fitted on the
    first half and scored on the second, then the other way round, hits summed (every token is scored once).
    Returns (table recall, recall of naming b's k most used experts of the fitting half every time)."""
    half = len(ids_a) // 2
    if half < 2:
        return None
    first, second = slice(0, half), slice(half, 2 * half)
    a = _recall(ids_a[first], ids_b[first], ids_a[second], ids_b[second], n_expert)
    b = _recall(ids_a[second], ids_b[second], ids_a[first], ids_b[first], n_expert)
    total = 2 * half * ids_b.shape[1]
    return (a[0] + b[0]) / total, (a[1] + b[1]) / total


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def trace_stats(ids: np.ndarray, n_expert: int, *, window: int = WINDOW, cover: float = COVER,
                cover_tokens: int | None = None,
                top_n: int | None = None, residency: float = RESIDENCY) -> dict:
    """Every statistic, averaged over MoE layers (the layer pairs for recall), plus the per-layer values."""
    n_tok, n_layer, k = ids.shape
    top_n = n_expert // 2 if top_n is None else top_n
    capacity = max(k, round(residency * n_expert))
    per = {"repeat_next": [], "within_window": [], "adjacent_jaccard": [], "experts_for_cover": [],
           "top_n_coverage": [], "lru_hit": [], "layer_recall": [], "layer_recall_popularity": []}
    for li in range(n_layer):
        m = membership(ids[:, li], n_expert)
        per["repeat_next"].append(repeat_next(m))
        per["within_window"].append(within_window(m, window))
        per["adjacent_jaccard"].append(adjacent_jaccard(m))
        # coverage over spans of cover_tokens (all whole spans; the whole trace if it is shorter or unset)
        span = cover_tokens if cover_tokens and cover_tokens <= n_tok else n_tok
        covs = [coverage(m[s:s + span]) for s in range(0, n_tok - span + 1, span)]
        per["experts_for_cover"].append(float(np.mean([experts_for(c, cover) for c in covs])))
        per["top_n_coverage"].append(float(np.mean([c[min(top_n, n_expert) - 1] for c in covs])))
        if li:
            pair = layer_recall(ids[:, li - 1], ids[:, li], n_expert)
            per["layer_recall"].append(None if pair is None else pair[0])
            per["layer_recall_popularity"].append(None if pair is None else pair[1])
    per["lru_hit"] = [float(x) for x in lru_hits(ids, n_expert, capacity)] if n_tok else [None] * n_layer
    out = {name: _mean(values) for name, values in per.items()}
    out["layer_recall_lift"] = None if not out["layer_recall_popularity"] else \
        out["layer_recall"] / out["layer_recall_popularity"]
    out["layer_recall_chance"] = k / n_expert
    out["params"] = {"window": window, "cover": cover, "cover_tokens": cover_tokens, "top_n": top_n,
                     "residency": residency,
                     "lru_capacity": capacity}
    out["per_layer"] = per
    return out

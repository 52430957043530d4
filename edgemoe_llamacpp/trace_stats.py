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


def layer_recall(m_a: np.ndarray, m_b: np.ndarray, k: int) -> tuple[float, float] | None:
    """How well a co-occurrence table predicts layer b's set from layer a's (same token).

    The table counts, over the first half of the tokens, how often expert i of layer a and expert j of layer b
    were chosen together. On the second half, layer b's predicted set is the k experts with the largest
    summed counts over the experts layer a chose; recall is the share of b's actual choices it names.
    Returns (table recall, recall of predicting b's k most used experts of the first half every time)."""
    half = len(m_a) // 2
    if half < 2:
        return None
    fit_a, fit_b = m_a[:half].astype(np.float32), m_b[:half].astype(np.float32)
    table = fit_a.T @ fit_b                                      # (n_expert, n_expert)
    scores = m_a[half:].astype(np.float32) @ table               # (tokens, n_expert)
    pred = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    rows = np.arange(len(pred))[:, None]
    actual = m_b[half:]
    recall = actual[rows, pred].sum() / actual.sum()
    popular = np.argsort(-fit_b.sum(0), kind="stable")[:k]
    return float(recall), float(actual[:, popular].sum() / actual.sum())


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def trace_stats(ids: np.ndarray, n_expert: int, *, window: int = WINDOW, cover: float = COVER,
                top_n: int | None = None, residency: float = RESIDENCY) -> dict:
    """Every statistic, averaged over MoE layers (the layer pairs for recall), plus the per-layer values."""
    n_tok, n_layer, k = ids.shape
    top_n = n_expert // 2 if top_n is None else top_n
    capacity = max(k, round(residency * n_expert))
    per = {"repeat_next": [], "within_window": [], "adjacent_jaccard": [], "experts_for_cover": [],
           "top_n_coverage": [], "lru_hit": [], "layer_recall": [], "layer_recall_popularity": []}
    prev = None
    for li in range(n_layer):
        m = membership(ids[:, li], n_expert)
        per["repeat_next"].append(repeat_next(m))
        per["within_window"].append(within_window(m, window))
        per["adjacent_jaccard"].append(adjacent_jaccard(m))
        cov = coverage(m) if n_tok else None
        per["experts_for_cover"].append(None if cov is None else experts_for(cov, cover))
        per["top_n_coverage"].append(None if cov is None else float(cov[min(top_n, n_expert) - 1]))
        if prev is not None:
            pair = layer_recall(prev, m, k)
            per["layer_recall"].append(None if pair is None else pair[0])
            per["layer_recall_popularity"].append(None if pair is None else pair[1])
        prev = m
    per["lru_hit"] = [float(x) for x in lru_hits(ids, n_expert, capacity)] if n_tok else [None] * n_layer
    out = {name: _mean(values) for name, values in per.items()}
    out["layer_recall_chance"] = k / n_expert
    out["params"] = {"window": window, "cover": cover, "top_n": top_n, "residency": residency,
                     "lru_capacity": capacity}
    out["per_layer"] = per
    return out

"""The cache's figures for edgemoe_stats(): copied cheaply after every evaluation (`counters`: plain numbers and
per-layer dicts), formatted only when read (`summary`)."""
from __future__ import annotations

from edgemoe_llamacpp.cache.ledger import LayerStats
from edgemoe_llamacpp.cache.residency import ExpertCache


def counters(cache: ExpertCache) -> tuple:
    """What summary() reports, copied cheaply."""
    return (cache.ledger.resident_bytes, len(cache.ledger.resident), cache.storage.pinned_edge_bytes,
            {layer: vars(s).copy() for layer, s in cache.ledger.stats.layers.items()}, cache.storage.major_faults)


def summary(cache: ExpertCache, taken: tuple | None = None) -> dict:
    """Budget, policy, resident experts, and hits, misses, bytes and stalls per layer and in total, as of `taken`
    (counters(); default now)."""
    resident_bytes, resident_experts, pinned, layers, reader_faults = taken or counters(cache)
    tot = {k: sum(s[k] for s in layers.values()) for k in vars(LayerStats())}
    lookups = tot["hits"] + tot["misses"]
    return {
        "budget_bytes": cache.budget, "policy": cache.policy, "resident_expert_bytes": resident_bytes,
        "substitute": cache.substitute, "lowbit_type": cache.layout.lowbit_type,
        "resident_experts": resident_experts, "expert_bytes": cache.layout.expert_bytes,
        "pinned_edge_bytes": pinned, "reader_major_faults": reader_faults,
        "capacity_given_up_bytes": cache.reclaimed_capacity,    # to memory pressure (cache.reclaim)
        "total": {**tot, "hit_rate": tot["hits"] / lookups if lookups else None},
        "layers": [{"layer": layer, **s} for layer, s in layers.items()],
    }

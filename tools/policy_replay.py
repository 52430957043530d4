"""Replay recorded routing through the expert cache's real policies, next to Belady's floor.

Records each prompt's routing with edgemoe_llamacpp.Llama (no budget), then feeds it to ExpertCache with
I/O stubbed out, for every policy and budget: decode misses per token, and their ratio to Belady's MIN.

    python tools/policy_replay.py tests/fixtures/tiny-moe.gguf --budgets 25% 50% --tokens 64 \
        --json bench/results/policy-replay.json
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from edgemoe_llamacpp.bench import belady
from edgemoe_llamacpp.layout import read_layout
from edgemoe_llamacpp.llama import Llama
from edgemoe_llamacpp.residency import POLICIES, ExpertCache, parse_budget

PROMPTS = ["import os\nimport sys\n\n\ndef main(argv):\n    ", "class Parser:\n    def ",
           '"""Utilities for reading configuration files."""\n\nimport re\n',
           "    def __init__(self, path, defaults=None):\n        self."]


class ReplayCache(ExpertCache):
    """The cache's bookkeeping and policy, without touching memory or storage."""

    def _fetch(self, uids):
        return sum(self.cost[u] for u in uids)

    def _drop(self, spans):
        pass


def record(model: str, prompt: str, tokens: int) -> list:
    llm = Llama(model, memory_budget=None, record_routing=True, n_ctx=512, verbose=False)
    llm.create_completion(prompt, max_tokens=tokens, temperature=0.0, repeat_penalty=1.1)
    trace = llm.edgemoe_trace()
    llm.close()
    return trace


def decode_misses(layout, budget: int, policy: str, trace: list) -> int:
    cache = ReplayCache(layout, budget, policy=policy)
    misses = 0
    for layer, ids in trace:
        before = cache.stats.layers[layer].misses
        cache.ensure_ids(layer, np.asarray(ids))
        if len(ids) == 1:
            misses += cache.stats.layers[layer].misses - before
    cache.close()
    return misses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--budgets", nargs="+", default=["25%", "50%"])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--json")
    args = ap.parse_args()
    layout = read_layout(args.model)
    traces = [record(args.model, p, args.tokens) for p in PROMPTS]
    n_tokens = sum(sum(len(ids) == 1 for _, ids in t) for t in traces) / len(layout.moe_layers)
    expert_size = layout.expert_bytes / len(layout.experts)
    rows = []
    for spec in args.budgets:
        budget = parse_budget(spec, layout.expert_bytes)
        row = {"budget": spec, "capacity_experts": int(budget // expert_size),
               "belady": sum(belady(t, int(budget // expert_size))[1] for t in traces) / n_tokens}
        for policy in POLICIES:
            row[policy] = sum(decode_misses(layout, budget, policy, t) for t in traces) / n_tokens
        rows.append(row)
        print(f"{spec}: decode misses/token " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()
                                                          if isinstance(v, float)))
    result = {"kind": "policy_replay", "model": args.model, "prompts": len(PROMPTS), "tokens": args.tokens,
              "n_expert": layout.n_expert, "n_expert_used": layout.n_expert_used,
              "moe_layers": len(layout.moe_layers), "budgets": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

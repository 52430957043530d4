"""Cache configurations side by side: policy x predictor, each against the same stock runs, in one invocation.

    python tools/bench_configs.py bench/models/io-moe.gguf --budgets 25% 50% --runs 2 --tokens 32 \\
        --configs distance lru lfu hobbit distance+gate distance+table distance+frequency

A configuration is POLICY[+PREDICTOR[:DEPTH]]. Per budget and run, stock runs once and every configuration
once (the order rotates run by run), each a child in the same cgroup memory limit with a cold page cache,
exactly as `edgemoe bench` runs them; ratios pair each configuration's run with that run's stock run.
Writes bench/results/configs.json (rendered by tools/bench_report.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from edgemoe_bench import bench, cgroup
from edgemoe_llamacpp import files
from edgemoe_llamacpp.cache.config import CacheConfig
from edgemoe_llamacpp.cache.residency import parse_budget
from edgemoe_llamacpp.errors import EdgeMoEError
from edgemoe_llamacpp.gguf.layout import read_layout

ROOT = Path(__file__).resolve().parent.parent


def parse_config(text: str) -> tuple[str, CacheConfig]:
    """("POLICY[+PREDICTOR[:DEPTH]]", its CacheConfig)."""
    policy, _, rest = text.partition("+")
    predictor, _, depth = rest.partition(":")
    try:
        return text, CacheConfig(policy=policy, predictor=predictor or None, prefetch_depth=int(depth or 1))
    except (EdgeMoEError, ValueError) as e:
        raise SystemExit(f"bad configuration {text!r}: POLICY[+PREDICTOR[:DEPTH]] ({e})") from None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--budgets", nargs="+", default=["25%", "50%"])
    ap.add_argument("--configs", nargs="+", default=["distance", "lru", "lfu", "hobbit", "distance+gate",
                                                     "distance+table", "distance+frequency"])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--n-ctx", dest="n_ctx", type=int, default=512)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/configs.json")
    args = ap.parse_args()
    files.tool_output(args.out)
    configs = [parse_config(c) for c in args.configs]
    layout = read_layout(args.model)
    ctrl = cgroup.memory_controller()
    if ctrl.path is None:
        sys.exit(f"error: needs a writable cgroup memory controller (v1 or v2) to limit memory: {ctrl.reason}")
    kv = bench.kv_cache_bytes(args.model, args.n_ctx)
    bandwidth = bench.disk_bandwidth(args.model)
    allowance = bench.measure_allowance(args.model, n_ctx=args.n_ctx)
    expert_size = layout.expert_bytes / len(layout.experts)
    result = {"kind": "bench_configs", "command": "python " + " ".join(sys.argv), "model": args.model,
              "expert_bytes": layout.expert_bytes, "dense_bytes": layout.dense_bytes, "kv_cache_bytes": kv,
              "allowance_bytes": allowance, "disk_bandwidth_bps": bandwidth, "tokens": args.tokens,
              "runs": args.runs, "machine": bench.machine_facts(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "budgets": []}
    limits_of = {spec: layout.dense_bytes + parse_budget(spec, layout.expert_bytes) + kv + allowance
                 for spec in args.budgets}

    def engine(config):
        return lambda spec: bench.run_child(args.model, stock=config is None, tokens=args.tokens, prompt=bench.PROMPT,
                                            n_ctx=args.n_ctx, limit=limits_of[spec],
                                            cache=None if config is None else replace(config, memory_budget=spec))

    engines = {"stock": engine(None), **{label: engine(config) for label, config in configs}}
    rounds = bench.alternate(engines, args.budgets, args.runs, desc="bench configs")
    for spec in args.budgets:
        budget, limit = parse_budget(spec, layout.expert_bytes), limits_of[spec]
        runs = {label: [one[label] for one in rounds[spec]] for label in engines}
        entry = {"budget": spec, "budget_bytes": budget, "limit_bytes": limit,
                 "stock": bench.engine_summary(runs["stock"]), "configs": []}
        for label, config in configs:
            entry["configs"].append({"label": label, **config.to_dict(budget=False),
                                     **bench.compare(runs[label], runs["stock"], budget, expert_size)})
        result["budgets"].append(entry)
    files.write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

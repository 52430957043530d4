"""What prefetch gains, predictor by predictor: each configuration's decode against no prediction, against its
bound, and its bytes against the floor and against no prediction, under the same memory limits, in one invocation.

    # the oracle over injected routing: the recall above which prefetch pays (bench/results/oracle-prefetch.json)
    python tools/prefetch_sweep.py /work/scale/qwen3-30b-a3b.gguf --route-trace /work/scale/qwen3-trace.npz \\
        --budgets 25% 50% --configs none oracle:1.0 oracle:0.9 oracle:0.75 oracle:0.5 oracle:1.0:2 \\
        --out bench/results/oracle-prefetch.json

    # real predictors on a model's own router
    python tools/prefetch_sweep.py routing-moe-inflated.gguf --configs none auto gate gate:2 table \\
        --out bench/results/routing-fixture-prefetch.json

A configuration is `none` (no prediction), `auto` (the default: gate where it pays, cache.auto; its decisions are
recorded), PREDICTOR[:DEPTH] (gate, table, frequency), or oracle:RECALL[:DEPTH]
(edgemoe_bench.oracle: the injected trace's true experts, each kept with probability RECALL, the rest by chance;
needs --route-trace). Every configuration runs edgemoe with the default policy, in a child under the budget's
cgroup memory limit, with a cold page cache, the configurations' order rotating run by run (bench.alternate);
ratios pair each configuration's run with the `none` run of the same round. `crossover` is, per budget and depth,
the lowest oracle recall whose median decode beats no prediction, interpolated between the recalls measured.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from edgemoe_bench import bench, cgroup
from edgemoe_llamacpp import files
from edgemoe_llamacpp.cache.auto import AUTO
from edgemoe_llamacpp.cache.config import CacheConfig
from edgemoe_llamacpp.cache.predict import MAX_DEPTH, PREDICTORS
from edgemoe_llamacpp.cache.residency import parse_budget
from edgemoe_llamacpp.gguf.layout import read_layout

ROOT = Path(__file__).resolve().parent.parent
NONE = "none"


def parse_config(text: str, *, injected: bool) -> dict:
    """{"label", "predictor", "depth", "recall"} of one configuration; SystemExit with the reason if malformed."""
    name, *rest = text.split(":")
    try:
        if name == NONE and not rest:
            return {"label": text, "predictor": None, "depth": 0, "recall": None}
        if name == AUTO and not rest:
            return {"label": text, "predictor": AUTO, "depth": 1, "recall": None}
        if name == "oracle":
            if not injected:
                raise ValueError("the oracle reads injected routing: give --route-trace")
            if not rest or len(rest) > 2:
                raise ValueError("oracle:RECALL[:DEPTH]")
            recall, depth = float(rest[0]), int(rest[1]) if len(rest) > 1 else 1
            if not 0 <= recall <= 1:
                raise ValueError("oracle:RECALL[:DEPTH], RECALL within [0, 1]")
        elif name in PREDICTORS and len(rest) <= 1:
            recall, depth = None, int(rest[0]) if rest else 1
        else:
            raise ValueError(f"none, {AUTO}, oracle:RECALL[:DEPTH] or PREDICTOR[:DEPTH] with PREDICTOR one of "
                             f"{', '.join(PREDICTORS)}")
        if not 1 <= depth <= MAX_DEPTH:
            raise ValueError(f"DEPTH within 1..{MAX_DEPTH}")
    except ValueError as e:
        raise SystemExit(f"error: bad configuration {text!r}: {e}") from None
    return {"label": text, "predictor": name, "depth": depth, "recall": recall}


def crossover(entry: dict) -> dict[str, float | None]:
    """Per depth: the recall above which prefetch pays: where the median decode ratio to no prediction crosses 1
    above the highest recall measured that does not pay, linearly interpolated (None where the highest recall
    measured does not pay; the lowest measured if all do)."""
    out: dict[str, float | None] = {}
    for depth in sorted({c["depth"] for c in entry["configs"] if c["predictor"] == "oracle"}):
        points = sorted((c["recall"], c["vs_no_prediction"]["median"]) for c in entry["configs"]
                        if c["predictor"] == "oracle" and c["depth"] == depth and c["vs_no_prediction"]["median"])
        losing = [i for i, (_, v) in enumerate(points) if v <= 1]
        if not losing:
            found = points[0][0] if points else None            # all pay: the lowest measured
        elif losing[-1] == len(points) - 1:
            found = None                                         # the highest recall measured does not pay
        else:                                                    # above the last that does not pay
            (r0, v0), (r1, v1) = points[losing[-1]], points[losing[-1] + 1]
            found = r0 + (1 - v0) * (r1 - r0) / (v1 - v0)
        out[str(depth)] = found
    return out


def summarise(config: dict, runs: list[dict], none_runs: list[dict], rounds: list[dict], *, budget: int,
              expert_size: float, only: dict) -> dict:
    """One configuration at one budget: bench.compare's summary and floor against the `none` runs, its decode
    against the bound, and its decode bytes against no prediction's."""
    entry = {**config, **bench.compare(runs, none_runs, budget, expert_size)}
    entry["vs_no_prediction"] = entry.pop("decode_ratio")
    entry.pop("prefill_ratio", None)
    pairs = [{"edgemoe": run, "disk_bandwidth_bps": one["disk_bandwidth_bps"]} for run, one in zip(runs, rounds)]
    bench.bounds(entry, pairs, only)
    mine = [r["decode_read_bytes"] / r["decode_evals"] for r in runs if r["ok"] and r.get("decode_evals")]
    base = [r["decode_read_bytes"] / r["decode_evals"] for r in none_runs if r["ok"] and r.get("decode_evals")]
    entry["bytes_vs_no_prediction"] = statistics.median(mine) / statistics.median(base) if mine and base else None
    if config["predictor"] == AUTO:          # what the default decided in each run
        entry["auto_decisions"] = [r["stats"].get("auto_prefetch") for r in runs if r["ok"]]
    entry["runs"] = runs
    return entry


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--route-trace", dest="route_trace", help="compute this trace's routing (needed by oracle:)")
    ap.add_argument("--budgets", nargs="+", default=["25%", "50%"])
    ap.add_argument("--configs", nargs="+", default=[NONE, "oracle:1.0", "oracle:0.9", "oracle:0.75", "oracle:0.5"])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--n-ctx", dest="n_ctx", type=int, default=512)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/oracle-prefetch.json")
    ap.add_argument("--force", action="store_true", help="replace --out")
    args = ap.parse_args()
    files.tool_output(args.out, "--out", force=args.force)
    configs = [parse_config(c, injected=args.route_trace is not None) for c in args.configs]
    if NONE not in {c["label"] for c in configs}:
        configs.insert(0, parse_config(NONE, injected=False))
    layout = read_layout(args.model)
    controller = cgroup.prepare(cgroup.memory_controller())
    if controller.kind == "none":
        sys.exit(f"error: needs a writable cgroup memory controller (v1 or v2) to limit memory: {controller.reason}")
    run = {"tokens": args.tokens, "prompt": bench.PROMPT, "n_ctx": args.n_ctx, "n_threads": None,
           "route_trace": args.route_trace}
    kv = bench.kv_cache_bytes(args.model, args.n_ctx)
    # the process's own memory, as `edgemoe bench` measures it (stock's run maps the whole file: its peak less the
    # file is what the process needs beside the model's pages; edgemoe's alone reads only what it touched)
    allowance, calibration = bench.calibrate(args.model, n_ctx=args.n_ctx, stock_repack=False,
                                             controller=controller, route_trace=args.route_trace)
    only = bench.compute_alone(args.model, cache=CacheConfig(), **run)
    expert_size = layout.expert_bytes / len(layout.experts)
    limits_of = {spec: layout.dense_bytes + parse_budget(spec, layout.expert_bytes) + kv + allowance
                 for spec in args.budgets}

    def engine(config: dict):
        cache = CacheConfig(predictor=config["predictor"] if config["predictor"] in (AUTO, *PREDICTORS) else None,
                            prefetch_depth=max(1, config["depth"]))
        oracle = {"recall": config["recall"]} if config["predictor"] == "oracle" else None
        return lambda spec: bench.run_child(args.model, stock=False, limit=limits_of[spec], controller=controller,
                                            cache=CacheConfig(**{**cache.to_dict(), "memory_budget": spec}),
                                            oracle=oracle, **run)

    rounds = bench.alternate({c["label"]: engine(c) for c in configs}, args.budgets, args.runs,
                             probe={"disk_bandwidth_bps": lambda: bench.probe_bandwidth(layout)},
                             desc="prefetch sweep")
    result = {"kind": "prefetch_sweep", "command": "python " + " ".join(sys.argv), "model": args.model,
              "arch": layout.arch, "n_layer": layout.n_layer, "n_expert": layout.n_expert,
              "n_expert_used": layout.n_expert_used, "expert_bytes": layout.expert_bytes,
              "dense_bytes": layout.dense_bytes, "kv_cache_bytes": kv, "allowance_bytes": allowance,
              "calibration": calibration, "compute_only": only, "route_trace": args.route_trace,
              "routing": "router" if args.route_trace is None else "injected", "tokens": args.tokens,
              "runs": args.runs, "policy": CacheConfig().policy, "machine": bench.machine_facts(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "budgets": []}
    for spec in args.budgets:
        budget = parse_budget(spec, layout.expert_bytes)
        runs = {c["label"]: [one[c["label"]] for one in rounds[spec]] for c in configs}
        none_runs = runs[NONE]
        entry = {"budget": spec, "budget_bytes": budget, "limit_bytes": limits_of[spec], "configs": []}
        # the `none` runs' traces are consumed by their own summary: the others pair with their speeds only
        for c in sorted(configs, key=lambda c: c["label"] != NONE):
            entry["configs"].append(summarise(c, runs[c["label"]], none_runs, rounds[spec], budget=budget,
                                              expert_size=expert_size, only=only))
        entry["crossover_recall"] = crossover(entry)
        result["budgets"].append(entry)
        for c in entry["configs"]:
            print(f"{spec} {c['label']:>14}: {c['edgemoe']['decode_tok_s']['median'] or 0:6.2f} tok/s, "
                  f"x{c['vs_no_prediction']['median'] or 0:.2f} vs none, {c['decode_vs_bound'] or 0:.2f}x bound, "
                  f"bytes {c.get('edgemoe_bytes_vs_floor') or 0:.2f}x floor, "
                  f"{c['bytes_vs_no_prediction'] or 0:.2f}x none's")
        print(f"{spec} crossover recall by depth: {entry['crossover_recall']}")
    files.write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Prefill under a memory limit: `edgemoe bench --prompt-tokens N` for each model and prompt length, in one file.

    python tools/prefill_bench.py /work/scale/gpt-oss-20b.gguf /work/scale/qwen3-30b-a3b.gguf \
        --prompt-tokens 512 2048 --memory-budget 25% 50% --runs 2 \
        --route-trace /work/scale/traces/gpt-oss-20b.npz /work/scale/traces/qwen3-30b-a3b.npz \
        --json bench/results/prefill.json

Each (model, prompt length) is one run_bench: stock and edgemoe alternate under the same cgroup limit, cold page
cache, a few decoded tokens after the prompt (--tokens). The result keeps every bench whole (`benches`) and a
table row per (model, prompt length, budget): prefill tok/s of both engines, their paired ratio, edgemoe's
prefill time over its bound, max(prefill of the warm reference, the prompt's expert bytes at disk speed), the
decode that follows against stock's, and the budget edgemoe gave up to memory pressure (cache/reclaim.py).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from edgemoe_bench.bench import run_bench
from edgemoe_llamacpp import files
from edgemoe_llamacpp.errors import EdgeMoEError


def _median(x):
    """A bench figure given as a spread ({"median": ...}) or as the median alone."""
    return x.get("median") if isinstance(x, dict) else x


def _given_up(budget: dict) -> float | None:
    """The median over edgemoe's runs of the budget it gave up to memory pressure (cache/reclaim.py)."""
    given = [p["edgemoe"]["stats"]["capacity_given_up_bytes"] for p in budget.get("pairs", [])
             if "capacity_given_up_bytes" in (p.get("edgemoe", {}).get("stats") or {})]
    return statistics.median(given) if given else None


def rows(bench: dict) -> list[dict]:
    """One row per budget of a bench with --prompt-tokens: what the prefill table shows."""
    out = []
    for b in bench["budgets"]:
        out.append({"model": Path(bench["model"]).name, "prompt_tokens": bench.get("prompt_tokens"),
                    "budget": b["budget"], "limit_bytes": b["limit_bytes"],
                    "stock_prefill_tok_s": b["stock"]["prefill_tok_s"]["median"],
                    "edgemoe_prefill_tok_s": b["edgemoe"]["prefill_tok_s"]["median"],
                    "prefill_ratio": (b.get("prefill_ratio") or {}).get("median"),
                    "prefill_ratio_range": [(b.get("prefill_ratio") or {}).get("min"),
                                            (b.get("prefill_ratio") or {}).get("max")],
                    "prefill_vs_bound": _median(b.get("prefill_vs_bound")),
                    "prefill_floor_tok_s": b.get("prefill_floor_tok_s"),
                    "prompt_expert_bytes": b.get("prompt_expert_bytes"),
                    "compute_alone_prefill_tok_s": (bench.get("compute_only") or {}).get("prefill_tok_s"),
                    "decode_ratio": _median(b.get("decode_ratio")),       # the tokens decoded after the prompt
                    "capacity_given_up_bytes": _given_up(b),
                    "runs": b["stock"]["runs"]})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--prompt-tokens", type=int, nargs="+", required=True)
    ap.add_argument("--memory-budget", nargs="+", default=["25%", "50%"])
    ap.add_argument("--route-trace", nargs="+", help="one routing trace per model (both engines compute it)")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=4, help="tokens decoded after each prompt")
    ap.add_argument("--stock-repack", choices=("on", "off"), default="off")
    ap.add_argument("--allowance", type=int, help="bytes each run needs besides the model and its KV cache "
                    "(default: measured, two more runs per bench)")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    try:
        files.tool_output(args.json, "--json", force=args.force)
        traces = args.route_trace or [None] * len(args.models)
        if len(traces) != len(args.models):
            raise EdgeMoEError("give one --route-trace per model, or none")
        benches = []
        for model, trace in zip(args.models, traces, strict=True):
            for n in args.prompt_tokens:
                print(f"{Path(model).name}: a {n}-token prompt at {', '.join(args.memory_budget)}", flush=True)
                bench = run_bench(model, args.memory_budget, runs=args.runs, tokens=args.tokens, prompt_tokens=n,
                                  stock_repack=args.stock_repack == "on", route_trace=trace,
                                  allowance=args.allowance)
                bench["prompt_tokens"] = n
                benches.append(bench)
                doc = {"kind": "prefill", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "benches": benches}
                files.write_text(args.json, json.dumps(doc, indent=1) + "\n")     # after each: a stop keeps the rest
                doc["rows"] = [r for b in benches for r in rows(b)]
                files.write_text(args.json, json.dumps(doc, indent=1) + "\n")
        for r in doc["rows"]:
            print(json.dumps({k: r[k] for k in ("model", "prompt_tokens", "budget", "stock_prefill_tok_s",
                                                "edgemoe_prefill_tok_s", "prefill_ratio", "prefill_vs_bound")}))
    except EdgeMoEError as e:
        ap.exit(2, f"error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

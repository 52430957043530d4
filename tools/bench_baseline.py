"""Decode speed against an earlier commit of edgemoe, measured in one invocation: stock, the baseline commit and
this tree take turns run by run, each a child under the same cgroup memory limit with a cold page cache, as
`edgemoe bench` runs them.

    python tools/bench_baseline.py bench/models/io-moe.gguf --baseline 419ab44 --budgets 50% --runs 3 --tokens 32

The baseline's package is checked out (`git worktree`) into build/baseline-COMMIT and imported by its runs in
place of this tree's; each calls that commit's own `generate` with the memory budget and its own defaults for
everything else (policy, fetching). Both edgemoe engines run on the installed llama-cpp-python. Writes
bench/results/baseline.json (rendered by tools/bench_report.py): per budget, each engine's median decode tok/s
and bytes read per decoded token, and this tree's decode over the baseline's and over stock's, run by run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from edgemoe_bench import bench, cgroup
from edgemoe_llamacpp import files, limits
from edgemoe_llamacpp.cache.config import CacheConfig
from edgemoe_llamacpp.cache.residency import parse_budget
from edgemoe_llamacpp.gguf.layout import read_layout

ROOT = Path(__file__).resolve().parent.parent

# one run of the baseline's own generate(), its package first on the path
BASELINE_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
from edgemoe_llamacpp.engine.generate import generate
out = generate(**json.loads(sys.argv[2]))
out.pop("trace", None)
print(json.dumps(out))
"""


def checkout(commit: str) -> Path:
    """A worktree of `commit` under build/ (made once), whose package the baseline's runs import."""
    full = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{commit}^{{commit}}"], check=True,
                          capture_output=True, text=True).stdout.strip()
    where = ROOT / "build" / f"baseline-{full[:12]}"
    if not (where / "edgemoe_llamacpp").is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--force", "--detach", str(where), full],
                       check=True, capture_output=True)
    return where


def baseline_run(tree: Path, model: str, spec: str, tokens: int, n_ctx: int, limit: int) -> dict:
    args = {"model": model, "prompt": bench.PROMPT, "max_tokens": tokens, "n_ctx": n_ctx, "memory_budget": spec}
    limits.drop_file_cache(model)
    run = cgroup.run_limited([sys.executable, "-c", BASELINE_CHILD, str(tree), json.dumps(args)], limit)
    if run.returncode:
        return {"ok": False, "returncode": run.returncode, "error": run.stderr.strip().splitlines()[-1:]}
    return {"ok": True, "peak_bytes": run.peak_bytes, **json.loads(run.stdout)}


def figures(run: dict) -> dict | None:
    """decode tok/s and bytes read per decoded token of a run that worked."""
    if not run.get("ok") or not run.get("decode_tok_s"):
        return None
    evals = run.get("decode_evals") or run["tokens"] - 1
    return {"decode_tok_s": run["decode_tok_s"], "decode_read_bytes_per_token": run["decode_read_bytes"] / evals,
            "prefill_tok_s": run.get("prefill_tok_s"), "text": run.get("text")}


def median(rows: list[dict | None], key: str) -> float | None:
    return bench.spread([r[key] for r in rows if r is not None])["median"]


def ratio(top: list[dict | None], bottom: list[dict | None]) -> dict:
    """`top`'s decode over `bottom`'s, run by run (runs where both worked), and their median."""
    runs = [a["decode_tok_s"] / b["decode_tok_s"] for a, b in zip(top, bottom, strict=True) if a and b]
    return {"median": bench.spread(runs)["median"], "runs": runs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--baseline", required=True, help="the commit to compare with (anything git rev-parse takes)")
    ap.add_argument("--budgets", nargs="+", default=["50%"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--n-ctx", dest="n_ctx", type=int, default=512)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/baseline.json")
    args = ap.parse_args()
    files.tool_output(args.out)
    ctrl = cgroup.memory_controller()
    if ctrl.path is None:
        sys.exit(f"error: needs a writable cgroup memory controller (v1 or v2) to limit memory: {ctrl.reason}")
    tree = checkout(args.baseline)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()
    layout = read_layout(args.model)
    kv = bench.kv_cache_bytes(args.model, args.n_ctx)
    allowance = bench.measure_allowance(args.model, n_ctx=args.n_ctx)
    result = {"kind": "bench_baseline", "command": "python " + " ".join(sys.argv), "model": args.model,
              "baseline": tree.name.removeprefix("baseline-"), "head": head[:12], "tokens": args.tokens,
              "runs": args.runs, "allowance_bytes": allowance, "machine": bench.machine_facts(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "budgets": []}
    limits_of = {spec: layout.dense_bytes + parse_budget(spec, layout.expert_bytes) + kv + allowance
                 for spec in args.budgets}

    def ours(stock: bool):
        return lambda spec: bench.run_child(args.model, stock=stock, tokens=args.tokens, prompt=bench.PROMPT,
                                            n_ctx=args.n_ctx, limit=limits_of[spec],
                                            cache=None if stock else CacheConfig(memory_budget=spec))

    engines = {"stock": ours(True),
               "baseline": lambda spec: baseline_run(tree, args.model, spec, args.tokens, args.n_ctx, limits_of[spec]),
               "head": ours(False)}
    rounds = bench.alternate(engines, args.budgets, args.runs, desc="bench baseline",
                             probe={"disk": lambda: bench.disk_bandwidth(args.model, region=bench.expert_region(layout))})
    for spec in args.budgets:
        budget, limit = parse_budget(spec, layout.expert_bytes), limits_of[spec]
        rows: dict[str, list] = {e: [] for e in engines}
        for r, one in enumerate(rounds[spec]):
            for eng in engines:
                rows[eng].append(figures(one[eng]))
                if rows[eng][-1] is None:
                    tqdm.write(f"{spec} {eng} run {r + 1} failed: {one[eng].get('error')}")
        disks = [one["disk"] for one in rounds[spec]]
        entry = {"budget": spec, "budget_bytes": budget, "limit_bytes": limit,
                 "disk_bandwidth_bps": statistics.median(disks),
                 **{eng: {key: median(rows[eng], key) for key in
                          ("decode_tok_s", "decode_read_bytes_per_token", "prefill_tok_s")} for eng in engines},
                 "runs": {eng: [r and {k: v for k, v in r.items() if k != "text"} for r in rows[eng]]
                          for eng in engines},
                 "head_vs_baseline": ratio(rows["head"], rows["baseline"]),
                 "head_vs_stock": ratio(rows["head"], rows["stock"]),
                 "baseline_vs_stock": ratio(rows["baseline"], rows["stock"]),
                 "same_text": len({r["text"] for rs in rows.values() for r in rs if r}) == 1}
        result["budgets"].append(entry)
    files.write_text(args.out, json.dumps(result, indent=1) + "\n")
    for b in result["budgets"]:
        print(f"{b['budget']}: head {b['head']['decode_tok_s']:.2f} tok/s at "
              f"{b['head']['decode_read_bytes_per_token'] / 1e6:.1f} MB/token, baseline "
              f"{b['baseline']['decode_tok_s']:.2f} at {b['baseline']['decode_read_bytes_per_token'] / 1e6:.1f}, "
              f"stock {b['stock']['decode_tok_s']:.2f}; head/baseline {b['head_vs_baseline']['median']:.2f}x, "
              f"head/stock {b['head_vs_stock']['median']:.2f}x")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

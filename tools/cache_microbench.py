"""Micro-benchmark of the expert cache's bookkeeping: ensure() with 8 misses a layer, no llama.cpp, no I/O.

A synthetic layout (edgemoe_bench.replay.synthetic_layout, one page per expert) behind ReplayStorage. The
layers are served in turn, each asking for 8 of its experts that are not resident, so once the cache is full
every ensure() evicts 8. Only ensure() is timed: the median over the measured layers, the least of a few
runs (other processes on a shared machine only add time).
Sizes: 48 layers x 128 experts holding 1,024, 3,072 (a 50% budget) and 5,760 experts (the most that leaves 8
out in every layer); and 50% budgets of 48 x 42 and 48 x 256 experts (1,008 and 6,144 held).
`--before REV` measures ExpertCache as it was at REV (the cache that sorted every resident expert on each
miss), loaded from git, with its I/O stubbed the way tools/policy_replay.py stubbed it then.

    python tools/cache_microbench.py --json bench/results/cache-microbench.json
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from edgemoe_bench.replay import ReplayCache, synthetic_layout
from edgemoe_llamacpp import files
from edgemoe_llamacpp.cache.residency import POLICIES
from edgemoe_llamacpp.gguf.layout import ExpertUID

ROOT = Path(__file__).resolve().parent.parent
BEFORE = "419ab44"              # the last commit whose ExpertCache sorted the resident experts on every miss
LAYERS, MISSES = 48, 8
SIZES = [(128, 1024), (128, 3072), (128, 5760), (42, 1008), (256, 6144)]    # (experts per layer, held)


def sorting_cache(rev: str, tmp: Path):
    """A factory (layout, budget, policy) -> ExpertCache from edgemoe_llamacpp/residency.py at `rev`, fetching and
    dropping nothing; it opens the model, so each layout gets a sparse file of its size in `tmp`."""
    src = subprocess.run(["git", "show", f"{rev}:edgemoe_llamacpp/residency.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    (tmp / "residency_before.py").write_text(src)
    name = "edgemoe_llamacpp._residency_before"            # in the package: its relative imports resolve
    spec = importlib.util.spec_from_file_location(name, tmp / "residency_before.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module                            # dataclasses look their module up
    spec.loader.exec_module(module)

    class Before(module.ExpertCache):
        def _fetch(self, uids):
            return sum(self.cost[u] for u in uids)

        def _drop(self, spans):
            pass

        def _submit_prefetch(self, uid):
            done = Future()
            done.set_result(self.cost[uid])
            return done

    def make(layout, budget, policy):
        model = tmp / "model.gguf"
        model.touch()
        os.truncate(model, layout.file_size)
        return Before(dataclasses.replace(layout, path=str(model)), budget, policy=policy)
    return make


def measure(make_cache, resident_key, n_expert: int, held: int, tokens: int, seed: int = 0) -> list[float]:
    """Seconds of each ensure() over `tokens` tokens once a cache holding `held` one-page experts is full."""
    cache = make_cache(synthetic_layout(LAYERS, n_expert, MISSES), held * os.sysconf("SC_PAGE_SIZE"))
    rng = np.random.default_rng(seed)
    out, step, full_at = [], 0, None
    while full_at is None or step < full_at + LAYERS * (tokens + 1):
        layer = step % LAYERS
        ids = rng.choice([e for e in range(n_expert) if resident_key(layer, e) not in cache.resident], MISSES,
                         replace=False).tolist()
        t0 = time.perf_counter()
        cache.ensure(layer, ids)
        dt = time.perf_counter() - t0
        if full_at is None and cache.stats.total().bytes_evicted:
            full_at = step - layer + LAYERS                   # from the next token on, a token to settle
        elif full_at is not None and step >= full_at + LAYERS:
            out.append(dt)
        step += 1
    assert len(cache.resident) == held, (len(cache.resident), held)
    cache.close()
    return out


def bench(versions: dict, n_expert: int, held: int, policy: str, tokens: int, repeats: int) -> dict:
    """One row: per version, the medians of `repeats` runs; the least of them is the figure (a shared machine
    only ever adds time)."""
    row = {"layers": LAYERS, "experts_per_layer": n_expert, "held": held,
           "budget_fraction": round(held / (LAYERS * n_expert), 3), "policy": policy}
    for version, (make, key) in versions.items():
        runs = [measure(lambda layout, budget, make=make: make(layout, budget, policy), key, n_expert, held, tokens)
                for _ in range(repeats)]
        medians = [statistics.median(r) * 1e6 for r in runs]
        row[version] = {"median_us": min(medians), "run_medians_us": medians, "samples": len(runs[0])}
    before = f"{row['before']['median_us']:8.0f}" if "before" in row else f"{'-':>8}"
    after = row["after"]["median_us"]
    speedup = f"{row['before']['median_us'] / after:7.1f}x" if "before" in row else ""
    print(f"{LAYERS}x{n_expert:<4d} {held:5d} ({row['budget_fraction']:4.0%})  {policy:8s} {before} {after:8.0f} {speedup}",
          flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    ap.add_argument("--tokens", type=int, default=10, help="tokens measured (x 48 layers)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each; the least median is reported")
    ap.add_argument("--before", default=BEFORE, help="git revision of the sorting cache ('' to skip)")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.json:
        files.tool_output(args.json, "--json")
    versions = {"after": (lambda layout, budget, policy: ReplayCache(layout, budget, policy=policy),
                          lambda layer, e: ExpertUID(layer, e))}
    print(f"median us of one ensure(), {MISSES} misses\n{'layout':8s} {'held':13s} {'policy':8s} {'before':>8s} "
          f"{'after':>8s} {'speedup':>8s}")
    with tempfile.TemporaryDirectory(prefix="microbench-") as tmp:
        if args.before:
            versions["before"] = (sorting_cache(args.before, Path(tmp)), lambda layer, e: (layer, e))
        rows = [bench(versions, n_expert, held, policy, args.tokens, args.repeats) for n_expert, held in SIZES
                for policy in args.policies]
    result = {"kind": "cache_microbench", "command": "python " + " ".join(sys.argv),
              "what": f"microseconds of one ExpertCache.ensure() with {MISSES} misses, the cache full, no I/O",
              "before_revision": args.before or None, "load_average": os.getloadavg(), "cpus": os.cpu_count(),
              "python": sys.version.split()[0], "rows": rows}
    if args.json:
        files.write_text(args.json, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

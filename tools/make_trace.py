"""Write a generated routing trace, and the table of every preset's statistics beside the published figures
they are calibrated to.

    python tools/make_trace.py qwen3-30b-a3b --tokens 4096 --seed 0 --out bench/traces/qwen3.npz
    python tools/make_trace.py uniform --tokens 4096 --layers 16 --experts 64 --k 8 --out /tmp/u.npz
    python tools/make_trace.py --stats --tokens 4096 --seed 0 --seeds 10   # -> bench/results/trace-stats.json
    python tools/make_trace.py olmoe --calibrate                # search the preset's parameters again

A trace's table (statistic, measured, target, relative error) is printed as markdown. --stats generates a trace
of every preset at its model's geometry (seed --seed), and the range of each statistic over --seeds traces (seeds
from --seed), prints one table of them all and writes it as JSON (--stats-json).
--calibrate runs a Nelder-Mead search of the preset's free parameters (common random numbers: the same
seeds throughout), minimising the squared relative errors of the statistics, summed and averaged over a
few traces (bias and spread alike), and prints the table of their means and the parameters to store in
edgemoe_bench/trace_gen.py.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from edgemoe_bench import trace_gen
from edgemoe_bench.routing_trace import RoutingTrace
from edgemoe_bench.trace_gen import PRESETS, TOLERANCE, Geometry, TraceParams, compare, preset
from edgemoe_bench.trace_stats import trace_stats
from edgemoe_llamacpp import files
from edgemoe_llamacpp.errors import EdgeMoEError

STATS_JSON = Path(__file__).resolve().parent.parent / "bench" / "results" / "trace-stats.json"
# what --calibrate may change, per preset (the rest stays as stored)
FREE = {"qwen3-30b-a3b": ("skew", "signal", "fast_jump", "slow_jump", "slow_share", "link"),
        "olmoe": ("skew", "signal", "fast_jump", "slow_jump", "slow_share", "link")}
UNBOUNDED = ("skew", "signal")      # searched as logs; the others, probabilities, as logits


def table(presets: dict[str, list[dict]]) -> str:
    """One markdown table of each preset's rows (statistic, measured, target, relative error, and where the rows
    have them, the range and the worst relative error over several seeds' traces)."""
    def fmt(x):
        return "" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)

    def pct(x):
        return "" if x is None else f"{100 * x:+.1f}%"

    seeds = any("range" in r for rows in presets.values() for r in rows)
    head = "| preset | statistic | measured | target | rel. error |" + \
        (" range over seeds | worst error over seeds |" if seeds else "")
    lines = [head, "|---|---|---:|---:|---:|" + ("---:|---:|" if seeds else "")]
    for name, rows in presets.items():
        for r in rows:
            line = f"| {name} | {r['statistic']} | {fmt(r['measured'])} | {fmt(r['target'])} | {pct(r['rel_error'])} |"
            if seeds:
                low, high = r["range"]
                line += f" {fmt(low)} - {fmt(high)} | {pct(r['worst_rel_error_over_seeds'])} |"
            lines.append(line)
    return "\n".join(lines)


def worst(rows: list[dict]) -> float:
    """The largest relative error of a targeted statistic."""
    return max((abs(r["rel_error"]) for r in rows if r["rel_error"] is not None), default=0.0)


# ---------------------------------------------------------------- calibration

def _encode(params: TraceParams, names: tuple[str, ...]) -> np.ndarray:
    out = []
    for n in names:
        v = getattr(params, n)
        out.append(math.log(v) if n in UNBOUNDED else math.log(v / (1 - v)))
    return np.array(out)


def _decode(x: np.ndarray, base: TraceParams, names: tuple[str, ...]) -> TraceParams:
    values = {n: (math.exp(v) if n in UNBOUNDED else 1 / (1 + math.exp(-v))) for n, v in zip(names, x, strict=True)}
    return replace(base, **values)


def objective(params: TraceParams, p, n_tokens: int, seeds: range) -> tuple[float, list[dict]]:
    """The squared relative errors of the targeted statistics, summed over statistics and averaged over the
    traces of `seeds` (so a trace's spread from seed to seed counts as much as the mean's bias); and the rows
    of the statistics' means."""
    runs = [trace_stats(trace_gen.generate(p.geometry, params, n_tokens, s), p.geometry.n_expert, **p.stats_args)
            for s in seeds]
    loss = float(np.mean([sum(r["rel_error"] ** 2 for r in compare(run, p.targets) if r["target"] is not None)
                          for run in runs]))
    mean = {key: float(np.mean([r[key] for r in runs])) for key in p.targets}
    return loss, [r for r in compare(mean, p.targets) if r["target"] is not None]


def nelder_mead(f, x0: np.ndarray, step: float = 0.4, iters: int = 150, tol: float = 1e-4):
    """Minimise f from x0 (the textbook simplex: reflect, expand, contract, shrink)."""
    pts = [x0] + [x0 + step * e for e in np.eye(len(x0))]
    vals = [f(x) for x in pts]
    for _ in range(iters):
        order = np.argsort(vals)
        pts, vals = [pts[i] for i in order], [vals[i] for i in order]
        if vals[0] < tol:
            break
        centre = np.mean(pts[:-1], axis=0)
        refl = centre + (centre - pts[-1])
        fr = f(refl)
        if fr < vals[0]:
            exp = centre + 2 * (centre - pts[-1])
            fe = f(exp)
            pts[-1], vals[-1] = (exp, fe) if fe < fr else (refl, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = refl, fr
        else:
            con = centre + 0.5 * (pts[-1] - centre)
            fc = f(con)
            if fc < vals[-1]:
                pts[-1], vals[-1] = con, fc
            else:
                pts = [pts[0]] + [pts[0] + 0.5 * (q - pts[0]) for q in pts[1:]]
                vals = [vals[0]] + [f(q) for q in pts[1:]]
    best = int(np.argmin(vals))
    return pts[best], vals[best]


def calibrate(name: str, n_tokens: int, seeds: range, iters: int, n_layers: int | None) -> TraceParams:
    """Fitted parameters, on the preset's geometry cut to `n_layers` MoE layers (its statistics are means over
    layers that are alike, so fewer layers estimate them as well, only noisier)."""
    p = preset(name)
    if n_layers:
        p = replace(p, geometry=replace(p.geometry, n_layers=min(n_layers, p.geometry.n_layers)))
    if name not in FREE:
        raise EdgeMoEError(f"the {name} preset has nothing to calibrate (its targets are chance values)")
    names = FREE[name]
    bar = tqdm(desc=f"calibrate {name}", unit="evaluation")
    best = [math.inf, None]

    def f(x):
        params = _decode(x, p.params, names)
        loss, rows = objective(params, p, n_tokens, seeds)
        bar.update(1)
        if loss < best[0]:
            best[:] = [loss, rows]
            bar.set_postfix(worst=f"{worst(rows):.3f}")
            tqdm.write(f"best so far: loss {loss:.5f}, {params}")      # a long search can be stopped and resumed
        return loss

    x, _ = nelder_mead(f, _encode(p.params, names), iters=iters)
    bar.close()
    return _decode(x, p.params, names)


# ---------------------------------------------------------------- main

def preset_stats(name: str, n_tokens: int, seed: int, geometry: Geometry | None = None) -> tuple[RoutingTrace, dict]:
    """A generated trace of preset `name` and the record of its statistics beside the preset's targets."""
    p = preset(name, geometry)
    start = time.perf_counter()
    trace = trace_gen.make_trace(name, n_tokens, seed, geometry)
    seconds = time.perf_counter() - start
    stats = trace.stats(**p.stats_args)
    rows = compare(stats, p.targets)
    return trace, {
        "source": trace.source, "generate_s": round(seconds, 2),
        "geometry": {"moe_layers": len(trace.layers), "n_expert": trace.n_expert, "k": trace.k},
        "params": vars(p.params), "stats_params": stats["params"], "sources": list(p.sources),
        "rows": rows, "worst_rel_error": worst(rows), "within_tolerance": worst(rows) <= TOLERANCE}


def add_spread(name: str, entry: dict, n_tokens: int, seeds: range) -> None:
    """Add to each row of `entry` (the trace of seeds[0]) its range over the traces of `seeds` and their largest
    relative error (signed), and to the entry the worst of these: how much the statistics move from trace to trace."""
    p = preset(name)
    runs = [entry["rows"]] + [compare(trace_gen.make_trace(name, n_tokens, s).stats(**p.stats_args), p.targets)
                              for s in seeds[1:]]
    for i, row in enumerate(entry["rows"]):
        values = [run[i]["measured"] for run in runs]
        errors = [run[i]["rel_error"] for run in runs]
        row["range"] = [min(values), max(values)]
        row["worst_rel_error_over_seeds"] = None if row["target"] is None else max(errors, key=abs)
    entry["seeds"] = [seeds[0], seeds[-1]]
    entry["worst_rel_error_over_seeds"] = worst([r for run in runs for r in run])
    entry["within_tolerance_over_seeds"] = entry["worst_rel_error_over_seeds"] <= TOLERANCE


def all_stats(n_tokens: int, seed: int, n_seeds: int) -> dict:
    """Every preset's statistics at its model's geometry (uniform: qwen3-30b-a3b's), and their spread over
    `n_seeds` traces (seeds `seed`...), as one JSON document."""
    if n_seeds < 1:
        raise EdgeMoEError(f"--seeds must be at least 1, not {n_seeds}")
    presets = {}
    for name in tqdm(PRESETS, desc="presets"):
        presets[name] = preset_stats(name, n_tokens, seed)[1]
        add_spread(name, presets[name], n_tokens, range(seed, seed + n_seeds))
    return {"command": f"python tools/make_trace.py --stats --tokens {n_tokens} --seed {seed} --seeds {n_seeds}",
            "tokens": n_tokens, "seed": seed, "tolerance": TOLERANCE, "presets": presets,
            "all_within_tolerance": all(e["within_tolerance"] for e in presets.values()),
            "all_within_tolerance_over_seeds": all(e["within_tolerance_over_seeds"] for e in presets.values())}


def run(args: argparse.Namespace) -> int:
    if args.stats and (args.preset or args.out or args.calibrate):
        raise EdgeMoEError("--stats makes every preset's table at its model's geometry; it takes no preset, "
                           "--out or --calibrate")
    if args.stats:
        files.tool_output(args.stats_json, "--stats-json")
        doc = all_stats(args.tokens, args.seed, args.seeds)
        files.write_text(args.stats_json, json.dumps(doc, indent=2) + "\n")
        print(f"{args.tokens} tokens a trace; measured: seed {args.seed}; range: seeds {args.seed}-"
              f"{args.seed + args.seeds - 1}; written to {args.stats_json}\n")
        print(table({name: e["rows"] for name, e in doc["presets"].items()}))
        print(f"\nworst targeted statistic (seed {args.seed}; over the seeds): " + ", ".join(
            f"{name} {100 * e['worst_rel_error']:.1f}%; {100 * e['worst_rel_error_over_seeds']:.1f}%"
            for name, e in doc["presets"].items()) + f" from its target (tolerance {100 * TOLERANCE:.0f}%)")
        return 0
    if args.preset is None:
        raise EdgeMoEError("name a preset, or pass --stats for all of them")
    if args.calibrate:
        seeds = range(args.seed, args.seed + args.calibrate_seeds)
        params = calibrate(args.preset, args.tokens, seeds, args.iters, args.calibrate_layers)
        _loss, rows = objective(params, replace(preset(args.preset), params=params), args.tokens, seeds)
        print(table({args.preset: rows}))
        print(f"\n{args.preset}: {params}")
        return 0
    base = PRESETS[args.preset].geometry
    geometry = None
    if (args.layers, args.experts, args.k) != (None, None, None):
        geometry = Geometry(args.layers or base.n_layers, args.experts or base.n_expert, args.k or base.k)
    if args.out:
        files.check_output(args.out, force=args.force, what="trace")    # before the work, not after
    trace, entry = preset_stats(args.preset, args.tokens, args.seed, geometry)
    if args.out:
        trace.save(args.out, force=args.force)
    print(f"{trace.source}: {trace.n_tokens} tokens x {len(trace.layers)} MoE layers x top-{trace.k} of "
          f"{trace.n_expert} experts, generated in {entry['generate_s']:.1f} s"
          f"{f', written to {args.out}' if args.out else ''}\n")
    print(table({args.preset: entry["rows"]}))
    print(f"\nworst targeted statistic: {100 * entry['worst_rel_error']:.1f}% from its target "
          f"(tolerance {100 * TOLERANCE:.0f}%)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", nargs="?", choices=PRESETS)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="write the trace (.npz)")
    ap.add_argument("--force", action="store_true", help="replace --out if it exists")
    ap.add_argument("--stats", action="store_true", help="every preset's statistics table, printed and written as "
                    "JSON to --stats-json")
    ap.add_argument("--stats-json", type=Path, default=STATS_JSON, help="where --stats writes (JSON)")
    ap.add_argument("--seeds", type=int, default=5, help="--stats: also the range of each statistic over this many "
                    "traces (seeds from --seed)")
    ap.add_argument("--layers", type=int, help="MoE layers (another geometry: the preset's parameters, no targets)")
    ap.add_argument("--experts", type=int, help="experts per layer")
    ap.add_argument("--k", type=int, help="experts per token")
    ap.add_argument("--calibrate", action="store_true", help="search the preset's parameters instead")
    ap.add_argument("--iters", type=int, default=150, help="--calibrate: simplex iterations")
    ap.add_argument("--calibrate-seeds", type=int, default=3, help="--calibrate: traces (seeds from --seed) whose "
                    "statistics are averaged")
    ap.add_argument("--calibrate-layers", type=int, help="--calibrate: MoE layers of its traces (default: the "
                    "preset's; fewer is faster, but the next-layer lift depends on depth)")
    args = ap.parse_args(argv)
    try:
        return run(args)
    except EdgeMoEError as e:
        ap.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())

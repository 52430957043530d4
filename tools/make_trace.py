"""Write a generated routing trace and show its statistics beside the published figures it is calibrated to.

    python tools/make_trace.py qwen3-30b-a3b --tokens 4096 --seed 0 --out bench/traces/qwen3.npz
    python tools/make_trace.py uniform --tokens 4096 --layers 16 --experts 64 --k 8 --out /tmp/u.npz
    python tools/make_trace.py olmoe --calibrate            # search the preset's parameters again

Prints a markdown table (statistic, measured, target, relative error) and writes it as JSON to
bench/results/trace-stats.json (--stats-json), under the preset's name, beside the other presets'.
--calibrate runs a Nelder-Mead search of the preset's free parameters (common random numbers: the same
seeds throughout), minimising the squared relative errors of the statistics, summed and averaged over a
few traces (bias and spread alike), and prints the table of their means and the parameters to store in
edgemoe_llamacpp/trace_gen.py.
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

from edgemoe_llamacpp import files
from edgemoe_llamacpp.errors import EdgeMoEError
from edgemoe_llamacpp.trace_gen import PRESETS, Geometry, TraceParams, compare, generate, make_trace, preset
from edgemoe_llamacpp.trace_stats import trace_stats

STATS_JSON = Path(__file__).resolve().parent.parent / "bench" / "results" / "trace-stats.json"
# what --calibrate may change, per preset (the rest stays as stored)
FREE = {"qwen3-30b-a3b": ("skew", "signal", "fast_jump", "slow_jump", "slow_share", "link"),
        "olmoe": ("skew", "signal", "fast_jump", "slow_jump", "slow_share", "link")}
UNBOUNDED = ("skew", "signal")      # searched as logs; the others, probabilities, as logits
TOLERANCE = 0.10                    # every targeted statistic within 10% relative of its target


def table(rows: list[dict]) -> str:
    def fmt(x):
        return "" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)

    lines = ["| statistic | measured | target | rel. error |", "|---|---:|---:|---:|"]
    for r in rows:
        err = "" if r["rel_error"] is None else f"{100 * r['rel_error']:+.1f}%"
        lines.append(f"| {r['statistic']} | {fmt(r['measured'])} | {fmt(r['target'])} | {err} |")
    return "\n".join(lines)


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
    runs = [trace_stats(generate(p.geometry, params, n_tokens, s), p.geometry.n_expert, **p.stats_args)
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
    from tqdm import tqdm

    p = preset(name)
    if n_layers:
        p = replace(p, geometry=replace(p.geometry, n_layers=min(n_layers, p.geometry.n_layers)))
    if name not in FREE:
        raise EdgeMoEError(f"the {name} preset has nothing to calibrate (its targets are chance values)")
    names = FREE[name]
    bar = tqdm(desc=f"calibrate {name}", unit="trace")
    best = [math.inf, None]

    def f(x):
        loss, rows = objective(_decode(x, p.params, names), p, n_tokens, seeds)
        bar.update(1)
        if loss < best[0]:
            best[:] = [loss, rows]
            bar.set_postfix(worst=f"{max(abs(r['rel_error']) for r in rows):.3f}")
        return loss

    x, _ = nelder_mead(f, _encode(p.params, names), iters=iters)
    bar.close()
    return _decode(x, p.params, names)


# ---------------------------------------------------------------- main

def save_stats(path: Path, name: str, entry: dict) -> None:
    """Merge this preset's entry into the JSON of every preset's statistics (atomic write)."""
    doc = {}
    if path.exists():
        try:
            doc = json.loads(files.read_bytes(path, "statistics file"))
        except ValueError:
            raise EdgeMoEError(f"{path}: not JSON; move it away or pass another --stats-json") from None
    doc[name] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_text(path, json.dumps(doc, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", choices=PRESETS)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="write the trace (.npz)")
    ap.add_argument("--force", action="store_true", help="replace --out if it exists")
    ap.add_argument("--stats-json", type=Path, default=STATS_JSON, help="where the statistics go (JSON)")
    ap.add_argument("--no-stats-json", action="store_true", help="print the table only")
    ap.add_argument("--layers", type=int, help="uniform only: MoE layers")
    ap.add_argument("--experts", type=int, help="uniform only: experts per layer")
    ap.add_argument("--k", type=int, help="uniform only: experts per token")
    ap.add_argument("--calibrate", action="store_true", help="search the preset's parameters instead")
    ap.add_argument("--iters", type=int, default=150, help="--calibrate: simplex iterations")
    ap.add_argument("--calibrate-seeds", type=int, default=3, help="--calibrate: traces (seeds from --seed) whose "
                    "statistics are averaged")
    ap.add_argument("--calibrate-layers", type=int, help="--calibrate: MoE layers of its traces (default: the "
                    "preset's; fewer is faster, but the next-layer lift depends on depth)")
    args = ap.parse_args(argv)
    try:
        base = PRESETS[args.preset].geometry
        geometry = None
        if (args.layers, args.experts, args.k) != (None, None, None):
            geometry = Geometry(args.layers or base.n_layers, args.experts or base.n_expert, args.k or base.k)
        if args.calibrate:
            seeds = range(args.seed, args.seed + args.calibrate_seeds)
            params = calibrate(args.preset, args.tokens, seeds, args.iters, args.calibrate_layers)
            p = replace(preset(args.preset), params=params)
            _loss, rows = objective(params, p, args.tokens, seeds)
            print(table(rows))
            print(f"\n{args.preset}: {params}")
            return 0
        p = preset(args.preset, geometry)
        start = time.perf_counter()
        trace = make_trace(args.preset, args.tokens, args.seed, geometry)
        seconds = time.perf_counter() - start
        stats = trace.stats(**p.stats_args)
        rows = compare(stats, p.targets)
        if args.out:
            trace.save(args.out, force=args.force)
        print(f"{trace.source}: {trace.n_tokens} tokens x {len(trace.layers)} MoE layers x top-{trace.k} of "
              f"{trace.n_expert} experts, generated in {seconds:.1f} s{f', written to {args.out}' if args.out else ''}\n")
        print(table(rows))
        worst = max((abs(r["rel_error"]) for r in rows if r["rel_error"] is not None), default=0.0)
        print(f"\nworst targeted statistic: {100 * worst:.1f}% from its target (tolerance {100 * TOLERANCE:.0f}%)")
        if not args.no_stats_json:
            save_stats(args.stats_json, args.preset, {
                "source": trace.source, "tokens": trace.n_tokens, "seed": args.seed,
                "geometry": {"moe_layers": len(trace.layers), "n_expert": trace.n_expert, "k": trace.k},
                "params": {k: v for k, v in vars(p.params).items()}, "stats_params": stats["params"],
                "rows": rows, "sources": list(p.sources), "within_tolerance": worst <= TOLERANCE})
    except EdgeMoEError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

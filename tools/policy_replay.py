"""Replay recorded routing through the expert cache's real policies and predictors, next to Belady's floor.

Records each prompt's routing (and each layer's FFN input, for gate lookahead) with edgemoe_llamacpp.Llama
(no budget), then replays it (edgemoe_bench.replay: the cache without I/O) for every policy, predictor and budget:
decode misses per token (reads llama.cpp waits for) and their ratio to Belady's MIN, and with prediction the
experts read ahead and the ones of those evicted unused (waste). Reads per token = misses + prefetches.

`--validation N` replays N windows of held-out text (the fixture's validation split, teacher-forced, every
token a decode step) instead of greedy completions. `--decays` replays the default policy at other use
decays; `--foresight` gives it exact knowledge of the next H tokens' routing (Belady within H tokens, the
default's order beyond): how far ahead a predictor would have to see to approach the floor.

    python tools/policy_replay.py tests/fixtures/tiny-moe.gguf --budgets 25% 50% --tokens 64 \
        --json bench/results/policy-replay.json
    python tools/policy_replay.py tests/fixtures/tiny-moe.gguf --validation 40 --decays 0.8 0.9 0.95 0.98 \
        --foresight 1 2 4 8 --json bench/results/policy-replay-validation.json

`--presets` replays, instead, every policy (alone and with the table predictor) on generated traces of the
trace presets (tools/make_trace.py) in two shapes, the bench's (a 66-token prompt, 12 decoded) and a long
decode (64 + 192), and on the model's own routing (held-out windows and completions), and ranks the
policies by the geometric mean of their misses over Belady's across all of them: how the default is chosen.

    python tools/policy_replay.py tests/fixtures/tiny-moe.gguf --presets --validation 10 \
        --json bench/results/policy-replay-presets.json
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np
from tqdm import tqdm

from edgemoe_bench.bench import belady
from edgemoe_bench.replay import replay, synthetic_layout
from edgemoe_bench.routing import record_completion, record_windows
from edgemoe_bench.trace_gen import PRESETS, make_trace
from edgemoe_llamacpp import files
from edgemoe_llamacpp.cache.config import CacheConfig
from edgemoe_llamacpp.cache.predict import (
    PREDICTORS,
    GatePredictor,
    TablePredictor,
    make_predictor,
    read_routers,
)
from edgemoe_llamacpp.cache.residency import POLICIES, make_policy, parse_budget
from edgemoe_llamacpp.gguf.layout import read_layout

PROMPTS = ["import os\nimport sys\n\n\ndef main(argv):\n    ", "class Parser:\n    def ",
           '"""Utilities for reading configuration files."""\n\nimport re\n',
           "    def __init__(self, path, defaults=None):\n        self."]
WINDOW = 256      # tokens per held-out window (--validation)


@functools.cache
def routers(model: str, layout):
    return read_routers(model, layout)


def predictor_for(name: str, model: str, layout):
    return GatePredictor(layout, routers(model, layout)) if name == "gate" else make_predictor(name, model, layout)


def replay_model(model: str, layout, budget: int, policy: str, predictor: str | None, depth: int, steps: list,
                 decay: float | None = None, horizon: int = 0) -> dict:
    """Decode counts over one recorded sequence: misses, prefetches and wasted prefetches."""
    return replay(layout, budget, policy, steps, predictor=predictor_for(predictor, model, layout) if predictor else None,
                  depth=depth, use_decay=decay, horizon=horizon)


SHAPES = {"bench": (66, 12, 4), "long": (64, 192, 1)}    # prompt tokens, decoded tokens, seeds


def trace_steps(ids: np.ndarray, layers, prompt: int) -> list:
    """Replay steps of a (tokens, layers, k) trace: the prompt as one batch per layer, then one token a step."""
    steps = [(layer, ids[:prompt, i], None) for i, layer in enumerate(layers)] if prompt else []
    return steps + [(layer, ids[t:t + 1, i], None) for t in range(prompt, len(ids)) for i, layer in enumerate(layers)]


def workloads(model: str, layout, validation: int, tokens: int) -> dict:
    """name -> (layout, list of step lists, table predictor fitted on other routing of the same source)."""
    out = {}
    for name in PRESETS:
        for shape, (prompt, decode, seeds) in SHAPES.items():
            traces = [make_trace(name, prompt + decode, seed) for seed in range(seeds)]
            t = traces[0]
            lay = synthetic_layout(len(t.layers), t.n_expert, t.k)
            profile = make_trace(name, 512, seed=1000)               # the predictor's profile: another seed
            out[f"{name}/{shape}"] = (lay, [trace_steps(tr.ids, range(len(t.layers)), prompt) for tr in traces],
                                      [profile.ids[:, i] for i in range(len(t.layers))])
    windows = record_windows(model, validation, WINDOW)
    completions = [record_completion(model, p, tokens) for p in PROMPTS]
    def strip(trace):
        return [(layer, ids, None) for layer, ids, _ in trace]

    def per_pos(traces):
        """Each layer's decode choices over every trace, lined up by token, for TablePredictor.fit. A prompt
        batch's last layer computes only the last prompt token (one row, like a decode step): each trace is
        cut to the tokens every layer decoded."""
        out = [[] for _ in layout.moe_layers]
        for t in traces:
            rows = [[ids for lay, ids, _ in t if lay == layer and len(ids) == 1] for layer in layout.moe_layers]
            m = min(map(len, rows))
            for pos, r in enumerate(rows):
                out[pos] += r[len(r) - m:]
        return [np.concatenate(r) for r in out]

    # the fixture's predictor learns from the completions when replaying held-out text, and the reverse
    out["fixture/held-out"] = (layout, [strip(t) for t in windows], per_pos(completions))
    out["fixture/completions"] = (layout, [strip(t) for t in completions], per_pos(windows))
    for lay, _, profile in out.values():          # fail here, not after an hour in a worker
        TablePredictor(lay).fit(profile)
    return out


def replay_workload(name: str, lay, traces: list, profile: list, budgets: list[str], runs: list) -> list[dict]:
    """One row per budget: Belady's misses per decoded token and each run's misses, reads and ratio to it."""
    n_tokens = sum(sum(len(ids) == 1 for _, ids, _ in t) for t in traces) / len(lay.moe_layers)
    size = lay.expert_bytes / len(lay.experts)
    rows = []
    for spec in budgets:
        budget = parse_budget(spec, lay.expert_bytes)
        floor = sum(belady([(la, ids.tolist()) for la, ids, _ in t], int(budget // size))[1]
                    for t in traces) / n_tokens
        row = {"workload": name, "budget": spec, "tokens": n_tokens, "belady": floor, "runs": []}
        for policy, predictor, decay in runs:
            misses = reads = 0
            for t in traces:
                pred = None
                if predictor:
                    pred = TablePredictor(lay)
                    pred.fit(profile)
                c = replay(lay, budget, policy, t, predictor=pred, depth=1 if pred else 0, use_decay=decay)
                misses += c["misses"]
                reads += c["misses"] + c["prefetches"]
            row["runs"].append({"policy": policy, "predictor": predictor, "decay": decay,
                                "misses": misses / n_tokens, "reads": reads / n_tokens,
                                "vs_belady": misses / n_tokens / floor if floor else None})
        rows.append(row)
    return rows


def replay_presets(args, layout) -> dict:
    runs = [(p, None, None) for p in POLICIES] + [(p, "table", None) for p in POLICIES]
    runs += [(p, None, d) for p in ("distance", "nextuse") for d in args.decays]
    loads = workloads(args.model, layout, args.validation or 10, args.tokens)
    with ProcessPoolExecutor(os.cpu_count() or 1) as pool:     # one workload per process
        jobs = {pool.submit(replay_workload, name, *load, args.budgets, runs): name for name, load in loads.items()}
        done = {jobs[f]: f.result() for f in tqdm(as_completed(jobs), total=len(jobs), desc="workloads")}
    rows = [row for name in loads for row in done[name]]
    # the default: the fewest misses over Belady's, by geometric mean over every workload and budget
    score = {}
    for policy, predictor, decay in runs:
        if predictor is None and decay is None:
            ratios = [r["vs_belady"] for row in rows for r in row["runs"]
                      if (r["policy"], r["predictor"], r["decay"]) == (policy, None, None) and r["vs_belady"]]
            score[policy] = math.exp(sum(map(math.log, ratios)) / len(ratios))
    best = min(score, key=score.get)
    return {"kind": "policy_replay_presets", "command": "python " + " ".join(sys.argv), "model": args.model,
            "shapes": {k: {"prompt": p, "decoded": d, "seeds": s} for k, (p, d, s) in SHAPES.items()},
            "budgets": args.budgets, "rows": rows, "geomean_vs_belady": score, "best": best,
            "default": CacheConfig().policy}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--budgets", nargs="+", default=["25%", "50%"])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3], help="prefetch depths to replay")
    ap.add_argument("--validation", type=int, default=0, metavar="N",
                    help=f"replay N windows of {WINDOW} held-out tokens instead of greedy completions of the prompts")
    ap.add_argument("--decays", type=float, nargs="*", default=[], help="other use decays for the default policy")
    ap.add_argument("--foresight", type=int, nargs="*", default=[], metavar="H",
                    help="the default policy with exact knowledge of the next H tokens' routing")
    ap.add_argument("--presets", action="store_true", help="replay the trace presets and the model's routing "
                    "(held-out windows: --validation, default 10; completions: --tokens)")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.json:
        files.tool_output(args.json, "--json")
    layout = read_layout(args.model)
    if args.presets:
        result = replay_presets(args, layout)
        for row in result["rows"]:
            print(f"{row['workload']:28s} {row['budget']:>4s} Belady {row['belady']:7.2f}  " + "  ".join(
                f"{r['policy']}{'+' + r['predictor'] if r['predictor'] else ''}"
                f"{':' + str(r['decay']) if r['decay'] else ''} {r['vs_belady']:.2f}x" for r in row["runs"]))
        print("geometric mean x Belady:", {k: round(v, 3) for k, v in result["geomean_vs_belady"].items()},
              "best:", result["best"])
        if args.json:
            files.write_text(args.json, json.dumps(result, indent=1))
        return
    if args.validation:
        traces = record_windows(args.model, args.validation, WINDOW)
    else:
        traces = [record_completion(args.model, p, args.tokens) for p in PROMPTS]
    n_tokens = sum(sum(len(ids) == 1 for _, ids, _ in t) for t in traces) / len(layout.moe_layers)
    expert_size = layout.expert_bytes / len(layout.experts)
    rows = []
    for spec in args.budgets:
        budget = parse_budget(spec, layout.expert_bytes)
        capacity = int(budget // expert_size)
        row = {"budget": spec, "capacity_experts": capacity,
               "belady": sum(belady([(lay, ids.tolist()) for lay, ids, _ in t], capacity)[1]
                             for t in traces) / n_tokens, "runs": []}
        for policy in POLICIES:
            for predictor, depth in [(None, 0)] + [(p, d) for p in PREDICTORS for d in args.depths]:
                counts = [replay_model(args.model, layout, budget, policy, predictor, depth, t) for t in traces]
                run = {"policy": policy, "predictor": predictor, "depth": depth,
                       **{k: sum(c[k] for c in counts) / n_tokens for k in counts[0]}}
                run["reads"] = run["misses"] + run["prefetches"]
                row["runs"].append(run)
                print(f"{spec} {policy:8s} {predictor or '-':9s} d{depth}: misses/token {run['misses']:.2f} "
                      f"(Belady {row['belady']:.2f}), prefetched {run['prefetches']:.2f}, wasted "
                      f"{run['prefetch_wasted']:.2f}, reads {run['reads']:.2f}")
        for decay in args.decays:
            misses = sum(replay_model(args.model, layout, budget, POLICIES[0], None, 0, t, decay)["misses"] for t in traces)
            row.setdefault("decays", {})[str(decay)] = misses / n_tokens
            print(f"{spec} {POLICIES[0]} decay {decay}: misses/token {misses / n_tokens:.2f}")
        for h in args.foresight:
            misses = sum(replay_model(args.model, layout, budget, POLICIES[0], None, 0, t, horizon=h)["misses"]
                         for t in traces)
            row.setdefault("foresight", {})[str(h)] = misses / n_tokens
            print(f"{spec} {POLICIES[0]} foresight {h} tokens: misses/token {misses / n_tokens:.2f}")
        rows.append(row)
    result = {"kind": "policy_replay", "command": "python " + " ".join(sys.argv), "model": args.model,
              "use_decay": getattr(make_policy(POLICIES[0], {}), "use_decay", None), "validation": args.validation,
              "prompts": len(traces), "tokens": WINDOW if args.validation else args.tokens,
              "n_expert": layout.n_expert, "n_expert_used": layout.n_expert_used,
              "moe_layers": len(layout.moe_layers), "depths": args.depths, "budgets": rows}
    if args.json:
        files.write_text(args.json, json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

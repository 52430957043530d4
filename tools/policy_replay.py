"""Replay recorded routing through the expert cache's real policies and predictors, next to Belady's floor.

Records each prompt's routing (and each layer's FFN input, for gate lookahead) with edgemoe_llamacpp.Llama
(no budget), then replays it (edgemoe_llamacpp.replay: the cache without I/O) for every policy, predictor and budget:
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
"""
from __future__ import annotations

import argparse
import functools
import json
import sys

from edgemoe_llamacpp.bench import belady
from edgemoe_llamacpp.layout import read_layout
from edgemoe_llamacpp.predict import PREDICTORS, GatePredictor, make_predictor, read_routers
from edgemoe_llamacpp.replay import replay
from edgemoe_llamacpp.residency import POLICIES, USE_DECAY, parse_budget
from edgemoe_llamacpp.routing import record_completion, record_windows

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
                 decay: float = USE_DECAY, horizon: int = 0) -> dict:
    """Decode counts over one recorded sequence: misses, prefetches and wasted prefetches."""
    return replay(layout, budget, policy, steps, predictor=predictor_for(predictor, model, layout) if predictor else None,
                  depth=depth, use_decay=decay, horizon=horizon)


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
    ap.add_argument("--json")
    args = ap.parse_args()
    layout = read_layout(args.model)
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
              "use_decay": USE_DECAY, "validation": args.validation,
              "prompts": len(traces), "tokens": WINDOW if args.validation else args.tokens,
              "n_expert": layout.n_expert, "n_expert_used": layout.n_expert_used,
              "moe_layers": len(layout.moe_layers), "depths": args.depths, "budgets": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

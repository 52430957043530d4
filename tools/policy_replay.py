"""Replay recorded routing through the expert cache's real policies and predictors, next to Belady's floor.

Records each prompt's routing (and each layer's FFN input, for gate lookahead) with edgemoe_llamacpp.Llama
(no budget), then feeds it to ExpertCache with I/O stubbed out, for every policy, predictor and budget:
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
from concurrent.futures import Future

from edgemoe_llamacpp import corpus
from edgemoe_llamacpp.bench import belady
from edgemoe_llamacpp.cache_config import CacheConfig
from edgemoe_llamacpp.layout import read_layout
from edgemoe_llamacpp.llama import Llama
from edgemoe_llamacpp.predict import PREDICTORS, GatePredictor, Lookahead, make_predictor, read_routers
from edgemoe_llamacpp.residency import POLICIES, USE_DECAY, ExpertCache, parse_budget

PROMPTS = ["import os\nimport sys\n\n\ndef main(argv):\n    ", "class Parser:\n    def ",
           '"""Utilities for reading configuration files."""\n\nimport re\n',
           "    def __init__(self, path, defaults=None):\n        self."]
WINDOW = 256      # tokens per held-out window (--validation)
# recording: every expert resident; the gate predictor makes the hook hand over each layer's FFN input
RECORDING = CacheConfig(memory_budget=None, predictor="gate")


class ReplayCache(ExpertCache):
    """The cache's bookkeeping and policy, without touching memory or storage."""

    def _fetch(self, uids):
        return sum(self.cost[u] for u in uids)

    def _drop(self, spans):
        pass

    def _submit_prefetch(self, uid):
        done = Future()
        done.set_result(self.cost[uid])
        return done


class ForesightCache(ReplayCache):
    """The default policy told the exact routing of the next `horizon` tokens: experts needed within it are
    evicted last, farthest next use first (Belady inside the horizon)."""

    def __init__(self, *args, future: list[set], horizon_steps: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.future, self.horizon_steps, self.i = future, horizon_steps, 0

    def ensure_ids(self, layer, ids, above=None):
        out = super().ensure_ids(layer, ids, above)
        self.i += 1
        return out

    def _eviction_order(self):
        order = super()._eviction_order()
        next_use = {}
        for j in range(self.i + 1, min(len(self.future), self.i + 1 + self.horizon_steps)):
            for u in self.future[j]:
                next_use.setdefault(u, j)
        return ([u for u in order if u not in next_use] +
                sorted((u for u in order if u in next_use), key=lambda u: -next_use[u]))


class Recorder(Llama):
    """edgemoe's Llama (no budget) keeping each layer's routing and FFN input as the hook saw them."""

    def __init__(self, *args, **kwargs):
        self.steps = []
        super().__init__(*args, **kwargs)

    def _on_route(self, layer, ids, hidden=None, weights=None):
        self.steps.append((layer, ids, hidden))
        super()._on_route(layer, ids, hidden, weights)


def record(model: str, prompt: str, tokens: int) -> list:
    """[(layer, ids (T, k), ffn_inp (T, n_embd))] of one greedy completion."""
    llm = Recorder(model, cache=RECORDING, n_ctx=512, verbose=False)
    llm.create_completion(prompt, max_tokens=tokens, temperature=0.0, repeat_penalty=1.1)
    llm.close()
    return llm.steps


def record_text(model: str, windows: int, n_tokens: int = WINDOW) -> list[list]:
    """Steps of `windows` held-out windows, each token's layers in turn (as decoding would see them)."""
    llm = Recorder(model, cache=RECORDING, n_ctx=512, logits_all=True, verbose=False)
    ids = corpus.tokens(llm, corpus.split_texts("validation"), windows * n_tokens)
    traces = []
    for w in corpus.windows(ids, n_tokens)[:windows]:
        llm.steps = []
        llm.reset()
        llm.eval(w)
        traces.append([(layer, chosen[t:t + 1], hidden[t:t + 1]) for t in range(len(w))
                       for layer, chosen, hidden in llm.steps])
    llm.close()
    return traces


@functools.cache
def routers(model: str, layout):
    return read_routers(model, layout)


def predictor_for(name: str, model: str, layout):
    return GatePredictor(layout, routers(model, layout)) if name == "gate" else make_predictor(name, model, layout)


def replay(model: str, layout, budget: int, policy: str, predictor: str | None, depth: int, steps: list,
           decay: float = USE_DECAY, horizon: int = 0) -> dict:
    """Decode counts over one recorded sequence: misses, prefetches and wasted prefetches."""
    config = CacheConfig(memory_budget=budget, policy=policy)
    if horizon:
        future = [{(layer, int(e)) for e in ids.ravel()} for layer, ids, _ in steps]
        cache = config.make_cache(layout, ForesightCache, future=future, horizon_steps=horizon * len(layout.moe_layers))
    else:
        cache = config.make_cache(layout, ReplayCache)
    cache.use_decay = decay
    ahead = Lookahead(predictor_for(predictor, model, layout), cache, layout, depth) if predictor else None
    out = {"misses": 0, "prefetches": 0, "prefetch_wasted": 0}
    for layer, ids, hidden in steps:
        before = {k: getattr(cache.stats.total(), k) for k in out}
        cache.ensure_ids(layer, ids)
        if ahead is not None:
            ahead(layer, ids, hidden)
        if len(ids) == 1:
            after = cache.stats.total()
            for k in out:
                out[k] += getattr(after, k) - before[k]
    cache.close()
    return out


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
        traces = record_text(args.model, args.validation)
    else:
        traces = [record(args.model, p, args.tokens) for p in PROMPTS]
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
                counts = [replay(args.model, layout, budget, policy, predictor, depth, t) for t in traces]
                run = {"policy": policy, "predictor": predictor, "depth": depth,
                       **{k: sum(c[k] for c in counts) / n_tokens for k in counts[0]}}
                run["reads"] = run["misses"] + run["prefetches"]
                row["runs"].append(run)
                print(f"{spec} {policy:8s} {predictor or '-':9s} d{depth}: misses/token {run['misses']:.2f} "
                      f"(Belady {row['belady']:.2f}), prefetched {run['prefetches']:.2f}, wasted "
                      f"{run['prefetch_wasted']:.2f}, reads {run['reads']:.2f}")
        for decay in args.decays:
            misses = sum(replay(args.model, layout, budget, POLICIES[0], None, 0, t, decay)["misses"] for t in traces)
            row.setdefault("decays", {})[str(decay)] = misses / n_tokens
            print(f"{spec} {POLICIES[0]} decay {decay}: misses/token {misses / n_tokens:.2f}")
        for h in args.foresight:
            misses = sum(replay(args.model, layout, budget, POLICIES[0], None, 0, t, horizon=h)["misses"]
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

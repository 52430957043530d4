"""Recall@k of every expert predictor at depth 1-3 on held-out text, through the real llama.cpp.

Text is the Python standard library split into train and validation files exactly as
tools/make_tiny_moe.py split it for training the fixture (edgemoe_llamacpp.corpus). The train split's routing
(recorded through llama.cpp) teaches the table and frequency predictors; every predictor is then scored on
the validation split: recall@k = the fraction of the experts a layer really chose that are among the k
the predictor ranked first (k = the model's top-k). Depth 0 of gate lookahead is the layer's own router
re-applied in numpy: a check of the routers read from the file (it should be 1.0).

    python tools/predictor_recall.py tests/fixtures/tiny-moe.gguf \
        --also bench/models/io-moe.gguf --json bench/results/predictor-recall.json
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from edgemoe_bench.routing import record, window_of
from edgemoe_llamacpp import corpus, files
from edgemoe_llamacpp.cache.predict import (
    MAX_DEPTH,
    FrequencyPredictor,
    GatePredictor,
    TablePredictor,
    read_routers,
    recall_at_k,
)
from edgemoe_llamacpp.gguf.layout import read_layout


def mixture(logits: np.ndarray, table_scores: np.ndarray) -> np.ndarray:
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True) + table_scores / table_scores.sum(1, keepdims=True)


def measure(model: str, layout, train_routing, routing, hidden) -> dict:
    """recall@k per predictor and depth (mean over source layers, and per source layer)."""
    routers = read_routers(model, layout)
    gate_own, gate_cur = GatePredictor(layout, routers), GatePredictor(layout, routers, norm="current")
    table1, table2 = TablePredictor(layout, history=1), TablePredictor(layout, history=2)
    freq = FrequencyPredictor(layout)
    for p in (table1, table2, freq):
        p.fit(train_routing)
    L = len(routing)

    def ffn_norm(pos):        # what llama.cpp's ffn_norm-N holds: ffn_inp-N normed with layer N's weight
        x = hidden[pos]
        return x / np.sqrt(np.mean(x * x, axis=1, keepdims=True) + routers.eps) * routers.norm[pos]

    predictors = {
        "gate (own ffn_norm)": lambda pos, d: gate_own.scores(pos, d, routing[pos], hidden[pos]),
        "gate (ffn_norm-N reused)": lambda pos, d: gate_cur.scores(pos, d, routing[pos], ffn_norm(pos)),
        "table (1 layer)": lambda pos, d: table1.scores(pos, d, routing[pos], None),
        "table (2 layers, the default)": lambda pos, d: table2.scores_with_history(pos, d, [routing[pos - h]
                                                                                for h in range(min(2, pos + 1))]),
        "frequency": lambda pos, d: freq.scores(pos, d, routing[pos], None),
        # an equal mixture of the two distributions: does the table add what the routers miss?
        "gate + table mixture": lambda pos, d: mixture(gate_own.scores(pos, d, routing[pos], hidden[pos]),
                                                       predictors["table (2 layers, the default)"](pos, d)),
    }
    out = {}
    for name, score in predictors.items():
        depths = {}
        for d in range(0 if name.startswith("gate") else 1, MAX_DEPTH + 1):
            per_layer = [recall_at_k(score(pos, d), routing[pos + d]) for pos in range(L - d)]
            depths[str(d)] = {"mean": float(np.mean(per_layer)), "per_source_layer": per_layer}
        out[name] = depths
        print(f"  {name:26s} " + "  ".join(f"d{d} {v['mean']:.3f}" for d, v in depths.items()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="the trained fixture (its train/validation split is the text)")
    ap.add_argument("--also", nargs="*", default=[], help="more models with the same tokenizer and routing "
                    "(the I/O-scale model): scored on the first --also-tokens validation tokens")
    ap.add_argument("--train-tokens", type=int, default=131072)
    ap.add_argument("--val-tokens", type=int, default=65536)
    ap.add_argument("--also-tokens", type=int, default=16384)
    ap.add_argument("--seed", type=int, default=0, help="order of the train files sampled")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.json:
        files.tool_output(args.json, "--json")
    train_txt, val_txt = list(corpus.split_texts("train")), list(corpus.split_texts("validation"))
    layout = read_layout(args.model)
    t0 = time.time()
    _, train_routing, _ = record(args.model, train_txt, args.train_tokens, seed=args.seed, hidden=False)
    val_tokens, routing, hidden = record(args.model, val_txt, args.val_tokens, seed=None, hidden=True)
    chance = layout.n_expert_used / layout.n_expert
    print(f"{args.model}: {len(val_tokens)} validation tokens, chance {chance:.3f}")
    models = [{"model": args.model, "tokens": len(val_tokens),
               "recall": measure(args.model, layout, train_routing, routing, hidden)}]
    for other in args.also:
        window = window_of(other)
        n = min(args.also_tokens, len(val_tokens)) // window * window
        o_tokens, o_routing, o_hidden = record(other, val_txt, n, seed=None, hidden=True)
        assert np.array_equal(o_tokens, val_tokens[:n]), "the models tokenize differently"
        same = float(np.mean([np.array_equal(np.sort(a, 1), np.sort(b[:n], 1))
                              for a, b in zip(o_routing, routing)]))
        agree = float(np.mean([(np.sort(a, 1) == np.sort(b[:n], 1)).all(1).mean()
                               for a, b in zip(o_routing, routing)]))
        print(f"{other}: {n} validation tokens; top-k sets equal to the fixture's for {agree:.2%} of "
              f"(token, layer)")
        models.append({"model": other, "tokens": n, "same_routing_as_fixture": agree,
                       "identical_layers": same,
                       "recall": measure(other, read_layout(other), train_routing, o_routing, o_hidden)})
    result = {"kind": "predictor_recall", "split": "edgemoe_llamacpp.corpus.split_texts (validation: "
              f"{corpus.VAL_PERCENT}% of stdlib files by path hash)", "train_tokens": len(train_routing[0]),
              "n_expert": layout.n_expert, "k": layout.n_expert_used, "moe_layers": len(layout.moe_layers),
              "chance": chance, "seconds": time.time() - t0, "models": models,
              "command": "python tools/predictor_recall.py " + " ".join(
                  [args.model] + (["--also", *args.also] if args.also else []) +
                  ["--train-tokens", str(args.train_tokens), "--val-tokens", str(args.val_tokens),
                   "--also-tokens", str(args.also_tokens)] + (["--json", args.json] if args.json else []))}
    if args.json:
        files.write_text(args.json, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

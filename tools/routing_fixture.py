"""The routing fixture's routing beside Qwen3-30B-A3B's published figures: the statistics the trace presets report
(edgemoe_bench.trace_stats), measured through llama.cpp on held-out text, prefill and decode apart.

    python tools/routing_fixture.py build/routing-moe.gguf --training-report build/routing-moe.report.json \
        --json bench/results/routing-fixture.json

The routing fixture is a model of tools/make_tiny_moe.py trained with Qwen3's routing shape (README, "The routing
fixture"; >= 16 MoE layers, 64 experts, top-8). Held-out text is the standard library's validation split, as in
training (edgemoe_llamacpp.corpus).
- prefill: --prefill-tokens of held-out text evaluated in windows of 512 tokens (or the context the model was
  trained on, if shorter), each a batch (what a prompt meets). Besides the statistics over the tokens in order: the
  share of a layer's experts one batch touches, and the share of those the batch before touched too.
- decode: greedy completions (repeat penalty 1.1) of --decode-tokens after held-out prompts of 64 tokens; each
  generated token's routing, in order (what decoding meets: the model's own text, one token at a time).
Beside them: the published figures the qwen3-30b-a3b trace preset is calibrated to (its sources say where each is
from), the preset's own generated trace at its geometry, and routing without locality at the fixture's geometry
(uniform, worked out). experts_for_cover is also given as a share of the layer's experts (65 of 128: 0.51).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from edgemoe_bench import trace_gen
from edgemoe_bench.routing import record, window_of
from edgemoe_bench.trace_stats import trace_stats
from edgemoe_llamacpp import corpus, files
from edgemoe_llamacpp.engine.hook import ExpertHook
from edgemoe_llamacpp.engine.llama import llama_params
from edgemoe_llamacpp.gguf.layout import read_layout

QWEN3 = "qwen3-30b-a3b"
PROMPT_TOKENS = 64


def statistics(ids: np.ndarray, n_expert: int) -> dict:
    """trace_stats with the Qwen3 preset's parameters (coverage over 1024-token spans, LRU of 40%), the per-layer
    values left out, and experts_for_cover as a share of the experts too."""
    params = dict(trace_gen.PRESETS[QWEN3].stats_args)
    out = trace_stats(ids, n_expert, **params)
    out.pop("per_layer")
    out["experts_for_cover_share"] = out["experts_for_cover"] / n_expert
    return out


def batch_figures(ids: np.ndarray, n_expert: int, batch: int) -> dict:
    """Per layer and batch of `batch` tokens (ids (tokens, layers, k)): the share of the experts the batch
    touches, and the share of those the batch before touched too; means over layers and batches."""
    n = len(ids) // batch
    touched, again = [], []
    for li in range(ids.shape[1]):
        prev = None
        for b in range(n):
            used = np.zeros(n_expert, dtype=bool)
            used[ids[b * batch:(b + 1) * batch, li].ravel()] = True
            touched.append(used.mean())
            if prev is not None:
                again.append((used & prev).sum() / used.sum())
            prev = used
    return {"batch_tokens": batch, "batches": n, "experts_touched_share": float(np.mean(touched)),
            "touched_by_previous_batch": float(np.mean(again)) if again else None}


def decode_routing(model: str, tokens: int, per_prompt: int) -> np.ndarray:
    """(generated tokens, MoE layers, k): each generated token's routing, greedy completions of `per_prompt` tokens
    after held-out prompts of PROMPT_TOKENS, until `tokens` are generated."""
    import llama_cpp

    layout = read_layout(model)
    pos = {layer: i for i, layer in enumerate(layout.moe_layers)}
    steps: list[tuple[int, np.ndarray]] = []
    hook = ExpertHook(on_route=lambda layer, chosen, _h, _w: steps.append((pos[layer], chosen)))
    with llama_params(use_extra_bufts=False, cb_eval=hook.callback):
        llm = llama_cpp.Llama(layout.path, n_ctx=PROMPT_TOKENS + per_prompt + 8, verbose=False)
    ids = corpus.tokens(llm, corpus.split_texts("validation"), 64 * PROMPT_TOKENS * (tokens // per_prompt + 1))
    out: list[np.ndarray] = []
    with tqdm(total=tokens, desc="decode", unit="tok") as bar:
        for w in corpus.windows(ids, PROMPT_TOKENS)[::7]:              # prompts spread over the split
            if len(out) >= tokens:
                break
            llm.reset()
            steps.clear()
            with hook.evaluation():
                llm.create_completion(llm.detokenize(w).decode("utf-8", "replace"), max_tokens=per_prompt,
                                      temperature=0.0, repeat_penalty=1.1)
            # decode steps: one token each, from the first token's first layer (the prompt's batch routes its
            # last layer for its last token alone: a single row, but not a decoded token)
            first = next((i for i, (p, c) in enumerate(steps) if p == 0 and len(c) == 1), len(steps))
            single = steps[first:]
            assert all(len(c) == 1 for _, c in single), "a batch among the decoded tokens"
            n = len(single) // len(pos)
            for t in range(n):
                out.append(np.stack([c[0] for _, c in single[t * len(pos):(t + 1) * len(pos)]]))
            bar.update(n)
    llm.close()
    return np.stack(out[:tokens]).astype(np.int32)


def table(result: dict) -> str:
    cols = [("fixture decode", result["decode"]["stats"]), ("fixture prefill", result["prefill"]["stats"]),
            ("Qwen3 published", result["qwen3_published"]), ("qwen3 preset trace", result["qwen3_trace"]["stats"]),
            ("no locality (fixture geometry)", result["uniform"])]
    keys = ["repeat_next", "within_window", "experts_for_cover", "experts_for_cover_share", "lru_hit",
            "adjacent_jaccard", "layer_recall", "layer_recall_lift"]
    lines = ["| statistic | " + " | ".join(c for c, _ in cols) + " |", "|---|" + "---:|" * len(cols)]
    for k in keys:
        cells = [d.get(k) for _, d in cols]
        lines.append(f"| {k} | " + " | ".join("" if v is None else f"{v:.3g}" for v in cells) + " |")
    for k in ("experts_touched_share", "touched_by_previous_batch"):
        cells = [result["prefill"]["batches"].get(k), result["qwen3_trace"]["batches"].get(k)]
        lines.append(f"| {k} ({result['prefill']['window']}-token batches) | | {cells[0]:.3g} | | {cells[1]:.3g} | |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--prefill-tokens", type=int, default=16384)
    ap.add_argument("--decode-tokens", type=int, default=2048)
    ap.add_argument("--per-prompt", type=int, default=128, help="tokens generated per held-out prompt")
    ap.add_argument("--training-report", type=Path,
                    help="make_tiny_moe.py's --report of the model, kept in the results (how it was trained)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--force", action="store_true", help="replace --json")
    args = ap.parse_args()
    if args.json:
        files.tool_output(args.json, "--json", inputs=[args.model], force=args.force)
    layout = read_layout(args.model)
    E, window = layout.n_expert, window_of(args.model)
    _, routing, _ = record(args.model, list(corpus.split_texts("validation")), args.prefill_tokens, seed=None,
                           hidden=False)
    prefill = np.stack(routing, axis=1)                                   # (tokens, layers, k)
    decode = decode_routing(args.model, args.decode_tokens, args.per_prompt)
    qwen = trace_gen.make_trace(QWEN3, 4096, seed=0)
    p = trace_gen.PRESETS[QWEN3]
    published = {**p.targets, "experts_for_cover_share": p.targets["experts_for_cover"] / p.geometry.n_expert}
    geometry = trace_gen.Geometry(len(layout.moe_layers), E, layout.n_expert_used)
    result = {
        "kind": "routing_fixture", "command": "python " + " ".join(sys.argv), "model": args.model,
        "geometry": {"moe_layers": len(layout.moe_layers), "n_expert": E, "k": layout.n_expert_used},
        "file_bytes": layout.file_size, "expert_bytes": layout.expert_bytes,
        "prefill": {"tokens": len(prefill), "window": window, "stats": statistics(prefill, E),
                    "batches": batch_figures(prefill, E, window)},
        "decode": {"tokens": len(decode), "per_prompt": args.per_prompt, "prompt_tokens": PROMPT_TOKENS,
                   "stats": statistics(decode, E)},
        "qwen3_published": published, "qwen3_sources": list(p.sources),
        "qwen3_trace": {"source": qwen.source, "stats": statistics(qwen.ids, qwen.n_expert),
                        "batches": batch_figures(qwen.ids, qwen.n_expert, window)},
        "uniform": trace_gen.uniform_targets(geometry),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if args.training_report:
        result["training"] = json.loads(args.training_report.read_text())
    result["table"] = table(result)
    print(result["table"])
    if args.json:
        files.write_text(args.json, json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

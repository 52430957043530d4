"""What the hook costs when nothing has to be fetched: decode tok/s of edgemoe (no budget) vs stock.

Both engines use the same compute path (CPU repack off), the same prompt and greedy tokens; runs alternate
and the ratio is taken per pair, then the median. llama.cpp's own timers measure decoding.

    python tools/hook_overhead.py tests/fixtures/tiny-moe.gguf --pairs 7 --tokens 128
"""
from __future__ import annotations

import argparse
import json
import statistics

import llama_cpp

from edgemoe_llamacpp import files
from edgemoe_llamacpp.cache.config import CacheConfig
from edgemoe_llamacpp.engine.generate import last_logits
from edgemoe_llamacpp.engine.llama import Llama, stock_llama

PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    "


def decode_tok_s(llm, tokens: int) -> float:
    llm.eval(llm.tokenize(PROMPT.encode()))
    llama_cpp.llama_perf_context_reset(llm._ctx.ctx)
    for _ in range(tokens):
        llm.eval([int(last_logits(llm).argmax())])
    perf = llama_cpp.llama_perf_context(llm._ctx.ctx)
    return perf.n_eval / perf.t_eval_ms * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--n-threads", type=int, default=None)
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("--note", help="conditions of the run, recorded in the result")
    args = ap.parse_args()
    if args.json:
        files.tool_output(args.json, "--json")
    kw = {"n_ctx": 512, "verbose": False}
    if args.n_threads:
        kw.update(n_threads=args.n_threads, n_threads_batch=args.n_threads)
    rows = []
    for i in range(args.pairs):
        pair = {}
        for engine in (("stock", "edgemoe") if i % 2 == 0 else ("edgemoe", "stock")):
            llm = stock_llama(args.model, use_extra_bufts=False, **kw) if engine == "stock" else \
                Llama(args.model, cache=CacheConfig(memory_budget=None), **kw)
            pair[engine] = decode_tok_s(llm, args.tokens)
            if engine == "edgemoe":
                pair["hook_us_per_layer"] = llm.edgemoe_stats()["hook_us_per_layer"]
            llm.close()
        pair["ratio"] = pair["edgemoe"] / pair["stock"]
        rows.append(pair)
        print(f"pair {i}: stock {pair['stock']:.1f} tok/s, edgemoe {pair['edgemoe']:.1f} tok/s, "
              f"ratio {pair['ratio']:.3f}")
    summary = {k: statistics.median(r[k] for r in rows) for k in ("stock", "edgemoe", "ratio")}
    summary.update(min_ratio=min(r["ratio"] for r in rows), max_ratio=max(r["ratio"] for r in rows),
                   pairs=args.pairs, tokens=args.tokens, kind="hook_overhead", model=args.model,
                   hook_us_per_layer=statistics.median(r["hook_us_per_layer"] for r in rows),
                   runtime=llama_cpp.__version__, note=args.note, rows=rows)
    print(json.dumps(summary))
    if args.json:
        files.write_text(args.json, json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

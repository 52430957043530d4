"""`edgemoe ppl`: perplexity on held-out text through llama-cpp-python, optionally against a reference model."""
from __future__ import annotations

import argparse
import json

from edgemoe_llamacpp.cli.args import MAX_CTX, add_cache_options, cache_config, int_range
from edgemoe_llamacpp.cli.profile import one_window
from edgemoe_llamacpp.errors import EdgeMoEError

HELP = "perplexity on held-out text through llama-cpp-python"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="path to a MoE GGUF file")
    p.add_argument("--text", nargs="+", help="text files (default: the stdlib validation split)")
    p.add_argument("--tokens", type=int_range(1, 1 << 30), default=16384, help="tokens to score (default 16384)")
    p.add_argument("--n-ctx", dest="n_ctx", type=int_range(2, MAX_CTX), default=512, help="window length (default 512)")
    p.add_argument("--reference", help="also KL divergence and top-1 agreement against this model (e.g. the source)")
    p.add_argument("--batch", type=int_range(1, MAX_CTX), default=None, help="tokens per evaluation (default: the window); 1 scores "
                   "as decoding runs, token by token, which is where --substitute acts")
    add_cache_options(p)
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from edgemoe_llamacpp.corpus import read_texts
    from edgemoe_llamacpp.engine.perplexity import perplexity

    one_window(args.tokens, args.n_ctx)
    if args.batch is not None and args.batch > args.n_ctx:
        raise EdgeMoEError(f"--batch {args.batch} is longer than the window (--n-ctx {args.n_ctx})")
    result = perplexity(args.model, texts=read_texts(args.text) if args.text else None, tokens=args.tokens,
                        n_ctx=args.n_ctx, reference=args.reference, batch=args.batch, cache=cache_config(args))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.model}: perplexity {result['perplexity']:.3f} over {result['tokens']:,} tokens "
              f"({result['windows']} windows of {result['n_ctx']}, batches of {result['batch']})")
        if result.get("stats"):
            t = result["stats"]["total"]
            print(f"  experts: {t['misses']:,} misses, {t['substituted']:,} ran from low-bit copies")
        if args.reference:
            print(f"  vs {args.reference}: KL divergence {result['kld']:.5f} nats/token, same top-1 "
                  f"{result['same_top1']:.2%}")
    return 0

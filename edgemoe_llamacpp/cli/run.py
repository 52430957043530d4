"""`edgemoe run`: generate once with experts streamed under a memory budget, printing the text as it comes and the
expert statistics after (or one JSON object)."""
from __future__ import annotations

import argparse
import json
import sys

from edgemoe_llamacpp.cli.args import MAX_CTX, add_cache_options, cache_config, float_range, int_range, mib
from edgemoe_llamacpp.errors import EdgeMoEError

HELP = "generate text with experts streamed under a memory budget"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="path to a MoE GGUF file")
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("-n", "--n", type=int_range(1, MAX_CTX), default=128, help="tokens to generate (default 128)")
    p.add_argument("--stock", action="store_true", help="plain llama-cpp-python, for comparison (on edgemoe's "
                   "compute path unless --stock-repack on)")
    p.add_argument("--stock-repack", dest="stock_repack", choices=("on", "off"), default="off",
                   help="with --stock: llama.cpp's CPU repack (on: llama.cpp's default, another compute path, so "
                   "greedy text can differ from edgemoe's) or not (off, the default: the compute path edgemoe uses)")
    p.add_argument("--json", action="store_true", help="print one JSON object with text, speed and stats")
    p.add_argument("--n-ctx", dest="n_ctx", type=int_range(1, MAX_CTX), default=512)
    p.add_argument("--n-threads", dest="n_threads", type=int_range(1, 1024), default=None, help="default: all cores")
    p.add_argument("--temperature", type=float_range(0, 1e6), default=0.0, help="0 = greedy (default)")
    p.add_argument("--repeat-penalty", dest="repeat_penalty", type=float_range(0, 1e6, lo_open=True), default=1.0)
    p.add_argument("--seed", type=int_range(0, 2**32 - 1), default=0)
    p.add_argument("--trace", action="store_true", help="with --json: include every layer's chosen experts")
    add_cache_options(p)
    # a plugin may compute other routing (cli.plugins): a function of the parsed arguments giving an injector
    p.set_defaults(route_injector=lambda args: None)


class _Echo:
    """`run`'s text on stdout as it is generated, as llama-cli prints it: the prompt with the first piece, then
    each piece, flushed; `end` finishes the line."""

    def __init__(self, prompt: str):
        self.prompt = prompt

    def __call__(self, text: str) -> None:
        sys.stdout.write(self.prompt + text)
        sys.stdout.flush()
        self.prompt = ""

    def end(self) -> None:
        self("\n")


STOCK_PATHS = {False: "stock, CPU repack off (edgemoe's compute path)",
               True: "stock, llama.cpp's CPU repack on (not edgemoe's compute path: greedy text can differ)"}


def run(args: argparse.Namespace) -> int:
    from edgemoe_llamacpp.engine.generate import generate

    if args.stock_repack == "on" and not args.stock:
        raise EdgeMoEError("--stock-repack on is for --stock runs: edgemoe computes without the repack")
    echo = None if args.json else _Echo(args.prompt)
    result = generate(args.model, args.prompt, max_tokens=args.n, cache=cache_config(args), stock=args.stock,
                      n_ctx=args.n_ctx, n_threads=args.n_threads, temperature=args.temperature, seed=args.seed,
                      record_routing=args.trace, repeat_penalty=args.repeat_penalty,
                      route_injector=args.route_injector(args), use_extra_bufts=args.stock_repack == "on", on_text=echo)
    if echo is None:
        print(json.dumps(result))
        return 0
    echo.end()
    if result["routing"] != "router":
        print(f"--- routing {result['routing']}: the trace's experts, not the router's (benchmark/replay)")
    engine = STOCK_PATHS[result["cpu_repack"]] if result["engine"] == "stock" else result["engine"]
    print(f"--- {engine}: {result['tokens']} tokens, prefill {result['prefill_tok_s']:.1f} tok/s, "
          f"decode {result['decode_tok_s']:.1f} tok/s, storage read {mib(result['storage_read_bytes'])}")
    stats = result.get("stats")
    if stats:
        t = stats["total"]
        budget = "none" if stats["budget_bytes"] is None else mib(stats["budget_bytes"])
        print(f"--- experts: budget {budget}, resident {mib(stats['resident_expert_bytes'])} "
              f"({stats['resident_experts']} experts), hit rate {t['hit_rate']:.1%} "
              f"({t['hits']} hits, {t['misses']} misses), fetched {mib(t['bytes_fetched'])}, "
              f"evicted {mib(t['bytes_evicted'])}, stall {t['stall_s']:.3f} s")
        if t["reclaimed"]:
            print(f"--- memory pressure: the kernel took {t['reclaimed']} experts the cache held "
                  f"({mib(t['reclaimed_bytes'])}); the cache gave up {mib(stats['capacity_given_up_bytes'])} of its "
                  f"budget to stop it")
        if stats["substitute"] is not None:
            print(f"--- substitution (above {stats['substitute']}): {t['substituted']} experts ran from "
                  f"{stats['lowbit_type']} copies, {mib(t['substituted_bytes'])} of them read")
        auto = stats.get("auto_prefetch")
        if auto and stats["budget_bytes"] is not None:   # the default predictor's decision, and why
            state = {True: "on", False: "off", None: "undecided"}[auto["prefetch"]]
            print(f"--- predictor auto: prefetch {state}: {auto['why']}")
        if t["prefetches"]:
            print(f"--- prefetch ({stats['predictor']}, depth {stats['prefetch_depth']}): {t['prefetches']} "
                  f"experts ({mib(t['prefetch_bytes'])}), {t['prefetch_used']} used ({t['prefetch_late']} late), "
                  f"{t['prefetch_wasted']} wasted ({mib(t['prefetch_wasted_bytes'])})")
    return 0

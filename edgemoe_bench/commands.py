"""The research package's commands in the `edgemoe` CLI (entry point group edgemoe_llamacpp.commands):
`edgemoe bench`, and `edgemoe run --route-trace`, which computes a routing trace's experts instead of the router's."""
from __future__ import annotations

import argparse
import json

from edgemoe_llamacpp import files
from edgemoe_llamacpp.cache.residency import parse_budget
from edgemoe_llamacpp.cli.args import MAX_CTX, add_cache_options, cache_config, int_range, mib

ROUTE_TRACE_HELP = ("benchmarks and replay: compute this routing trace's experts at every MoE layer instead of the "
                    "router's (a trace file from tools/make_trace.py, or an `edgemoe run --json --trace` output)")


def route_injector(args: argparse.Namespace):
    """--route-trace's injector, the trace checked against the model before any model loads (a bad trace is a
    one-line error); None without the flag."""
    if args.route_trace is None:
        return None
    from edgemoe_bench.inject import trace_injector

    return trace_injector(args.route_trace, args.model)


def cmd_bench(args: argparse.Namespace) -> int:
    from edgemoe_bench.bench import run_bench
    from edgemoe_bench.report import format_table

    if args.json:
        files.check_output(args.json, inputs=[args.model, args.stock_model], force=args.force, what="--json")
    for spec in args.memory_budget:             # each budget's spelling, before any run
        cache_config(args, memory_budget=spec)
    route_injector(args)                        # the trace, checked before any run
    result = run_bench(args.model, args.memory_budget, runs=args.runs, tokens=args.tokens, n_ctx=args.n_ctx,
                       prompt_tokens=args.prompt_tokens,
                       use_cgroup=not args.no_cgroup, n_threads=args.n_threads,
                       allowance=None if args.allowance is None else parse_budget(args.allowance, 0),
                       stock_model=args.stock_model, stock_repack={"on": True, "off": False}.get(args.stock_repack, "both"),
                       cache=cache_config(args, memory_budget=None), route_trace=args.route_trace)
    if args.json:
        files.write_text(args.json, json.dumps(result, indent=1) + "\n")
    m = result["memory_limit"]
    limited = f"{m['kind']}-limited" if result["cgroup"] else f"NOT memory-limited ({m['reason']})"
    print(f"{result['model']}: dense {mib(result['dense_bytes'])}, experts {mib(result['expert_bytes'])}, "
          f"KV {mib(result['kv_cache_bytes'])}, {limited}, disk {result['disk_bandwidth_bps'] / 1e9:.2f} GB/s")
    print(format_table(result))
    return 0


def add_commands(sub, parsers: dict[str, argparse.ArgumentParser]) -> None:
    """`bench`, and --route-trace on `run`."""
    run = parsers["run"]
    run.add_argument("--route-trace", dest="route_trace", metavar="FILE", help=ROUTE_TRACE_HELP)
    run.set_defaults(route_injector=route_injector)

    p = sub.add_parser("bench", help="stock vs edgemoe under memory limits, alternating runs, cold cache")
    p.add_argument("model", help="path to a MoE GGUF file")
    p.add_argument("--runs", type=int_range(1, 1000), default=3, help="runs per engine and budget (default 3)")
    p.add_argument("--tokens", type=int_range(1, MAX_CTX), default=64, help="tokens generated per run (default 64)")
    p.add_argument("--prompt-tokens", dest="prompt_tokens", type=int_range(2, MAX_CTX), default=None,
                   help="a prompt of exactly N tokens of held-out text (the standard library's validation split) "
                   "instead of the short built-in one; prefill is then measured on it")
    p.add_argument("--n-ctx", dest="n_ctx", type=int_range(2, MAX_CTX), default=None,
                   help="context per run (default 512, or the prompt and the generated tokens if more)")
    p.add_argument("--n-threads", dest="n_threads", type=int_range(1, 1024), default=None)
    p.add_argument("--no-cgroup", action="store_true", help="do not impose memory limits")
    p.add_argument("--allowance", help="room for the process's own memory (default: measured, + 32 MiB)")
    p.add_argument("--json", help="write the full results here")
    p.add_argument("--force", action="store_true", help="replace the --json file if it exists")
    p.add_argument("--stock-model", dest="stock_model", help="the file stock runs (default: MODEL); for a MODEL "
                   "only edgemoe can load, e.g. one with low-bit copies, give the file it was converted from")
    p.add_argument("--stock-repack", dest="stock_repack", choices=("on", "off", "both"), default="on",
                   help="stock with llama.cpp's CPU repack (on, its default) or without (off: the compute path "
                   "edgemoe uses, and a baseline where the repack crashes), or both baselines in every pair (the memory "
                   "allowance is then measured on the compute path edgemoe uses: the repack's copy of the experts "
                   "is not the process's own memory)")
    p.add_argument("--route-trace", dest="route_trace", metavar="FILE", help=ROUTE_TRACE_HELP)
    add_cache_options(p, budgets=True)
    p.set_defaults(func=cmd_bench)

"""`edgemoe` subcommands: parse, call, print. Errors a user caused print one line and exit 2."""
from __future__ import annotations

import argparse
import json
import sys

from .errors import EdgeMoEError


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def cmd_inspect(args: argparse.Namespace) -> int:
    from .layout import read_layout

    layout = read_layout(args.model)
    if args.json:
        print(json.dumps(layout.to_dict()))
        return 0
    print(f"{layout.path}: {layout.arch}, {layout.n_layer} layers, {len(layout.moe_layers)} with experts, "
          f"{layout.n_expert} experts, top-{layout.n_expert_used}")
    print(f"  file {_mib(layout.file_size)}; dense {_mib(layout.dense_bytes)}; "
          f"experts {_mib(layout.expert_bytes)} ({100 * layout.expert_bytes / layout.tensor_data_bytes:.1f}%"
          f" of tensor data)")
    print(f"  {'layer':>5}  {'bytes/expert':>13}  {'layer experts':>13}  tensors")
    for layer in layout.moe_layers:
        tensors = [t for t in layout.expert_tensors if t.layer == layer]
        per_expert = layout.expert(layer, 0).nbytes
        names = ", ".join(sorted({f"{t.name.split('.')[2]}:{t.type}" for t in tensors}))
        print(f"  {layer:>5}  {per_expert:>13,}  {_mib(layout.layer_expert_bytes(layer)):>13}  {names}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .generate import generate

    result = generate(args.model, args.prompt, max_tokens=args.n, memory_budget=args.memory_budget,
                      stock=args.stock, n_ctx=args.n_ctx, n_threads=args.n_threads,
                      temperature=args.temperature, seed=args.seed, record_routing=args.trace,
                      repeat_penalty=args.repeat_penalty)
    if args.json:
        print(json.dumps(result))
        return 0
    print(args.prompt + result["text"])
    print(f"--- {result['engine']}: {result['tokens']} tokens, prefill {result['prefill_tok_s']:.1f} tok/s, "
          f"decode {result['decode_tok_s']:.1f} tok/s, storage read {_mib(result['storage_read_bytes'])}")
    stats = result.get("stats")
    if stats:
        t = stats["total"]
        budget = "none" if stats["budget_bytes"] is None else _mib(stats["budget_bytes"])
        print(f"--- experts: budget {budget}, resident {_mib(stats['resident_expert_bytes'])} "
              f"({stats['resident_experts']} experts), hit rate {t['hit_rate']:.1%} "
              f"({t['hits']} hits, {t['misses']} misses), fetched {_mib(t['bytes_fetched'])}, "
              f"evicted {_mib(t['bytes_evicted'])}, stall {t['stall_s']:.3f} s")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import format_table, run_bench
    from .residency import parse_budget

    result = run_bench(args.model, args.memory_budget, runs=args.runs, tokens=args.tokens, n_ctx=args.n_ctx,
                       use_cgroup=not args.no_cgroup, n_threads=args.n_threads,
                       allowance=None if args.allowance is None else parse_budget(args.allowance, 0))
    if args.json:
        from pathlib import Path

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    limited = "cgroup-limited" if result["cgroup"] else "NOT memory-limited (no writable cgroup)"
    print(f"{result['model']}: dense {_mib(result['dense_bytes'])}, experts {_mib(result['expert_bytes'])}, "
          f"KV {_mib(result['kv_cache_bytes'])}, {limited}, disk {result['disk_bandwidth_bps'] / 1e9:.2f} GB/s")
    print(format_table(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edgemoe", description="Run Mixture-of-Experts GGUFs larger than RAM "
                                 "with llama-cpp-python, experts streamed from storage.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="MoE layout of a GGUF: layers, experts, byte ranges")
    p.add_argument("model", help="path to a GGUF file")
    p.add_argument("--json", action="store_true", help="print one JSON object with every expert's ranges")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("run", help="generate text with experts streamed under a memory budget")
    p.add_argument("model", help="path to a MoE GGUF file")
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("-n", "--n", type=int, default=128, help="tokens to generate (default 128)")
    p.add_argument("--memory-budget", help="expert memory: bytes, 800MB, 1.5GiB or 50%% of expert bytes")
    p.add_argument("--stock", action="store_true", help="plain llama-cpp-python, for comparison")
    p.add_argument("--json", action="store_true", help="print one JSON object with text, speed and stats")
    p.add_argument("--n-ctx", dest="n_ctx", type=int, default=512)
    p.add_argument("--n-threads", dest="n_threads", type=int, default=None, help="default: all cores")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--repeat-penalty", dest="repeat_penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trace", action="store_true", help="with --json: include every layer's chosen experts")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("bench", help="stock vs edgemoe under memory limits, alternating runs, cold cache")
    p.add_argument("model", help="path to a MoE GGUF file")
    p.add_argument("--memory-budget", nargs="+", required=True, help="budgets, e.g. 25%% 50%% 100%%")
    p.add_argument("--runs", type=int, default=3, help="runs per engine and budget (default 3)")
    p.add_argument("--tokens", type=int, default=64, help="tokens generated per run (default 64)")
    p.add_argument("--n-ctx", dest="n_ctx", type=int, default=512)
    p.add_argument("--n-threads", dest="n_threads", type=int, default=None)
    p.add_argument("--no-cgroup", action="store_true", help="do not impose memory limits")
    p.add_argument("--allowance", help="room for the process's own memory (default: measured, + 32 MiB)")
    p.add_argument("--json", help="write the full results here")
    p.set_defaults(func=cmd_bench)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EdgeMoEError as e:
        print(f"edgemoe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`edgemoe` subcommands: parse, call, print. Errors a user caused print one line and exit 2."""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys

from edgemoe_llamacpp import files
from edgemoe_llamacpp.cache.residency import parse_budget
from edgemoe_llamacpp.errors import EXIT_INTERRUPTED, BudgetError, EdgeMoEError


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


MAX_CTX = 1 << 20           # no GGUF model trains longer contexts; larger values are typos


def int_range(lo: int, hi: int | None = None):
    """argparse type: an integer in [lo, hi], refused with a one-line message before llama.cpp sees it."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not an integer") from None
        if n < lo or (hi is not None and n > hi):
            raise argparse.ArgumentTypeError(f"{text[:40]} is out of range [{lo}, {hi if hi is not None else 'inf'}]")
        return n
    parse.__name__ = "integer"
    return parse


def byte_size(text: str) -> int:
    """argparse type: a size in bytes, with or without a unit (2G and 500M as llama.cpp's gguf-split takes them,
    1.5GiB, 4096)."""
    try:
        if text.strip().endswith("%") or text.strip().lower() == "none":
            raise BudgetError(text)
        return parse_budget(text, 0)
    except BudgetError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a size (e.g. 2G, 500M, 1.5GiB or bytes)") from None


byte_size.__name__ = "size"


def float_range(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False):
    """argparse type: a finite float in [lo, hi] (or open at either end)."""
    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a number") from None
        if not math.isfinite(x) or x < lo or x > hi or (lo_open and x == lo) or (hi_open and x == hi):
            raise argparse.ArgumentTypeError(f"{text[:40]} is out of range {'(' if lo_open else '['}{lo}, "
                                             f"{hi}{')' if hi_open else ']'}")
        return x
    parse.__name__ = "number"
    return parse


def layer_summary(layout, layer: int) -> dict:
    """What `inspect` shows of one MoE layer: its experts' sizes (all their tensors; per-expert types make them
    differ) and, per kind of expert tensor (ffn_gate_exps, ...), how many experts are stored at each type (a
    converted file declares a tensor at its largest type, which is not what its experts hold)."""
    from collections import Counter

    sizes = [layout.expert(layer, e).nbytes for e in range(layout.n_expert)]
    types: dict[str, Counter] = {}
    for t in layout.expert_tensors:
        if t.layer == layer:
            kind = types.setdefault(t.name.split(".")[2], Counter())
            kind.update(t.slice(e).type for e in range(t.first_expert, t.first_expert + t.count))
    by_count = {kind: dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))) for kind, c in sorted(types.items())}
    return {"layer": layer, "bytes": layout.layer_expert_bytes(layer),
            "expert_bytes": {"mean": sum(sizes) / len(sizes), "min": min(sizes), "max": max(sizes)},
            "types": by_count}


def cmd_inspect(args: argparse.Namespace) -> int:
    from edgemoe_llamacpp.gguf.layout import read_layout

    layout = read_layout(args.model)
    layers = [layer_summary(layout, layer) for layer in layout.moe_layers]
    if args.json:
        from edgemoe_llamacpp.runtime import runtime_info

        print(json.dumps({**layout.to_dict(), "layers": layers, "runtime": runtime_info()}))
        return 0
    print(f"{layout.path}: {layout.arch}, {layout.n_layer} layers, {len(layout.moe_layers)} with experts, "
          f"{layout.n_expert} experts, top-{layout.n_expert_used}")
    print(f"  file {mib(layout.file_size)}; dense {mib(layout.dense_bytes)}; "
          f"experts {mib(layout.expert_bytes)} ({100 * layout.expert_bytes / layout.tensor_data_bytes:.1f}%"
          f" of tensor data)")
    if layout.split:
        print(f"  split in {len(layout.files)} files: " + ", ".join(f"{os.path.basename(p)} {mib(size)}"
                                                              for p, size in zip(layout.files, layout.file_sizes,
                                                                                 strict=True)))
    print(f"  runtime: {_runtime_line()}" + ("; this file has per-expert types" if layout.mixed else ""))
    sized = [s["expert_bytes"] for s in layers]
    header = "bytes/expert" if all(s["min"] == s["max"] for s in sized) else "bytes/expert: mean (min-max)"
    width = max(len(header), *(len(_sizes(s)) for s in sized))
    print(f"  {'layer':>5}  {header:>{width}}  {'layer experts':>13}  experts per type")
    for s, size in zip(layers, sized, strict=True):
        types = "; ".join(f"{kind}: " + ", ".join(f"{n} {tn}" for tn, n in counts.items())
                          for kind, counts in s["types"].items())
        print(f"  {s['layer']:>5}  {_sizes(size):>{width}}  {mib(s['bytes']):>13}  {types}")
    return 0


def _sizes(size: dict) -> str:
    """An expert's bytes: one figure if every expert of the layer has it, else the mean and the range."""
    if size["min"] == size["max"]:
        return f"{size['min']:,}"
    return f"{round(size['mean']):,} ({size['min']:,}-{size['max']:,})"


def _runtime_line() -> str:
    """The llama-cpp-python this process imports and whether it carries edgemoe's patches (asked of its CPU
    backend: no model is loaded)."""
    if not _llama_cpp_available():
        return "llama-cpp-python is not installed (edgemoe build-runtime)"
    from edgemoe_llamacpp.runtime import runtime_info

    info = runtime_info()
    return (f"llama-cpp-python {info['llama_cpp_python']}, "
            f"{'patched (per-expert types, on-demand load)' if info['patched'] else 'stock'}")


class _Version(argparse.Action):
    """--version: edgemoe's version (its package metadata) and the runtime's, worked out only when asked."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib import metadata

        try:
            version = metadata.version("edgemoe-llamacpp")
        except metadata.PackageNotFoundError:       # run from a source tree
            from edgemoe_llamacpp import __version__ as version
        print(f"edgemoe {version}\n{_runtime_line()}")
        parser.exit()


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


def cmd_run(args: argparse.Namespace) -> int:
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
        if stats["substitute"] is not None:
            print(f"--- substitution (above {stats['substitute']}): {t['substituted']} experts ran from "
                  f"{stats['lowbit_type']} copies, {mib(t['substituted_bytes'])} of them read")
        if t["prefetches"]:
            print(f"--- prefetch ({stats['predictor']}, depth {stats['prefetch_depth']}): {t['prefetches']} "
                  f"experts ({mib(t['prefetch_bytes'])}), {t['prefetch_used']} used ({t['prefetch_late']} late), "
                  f"{t['prefetch_wasted']} wasted ({mib(t['prefetch_wasted_bytes'])})")
    return 0


def add_cache_options(p: argparse.ArgumentParser, *, budgets: bool = False) -> None:
    """The expert cache's options (cache_config.CacheConfig) as flags of `p`; with `budgets`, --memory-budget
    takes several (bench measures each)."""
    from edgemoe_llamacpp.cache.config import MAX_THREADS, CacheConfig
    from edgemoe_llamacpp.cache.dense_hold import HOLD_MODES
    from edgemoe_llamacpp.cache.predict import MAX_DEPTH, PREDICTORS
    from edgemoe_llamacpp.cache.residency import POLICIES
    from edgemoe_llamacpp.engine.substitute import DEFAULT_THRESHOLD

    default = CacheConfig()

    def explain(name: str) -> str:       # argparse formats help with %
        value = getattr(default, name)
        return CacheConfig.help(name).replace("%", "%%") + ("" if value is None else f" (default: {value})")

    if budgets:
        p.add_argument("--memory-budget", nargs="+", required=True, help="budgets, e.g. 25%% 50%% 100%%")
    else:
        p.add_argument("--memory-budget", help=explain("memory_budget"))
    p.add_argument("--policy", choices=POLICIES, default=default.policy, help=explain("policy"))
    p.add_argument("--predictor", choices=(*PREDICTORS, "none"), default="none", help=explain("predictor"))
    p.add_argument("--prefetch-depth", dest="prefetch_depth", type=int, choices=range(1, MAX_DEPTH + 1),
                   default=default.prefetch_depth, help=explain("prefetch_depth"))
    for name in ("prefetch_threads", "fetch_threads"):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int_range(1, MAX_THREADS),
                       default=getattr(default, name), help=explain(name))
    p.add_argument("--hold-dense", dest="hold_dense", choices=HOLD_MODES, default=default.hold_dense,
                   help=explain("hold_dense"))
    p.add_argument("--substitute", type=float_range(0, 1, hi_open=True), nargs="?", const=DEFAULT_THRESHOLD, default=None,
                   metavar="SHARE", help=f"{explain('substitute')} Without SHARE: {DEFAULT_THRESHOLD}.")


def cache_config(args: argparse.Namespace, **override):
    """The CacheConfig of the flags add_cache_options added (`override`: fields set otherwise, as bench's budget)."""
    from edgemoe_llamacpp.cache.config import CacheConfig

    options = {name: getattr(args, name) for name in CacheConfig.names()}
    options["predictor"] = None if options["predictor"] == "none" else options["predictor"]
    return CacheConfig(**{**options, **override})


def _one_window(tokens: int, n_ctx: int) -> None:
    if tokens < n_ctx:
        raise EdgeMoEError(f"--tokens {tokens} is fewer than one window of --n-ctx {n_ctx}")


def cmd_profile(args: argparse.Namespace) -> int:
    from edgemoe_llamacpp.convert.record import profile
    from edgemoe_llamacpp.corpus import read_texts

    files.check_output(args.out, inputs=[args.model, *(args.text or [])], force=args.force, what="--out")
    _one_window(args.tokens, args.n_ctx)
    texts = read_texts(args.text) if args.text else None
    label = ", ".join(args.text) if args.text else "stdlib train split"
    meta = profile(args.model, args.out, texts=texts, text_label=label, tokens=args.tokens, n_ctx=args.n_ctx,
                   samples=args.samples)
    print(f"{args.out}: {meta['tokens']:,} tokens x {len(meta['moe_layers'])} MoE layers routed, "
          f"up to {meta['samples_per_expert']} FFN inputs sampled per expert")
    return 0


def _plan_from_args(args: argparse.Namespace, layout):
    """The plan (--uniform, --plan or measured from --profile), its `edgemoe.*` metadata, the importance
    matrices to quantize with (or None) and the experts a measured plan quantizes without them (or None)."""
    from edgemoe_llamacpp.convert.profile import Profile
    from edgemoe_llamacpp.convert.rewrite import uniform_plan
    from edgemoe_llamacpp.gguf import quant

    chosen = [x for x in ("uniform", "plan", "profile") if getattr(args, x)]
    if len(chosen) != 1:
        raise EdgeMoEError("convert needs exactly one of --profile (with --expert-bits or --size), --uniform, "
                           "--plan")
    if args.no_imatrix and args.imatrix:
        raise EdgeMoEError("--imatrix and --no-imatrix contradict each other")
    if args.uniform:
        return (uniform_plan(layout, args.uniform), {"plan.method": f"uniform {args.uniform}"},
                _imatrix(args, layout), None)
    if args.plan:
        from pathlib import Path

        try:
            raw = json.loads(files.read_bytes(args.plan, "plan"))
        except ValueError as e:
            raise EdgeMoEError(f"{args.plan}: unreadable plan ({e})") from None
        if not isinstance(raw, dict):
            raise EdgeMoEError(f"{args.plan}: a plan is a JSON object of expert tensor name -> type or list of "
                               f"types, not a {type(raw).__name__}")
        plan = {t.name: [raw[t.name]] * t.count if isinstance(raw.get(t.name), str) else raw.get(t.name)
                for t in layout.expert_tensors}
        missing = [name for name, types in plan.items() if types is None]
        if missing:
            raise EdgeMoEError(f"{args.plan}: no types for {missing[:3]}")
        return plan, {"plan.method": f"file {Path(args.plan).name}"}, _imatrix(args, layout), None
    from edgemoe_llamacpp.convert.plan import imatrix_off, make_plan, measure_costs

    if (args.expert_bits is None) == (args.size is None):
        raise EdgeMoEError("--profile needs exactly one of --expert-bits or --size")
    size = None if args.size is None else parse_budget(args.size, layout.expert_bytes)
    candidates = [tn for tn in quant.PLAN_TYPES if not args.no_imatrix or not quant.requires_imatrix(tn)]
    smallest = min(candidates, key=quant.bits_per_weight)
    if args.expert_bits is not None and args.expert_bits < quant.bits_per_weight(smallest):
        raise EdgeMoEError(f"--expert-bits {args.expert_bits} is below {quant.bits_per_weight(smallest)}, the bits "
                           f"per weight of the smallest type a plan can use ({smallest}"
                           f"{', without importance matrices' if args.no_imatrix else ''})")
    prof = Profile(args.profile, layout)
    imatrix = _imatrix(args, layout, prof)
    costs = measure_costs(args.input, prof, candidates, imatrix=imatrix)
    plan, report = make_plan(costs, expert_bits=args.expert_bits, size=size)
    print(f"plan: {report['bits_per_weight']:.3f} bits per expert weight, {report['expert_bytes']:,} expert "
          f"bytes, types {report['type_counts']}")
    return plan, {"plan.method": "measured output error (edgemoe plan)",
                  "plan.bits_per_weight": round(report["bits_per_weight"], 4),
                  "profile.sha256": files.sha256_file(args.profile)}, imatrix, imatrix_off(costs, plan)


def _imatrix(args: argparse.Namespace, layout, prof=None):
    """The per-expert importance matrices convert quantizes with: from --imatrix's profile, else from --profile's
    (`prof`); none with --no-imatrix."""
    from edgemoe_llamacpp.convert.imatrix import from_profile
    from edgemoe_llamacpp.convert.profile import Profile

    if args.no_imatrix or not (args.imatrix or prof):
        return None
    return from_profile(Profile(args.imatrix, layout) if args.imatrix else prof, layout)


def cmd_convert(args: argparse.Namespace) -> int:
    from edgemoe_llamacpp.convert.rewrite import convert
    from edgemoe_llamacpp.gguf.layout import read_layout

    source = read_layout(args.input)
    inputs = [*source.files, args.profile, args.plan, args.imatrix]
    if args.split_max_size is None:
        files.check_output(args.output, inputs=inputs, force=args.force)
    if args.save_plan:
        files.check_output(args.save_plan, inputs=[*inputs, args.output], force=args.force, what="--save-plan")
    plan, meta, imatrix, off = _plan_from_args(args, source)
    if args.save_plan:
        files.write_text(args.save_plan, json.dumps(plan, indent=1) + "\n")
    if imatrix is not None:
        meta["imatrix.profile.sha256"] = files.sha256_file(args.imatrix or args.profile)
    layout = convert(args.input, args.output, plan, meta=meta, force=args.force, lowbit=args.lowbit,
                     imatrix=imatrix, imatrix_off=off, split_max_size=args.split_max_size)
    needs = [x for x, on in (("per-expert types", layout.mixed),
                             (f"{layout.lowbit_type} copies of the experts", args.lowbit)) if on]
    kind = f"{' and '.join(needs)}: needs the patched runtime" if needs else "loads in stock llama.cpp"
    where = args.output if not layout.split else f"{layout.path} (shard 1 of {len(layout.files)})"
    print(f"{where}: experts {mib(layout.expert_bytes)}, dense {mib(layout.dense_bytes)}, {kind}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from edgemoe_llamacpp.convert.verify import verify

    report = verify(args.model, progress=not args.json)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{args.model}: ok: {report['tensors']} tensors, checksums match, "
              f"every weight of {report['finite_expert_ranges']} expert ranges finite (ggml dequantizes "
              f"{report['sampled_dequantize']} sampled ones as gguf-py does), "
              f"{report['expert_ranges']} expert ranges inside the file "
              f"({report['unaligned_expert_ranges']} not page-aligned), "
              f"{'per-expert types' if report['mixed'] else 'one type per tensor'}"
              + (f"; {report['lowbit_ranges']} {report['lowbit_type']} copy ranges "
                 f"({report['unaligned_lowbit_ranges']} not page-aligned)" if report["lowbit_type"] else ""))
    return 0


def cmd_ppl(args: argparse.Namespace) -> int:
    from edgemoe_llamacpp.corpus import read_texts
    from edgemoe_llamacpp.engine.perplexity import perplexity

    _one_window(args.tokens, args.n_ctx)
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


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    import uvicorn
    from llama_cpp.server.cli import parse_model_from_args
    from pydantic import ValidationError

    from edgemoe_llamacpp import server
    from edgemoe_llamacpp.gguf.layout import read_layout

    args.model = args.model_path or args.model
    config_file = args.config_file or (None if args.model else os.environ.get("CONFIG_FILE"))
    if config_file:
        server_settings, model_settings = server.load_config_file(config_file)
    elif not args.model:
        raise EdgeMoEError("serve needs a MODEL or --config_file")
    else:
        try:
            server_settings = parse_model_from_args(server.EdgeMoEServerSettings, args)
            model_settings = [parse_model_from_args(server.EdgeMoEModelSettings, args)]
        except ValidationError as e:
            raise server.settings_error(e) from None
    for m in model_settings:               # a bad file or cache option fails here, before the server starts
        layout = read_layout(m.model)
        try:
            m.cache_config().make_cache(layout).close()
        except BudgetError as e:
            raise BudgetError(f"{m.model}: {e}") from None
    warning = server.exposure_warning(server_settings)
    if warning:
        print(f"edgemoe: {warning}", file=sys.stderr)
    server.check_listen(server_settings.host, server_settings.port)
    app = server.create_app(server_settings, model_settings)
    # After a Ctrl-C shutdown uvicorn raises SIGINT again, as KeyboardInterrupt, which uvicorn.run() would
    # swallow (exit 0); from its Server it reaches main(), which exits 130 as an interrupted command does
    uvicorn.Server(uvicorn.Config(app, host=server_settings.host, port=server_settings.port,
                                  ssl_keyfile=server_settings.ssl_keyfile,
                                  ssl_certfile=server_settings.ssl_certfile)).run()
    return 0


def build_parser() -> argparse.ArgumentParser:
    from edgemoe_llamacpp.cache.config import CacheConfig

    ap = argparse.ArgumentParser(prog="edgemoe", description="Run Mixture-of-Experts GGUFs larger than RAM "
                                 "with llama-cpp-python, experts streamed from storage.")
    ap.add_argument("--version", action=_Version, help="edgemoe's version, llama-cpp-python's, and whether it is "
                    "built with edgemoe's patches")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="MoE layout of a GGUF: layers, experts, byte ranges")
    p.add_argument("model", help="path to a GGUF file")
    p.add_argument("--json", action="store_true", help="print one JSON object with every expert's ranges")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("run", help="generate text with experts streamed under a memory budget")
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
    p.set_defaults(func=cmd_run, route_injector=lambda args: None)
    parsers = {"run": p}

    p = sub.add_parser("profile", help="record routing and expert inputs on calibration text")
    p.add_argument("model", help="path to a MoE GGUF file (the source model)")
    p.add_argument("--out", required=True, help="profile file to write (.npz)")
    p.add_argument("--text", nargs="+", help="calibration text files (default: the stdlib train split)")
    p.add_argument("--tokens", type=int_range(1, 1 << 30), default=16384, help="calibration tokens (default 16384)")
    p.add_argument("--samples", type=int_range(1, 1 << 16), default=256, help="FFN inputs kept per expert (default 256)")
    p.add_argument("--n-ctx", dest="n_ctx", type=int_range(2, MAX_CTX), default=512)
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("convert", help="rewrite a GGUF with experts at planned types, page-aligned")
    p.add_argument("input", help="source GGUF (never modified)")
    p.add_argument("output", help="new GGUF (refused if it exists, unless --force)")
    p.add_argument("--profile", help="profile from `edgemoe profile`: plan per-expert types from it")
    p.add_argument("--expert-bits", dest="expert_bits", type=float_range(0, 64, lo_open=True),
                   help="with --profile: average bits per expert weight (IQ2_XXS is 2.0625, Q2_K 2.625, Q8_0 8.5)")
    p.add_argument("--size", help="with --profile: expert bytes instead, e.g. 12MB or 40%% (of the input's)")
    p.add_argument("--uniform", metavar="TYPE", help="every expert at TYPE (e.g. Q4_K); stock llama.cpp loads it")
    p.add_argument("--plan", help="JSON: expert tensor name -> type, or list of types per expert")
    p.add_argument("--save-plan", dest="save_plan", help="write the plan used as JSON here")
    p.add_argument("--lowbit", metavar="TYPE", help="also store every expert at TYPE (e.g. Q2_K or IQ2_XXS), for "
                   "running a missed low-weight expert from it (--substitute)")
    p.add_argument("--imatrix", metavar="PROFILE", help="quantize every expert with its importance matrix from this "
                   "profile's sampled inputs (llama.cpp's imatrix convention; default: --profile's, if given); "
                   "IQ2_XXS and IQ2_XS need one")
    p.add_argument("--no-imatrix", dest="no_imatrix", action="store_true",
                   help="quantize without importance matrices (a plan then leaves out IQ2_XXS and IQ2_XS)")
    p.add_argument("--split-max-size", dest="split_max_size", type=byte_size, metavar="SIZE",
                   help="write shards of at most SIZE of tensor data each (e.g. 2G, 500M, as llama.cpp's gguf-split): "
                   "OUTPUT without .gguf, then -00001-of-0000N.gguf, and so on")
    p.add_argument("--force", action="store_true", help="replace OUTPUT (and --save-plan) if it exists")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("verify", help="check a converted GGUF: structure, bounds, checksums")
    p.add_argument("model", help="path to a GGUF written by edgemoe convert")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("ppl", help="perplexity on held-out text through llama-cpp-python")
    p.add_argument("model", help="path to a MoE GGUF file")
    p.add_argument("--text", nargs="+", help="text files (default: the stdlib validation split)")
    p.add_argument("--tokens", type=int_range(1, 1 << 30), default=16384, help="tokens to score (default 16384)")
    p.add_argument("--n-ctx", dest="n_ctx", type=int_range(2, MAX_CTX), default=512, help="window length (default 512)")
    p.add_argument("--reference", help="also KL divergence and top-1 agreement against this model (e.g. the source)")
    p.add_argument("--batch", type=int_range(1, MAX_CTX), default=None, help="tokens per evaluation (default: the window); 1 scores "
                   "as decoding runs, token by token, which is where --substitute acts")
    add_cache_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ppl)

    p = sub.add_parser("build-runtime", help="build llama-cpp-python with edgemoe's patches (cached) and install it")
    from edgemoe_llamacpp.engine import build as runtime_build
    runtime_build.add_arguments(p)
    p.set_defaults(func=runtime_build.run)

    p = sub.add_parser("serve", help="OpenAI-compatible server (llama-cpp-python's) with experts streamed")
    p.add_argument("model_path", nargs="?", metavar="MODEL", help="path to a MoE GGUF file")
    p.add_argument("--config_file", help="JSON or YAML config in llama-cpp-python's format (models may add "
                   f"{', '.join(CacheConfig.names())})")
    if _server_available() and _llama_cpp_available():
        from llama_cpp.server.cli import add_args_from_model

        from edgemoe_llamacpp.server import EdgeMoESettings

        n = len(p._actions)
        add_args_from_model(p, EdgeMoESettings)
        for action in p._actions[n:]:      # argparse formats help with %: "50% of the expert bytes" is not one
            if action.help:
                action.help = action.help.replace("%", "%%")
    p.set_defaults(func=cmd_serve)
    for plugin in plugins():
        plugin.add_commands(sub, parsers)
    return ap


PLUGINS = "edgemoe_llamacpp.commands"


def plugins() -> list:
    """Modules that add commands (entry points of group PLUGINS), e.g. edgemoe_bench's `bench` and `run
    --route-trace`. Each has `add_commands(subparsers, parsers)`, `parsers` naming the built-in commands' parsers
    it may extend (`run`: a plugin may set the default `route_injector`, a function of the parsed arguments
    giving an injector, engine.injection). One whose package is not installed is left out."""
    from importlib import metadata

    found = []
    for ep in metadata.entry_points(group=PLUGINS):
        try:
            found.append(ep.load())
        except ModuleNotFoundError as e:
            if e.name is None or e.name.split(".")[0] != ep.value.split(".")[0]:
                raise
    return found


def _server_available() -> bool:
    import importlib.util

    def found(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):      # a parent missing, or a module blocked in sys.modules
            return False

    return all(map(found, ("fastapi", "uvicorn", "sse_starlette", "pydantic_settings", "starlette_context")))


def _llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != "llama_cpp":
            raise
        return False
    return True


def _underscore_flags(argv: list[str]) -> list[str]:
    """`serve` takes llama-cpp-python's flags (--n_ctx, --api_key); accept --n-ctx, --api-key too."""
    return [a.split("=", 1)[0].replace("-", "_").replace("__", "--", 1) + a[len(a.split("=", 1)[0]):]
            if a.startswith("--") else a for a in argv]


NEGATIVE = re.compile(r"-[0-9.]")      # what argparse takes for an option, unless it is a plain negative number


def _attach_negative_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`--memory-budget -5GiB` as `--memory-budget=-5GiB`: argparse takes a value that starts with '-' and a
    digit or '.' (other than a plain number) for an option, and answers with the whole usage; attached, the
    value reaches the option's own check, which says what is wrong with it. Only for the options of the
    subcommand that take a value, and only before `--`."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    start = next((i for i, a in enumerate(argv) if a in sub.choices), None)
    if start is None:
        return argv
    options = sub.choices[argv[start]]._option_string_actions
    out, i = argv[:start + 1], start + 1
    while i < len(argv):
        action = options.get(argv[i])
        if argv[i] == "--":
            return out + argv[i:]
        if action is not None and action.nargs != 0 and i + 1 < len(argv) and NEGATIVE.match(argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def _run(argv: list[str]) -> int:
    """Parse and run one command; a user's error is one line and exit 2."""
    if argv[:1] == ["serve"]:
        if not _llama_cpp_available():
            print("edgemoe: error: llama-cpp-python is not installed; build edgemoe's runtime: edgemoe build-runtime",
                  file=sys.stderr)
            return 2
        if not _server_available():
            print("edgemoe: error: serve needs the server extra: pip install 'edgemoe-llamacpp[server]'",
                  file=sys.stderr)
            return 2
        argv = _underscore_flags(argv)
    parser = build_parser()
    args = parser.parse_args(_attach_negative_values(parser, argv))
    try:
        return args.func(args)
    except EdgeMoEError as e:
        print(f"edgemoe: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if e.name != "llama_cpp":
            raise
        print("edgemoe: error: llama-cpp-python is not installed; build edgemoe's runtime: edgemoe build-runtime",
              file=sys.stderr)
        return 2
    except BrokenPipeError:             # `edgemoe inspect | head`: the reader left; so do we, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def main(argv: list[str] | None = None) -> int:
    """`edgemoe ARGV`: the exit code. Ctrl-C, wherever it lands (parsing imports llama-cpp-python for serve's
    flags; an error may be being printed), is exit 130 without a traceback."""
    try:
        return _run(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def entry() -> None:
    """The `edgemoe` command: main(), then exit with its code. Stopped by Ctrl-C, the process ends at once,
    without waiting for threads still inside C code that cannot be interrupted (ggml sets up an i-quant's tables
    in seconds, in the first call that quantizes to it)."""
    code = main()
    if code == EXIT_INTERRUPTED:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()

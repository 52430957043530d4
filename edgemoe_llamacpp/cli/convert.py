"""`edgemoe convert`: rewrite a GGUF with its experts at planned types, each a page-aligned region; the input is never
touched."""
from __future__ import annotations

import argparse
import json

from edgemoe_llamacpp import files
from edgemoe_llamacpp.cache.residency import parse_budget
from edgemoe_llamacpp.cli.args import byte_size, float_range, mib
from edgemoe_llamacpp.errors import EdgeMoEError

HELP = "rewrite a GGUF with experts at planned types, page-aligned"


def add_arguments(p: argparse.ArgumentParser) -> None:
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


def run(args: argparse.Namespace) -> int:
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

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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edgemoe", description="Run Mixture-of-Experts GGUFs larger than RAM "
                                 "with llama-cpp-python, experts streamed from storage.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="MoE layout of a GGUF: layers, experts, byte ranges")
    p.add_argument("model", help="path to a GGUF file")
    p.add_argument("--json", action="store_true", help="print one JSON object with every expert's ranges")
    p.set_defaults(func=cmd_inspect)
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

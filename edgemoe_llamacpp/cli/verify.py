"""`edgemoe verify`: check a converted GGUF: structure, bounds, checksums, finite weights."""
from __future__ import annotations

import argparse
import json

HELP = "check a converted GGUF: structure, bounds, checksums"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="path to a GGUF written by edgemoe convert")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
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

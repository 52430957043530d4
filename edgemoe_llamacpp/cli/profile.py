"""`edgemoe profile`: record routing and sampled expert inputs on calibration text (convert.record)."""
from __future__ import annotations

import argparse

from edgemoe_llamacpp import files
from edgemoe_llamacpp.cli.args import MAX_CTX, int_range
from edgemoe_llamacpp.errors import EdgeMoEError

HELP = "record routing and expert inputs on calibration text"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="path to a MoE GGUF file (the source model)")
    p.add_argument("--out", required=True, help="profile file to write (.npz)")
    p.add_argument("--text", nargs="+", help="calibration text files (default: the stdlib train split)")
    p.add_argument("--tokens", type=int_range(1, 1 << 30), default=16384, help="calibration tokens (default 16384)")
    p.add_argument("--samples", type=int_range(1, 1 << 16), default=256, help="FFN inputs kept per expert (default 256)")
    p.add_argument("--n-ctx", dest="n_ctx", type=int_range(2, MAX_CTX), default=512)
    p.add_argument("--force", action="store_true", help="replace --out if it exists")


def one_window(tokens: int, n_ctx: int) -> None:
    if tokens < n_ctx:
        raise EdgeMoEError(f"--tokens {tokens} is fewer than one window of --n-ctx {n_ctx}")


def run(args: argparse.Namespace) -> int:
    from edgemoe_llamacpp.convert.record import profile
    from edgemoe_llamacpp.corpus import read_texts

    files.check_output(args.out, inputs=[args.model, *(args.text or [])], force=args.force, what="--out")
    one_window(args.tokens, args.n_ctx)
    texts = read_texts(args.text) if args.text else None
    label = ", ".join(args.text) if args.text else "stdlib train split"
    meta = profile(args.model, args.out, texts=texts, text_label=label, tokens=args.tokens, n_ctx=args.n_ctx,
                   samples=args.samples)
    print(f"{args.out}: {meta['tokens']:,} tokens x {len(meta['moe_layers'])} MoE layers routed, "
          f"up to {meta['samples_per_expert']} FFN inputs sampled per expert")
    return 0

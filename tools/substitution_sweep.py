"""Quality of low-bit substitution: perplexity, KL from the source and bytes read, per threshold, as decoding runs.

    python tools/substitution_sweep.py                                  # the bundled model at 25%
    python tools/substitution_sweep.py --model bench/models/io-moe-lowbit.gguf --reference bench/models/io-moe.gguf \\
        --thresholds none 0.6 --tokens 1024 --out bench/results/substitution-io-moe.json

Writes (once) the model with Q2_K copies of its experts (`edgemoe convert --uniform <its type> --lowbit`; with
--imatrix PROFILE, quantized with that profile's importance matrices, which IQ2_XXS and IQ2_XS copies need),
then scores the validation split one token per evaluation (`edgemoe ppl --batch 1`) under the memory budget,
without substitution and at each threshold: perplexity, KL divergence from the source model and top-1
agreement, the share of chosen experts that ran from copies, and expert bytes read per token.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from edgemoe_llamacpp import files, runtime
from edgemoe_llamacpp.cache.config import CacheConfig
from edgemoe_llamacpp.convert.imatrix import from_profile
from edgemoe_llamacpp.convert.profile import Profile
from edgemoe_llamacpp.convert.rewrite import convert, uniform_plan
from edgemoe_llamacpp.engine.perplexity import perplexity
from edgemoe_llamacpp.gguf.layout import read_layout

ROOT = Path(__file__).resolve().parent.parent


def lowbit_file(source: Path, work: Path, lowbit: str, profile: Path | None) -> Path:
    out = work / f"{source.stem}-{lowbit.lower()}{'-imatrix' if profile else ''}-copies.gguf"
    if not out.exists():
        layout = read_layout(source)
        (kind,) = {t.type for t in layout.expert_tensors}
        imatrix = from_profile(Profile(profile, layout), layout) if profile else None
        convert(source, out, uniform_plan(layout, kind), lowbit=lowbit, imatrix=imatrix)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="a file with low-bit copies (default: made from "
                    "--reference)")
    ap.add_argument("--reference", type=Path, default=ROOT / "tests/fixtures/tiny-moe.gguf")
    ap.add_argument("--work", type=Path, default=ROOT / "build/substitution")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/substitution.json")
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--lowbit", default="Q2_K")
    ap.add_argument("--imatrix", type=Path, metavar="PROFILE", help="quantize the copies with this profile's "
                    "importance matrices (`edgemoe profile` of --reference)")
    ap.add_argument("--thresholds", nargs="+", default=["none", "0.8", "0.6", "0.4", "0.2", "0.0"])
    args = ap.parse_args()
    files.tool_output(args.out)
    if not runtime.patched():
        sys.exit("error: substitution needs the patched runtime: python tools/build_runtime.py")
    args.work.mkdir(parents=True, exist_ok=True)
    model = args.model or lowbit_file(args.reference, args.work, args.lowbit, args.imatrix)
    rows = []
    for th in args.thresholds:
        sub = None if th == "none" else float(th)
        r = perplexity(str(model), tokens=args.tokens, batch=1, reference=str(args.reference),
                       cache=CacheConfig(memory_budget=args.budget, substitute=sub))
        t = r.pop("stats")["total"]
        chosen = t["hits"] + t["misses"]
        rows.append({"threshold": sub, "perplexity": r["perplexity"], "kld": r["kld"], "same_top1": r["same_top1"],
                     "tokens": r["tokens"], "substituted": t["substituted"], "chosen": chosen,
                     "substituted_share": t["substituted"] / chosen, "misses": t["misses"],
                     "fetched_bytes_per_token": t["bytes_fetched"] / r["tokens"],
                     "substituted_bytes_per_token": t["substituted_bytes"] / r["tokens"]})
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["perplexity"] if rows[0]["threshold"] is None else None
    result = {"kind": "substitution", "command": "python " + " ".join(sys.argv), "model": str(model), "reference": str(args.reference), "budget": args.budget, "lowbit": args.lowbit,
              "imatrix": str(args.imatrix) if args.imatrix else None,
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "runtime": runtime.runtime_info(), "rows": rows}
    files.write_text(args.out, json.dumps(result, indent=1) + "\n")
    print("| threshold | perplexity | vs none | KL (nats/token) | same top-1 | ran from copies | "
          "expert MB read/token |\n|---|---|---|---|---|---|---|")
    for r in rows:
        rel = f"{100 * (r['perplexity'] / base - 1):+.2f}%" if base else "-"
        print(f"| {'none' if r['threshold'] is None else r['threshold']} | {r['perplexity']:.3f} | {rel} | "
              f"{r['kld']:.5f} | {r['same_top1']:.2%} | {r['substituted_share']:.1%} | "
              f"{r['fetched_bytes_per_token'] / 1e6:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Is the quality fixture sensitive enough? Uniform files made from its F16 source, scored against it.

    python tools/quality_fixture.py                       # the quality fixture -> bench/results/quality-fixture.json
    python tools/quality_fixture.py MODEL --types Q2_K Q4_K --tokens 65536

Writes every stacked expert tensor of MODEL (tools/make_tiny_moe.py --dtype F16) at each uniform type with
`edgemoe convert`'s own code, scores the source and the uniform files on the same windows of the validation
split (`edgemoe ppl --reference`) and reports each file's perplexity, its KL divergence from the source and its
log-likelihood per token against the source's, window by window with a standard error. The bar (issue 18):
uniform Q2_K raises perplexity by at least --bar over the source, so the fixture can tell quantizers apart.
The training provenance make_tiny_moe.py wrote into the file's description (configuration, steps, training
time) goes into the report. The converted files go to --work and are not kept in git.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from gguf import GGUFReader

from edgemoe_llamacpp import files, runtime
from edgemoe_llamacpp.convert.rewrite import convert, uniform_plan
from edgemoe_llamacpp.engine.perplexity import paired_difference, perplexities
from edgemoe_llamacpp.gguf import quant
from edgemoe_llamacpp.gguf.layout import read_layout

ROOT = Path(__file__).resolve().parent.parent


def provenance(path: Path) -> dict:
    """The JSON make_tiny_moe.py stores as general.description ({} if there is none)."""
    field = GGUFReader(path).fields.get("general.description")
    try:
        return json.loads(field.contents()) if field is not None else {}
    except json.JSONDecodeError:
        return {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, nargs="?", default=ROOT / "tests/fixtures/quality-moe-f16.gguf",
                    help="the F16 source (default: the quality fixture)")
    ap.add_argument("--work", type=Path, default=ROOT / "build/quality-fixture")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/quality-fixture.json")
    ap.add_argument("--types", nargs="+", default=["Q2_K", "Q4_K", "Q8_0"], choices=quant.PLAN_TYPES)
    ap.add_argument("--tokens", type=int, default=10**7, help="validation tokens scored per file (default: all)")
    ap.add_argument("--bar", type=float, default=0.03, help="the perplexity increase uniform Q2_K must reach")
    args = ap.parse_args()
    files.tool_output(args.out)
    args.work.mkdir(parents=True, exist_ok=True)

    layout = read_layout(args.model)
    if layout.mixed:
        sys.exit(f"error: {args.model} has experts of several types; the source is a file of one type")
    n_weights = round(sum(8 * t.nbytes / quant.bits_per_weight(t.type) for t in layout.expert_tensors))
    models = [("source", f"source {', '.join(sorted({t.type for t in layout.expert_tensors}))}", args.model)]
    for tn in args.types:
        path = args.work / f"uniform-{tn}.gguf"
        convert(args.model, path, uniform_plan(layout, tn), meta={"plan.method": f"uniform {tn}"}, force=True)
        models.append(("uniform", f"uniform {tn}", path))

    scores = perplexities([str(f[2]) for f in models], tokens=args.tokens, reference=str(args.model))
    source = scores[0]
    rows = []
    for (kind, label, path), ppl in zip(models, scores, strict=True):
        out = read_layout(path)
        row = {"kind": kind, "label": label, "file": path.name, "file_bytes": path.stat().st_size,
               "expert_bytes": out.expert_bytes, "bits_per_weight": 8 * out.expert_bytes / n_weights,
               "perplexity": ppl["perplexity"], "ppl_ratio": ppl["perplexity"] / source["perplexity"],
               "tokens": ppl["tokens"], "kld": ppl["kld"], "same_top1": ppl["same_top1"]}
        if kind != "source":
            row["vs_source"] = paired_difference(ppl["window_nll"], source["window_nll"], ppl["tokens"])
        rows.append(row)
        print(f"{label:>16}: {row['bits_per_weight']:.3f} bits, ppl {row['perplexity']:.3f} "
              f"({row['ppl_ratio'] - 1:+.2%}), KLD {row['kld']:.5f}, same top-1 {row['same_top1']:.2%}", flush=True)
    q2 = next((r for r in rows if r["label"] == "uniform Q2_K"), None)
    bar = None
    if q2 is not None:
        bar = {"required": args.bar, "q2_k_increase": q2["ppl_ratio"] - 1, "met": q2["ppl_ratio"] - 1 >= args.bar}

    src = args.model.resolve()
    result = {"kind": "quality_fixture", "model": str(src.relative_to(ROOT) if src.is_relative_to(ROOT) else src),
              "model_bytes": args.model.stat().st_size, "training": provenance(args.model),
              "eval": {"text": "stdlib validation split", "tokens": source["tokens"], "n_ctx": source["n_ctx"]},
              "n_weights": n_weights, "rows": rows, "bar": bar, "runtime": runtime.runtime_info(),
              "date": time.strftime("%Y-%m-%d"), "python": platform.python_version(),
              "command": "python " + " ".join(sys.argv)}
    files.write_text(args.out, json.dumps(result, indent=1) + "\n")
    if bar is not None:
        print(f"uniform Q2_K raises perplexity by {bar['q2_k_increase']:.2%}: the bar of {args.bar:.0%} is "
              f"{'met' if bar['met'] else 'NOT met'}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

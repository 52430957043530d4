"""Quality at equal size: perplexity vs expert bytes, uniform K-quant files against edgemoe's per-expert plans.

    python tools/quality_sweep.py                      # the bundled model -> bench/results/quality.json
    python tools/quality_sweep.py --model M --tokens 32768 --bits 2.75 3 3.5 4

Profiles the model on the stdlib train split (`edgemoe profile`), measures every expert's cost at every type
once, writes uniform Q2_K..Q8_0 files and per-expert plans at the given average bits and at the exact sizes
of the uniform Q3_K/Q4_K/Q5_K files, and scores them all on the same windows of the validation split (the
whole split by default; `edgemoe ppl --reference`): perplexity, and the KL divergence from the source model's
next-token distribution with top-1 agreement. Each plan is also compared with the smallest uniform file at
least as large, window by window: the mean difference in log-likelihood per token and its standard error,
so a perplexity difference can be told from noise. The files go to --work (default build/quality) and are
not kept in git.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from edgemoe_llamacpp import quant, runtime
from edgemoe_llamacpp.convert import convert, uniform_plan
from edgemoe_llamacpp.errors import BudgetError
from edgemoe_llamacpp.imatrix import from_profile
from edgemoe_llamacpp.layout import read_layout
from edgemoe_llamacpp.perplexity import paired_difference, perplexities
from edgemoe_llamacpp.plan import make_plan, measure_costs
from edgemoe_llamacpp.profile import Profile, profile

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "tests/fixtures/tiny-moe.gguf"))
    ap.add_argument("--work", type=Path, default=ROOT / "build/quality")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/quality.json")
    ap.add_argument("--tokens", type=int, default=10**7, help="validation tokens scored per file (default: all)")
    ap.add_argument("--profile-tokens", type=int, default=16384)
    ap.add_argument("--bits", type=float, nargs="+", default=[2.5, 2.75, 3.0, 3.5, 4.0])
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if not runtime.patched():
        sys.exit("error: per-expert plans need the patched runtime: python tools/build_runtime.py")

    prof_path = args.work / "profile.npz"
    meta = profile(args.model, prof_path, tokens=args.profile_tokens)
    layout = read_layout(args.model)
    prof = Profile(prof_path, layout)
    imatrix = from_profile(prof, layout)         # every file quantized with the profile's importance matrices
    costs = measure_costs(args.model, prof, imatrix=imatrix)
    n_weights = costs["n_weights"]

    files: list[tuple[str, str, Path, float | None, dict | None]] = []   # kind, label, path, bits, plan report
    uniform_sizes = {}
    for tn in quant.PLAN_TYPES:
        path = args.work / f"uniform-{tn}.gguf"
        convert(args.model, path, uniform_plan(layout, tn), meta={"plan.method": f"uniform {tn}"}, force=True,
                imatrix=imatrix)
        uniform_sizes[tn] = read_layout(path).expert_bytes
        files.append(("uniform", f"uniform {tn}", path, None, None))

    targets = [("bits", b, None) for b in args.bits]
    targets += [("size", None, uniform_sizes[tn]) for tn in ("Q3_K", "Q4_K", "Q5_K")]
    skipped = []
    for kind, bits, size in targets:
        label = f"edgemoe {bits:g} bits" if bits is not None else f"edgemoe = {size / 1e6:.2f} MB"
        try:
            plan, report = make_plan(costs, expert_bits=bits, size=size)
        except BudgetError as e:
            skipped.append({"label": label, "reason": str(e)})
            print(f"{label:>24}: not reachable ({e})", flush=True)
            continue
        name = f"plan-{bits:g}bits.gguf" if bits is not None else f"plan-{size}.gguf"
        path = args.work / name
        convert(args.model, path, plan, force=True,
                meta={"plan.method": "measured output error (edgemoe plan)",
                      "plan.bits_per_weight": round(report["bits_per_weight"], 4)}, imatrix=imatrix)
        files.append(("plan", label, path, bits, report))

    # every file scored on the same windows in one pass, the source evaluated once per window
    scores = perplexities([str(f[2]) for f in files], tokens=args.tokens, reference=args.model)
    rows = []
    for (kind, label, path, bits, report), ppl in zip(files, scores, strict=True):
        out = read_layout(path)
        rows.append({"kind": kind, "label": label, "file": path.name, "expert_bytes": out.expert_bytes,
                     "bits_per_weight": 8 * out.expert_bytes / n_weights, "target_bits": bits,
                     "perplexity": ppl["perplexity"], "tokens": ppl["tokens"], "kld": ppl["kld"],
                     "same_top1": ppl["same_top1"],
                     "type_counts": (report or {}).get("type_counts"),
                     "planned_cost": (report or {}).get("cost")})
        print(f"{label:>24}: {rows[-1]['bits_per_weight']:.3f} bits, {out.expert_bytes / 1e6:.2f} MB, "
              f"ppl {ppl['perplexity']:.3f}, KLD {ppl['kld']:.5f}, same top-1 {ppl['same_top1']:.2%}", flush=True)
    nll = {row["label"]: p["window_nll"] for row, p in zip(rows, scores, strict=True)}
    count = scores[0]["tokens"]
    for row in rows:
        if row["kind"] != "plan":
            continue
        # the smallest uniform file at least as large: the one the plan must beat; paired over windows
        rival = min((r for r in rows if r["kind"] == "uniform" and r["expert_bytes"] >= row["expert_bytes"]),
                    key=lambda r: r["expert_bytes"], default=None)
        if rival is not None:
            row["vs_uniform"] = {"label": rival["label"],
                                 **paired_difference(nll[row["label"]], nll[rival["label"]], count)}

    result = {"kind": "quality", "model": str(Path(args.model).relative_to(ROOT)
                                              if Path(args.model).is_relative_to(ROOT) else args.model),
              "profile": {k: meta[k] for k in ("tokens", "samples_per_expert", "text")},
              "eval": {"text": "stdlib validation split", "tokens": args.tokens, "n_ctx": 512},
              "n_weights": n_weights, "types": costs["types"], "rows": rows, "unreachable": skipped,
              "runtime": runtime.runtime_info(), "date": time.strftime("%Y-%m-%d"),
              "python": platform.python_version(), "command": "python " + " ".join(sys.argv)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Quality at equal size: edgemoe's per-expert plans against uniform files and llama.cpp-style per-tensor mixes.

    python tools/quality_sweep.py                 # the quality fixture -> bench/results/quality.json
    python tools/quality_sweep.py --model M --tokens 32768 --bits 2.5 3

Profiles the model on the stdlib train split (`edgemoe profile`), derives each expert's importance matrices
from that profile (imatrix.py) and measures every expert's cost at every pair of types (plan.py). Then it
writes, all with the same importance matrices:
- a uniform file at every type a plan can use (plans quantize an expert tensor without its importance matrix
  where measure_costs found that better; uniform files use it everywhere) (and Q2_K-Q4_K without importance matrices, to show their effect);
- edgemoe's plans at the given average bits, the same budgets with one type per expert, and with each layer's
  costs calibrated to KL (calibrate.py, on the train split);
- for each plan, the smallest llama.cpp-style mix at least as large: gate and up at one type, down at a type
  up to three steps higher, the same in every expert.
Every file is verified (`edgemoe verify`) and scored on the same windows of the validation split, with the
source as the reference (`edgemoe ppl --reference`): perplexity, KL divergence from the source's next-token
distribution, top-1 agreement. Each plan is compared window by window with its rivals (the smallest uniform
file and the smallest mix at least as large): the mean difference in log-likelihood and in KL per token, and
the standard errors of those paired differences. The files go to --work and are not kept in git.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from edgemoe_llamacpp import files, runtime
from edgemoe_llamacpp.convert.calibrate import calibrated, layer_scales
from edgemoe_llamacpp.convert.imatrix import from_profile
from edgemoe_llamacpp.convert.plan import imatrix_off, make_plan, measure_costs
from edgemoe_llamacpp.convert.profile import Profile
from edgemoe_llamacpp.convert.record import profile
from edgemoe_llamacpp.convert.rewrite import convert, uniform_plan
from edgemoe_llamacpp.convert.verify import verify
from edgemoe_llamacpp.engine.perplexity import paired_difference, perplexities
from edgemoe_llamacpp.errors import BudgetError
from edgemoe_llamacpp.gguf import quant
from edgemoe_llamacpp.gguf.layout import read_layout

ROOT = Path(__file__).resolve().parent.parent
WITHOUT_IMATRIX = ("Q2_K", "Q3_K", "Q4_K")
MIX_STEPS = 3             # a mix's down type is one to this many types above its gate/up type


def mixes(costs: dict) -> list[tuple[str, str, int]]:
    """(gate/up type, down type, expert bytes) of every llama.cpp-style mix of the planned types."""
    types = costs["types"]
    order = sorted(range(len(types)), key=lambda i: quant.bits_per_weight(types[i]))
    n_expert = costs["cost"].shape[1]
    out = []
    for j, a in enumerate(order):
        for b in order[j + 1:j + 1 + MIX_STEPS]:
            out.append((types[a], types[b], int(costs["nbytes"][:, a, b].sum()) * n_expert))
    return out


def mix_plan(layout, gu: str, down: str) -> dict:
    return {t.name: [down if t.name.split(".")[2] == "ffn_down_exps" else gu] * t.count
            for t in layout.expert_tensors}


def predicted(costs: dict, plan: dict) -> float | None:
    """The planner's summed cost of a file's plan (expert tensor -> type per expert): in nats of KL per token
    when `costs` are calibrated, so it can be read beside the measured KL of every file, not only of the plans."""
    types, layers, cost = costs["types"], costs["layers"], costs["cost"]
    if any(t not in types for ts in plan.values() for t in ts):
        return None
    total = 0.0
    for name, per_expert in plan.items():
        if name.split(".")[2] != "ffn_down_exps":
            continue
        layer = int(name.split(".")[1])
        gu = plan[name.replace("ffn_down_exps", "ffn_gate_exps")]
        li = layers.index(layer)
        total += sum(float(cost[li, e, types.index(a), types.index(b)])
                     for e, (a, b) in enumerate(zip(gu, per_expert, strict=True)))
    return total


def rival(rows: list[dict], kind: str, nbytes: int) -> dict | None:
    """The smallest file of `kind` at least `nbytes` large; of files that size (IQ3_S and Q3_K are both 3.4375
    bits), the one closest to the source (lowest KL), the stronger rival."""
    return min((r for r in rows if r["kind"] == kind and r["expert_bytes"] >= nbytes),
               key=lambda r: (r["expert_bytes"], r["kld"]), default=None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "tests/fixtures/quality-moe-f16.gguf"),
                    help="the source (default: the quality fixture, tools/make_tiny_moe.py --dtype F16)")
    ap.add_argument("--work", type=Path, default=ROOT / "build/quality")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/quality.json")
    ap.add_argument("--tokens", type=int, default=102400, help="validation tokens scored per file")
    ap.add_argument("--profile-tokens", type=int, default=16384)
    ap.add_argument("--profile-samples", type=int, default=256, help="FFN inputs sampled per expert: each expert's "
                    "costs and importance matrices are measured on them")
    ap.add_argument("--bits", type=float, nargs="+", default=[2.5, 2.75, 3.0, 3.5, 4.0])
    ap.add_argument("--types", nargs="+", default=list(quant.PLAN_TYPES), choices=quant.PLAN_TYPES,
                    help="the types plans, uniform files and mixes use (default: all)")
    ap.add_argument("--uniform", nargs="+", choices=quant.PLAN_TYPES, help="uniform files at these types "
                    "(default: every type in --types)")
    ap.add_argument("--no-imatrix", nargs="*", default=list(WITHOUT_IMATRIX), choices=quant.PLAN_TYPES,
                    help="uniform files at these types without importance matrices too")
    ap.add_argument("--variants", nargs="*", default=["plan-one-type", "plan-calibrated"],
                    choices=["plan-one-type", "plan-calibrated"], help="plans made otherwise, beside each plan")
    ap.add_argument("--calibration-type", default="Q2_K", help="the type each layer is probed at (calibrate.py)")
    ap.add_argument("--calibration-tokens", type=int, default=16384, help="train-split tokens per probe")
    args = ap.parse_args()
    files.tool_output(args.out)
    if not Path(args.model).exists():
        sys.exit(f"error: {args.model} does not exist; the quality fixture is made with tools/make_tiny_moe.py "
                 "(README: the quality fixture)")
    if not runtime.patched():
        sys.exit("error: per-expert plans need the patched runtime: python tools/build_runtime.py")
    args.work.mkdir(parents=True, exist_ok=True)

    prof_path = args.work / "profile.npz"
    meta = profile(args.model, prof_path, tokens=args.profile_tokens, samples=args.profile_samples)
    layout = read_layout(args.model)
    prof = Profile(prof_path, layout)
    imatrix = from_profile(prof, layout)
    costs = measure_costs(args.model, prof, types=args.types, imatrix=imatrix)
    n_weights = costs["n_weights"]
    scales = kl_costs = None                                            # kl_costs: every file's cost in nats of KL
    variants = [("plan", "", costs, True)]
    if "plan-one-type" in args.variants:
        variants.append(("plan-one-type", ", one type per expert", costs, False))
    if "plan-calibrated" in args.variants:
        scales = layer_scales(args.model, costs, args.calibration_type, tokens=args.calibration_tokens,
                              imatrix=imatrix)
        kl_costs = calibrated(costs, scales)
        variants.append(("plan-calibrated", ", layer-calibrated", kl_costs, True))

    models: list[dict] = [{"kind": "source", "label": "source", "path": Path(args.model)}]

    def add(kind: str, label: str, name: str, plan: dict, method: str, use_imatrix: bool = True, off=None,
            **extra) -> None:
        path = args.work / name
        convert(args.model, path, plan, meta={"plan.method": method}, force=True,
                imatrix=imatrix if use_imatrix else None, imatrix_off=off if use_imatrix else None)
        models.append({"kind": kind, "label": label, "path": path, "imatrix": use_imatrix,
                      "predicted_kld": predicted(kl_costs, plan) if kl_costs else None, **extra})

    for tn in args.uniform or costs["types"]:
        add("uniform", f"uniform {tn}", f"uniform-{tn}.gguf", uniform_plan(layout, tn), f"uniform {tn}")
    for tn in args.no_imatrix:
        add("uniform-no-imatrix", f"uniform {tn}, no imatrix", f"uniform-{tn}-noimatrix.gguf",
            uniform_plan(layout, tn), f"uniform {tn}", use_imatrix=False)
    all_mixes, used_mixes, skipped = mixes(costs), set(), []
    for bits in args.bits:
        for kind, suffix, variant_costs, per_tensor in variants:
            label = f"edgemoe {bits:g} bits{suffix}"
            try:
                plan, report = make_plan(variant_costs, expert_bits=bits, per_tensor=per_tensor)
            except BudgetError as e:
                skipped.append({"label": label, "reason": str(e)})
                continue
            off = imatrix_off(costs, plan)
            report["imatrix_off"] = sum(map(sum, off.values()))
            add(kind, label, f"{kind}-{bits:g}bits.gguf", plan, "measured output error (edgemoe plan)",
                off=off, target_bits=bits, report=report)
        mix = min((m for m in all_mixes if m[2] >= bits * n_weights / 8), key=lambda m: m[2], default=None)
        if mix is not None and mix[:2] not in used_mixes:
            used_mixes.add(mix[:2])
            add("mix", f"mix {mix[0]} gate/up, {mix[1]} down", f"mix-{mix[0]}-{mix[1]}.gguf",
                mix_plan(layout, *mix[:2]), f"mix {mix[0]}/{mix[1]}")

    checks = {str(f["path"]): verify(str(f["path"])) for f in models if f["kind"] != "source"}
    # a mixed file's experts are page-aligned slots; a uniform file is packed as stock llama.cpp loads it
    bad = {p: c for p, c in checks.items()
           if c.get("checksums") != "ok" or (c.get("mixed") and c.get("unaligned_expert_ranges"))}
    if bad:
        sys.exit(f"error: files failed edgemoe verify: {sorted(bad)}")

    # every file scored on the same windows in one pass, the source evaluated once per window
    scores = perplexities([str(f["path"]) for f in models], tokens=args.tokens, reference=args.model)
    rows, windows = [], {}
    for f, ppl in zip(models, scores, strict=True):
        out = read_layout(f["path"])
        report = f.get("report") or {}
        row = {"kind": f["kind"], "label": f["label"], "file": f["path"].name, "expert_bytes": out.expert_bytes,
               "bits_per_weight": 8 * out.expert_bytes / n_weights, "target_bits": f.get("target_bits"),
               "imatrix": f.get("imatrix"), "perplexity": ppl["perplexity"], "tokens": ppl["tokens"],
               "kld": ppl["kld"], "same_top1": ppl["same_top1"], "schemes": report.get("schemes"),
               "planned_cost": report.get("cost"),
               "predicted_kld": f.get("predicted_kld"), "imatrix_off": report.get("imatrix_off"),
               "verify": None if f["kind"] == "source" else checks[str(f["path"])].get("checksums")}
        rows.append(row)
        windows[row["label"]] = ppl
        print(f"{row['label']:>40}: {row['bits_per_weight']:.3f} bits, ppl {row['perplexity']:.4f}, "
              f"KLD {row['kld']:.5f}, same top-1 {row['same_top1']:.2%}", flush=True)
    count = scores[0]["tokens"]
    source = rows[0]
    for row in rows[1:]:
        row["ppl_vs_source"] = row["perplexity"] / source["perplexity"] - 1
        if not row["kind"].startswith("plan"):
            continue
        for kind, key in (("uniform", "vs_uniform"), ("mix", "vs_mix")):
            other = rival(rows, kind, row["expert_bytes"])
            if other is None:
                continue
            a, b = windows[row["label"]], windows[other["label"]]
            nll = paired_difference(a["window_nll"], b["window_nll"], count)
            kld = paired_difference(a["window_kld"], b["window_kld"], count)
            row[key] = {"label": other["label"], "bytes_ratio": other["expert_bytes"] / row["expert_bytes"],
                        "delta_nll_per_token": nll["delta_nll_per_token"], "nll_standard_error": nll["standard_error"],
                        "delta_kld_per_token": kld["delta_nll_per_token"], "kld_standard_error": kld["standard_error"],
                        "wins_both_by_2se": (nll["delta_nll_per_token"] < -2 * nll["standard_error"]
                                             and kld["delta_nll_per_token"] < -2 * kld["standard_error"])}

    src = Path(args.model).resolve()
    result = {"kind": "quality", "model": str(src.relative_to(ROOT) if src.is_relative_to(ROOT) else src),
              "profile": {k: meta[k] for k in ("tokens", "samples_per_expert", "text")},
              "eval": {"text": "stdlib validation split", "tokens": count, "n_ctx": 512},
              "n_weights": n_weights, "types": costs["types"], "rows": rows, "unreachable": skipped,
              "calibration": scales and {"type": scales["type"], "tokens": scales["tokens"],
                                         "kld": scales["kld"].tolist(), "planned": scales["planned"].tolist(),
                                         "scale": scales["scale"].tolist()},
              "runtime": runtime.runtime_info(), "date": time.strftime("%Y-%m-%d"),
              "python": platform.python_version(), "command": "python " + " ".join(sys.argv)}
    files.write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

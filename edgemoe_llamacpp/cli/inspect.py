"""`edgemoe inspect`: the MoE layout of a GGUF: layers, experts, their types and byte ranges."""
from __future__ import annotations

import argparse
import json
import os

from edgemoe_llamacpp.cli.args import mib, runtime_line

HELP = "MoE layout of a GGUF: layers, experts, byte ranges"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="path to a GGUF file")
    p.add_argument("--json", action="store_true", help="print one JSON object with every expert's ranges")


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


def run(args: argparse.Namespace) -> int:
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
    print(f"  runtime: {runtime_line()}" + ("; this file has per-expert types" if layout.mixed else ""))
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

"""Layer calibration of the planner's cost: output error in each layer, in the evaluation's unit (KL).

plan.measure_costs measures how much an expert's quantization moves its own layer's output. What the
evaluation measures is the model's next-token distribution, and a unit of output error does not move it
equally in every layer: an early layer's error passes through every later layer and changes their routing,
a late layer's reaches the logits almost directly. So each layer's costs are scaled by a measured factor:

    scale(l) = KL(source || file with only layer l's experts at `type_name`) / sum_e cost(l, e, type_name)

the KL divergence of the next-token distribution, per token, on calibration text (the train split, never the
held-out text the plans are scored on), per unit of the planner's cost. With every layer's costs in nats of
KL, the planner's summed cost predicts the plan's KL, and minimising it minimises what the evaluation reads.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from edgemoe_llamacpp import corpus
from edgemoe_llamacpp.convert.rewrite import convert
from edgemoe_llamacpp.errors import EdgeMoEError
from edgemoe_llamacpp.gguf.layout import read_layout


def layer_files(model: str, layers: list[int], type_name: str, work: Path,
                imatrix: dict[str, np.ndarray] | None = None) -> list[Path]:
    """One file per MoE layer: that layer's experts at `type_name`, every other expert as in `model`."""
    layout = read_layout(model)
    out = []
    for layer in layers:
        plan = {t.name: [type_name if t.layer == layer else t.type] * t.count for t in layout.expert_tensors}
        path = work / f"layer-{layer}-{type_name}.gguf"
        convert(model, path, plan, force=True, progress=False, imatrix=imatrix)
        out.append(path)
    return out


def layer_scales(model: str, costs: dict, type_name: str = "Q2_K", *, tokens: int = 8192,
                 imatrix: dict[str, np.ndarray] | None = None, progress: bool = True) -> dict:
    """scale[l] per MoE layer (see the module's docstring), with the measured KL and the planned cost."""
    from edgemoe_llamacpp.engine.perplexity import perplexities

    if type_name not in costs["types"]:
        raise EdgeMoEError(f"calibration type {type_name} is not one of the measured types {costs['types']}")
    layout = read_layout(model)
    if layout.mixed:
        raise EdgeMoEError(f"{model}: calibration starts from a source file of one type per tensor")
    t = costs["types"].index(type_name)
    planned = costs["cost"][:, :, t, t].sum(axis=1)                     # [L]
    if (planned <= 0).any():
        raise EdgeMoEError("a layer has no measured cost at the calibration type: no profiled tokens reached it")
    with tempfile.TemporaryDirectory(prefix="edgemoe-calibrate-") as tmp:
        files = layer_files(model, costs["layers"], type_name, Path(tmp), imatrix)
        scores = perplexities([str(f) for f in files], texts=corpus.split_texts("train"), tokens=tokens,
                              reference=model, progress=progress)
    kld = np.array([s["kld"] for s in scores])
    return {"type": type_name, "tokens": scores[0]["tokens"], "kld": kld, "planned": planned,
            "scale": np.maximum(kld, 0.0) / planned}


def calibrated(costs: dict, scales: dict) -> dict:
    """`costs` with every layer's costs multiplied by its scale: in nats of KL per token."""
    return {**costs, "cost": costs["cost"] * scales["scale"][:, None, None, None], "calibration": scales}

"""The bit planner: quantization types per expert under a size budget, from measured importance.

Importance is measured, not guessed (EdgeMoE's principle). For every expert and every candidate scheme (a
type for gate and up, a type for down), the expert's weights are quantized with ggml's quantizer,
dequantized, and run on FFN inputs the profile sampled from tokens the router sent to that expert. The cost
of a scheme is the expected squared change of the layer's output per token that this expert causes:

    cost(l, e, a, b) = share(l, e) * mean_s( w_s^2 * || FFN_e^{a,b}(x_s) - FFN_e(x_s) ||^2 )

with share(l, e) the fraction of tokens that choose the expert, w_s the gate weight the sampled token gave
it and FFN_e the expert at the source file's precision. Every pair is run, not summed from per-tensor
costs: the three tensors' errors are far from independent (K-quants shrink weights coherently, and with
Q2_K the whole expert's cost is about 1.7x the sum of its tensors'). A different type for `down` is what
llama.cpp's own mixes do for every expert; here each expert gets the pair that its measured cost buys.
The planner minimises the summed cost under the byte budget: a Lagrangian search over cost + lambda * bytes
(each expert independently), then a greedy fill of what budget is left by the best cost reduction per byte.
With `per_tensor=False` each expert gets one type for all three tensors.

Each candidate is quantized as convert will write it: with the expert's importance matrix if one is given
(imatrix.py); without one, the types ggml cannot make without it (IQ2_XXS, IQ2_XS) are not candidates. An
importance matrix is a diagonal estimate of which rounding errors the sampled inputs see; where it misleads
(an expert whose down inputs have a few huge columns can lose at Q2_K), the tensor's own error on the sampled
inputs, || x (W_q - W)^T ||^2, decides per expert, tensor and K-quant type whether it is used (`imatrix_off`).
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np
from tqdm import tqdm

from edgemoe_llamacpp.convert.imatrix import check as check_imatrix
from edgemoe_llamacpp.convert.profile import Profile
from edgemoe_llamacpp.errors import BudgetError, EdgeMoEError
from edgemoe_llamacpp.gguf import quant
from edgemoe_llamacpp.gguf.layout import MoELayout, read_layout
from edgemoe_llamacpp.gguf.shards import open_gguf

SWIGLU = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


class _Experts:
    """Float32 weights of one expert's gate/up/down at the source precision, from the GGUF."""

    def __init__(self, layout: MoELayout):
        self.layout = layout
        self.reader = open_gguf(layout.files)
        self.by_name = {t.name: t for t in self.reader.tensors}
        self.tensors: dict[tuple[int, str], object] = {}
        for t in layout.expert_tensors:
            kind = t.name.split(".")[2]
            if t.count != layout.n_expert or kind not in SWIGLU:
                raise EdgeMoEError(f"{layout.path}: the planner models SwiGLU experts stored as stacked "
                                   f"{'/'.join(SWIGLU)} tensors; {t.name} is not one")
            self.tensors[(t.layer, kind)] = self.by_name[t.name]

    def raw(self, layer: int, kind: str, expert: int) -> tuple[np.ndarray, str, int]:
        t = self.tensors[(layer, kind)]
        data = np.asarray(t.data).view(np.uint8).reshape(-1)
        per = data.size // int(t.shape[-1])
        return data[expert * per:(expert + 1) * per], t.tensor_type.name, int(t.shape[0])

    def weights(self, layer: int, expert: int, type_name: str | None = None,
                imatrix: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
        """[gate, up, down] as float32 rows; quantized to `type_name` (with `imatrix` if given) and back."""
        out = []
        for kind in SWIGLU:
            raw, src_type, row_len = self.raw(layer, kind, expert)
            w = quant.dequantize(raw, src_type, row_len)
            if type_name is not None and type_name != src_type:
                weights = None if imatrix is None else imatrix[self.tensors[(layer, kind)].name][expert]
                w = quant.dequantize(quant.quantize(w, type_name, weights), type_name, row_len)
            out.append(w)
        return out

    def n_weights(self, layer: int) -> int:
        return sum(int(np.prod(self.tensors[(layer, k)].shape[:-1])) for k in SWIGLU)

    def nbytes(self, layer: int, kind: str, type_name: str) -> int:
        """Bytes of one expert's `kind` tensor at `type_name`."""
        t = self.tensors[(layer, kind)]
        return int(np.prod(t.shape[1:-1])) * quant.row_bytes(type_name, int(t.shape[0]))


def _ffn(w: list[np.ndarray], x: np.ndarray) -> np.ndarray:
    gate, up, down = w
    return (_silu(x @ gate.T) * (x @ up.T)) @ down.T


def _each_expert(measure, layout: MoELayout, stop: threading.Event, progress: bool) -> None:
    """measure(li, layer, e) for every expert of every MoE layer, on a thread per core (ggml's quantizers and numpy's
    matmuls release the GIL), one expert each, with a progress bar. Interrupted or failed, `stop` is set: queued
    experts are never measured, and nothing waits for the ones being measured (they end at their next step)."""
    n_l, n_e = len(layout.moe_layers), layout.n_expert
    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
    try:
        with tqdm(total=n_l * n_e, desc="measure expert costs", unit="expert", disable=not progress) as bar:
            jobs = [pool.submit(measure, li, layer, e) for li, layer in enumerate(layout.moe_layers)
                    for e in range(n_e)]
            for job in as_completed(jobs):
                job.result()
                bar.update(1)
    except BaseException:
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def measure_costs(model: str, prof: Profile, types=quant.PLAN_TYPES, progress: bool = True,
                  imatrix: dict[str, np.ndarray] | None = None) -> dict:
    """cost[l, e, a, b] for every MoE layer l, expert e, gate/up type a and down type b, and nbytes[l, a, b]
    (one expert's three tensors), each type quantized with the per-expert importance matrices `imatrix` if
    given (imatrix.from_profile)."""
    layout = read_layout(model)
    if list(layout.moe_layers) != prof.meta["moe_layers"] or layout.n_expert != prof.meta["n_expert"]:
        raise EdgeMoEError(f"the profile was recorded on a model with other MoE layers or expert count "
                           f"({prof.meta['model']})")
    experts = _Experts(layout)
    if imatrix is not None:
        check_imatrix(imatrix, {t.name: (int(t.shape[-1]), int(t.shape[0])) for t in experts.tensors.values()})
    types = [t for t in types if all(quant.fits(t, int(experts.tensors[(layout.moe_layers[0], k)].shape[0]))
                                     for k in SWIGLU) and (imatrix is not None or not quant.requires_imatrix(t))]
    share = prof.expert_stats()["share"]
    n_l, n_e, n_t = len(layout.moe_layers), layout.n_expert, len(types)
    cost = np.zeros((n_l, n_e, n_t, n_t))
    off = np.zeros((n_l, n_e, len(SWIGLU), n_t), dtype=bool)          # quantized better without the imatrix
    # the K-quants are tried without the importance matrix too (the i-quants are built around one)
    both_ways = [imatrix is not None and t.endswith("_K") for t in types]
    stop = threading.Event()              # set on an interrupt: the experts being measured end at their next type

    def measure(li: int, layer: int, e: int) -> None:
        n = int(prof.input_count[li, e])
        if not n:
            return
        x = prof.inputs[li, e, :n].astype(np.float32)
        w2 = prof.input_weights[li, e, :n].astype(np.float64) ** 2
        src = experts.weights(layer, e)
        h_src = _silu(x @ src[0].T) * (x @ src[1].T)
        ref = h_src @ src[2].T                                  # _ffn(src, x)
        x_k = (x, x, h_src)                                     # what each tensor's rows multiply
        quantized = []
        for ti, t in enumerate(types):
            if stop.is_set():
                return
            q = experts.weights(layer, e, t, imatrix)
            if both_ways[ti]:
                plain = experts.weights(layer, e, t)
                for k in range(len(SWIGLU)):
                    err = [float(np.square(x_k[k] @ (w[k] - src[k]).T).sum()) for w in (q, plain)]
                    if err[1] < err[0]:
                        q[k], off[li, e, k, ti] = plain[k], True
            quantized.append(q)
        for a, (gate, up, _) in enumerate(quantized):
            if stop.is_set():
                return
            h = _silu(x @ gate.T) * (x @ up.T)
            for b, (_, _, down) in enumerate(quantized):
                d = (h @ down.T - ref).astype(np.float64)
                cost[li, e, a, b] = share[li, e] * float(np.mean(w2 * (d ** 2).sum(1)))

    _each_expert(measure, layout, stop, progress)
    nb = np.array([[[experts.nbytes(layer, k, t) for t in types] for k in SWIGLU] for layer in layout.moe_layers])
    nbytes = (nb[:, 0] + nb[:, 1])[:, :, None] + nb[:, 2][:, None, :]
    n_weights = sum(experts.n_weights(layer) for layer in layout.moe_layers) * n_e
    return {"types": types, "cost": cost, "nbytes": nbytes, "n_weights": n_weights,
            "layers": list(layout.moe_layers), "layout": layout, "imatrix_off": off}


def choose(cost: np.ndarray, nbytes: np.ndarray, budget: int) -> np.ndarray:
    """Type index per item (cost[..., t]: the cost of type t; nbytes broadcasts to cost's shape) minimising
    summed cost with summed bytes <= budget."""
    size = np.broadcast_to(nbytes, cost.shape).astype(np.float64)
    if size.min(axis=-1).sum() > budget:
        raise BudgetError(f"the smallest type for every expert takes {int(size.min(axis=-1).sum()):,} bytes, "
                          f"more than the budget of {budget:,}")
    shape = cost.shape[:-1]
    cost, size = cost.reshape(-1, cost.shape[-1]), size.reshape(-1, size.shape[-1])
    rows = np.arange(len(cost))

    def pick(lam: float) -> np.ndarray:
        return np.argmin(cost + lam * size, axis=1)

    def used(idx: np.ndarray) -> float:
        return float(size[rows, idx].sum())

    lo, hi = 0.0, 1.0
    while used(pick(hi)) > budget:
        hi *= 4
    if used(pick(lo)) <= budget:
        return pick(lo).reshape(shape)
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if used(pick(mid)) <= budget else (mid, hi)
    idx = pick(hi)
    left = budget - used(idx)
    while True:                     # greedy fill: the best cost cut per extra byte that still fits
        extra = size - size[rows, idx][:, None]
        gain = cost[rows, idx][:, None] - cost
        ok = (extra > 0) & (extra <= left) & (gain > 0)
        if not ok.any():
            return idx.reshape(shape)
        ratio = np.where(ok, gain / np.where(ok, extra, 1), -1.0)
        i, t = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
        left -= extra[i, t]
        idx[i] = t


def make_plan(costs: dict, *, expert_bits: float | None = None, size: int | None = None,
              per_tensor: bool = True) -> tuple[dict, dict]:
    """(plan: expert tensor -> type per expert, report) for an average bits per weight or a byte size; with
    per_tensor=False, one type for all three tensors of an expert."""
    if (expert_bits is None) == (size is None):
        raise ValueError("give exactly one of expert_bits and size")
    budget = int(size if size is not None else expert_bits * costs["n_weights"] / 8)
    cost, nbytes = costs["cost"], costs["nbytes"][:, None]             # [L, E, T, T], [L, 1, T, T]
    n_l, n_e, n_t = cost.shape[:3]
    if per_tensor:
        flat = choose(cost.reshape(n_l, n_e, -1), nbytes.reshape(n_l, 1, -1), budget)
        gu, down = flat // n_t, flat % n_t
    else:
        diag = np.arange(n_t)
        gu = down = choose(cost[..., diag, diag], nbytes[..., diag, diag], budget)
    types = costs["types"]
    layout: MoELayout = costs["layout"]
    plan = {}
    for t in layout.expert_tensors:
        li = costs["layers"].index(t.layer)
        plan[t.name] = [types[i] for i in (down if t.name.split(".")[2] == "ffn_down_exps" else gu)[li]]
    chosen = (np.arange(n_l)[:, None], np.arange(n_e), gu, down)
    used = int(np.broadcast_to(nbytes, cost.shape)[chosen].sum())
    schemes: dict[str, int] = {}
    for a, b in zip(gu.ravel(), down.ravel(), strict=True):
        key = types[a] if a == b else f"{types[a]}/{types[b]}"
        schemes[key] = schemes.get(key, 0) + 1
    report = {"budget_bytes": budget, "expert_bytes": used, "bits_per_weight": 8 * used / costs["n_weights"],
              "type_counts": {tn: sum(ts.count(tn) for ts in plan.values()) for tn in types},
              "schemes": dict(sorted(schemes.items(), key=lambda kv: -kv[1])), "per_tensor": per_tensor,
              "cost": float(cost[chosen].sum())}
    return plan, report


def imatrix_off(costs: dict, plan: dict) -> dict[str, list[bool]]:
    """For convert: per expert tensor, which experts' planned types measure_costs found better quantized without
    the importance matrix."""
    types, off = costs["types"], costs["imatrix_off"]
    out = {}
    for t in costs["layout"].expert_tensors:
        li, k = costs["layers"].index(t.layer), SWIGLU.index(t.name.split(".")[2])
        out[t.name] = [bool(off[li, e, k, types.index(tn)]) for e, tn in enumerate(plan[t.name])]
    return out

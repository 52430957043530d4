"""Low-bit substitution on a miss (HOBBIT): which chosen experts may run from their low-bit copies, and
pointing the patched kernel at them.

HOBBIT's rule: rank a token's chosen experts by gate weight; an expert's `above` is the weight of the experts
ranked above it (the top-1 has 0). A missed expert whose `above` exceeds the threshold contributes little to
the output, so it runs from the low-bit copy (fewer bytes to read) instead of full precision. In a prompt
batch an expert runs low only if it is minor for every token that chose it.
"""
from __future__ import annotations

import numpy as np

from edgemoe_llamacpp import runtime
from edgemoe_llamacpp.gguf import quant
from edgemoe_llamacpp.gguf.layout import MoELayout

DEFAULT_THRESHOLD = 0.6      # HOBBIT's T1 for Mixtral (top-2): the second expert runs low when the first has > 60%


def weight_above(ids: np.ndarray, weights: np.ndarray) -> dict[int, float]:
    """expert -> the least, over the tokens that chose it, gate weight of the experts ranked above it.
    ids, weights: (T, k), weights renormalised over the k chosen."""
    order = np.argsort(-weights, axis=1, kind="stable")
    w = np.take_along_axis(weights, order, axis=1)
    above = np.cumsum(w, axis=1) - w
    ranked = np.take_along_axis(ids, order, axis=1)
    out: dict[int, float] = {}
    for e, a in zip(ranked.ravel().tolist(), above.ravel().tolist(), strict=True):
        out[e] = min(a, out.get(e, a))
    return out


class ExpertPointers:
    """Where the patched kernel reads each expert of each stacked tensor: its full-precision slot or its
    low-bit copy. Every stacked tensor is registered with the kernel (llama.Llama does that)."""

    def __init__(self, layout: MoELayout, bases: list[int]):
        """`bases`: per file of the model, the address of its offset 0 in llama.cpp's mapping."""
        # layer -> its stacked tensors: (base, per expert: full type, full pointer; copy type, copy pointer)
        self.tensors: dict[int, list[tuple[int, list[int], list[int], int, list[int]]]] = {}
        for t in layout.expert_tensors:
            if t.low is None:
                continue
            full = [t.slice(e) for e in range(t.first_expert, t.first_expert + t.count)]
            copies = [t.low_slice(e) for e in range(t.first_expert, t.first_expert + t.count)]
            self.tensors.setdefault(t.layer, []).append(
                (bases[t.file] + t.offset, [int(quant.qtype(r.type)) for r in full],
                 [bases[r.file] + r.offset for r in full],
                 int(quant.qtype(t.low.type)), [bases[r.file] + r.offset for r in copies]))
        self.low: dict[int, set[int]] = {layer: set() for layer in self.tensors}   # experts pointed low now
        self.generation = runtime.registry_generation()

    def point(self, layer: int, experts, low: set[int]) -> None:
        """Before layer `layer` computes: `experts` in `low` read their low-bit copies, the others their slots."""
        if runtime.registry_generation() != self.generation:     # re-registered: every pointer is full again
            self.generation = runtime.registry_generation()
            self.low = {layer: set() for layer in self.tensors}
        now = self.low[layer]
        for e in experts:
            e = int(e)
            want = e in low
            if want == (e in now):
                continue
            for base, types, ptrs, low_type, low_ptrs in self.tensors[layer]:
                if want:
                    runtime.set_expert(base, e, low_type, low_ptrs[e])
                else:
                    runtime.set_expert(base, e, types[e], ptrs[e])
            (now.add if want else now.discard)(e)

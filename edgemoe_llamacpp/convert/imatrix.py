"""Importance matrices per expert from a profile, in llama.cpp's imatrix convention.

A stacked expert tensor's rows each multiply an input vector x: the FFN input for gate and up, act(gate) * up
for down. Expert e's importance of column j is the mean of x_j^2 over the tokens routed to e, which is what
`ggml_quantize_chunk` takes as its `imatrix` (one row of n_per_row values per expert) to weight each value's
rounding error. The mean here runs over the profile's reservoir sample of those tokens (`inputs` and
`down_inputs`, up to S per expert): an unbiased estimate of the mean over all of them. An expert the profile
never saw gets ones (no evidence: every column alike), as llama.cpp does for an expert without data.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from edgemoe_llamacpp.errors import EdgeMoEError
from edgemoe_llamacpp.gguf.layout import MoELayout

if TYPE_CHECKING:
    from edgemoe_llamacpp.convert.profile import Profile

DOWN = "ffn_down_exps"          # the stacked tensor whose rows multiply act(gate) * up; the others multiply x


def mean_squares(samples: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """samples [..., S, n], counts [...] -> float32 [..., n]: per column, the mean square of the first counts[...]
    samples; 1 where a count is 0."""
    filled = np.arange(samples.shape[-2]) < counts[..., None]                     # [..., S]
    x = samples.astype(np.float64)
    sums = np.einsum("...sn,...s->...n", x * x, filled.astype(np.float64))
    n = counts[..., None].astype(np.float64)
    return np.where(n > 0, sums / np.maximum(n, 1), 1.0).astype(np.float32)


def from_profile(prof: Profile, layout: MoELayout) -> dict[str, np.ndarray]:
    """Stacked expert tensor name -> float32 [n_expert, n_per_row], for every stacked tensor of `layout`."""
    layers = list(prof.meta["moe_layers"])
    if list(layout.moe_layers) != layers or layout.n_expert != prof.meta["n_expert"]:
        raise EdgeMoEError(f"the profile was recorded on a model with other MoE layers or expert count "
                           f"({prof.meta.get('model')}) than {layout.path}")
    ffn_in = mean_squares(prof.inputs, prof.input_count)                          # [n_l, n_e, n_embd]
    down_in = mean_squares(prof.down_inputs, prof.input_count)                    # [n_l, n_e, n_ff]
    out = {}
    for t in layout.expert_tensors:
        if t.count != layout.n_expert:
            continue
        out[t.name] = (down_in if t.name.split(".")[2] == DOWN else ffn_in)[layers.index(t.layer)]
    return out


def check(imatrix: dict[str, np.ndarray], shapes: dict[str, tuple[int, int]]) -> None:
    """Every tensor of `shapes` (name -> (n_expert, n_per_row)) has an importance matrix of that shape."""
    for name, shape in shapes.items():
        m = imatrix.get(name)
        if m is None or m.shape != shape:
            raise EdgeMoEError(f"the importance matrices do not fit {name}: want {shape}, got "
                               f"{None if m is None else m.shape} (a profile of another model?)")

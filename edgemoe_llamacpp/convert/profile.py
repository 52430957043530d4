"""The profile file: how a model's routers used its experts on calibration text (`edgemoe profile` writes it,
convert.record; the planner, imatrix and calibration read it). Nothing here needs llama.cpp.

The profile is one `.npz` file (numpy.load) holding:
    meta            JSON string: model, model_sha256, arch, moe_layers, n_expert, n_expert_used, n_embd,
                    tokens, windows, n_ctx, samples_per_expert, text, format ("edgemoe-profile", 1)
    ids             int16   [tokens, n_moe_layers, k]   chosen experts of every token, in router order
    weights         float32 [tokens, n_moe_layers, k]   their gate weights (router probabilities of the
                                                        chosen experts, renormalised to sum to 1)
    inputs          float16 [n_moe_layers, n_expert, S, n_embd]  FFN inputs (the `ffn_norm-N` node) of up
                                                        to S tokens routed to each expert (reservoir sample)
    input_weights   float32 [n_moe_layers, n_expert, S] the gate weight each sampled token gave the expert
    input_count     int32   [n_moe_layers, n_expert]    how many of the S samples are filled
    down_inputs     float16 [n_moe_layers, n_expert, S, n_ff]  for the same sampled tokens, what the expert's
                                                        down projection multiplies (act(gate) * up, the
                                                        `ffn_moe_down-N` node's input); imatrix.py needs it
Per-expert statistics (use counts, mean gate weight) follow from ids and weights; `expert_stats` computes them.
"""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np

from edgemoe_llamacpp import files
from edgemoe_llamacpp.errors import EdgeMoEError
from edgemoe_llamacpp.gguf.layout import MoELayout

FORMAT = ("edgemoe-profile", 2)         # 2: down_inputs
ZIP_MAGIC = b"PK"             # an .npz file is a zip archive


def write_profile(out: str | Path, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    """Write a profile atomically: `meta` (saying this FORMAT) and the ARRAYS of Profile."""
    missing = set(Profile.ARRAYS) - set(arrays)
    if missing or meta.get("format") != list(FORMAT):
        raise ValueError(f"a profile of format {list(FORMAT)} needs {sorted(Profile.ARRAYS)}")
    with files.atomic_output(Path(out)) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, meta=json.dumps(meta), **arrays)


class Profile:
    """A profile file, checked: a garbage, truncated or foreign file raises EdgeMoEError, not a traceback.
    With `layout`, also that its layers, expert count and ids fit that model."""

    ARRAYS = ("ids", "weights", "inputs", "input_weights", "input_count", "down_inputs")
    INTEGERS = ("ids", "input_count")           # the others hold floating-point numbers

    def __init__(self, path: str | Path, layout: MoELayout | None = None):
        data = files.read_bytes(path, "profile")
        if not data.startswith(ZIP_MAGIC):
            raise EdgeMoEError(f"{path}: not an edgemoe profile (a profile is an .npz file, a zip archive; "
                               f"this one starts with {data[:8]!r})")
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                self.meta = json.loads(str(z["meta"]))
                fmt = tuple(self.meta.get("format", ())) if isinstance(self.meta, dict) else None
                if fmt != FORMAT:
                    older = fmt is not None and len(fmt) == 2 and fmt[0] == FORMAT[0] and fmt[1] in range(FORMAT[1])
                    raise EdgeMoEError(
                        f"{path}: a profile of format {fmt[1]}, from an older edgemoe (this one reads {FORMAT[1]}: "
                        f"it records the down projections' inputs too); record it again with edgemoe profile"
                        if older else f"{path}: not an edgemoe profile (format {fmt!r})")
                for name in self.ARRAYS:
                    setattr(self, name, z[name])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, TypeError) as e:
            raise EdgeMoEError(f"{path}: not a readable edgemoe profile ({str(e)[:120] or type(e).__name__})") \
                from None
        self._check(path, layout)

    def _check(self, path, layout: MoELayout | None) -> None:
        def bad(why: str):
            return EdgeMoEError(f"{path}: damaged profile: {why}")

        try:
            n_l, n_e = len(self.meta["moe_layers"]), int(self.meta["n_expert"])
        except (KeyError, TypeError, ValueError):
            raise bad("its metadata lacks moe_layers or n_expert") from None
        for name in self.ARRAYS:
            kind = getattr(self, name).dtype.kind
            if kind not in ("iu" if name in self.INTEGERS else "f"):
                raise bad(f"{name} is an array of {getattr(self, name).dtype}, not of "
                          f"{'integers' if name in self.INTEGERS else 'floating-point numbers'}")
        if self.ids.ndim != 3 or self.ids.shape[1] != n_l or self.weights.shape != self.ids.shape:
            raise bad(f"ids {self.ids.shape} and weights {self.weights.shape} are not [tokens, {n_l}, k]")
        if self.inputs.ndim != 4 or self.inputs.shape[:2] != (n_l, n_e) or \
                self.input_weights.shape != self.inputs.shape[:3] or self.input_count.shape != (n_l, n_e) or \
                self.down_inputs.ndim != 4 or self.down_inputs.shape[:3] != self.inputs.shape[:3]:
            raise bad(f"sample arrays {self.inputs.shape}, {self.input_weights.shape}, {self.input_count.shape}, "
                      f"{self.down_inputs.shape} do not fit {n_l} layers x {n_e} experts")
        if not self.ids.shape[0]:
            raise bad("it holds no tokens")
        if self.ids.size and (self.ids.min() < 0 or self.ids.max() >= n_e):
            raise bad(f"expert ids outside [0, {n_e})")
        if self.input_count.size and (self.input_count.min() < 0 or self.input_count.max() > self.inputs.shape[2]):
            raise bad(f"sample counts outside [0, {self.inputs.shape[2]}]")
        for name in ("weights", "input_weights"):
            if not np.isfinite(getattr(self, name)).all():
                raise bad(f"{name} are not all finite")
        if layout is not None and (list(layout.moe_layers) != list(self.meta["moe_layers"])
                                   or layout.n_expert != n_e):
            raise EdgeMoEError(f"{path} was recorded on a model with other MoE layers or expert count "
                               f"({self.meta.get('model')}) than {layout.path}")

    def expert_stats(self) -> dict[str, np.ndarray]:
        """Per (MoE layer, expert): share of tokens routing to it, and its mean gate weight when chosen."""
        n_tok, n_l, _ = self.ids.shape
        n_e = self.meta["n_expert"]
        count = np.zeros((n_l, n_e))
        wsum = np.zeros((n_l, n_e))
        for li in range(n_l):
            np.add.at(count[li], self.ids[:, li].ravel(), 1)
            np.add.at(wsum[li], self.ids[:, li].ravel(), self.weights[:, li].ravel())
        return {"share": count / n_tok, "mean_weight": np.divide(wsum, count, out=np.zeros_like(wsum),
                                                                  where=count > 0)}

"""`edgemoe profile`: run calibration text through llama.cpp and record how the routers use the experts.

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
import time
import zipfile
from pathlib import Path

import numpy as np
import psutil
from tqdm import tqdm

from edgemoe_llamacpp import corpus, files
from edgemoe_llamacpp.engine.hook import ExpertHook
from edgemoe_llamacpp.errors import EdgeMoEError
from edgemoe_llamacpp.files import sha256_files
from edgemoe_llamacpp.gguf.layout import MoELayout, read_layout
from edgemoe_llamacpp.gguf.shards import open_gguf

FORMAT = ("edgemoe-profile", 2)         # 2: down_inputs
ZIP_MAGIC = b"PK"             # an .npz file is a zip archive
# the node holding the FFN input, per architecture (llama.cpp's build_* names it)
FFN_INPUT = {"gpt-oss": "attn_post_norm"}


class _Recorder:
    """Keeps what ExpertHook hands over: every token's routing, and a reservoir sample of each expert's inputs."""

    def __init__(self, layout: MoELayout, n_embd: int, samples: int, seed: int):
        self.layers = {layer: i for i, layer in enumerate(layout.moe_layers)}
        n_l, n_e = len(self.layers), layout.n_expert
        self.inputs = np.zeros((n_l, n_e, samples, n_embd), np.float16)
        self.input_weights = np.zeros((n_l, n_e, samples), np.float32)
        self.seen = np.zeros((n_l, n_e), np.int64)
        self.down_inputs = np.zeros((n_l, n_e, samples, 0), np.float16)   # sized by the first down projection
        self.pending: dict[int, list[tuple[int, int, int, int]]] = {}     # layer -> (token, j, expert, slot)
        self.ids: list[list[np.ndarray]] = [[] for _ in range(n_l)]
        self.weights: list[list[np.ndarray]] = [[] for _ in range(n_l)]
        self.rng = np.random.default_rng(seed)

    def route(self, layer: int, ids: np.ndarray, x: np.ndarray, w: np.ndarray) -> None:
        li = self.layers.get(layer)
        if li is None:
            return
        if not (len(ids) == len(w) == len(x)):
            raise RuntimeError(f"layer {layer}: {len(ids)} routed tokens, {len(w)} weights, {len(x)} inputs")
        self.ids[li].append(ids.astype(np.int16))
        self.weights[li].append(w.astype(np.float32))
        if li in self.pending:
            raise RuntimeError(f"layer {layer}: routed again before its down projection ran")
        cap = self.inputs.shape[2]
        taken = self.pending[li] = []
        for tok in range(len(ids)):
            for j, e in enumerate(ids[tok]):
                n = self.seen[li, e]
                slot = n if n < cap else self.rng.integers(0, n + 1)
                if slot < cap:
                    self.inputs[li, e, slot] = x[tok]
                    self.input_weights[li, e, slot] = w[tok, j]
                    taken.append((tok, j, int(e), int(slot)))
                self.seen[li, e] = n + 1

    def down(self, layer: int, ids: np.ndarray, x: np.ndarray) -> None:
        """The down projection's inputs x (T, k, n_ff) of the layer just routed: kept for the sampled tokens."""
        li = self.layers.get(layer)
        if li is None:
            return
        taken = self.pending.pop(li, None)
        if taken is None:
            raise RuntimeError(f"layer {layer}: a down projection ran without its routing")
        if x.shape[:2] != ids.shape or ids.shape[0] != len(self.ids[li][-1]) or \
                not np.array_equal(ids, self.ids[li][-1]):
            raise RuntimeError(f"layer {layer}: the down projection's experts {ids.shape} are not the ones routed")
        if not self.down_inputs.shape[3]:
            self.down_inputs = np.zeros((*self.inputs.shape[:3], x.shape[2]), np.float16)
        elif x.shape[2] != self.down_inputs.shape[3]:
            raise RuntimeError(f"layer {layer}: down projection inputs of {x.shape[2]} values, not "
                               f"{self.down_inputs.shape[3]}")
        for tok, j, e, slot in taken:
            self.down_inputs[li, e, slot] = x[tok, j]


def profile(model_path: str, out: str, *, texts=None, text_label: str = "stdlib train split",
            tokens: int = 16384, n_ctx: int = 512, samples: int = 256, seed: int = 0,
            progress: bool = True) -> dict:
    """Record routing and sampled FFN inputs of `tokens` tokens of calibration text; write the profile."""
    import llama_cpp

    from edgemoe_llamacpp.engine.generate import check_context_memory
    from edgemoe_llamacpp.engine.llama import llama_params, require_runtime_for

    files.check_output(out, inputs=[model_path], force=True, what="profile")   # replaced, as ever; never a FIFO
    layout = read_layout(model_path)
    require_runtime_for(layout)
    check_context_memory(model_path, n_ctx)
    if layout.mixed:
        raise EdgeMoEError(f"{model_path}: profile the source model, not a file with per-expert types")
    reader = open_gguf(layout.files)
    n_embd = int(reader.fields[f"{layout.arch}.embedding_length"].contents())
    n_ff = next((int(t.shape[0]) for t in reader.tensors if t.name.endswith("ffn_down_exps.weight")), n_embd)
    sample_bytes = len(layout.moe_layers) * layout.n_expert * samples * (n_embd + n_ff) * 2
    if sample_bytes > psutil.virtual_memory().available // 2:
        raise EdgeMoEError(f"{samples} samples per expert would take {sample_bytes:,} bytes of memory, more than "
                           f"half of what is available; ask for fewer (--samples)")
    rec = _Recorder(layout, n_embd, samples, seed)
    hook = ExpertHook(on_route=rec.route, hidden_node=FFN_INPUT.get(layout.arch, "ffn_norm"), want_weights=True,
                      on_down=rec.down)
    with llama_params(use_extra_bufts=False, **hook.cb_eval_args()):
        llm = llama_cpp.Llama(model_path=layout.path, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True,
                              verbose=False)
    try:
        ids = corpus.tokens(llm, texts if texts is not None else corpus.split_texts("train"), tokens)
        parts = corpus.windows(ids, n_ctx)
        for window in tqdm(parts, desc="profile", unit="window", disable=not progress):
            llm.reset()
            with hook.evaluation():
                llm.eval(window)
            if rec.pending:
                raise EdgeMoEError(f"{model_path}: no down projection input was seen for layers "
                                   f"{sorted(rec.pending)[:4]} (no `ffn_moe_down-N` node in this model's graph)")
    finally:
        llm.close()
    routed = np.stack([np.concatenate(x) for x in rec.ids], axis=1)
    weights = np.stack([np.concatenate(x) for x in rec.weights], axis=1)
    meta = {"format": list(FORMAT), "model": str(model_path), "model_sha256": sha256_files(layout.files),
            "arch": layout.arch, "moe_layers": list(layout.moe_layers), "n_expert": layout.n_expert,
            "n_expert_used": layout.n_expert_used, "n_embd": n_embd, "tokens": int(routed.shape[0]),
            "windows": len(parts), "n_ctx": n_ctx, "samples_per_expert": samples, "text": text_label,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with files.atomic_output(Path(out)) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, meta=json.dumps(meta), ids=routed, weights=weights, inputs=rec.inputs,
                            input_weights=rec.input_weights,
                            input_count=np.minimum(rec.seen, samples).astype(np.int32), down_inputs=rec.down_inputs)
    return meta


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

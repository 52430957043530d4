"""`edgemoe profile`: run calibration text through llama.cpp and record how the routers use the experts, into a
profile file (convert.profile, the format)."""
from __future__ import annotations

import time

import numpy as np
import psutil
from tqdm import tqdm

from edgemoe_llamacpp import corpus, files
from edgemoe_llamacpp.convert.profile import FORMAT, write_profile
from edgemoe_llamacpp.engine.hook import ExpertHook
from edgemoe_llamacpp.errors import EdgeMoEError
from edgemoe_llamacpp.files import sha256_files
from edgemoe_llamacpp.gguf.layout import MoELayout, read_layout
from edgemoe_llamacpp.gguf.shards import open_gguf

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
    write_profile(out, meta, {"ids": routed, "weights": weights, "inputs": rec.inputs,
                              "input_weights": rec.input_weights,
                              "input_count": np.minimum(rec.seen, samples).astype(np.int32),
                              "down_inputs": rec.down_inputs})
    return meta

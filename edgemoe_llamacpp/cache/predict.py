"""Expert predictors: the experts the next MoE layers will choose, guessed before their routers run.

One interface: `observe(layer, ids, hidden)` once a layer's router has chosen (ids: (T, k); hidden: (T, n_embd)
of the graph node named by `hidden_node`, or None), then `predict(layer, depth)`: the experts of the MoE
layer `depth` after `layer`, best first, for the last observed token. `scores(pos, depth, ids, hidden)` is
the batch form (T, n_expert) that tools/predictor_recall.py measures; `fit(routing)` learns from a profile.

- gate: the later layers' routers applied to this layer's FFN input (mixtral-offloading, Pre-gated MoE,
  HOBBIT). Routers and norms are read once from the GGUF and dequantized to float32.
- table: EdgeMoE's statistics: P(expert of layer +d | experts chosen at this layer), counted from routing.
- frequency: how often each expert of layer +d has been chosen.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import numpy as np

from edgemoe_llamacpp.errors import EdgeMoEError
from edgemoe_llamacpp.gguf.layout import MoELayout

PREDICTORS = ("gate", "table", "frequency")
MAX_DEPTH = 3                  # how many MoE layers ahead a predictor is asked about
FFN_INP = "ffn_inp"            # the residual stream before the FFN norm (llama.cpp node name, "-N" suffix)
FFN_NORM = "ffn_norm"          # the normed FFN input the router reads


@dataclass(frozen=True)
class Routers:
    """Every MoE layer's router and FFN norm, float32, in MoE-layer order."""
    gate: np.ndarray           # (L, n_expert, n_embd)
    norm: np.ndarray           # (L, n_embd)
    eps: float


def read_routers(path: str | os.PathLike, layout: MoELayout) -> Routers:
    """`blk.N.ffn_gate_inp.weight` and `blk.N.ffn_norm.weight` of each MoE layer, dequantized with gguf-py (from
    whichever of the layout's files holds them). Read with exact preads from the header's offsets: a memory map's
    read-around would bring in expert pages beside these small tensors, outside any budget."""
    from gguf.quants import dequantize

    from edgemoe_llamacpp.gguf.header import read_header

    headers = [read_header(file) for file in layout.files]
    where = {t.name: (i, t) for i, header in enumerate(headers) for t in header.tensors}
    eps_field = headers[0].fields.get(f"{layout.arch}.attention.layer_norm_rms_epsilon")

    def load(fds: list[int], name: str) -> np.ndarray:
        if name not in where:
            raise EdgeMoEError(f"{path}: gate lookahead needs tensor {name}, which the file lacks")
        i, t = where[name]
        raw = os.pread(fds[i], t.n_bytes, t.data_offset)
        rows = int(np.prod(t.shape[1:]))
        values = dequantize(np.frombuffer(raw, dtype=np.uint8).reshape(rows, -1), t.tensor_type)
        return values.astype(np.float32).reshape(t.shape[::-1].tolist())

    with contextlib.ExitStack() as stack:           # each file opened once
        fds = [stack.enter_context(open(file, "rb", buffering=0)).fileno() for file in layout.files]
        gate = np.stack([load(fds, f"blk.{n}.ffn_gate_inp.weight") for n in layout.moe_layers])
        norm = np.stack([load(fds, f"blk.{n}.ffn_norm.weight") for n in layout.moe_layers])
    eps = float(eps_field.contents()) if eps_field is not None else 1e-6
    return Routers(gate, norm, eps)


class Predictor:
    """Base: remembers the last observation per MoE layer; subclasses score the experts of a later layer."""
    name: str = ""                 # what statistics call it
    hidden_node: str | None = None

    def __init__(self, layout: MoELayout):
        self.pos = {layer: i for i, layer in enumerate(layout.moe_layers)}
        self.n_pos, self.n_expert = len(layout.moe_layers), layout.n_expert
        self._ids: list[np.ndarray | None] = [None] * self.n_pos
        self._hidden: list[np.ndarray | None] = [None] * self.n_pos

    def fit(self, routing: list[np.ndarray]) -> None:
        """Learn from a profile: routing[pos] is (N, k), the experts every MoE layer chose for N tokens."""

    def observe(self, layer: int, ids: np.ndarray, hidden: np.ndarray | None = None) -> None:
        pos = self.pos[layer]
        self._ids[pos], self._hidden[pos] = ids, hidden

    def predict(self, layer: int, depth: int) -> np.ndarray:
        """Experts of the MoE layer `depth` after `layer`, best first; empty past the last layer."""
        pos = self.pos[layer]
        ids, hidden = self._ids[pos], self._hidden[pos]
        if pos + depth >= self.n_pos or ids is None:
            return np.empty(0, dtype=np.int64)
        s = self.scores(pos, depth, ids[-1:], None if hidden is None else hidden[-1:])[0]
        return np.argsort(-s, kind="stable")

    def scores(self, pos: int, depth: int, ids: np.ndarray, hidden: np.ndarray | None) -> np.ndarray:
        """(T, n_expert) scores of the experts of MoE layer pos + depth; higher is likelier."""
        raise NotImplementedError


class GatePredictor(Predictor):
    """Layer pos+d's router applied to layer pos's FFN input. norm="own" (default) normalises the residual
    with layer pos+d's own ffn_norm weight, as that layer will; norm="current" reuses `ffn_norm-N` as is."""
    name = "gate"

    def __init__(self, layout: MoELayout, routers: Routers, *, norm: str = "own"):
        super().__init__(layout)
        if norm not in ("own", "current"):
            raise ValueError(f"norm must be 'own' or 'current', got {norm!r}")
        self.routers, self.norm = routers, norm
        self.hidden_node = FFN_INP if norm == "own" else FFN_NORM

    def scores(self, pos, depth, ids, hidden):
        if hidden is None:
            return np.zeros((len(ids), self.n_expert), dtype=np.float32)
        t = pos + depth
        x = hidden                                                          # (T, n_embd)
        if self.norm == "own":
            x = x / np.sqrt(np.mean(x * x, axis=1, keepdims=True) + self.routers.eps) * self.routers.norm[t]
        return x @ self.routers.gate[t].T                                   # (T, n_expert) router logits


class TablePredictor(Predictor):
    """EdgeMoE's table: counts[pos, d][i, j] = how often expert j of layer pos+d was chosen with expert i
    at layer pos. A prediction sums the rows (normalised) of the experts chosen at the `history` nearest
    earlier layers (2 by default: on the fixture's held-out text, recall@k at depth 1 was 0.48 with two,
    0.45 with one). Learns from a profile (`fit`) and keeps learning from what it observes."""
    name = "table"

    def __init__(self, layout: MoELayout, *, history: int = 2):
        super().__init__(layout)
        self.history = history
        self.counts = np.zeros((self.n_pos, MAX_DEPTH + history, self.n_expert, self.n_expert))
        self.freq = np.zeros((self.n_pos, self.n_expert))

    def _add(self, pos: int, depth: int, src: np.ndarray, dst: np.ndarray) -> None:
        """Count each token's pairs (expert chosen at pos, expert chosen at pos + depth), all in one bincount."""
        n = self.n_expert
        pairs = src.astype(np.intp)[:, :, None] * n + dst[:, None, :]          # (T, k, k) cells of the table
        self.counts[pos, depth - 1] += np.bincount(pairs.ravel(), minlength=n * n).reshape(n, n)

    def fit(self, routing):
        for pos, dst in enumerate(routing):
            self.freq[pos] += np.bincount(dst.ravel(), minlength=self.n_expert)
            for d in range(1, min(pos, self.counts.shape[1]) + 1):
                self._add(pos - d, d, routing[pos - d], dst)

    def observe(self, layer, ids, hidden=None):
        pos = self.pos[layer]
        self.freq[pos] += np.bincount(ids.ravel(), minlength=self.n_expert)
        for d in range(1, min(pos, self.counts.shape[1]) + 1):
            src = self._ids[pos - d]
            if src is not None and len(src) == len(ids):        # the same tokens, earlier in this eval
                self._add(pos - d, d, src, ids)
        super().observe(layer, ids, hidden)

    def scores(self, pos, depth, ids, hidden):
        t = pos + depth
        out = 1e-9 * self.freq[t][None, :].repeat(len(ids), 0)              # ties go to the frequent
        for h in range(self.history):
            src = ids if h == 0 else (self._ids[pos - h] if pos - h >= 0 else None)
            if src is None or len(src) != len(ids):
                break
            table = self.counts[pos - h, depth + h - 1]
            p = table / np.maximum(table.sum(1, keepdims=True), 1)
            out = out + p[src].sum(1)                                         # (T, n_expert)
        return out

    def scores_with_history(self, pos: int, depth: int, history: list[np.ndarray]) -> np.ndarray:
        """Batch form with explicit earlier layers: history[h] is the (T, k) choice at layer pos - h."""
        saved = self._ids[:]
        for h, ids in enumerate(history[1:], start=1):
            self._ids[pos - h] = ids
        try:
            return self.scores(pos, depth, history[0], None)
        finally:
            self._ids = saved


class FrequencyPredictor(Predictor):
    """Layer pos+d's experts ranked by how often each was chosen (profile and observed)."""
    name = "frequency"

    def __init__(self, layout: MoELayout):
        super().__init__(layout)
        self.freq = np.zeros((self.n_pos, self.n_expert))

    def fit(self, routing):
        for pos, ids in enumerate(routing):
            self.freq[pos] += np.bincount(ids.ravel(), minlength=self.n_expert)

    def observe(self, layer, ids, hidden=None):
        self.freq[self.pos[layer]] += np.bincount(ids.ravel(), minlength=self.n_expert)
        super().observe(layer, ids, hidden)

    def scores(self, pos, depth, ids, hidden):
        return self.freq[pos + depth][None, :].repeat(len(ids), 0)


class Lookahead:
    """The pipeline's front: after each layer's router, feed the predictor and ask the cache to prefetch its
    k best guesses for each of the next `depth` MoE layers (nearest first), while llama.cpp computes this
    layer's experts. Decoding only: a prompt batch's layers need the union of many tokens' experts."""

    def __init__(self, predictor: Predictor, cache, layout: MoELayout, depth: int = 1):
        if not 0 <= depth <= MAX_DEPTH:
            raise EdgeMoEError(f"prefetch depth {depth} is outside 0..{MAX_DEPTH}")
        self.predictor, self.cache, self.depth = predictor, cache, depth
        self.layers, self.k = layout.moe_layers, layout.n_expert_used
        # in flight at most: one layer's worth of guesses per layer of depth
        cache.enable_prefetch(depth * self.k * max(cache.cost.values()))

    def __call__(self, layer: int, ids: np.ndarray, hidden: np.ndarray | None = None) -> None:
        self.predictor.observe(layer, ids, hidden)
        if len(ids) != 1:
            return
        pos = self.predictor.pos[layer]
        for d in range(1, min(self.depth, len(self.layers) - 1 - pos) + 1):
            self.cache.prefetch(self.layers[pos + d], self.predictor.predict(layer, d)[: self.k])


def make_predictor(name: str, model_path: str | os.PathLike, layout: MoELayout) -> Predictor:
    """A predictor by name: "gate", "table" or "frequency"."""
    if name == "gate":
        return GatePredictor(layout, read_routers(model_path, layout))
    if name == "table":
        return TablePredictor(layout)
    if name == "frequency":
        return FrequencyPredictor(layout)
    raise EdgeMoEError(f"unknown predictor {name!r}; choose from {', '.join(PREDICTORS)}")


def recall_at_k(scores: np.ndarray, chosen: np.ndarray) -> float:
    """Fraction of the chosen (T, k) experts that are among the k best-scored of (T, n_expert)."""
    k = chosen.shape[1]
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float((top[:, :, None] == chosen[:, None, :]).any(1).mean())

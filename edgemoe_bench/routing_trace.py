"""The routing trace: which k experts every token chose in every MoE layer, generated or recorded.

On disk a trace is one `.npz` (numpy.load, no pickles):
    ids       int32 [tokens, n_moe_layers, k]   the experts chosen per token per MoE layer (a set: no repeats)
    layers    int32 [n_moe_layers]              the llama.cpp layer index (blk.N) of each MoE layer, ascending
    n_expert  int32 scalar                      experts per MoE layer
    source    str scalar                        where it comes from: "generated:qwen3-30b-a3b seed=0",
                                                "recorded:<model file name>"
A recorded run (`edgemoe run --json --trace`, JSON) is read as a trace too.
"""
from __future__ import annotations

import io
import itertools
import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgemoe_bench.trace_stats import trace_stats
from edgemoe_llamacpp import files
from edgemoe_llamacpp.errors import EdgeMoEError

log = logging.getLogger(__name__)
ARRAYS = ("ids", "layers", "n_expert", "source")
WHAT_A_TRACE_IS = ("a routing trace is an .npz of ids, layers, n_expert and source (tools/make_trace.py) or the JSON "
                   "of a recorded run (edgemoe run --json --trace)")


@dataclass(frozen=True)
class RoutingTrace:
    ids: np.ndarray            # (n_tokens, n_moe_layers, k) int32, the experts chosen per token per MoE layer
    layers: tuple[int, ...]    # the llama.cpp layer index (blk.N) of each MoE layer, ascending
    n_expert: int
    source: str                # e.g. "generated:qwen3-30b-a3b seed=0" or "recorded:<model file name>"

    def __post_init__(self):
        ids, layers = _checked(self.ids, self.layers, self.n_expert, self.source, "trace")
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "n_expert", int(self.n_expert))

    @property
    def n_tokens(self) -> int:
        return self.ids.shape[0]

    @property
    def k(self) -> int:
        return self.ids.shape[2]

    def save(self, path: str | os.PathLike, *, force: bool = False) -> None:
        """Write the .npz atomically; an existing file only with `force`."""
        dst = files.check_output(path, force=force, what="trace")
        with files.atomic_output(dst) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, ids=self.ids, layers=np.asarray(self.layers, dtype=np.int32),
                                n_expert=np.int32(self.n_expert), source=np.str_(self.source))

    @classmethod
    def load(cls, path: str | os.PathLike, n_expert: int | None = None) -> RoutingTrace:
        """A trace file, or a recorded run's JSON (by suffix or first byte; `n_expert` as in from_recorded),
        checked: shapes, ids in [0, n_expert), no expert twice in a row. EdgeMoEError otherwise."""
        data = files.read_bytes(path, "trace")
        if Path(path).suffix.lower() == ".json" or data.lstrip()[:1] in (b"{", b"["):
            try:
                run = json.loads(data)
            except (UnicodeDecodeError, ValueError) as e:
                raise EdgeMoEError(f"{path}: not a readable run JSON ({e})") from None
            return cls.from_recorded(run, n_expert, where=str(path))
        if not data.startswith(b"PK\x03\x04"):                  # an .npz is a zip archive
            raise EdgeMoEError(f"{path}: not a routing trace; {WHAT_A_TRACE_IS}")
        ids, layers, n_exp, source = _arrays(data, path)
        if n_exp.shape != () or n_exp.dtype.kind not in "iu" or source.shape != () or source.dtype.kind != "U":
            raise EdgeMoEError(f"{path}: damaged routing trace: n_expert and source must be an integer and a string")
        if layers.ndim != 1 or layers.dtype.kind not in "iu":
            raise EdgeMoEError(f"{path}: damaged routing trace: layers must be a list of integers")
        if n_expert is not None and int(n_exp) != n_expert:
            raise EdgeMoEError(f"{path}: the trace routes {int(n_exp)} experts per layer, not {n_expert}")
        ids, layers = _checked(ids, tuple(int(x) for x in layers), int(n_exp), str(source), str(path))
        return cls(ids, layers, int(n_exp), str(source))

    @classmethod
    def from_recorded(cls, run_json: dict | str | os.PathLike, n_expert: int | None = None, *,
                      where: str | None = None) -> RoutingTrace:
        """The routing of a recorded run (`edgemoe run --json --trace`), token-major.

        The run lists (layer, rows of ids) per MoE layer evaluation: a prompt evaluation has one row per
        prompt token, a decoding step one. llama.cpp computes the last layer only for the tokens whose logits
        are wanted (the prompt's last), so only the tokens every layer routed are kept: per evaluation, the
        last min(rows) of each layer. Without `n_expert`, it is read from the model file the run names."""
        if not isinstance(run_json, dict):
            where = str(run_json)
            try:
                run_json = json.loads(files.read_bytes(run_json, "run JSON"))
            except (UnicodeDecodeError, ValueError) as e:
                raise EdgeMoEError(f"{where}: not a readable run JSON ({e})") from None
        where = where or "run JSON"
        if not isinstance(run_json, dict) or not isinstance(run_json.get("trace"), list):
            raise EdgeMoEError(f"{where}: no routing in it (record one with `edgemoe run --json --trace`)")
        model = run_json.get("model")
        if n_expert is None:
            n_expert = _model_n_expert(model, where)
        ids, layers, dropped = _token_major(run_json["trace"], n_expert, where)
        if dropped:
            log.info("%s: %d prompt tokens routed in some layers only (llama.cpp skips the last layer for tokens "
                     "without logits) are left out", where, dropped)
        source = f"recorded:{Path(model).name}" if isinstance(model, str) and model else "recorded"
        ids, layers = _checked(ids, layers, n_expert, source, where)
        return cls(ids, layers, int(n_expert), source)

    def for_layout(self, layout) -> RoutingTrace:
        """This trace, if it fits the model `layout` describes (same MoE layers, n_expert and k)."""
        ours = (self.layers, self.n_expert, self.k)
        theirs = (tuple(layout.moe_layers), layout.n_expert, layout.n_expert_used)
        if ours != theirs:
            raise EdgeMoEError(f"trace {self.source!r} routes {_shape(*ours)}, but {Path(layout.path).name} has "
                               f"{_shape(*theirs)}")
        return self

    def stats(self, **params) -> dict:
        """Locality of the routing, averaged over MoE layers (per-layer values under "per_layer"):

        repeat_next          share of the selections at token t >= 1 whose expert layer l also chose at t-1
        within_window        share of the selections at t >= W whose expert was chosen at any of t-W..t-1 (W = 8)
        adjacent_jaccard     mean over t >= 1 of |S_t & S_t-1| / |S_t | S_t-1| (S_t: the k experts of token t)
        experts_for_cover    the fewest experts (most used first) holding `cover` (0.9) of the layer's selections,
                             over spans of `cover_tokens` tokens (default: the whole trace), averaged
        top_n_coverage       share of the layer's selections held by its `top_n` (n_expert / 2) most used experts
                             (over the same spans)
        lru_hit              hit rate of an LRU cache of round(`residency` x n_expert) experts (0.4) per layer,
                             starting empty, each token's k experts looked up, then made most recent
        layer_recall         how predictable layer l+1's set is from layer l's: a co-occurrence table fitted on
                             one half of the tokens names k experts per token on the other half (both ways);
                             the share of layer l+1's selections it names (trace_stats.layer_recall)
        layer_recall_popularity  the same for always naming layer l+1's k most used experts of the fitting half
        layer_recall_lift    layer_recall / layer_recall_popularity: what knowing layer l's choice adds
        layer_recall_chance  k / n_expert
        Keyword arguments (window, cover, cover_tokens, top_n, residency) change the parameters; they are echoed in "params".
        A statistic the trace is too short for is None."""
        return trace_stats(self.ids, self.n_expert, **params)


def _arrays(data: bytes, path) -> tuple[np.ndarray, ...]:
    """The four arrays of a trace .npz (ARRAYS), or EdgeMoEError saying in a few words why not: numpy's own
    messages run long and offer to unpickle, which a trace never needs (pickles are never loaded)."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            missing = [name for name in ARRAYS if name not in z.files]
            if missing:
                why = f"no {', '.join(missing)} array{'s' * (len(missing) > 1)}"
            else:
                return tuple(z[name] for name in ARRAYS)
    except ValueError:
        why = "it holds Python objects, which edgemoe never loads"
    except (OSError, EOFError, zipfile.BadZipFile, TypeError, KeyError):
        why = "a damaged archive"
    raise EdgeMoEError(f"{path}: not a readable routing trace ({why}); {WHAT_A_TRACE_IS}")


def _shape(layers: tuple[int, ...], n_expert: int, k: int) -> str:
    span = f"{layers[0]}-{layers[-1]}" if layers == tuple(range(layers[0], layers[-1] + 1)) else list(layers)
    return f"{len(layers)} MoE layers ({span}) x {n_expert} experts, top-{k}"


def _checked(ids, layers, n_expert, source, where: str) -> tuple[np.ndarray, tuple[int, ...]]:
    """ids as read-only int32 (tokens, layers, k) and layers as a tuple, or EdgeMoEError naming what is wrong."""
    def bad(why: str):
        return EdgeMoEError(f"{where}: invalid routing trace: {why}")

    ids = np.asarray(ids)
    if not isinstance(n_expert, int | np.integer) or isinstance(n_expert, bool) or n_expert < 1:
        raise bad(f"n_expert must be a positive integer, not {n_expert!r}")
    if not isinstance(source, str):
        raise bad(f"source must be a string, not {type(source).__name__}")
    if ids.dtype.kind not in "iu":
        raise bad(f"ids must be integers, not {ids.dtype}")
    if ids.ndim != 3 or 0 in ids.shape:
        raise bad(f"ids must be (tokens, MoE layers, k), all non-empty, not shape {ids.shape}")
    layers = tuple(layers)
    if not all(isinstance(x, int | np.integer) and not isinstance(x, bool) for x in layers):
        raise bad(f"layers must be integers, not {list(layers)[:4]}")
    layers = tuple(int(x) for x in layers)
    if len(layers) != ids.shape[1]:
        raise bad(f"{len(layers)} layers named for {ids.shape[1]} MoE layers of ids")
    if layers[0] < 0 or any(b <= a for a, b in itertools.pairwise(layers)):
        raise bad(f"layers must be non-negative and ascending, not {list(layers)}")
    k = ids.shape[2]
    if k > n_expert:
        raise bad(f"{k} experts per token out of {n_expert}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= n_expert:
        raise bad(f"expert id {lo if lo < 0 else hi} outside [0, {n_expert})")
    ids = np.ascontiguousarray(ids, dtype=np.int32)
    s = np.sort(ids, axis=2)
    dup = np.argwhere(s[..., 1:] == s[..., :-1])
    if len(dup):
        t, li, _ = dup[0]
        raise bad(f"token {t} chose expert {s[t, li][_ + 1]} twice in layer {layers[li]}")
    ids.flags.writeable = False
    return ids, layers


def _token_major(trace: list, n_expert: int, where: str) -> tuple[np.ndarray, tuple[int, ...], int]:
    """A run's per-evaluation (layer, rows) list -> (ids (tokens, layers, k), layers, tokens dropped)."""
    evals: list[dict[int, list]] = []
    k = None
    for i, entry in enumerate(trace):
        if not (isinstance(entry, list | tuple) and len(entry) == 2 and isinstance(entry[0], int)
                and isinstance(entry[1], list)):
            raise EdgeMoEError(f"{where}: trace entry {i} is not [layer, rows of expert ids]")
        layer, rows = entry
        for row in rows:
            if not (isinstance(row, list) and row and all(type(x) is int for x in row)):
                raise EdgeMoEError(f"{where}: trace entry {i} (layer {layer}) has a row that is not a list of ids")
            if k is None:
                k = len(row)
            elif len(row) != k:
                raise EdgeMoEError(f"{where}: trace entry {i} has rows of {len(row)} and {k} experts")
        if not evals or layer <= max(evals[-1]):
            evals.append({})                                 # the layers start over: a new evaluation
        evals[-1][layer] = rows
    layers = tuple(sorted({layer for ev in evals for layer in ev}))
    if not layers or k is None:
        raise EdgeMoEError(f"{where}: the run recorded no routing")
    tokens, dropped = [], 0
    for ev in evals:
        n = min(len(ev.get(layer, ())) for layer in layers)
        dropped += max(len(rows) for rows in ev.values()) - n
        for j in range(n):
            tokens.append([ev[layer][len(ev[layer]) - n + j] for layer in layers])
    if not tokens:
        raise EdgeMoEError(f"{where}: no token was routed in every MoE layer")
    big = max((abs(x) for token in tokens for row in token for x in row), default=0)
    if big >= 2 ** 31:                                       # no model has that many; beyond int64 at worst
        raise EdgeMoEError(f"{where}: invalid routing trace: expert id {big} outside [0, {n_expert})")
    return np.asarray(tokens, dtype=np.int64), layers, dropped


def _model_n_expert(model, where: str) -> int:
    from edgemoe_llamacpp.gguf.layout import read_layout

    if not isinstance(model, str) or not Path(model).is_file():
        raise EdgeMoEError(f"{where}: the experts per layer are unknown (the run's model {model!r} is not here); "
                           f"pass n_expert")
    return read_layout(model).n_expert

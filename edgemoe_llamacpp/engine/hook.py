"""The cb_eval callback: on `ffn_moe_topk-N`, read layer N's chosen experts and make them resident.

llama.cpp's scheduler asks the callback about every graph node (`ask=True`); for the nodes we want it
computes the graph up to that node and calls again with `ask=False`. `ffn_moe_topk-N` completes before
layer N's expert matmuls run, so the experts can be fetched just in time. The scheduler asks about every node
(~40 per layer per token); the patched runtime answers those in C (`llama_eval_prefix_filter`, patches/0004) and
calls Python at the topk nodes only. On a runtime without it, Python answers each `ask` with a 12-byte compare.
With patches/0005 (`pass_resident`), a topk node whose experts are all marked in the owner's residency table
does not call Python at all: C logs its ids and the hook hands them on later, in order (`drain`).

A predictor may want a layer's FFN input too (`ffn_inp-N` or `ffn_norm-N`). Asking for that node would cost
another graph split per layer; instead it is found among the topk node's sources (topk <- argsort <- probs
<- logits <- ffn_norm <- norm <- ffn_inp): it is computed by then, and still allocated because the expert
matmuls (ffn_norm) and the layer's residual add (ffn_inp) have yet to read it.
"""
from __future__ import annotations

import contextlib
import ctypes
import struct
import time

import llama_cpp
import numpy as np

from edgemoe_llamacpp import runtime
from edgemoe_llamacpp.engine.interrupt import sigint_deferred
from edgemoe_llamacpp.gguf.constants import GGML_OP_MUL_MAT_ID, GGML_TYPE_F32, GGML_TYPE_I32

TOPK = b"ffn_moe_topk"
TOPK_PREFIX = len(TOPK) + 1          # "ffn_moe_topk-" then the layer number
DOWN = b"ffn_moe_down-"              # the down projection's MUL_MAT_ID (build_moe_ffn), then the layer number
SOURCE_SEARCH_DEPTH = 8              # how many hops up from topk a wanted node may be


PROBS = b"ffn_moe_probs-"              # the router's probabilities (T, n_expert), topk's grandparent


class PrefixFilterParams(ctypes.Structure):
    """llama.h's llama_eval_prefix_filter_params (patches/0004)."""
    _fields_ = [("cb", llama_cpp.ggml_backend_sched_eval_callback), ("cb_user_data", ctypes.c_void_p),
                ("prefix", ctypes.c_char * 64)]


class ExpertFilterParams(ctypes.Structure):
    """llama.h's llama_eval_expert_filter_params (patches/0005)."""
    _fields_ = [("cb", llama_cpp.ggml_backend_sched_eval_callback), ("cb_user_data", ctypes.c_void_p),
                ("prefix", ctypes.c_char * 64), ("resident", ctypes.c_void_p), ("n_layer", ctypes.c_int32),
                ("n_expert", ctypes.c_int32), ("log", ctypes.c_void_p), ("log_cap", ctypes.c_int64),
                ("log_len", ctypes.c_int64)]


LOG_INTS = 1 << 16                  # the filter's log: 256 KiB, a few thousand decoded layers between drains


def logged_routes(log: np.ndarray):
    """(layer, ids (T, k)) of each node in a filter log (patches/0005: layer, tokens, k, then the ids)."""
    i = 0
    while i < len(log):
        layer, n_tokens, k = (int(x) for x in log[i:i + 3])
        yield layer, log[i + 3:i + 3 + n_tokens * k].reshape(n_tokens, k)
        i += 3 + n_tokens * k


class ExpertHook:
    """Owns the CFUNCTYPE object llama.cpp calls; hands each layer's expert ids to `on_route`.

    on_route(layer, ids (T, k) int32, hidden (T, n_embd) or None, weights (T, k) or None): `hidden` is the
    node named `hidden_node` if given; `weights` (with want_weights) the chosen experts' router
    probabilities, renormalised over the k chosen.
    on_down(layer, ids (T, k), x (T, k, n_ff)), for the profile: what each chosen expert's down projection
    multiplies (`ffn_moe_down-N`'s src1), after that layer's on_route. It costs a graph split per layer and
    makes Python answer every `ask`.
    """

    def __init__(self, on_route=None, hidden_node: str | None = None, want_weights: bool = False, inject=None,
                 on_down=None):
        self.on_route = on_route
        self.inject = inject              # inject(layer, t): overwrite the node's ids first (inject.TraceInjector)
        self.hidden_node = hidden_node.encode() + b"-" if hidden_node else None
        self.want_weights = want_weights
        self._paths: dict[bytes, list[int]] = {}   # node name prefix -> src indices from topk, found once
        self.error: BaseException | None = None
        self.stop = False                 # a SIGINT arrived during this evaluation: tell llama.cpp to stop
        self.routes = 0
        self._checked = False
        self.on_down = on_down
        # keep: C holds a pointer
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._cb if on_down is None else self._cb_down)
        self.hook_ns = 0                  # time spent in Python for the topk nodes (called, or logged and drained)
        self.calls = 0                    # topk nodes the runtime called Python for
        self._filter = None
        self._log = self._on_logged = None
        native = runtime.eval_prefix_filter() if on_down is None else None
        if native is not None:            # the patched runtime answers `ask` in C and calls us at topk only
            self._filter = PrefixFilterParams(self.callback, None, TOPK + b"-")
            self._filter_fn = llama_cpp.ggml_backend_sched_eval_callback(native)

    def pass_resident(self, ready: np.ndarray, on_logged, *, now: bool = True) -> bool:
        """Let a layer whose chosen experts are all marked in `ready` ((layers, n_expert) uint8, kept current by
        the owner) pass in C without calling Python; its ids are logged, and drain() (called before every
        other layer the hook sees, and by the owner after each evaluation) hands them to
        on_logged(layer, ids), in order. Call before the context is created; with now=False every layer calls
        on_route until `start_passing()`. False if the runtime lacks llama_eval_expert_filter (patches/0005):
        every layer then calls on_route as before."""
        native = runtime.eval_expert_filter()
        if native is None or self.inject is not None or not ready.flags.c_contiguous or ready.dtype != np.uint8:
            return False
        self._ready = ready               # C holds pointers to both arrays
        self._log = np.zeros(LOG_INTS, dtype=np.int32)
        self._on_logged = on_logged
        # a NULL table: the filter calls Python at every topk node (patches/0005)
        self._filter = ExpertFilterParams(self.callback, None, TOPK + b"-", ready.ctypes.data if now else None,
                                          ready.shape[0], ready.shape[1], self._log.ctypes.data, len(self._log), 0)
        self._filter_fn = llama_cpp.ggml_backend_sched_eval_callback(native)
        return True

    def start_passing(self) -> bool:
        """From the next layer on, let resident layers pass in C (a pass_resident(now=False) set up); False if
        there is no such filter."""
        if not isinstance(self._filter, ExpertFilterParams):
            return False
        self._filter.resident = self._ready.ctypes.data
        return True

    def drain(self) -> None:
        """Hand the layers the runtime let pass since the last drain to on_logged, in order."""
        n = self._filter.log_len if self._log is not None else 0
        if not n:
            return
        t0 = time.perf_counter_ns()
        log = self._log[:n].copy()
        self._filter.log_len = 0
        try:
            for layer, ids in logged_routes(log):
                self.routes += 1
                self._on_logged(layer, ids)
        finally:
            self.hook_ns += time.perf_counter_ns() - t0

    def cb_eval_args(self) -> dict:
        """cb_eval and cb_eval_user_data for llama_context_params (llama.llama_params takes them as keywords)."""
        if self._filter is None:
            return {"cb_eval": self.callback}
        return {"cb_eval": self._filter_fn, "cb_eval_user_data": ctypes.addressof(self._filter)}

    @property
    def native_filter(self) -> bool:
        return self._filter is not None

    @property
    def us_per_call(self) -> float | None:
        """Python's time per routed layer: called at the node, or logged in C and drained."""
        return self.hook_ns / self.routes / 1e3 if self.routes else None

    @contextlib.contextmanager
    def evaluation(self):
        """Around one llama.cpp evaluation with this hook: a SIGINT that arrives meanwhile makes the callback tell
        llama.cpp to stop at the next node it sees, and is raised here once llama.cpp has returned (raised inside
        the callback, ctypes would print the KeyboardInterrupt and swallow it, and llama.cpp would go on). An
        error the callback recorded is raised here too; an interrupt wins over it."""
        self.stop = False
        with sigint_deferred(self._interrupted):
            yield
            self.take_error()

    def _interrupted(self) -> None:
        self.stop = True

    def _cb(self, t: int, ask: bool, _user_data) -> bool:
        if ask:
            return self.stop or ctypes.string_at(t + runtime.T_NAME, len(TOPK)) == TOPK
        if self.stop:
            return False                  # llama.cpp computes no further node of this graph
        self.calls += 1
        try:
            self.drain()                  # the layers that passed in C come first, in order
            t0 = time.perf_counter_ns()
            self._on_topk(t)
            self.hook_ns += time.perf_counter_ns() - t0
        except BaseException as e:  # noqa: BLE001 -- must not unwind through C; re-raised after the eval
            if self.error is None:
                self.error = e
        return not self.stop

    def _cb_down(self, t: int, ask: bool, user_data) -> bool:
        """_cb, and the down projections' inputs to on_down."""
        name = ctypes.string_at(t + runtime.T_NAME, runtime.GGML_MAX_NAME).split(b"\0", 1)[0]
        if not (name.startswith(DOWN) and name[len(DOWN):].isdigit()):
            return self._cb(t, ask, user_data)
        if ask:
            return True
        if self.stop:
            return False
        try:
            mm = t
            while ctypes.c_int32.from_address(mm + runtime.T_OP).value != GGML_OP_MUL_MAT_ID:
                mm = _sources(mm)[0]      # the matmul under a scale or a LoRA's add
                if not mm:
                    raise RuntimeError(f"{name.decode()} is not computed by a MUL_MAT_ID")
            src = _sources(mm)
            self.on_down(int(name[len(DOWN):]), read_ids(src[2]), read_f32_3d(src[1]))
        except BaseException as e:  # noqa: BLE001 -- must not unwind through C; re-raised after the eval
            if self.error is None:
                self.error = e
        return True

    def _on_topk(self, t: int) -> None:
        if not self._checked:
            runtime.check_tensor_offsets(t)
            if ctypes.c_int32.from_address(t + runtime.T_TYPE).value != GGML_TYPE_I32:
                raise RuntimeError("ffn_moe_topk is not I32: unexpected llama.cpp graph")
            self._checked = True
        head = ctypes.string_at(t, _HEAD_BYTES)       # one foreign read: name, shape, strides, data pointer
        name = head[runtime.T_NAME:].split(b"\0", 1)[0]
        layer = name[TOPK_PREFIX:]
        if name[len(TOPK):TOPK_PREFIX] != b"-" or not layer.isdigit():
            return                                   # not a layer's topk node (e.g. a renamed view)
        self.routes += 1
        if self.inject is not None:
            self.inject(int(layer), t)
        if self.on_route is not None:
            ids = _ids_from_head(head)
            hidden = None if self.hidden_node is None else self._read_source(t, self.hidden_node, layer)
            weights = None
            if self.want_weights:
                weights = chosen_weights(self._read_source(t, PROBS, layer), ids)
            self.on_route(int(layer), ids, hidden, weights)

    def _read_source(self, t: int, prefix: bytes, layer: bytes) -> np.ndarray:
        """The F32 node `prefix + layer` among the topk node's ancestors, as (T, n) rows."""
        name = prefix + layer
        path = self._paths.get(prefix)
        node = follow(t, path) if path is not None else None
        if node is None or _name(node) != name:
            path = self._paths[prefix] = find_source(t, name)
            if path is None:
                raise RuntimeError(f"{name.decode()} is not among the sources of the topk node: this model's "
                                   "graph does not suit gate lookahead or substitution")
            node = follow(t, path)
        return read_f32_rows(node)

    def take_error(self) -> None:
        err, self.error = self.error, None
        if err is not None:
            raise err


def chosen_weights(probs: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The (T, k) router probabilities of the chosen experts, renormalised over the k chosen."""
    w = np.take_along_axis(probs, ids, axis=1)
    return w / w.sum(axis=1, keepdims=True)


def write_ids(t: int, ids: np.ndarray) -> None:
    """Overwrite a topk node's (T, k) expert ids in place (it is a strided view of the argsort's output)."""
    view = _ids_view(ctypes.string_at(t, _HEAD_BYTES))
    if ids.shape != view.shape:
        raise RuntimeError(f"{_name(t).decode()} holds {view.shape} ids; the trace gives {ids.shape}")
    view[...] = ids


_HEAD_BYTES = runtime.T_NAME + runtime.GGML_MAX_NAME
_NE = struct.Struct("<qq")          # ne[0], ne[1]
_NB = struct.Struct("<QQ")          # nb[0], nb[1]
_PTR = struct.Struct("<Q")


def read_ids(t: int) -> np.ndarray:
    """The (T, k) expert ids of a topk node: a strided I32 view (row stride nb[1] = n_expert * 4)."""
    return _ids_from_head(ctypes.string_at(t, _HEAD_BYTES))


def _ids_from_head(head: bytes) -> np.ndarray:
    """read_ids from the node's first bytes already read (the hook's per-layer path: two foreign reads in all)."""
    k, n_tokens = _NE.unpack_from(head, runtime.T_NE)
    if n_tokens == 1:       # decoding: one contiguous row
        (data,) = _PTR.unpack_from(head, runtime.T_DATA)
        return np.frombuffer(ctypes.string_at(data, 4 * k), dtype=np.int32).reshape(1, k).copy()
    return _ids_view(head).copy()


def _ids_view(head: bytes) -> np.ndarray:
    """The topk node's (T, k) ids in place: a strided, writable I32 view over its data (row stride nb[1])."""
    k, n_tokens = _NE.unpack_from(head, runtime.T_NE)
    nb0, nb1 = _NB.unpack_from(head, runtime.T_NB)
    (data,) = _PTR.unpack_from(head, runtime.T_DATA)
    raw = (ctypes.c_char * ((n_tokens - 1) * nb1 + k * nb0)).from_address(data)
    return np.lib.stride_tricks.as_strided(np.frombuffer(raw, dtype=np.int32), (n_tokens, k), (nb1, nb0))


def _name(t: int) -> bytes:
    return ctypes.string_at(t + runtime.T_NAME, runtime.GGML_MAX_NAME).split(b"\0", 1)[0]


def _sources(t: int) -> list[int]:
    return list((ctypes.c_void_p * runtime.GGML_MAX_SRC).from_address(t + runtime.T_SRC))


def follow(t: int, path: list[int]) -> int | None:
    for i in path:
        t = _sources(t)[i]
        if not t:
            return None
    return t


def find_source(t: int, name: bytes) -> list[int] | None:
    """src indices leading from node t to its ancestor called `name` (breadth first), or None."""
    frontier = [(t, [])]
    for _ in range(SOURCE_SEARCH_DEPTH):
        nxt = []
        for node, path in frontier:
            for i, s in enumerate(_sources(node)):
                if s:
                    if _name(s) == name:
                        return path + [i]
                    nxt.append((s, path + [i]))
        frontier = nxt
    return None


def read_f32_3d(t: int) -> np.ndarray:
    """A 3-D F32 node as a (ne[2], ne[1], ne[0]) array, honouring its strides."""
    if ctypes.c_int32.from_address(t + runtime.T_TYPE).value != GGML_TYPE_F32:
        raise RuntimeError(f"{_name(t).decode()} is not F32")
    ne = list((ctypes.c_int64 * 3).from_address(t + runtime.T_NE))
    nb = list((ctypes.c_size_t * 3).from_address(t + runtime.T_NB))
    data = ctypes.c_void_p.from_address(t + runtime.T_DATA).value
    raw = (ctypes.c_char * (sum((n - 1) * s for n, s in zip(ne, nb, strict=True)) + nb[0])).from_address(data)
    return np.lib.stride_tricks.as_strided(np.frombuffer(raw, dtype=np.float32), ne[::-1], nb[::-1]).copy()


def read_f32_rows(t: int) -> np.ndarray:
    """A 2-D F32 node as a (T, n) array (rows nb[1] bytes apart)."""
    if ctypes.c_int32.from_address(t + runtime.T_TYPE).value != GGML_TYPE_F32:
        raise RuntimeError(f"{_name(t).decode()} is not F32")
    n, rows = (ctypes.c_int64 * 2).from_address(t + runtime.T_NE)
    nb0, nb1 = (ctypes.c_size_t * 2).from_address(t + runtime.T_NB)
    data = ctypes.c_void_p.from_address(t + runtime.T_DATA).value
    raw = (ctypes.c_char * ((rows - 1) * nb1 + n * nb0)).from_address(data)
    return np.lib.stride_tricks.as_strided(np.frombuffer(raw, dtype=np.float32), (rows, n), (nb1, nb0)).copy()

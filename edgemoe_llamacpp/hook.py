"""The cb_eval callback: on `ffn_moe_topk-N`, read layer N's chosen experts and make them resident.

llama.cpp's scheduler asks the callback about every graph node (`ask=True`); for the nodes we want it
computes the graph up to that node and calls again with `ask=False`. `ffn_moe_topk-N` completes before
layer N's expert matmuls run, so the experts can be fetched just in time. The `ask` path runs ~40 times
per layer per token: one 12-byte compare, nothing else.
"""
from __future__ import annotations

import ctypes

import llama_cpp
import numpy as np

from . import runtime

TOPK = b"ffn_moe_topk"
TOPK_PREFIX = len(TOPK) + 1          # "ffn_moe_topk-" then the layer number
GGML_TYPE_I32 = 26                   # ggml.h enum ggml_type


class ExpertHook:
    """Owns the CFUNCTYPE object llama.cpp calls; hands each layer's expert ids to `on_route`."""

    def __init__(self, on_route=None):
        self.on_route = on_route           # (layer, ids: np.ndarray (T, k) int32) -> None
        self.error: BaseException | None = None
        self.routes = 0
        self._checked = False
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._cb)   # keep: C holds a pointer

    def _cb(self, t: int, ask: bool, _user_data) -> bool:
        if ask:
            return ctypes.string_at(t + runtime.T_NAME, len(TOPK)) == TOPK
        try:
            self._on_topk(t)
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
        name = ctypes.string_at(t + runtime.T_NAME, runtime.GGML_MAX_NAME).split(b"\0", 1)[0]
        layer = name[TOPK_PREFIX:]
        if name[len(TOPK):TOPK_PREFIX] != b"-" or not layer.isdigit():
            return                                   # not a layer's topk node (e.g. a renamed view)
        self.routes += 1
        if self.on_route is not None:
            self.on_route(int(layer), read_ids(t))

    def take_error(self) -> None:
        err, self.error = self.error, None
        if err is not None:
            raise err


def read_ids(t: int) -> np.ndarray:
    """The (T, k) expert ids of a topk node: a strided I32 view (row stride nb[1] = n_expert * 4)."""
    k, n_tokens = (ctypes.c_int64 * 2).from_address(t + runtime.T_NE)
    nb0, nb1 = (ctypes.c_size_t * 2).from_address(t + runtime.T_NB)
    data = ctypes.c_void_p.from_address(t + runtime.T_DATA).value
    if n_tokens == 1:       # decoding: one contiguous row
        return np.frombuffer((ctypes.c_int32 * k).from_address(data), dtype=np.int32).reshape(1, k).copy()
    raw = (ctypes.c_char * ((n_tokens - 1) * nb1 + k * nb0)).from_address(data)
    flat = np.frombuffer(raw, dtype=np.int32)
    return np.lib.stride_tricks.as_strided(flat, (n_tokens, k), (nb1, nb0)).copy()

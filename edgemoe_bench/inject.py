"""Routing from a trace, for benchmarks and replay only: each MoE layer's `ffn_moe_topk-N` node is overwritten in
place, after the router computed it and before the layer's experts run, with the trace's experts for the tokens
being evaluated. llama.cpp then gathers those experts' router weights and computes exactly the trace's routing.

Rows are taken by token position (the trace wraps around), so a prompt and the tokens after it replay the same
routing whichever engine runs them: `edgemoe_llamacpp.Llama(route_injector=...)`, or `stock_llama(route_injector=...)`, a plain
`llama_cpp.Llama` with the same hook (`ExpertHook(inject=...)`) and no cache (the stock side of a comparison).
`trace_injector` builds the injector both take; the product knows injectors only by that interface
(edgemoe_llamacpp.engine.injection).
Output made this way is not the model's own; every result that comes from it says `routing: injected`.
"""
from __future__ import annotations

import ctypes

import numpy as np

from edgemoe_bench.routing_trace import RoutingTrace
from edgemoe_llamacpp import runtime
from edgemoe_llamacpp.engine.hook import write_ids
from edgemoe_llamacpp.gguf.layout import read_layout


class TraceInjector:
    """Writes the trace's experts into each topk node. `position` is the sequence position of the first token of
    the next evaluation (the owner sets it before each llama_decode)."""

    def __init__(self, trace: RoutingTrace):
        self.trace = trace
        self.column = {layer: i for i, layer in enumerate(trace.layers)}
        self.first_layer = trace.layers[0]
        self.position = 0
        self._rows: np.ndarray | None = None
        self.injected = 0                       # topk nodes overwritten

    @property
    def source(self) -> str:
        return self.trace.source

    @property
    def evaluating(self) -> tuple[int, np.ndarray] | None:
        """(position of the first token, (n_tokens, n_moe_layers, k) trace rows) of the evaluation under way, once
        its first MoE layer was injected; None before any."""
        if self._rows is None:
            return None
        return self.position - len(self._rows), self._rows

    def rows(self, n_tokens: int) -> np.ndarray:
        """(n_tokens, n_moe_layers, k) trace rows for the tokens at position, position + 1, ... (wrapping)."""
        at = (self.position + np.arange(n_tokens)) % len(self.trace.ids)
        return self.trace.ids[at]

    def __call__(self, layer: int, t: int) -> None:
        n_tokens = ctypes.c_int64.from_address(t + runtime.T_NE + 8).value
        if layer == self.first_layer or self._rows is None:
            self._rows = self.rows(n_tokens)
            self.position += n_tokens
        col = self.column.get(layer)
        if col is None:
            raise RuntimeError(f"layer {layer} routes experts but the trace has no column for it "
                               f"(trace MoE layers {self.trace.layers[0]}..{self.trace.layers[-1]})")
        if n_tokens > len(self._rows):
            raise RuntimeError(f"layer {layer} routes {n_tokens} tokens, the first MoE layer {len(self._rows)}")
        # llama.cpp computes the last layer for the tokens whose output is wanted only (a prompt's last): the
        # node's rows are then the evaluation's last ones
        write_ids(t, self._rows[len(self._rows) - n_tokens:, col, :])
        self.injected += 1


def trace_injector(trace, model: str) -> TraceInjector:
    """The injector computing `trace` (a path or a RoutingTrace) on `model`, checked against its MoE layers."""
    trace = trace if isinstance(trace, RoutingTrace) else RoutingTrace.load(trace)
    return TraceInjector(trace.for_layout(read_layout(model)))

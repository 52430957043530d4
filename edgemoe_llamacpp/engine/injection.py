"""Where routing from outside plugs in: benchmarks and replay compute given experts instead of the router's.

An injector is any object with
- `source`: a string naming where its routing comes from (results say `routing: injected: <source>`);
- `position`: the sequence position of the next evaluation's first token, set by the owner before each decode;
- `__call__(layer, t)`: given a MoE layer and its `ffn_moe_topk` node (a ggml_tensor address), overwrite the node's
  ids in place (hook.write_ids), after the router computed them and before the layer's experts run.

edgemoe_bench.inject builds one from a routing trace. The product carries no injector of its own; these two
are the sockets: `Llama(route_injector=...)` for edgemoe, `InjectedLlama` for the stock side of a comparison.
Output made this way is not the model's own.
"""
from __future__ import annotations

import llama_cpp

from edgemoe_llamacpp.engine.hook import ExpertHook


def routing_label(injector) -> str:
    """What results say about their routing: "router", or "injected: <the injector's source>"."""
    return "router" if injector is None else f"injected: {injector.source}"


class InjectedLlama(llama_cpp.Llama):
    """A plain llama_cpp.Llama computing an injector's routing, no cache: the stock side of an injected comparison.
    Build it with `hook.cb_eval_args()` in the context params (llama.stock_llama(route_injector=...) does)."""

    def __init__(self, *args, hook: ExpertHook, **kwargs):
        self._edgemoe_hook = hook
        self._edgemoe_injector = hook.inject
        super().__init__(*args, **kwargs)

    @property
    def route_injector(self):
        return self._edgemoe_injector

    def eval(self, tokens) -> None:
        self._edgemoe_injector.position = self.n_tokens
        with self._edgemoe_hook.evaluation():
            super().eval(tokens)

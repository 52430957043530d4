"""The engine that streams one model's experts: the cache, the hook that calls it from llama.cpp's graph, the
lookahead that prefetches, the routing record and the statistics. `edgemoe_llamacpp.Llama` composes one and makes
it public as `llm.edgemoe`; nothing here knows of llama-cpp-python's Llama."""
from __future__ import annotations

from dataclasses import dataclass, field

from edgemoe_llamacpp import limits
from edgemoe_llamacpp.cache import figures
from edgemoe_llamacpp.cache.auto import AUTO, AutoLookahead
from edgemoe_llamacpp.cache.config import CacheConfig
from edgemoe_llamacpp.cache.dense_hold import DenseHold
from edgemoe_llamacpp.cache.predict import Lookahead, make_predictor
from edgemoe_llamacpp.cache.residency import BudgetMode
from edgemoe_llamacpp.engine import loading
from edgemoe_llamacpp.engine.hook import ExpertHook
from edgemoe_llamacpp.engine.injection import routing_label
from edgemoe_llamacpp.engine.substitute import ExpertPointers, weight_above
from edgemoe_llamacpp.errors import BudgetError, EdgeMoEError
from edgemoe_llamacpp.gguf.layout import MoELayout


@dataclass
class TokenCounts:
    """Tokens evaluated for prompts and tokens sampled, since the model was loaded (what `edgemoe serve`'s
    /metrics reports as prompt tokens processed and tokens generated)."""

    prompt: int = 0                 # evaluated, other than a token just sampled (a reused prefix is not)
    generated: int = 0              # sampled
    _last: int | None = field(default=None, repr=False)    # the token sampled last, until it is evaluated

    def sampled(self, token: int) -> None:
        self.generated += 1
        self._last = token

    def evaluated(self, tokens) -> None:
        n = len(tokens)
        if n and self._last is not None and tokens[0] == self._last:
            n -= 1                  # the sampled token, fed back
        self._last = None
        self.prompt += n


class ExpertEngine:
    """Experts of `layout` kept as `config` says. Built before llama.cpp loads the model (its hook goes into the
    context params: `hook.cb_eval_args()`), bound to llama.cpp's mappings after (`attach`).

    record_routing: keep every layer's chosen experts (`routing()`), for profiles and benchmarks.
    route_injector: compute its routing instead of the router's (engine.injection; benchmarks and replay).
    prefetch_predictor: a Predictor object (cache.predict's interface) to prefetch with instead of the one config.predictor
        names, at config.prefetch_depth (research: an oracle reading the injected routing ahead)."""

    def __init__(self, layout: MoELayout, config: CacheConfig, *, record_routing: bool = False,
                 route_injector=None, prefetch_predictor=None):
        self.layout, self.config = layout, config
        self.injector = route_injector
        self.tokens = TokenCounts()
        self.pointers: ExpertPointers | None = None
        self.dense = DenseHold("off", 0, [])           # dense pages held from reclaim (under a budget)
        self.record: list[tuple[int, list[list[int]]]] | None = [] if record_routing else None
        self.cache = cache = config.make_cache(layout)
        self.lookahead: Lookahead | AutoLookahead | None = None
        self.auto = False                               # predictor "auto" decides (set by _lookahead)
        try:
            limit = limits.memory_limit()
            if limit is not None and limit < layout.dense_bytes + cache.min_budget:
                raise BudgetError(f"this process may use {limit:,} bytes (its cgroup's memory limit), but "
                                  f"{layout.path} needs at least {layout.dense_bytes + cache.min_budget:,}: "
                                  f"{layout.dense_bytes:,} of dense weights and {cache.min_budget:,} for one "
                                  f"layer's chosen experts")
            self.lookahead = self._lookahead(prefetch_predictor)
        except BaseException:
            cache.close()
            raise
        hidden = self.lookahead.predictor.hidden_node if self.lookahead else None
        # the hook calls the engine's methods through these, so a subclass's (or a test's) own are the ones run
        self.hook = ExpertHook(on_route=lambda *a: self.on_route(*a), hidden_node=hidden,
                               want_weights=cache.substitute is not None, inject=route_injector)
        watching = isinstance(self.lookahead, AutoLookahead)
        if (self.lookahead is None or watching) and cache.substitute is None:
            # no layer needs Python when its experts are all resident: the runtime lets it pass (patches/0005);
            # predictor="auto" sees every layer while it watches, and lets them pass if it decides off
            self.hook.pass_resident(cache.ledger.ready, lambda *a: self.on_logged(*a), now=not watching)
        self.snapshot = None

    def _lookahead(self, predictor) -> Lookahead | AutoLookahead | None:
        """What prefetches: `predictor` (an object), or the one config.predictor names; for "auto", gate lookahead
        that turns itself on where prefetch pays (cache.auto), and nothing where every expert stays resident."""
        config, layout, cache = self.config, self.layout, self.cache
        self.auto = auto = predictor is None and config.predictor == AUTO
        self._auto_off = "every expert stays resident: nothing to prefetch"
        if auto and not cache.mode.streams:
            return None
        if auto:
            try:
                predictor = make_predictor("gate", layout.path, layout)
            except EdgeMoEError as e:           # a file without what gate lookahead reads: no prefetch, and why
                self._auto_off = f"gate lookahead cannot run on this file ({e})"
                return None
        elif predictor is None and config.predictor is not None:
            predictor = make_predictor(config.predictor, layout.path, layout)
        if predictor is None:
            return None
        lookahead = Lookahead(predictor, cache, layout, config.prefetch_depth)
        if not auto:
            return lookahead
        return AutoLookahead(lookahead, lambda: cache.stats.total().stall_s, self._auto_decided)

    def _auto_decided(self, on: bool) -> None:
        if not on:                              # the predictor is done: no hidden state to read any more, and
            self.hook.hidden_node = None        # layers whose experts are all resident pass in C again
            self.hook.start_passing()

    @property
    def mode(self) -> BudgetMode:
        return self.cache.mode

    def attach(self, mappings: list[list[tuple[int, int, int, str]]]) -> None:
        """Bind to llama.cpp's mappings of the model's files (per file, its rows of pages.file_mappings): read
        the dense weights under a budget, point substitution at the low-bit copies, start the cache, and hold
        the dense pages from reclaim."""
        bases = [rows[0][0] - rows[0][2] for rows in mappings]
        if self.mode is not BudgetMode.UNLIMITED:
            loading.read_dense(self.layout, mappings)
        if self.cache.substitute is not None:
            self.pointers = ExpertPointers(self.layout, bases)
        self.cache.attach(bases, mapped=[(min(off for _, _, off, _ in rows),
                                          max(off + end - start for start, end, off, _ in rows))
                                         for rows in mappings])
        if self.mode.streams:
            self.dense = loading.hold_dense(self.layout, mappings, self.config.hold_dense)
        if self.mode is not BudgetMode.UNLIMITED:
            self.cache.watch_reclaim()        # from here on, a fault while llama.cpp computes is a sign

    # ------------------------------------------------------------------ the hook's calls
    def on_route(self, layer: int, ids, hidden=None, weights=None) -> None:
        """Layer `layer` chose `ids` ((tokens, k)): make them resident before its experts run, and look ahead."""
        if self.record is not None:
            self.record.append((layer, ids.tolist()))
        if len(ids) > 1:                    # a prompt batch runs long: pressure may have taken experts meanwhile
            self.cache.check_reclaim()
        above = None if weights is None else weight_above(ids, weights)
        low = self.cache.ensure_ids(layer, ids, above)
        if len(ids) > 1:                    # a prompt batch: the next layer's experts are read while this computes
            self.cache.prefetch_batch(layer, len(ids))
        if self.pointers is not None:
            self.pointers.point(layer, ids.ravel().tolist(), low)
        if self.lookahead is not None:
            self.lookahead(layer, ids, hidden)

    def on_logged(self, layer: int, ids) -> None:
        """Layer `layer` ran `ids`, all resident (the runtime let it pass): counted."""
        if self.record is not None:
            self.record.append((layer, ids.tolist()))
        self.cache.hits(layer, ids)

    def evaluating(self, position: int):
        """The context of one llama_decode from sequence position `position`."""
        if self.injector is not None:
            self.injector.position = position
        self.cache.check_reclaim()
        return self.hook.evaluation()

    # ------------------------------------------------------------------ figures
    def routing(self) -> list[tuple[int, list[list[int]]]]:
        """(layer, chosen experts per token) for every MoE layer evaluation, in order (record_routing=True)."""
        if self.record is None:
            raise EdgeMoEError("routing was not recorded: construct with record_routing=True")
        self.hook.drain()
        return self.record

    def auto_decision(self) -> dict:
        """predictor="auto"'s decision: prefetch on or off (None while watching), why, and its figures."""
        if isinstance(self.lookahead, AutoLookahead):
            return self.lookahead.decision
        return {"prefetch": False, "why": self._auto_off}

    def counters(self) -> tuple:
        """The figures stats() reports, copied cheaply: taken after every evaluation (a dict of the cache's totals
        there would cost a large share of a small model's token), formatted when read."""
        self.hook.drain()
        return (self.hook.routes, self.hook.us_per_call, self.tokens.prompt, self.tokens.generated,
                figures.counters(self.cache))

    def stats(self, counters: tuple | None = None) -> dict:
        routes, us_per_call, prompt, generated, cache = self.counters() if counters is None else counters
        return {"routes": routes, "hook_us_per_layer": us_per_call, "hook_native_filter": self.hook.native_filter,
                **figures.summary(self.cache, cache),
                "predictor": AUTO if self.auto else self.lookahead.predictor.name if self.lookahead else None,
                **({"auto_prefetch": self.auto_decision()} if self.auto else {}),
                "routing": routing_label(self.injector),
                "prefetch_depth": self.lookahead.depth if self.lookahead else 0,
                "dense_hold": self.dense.to_dict(),
                "tokens": {"prompt": prompt, "generated": generated}}

    def measured_resident_bytes(self) -> int:
        """Expert bytes in memory as the kernel reports them (mincore over every expert tensor, drops in flight
        finished first): what the memory budget must hold, checked rather than counted."""
        return self.cache.measured_resident_bytes()

    def close(self) -> None:
        self.cache.close()                  # prefetch reads in flight finish before the mapping goes

"""predictor="auto" (the default): prefetch with gate lookahead where it pays, decided on the run's own figures.

Prefetch pays when two things hold:
- the predictor names enough of the experts the next layer will choose: its recall@k at depth 1 passes
  CROSSOVER_RECALL, the recall above which an oracle of known recall made decoding faster
  (bench/results/oracle-prefetch.json, the Qwen3 shape under a memory limit on a 2-core machine: a perfect oracle
  gained 1.07x at 25% with depth 2 and lost at 50% (0.91x); at recall 0.9 every setting lost, 0.68-0.73x, reading
  1.6-2.7x the bytes: a wrong guess evicts an expert a later token would have hit, and on two cores the reads'
  kernel work takes time from compute);
- computing leaves the disk idle: the time a token waits for its reads is a real share of the token
  (MIN_STALL_SHARE: else there is nothing to hide) and shorter than its compute (else the disk is the bottleneck
  already, and every wrong guess takes disk time from the reads needed: BigMoeOnEdge's case).

AutoLookahead runs gate lookahead without prefetching for the first WATCH_TOKENS decoded tokens: each layer's guess
for the next is scored against the next layer's choice, and each token's time is split into waiting for reads (the
cache's stall) and the rest. Then it decides once: on (the lookahead prefetches from then on) or off (it stops;
`on_decided(False)` lets the owner stop reading the hidden state and let resident layers pass in C again).
`decision` says which and why; prompt batches are not watched (a batch reads the next layer whole,
ReadAhead.prefetch_batch). A machine whose reads cost compute less (more cores) may have a lower crossover:
measure it with tools/prefetch_sweep.py.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from edgemoe_llamacpp.cache.predict import Lookahead

AUTO = "auto"               # CacheConfig.predictor's value for this rule
CROSSOVER_RECALL = 1.0       # no recall below 1 paid (module docstring); compared with gate's, at depth 1
MIN_STALL_SHARE = 0.05       # of a decoded token's time, waiting for reads
WATCH_TOKENS = 8             # decoded tokens watched before deciding (64 guesses a layer pair at top-8)


class AutoLookahead:
    """`lookahead` (a Lookahead), on once its predictor's recall and the run's timing say prefetch pays.
    `stall_s()`: the cache's total seconds waiting for reads so far."""

    def __init__(self, lookahead: Lookahead, stall_s: Callable[[], float],
                 on_decided: Callable[[bool], None] | None = None, *, watch: int = WATCH_TOKENS):
        self.lookahead, self.predictor = lookahead, lookahead.predictor
        self.stall_s, self.on_decided, self.watch = stall_s, on_decided, watch
        self.k, self.n_pos = lookahead.k, len(lookahead.layers)
        self.state = "watching"
        self.hits = self.asked = self.tokens = 0
        self.token_s = self.wait_s = 0.0
        self._guess: dict[int, np.ndarray] = {}       # MoE layer position -> the experts guessed for it
        self._mark: tuple[float, float] | None = None  # (clock, stall) when the last decoded token started
        self.decision: dict = {"prefetch": None, "why": f"watching the first {watch} decoded tokens"}

    @property
    def depth(self) -> int:
        return self.lookahead.depth if self.state == "on" else 0

    def __call__(self, layer: int, ids: np.ndarray, hidden: np.ndarray | None = None) -> None:
        if self.state == "on":
            self.lookahead(layer, ids, hidden)
            return
        if self.state == "off":
            return
        self.predictor.observe(layer, ids, hidden)
        if len(ids) != 1:                               # a prompt batch: not what decoding meets
            self._guess.clear()
            self._mark = None
            return
        pos = self.predictor.pos[layer]
        if pos == 0:
            self._clock()
        guess = self._guess.pop(pos, None)
        if guess is not None:
            self.hits += int(np.isin(ids[0], guess).sum())
            self.asked += ids.shape[1]
        if pos + 1 < self.n_pos:
            self._guess[pos + 1] = self.predictor.predict(layer, 1)[: self.k]
        if self.tokens >= self.watch and pos == self.n_pos - 1:
            self.decide()

    def _clock(self) -> None:
        """A decoded token starts: the one before it took from the last mark to now."""
        now, stall = time.perf_counter(), self.stall_s()
        if self._mark is not None:
            self.token_s += now - self._mark[0]
            self.wait_s += stall - self._mark[1]
            self.tokens += 1
        self._mark = (now, stall)

    def decide(self) -> bool:
        """On or off, once, from what was watched; `decision` gives the figures and the reason."""
        recall = self.hits / self.asked if self.asked else 0.0
        token = self.token_s / self.tokens if self.tokens else 0.0
        wait = self.wait_s / self.tokens if self.tokens else 0.0
        compute = token - wait
        on = False
        if recall < CROSSOVER_RECALL:
            why = f"the predictor's recall {recall:.2f} is below the crossover {CROSSOVER_RECALL}"
        elif wait < MIN_STALL_SHARE * token:
            why = f"reads wait {wait * 1e3:.1f} ms of a {token * 1e3:.1f} ms token: nothing to hide"
        elif wait >= compute:
            why = (f"reads wait {wait * 1e3:.1f} ms a token, computing takes {compute * 1e3:.1f} ms: the disk is "
                   "the bottleneck, wrong guesses would take its time")
        else:
            on = True
            why = (f"recall {recall:.2f} passes the crossover {CROSSOVER_RECALL}, and computing ({compute * 1e3:.1f} ms "
                   f"a token) leaves the disk idle beside its {wait * 1e3:.1f} ms of reads")
        self.state = "on" if on else "off"
        self.decision = {"prefetch": on, "why": why, "recall": recall, "crossover_recall": CROSSOVER_RECALL,
                         "watched_tokens": self.tokens, "token_ms": token * 1e3, "read_wait_ms": wait * 1e3,
                         "compute_ms": compute * 1e3}
        self._guess.clear()
        if self.on_decided is not None:
            self.on_decided(on)
        return on

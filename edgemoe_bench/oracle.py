"""An oracle predictor for injected routing: the experts the trace will choose at the next MoE layers, known
before their routers run, kept each with probability `recall` and the rest filled by chance.

What prefetch would gain from a predictor of a given recall, measured on workloads whose routing is injected
(edgemoe_bench.inject), where no real predictor can act. tools/oracle_prefetch.py sweeps the recall.
"""
from __future__ import annotations

import numpy as np

from edgemoe_bench.inject import TraceInjector
from edgemoe_llamacpp.cache.predict import Predictor
from edgemoe_llamacpp.gguf.layout import MoELayout


class OraclePredictor(Predictor):
    """Reads `injector`'s trace rows for the token being decoded. Each true expert of the asked layer is kept with
    probability `recall`; the guess is filled to k with experts the layer does not choose, at random. The draw
    depends on (seed, token position, target layer) only, so a layer asked about from two depths gets one guess,
    and the guesses keep the recall asked for exactly in expectation."""

    def __init__(self, layout: MoELayout, injector: TraceInjector, *, recall: float = 1.0, seed: int = 0):
        super().__init__(layout)
        if not 0.0 <= recall <= 1.0:
            raise ValueError(f"recall must be within [0, 1], not {recall}")
        self.injector, self.recall, self.seed = injector, recall, seed
        self.layers, self.k = layout.moe_layers, layout.n_expert_used
        self.name = "oracle" if recall == 1.0 else f"oracle r={recall:g}"

    def guess(self, position: int, target: int, true: np.ndarray) -> np.ndarray:
        """k experts for MoE layer position `target` of the token at `position`, whose true choice is `true`."""
        if self.recall == 1.0:
            return true.astype(np.int64)
        rng = np.random.default_rng((self.seed, position, target))
        kept = true[rng.random(len(true)) < self.recall]
        others = rng.permutation(np.setdiff1d(np.arange(self.n_expert), true))[: self.k - len(kept)]
        return np.concatenate([kept, others]).astype(np.int64)

    def predict(self, layer: int, depth: int) -> np.ndarray:
        target = self.pos[layer] + depth
        now = self.injector.evaluating
        if target >= self.n_pos or now is None:
            return np.empty(0, dtype=np.int64)
        first, rows = now
        true = rows[-1, self.injector.column[self.layers[target]]]
        return self.guess(first + len(rows) - 1, target, np.asarray(true))

    def scores(self, pos, depth, ids, hidden):
        raise NotImplementedError("the oracle predicts the token under evaluation only (predict)")

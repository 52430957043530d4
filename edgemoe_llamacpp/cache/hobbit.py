"""HOBBIT's cache priority as an eviction policy: weighted recency + frequency + nearness of the layer.

recency = the step of the last use / steps so far, frequency = uses / the highest count (both within the
sequence), nearness = 1 - MoE layers until the expert's layer runs again / L. The step and the highest count
change at every step, so two experts of one layer can change places with neither being touched: no heap by
a fixed key holds the order. Dominance does: an expert last used no later, used no more often and touched
earlier than another scores no higher (float division and addition are monotone, the weights not negative),
and on a tie its older stamp sends it first. So each layer's first victim is on the layer's Pareto front of
(last use, count, stamp), which changes only when a member of the front leaves: an expert coming in has the
newest stamp and never pushes one out. A batch scores every layer's front (a few experts) and orders all the
experts of a layer only once it takes a victim from it: O(L + layers evicted from x experts per layer).
"""
from __future__ import annotations

import heapq

from edgemoe_llamacpp.cache.policies import Policy

# keep priority = weighted recency + frequency + nearness of the expert's layer, each in [0, 1], counted
# from the start of the sequence (HOBBIT's multidimensional cache, without its precision term)
HOBBIT_WEIGHTS = (1.0, 1.0, 1.0)     # (recency, frequency, layer distance)


class Hobbit(Policy):
    """HOBBIT's multidimensional priority, counters reset per sequence."""

    def __init__(self, layer_pos):
        super().__init__(layer_pos)
        self.step = 0                                 # layer evaluations so far
        self.seq_count: dict = {}                     # times chosen in this sequence
        self.last_use: dict = {}                      # the step of the last choice in this sequence
        self.top = 0                                  # the highest count in this sequence
        # resident experts of each layer -> their points (last use, count, stamp, uid)
        self.members: list[dict] = [{} for _ in range(self.n_layers)]
        # each layer's Pareto front: the points no other point dominates (no later in last use, count and stamp
        # alike); None: to be rebuilt from its members
        self.fronts: list[list | None] = [[] for _ in range(self.n_layers)]

    def begin(self, pos):
        super().begin(pos)
        self.step += 1

    def new_sequence(self):
        self.seq_count.clear()
        self.last_use.clear()
        self.top = 0
        for members in self.members:
            for uid, (_, _, stamp, _) in members.items():
                members[uid] = (0, 0, stamp, uid)
        self.fronts = [None] * self.n_layers

    def _count(self, uid, n):
        c = self.seq_count[uid] = self.seq_count.get(uid, 0) + n
        self.top = max(self.top, c)
        self.last_use[uid] = self.step

    def _touch(self, uid):
        pos = self.layer_pos[uid.layer]
        if uid in self.stamp:
            self._leave(pos, uid)
        super()._touch(uid)
        p = self.members[pos][uid] = (self.last_use.get(uid, 0), self.seq_count.get(uid, 0), self.stamp[uid], uid)
        front = self.fronts[pos]
        if front is not None:
            self.ops += len(front)
            if not any(q[0] <= p[0] and q[1] <= p[1] for q in front):      # every stamp is older than p's
                front.append(p)

    def remove(self, uid):
        self._leave(self.layer_pos[uid.layer], uid)
        super().remove(uid)

    def _leave(self, pos: int, uid) -> None:
        p = self.members[pos].pop(uid)
        front = self.fronts[pos]
        if front is not None and p in front:
            self.fronts[pos] = None

    def clear(self):
        super().clear()
        self.members = [{} for _ in range(self.n_layers)]
        self.fronts = [[] for _ in range(self.n_layers)]

    def _front(self, pos: int) -> list:
        front = self.fronts[pos]
        if front is None:
            front = self.fronts[pos] = []
            for p in sorted(self.members[pos].values()):        # a dominator sorts first
                for q in front:
                    if q[1] <= p[1] and q[2] <= p[2]:           # and q[0] <= p[0], by the sort
                        break
                else:
                    front.append(p)
            self.ops += len(self.members[pos])
        return front

    def _keyed(self, points) -> list[tuple]:
        """(keep priority, stamp, position, uid) of (position, point)s at this step: order_key, and where."""
        w_recency, w_freq, w_dist = HOBBIT_WEIGHTS
        step, top, n = self.step, self.top, self.n_layers
        near = [1.0 - ((pos - self.current) % n or n) / n for pos in range(n)]
        self.ops += len(points)
        return [(w_recency * (r / step if step else 0.0) + w_freq * (f / top if top else 0.0) + w_dist * near[pos],
                 stamp, pos, uid) for pos, (r, f, stamp, uid) in points]

    def order_key(self, uid):
        pos = self.layer_pos[uid.layer]
        return tuple(self._keyed([(pos, self.members[pos][uid])])[0][:2])

    def ranked(self):
        """All fronts' points in one heap; a layer's other experts join it, in order, from its first victim."""
        heads = self._keyed([(pos, p) for pos, members in enumerate(self.members) if members
                             for p in self._front(pos)])
        heapq.heapify(heads)
        rest: dict[int, list] = {}     # layer -> its experts off the front, last to evict first
        while heads:
            *_, pos, uid = heapq.heappop(heads)
            yield uid
            if pos not in rest:
                front = self.fronts[pos]
                rest[pos] = sorted(self._keyed([(pos, p) for p in self.members[pos].values() if p not in front]),
                                   reverse=True)
                if rest[pos]:
                    heapq.heappush(heads, rest[pos].pop())
            elif rest[pos] and self.members[pos][uid] not in self.fronts[pos]:
                heapq.heappush(heads, rest[pos].pop())

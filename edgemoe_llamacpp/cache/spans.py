"""Which pages of the model's files are whose: each expert's whole pages inside its tensor, their cost in pages,
and the edge pages two experts share. Pure bookkeeping over the layout; storage.ExpertStorage reads and drops
them.

A split model's shards are separate files: a byte is keyed by `file << FILE_BITS | offset` (`key`), so spans of
different files never merge.
"""
from __future__ import annotations

from edgemoe_llamacpp import pages
from edgemoe_llamacpp.gguf.constants import FILE_BITS, LOWBIT
from edgemoe_llamacpp.gguf.layout import ExpertUID, MoELayout


def key(file: int, offset: int) -> int:
    """The storage key of byte `offset` of the model's file `file` (0 for a single file: the offset)."""
    return file << FILE_BITS | offset


def file_span(file: int, span: tuple[int, int]) -> tuple[int, int]:
    return key(file, span[0]), key(file, span[1])


def tensor_span(offset: int, size: int) -> tuple[int, int]:
    """The whole pages inside a tensor. A page it shares with a neighbour tensor counts as dense: dropping it
    would make the neighbour fault, and the fault's read-around would pull experts back in."""
    return -(-offset // pages.PAGE) * pages.PAGE, (offset + size) // pages.PAGE * pages.PAGE


def clip(span: tuple[int, int], bounds: tuple[int, int]) -> tuple[int, int]:
    a = max(span[0], bounds[0])
    return a, max(a, min(span[1], bounds[1]))


class ExpertPages:
    """Each expert's pages and their cost, in whole pages (the unit the kernel keeps, so mincore can check the
    bookkeeping)."""

    def __init__(self, layout: MoELayout):
        self.layout = layout
        self.tensor_spans = {t.name: file_span(t.file, tensor_span(t.offset, t.nbytes)) for t in layout.expert_tensors}
        self.tensor_spans |= {LOWBIT + t.name: file_span(t.low.file, tensor_span(t.low.offset, t.low.stride * t.count))
                              for t in layout.expert_tensors if t.low is not None}
        self.pinned_edge_bytes = 0    # edge pages the kernel would not drop (storage.drop_all): counted as dense
        self._set_spans()

    def _set_spans(self) -> None:
        """Each expert's pages (whole pages inside its tensor's span) and their cost."""
        self.spans: dict[ExpertUID, list[tuple[int, int]]] = {}
        self.cost: dict[ExpertUID, int] = {}
        self.edge_owners: dict[int, list[ExpertUID]] = {}     # first or last page of a span -> the experts it is of
        for x in self.layout.experts:
            self._add(ExpertUID(x.layer, x.expert), x.ranges)
        self.full_cost = sum(self.cost.values())      # every expert at full precision
        for (layer, e), ranges in self.layout.low_experts.items():
            self._add(ExpertUID(layer, e, True), ranges)

    def _add(self, uid: ExpertUID, ranges) -> None:
        spans = [clip(file_span(r.file, pages.page_span(r.offset, r.size)), self.tensor_spans[r.tensor])
                 for r in ranges]
        self.spans[uid] = spans
        self.cost[uid] = sum(b - a for a, b in spans)
        for a, b in spans:
            if b > a:
                self.edge_owners.setdefault(a, []).append(uid)
                self.edge_owners.setdefault(b - pages.PAGE, []).append(uid)

    def unshared_spans(self, uid: ExpertUID, resident) -> list[tuple[int, int]]:
        """`uid`'s spans less the edge pages it shares with an expert in `resident` (experts not whole pages
        share a page with each neighbour): dropping one would make the neighbour fault it back."""
        out = []
        for a, b in self.spans[uid]:
            if b > a and any(o != uid and o in resident for o in self.edge_owners[a]):
                a += pages.PAGE
            if b > a and any(o != uid and o in resident for o in self.edge_owners[b - pages.PAGE]):
                b -= pages.PAGE
            if b > a:
                out.append((a, b))
        return out

    def one_layer_cost(self) -> int:
        """The largest experts one token can choose in one layer: the least a budget must hold."""
        k = self.layout.n_expert_used
        return max(sum(sorted(c for uid, c in self.cost.items() if uid.layer == layer and not uid.low)[-k:])
                   for layer in self.layout.moe_layers)

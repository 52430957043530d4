"""The page cache before the compute-alone reference: every byte the reference run will read, so that it waits
for no read. The whole file where memory holds it; otherwise, as for a model larger than RAM, what the run
touches: the dense bytes and the experts its routing chose, known from an earlier run of the same (greedy or
injected, so repeatable) evaluation."""
from __future__ import annotations

import os

from edgemoe_bench.cgroup import WARM_CHUNK
from edgemoe_llamacpp import pages
from edgemoe_llamacpp.engine.loading import dense_spans
from edgemoe_llamacpp.gguf.layout import MoELayout


def touched_spans(layout: MoELayout, trace) -> list[list[tuple[int, int]]]:
    """Per file of the model, the page-aligned [start, end) ranges a run with routing `trace` ((layer, chosen
    experts per token) per MoE evaluation, as edgemoe_trace() gives it) reads: dense bytes and chosen experts."""
    used = {(layer, int(e)) for layer, rows in trace for row in rows for e in row}
    spans: list[list[tuple[int, int]]] = [list(dense_spans(layout, i)) for i in range(len(layout.files))]
    for x in layout.experts:
        if (x.layer, x.expert) in used:
            for r in x.ranges:
                spans[r.file].append((r.offset, r.offset + r.size))
    return [pages.merge_spans(pages.page_span(a, b - a) for a, b in file_spans) for file_spans in spans]


def span_bytes(spans: list[list[tuple[int, int]]]) -> int:
    return sum(b - a for file_spans in spans for a, b in file_spans)


def warm_spans(layout: MoELayout, spans: list[list[tuple[int, int]]]) -> int:
    """Read `spans` (per file, as touched_spans gives them) into the page cache; the bytes of them cached after."""
    for path, file_spans in zip(layout.files, spans, strict=True):
        fd = os.open(path, os.O_RDONLY)
        try:
            buf = bytearray(WARM_CHUNK)
            for a, b in file_spans:
                for off in range(a, b, WARM_CHUNK):
                    os.preadv(fd, [memoryview(buf)[:min(WARM_CHUNK, b - off)]], off)
        finally:
            os.close(fd)
    return sum(pages.file_cached_bytes(path, file_spans) for path, file_spans in zip(layout.files, spans, strict=True))

"""Loading under a budget: read the dense weights, not the experts.

Stock llama.cpp reads the whole file at load (MAP_POPULATE + MADV_WILLNEED). Under a memory budget edgemoe maps it
without that (LLAMA_MMAP_PREFETCH=0, patches/0003) and then, before the first evaluation:
- advises MADV_RANDOM over the whole mapping, so no page fault reads around the faulting page (a first touch of
  a dense tensor would otherwise read up to a readahead window of the expert bytes beside it, and a later
  refault the same);
- reads the dense byte ranges (everything but the expert tensors and their low-bit copies) with readahead(2) on
  the file, in exact ranges: the first evaluation then faults them in from the page cache, reading nothing more;
- holds them where the kernel cannot reclaim them (hold_dense: mlock, or an anonymous copy), so pressure from
  the experts' reads never makes a token fault its dense weights back in.
Experts are read by the cache, by explicit readahead of their own ranges, which MADV_RANDOM does not affect.
"""
from __future__ import annotations

import os

from edgemoe_llamacpp import pages
from edgemoe_llamacpp.cache import dense_hold
from edgemoe_llamacpp.gguf.layout import MoELayout


def expert_spans(layout: MoELayout, file: int = 0) -> list[tuple[int, int]]:
    """Every expert tensor's and low-bit copy's [start, end) range in the model's file `file`, merged, ascending."""
    spans = [(t.offset, t.offset + t.nbytes) for t in layout.expert_tensors if t.file == file]
    spans += [(t.low.offset, t.low.offset + t.low.stride * t.count) for t in layout.expert_tensors
              if t.low and t.low.file == file]
    return pages.merge_spans(spans)


def dense_spans(layout: MoELayout, file: int = 0) -> list[tuple[int, int]]:
    """The [start, end) ranges of file `file` outside the expert tensors: header, metadata, dense tensors."""
    out, at = [], 0
    for a, b in expert_spans(layout, file):
        if a > at:
            out.append((at, a))
        at = max(at, b)
    if at < layout.file_sizes[file]:
        out.append((at, layout.file_sizes[file]))
    return out


def dense_read_bytes(layout: MoELayout) -> int:
    """Bytes the dense reads cover, whole pages, over every file (what a budgeted load should read, give or take)."""
    return sum(b - a for i in range(len(layout.files))
               for a, b in (pages.page_span(s, e - s) for s, e in dense_spans(layout, i)))


def read_dense(layout: MoELayout, mappings: list[list[tuple[int, int, int, str]]]) -> None:
    """After llama.cpp mapped the files (`mappings[i]`: pages.file_mappings rows of file i, the pieces llama.cpp
    kept mapped) without populating them: read-around off, then the dense bytes."""
    for start, end, _, _ in (m for rows in mappings for m in rows):
        pages.madvise(start, end - start, pages.MADV_RANDOM)
    for i, path in enumerate(layout.files):
        fd = os.open(path, os.O_RDONLY)
        try:
            for start, end in dense_spans(layout, i):
                a, b = pages.page_span(start, end - start)
                pages.readahead(fd, a, b - a)
        finally:
            os.close(fd)


def hold_dense(layout: MoELayout, mappings: list[list[tuple[int, int, int, str]]], mode: str) -> dense_hold.DenseHold:
    """Hold the dense bytes of llama.cpp's mappings of the files (`mappings[i]`: file i's rows) where the kernel
    cannot reclaim them (dense_hold.py), after the expert cache's start-up drop and before the first evaluation."""
    held = []
    for i, path in enumerate(layout.files):
        fd = os.open(path, os.O_RDONLY)
        try:
            held.append(dense_hold.hold_dense(mode, dense_spans(layout, i), mappings[i], fd))
        finally:
            os.close(fd)
    return dense_hold.DenseHold.combined(held)

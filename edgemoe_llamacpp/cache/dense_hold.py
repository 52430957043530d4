"""Dense weights held where the kernel cannot reclaim them.

Under a memory limit the dense weights (attention, embeddings, norms, routers, shared experts) are file pages
like the experts: when the page cache runs short, the kernel reclaims some of them and every token faults them
back during compute, outside the expert cache's control. Far past RAM that is most of a token's wait. Held:
- "mlock": the dense pages of llama.cpp's mapping are locked (mlock(2)): no copy, nothing more to read. Needs
  CAP_IPC_LOCK or a RLIMIT_MEMLOCK as large as the dense bytes (the soft limit is raised to the hard one first).
- "copy": each dense range of the mapping is replaced, in place, by an anonymous read-only copy of its bytes
  (mremap over it), and the file's pages are dropped: anonymous memory with no swap is never reclaimed.
- "auto" (default): mlock where the limits allow it, else copy. "off": leave them to the kernel.

A page shared by a dense tensor and an expert is held with the dense bytes: the expert cache never drops it
(storage.tensor_span leaves it out of every expert's pages).
"""
from __future__ import annotations

import errno
import logging
import resource
from dataclasses import dataclass

from edgemoe_llamacpp import pages
from edgemoe_llamacpp.errors import ArgumentError

log = logging.getLogger(__name__)

HOLD_MODES = ("auto", "mlock", "copy", "off")
COPY_PIECE = 64 << 20         # the copy replaces the mapping this much at a time: little extra memory at once


def check_mode(mode) -> str:
    if mode not in HOLD_MODES:
        raise ArgumentError(f"hold_dense must be one of {', '.join(HOLD_MODES)}, not {mode!r}")
    return mode


@dataclass
class DenseHold:
    """How the dense pages are held: `mode` ("mlock", "copy" or "off"), `bytes` held, and each held piece as
    (address, length)."""
    mode: str
    bytes: int
    pieces: list[tuple[int, int]]

    @classmethod
    def combined(cls, holds: list[DenseHold]) -> DenseHold:
        """One record of several files' holds (a split model): the mode of those that held anything."""
        modes = {h.mode for h in holds if h.mode != "off"}
        return cls("+".join(sorted(modes)) or "off", sum(h.bytes for h in holds), [p for h in holds for p in h.pieces])

    def resident_bytes(self) -> int:
        """Of the held bytes, those in memory now (mincore)."""
        return sum(pages.resident_bytes(a, n) for a, n in self.pieces)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "bytes": self.bytes, "resident_bytes": self.resident_bytes()}


def raise_memlock_limit() -> None:
    """Raise this process's soft RLIMIT_MEMLOCK to its hard limit. With CAP_IPC_LOCK the limit does not apply:
    whether a lock is allowed is found by trying (hold_dense falls back to a copy on refusal)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or hard > soft):
        try:
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (hard, hard))
        except (ValueError, OSError):
            pass


def _lock(pieces: list[tuple[int, int]]) -> None:
    done = []
    try:
        for addr, n in pieces:
            pages.mlock(addr, n)
            done.append((addr, n))
    except OSError:
        for a, m in done:
            pages.munlock(a, m)
        raise


def _copy(pieces: list[tuple[int, int, int]], fd: int) -> None:
    for addr, n, off in pieces:
        for at in range(0, n, COPY_PIECE):
            m = min(COPY_PIECE, n - at)
            pages.replace_with_anonymous_copy(addr + at, m)    # faults the file pages in (read_dense queued them)
            pages.fadvise_dontneed(fd, off + at, m)


def held_pieces(dense: list[tuple[int, int]], mappings) -> list[tuple[int, int, int]]:
    """(address, length, file offset) of the whole pages covering the dense file ranges `dense`, within the parts of
    the file llama.cpp keeps mapped (`mappings`: pages.file_mappings rows)."""
    out = []
    for start, end, off, _ in mappings:
        for a, b in dense:
            a, b = pages.page_span(a, b - a)
            lo, hi = max(a, off), min(b, off + end - start)
            if lo < hi:
                out.append((start + lo - off, hi - lo, lo))
    return sorted(out)


def hold_dense(mode: str, dense: list[tuple[int, int]], mappings, fd: int) -> DenseHold:
    """Hold the dense file ranges `dense` of llama.cpp's mapping (`mappings`) as `mode` says; `fd` is the file,
    for the copy's drop of the file pages. Before the first evaluation only: the copy replaces pages under
    llama.cpp's tensors."""
    pieces = held_pieces(dense, mappings)
    total = sum(n for _, n, _ in pieces)
    if mode == "off" or not pieces:
        return DenseHold("off", 0, [])
    if mode in ("auto", "mlock"):
        raise_memlock_limit()
        try:
            _lock([(a, n) for a, n, _ in pieces])
            return DenseHold("mlock", total, [(a, n) for a, n, _ in pieces])
        except OSError as e:
            if mode == "mlock" or e.errno not in (errno.EPERM, errno.ENOMEM, errno.EAGAIN):
                raise
            log.info("mlock of %s dense bytes refused (%s): holding an anonymous copy instead", f"{total:,}", e)
    _copy(pieces, fd)
    return DenseHold("copy", total, [(a, n) for a, n, _ in pieces])

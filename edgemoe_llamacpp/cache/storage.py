"""Expert bytes in llama.cpp's mapping of the file: their pages, reading them in, dropping them.

An expert is resident when the page-cache pages of its byte ranges are. Fetching reads those exact
ranges (readahead(2) of each range, then either MADV_POPULATE_READ on llama.cpp's mapping from parallel threads,
or nothing more: llama.cpp's page faults wait for the pages as it computes; `pread` where readahead is
unavailable; adjacent ranges merged so a prompt batch reads a layer sequentially);
dropping removes the pages from llama.cpp's mapping (`MADV_DONTNEED`) and from the page cache
(`POSIX_FADV_DONTNEED`). Costs are counted in whole pages, the unit the kernel keeps, so `mincore` can check
the bookkeeping. Every madvise/fadvise call on the mapped experts lives here.

A split model's shards are separate files and separate mappings: a byte is keyed by `file << FILE_BITS | offset`
(`key`), so spans of different files never merge, and each key finds its file's descriptor and mapping.
"""
from __future__ import annotations

import logging
import os
import resource
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from edgemoe_llamacpp import pages
from edgemoe_llamacpp.cache.spans import ExpertPages, clip, file_span
from edgemoe_llamacpp.gguf.constants import FILE_BITS, LOWBIT
from edgemoe_llamacpp.gguf.layout import ExpertUID, MoELayout

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 20          # one pread asks for at most this: full disk speed, little buffer memory
_OFFSET = (1 << FILE_BITS) - 1


def _thread_major_faults() -> int:
    return resource.getrusage(resource.RUSAGE_THREAD).ru_majflt


def _all_of(parts: list[Future]) -> Future:
    """A future done when every one of `parts` is: their results summed, or the first exception."""
    out: Future = Future()
    out.set_running_or_notify_cancel()
    left = [len(parts)]
    lock = threading.Lock()

    def one_done(_):
        with lock:
            left[0] -= 1
            if left[0]:
                return
        errors = [f.exception() for f in parts if not f.cancelled() and f.exception() is not None]
        if errors:
            out.set_exception(errors[0])
        else:
            out.set_result(sum(f.result() for f in parts if not f.cancelled()))

    if not parts:
        out.set_result(0)
    for f in parts:
        f.add_done_callback(one_done)
    return out


class ExpertStorage(ExpertPages):
    """Fetch experts' pages (demand reads on one pool, prefetch reads on another) and drop them, in llama.cpp's
    mapping of the file, based at `base` once attached (ExpertPages: which pages are whose, and their cost)."""

    def __init__(self, layout: MoELayout, *, threads: int = 4, prefetch_threads: int = 2):
        super().__init__(layout)
        self.bases = [0] * len(layout.files)          # per file: address of its offset 0 in llama.cpp's mapping
        self.mapped = [file_span(i, (0, size)) for i, size in enumerate(layout.file_sizes)]   # what llama.cpp keeps
        # Fetch into llama.cpp's mapping (readahead + MADV_POPULATE_READ): the experts arrive mapped and
        # referenced, so memory pressure reclaims other pages first, and no copy is made; pread takes more
        # major faults under a cgroup limit (BENCHMARKS.md).
        self.populate = True
        self._open(threads, prefetch_threads)

    def _open(self, threads: int, prefetch_threads: int) -> None:
        self.prefetch_threads = prefetch_threads
        self.fds: list[int] = []
        for path in self.layout.files:
            self.fds.append(os.open(path, os.O_RDONLY))
            os.posix_fadvise(self.fds[-1], 0, 0, os.POSIX_FADV_RANDOM)   # our reads: exact ranges, no readahead
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="edgemoe-fetch")
        # prefetch reads run on their own threads, so demand fetches never queue behind them
        self.prefetch_pool = ThreadPoolExecutor(max_workers=prefetch_threads, thread_name_prefix="edgemoe-pre")
        # drops made ahead of need run on their own thread, in order, while llama.cpp computes
        self.drop_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgemoe-drop")
        self._drops: list[Future] = []
        self._local = threading.local()
        # major faults taken by our own reads (MADV_POPULATE_READ maps pages by faulting them): a process's
        # faults less these are the faults of computing, pages llama.cpp found missing
        self.major_faults = 0
        self._faults_lock = threading.Lock()

    def attach(self, bases, mapped=None) -> None:
        """Bind to llama.cpp's mappings: `bases[i]` is the address of file i's offset 0, `mapped[i]` the (start,
        end) offsets of file i it keeps mapped (default: whole files)."""
        assert len(bases) == len(self.layout.files)
        self.bases = list(bases)
        if mapped is not None:
            self.mapped = [file_span(i, span) for i, span in enumerate(mapped)]

    base = property(lambda self: self.bases[0], doc="address of (the first) file's offset 0 in llama.cpp's mapping")
    fd = property(lambda self: self.fds[0] if self.fds else -1, doc="(the first) file's descriptor")

    def address(self, at: int) -> int:
        """Where the byte keyed `at` lies in llama.cpp's mapping."""
        return self.bases[at >> FILE_BITS] + (at & _OFFSET)

    def fd_of(self, at: int) -> int:
        return self.fds[at >> FILE_BITS]

    def in_memory(self, uid: ExpertUID) -> bool:
        return all(pages.resident_bytes(self.address(a), b - a) == b - a for a, b in self.spans[uid])

    # ------------------------------------------------------------------ fetch
    def _chunks(self, uids: list[ExpertUID]) -> list[tuple[int, int]]:
        # adjacent experts of one tensor become one sequential read
        merged = pages.merge_spans(s for u in uids for s in self.spans[u])
        return [(off, min(READ_CHUNK, b - off)) for a, b in merged for off in range(a, b, READ_CHUNK)]

    def fetch(self, uids: list[ExpertUID], *, wait: bool = True) -> int:
        """Read `uids` in; the bytes read. wait=False returns once every read is queued: llama.cpp's own page
        faults then wait for each page as it computes, so its work on the experts and pages already in memory
        overlaps the rest of the reads (a fault on a page being read waits for that read; none is issued
        twice). With wait (and where reads cannot be queued) every page is in memory and mapped on return."""
        self.settle()                          # room made by drops still running, and no drop after a read
        chunks = self._chunks(uids)
        if self.populate:
            try:
                for off, size in chunks:       # queue every read at once, then map them as they land
                    pages.readahead(self.fd_of(off), off & _OFFSET, size)
                if not wait:
                    return sum(size for _, size in chunks)
                return sum(self.pool.map(self.populate_chunk, chunks))
            except OSError as e:               # MADV_POPULATE_READ needs Linux 5.14
                log.warning("mapped fetch unavailable (%s): reading with pread", e)
                self.populate = False
        return sum(self.pool.map(self._read, chunks))

    def submit(self, uid: ExpertUID) -> Future:
        """Start reading `uid` in the background (a prefetch); the future gives the bytes read."""
        self.settle()
        return self.prefetch_pool.submit(self._read_expert, uid)

    def submit_many(self, uids: list[ExpertUID]) -> Future:
        """Start reading `uids` in the background as one request (a prompt batch's next layer): their spans merged
        into large sequential reads, queued at once, then mapped by every prefetch thread, each taking a
        contiguous share. The future gives the bytes read once all have landed."""
        self.settle()
        chunks = self._chunks(uids)
        n = self.prefetch_threads
        shares = [chunks[i * len(chunks) // n:(i + 1) * len(chunks) // n] for i in range(n)]
        parts = [self.prefetch_pool.submit(self._read_chunks, share) for share in shares if share]
        return _all_of(parts)

    def _read_chunks(self, chunks: list[tuple[int, int]]) -> int:
        try:
            if self.populate:
                for off, size in chunks:
                    pages.readahead(self.fd_of(off), off & _OFFSET, size)
                return sum(self.populate_chunk(c) for c in chunks)
        except OSError as e:
            log.debug("read ahead by mapping failed (%s): pread", e)
        return sum(self._read(c) for c in chunks)

    def _read_expert(self, uid: ExpertUID) -> int:
        return self._read_chunks(self._chunks([uid]))

    def populate_chunk(self, chunk: tuple[int, int]) -> int:
        off, size = chunk
        before = _thread_major_faults()
        try:
            pages.madvise(self.address(off), size, pages.MADV_POPULATE_READ)
        finally:
            self._count_faults(before)
        return size

    def _read(self, chunk: tuple[int, int]) -> int:
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = bytearray(READ_CHUNK)
        off, size = chunk
        return os.preadv(self.fd_of(off), [memoryview(buf)[:size]], off & _OFFSET)

    def _count_faults(self, before: int) -> None:
        n = _thread_major_faults() - before
        if n:
            with self._faults_lock:
                self.major_faults += n

    # ------------------------------------------------------------------ drop
    def drop(self, uid: ExpertUID, resident=()) -> None:
        """Drop `uid`'s pages, but for edge pages it shares with experts in `resident`."""
        self.drop_spans(self.unshared_spans(uid, resident))

    def drop_later(self, uids: list[ExpertUID], resident=()) -> None:
        """Drop `uids` on the drop thread (but for edge pages shared with experts in `resident`); `settle` waits for
        it. The caller reads nothing into the room they free before settling, so memory holds what the budget
        counts."""
        spans = [s for u in uids for s in self.unshared_spans(u, resident)]
        self._drops.append(self.drop_pool.submit(self.drop_spans, spans))

    def settle(self) -> None:
        """Wait for every drop started by drop_later."""
        drops, self._drops = self._drops, []
        for f in drops:
            f.result()

    def drop_low_copies(self) -> None:
        """Release every low-bit copy's pages (a budget that holds every expert never runs them)."""
        self.drop_spans([s for name, s in self.tensor_spans.items() if name.startswith(LOWBIT)])

    def drop_spans(self, spans) -> None:
        for a, b in spans:
            pages.madvise(self.address(a), b - a, pages.MADV_DONTNEED)
            pages.fadvise_dontneed(self.fd_of(a), a & _OFFSET, b - a)

    def drop_all(self) -> None:
        """Start-up: release every expert page the load pulled in. Edge pages that still would not drop are
        left out of every expert's span and counted in `pinned_edge_bytes`."""
        self.settle()
        for fd in self.fds:
            pages.flush(fd)       # dirty pages (a file just written or copied) cannot be dropped
        whole = list(self.tensor_spans.values())
        self.drop_spans(whole)
        split_edge_folios(self, whole)
        # Whatever edge pages still would not drop (a folio another process maps, say) stay resident for good:
        # count them as dense and leave them out of every expert's span.
        for name, (a, b) in self.tensor_spans.items():
            vec = pages.mincore_pages(self.address(a), b - a)
            lead = min(len(vec) - len(vec.lstrip(b"\x01")), pages.MAX_FOLIO_PAGES)
            trail = min(len(vec) - len(vec.rstrip(b"\x01")), pages.MAX_FOLIO_PAGES, len(vec) - lead)
            self.tensor_spans[name] = (a + lead * pages.PAGE, b - trail * pages.PAGE)
            self.pinned_edge_bytes += (lead + trail) * pages.PAGE
        self._set_spans()
        # Faults on expert pages read the page, no read-around: over the whole tensors, edge pages included.
        # Those stay resident only as long as the kernel keeps their folio (reclaim may take it later); a fault
        # on one then reads that page alone, not a read-ahead window of neighbouring experts (8 MB here).
        for a, b in whole:
            pages.madvise(self.address(a), b - a, pages.MADV_RANDOM)

    # ------------------------------------------------------------------ measurement
    def measured_resident_bytes(self, file: int | None = None) -> int:
        """Expert bytes in memory as the kernel reports them (mincore over every expert tensor; of file `file`
        alone if given)."""
        self.settle()
        return sum(pages.resident_bytes(self.address(a), b - a) for a, b in self.tensor_spans.values()
                   if file is None or a >> FILE_BITS == file)

    def close(self) -> None:
        self.prefetch_pool.shutdown(wait=True, cancel_futures=True)
        self.pool.shutdown(wait=True)
        self.drop_pool.shutdown(wait=True)
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)


def split_edge_folios(storage: ExpertStorage, spans: list[tuple[int, int]]) -> None:
    """The load reads the file in large page-cache folios (up to 2 MiB, naturally aligned); one that
    straddles a tensor edge stays mapped for its dense part and cannot be dropped. Unmap and drop the
    aligned block around each edge, then read its dense pages back one page at a time (this fd reads
    without readahead): the block's folios then end at the edge, and its expert pages can be dropped."""
    block = pages.MAX_FOLIO_PAGES * pages.PAGE
    # an edge whose expert-side page dropped has no straddling folio (a load that read the dense ranges in
    # exact pieces, loading.read_dense, leaves none): nothing to split or read back there
    edges = {x for a, b in spans for x, page in ((a, a), (b, b - pages.PAGE))
             if x % block and b > a and pages.mincore_pages(storage.address(page), pages.PAGE)[0] & 1}
    for x in sorted(edges):
        lo, hi = clip((x // block * block, x // block * block + block), storage.mapped[x >> FILE_BITS])
        dense = [(lo, hi)]
        for a, b in spans:
            dense = [piece for c, d in dense for piece in ((c, min(d, a)), (max(c, b), d)) if piece[0] < piece[1]]
        storage.drop_spans([(lo, hi)])
        for a, b in dense:
            for off in range(a, b, READ_CHUNK):
                os.pread(storage.fd_of(off), min(READ_CHUNK, b - off), off & _OFFSET)
        pages.madvise(storage.address(lo), hi - lo, pages.MADV_RANDOM)

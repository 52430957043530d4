"""Pages of mapped files and the libc calls on them: madvise, fadvise, readahead, mincore, mlock, and the
mapping of a file in this process. No llama.cpp: what the cache and the loader do to memory."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

PAGE = mmap.PAGESIZE
MAX_FOLIO_PAGES = (2 << 20) // PAGE   # the largest page-cache folio (PMD size on x86-64)

MADV_RANDOM = 1           # asm-generic/mman-common.h
MADV_DONTNEED = 4
MADV_POPULATE_READ = 22   # Linux 5.14+
POSIX_FADV_DONTNEED = 4   # linux/fadvise.h

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


_libc.readahead.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_size_t]
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MAP_FAILED = ctypes.c_void_p(-1).value


def readahead(fd: int, offset: int, length: int) -> None:
    """Queue reads of a file range into the page cache (readahead(2); ignores POSIX_FADV_RANDOM)."""
    if _libc.readahead(fd, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"readahead: {os.strerror(err)}")


def madvise(addr: int, length: int, advice: int) -> None:
    if _libc.madvise(addr, length, advice) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"madvise({addr:#x}, {length}, {advice}): {os.strerror(err)}")


def fadvise_dontneed(fd: int, offset: int, length: int) -> None:
    os.posix_fadvise(fd, offset, length, POSIX_FADV_DONTNEED)


def flush(fd: int) -> None:
    """Write back a file's dirty pages so that POSIX_FADV_DONTNEED can drop them."""
    try:
        os.fdatasync(fd)
    except OSError:
        pass        # a read-only filesystem has no dirty pages


_libc.mlock.argtypes = _libc.munlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
_libc.mremap.restype = ctypes.c_void_p
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2


def _os_error(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def mlock(addr: int, length: int) -> None:
    """Lock [addr, addr+length) in memory (mlock(2)): its pages are read in and never reclaimed."""
    if _libc.mlock(addr, length) != 0:
        raise _os_error("mlock")


def munlock(addr: int, length: int) -> None:
    _libc.munlock(addr, length)


def replace_with_anonymous_copy(addr: int, length: int) -> None:
    """Replace the mapping over [addr, addr+length) (page-aligned) by an anonymous read-only copy of its bytes, in
    place: a private anonymous mapping is filled from it, made read-only and moved over it (mremap)."""
    new = _libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if new in (None, MAP_FAILED):
        raise _os_error("mmap")
    try:
        ctypes.memmove(new, addr, length)
        if _libc.mprotect(new, length, mmap.PROT_READ) != 0:
            raise _os_error("mprotect")
        if _libc.mremap(new, length, length, MREMAP_MAYMOVE | MREMAP_FIXED, addr) in (None, MAP_FAILED):
            raise _os_error("mremap")
    except BaseException:
        _libc.munmap(new, length)
        raise


def mincore_pages(addr: int, length: int) -> bytes:
    """One byte per page of [addr, addr+length) (addr page-aligned): bit 0 set if the page is in memory."""
    return bytes(mincore_runs([(addr, length)]))


def mincore_runs(runs: list[tuple[int, int]]) -> bytearray:
    """mincore_pages of each (addr, length) of `runs` (page-aligned), end to end in one buffer: one system call
    per run and nothing more per run in Python."""
    counts = [(length + PAGE - 1) // PAGE for _, length in runs]
    vec = bytearray(sum(counts))
    at = ctypes.addressof((ctypes.c_char * len(vec)).from_buffer(vec)) if vec else 0
    for (addr, length), n in zip(runs, counts, strict=True):
        if _libc.mincore(addr, length, at) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mincore: {os.strerror(err)}")
        at += n
    return vec


def resident_bytes(addr: int, length: int) -> int:
    """Bytes of the pages in [addr, addr+length) that mincore reports in memory."""
    return sum(v & 1 for v in mincore_pages(addr, length)) * PAGE


@contextlib.contextmanager
def _file_mapping(fd: int, start: int, length: int) -> Iterator[int]:
    """The address of a read-only shared mapping of the file's [start, start + length) (start page-aligned), made
    with libc: mapping reads nothing, and no Python buffer is exported, so an interrupt at any point leaves
    nothing that keeps the mapping from closing."""
    addr = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
    if addr in (None, MAP_FAILED):
        err = ctypes.get_errno()
        raise OSError(err, f"mmap: {os.strerror(err)}")
    try:
        yield addr
    finally:
        _libc.munmap(addr, length)


def fd_resident_pages(fd: int, start: int, length: int) -> bytes:
    """mincore of the file's pages over [start, start + length) (start page-aligned)."""
    with _file_mapping(fd, start, length) as addr:
        return mincore_pages(addr, length)


def file_cached_bytes(path: str | os.PathLike, spans=None) -> int:
    """Bytes of `path` in the page cache (of its page-aligned `spans`, [start, end) file offsets; default the whole
    file), seen from any process: mincore over a read-only shared mapping of it (mapping reads nothing)."""
    size = os.path.getsize(path)
    if not size:
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        with _file_mapping(fd, 0, size) as addr:
            return sum(resident_bytes(addr + a, b - a) for a, b in spans) if spans is not None else \
                min(size, resident_bytes(addr, size))
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror} ({path})") from None
    finally:
        os.close(fd)


def page_span(offset: int, size: int) -> tuple[int, int]:
    """The page-aligned [start, end) that covers a byte range."""
    return offset // PAGE * PAGE, (offset + size + PAGE - 1) // PAGE * PAGE


def merge_spans(spans) -> list[tuple[int, int]]:
    """[start, end) ranges sorted, overlapping or touching ones joined."""
    merged: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def file_mappings(path: str | os.PathLike) -> list[tuple[int, int, int, str]]:
    """(start, end, file offset, perms) of every mapping of `path` in this process (/proc/self/maps)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    inode = f"{st.st_ino}"
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[4] == inode and parts[5] == real:
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.append((start, end, int(parts[2], 16), parts[1]))
    return out

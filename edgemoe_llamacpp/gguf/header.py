"""The GGUF header reader: metadata fields and tensor infos from exact preads, every length, count and dimension
checked against the file before it is read, and the pages the read brought in dropped again. gguf-py's reader
trusts the header's counts and builds numpy views of every token; this one does neither. layout.py interprets
what it returns as a MoE model."""
from __future__ import annotations

import itertools
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from edgemoe_llamacpp.errors import BadModelError
from edgemoe_llamacpp.pages import PAGE, fd_resident_pages

GGUF_MAGIC = b"GGUF"


class Field(NamedTuple):
    """One metadata value: where it lies in the header, decoded when asked for (`contents`)."""
    buf: bytearray
    vtype: int
    pos: int

    def contents(self):
        return _decode(self.buf, self.pos, self.vtype)[0]


class TensorInfo(NamedTuple):
    """One tensor info: shape in GGUF order (shape[0] is the row length), absolute data offset."""
    name: str
    shape: np.ndarray
    tensor_type: GGMLQuantizationType
    data_offset: int
    n_bytes: int


@dataclass
class GGUFHeader:
    """A GGUF header: metadata fields, tensor infos and where the tensor data starts. Parsed here rather than
    by gguf-py, whose reader takes seconds on a large vocabulary (it builds numpy views of every token),
    from bytes whose every length and count `_Walk` has checked against the file."""
    fields: dict[str, Field]
    tensors: list[TensorInfo]
    data_offset: int


def read_header(path: str | os.PathLike) -> GGUFHeader:
    """A GGUF's header (metadata and tensor infos), every length checked; BadModelError if unreadable."""
    return open_header(Path(path))


def open_header(path: Path) -> GGUFHeader:
    """`path`'s GGUF header, read with exact preads and no readahead.

    The pages this read brought into the page cache are dropped again (those that were there before stay):
    reading a layout, say for `edgemoe inspect` beside a running server, costs that server none of its cached
    experts. Only metadata, shapes and offsets come from here: whoever needs tensor data opens the file.
    """
    if not path.exists():
        raise BadModelError(f"{path}: no such file")
    if not path.is_file():
        raise BadModelError(f"{path}: not a regular file")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        head = _HeaderBytes(path, fd)
        try:
            head.read_to(len(GGUF_MAGIC))
            magic = bytes(head.buf[:len(GGUF_MAGIC)])
            if magic != GGUF_MAGIC:
                raise BadModelError(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
            return _Walk(path, head).header(head.size)
        finally:
            head.drop()
    finally:
        os.close(fd)


# GGUF value types: fixed sizes (struct formats), a string, an array (gguf-py's GGUFValueType)
GGUF_STRING, GGUF_ARRAY = int(GGUFValueType.STRING), int(GGUFValueType.ARRAY)
_GGUF_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "B", 10: "Q", 11: "q", 12: "d"}
_GGUF_SIZES = {k: struct.calcsize(v) for k, v in _GGUF_FORMATS.items()}
GGUF_VERSIONS = (2, 3)           # those gguf-py reads; both lay the header out as _Walk reads it
GGML_MAX_DIMS = 4
_HEADER_CAP = 64 << 20           # no real model's header comes near (a 256k-token vocabulary takes ~10 MB)


def _resident_pages(fd: int, start: int, end: int) -> bytes:
    """mincore of the file's pages over [start, end) (start page-aligned, end <= the file's size)."""
    return fd_resident_pages(fd, start, end - start)


class _HeaderBytes:
    """A file's leading bytes, read on demand with exact preads and no readahead. Before each read, the
    pages it is about to bring in are checked with mincore; `drop` evicts those that were not in the page
    cache before, and no other: a page that was there may be another process's."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd
        self.size = os.fstat(fd).st_size
        self.buf = bytearray()
        self.fresh: list[int] = []              # indices of the pages this read brought into the page cache
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)    # reads fetch the pages asked for, no more

    def need(self, pos: int, n: int) -> None:
        """Bytes [pos, pos + n) must lie in the file (and in a header of sane size): read them."""
        if 0 <= n and pos + n <= len(self.buf):
            return                              # held already (so inside the file and the cap)
        if n < 0 or pos + n > self.size:
            raise BadModelError(f"{self.path}: metadata runs past the end of the file at byte {pos}: truncated "
                                f"or corrupt")
        if pos + n > _HEADER_CAP:
            raise BadModelError(f"{self.path}: metadata runs past {_HEADER_CAP >> 20} MiB at byte {pos}: corrupt "
                                f"(no GGUF header is that large)")
        self.read_to(pos + n)

    def read_to(self, end: int) -> None:
        """Hold the file's bytes up to `end` (fewer at the end of the file), read in whole pages."""
        have = len(self.buf)            # a whole number of pages, or the whole file
        end = min(self.size, -(-end // PAGE) * PAGE)
        if end <= have:
            return
        vec = _resident_pages(self.fd, have, end)
        self.fresh += [have // PAGE + i for i, v in enumerate(vec) if not v & 1]
        while len(self.buf) < end:
            chunk = os.pread(self.fd, end - len(self.buf), len(self.buf))
            if not chunk:
                raise BadModelError(f"{self.path}: the file shrank while its header was read")
            self.buf += chunk

    def drop(self) -> None:
        """Evict the pages this read brought into the page cache (runs of consecutive pages, one call each)."""
        for _, run in itertools.groupby(enumerate(self.fresh), lambda t: t[1] - t[0]):
            pages = [p for _, p in run]
            os.posix_fadvise(self.fd, pages[0] * PAGE, len(pages) * PAGE, os.POSIX_FADV_DONTNEED)
        self.fresh = []


class _Walk:
    """Walks the header (version, counts, metadata, tensor infos), checking every length, count and dimension
    count against the file's size before reading it.

    gguf-py's reader trusts them: an array count that runs past the end of the file makes it build parts
    for ever (observed: 24 GB before the kernel's OOM killer stopped it).
    """

    def __init__(self, path: Path, head: _HeaderBytes):
        self.path, self.buf, self.need = path, head.buf, head.need

    def u(self, pos: int, fmt: str) -> int:
        self.need(pos, struct.calcsize(fmt))
        return struct.unpack_from("<" + fmt, self.buf, pos)[0]

    def value(self, pos: int, vtype: int, depth: int = 0) -> int:
        """Where the metadata value of type `vtype` at `pos` ends, every length in it checked."""
        need = self.need
        if vtype in _GGUF_SIZES:
            need(pos, _GGUF_SIZES[vtype])
            return pos + _GGUF_SIZES[vtype]
        if vtype == GGUF_STRING:
            n = self.u(pos, "Q")
            need(pos + 8, n)
            return pos + 8 + n
        if vtype == GGUF_ARRAY and depth < 2:
            itype, count = self.u(pos, "I"), self.u(pos + 4, "Q")
            pos += 12
            if itype in _GGUF_SIZES:
                need(pos, count * _GGUF_SIZES[itype])
                return pos + count * _GGUF_SIZES[itype]
            need(pos, count * 8)                     # every string or array takes 8 bytes at least
            for _ in range(count):
                pos = self.value(pos, itype, depth + 1)
            return pos
        raise BadModelError(f"{self.path}: unknown metadata value type {vtype} at byte {pos}")

    def fields(self, pos: int, n_kv: int) -> tuple[dict[str, Field], int]:
        self.need(pos, n_kv * 12)
        fields: dict[str, Field] = {}
        for _ in range(n_kv):
            key_at = pos
            pos = self.value(pos, GGUF_STRING)       # the key
            key = _text(self.buf, key_at + 8, pos, self.path)
            vtype = self.u(pos, "I")
            fields[key] = Field(self.buf, vtype, pos + 4)
            pos = self.value(pos + 4, vtype)
        return fields, pos

    def tensor_infos(self, pos: int, n_tensors: int) -> tuple[list, int]:
        self.need(pos, n_tensors * 24)              # name length, n_dims, type, offset at least
        infos = []
        for _ in range(n_tensors):
            name_at = pos
            pos = self.value(pos, GGUF_STRING)       # the name
            name = _text(self.buf, name_at + 8, pos, self.path)
            n_dims = self.u(pos, "I")
            if n_dims > GGML_MAX_DIMS:
                raise BadModelError(f"{self.path}: a tensor at byte {pos} has {n_dims} dimensions (GGUF allows "
                                    f"{GGML_MAX_DIMS}): corrupt")
            self.need(pos + 4, n_dims * 8 + 12)      # dims (u64 each), type (u32), data offset (u64)
            dims = struct.unpack_from(f"<{n_dims}Q", self.buf, pos + 4)
            type_id, offset = struct.unpack_from("<IQ", self.buf, pos + 4 + n_dims * 8)
            infos.append((name, dims, type_id, offset))
            pos += 4 + n_dims * 8 + 12
        return infos, pos

    def header(self, size: int) -> GGUFHeader:
        version = self.u(4, "I")
        if version not in GGUF_VERSIONS:
            raise BadModelError(f"{self.path}: GGUF version {version} is not supported (expected "
                                f"{' or '.join(map(str, GGUF_VERSIONS))}): corrupt, or big-endian")
        n_tensors, n_kv = self.u(8, "Q"), self.u(16, "Q")
        fields, pos = self.fields(24, n_kv)
        infos, pos = self.tensor_infos(pos, n_tensors)
        return _header(self.path, fields, infos, pos, size)


def _text(buf, start: int, end: int, path: Path) -> str:
    try:
        return bytes(buf[start:end]).decode("utf-8")
    except UnicodeDecodeError:
        raise BadModelError(f"{path}: a metadata key or tensor name at byte {start} is not UTF-8: corrupt") from None


def _decode(buf, pos: int, vtype: int):
    """(value, end) of the metadata value at pos (checked already by _Walk)."""
    if vtype in _GGUF_FORMATS:
        fmt = _GGUF_FORMATS[vtype]
        v = struct.unpack_from("<" + fmt, buf, pos)[0]
        return (bool(v) if vtype == 7 else v), pos + struct.calcsize(fmt)
    if vtype == GGUF_STRING:
        n = struct.unpack_from("<Q", buf, pos)[0]
        return bytes(buf[pos + 8:pos + 8 + n]).decode("utf-8", errors="replace"), pos + 8 + n
    itype, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if itype in _GGUF_FORMATS and itype != 7:
        fmt = _GGUF_FORMATS[itype]
        return list(struct.unpack_from(f"<{count}{fmt}", buf, pos)), pos + count * struct.calcsize(fmt)
    out = []
    for _ in range(count):
        v, pos = _decode(buf, pos, itype)
        out.append(v)
    return out, pos


def _header(path: Path, fields: dict[str, Field], infos: list, end: int, file_size: int) -> GGUFHeader:
    """Tensor infos typed and sized, and the data section's start (`general.alignment`, default 32)."""
    align_field = fields.get("general.alignment")
    alignment = align_field.contents() if align_field is not None and align_field.vtype == 4 else 32
    if alignment <= 0 or alignment & (alignment - 1):
        raise BadModelError(f"{path}: general.alignment {alignment} is not a power of two")
    data_offset = -(-end // alignment) * alignment
    tensors = []
    for name, dims, type_id, offset in infos:
        try:
            qt = GGMLQuantizationType(type_id)
            block, size = GGML_QUANT_SIZES[qt]
        except (ValueError, KeyError):
            raise BadModelError(f"{path}: tensor {name} has unknown type {type_id}") from None
        if dims and dims[0] % block:
            raise BadModelError(f"{path}: tensor {name} rows of {dims[0]} values are not a multiple of {qt.name}'s "
                                f"block of {block}")
        n = 1
        for d in dims:
            n *= d
        nbytes = n // block * size
        if nbytes > file_size or offset > file_size or any(d > file_size for d in dims):
            raise BadModelError(f"{path}: tensor {name} data [{data_offset + offset}, {data_offset + offset + nbytes}) "
                                f"lies outside the file's {file_size} bytes: truncated or corrupt")
        tensors.append(TensorInfo(name, np.array(dims, dtype=np.int64), qt, data_offset + offset, nbytes))
    return GGUFHeader(fields, tensors, data_offset)

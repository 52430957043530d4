"""`edgemoe verify FILE`: structure, bounds and checksums of a converted GGUF."""
from __future__ import annotations

import mmap
import os

from gguf import GGUFReader

from .convert import CHECKSUM_NAMES, CHECKSUM_SHA256, FORMAT_VERSION, GUARD, _tensor_sha256
from .errors import BadModelError
from .layout import MoELayout, read_layout


def verify(path: str | os.PathLike) -> dict:
    """Check a converted file; raise BadModelError with the first problem, else return a summary."""
    layout: MoELayout = read_layout(path)       # structure, every range inside the file, types fit slots
    meta = layout.edgemoe
    if not meta:
        raise BadModelError(f"{path}: no edgemoe.* metadata: not written by edgemoe convert")
    if meta.get("version") != FORMAT_VERSION:
        raise BadModelError(f"{path}: edgemoe.version is {meta.get('version')!r}, this edgemoe reads "
                            f"{FORMAT_VERSION}")
    reader = GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    if layout.mixed and GUARD not in tensors:
        raise BadModelError(f"{path}: per-expert types without the {GUARD} tensor: a stock llama.cpp "
                            f"would load it and compute garbage")
    names, sums = meta.get(CHECKSUM_NAMES[8:]), meta.get(CHECKSUM_SHA256[8:])
    if not isinstance(names, list) or not isinstance(sums, list) or len(names) != len(sums):
        raise BadModelError(f"{path}: checksum table missing or malformed")
    if set(names) != set(tensors):
        raise BadModelError(f"{path}: checksum table lists {len(names)} tensors, the file has {len(tensors)}")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        for name, want in zip(names, sums, strict=True):
            t = tensors[name]
            if _tensor_sha256(mm, t.data_offset, int(t.n_bytes)) != want:
                raise BadModelError(f"{path}: tensor {name} fails its checksum (file damaged)")
    unaligned = sum(1 for x in layout.experts for r in x.ranges if r.offset % mmap.PAGESIZE)
    low = [r for ranges in layout.low_experts.values() for r in ranges]
    return {"path": str(path), "tensors": len(tensors), "checksums": "ok", "mixed": layout.mixed,
            "lowbit_type": layout.lowbit_type, "lowbit_ranges": len(low),
            "unaligned_lowbit_ranges": sum(1 for r in low if r.offset % mmap.PAGESIZE),
            "expert_bytes": layout.expert_bytes, "dense_bytes": layout.dense_bytes,
            "expert_ranges": sum(len(x.ranges) for x in layout.experts),
            "unaligned_expert_ranges": unaligned, "source": meta.get("source.name"), "imatrix": meta.get("imatrix"),
            "plan": {k: v for k, v in meta.items() if k.startswith("plan.")}}

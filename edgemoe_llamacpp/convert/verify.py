"""`edgemoe verify FILE`: structure, bounds and checksums of a converted GGUF."""
from __future__ import annotations

import contextlib
import mmap
import os

import numpy as np
from tqdm import tqdm

from edgemoe_llamacpp.convert.rewrite import tensor_sha256
from edgemoe_llamacpp.errors import BadModelError
from edgemoe_llamacpp.gguf import quant
from edgemoe_llamacpp.gguf.constants import CHECKSUM_NAMES, CHECKSUM_SHA256, FORMAT_VERSION, GUARD
from edgemoe_llamacpp.gguf.layout import ExpertRange, MoELayout, read_layout
from edgemoe_llamacpp.gguf.shards import open_gguf

SAMPLED_EXPERTS = 8          # experts dequantized by both gguf-py's reference code and ggml's, and compared


def verify(path: str | os.PathLike, *, progress: bool = False) -> dict:
    """Check a converted file; raise BadModelError with the first problem, else return a summary."""
    layout: MoELayout = read_layout(path)       # structure, every range inside the file, types fit slots
    meta = layout.edgemoe
    if not meta:
        raise BadModelError(f"{path}: no edgemoe.* metadata: not written by edgemoe convert")
    if meta.get("version") != FORMAT_VERSION:
        raise BadModelError(f"{path}: edgemoe.version is {meta.get('version')!r}, this edgemoe reads "
                            f"{FORMAT_VERSION}")
    reader = open_gguf(layout.files)
    tensors = {t.name: t for t in reader.tensors}
    if layout.mixed and GUARD not in tensors:
        raise BadModelError(f"{path}: per-expert types without the {GUARD} tensor: a stock llama.cpp "
                            f"would load it and compute garbage")
    names, sums = meta.get(CHECKSUM_NAMES[8:]), meta.get(CHECKSUM_SHA256[8:])
    if not isinstance(names, list) or not isinstance(sums, list) or len(names) != len(sums):
        raise BadModelError(f"{path}: checksum table missing or malformed")
    if set(names) != set(tensors):
        raise BadModelError(f"{path}: checksum table lists {len(names)} tensors, the file has {len(tensors)}")
    with contextlib.ExitStack() as stack:
        mms = [stack.enter_context(_map(p)) for p in layout.files]
        for name, want in zip(names, sums, strict=True):
            t = tensors[name]
            if tensor_sha256(mms[reader.file_of[name]], t.data_offset, int(t.n_bytes)) != want:
                raise BadModelError(f"{layout.files[reader.file_of[name]]}: tensor {name} fails its checksum "
                                    f"(file damaged)")
        finite, sampled = check_weights(layout, mms, progress=progress)
    unaligned = sum(1 for x in layout.experts for r in x.ranges if r.offset % mmap.PAGESIZE)
    low = [r for ranges in layout.low_experts.values() for r in ranges]
    return {"path": str(path), "tensors": len(tensors), "checksums": "ok", "mixed": layout.mixed,
            "lowbit_type": layout.lowbit_type, "lowbit_ranges": len(low),
            "unaligned_lowbit_ranges": sum(1 for r in low if r.offset % mmap.PAGESIZE),
            "expert_bytes": layout.expert_bytes, "dense_bytes": layout.dense_bytes,
            "expert_ranges": sum(len(x.ranges) for x in layout.experts),
            "unaligned_expert_ranges": unaligned, "finite_expert_ranges": finite,
            "sampled_dequantize": sampled, "source": meta.get("source.name"), "imatrix": meta.get("imatrix"),
            "plan": {k: v for k, v in meta.items() if k.startswith("plan.")}}


@contextlib.contextmanager
def _map(path: str):
    """The file mapped read-only."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        yield mm


def check_weights(layout: MoELayout, mms: list, *, progress: bool = False) -> tuple[int, int]:
    """Every expert weight (low-bit copies included), dequantized by ggml (the code llama.cpp computes with) at the
    expert's own type (`mms`: each of the layout's files mapped), is finite; for a sample of experts spread over the file, gguf-py's reference dequantizer
    gives the same values. Raises BadModelError naming the first bad range; returns how many ranges were checked
    and how many of them compared."""
    ranges: list[ExpertRange] = [r for x in layout.experts for r in x.ranges]
    ranges += [r for rs in layout.low_experts.values() for r in rs]
    step = max(1, len(ranges) // SAMPLED_EXPERTS)
    compared = 0
    for i, r in enumerate(tqdm(ranges, desc="check weights", unit="range", disable=not progress)):
        raw = np.frombuffer(mms[r.file][r.offset:r.offset + r.size], dtype=np.uint8)   # a copy: mms may close after
        values = quant.ggml_dequantize(raw, r.type)
        bad = int(values.size - np.isfinite(values).sum())
        if bad:
            raise BadModelError(f"{layout.path}: {r.tensor} holds {bad:,} non-finite weights at {r.type} in bytes "
                                f"[{r.offset}, {r.offset + r.size}): the file is damaged; convert it again")
        if i % step == 0:
            ref = quant.dequantize(raw, r.type, values.size).reshape(-1)
            if not np.allclose(ref, values, rtol=1e-5, atol=1e-6 * float(np.abs(values).max(initial=1.0))):
                raise BadModelError(f"{layout.path}: {r.tensor} bytes [{r.offset}, {r.offset + r.size}) dequantize "
                                    f"differently in gguf-py and ggml at {r.type}: the file's types disagree with "
                                    f"its data")
            compared += 1
    return len(ranges), compared

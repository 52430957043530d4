"""The GGUF rewriter: experts at planned types in page-aligned slots, plan and provenance in `edgemoe.*`.

A plan maps every stacked expert tensor to one type per expert. A tensor whose experts share a type is
written as an ordinary tensor of that type (stock llama.cpp loads such a file). In a file with any mixed
tensor, every planned tensor is declared at its largest type (or the next larger one whose slot is a whole
number of pages), so every expert owns a fixed, page-aligned slot of `nb[2]` bytes; expert e is written
at its own type at the start of slot e and the rest of the slot is left a hole (seeked over, never
written). Its types go to `edgemoe.expert_types.<tensor>` and an `edgemoe.guard` tensor makes builds
without the patch refuse the file. The tensor data section is aligned to the page size.

With `lowbit=TYPE`, every stacked expert tensor also gets `edgemoe.lowbit.<tensor>`: each expert quantized
to TYPE from the source, in a page-aligned slot of its own, for the runtime to run a missed, low-weight
expert from (HOBBIT's substitution). Such a file needs the patched runtime too.

With `imatrix` (tensor name -> [n_expert, n_per_row], imatrix.py), every expert is quantized with its own
importance matrix; IQ2_XXS and IQ2_XS cannot be made without one. `imatrix_off` (tensor name -> a flag per
expert) names the experts a plan found better quantized without it (plan.imatrix_off).

IN may be any shard of a split model; with a size limit the output is split too (OUT-0000i-of-0000N.gguf, each
shard page-aligned, the `edgemoe.*` metadata and tensors in the first). The output is written to temporary files beside OUT,
fsynced and renamed: a killed conversion leaves OUT as it was, and IN is only ever read.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import secrets
import time
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from tqdm import tqdm

from edgemoe_llamacpp import files
from edgemoe_llamacpp.convert.imatrix import check as check_imatrix
from edgemoe_llamacpp.errors import EdgeMoEError
from edgemoe_llamacpp.gguf import quant
from edgemoe_llamacpp.gguf.constants import (
    CHECKSUM_NAMES,
    CHECKSUM_SHA256,
    EDGEMOE_PREFIX,
    EXPERT_TYPES,
    FORMAT_VERSION,
    GUARD,
    LOWBIT,
    REQUIRED_FEATURES,
    SET_ID,
)
from edgemoe_llamacpp.gguf.layout import ExpertTensor, MoELayout, read_layout
from edgemoe_llamacpp.gguf.shards import (
    SPLIT_COUNT,
    SPLIT_KEYS,
    SPLIT_NO,
    SPLIT_TENSORS,
    GGUFSet,
    open_gguf,
    shard_name,
)

ALIGNMENT = mmap.PAGESIZE
_PLACEHOLDER = "0" * 64


def uniform_plan(layout: MoELayout, type_name: str) -> dict[str, list[str]]:
    quant.qtype(type_name)
    return {t.name: [type_name] * t.count for t in layout.expert_tensors}


def _pad(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def _check_plan(layout: MoELayout, plan: dict[str, list[str]], reader: GGUFSet) -> None:
    stacked = {t.name: t for t in layout.expert_tensors if t.count == layout.n_expert}
    if set(plan) != set(stacked):
        raise EdgeMoEError(f"the plan must give types for exactly the stacked expert tensors; missing "
                           f"{sorted(set(stacked) - set(plan))[:3]}, unknown {sorted(set(plan) - set(stacked))[:3]}")
    shapes = {t.name: t.shape for t in reader.tensors}
    for name, types in plan.items():
        if not isinstance(types, list) or not all(isinstance(tn, str) for tn in types):
            raise EdgeMoEError(f"the plan's types for {name} must be a list of type names (e.g. \"Q4_K\"), "
                               f"not {str(types)[:40]}")
        for tn in set(types):
            quant.qtype(tn)
        if len(types) != stacked[name].count:
            raise EdgeMoEError(f"the plan gives {len(types)} types for {name}, which holds "
                               f"{stacked[name].count} experts")
        for tn in set(types):
            if not quant.fits(tn, int(shapes[name][0])):
                raise EdgeMoEError(f"{tn} cannot hold {name}: its rows of {int(shapes[name][0])} values are "
                                   f"not a multiple of the type's block")


def _out_tensors(reader: GGUFSet, stacks: dict[str, ExpertTensor], plan: dict[str, list[str]],
                 lowbit: str | None = None) -> list[dict]:
    """Every output tensor: name, numpy shape, declared type, nbytes, and the per-expert types if mixed; a
    planned tensor's `stack` is the source's (`stacks`: its experts at their own types, if the source is a
    converted file with per-expert types)."""
    out = []
    # one mixed tensor makes the file need the patched runtime; then every planned tensor gets slots
    mixed = any(len(set(types)) > 1 for types in plan.values())
    for t in reader.tensors:
        if t.name.startswith(EDGEMOE_PREFIX):
            continue
        shape = [int(x) for x in reversed(t.shape.tolist())]
        entry = {"name": t.name, "shape": shape, "type": t.tensor_type.name, "nbytes": int(t.n_bytes),
                 "src": t, "experts": None, "slotted": False}
        types = plan.get(t.name)
        if types is not None:
            row_len, n_expert = int(t.shape[0]), int(t.shape[-1])
            rows = int(np.prod(t.shape[1:-1]))
            declared = _slot_type(types, row_len, rows) if mixed else types[0]
            entry.update(type=declared, nbytes=n_expert * rows * quant.row_bytes(declared, row_len),
                         experts=types, row_len=row_len, rows=rows, slotted=set(types) != {declared},
                         stack=stacks[t.name])
        out.append(entry)
        if types is not None and lowbit is not None:
            # beside its tensor, between two of the model's: llama.cpp unmaps the file's head and tail
            # fragments (before its first tensor, after its last) once loaded, and skips `edgemoe.*` tensors
            slot = _pad(rows * quant.row_bytes(lowbit, row_len))
            out.append({"name": LOWBIT + t.name, "shape": [n_expert * slot], "type": "I8",
                        "nbytes": n_expert * slot, "src": t, "experts": [lowbit] * n_expert,
                        "row_len": row_len, "rows": rows, "slotted": False, "stack": stacks[t.name]})
    if out and out[-1]["name"].startswith(LOWBIT):
        out[-2], out[-1] = out[-1], out[-2]
    if mixed:
        out.append({"name": GUARD, "shape": [16], "type": "I8", "nbytes": 16, "src": None, "experts": None,
                    "slotted": False})
    return out


def _slot_type(types: list[str], row_len: int, rows: int) -> str:
    """The type a tensor of a mixed file is declared at: its largest expert type, or if that type's slot
    is not a whole number of pages, the next larger type whose slot is (the slot's tail is a hole: no disk,
    no reads)."""
    largest = max(set(types), key=lambda tn: quant.row_bytes(tn, row_len))
    need = quant.row_bytes(largest, row_len)
    wider = sorted((tn for tn in (*quant.PLAN_TYPES, "F16", "F32")
                    if quant.fits(tn, row_len) and quant.row_bytes(tn, row_len) >= need),
                   key=lambda tn: quant.row_bytes(tn, row_len))
    return next((tn for tn in wider if rows * quant.row_bytes(tn, row_len) % ALIGNMENT == 0), largest)


def _kv(writer: GGUFWriter, reader: GGUFSet) -> None:
    for key, field in reader.fields.items():
        if key.startswith(("GGUF.", EDGEMOE_PREFIX)) or key in ("general.alignment", "general.architecture", *SPLIT_KEYS):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)


def _write_tensor(f, base: int, entry: dict, bar, imatrix: dict[str, np.ndarray] | None,
                  imatrix_off: dict[str, list[bool]] | None = None) -> None:
    t = entry["src"]
    if t is None:                                   # the guard
        f.seek(base)
        f.write(b"edgemoe mixed\0\0\0")
        return
    data = np.asarray(t.data).view(np.uint8).reshape(-1)
    types = entry["experts"]
    if types is None:
        f.seek(base)
        f.write(data.tobytes())
        return
    stack = entry["stack"]
    row_len, rows = entry["row_len"], entry["rows"]
    slot = entry["nbytes"] // len(types)
    weights = None if imatrix is None else imatrix[t.name]
    off = (imatrix_off or {}).get(t.name) if entry["name"] == t.name else None      # not for low-bit copies
    for e, tn in enumerate(types):
        src = stack.slice(e)                        # the source expert, at its own type in its own slot
        start = src.offset - stack.offset
        chunk = data[start:start + src.size]
        if tn == src.type:
            blob = chunk.tobytes()
        else:
            blob = quant.quantize(quant.dequantize(chunk, src.type, row_len), tn,
                                  None if weights is None or (off is not None and off[e]) else weights[e])
        assert len(blob) == rows * quant.row_bytes(tn, row_len)
        f.seek(base + e * slot)
        f.write(blob)
        bar.update(1)


def tensor_sha256(mm, start: int, nbytes: int) -> str:
    return hashlib.sha256(memoryview(mm)[start:start + nbytes]).hexdigest()


def _check_low_type(type_name: str, row_len: int, name: str) -> None:
    if not quant.fits(type_name, row_len):
        raise EdgeMoEError(f"{type_name} cannot hold {name}: its rows of {row_len} values are not a multiple of "
                           f"the type's block")


def convert(src: str | os.PathLike, dst: str | os.PathLike, plan: dict[str, list[str]], *,
            meta: dict | None = None, force: bool = False, progress: bool = True,
            lowbit: str | None = None, imatrix: dict[str, np.ndarray] | None = None,
            imatrix_off: dict[str, list[bool]] | None = None, split_max_size: int | None = None) -> MoELayout:
    """Write `src` (a file, or any shard of a split model) with its experts at `plan`'s types to `dst`, plus
    low-bit copies of every expert at `lowbit` if given, quantizing with the per-expert importance matrices
    `imatrix` if given; in shards of at most `split_max_size` bytes of tensor data if given (DST-0000i-of-0000N.gguf,
    as gguf-split names them; a tensor larger than that gets a shard of its own). Returns the new model's layout."""
    src, dst = Path(src), Path(dst)
    layout = read_layout(src)
    if split_max_size is None:
        files.check_output(dst, inputs=layout.files, force=force)
    reader = open_gguf(layout.files)
    _check_plan(layout, plan, reader)
    stacks = {t.name: t for t in layout.expert_tensors}
    _check_options(reader, stacks, plan, lowbit, imatrix, imatrix_off)
    tensors = _out_tensors(reader, stacks, plan, lowbit)
    groups = _shard_groups(tensors, split_max_size)
    dsts = [dst] if len(groups) == 1 else [shard_name(_prefix(dst), i + 1, len(groups)) for i in range(len(groups))]
    for out in dsts:
        files.check_output(out, inputs=layout.files, force=force)
    writers = [GGUFWriter(None, layout.arch) for _ in groups]
    _metadata(writers[0], reader, layout, tensors, meta, lowbit, imatrix is not None)
    set_id = secrets.token_hex(16)
    for i, (writer, group) in enumerate(zip(writers, groups, strict=True)):
        if i:
            writer.add_custom_alignment(ALIGNMENT)
        if len(groups) > 1:
            writer.add_uint16(SPLIT_NO, i)
            writer.add_uint16(SPLIT_COUNT, len(groups))
            # llama.cpp checks it against the weights it loads: edgemoe.* tensors are none (patches/0002)
            writer.add_int32(SPLIT_TENSORS, sum(not e["name"].startswith(EDGEMOE_PREFIX) for e in tensors))
            # the shards are renamed into place one by one: a kill between two renames over an earlier
            # conversion's shards would leave a set of both, which read_layout refuses by this
            writer.add_string(SET_ID, set_id)
        for e in group:
            writer.add_tensor_info(e["name"], e["shape"], np.float32, e["nbytes"], raw_dtype=quant.qtype(e["type"]))
    n_experts = sum(len(e["experts"]) for e in tensors if e["experts"])
    with files.atomic_outputs(dsts) as tmps, \
            tqdm(total=n_experts, desc="quantize experts", unit="expert", disable=not progress) as bar:
        offsets = [_write_file(tmp, writer, group, bar, imatrix, imatrix_off)
                   for tmp, writer, group in zip(tmps, writers, groups, strict=True)]
        _fill_checksums(tmps, groups, offsets)
    return read_layout(dsts[0])


def _check_options(reader: GGUFSet, stacks: dict[str, ExpertTensor], plan: dict[str, list[str]], lowbit: str | None,
                   imatrix: dict[str, np.ndarray] | None, imatrix_off: dict[str, list[bool]] | None) -> None:
    """The low-bit type and the importance matrices fit the plan, before anything is written."""
    if lowbit is not None:
        if lowbit not in quant.PLAN_TYPES:
            raise EdgeMoEError(f"low-bit copies can be {', '.join(quant.PLAN_TYPES)}; not {lowbit!r}")
        for t in reader.tensors:
            if t.name in plan:
                _check_low_type(lowbit, int(t.shape[0]), t.name)
        smallest = min({tn for types in plan.values() for tn in types}, key=quant.bits_per_weight)
        if quant.bits_per_weight(lowbit) >= quant.bits_per_weight(smallest):
            raise EdgeMoEError(f"low-bit copies at {lowbit} ({quant.bits_per_weight(lowbit):.3g} bits per weight) "
                               f"would be no smaller than experts at {smallest} "
                               f"({quant.bits_per_weight(smallest):.3g}); pick a smaller --lowbit type")
    if imatrix is not None:
        check_imatrix(imatrix, {t.name: (int(t.shape[-1]), int(t.shape[0])) for t in reader.tensors
                                if t.name in plan})
        for name, flags in (imatrix_off or {}).items():
            if name not in plan or len(flags) != len(plan[name]):
                raise EdgeMoEError(f"imatrix_off for {name}: one flag per expert of a planned tensor")
            need = sorted({tn for tn, off in zip(plan[name], flags, strict=True) if off and quant.requires_imatrix(tn)})
            if need:
                raise EdgeMoEError(f"{name}: {', '.join(need)} cannot be made without importance matrices")
    else:
        made = {tn for name, types in plan.items() for e, tn in enumerate(types) if tn != stacks[name].slice(e).type}
        made |= {lowbit} - {None}
        need = sorted(tn for tn in made if quant.requires_imatrix(tn))
        if need:
            raise EdgeMoEError(f"{', '.join(need)} cannot be made without importance matrices: convert with "
                               f"--imatrix PROFILE (or plan from --profile without --no-imatrix)")


def _metadata(writer: GGUFWriter, reader: GGUFSet, layout: MoELayout, tensors: list[dict], meta: dict | None,
              lowbit: str | None, with_imatrix: bool) -> None:
    """The (first) output file's metadata: the source's, the alignment, edgemoe's provenance, plan, per-expert types
    and checksum table (placeholders, filled once the data is written)."""
    _kv(writer, reader)
    writer.add_custom_alignment(ALIGNMENT)
    writer.add_uint32("edgemoe.version", FORMAT_VERSION)
    features = ["expert_types"] * any(e["slotted"] for e in tensors) + ["lowbit"] * (lowbit is not None)
    if features:
        writer.add_array(REQUIRED_FEATURES, features)
    writer.add_string("edgemoe.source.name", Path(layout.path).name)
    writer.add_string("edgemoe.source.sha256", files.sha256_files(layout.files))
    writer.add_string("edgemoe.created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    writer.add_bool("edgemoe.imatrix", with_imatrix)
    if lowbit is not None:
        writer.add_string("edgemoe.lowbit_type", lowbit)
    for key, value in (meta or {}).items():
        writer.add_key_value(f"edgemoe.{key}", value, _vtype(value),
                             sub_type=_vtype(value[0]) if isinstance(value, list) else None)
    for e in tensors:
        if e["slotted"]:
            writer.add_array(EXPERT_TYPES + e["name"], [int(quant.qtype(tn)) for tn in e["experts"]])
    writer.add_array(CHECKSUM_NAMES, [e["name"] for e in tensors])
    writer.add_array(CHECKSUM_SHA256, [_PLACEHOLDER] * len(tensors))


def _shard_groups(tensors: list[dict], max_size: int | None) -> list[list[dict]]:
    """The output tensors in shards of at most `max_size` bytes of (padded) data each; one shard without a size.
    Every `edgemoe.*` tensor goes to shard 1, after its first tensor: the patched loader (patches/0002) leaves them
    out of the weights in shard 1 only, and llama.cpp maps a file from its first weight to its last, so a low-bit
    copy must lie between two weights. Shard 1 then holds them on top of its `max_size`."""
    if max_size is None:
        return [tensors]
    ours = [e for e in tensors if e["name"].startswith(EDGEMOE_PREFIX)]
    weights = [e for e in tensors if not e["name"].startswith(EDGEMOE_PREFIX)]
    tensors = weights[:1] + ours + weights[1:]
    groups: list[list[dict]] = [[]]
    size = 0
    for prev, e in zip([None, *tensors], tensors, strict=False):
        glued = e["name"].startswith(EDGEMOE_PREFIX) or (prev is not None and prev["name"].startswith(EDGEMOE_PREFIX))
        if groups[-1] and not glued and size + _pad(e["nbytes"]) > max_size:
            groups.append([])
            size = 0
        groups[-1].append(e)
        size += _pad(e["nbytes"])
    return groups


def _prefix(dst: Path) -> Path:
    """The shard names' prefix for output `dst`: DST without .gguf (out.gguf -> out-00001-of-00002.gguf)."""
    return dst.with_suffix("") if dst.suffix == ".gguf" else dst


def _write_file(tmp: Path, writer: GGUFWriter, tensors: list[dict], bar, imatrix: dict[str, np.ndarray] | None,
                imatrix_off: dict[str, list[bool]] | None) -> list[int]:
    """Write one output file (header, metadata, tensor infos, then every tensor at its page-aligned offset) to
    `tmp`; the tensors' offsets."""
    writer.write_header_to_file(tmp)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    f = writer.fout[0]
    offsets, pos = [], _pad(f.tell())
    for e in tensors:
        offsets.append(pos)
        pos += _pad(e["nbytes"])
    for e, off in zip(tensors, offsets, strict=True):
        _write_tensor(f, off, e, bar, imatrix, imatrix_off)
    f.truncate(pos)
    f.flush()
    writer.close()
    return offsets


def _fill_checksums(paths: list[Path], groups: list[list[dict]], offsets: list[list[int]]) -> None:
    """Replace the checksum placeholders in the first file (same length, so nothing moves) with each tensor's
    sha256, read from whichever file holds it."""
    sums = {}
    for path, tensors, offs in zip(paths, groups, offsets, strict=True):
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            sums |= {e["name"]: tensor_sha256(mm, off, e["nbytes"]) for e, off in zip(tensors, offs, strict=True)}
    reader = GGUFReader(paths[0], "r+")
    field = reader.fields[CHECKSUM_SHA256]
    names = reader.fields[CHECKSUM_NAMES].contents()
    for idx, name in zip(field.data, names, strict=True):
        digest = sums[name]
        part = field.parts[idx]
        assert bytes(part) == _PLACEHOLDER.encode()
        part[:] = np.frombuffer(digest.encode(), dtype=np.uint8)
    reader.data.flush()
    del reader


def _vtype(value) -> GGUFValueType:
    if isinstance(value, bool):
        return GGUFValueType.BOOL
    if isinstance(value, int):
        return GGUFValueType.INT64
    if isinstance(value, float):
        return GGUFValueType.FLOAT32
    if isinstance(value, str):
        return GGUFValueType.STRING
    if isinstance(value, list):
        return GGUFValueType.ARRAY
    raise TypeError(f"no GGUF type for {value!r}")

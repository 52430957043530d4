"""GGUF -> MoE layout: which tensors hold experts, every expert's byte ranges, dense vs expert bytes.

Everything comes from the GGUF metadata and tensor infos (gguf/header.py reads them, with gguf-py's type
tables), never from a model's shapes being what we expect: real files (Qwen3-MoE, OLMoE, Mixtral, DeepSeek-V2, gpt-oss) take the same
path as the fixture. Every offset and size is checked against the file before anyone may use it.
"""
from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from edgemoe_llamacpp.errors import BadModelError, NotMoEError, ShardError
from edgemoe_llamacpp.gguf.constants import (
    EDGEMOE_PREFIX,
    EXPERT_TYPES,
    FILE_BITS,
    GUARD,
    LOWBIT,
    REQUIRED_FEATURES,
    SET_ID,
)
from edgemoe_llamacpp.gguf.header import GGUFHeader, TensorInfo, open_header
from edgemoe_llamacpp.gguf.shards import SPLIT_COUNT, SPLIT_NO, SPLIT_TENSORS, shard_paths

# Stacked experts: blk.N.ffn_{gate,up,down,gate_up}_exps.{weight,bias,...}; the last GGUF dimension is the
# expert index. Shared experts (ffn_*_shexp) and router tensors (ffn_gate_inp, exp_probs_b) are dense.
STACKED_EXPERTS = re.compile(r"^blk\.(\d+)\.(\w+_exps)\.(\w+)$")
# Older Mixtral conversions keep one tensor per expert: blk.N.ffn_{gate,up,down}.E.weight
SINGLE_EXPERT = re.compile(r"^blk\.(\d+)\.(ffn_(?:gate|up|down))\.(\d+)\.weight$")


class ExpertRange(NamedTuple):
    """One expert's slice of one tensor: absolute offset and size in bytes in file `file` (an index into
    `MoELayout.files`: 0 but in a split model)."""
    tensor: str
    offset: int
    size: int
    type: str
    file: int = 0


class LowCopy(NamedTuple):
    """Low-bit copies of a stacked tensor's experts (`edgemoe.lowbit.<name>`): expert e at `type`, `size`
    bytes at the start of its `stride`-byte slot (whole pages in files edgemoe writes)."""
    offset: int
    stride: int
    type: str
    size: int
    file: int = 0


class ExpertTensor(NamedTuple):
    """A tensor holding `count` experts of one layer back to back, `stride` bytes apart.

    With per-expert `types` (a converted file, `edgemoe.expert_types.<name>`), the tensor is declared at
    its largest type so every expert has a slot of `stride` bytes; expert e is stored at its own type at
    the start of its slot, `sizes[e]` bytes, and the rest of the slot is a hole.
    """
    name: str
    layer: int
    offset: int
    nbytes: int
    stride: int
    type: str
    first_expert: int
    count: int
    types: tuple[str, ...] | None = None
    sizes: tuple[int, ...] | None = None
    low: LowCopy | None = None
    file: int = 0

    def slice(self, expert: int) -> ExpertRange:
        i = expert - self.first_expert
        if self.types is None:
            return ExpertRange(self.name, self.offset + i * self.stride, self.stride, self.type, self.file)
        return ExpertRange(self.name, self.offset + i * self.stride, self.sizes[i], self.types[i], self.file)

    def low_slice(self, expert: int) -> ExpertRange:
        """Expert `expert`'s low-bit copy (the tensor must have one)."""
        i = expert - self.first_expert
        return ExpertRange(LOWBIT + self.name, self.low.offset + i * self.low.stride, self.low.size, self.low.type,
                           self.low.file)

    @property
    def stored_bytes(self) -> int:
        return self.nbytes if self.sizes is None else sum(self.sizes)


class Expert(NamedTuple):
    layer: int
    expert: int
    ranges: tuple[ExpertRange, ...]

    @property
    def nbytes(self) -> int:
        return sum(r.size for r in self.ranges)


class ExpertUID(NamedTuple):
    """What the expert cache fetches and evicts: one expert of one layer, or (low) its low-bit copy."""
    layer: int
    expert: int
    low: bool = False


@dataclass(frozen=True)
class MoELayout:
    """A model's MoE layout. A split model spans `files` (shard 1 first; `path` is shard 1's, the one llama.cpp
    opens); every range names its file, and `file_size` is the files' total."""
    path: str
    arch: str
    n_layer: int
    n_expert: int
    n_expert_used: int
    file_size: int
    data_offset: int          # where the tensor data section starts (in `path`)
    dense_bytes: int          # every non-expert tensor (attention, embeddings, norms, routers, shared experts)
    expert_bytes: int
    expert_tensors: tuple[ExpertTensor, ...]
    edgemoe: dict | None = None      # a converted file's `edgemoe.*` metadata (plan, provenance, checksums)
    files: tuple[str, ...] = ()      # every file of the model, shard 1 first (default: `path` alone)
    file_sizes: tuple[int, ...] = ()
    data_offsets: tuple[int, ...] = ()

    def __post_init__(self):
        if not self.files:
            object.__setattr__(self, "files", (self.path,))
            object.__setattr__(self, "file_sizes", (self.file_size,))
            object.__setattr__(self, "data_offsets", (self.data_offset,))

    @property
    def split(self) -> bool:
        return len(self.files) > 1

    @property
    def mixed(self) -> bool:
        """Some tensor holds experts of different types: needs the patched runtime."""
        return any(t.types is not None for t in self.expert_tensors)

    @property
    def lowbit_type(self) -> str | None:
        """The type of the experts' low-bit copies, if the file carries them (`edgemoe convert --lowbit`)."""
        return next((t.low.type for t in self.expert_tensors if t.low is not None), None)

    @property
    def needs_patched_runtime(self) -> bool:
        return self.mixed or self.lowbit_type is not None

    @cached_property
    def low_experts(self) -> dict[tuple[int, int], tuple[ExpertRange, ...]]:
        """(layer, expert) -> the byte ranges of its low-bit copy; empty without copies."""
        out: dict[tuple[int, int], list[ExpertRange]] = {}
        for t in self.expert_tensors:
            if t.low is not None:
                for e in range(t.first_expert, t.first_expert + t.count):
                    out.setdefault((t.layer, e), []).append(t.low_slice(e))
        return {k: tuple(v) for k, v in sorted(out.items())}

    @property
    def tensor_data_bytes(self) -> int:
        return self.dense_bytes + self.expert_bytes

    @cached_property
    def experts(self) -> tuple[Expert, ...]:
        by_key: dict[tuple[int, int], list[ExpertRange]] = {}
        for t in self.expert_tensors:
            for e in range(t.first_expert, t.first_expert + t.count):
                by_key.setdefault((t.layer, e), []).append(t.slice(e))
        return tuple(Expert(layer, e, tuple(r)) for (layer, e), r in sorted(by_key.items()))

    @cached_property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(sorted({t.layer for t in self.expert_tensors}))

    def expert(self, layer: int, expert: int) -> Expert:
        return self.experts[self.moe_layers.index(layer) * self.n_expert + expert]

    def layer_expert_bytes(self, layer: int) -> int:
        return sum(t.stored_bytes for t in self.expert_tensors if t.layer == layer)

    def to_dict(self) -> dict:
        """JSON-able; a split model adds its files, and each range its file's index (a single file's as ever)."""
        files = {"files": list(self.files), "file_sizes": list(self.file_sizes),
                 "tensor_data_offsets": list(self.data_offsets)} if self.split else {}

        def rng(r: ExpertRange) -> dict:
            return r._asdict() if self.split else {k: v for k, v in r._asdict().items() if k != "file"}
        return {
            "path": self.path, "arch": self.arch, "n_layer": self.n_layer, "n_expert": self.n_expert,
            "n_expert_used": self.n_expert_used, "moe_layers": list(self.moe_layers),
            "file_size": self.file_size, "tensor_data_offset": self.data_offset, **files,
            "tensor_data_bytes": self.tensor_data_bytes,
            "dense_bytes": self.dense_bytes, "expert_bytes": self.expert_bytes, "mixed": self.mixed,
            "edgemoe": self.edgemoe,
            "experts": [{"layer": x.layer, "expert": x.expert,
                         "ranges": [rng(r) for r in x.ranges]} for x in self.experts],
        }


def _field(reader, key: str, path: Path, kind: type, required: bool = True):
    field = reader.fields.get(key)
    if field is None:
        if required:
            raise BadModelError(f"{path}: metadata key {key!r} is missing")
        return None
    try:
        value = field.contents()
    except (ValueError, IndexError, TypeError, UnicodeDecodeError) as e:
        raise BadModelError(f"{path}: metadata key {key!r} is unreadable ({e})") from None
    if isinstance(value, list) and kind is int:
        # some models give per-layer arrays; a single MoE count is the largest entry
        value = max(value) if value else None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BadModelError(f"{path}: metadata key {key!r} has {type(value).__name__} {value!r}, "
                            f"expected {kind.__name__}")
    return value


def read_layout(path: str | os.PathLike) -> MoELayout:
    """Read a GGUF's MoE layout; of a split model, given any shard, across every shard. Raises BadModelError,
    ShardError or NotMoEError with a one-line reason."""
    paths, headers, sizes = _read_files(Path(path))
    path, reader = paths[0], headers[0]
    arch = _field(reader, "general.architecture", path, str)
    n_layer = _field(reader, f"{arch}.block_count", path, int)
    n_expert = _field(reader, f"{arch}.expert_count", path, int, required=False) or 0
    n_used = _field(reader, f"{arch}.expert_used_count", path, int, required=False) or 0
    for p, h, size in zip(paths, headers, sizes, strict=True):
        _check_extents(p, h, size)
    edgemoe = _edgemoe_fields(reader, path)
    stacks: list[ExpertTensor] = []
    lowbit = {}
    dense = 0
    for i, (p, h) in enumerate(zip(paths, headers, strict=True)):
        for t in h.tensors:
            if t.name.startswith(LOWBIT):
                lowbit[t.name[len(LOWBIT):]] = (t, i)
            if t.name.startswith(EDGEMOE_PREFIX):
                continue                # the mixed-file guard, low-bit copies: not the model's weights
            stack = _expert_tensor(t, i, p, arch, n_expert, edgemoe["expert_types"])
            if stack is None:
                dense += t.n_bytes
            else:
                stacks.append(stack)
    if not stacks or n_expert < 2:
        raise NotMoEError(f"{path}: no expert tensors (architecture {arch!r}, expert_count {n_expert}): "
                          f"not a Mixture-of-Experts model")
    if not 1 <= n_used <= n_expert:
        raise BadModelError(f"{path}: {arch}.expert_used_count is {n_used}, expected 1..{n_expert}")
    for s in stacks:
        if s.layer >= n_layer:
            raise BadModelError(f"{path}: {s.name} is in layer {s.layer} but the model has {n_layer}")
    if edgemoe["expert_types"]:
        raise BadModelError(f"{path}: edgemoe.expert_types names tensors that are not stacked expert "
                            f"tensors: {sorted(edgemoe['expert_types'])}")
    del edgemoe["expert_types"]
    if lowbit or "lowbit_type" in edgemoe:
        shapes = {t.name: t.shape for h in headers for t in h.tensors}
        stacks = _with_low_copies(stacks, lowbit, edgemoe.get("lowbit_type"), shapes, path)
    layout = MoELayout(str(path), arch, n_layer, n_expert, n_used, sum(sizes), reader.data_offset,
                       dense, sum(s.stored_bytes for s in stacks), tuple(stacks), edgemoe or None,
                       tuple(map(str, paths)), tuple(sizes), tuple(h.data_offset for h in headers))
    per_layer = {len([x for x in layout.experts if x.layer == layer]) for layer in layout.moe_layers}
    if per_layer != {n_expert}:
        raise BadModelError(f"{path}: some MoE layers lack experts (found {sorted(per_layer)} per layer, "
                            f"expected {n_expert})")
    return layout


def _check_extents(path: Path, reader: GGUFHeader, file_size: int) -> None:
    """Every tensor's data inside its file's data section, and no two overlapping."""
    if file_size >= 1 << FILE_BITS:
        raise BadModelError(f"{path}: {file_size:,} bytes; edgemoe reads files below {1 << FILE_BITS:,} (split it)")
    extents = []
    for t in reader.tensors:
        end = t.data_offset + t.n_bytes
        if t.data_offset < reader.data_offset or end > file_size:
            raise BadModelError(f"{path}: tensor {t.name} data [{t.data_offset}, {end}) lies outside the "
                                f"file's data section [{reader.data_offset}, {file_size}): truncated?")
        extents.append((t.data_offset, end, t.name))
    extents.sort()
    for (_, end_a, a), (start_b, _, b) in itertools.pairwise(extents):
        if start_b < end_a:
            raise BadModelError(f"{path}: tensors {a} and {b} overlap in the file")


def _expert_tensor(t: TensorInfo, file: int, path: Path, arch: str, n_expert: int,
                   expert_types: dict) -> ExpertTensor | None:
    """The experts tensor `t` (of file `file`) holds, checked; None for a dense tensor. Takes the tensor's
    per-expert types out of `expert_types`."""
    m = STACKED_EXPERTS.match(t.name)
    single = SINGLE_EXPERT.match(t.name)
    if m:
        layer, count = int(m.group(1)), int(t.shape[-1])
        if t.n_bytes == 0:
            raise BadModelError(f"{path}: expert tensor {t.name} is empty (shape {t.shape.tolist()})")
        if count != n_expert or t.n_bytes % max(count, 1):
            raise BadModelError(f"{path}: {t.name} stacks {count} experts but {arch}.expert_count "
                                f"is {n_expert}")
        stack = ExpertTensor(t.name, layer, t.data_offset, t.n_bytes, t.n_bytes // count,
                             t.tensor_type.name, 0, count, file=file)
        types = expert_types.pop(t.name, None)
        return stack if types is None else _with_types(stack, types, int(t.shape[0]), path)
    if single and n_expert:
        layer, e = int(single.group(1)), int(single.group(3))
        if t.n_bytes == 0:
            raise BadModelError(f"{path}: expert tensor {t.name} is empty (shape {t.shape.tolist()})")
        if e >= n_expert:
            raise BadModelError(f"{path}: {t.name} names expert {e} of {n_expert}")
        return ExpertTensor(t.name, layer, t.data_offset, t.n_bytes, t.n_bytes, t.tensor_type.name, e, 1,
                            file=file)
    return None


def _read_files(path: Path) -> tuple[tuple[Path, ...], list[GGUFHeader], list[int]]:
    """The model's files (shard 1 first), their headers and sizes: `path` alone, or every shard of the split
    model `path` is one shard of, each checked to be the shard its name says, of the same split."""
    header = open_header(path)
    count = _field(header, SPLIT_COUNT, path, int, required=False)
    if count is None or count == 1:
        return (path,), [header], [path.stat().st_size]
    no = _field(header, SPLIT_NO, path, int)
    total = _field(header, SPLIT_TENSORS, path, int)
    if count < 1 or not 0 <= no < count:
        raise BadModelError(f"{path}: split.no {no} of split.count {count} is impossible: corrupt")
    paths = shard_paths(path, no, count)
    headers = []
    for i, p in enumerate(paths):
        if not p.exists():
            raise ShardError(f"{path} is shard {no + 1} of {count} of a split model, but shard {i + 1} ({p}) "
                             f"is missing")
        h = header if i == no else open_header(p)
        seen = (_field(h, SPLIT_NO, p, int, required=False), _field(h, SPLIT_COUNT, p, int, required=False),
                _field(h, SPLIT_TENSORS, p, int, required=False))
        if seen != (i, count, total):
            raise ShardError(f"{p} is not shard {i + 1} of the split model {paths[0].name} (it says shard "
                             f"{_plus_one(seen[0])} of {seen[1]}, {seen[2]} tensors; expected {i + 1} of {count}, "
                             f"{total} tensors)")
        headers.append(h)
    ids = [_field(h, SET_ID, p, str, required=False) for h, p in zip(headers, paths, strict=True)]
    for p, set_id in zip(paths[1:], ids[1:], strict=True):
        if set_id != ids[0]:
            raise ShardError(f"{p} is not of the same conversion as {paths[0].name} (edgemoe.set_id {set_id} against "
                             f"{ids[0]}): a conversion stopped while it renamed its shards, or two conversions wrote "
                             f"shards of one name; convert again")
    names = [t.name for h in headers for t in h.tensors]
    found = _weight_count(names, _field(headers[0], REQUIRED_FEATURES, paths[0], list, required=False) or [])
    if found != total or len(set(names)) != len(names):
        raise ShardError(f"{paths[0]}: its {count} shards hold {found} weight tensors ({len(set(names))} names), but "
                         f"split.tensors.count is {total}")
    return paths, headers, [p.stat().st_size for p in paths]


def _weight_count(names: list[str], features: list) -> int:
    """How many of `names` llama.cpp loads as weights, the number `split.tensors.count` gives: the patched loader
    (patches/0002) leaves out the guard of a file that requires features, and the low-bit copies of one that
    requires "lowbit"."""
    return sum(not ((features and name == GUARD) or ("lowbit" in features and name.startswith(LOWBIT)))
               for name in names)


def _plus_one(no: int | None) -> str:
    return "?" if no is None else str(no + 1)


def _edgemoe_fields(reader, path: Path) -> dict:
    """A converted file's `edgemoe.*` metadata; `expert_types` maps tensor name -> list of ggml type ids."""
    out: dict = {"expert_types": {}}
    for key, field in reader.fields.items():
        if not key.startswith(EDGEMOE_PREFIX):
            continue
        try:
            value = field.contents()
        except (ValueError, IndexError, TypeError, UnicodeDecodeError) as e:
            raise BadModelError(f"{path}: metadata key {key!r} is unreadable ({e})") from None
        if key.startswith(EXPERT_TYPES):
            out["expert_types"][key[len(EXPERT_TYPES):]] = value
        else:
            out[key[len(EDGEMOE_PREFIX):]] = value
    return out


def _with_types(stack: ExpertTensor, types, row_len: int, path: Path) -> ExpertTensor:
    """Check a tensor's per-expert types against its slots before any pointer into them is made."""

    if not isinstance(types, list) or len(types) != stack.count:
        raise BadModelError(f"{path}: {EXPERT_TYPES}{stack.name} must list {stack.count} types")
    names, sizes = [], []
    declared_block, declared_size = GGML_QUANT_SIZES[GGMLQuantizationType[stack.type]]
    rows = stack.stride // (row_len // declared_block * declared_size)
    for e, code in enumerate(types):
        try:
            t = GGMLQuantizationType(code)
            block, size = GGML_QUANT_SIZES[t]
        except (ValueError, KeyError, TypeError):
            raise BadModelError(f"{path}: {stack.name} expert {e} has unknown type {code!r}") from None
        nbytes = rows * (row_len // block) * size
        if row_len % block or nbytes > stack.stride:
            raise BadModelError(f"{path}: {stack.name} expert {e} at {t.name} ({nbytes} bytes) does not fit "
                                f"its {stack.stride}-byte slot")
        names.append(t.name)
        sizes.append(nbytes)
    return stack._replace(types=tuple(names), sizes=tuple(sizes))


def _with_low_copies(stacks: list[ExpertTensor], lowbit: dict, type_name, shapes: dict,
                     path: Path) -> list[ExpertTensor]:
    """Attach each stacked tensor's low-bit copies (`lowbit`: name -> (tensor info, file)), checked against their
    slots before any pointer is made."""

    try:
        qt = GGMLQuantizationType[type_name]
        block, size = GGML_QUANT_SIZES[qt]
    except (KeyError, TypeError):
        raise BadModelError(f"{path}: edgemoe.lowbit_type is {type_name!r}, not a known quantization type") from None
    stacked = {s.name for s in stacks if s.count > 1}
    if set(lowbit) != stacked:
        raise BadModelError(f"{path}: low-bit copies must cover exactly the stacked expert tensors; missing "
                            f"{sorted(stacked - set(lowbit))[:2]}, unknown {sorted(set(lowbit) - stacked)[:2]}")
    out = []
    for s in stacks:
        t, file = lowbit.get(s.name, (None, 0))
        if t is None:
            out.append(s)
            continue
        row_len = int(shapes[s.name][0])
        rows = int(shapes[s.name][1:-1].prod())
        need = rows * (row_len // block) * size
        stride = int(t.n_bytes) // s.count
        if row_len % block or stride * s.count != int(t.n_bytes) or need > stride:
            raise BadModelError(f"{path}: {t.name} ({int(t.n_bytes)} bytes) does not hold {s.count} experts of "
                                f"{rows} x {row_len} at {qt.name} ({need} bytes each)")
        out.append(s._replace(low=LowCopy(int(t.data_offset), stride, qt.name, need, file)))
    return out

"""Split models: NAME-00001-of-00003.gguf and its siblings, found by name as llama.cpp finds them.

llama.cpp opens shard 1 and derives the others' names from it (`llama_split_path`: prefix + "-%05d-of-%05d.gguf");
each shard is a GGUF of its own (header, metadata, tensor infos, data section) carrying `split.no` (0-based),
`split.count` and `split.tensors.count`. Here: the shard names, and gguf-py's view of a model's tensors across
every file, for the code that reads tensor data with gguf-py (convert, verify, plan, profile, predict).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NamedTuple

from edgemoe_llamacpp.errors import ShardError

SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS = "split.no", "split.count", "split.tensors.count"
SPLIT_KEYS = (SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS)
_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")     # llama.cpp's split_path format


def shard_name(prefix: str | os.PathLike, no: int, count: int) -> Path:
    """The path of shard `no` (1-based) of `count`: llama.cpp's `llama_split_path`."""
    return Path(f"{prefix}-{no:05d}-of-{count:05d}.gguf")


def shard_paths(path: Path, no: int, count: int) -> tuple[Path, ...]:
    """Every shard's path, shard 1 first, from the path of shard `no` (0-based, as `split.no`) of `count`.
    ShardError if the name is not the one llama.cpp would derive (it could not find the others)."""
    m = _NAME.match(path.name)
    if m is None or int(m["no"]) != no + 1 or int(m["count"]) != count:
        raise ShardError(f"{path} is shard {no + 1} of {count} of a split model but is not named "
                         f"PREFIX-{no + 1:05d}-of-{count:05d}.gguf, so llama.cpp cannot find the other shards: "
                         f"give it its original name")
    prefix = path.parent / m["prefix"]
    return tuple(shard_name(prefix, i + 1, count) for i in range(count))


class GGUFSet(NamedTuple):
    """gguf-py's view of a model in one or more files: shard 1's metadata, every file's tensors in file order,
    and for each tensor the index of its file."""
    fields: dict
    tensors: list
    file_of: dict[str, int]


def open_gguf(paths) -> GGUFSet:
    """GGUFReader over every file of a model (`MoELayout.files`; read_layout has checked them)."""
    from gguf import GGUFReader

    readers = [GGUFReader(p) for p in paths]
    tensors = [t for r in readers for t in r.tensors]
    file_of = {t.name: i for i, r in enumerate(readers) for t in r.tensors}
    return GGUFSet(readers[0].fields, tensors, file_of)

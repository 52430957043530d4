"""Tiny random-weight GGUFs for layout and error tests (never for routing claims)."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np


def write_gguf(path: Path, arch: str, kv: dict[str, int], tensors: dict[str, tuple[int, ...]],
               arrays: dict[str, list] | None = None) -> Path:
    """Write `tensors` (name -> numpy shape, F32 zeros-plus-index) with `{arch}.<key>` integer metadata and
    any other metadata `arrays` (key -> list)."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in kv.items():
        w.add_uint32(f"{arch}.{key}", value)
    for key, values in (arrays or {}).items():
        w.add_array(key, values)
    for i, (name, shape) in enumerate(tensors.items()):
        w.add_tensor(name, np.full(shape, float(i), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def moe_tensors(n_layer: int, n_expert: int, d: int = 32, ff: int = 16, *, dense_layers: int = 0,
                shared: bool = False, biases: bool = False) -> dict[str, tuple[int, ...]]:
    t: dict[str, tuple[int, ...]] = {"token_embd.weight": (64, d), "output_norm.weight": (d,)}
    for i in range(n_layer):
        t[f"blk.{i}.attn_q.weight"] = (d, d)
        if i < dense_layers:
            t[f"blk.{i}.ffn_up.weight"] = (ff, d)
            continue
        t[f"blk.{i}.ffn_gate_inp.weight"] = (n_expert, d)
        t[f"blk.{i}.ffn_gate_exps.weight"] = (n_expert, ff, d)
        t[f"blk.{i}.ffn_up_exps.weight"] = (n_expert, ff, d)
        t[f"blk.{i}.ffn_down_exps.weight"] = (n_expert, d, ff)
        if biases:
            t[f"blk.{i}.ffn_gate_exps.bias"] = (n_expert, ff)
            t[f"blk.{i}.ffn_up_exps.bias"] = (n_expert, ff)
            t[f"blk.{i}.ffn_down_exps.bias"] = (n_expert, d)
        if shared:
            t[f"blk.{i}.ffn_up_shexp.weight"] = (ff, d)
            t[f"blk.{i}.ffn_down_shexp.weight"] = (d, ff)
    return t


def copy_gguf(src: Path, dst: Path, *, kv: dict | None = None, split_max_tensors: int = 0) -> None:
    """Write the GGUF `src` again with gguf-py: the same metadata, alignment and tensor bytes, metadata keys in
    `kv` replaced (key -> (value, type[, sub_type]), or None to drop), split into shards of `split_max_tensors`
    tensors if given (dst stem-0000i-of-0000N.gguf, each with its own header, as gguf-py splits a model)."""
    kv = kv or {}
    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents(),
                        split_max_tensors=split_max_tensors)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.alignment") or key in kv:
            continue
        vtype = field.types[0]
        w.add_key_value(key, field.contents(), vtype,
                        sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    for key, spec in kv.items():
        if spec is not None:
            w.add_key_value(key, spec[0], spec[1], sub_type=spec[2] if len(spec) > 2 else None)
    w.add_custom_alignment(reader.alignment)
    for t in reader.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_shards(src: Path, dst: Path, max_tensors: int) -> list[Path]:
    """`src` split as gguf-py splits a model (GGUFWriter(split_max_tensors=...)); the shards in order."""
    copy_gguf(src, dst, split_max_tensors=max_tensors)
    return sorted(dst.parent.glob(f"{dst.stem}-*-of-*.gguf"))

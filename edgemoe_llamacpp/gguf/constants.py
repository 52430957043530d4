"""Names and numbers the GGUF files and llama.cpp fix, in one place: the `edgemoe.*` metadata keys and tensor names
edgemoe convert writes and the layout, verify and the patched loader read; and the ggml enum values the hook
compares node fields with (types from gguf-py's table; the op from ggml.h, checked against the runtime by
runtime.check_tensor_offsets' struct layout)."""
from __future__ import annotations

from gguf import GGMLQuantizationType

FILE_BITS = 40          # no file may reach 1 TiB: storage keys a file's byte by file << FILE_BITS | offset

# edgemoe's metadata (a converted file's) and tensor names
EDGEMOE_PREFIX = "edgemoe."
FORMAT_VERSION = 1                  # edgemoe.version of what convert writes
GUARD = "edgemoe.guard"             # the tensor that makes stock llama.cpp refuse a file with per-expert types
REQUIRED_FEATURES = "edgemoe.required_features"     # what the patched loader must understand (patches/0002)
EXPERT_TYPES = "edgemoe.expert_types."
LOWBIT = "edgemoe.lowbit."          # tensor name prefix of the low-bit copies; their type: edgemoe.lowbit_type
CHECKSUM_NAMES = "edgemoe.checksum.tensors"
CHECKSUM_SHA256 = "edgemoe.checksum.sha256"
SET_ID = "edgemoe.set_id"           # one random id in every shard of one conversion: a mixed set is refused

# ggml's enums, as llama.cpp's graph nodes carry them
GGML_TYPE_F32 = int(GGMLQuantizationType.F32)
GGML_TYPE_I32 = int(GGMLQuantizationType.I32)
GGML_OP_MUL_MAT_ID = 30             # ggml.h enum ggml_op (llama-cpp-python 0.3.36's ggml)

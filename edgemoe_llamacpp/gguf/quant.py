"""Quantization types, ggml's own quantizer (ggml_quantize_chunk via ctypes) and gguf-py's dequantizer."""
from __future__ import annotations

import ctypes
import functools

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as _dequantize

from edgemoe_llamacpp.errors import EdgeMoEError

# the types a plan may give an expert, smallest first: llama.cpp's i-quants (IQ2_XXS 2.06 .. IQ4_XS 4.25 bits per
# weight), the K-quants and Q8_0; all but Q8_0 quantize rows of 256 values
PLAN_TYPES = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K", "IQ3_XXS", "IQ3_S", "Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K",
              "Q8_0")


def qtype(name: str | int) -> GGMLQuantizationType:
    try:
        return GGMLQuantizationType[name] if isinstance(name, str) else GGMLQuantizationType(name)
    except (KeyError, ValueError):
        raise EdgeMoEError(f"unknown ggml type {name!r}") from None


def bits_per_weight(name: str) -> float:
    block, size = GGML_QUANT_SIZES[qtype(name)]
    return 8 * size / block


def row_bytes(name: str, n_per_row: int) -> int:
    block, size = GGML_QUANT_SIZES[qtype(name)]
    if n_per_row % block:
        raise EdgeMoEError(f"{name} needs rows of a multiple of {block} values, got {n_per_row}")
    return n_per_row // block * size


def fits(name: str, n_per_row: int) -> bool:
    return n_per_row % GGML_QUANT_SIZES[qtype(name)][0] == 0


@functools.cache
def _ggml():
    from edgemoe_llamacpp.runtime import ggml_base

    lib = ggml_base()
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    return lib


class _TypeTraits(ctypes.Structure):
    """ggml.h's struct ggml_type_traits (ggml_get_type_traits)."""
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
                ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)   # ggml_to_float_t


@functools.cache
def _to_float(t: GGMLQuantizationType):
    lib = _ggml()
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    fn = lib.ggml_get_type_traits(int(t)).contents.to_float
    if not fn:
        raise EdgeMoEError(f"ggml has no dequantizer for {t.name}")
    return _TO_FLOAT(fn)


def ggml_dequantize(data: bytes | np.ndarray, name: str) -> np.ndarray:
    """Whole blocks of type `name` -> float32 values, by ggml's own dequantizer (the code llama.cpp computes
    with; `dequantize` is gguf-py's reference)."""
    raw = np.ascontiguousarray(np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes | bytearray)
                               else data.view(np.uint8).reshape(-1))
    t = qtype(name)
    if t == GGMLQuantizationType.F32:
        return raw.view(np.float32).copy()
    block, size = GGML_QUANT_SIZES[t]
    if raw.size % size:
        raise ValueError(f"{raw.size} bytes are not whole {name} blocks of {size}")
    out = np.empty(raw.size // size * block, dtype=np.float32)
    _to_float(t)(raw.ctypes.data, out.ctypes.data, out.size)
    return out


def requires_imatrix(name: str) -> bool:
    """ggml cannot quantize to `name` without an importance matrix (IQ2_XXS, IQ2_XS, IQ1_S)."""
    return bool(_ggml().ggml_quantize_requires_imatrix(int(qtype(name))))


def quantize(weights: np.ndarray, name: str, imatrix: np.ndarray | None = None) -> bytes:
    """Quantize float rows [n_rows, n_per_row] to `name` with ggml's own quantizer; the GGUF bytes.

    imatrix: the importance of each column ([n_per_row], llama.cpp's convention: the mean squared input the
    column multiplies); ggml weights each value's rounding error by it in the types that take one (the
    K-quants and i-quants; Q8_0 and the float types ignore it)."""
    w = np.ascontiguousarray(weights, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"quantize wants rows [n_rows, n_per_row], got shape {w.shape}")
    t = qtype(name)
    if t == GGMLQuantizationType.F32:
        return w.tobytes()
    n_rows, n_per_row = w.shape
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imatrix.shape != (n_per_row,) or not np.isfinite(imatrix).all() or (imatrix < 0).any():
            raise EdgeMoEError(f"an importance matrix for rows of {n_per_row} values must be {n_per_row} finite, "
                               f"non-negative numbers; got shape {imatrix.shape}")
    elif requires_imatrix(name):
        raise EdgeMoEError(f"{name} needs an importance matrix (convert --imatrix PROFILE, or plan from --profile)")
    out = ctypes.create_string_buffer(n_rows * row_bytes(name, n_per_row))
    n = _ggml().ggml_quantize_chunk(int(t), w.ctypes.data, out, 0, n_rows, n_per_row,
                                    None if imatrix is None else imatrix.ctypes.data)
    if n != len(out):
        raise RuntimeError(f"ggml_quantize_chunk wrote {n} bytes, expected {len(out)}")
    return out.raw


def dequantize(data: bytes | np.ndarray, name: str, n_per_row: int) -> np.ndarray:
    """GGUF bytes of whole rows at type `name` -> float32 [n_rows, n_per_row] (gguf-py's reference code)."""
    raw = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes | bytearray) else data.view(np.uint8)
    t = qtype(name)
    if t == GGMLQuantizationType.F32:
        return raw.view(np.float32).reshape(-1, n_per_row).copy()
    rb = row_bytes(name, n_per_row)
    return _dequantize(raw.reshape(-1, rb), t).astype(np.float32, copy=False)

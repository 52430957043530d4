"""Write a GGUF with a named MoE model's geometry and quant mix, and random weights: files as large as the
models people run, for benchmarks (never for routing or quality claims: the weights mean nothing).

    python tools/make_scale_model.py qwen3-30b-a3b --out /work/scale/qwen3-30b-a3b.gguf
    python tools/make_scale_model.py mixtral-8x7b --layers 4 --out /tmp/mixtral-4l.gguf --check

Each preset has the model's architecture (llama.cpp's tensor set for it), depth, width, expert count and
top-k; `--layers N` writes the first N layers only. The vocabulary is the bundled fixture's
(tests/fixtures/tiny-moe.gguf: its tokenizer.* metadata is copied), so files load and tokenize; n_vocab is
its 4,096 tokens, which makes embeddings and output far smaller than the real models'.

Types, as llama.cpp's Q4_K_M writes them: expert gate/up Q4_K and down Q6_K (gpt-oss: MXFP4, as its
release); attention and dense weights Q4_K, with Q6_K for attn_v, dense/shared ffn_down and output; a
tensor whose rows are no multiple of 256 values falls back to Q8_0, as llama.cpp's quantizer does; norms,
routers, biases and attention sinks F32.

Weights are written directly as random blocks of their type, streamed (a chunk at a time, never the whole
file in memory): random quant bytes with a fixed small scale (d, dmin, the e8m0 exponent) per tensor, set so
the weights have the standard deviation of a scaled normal init (1/sqrt(fan_in)); norms are ones, biases
and sinks zeros. Every value is finite, and activations stay finite through every layer.

Layout: general.alignment is the page size, so every tensor starts on a page, and in every preset but
gpt-oss (whose 2880-wide MXFP4 experts are 4,406,400 bytes) and qwen3's narrow variant each expert slice is a
whole number of pages:
edgemoe fetches and evicts experts one by one without `edgemoe convert`. The file loads in stock llama.cpp.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from tqdm import tqdm

from edgemoe_llamacpp import files
from edgemoe_llamacpp.convert.rewrite import ALIGNMENT
from edgemoe_llamacpp.errors import EdgeMoEError
from edgemoe_llamacpp.gguf.quant import dequantize

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tiny-moe.gguf"
CHUNK = 32 << 20                # bytes of tensor data generated at a time
LLAMA_FTYPE_MOSTLY_Q4_K_M = 15  # llama.h's llama_ftype
LLAMA_FTYPE_MOSTLY_MXFP4_MOE = 38


class Tensor(NamedTuple):
    """One tensor: GGUF name, shape in GGUF order (ne[0] is the row length), type, and its init: "ones",
    "zeros", or the standard deviation of its random weights."""
    name: str
    ne: tuple[int, ...]
    type: str
    init: str | float


@dataclass(frozen=True)
class Preset:
    arch: str
    n_layer: int
    n_embd: int
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    n_head: int
    n_head_kv: int
    head_dim: int
    expert_types: tuple[str, str, str]          # gate, up, down
    kv: dict = field(default_factory=dict)      # the architecture's other hyperparameters ({arch}.<key>)
    source: str = ""                            # where the geometry comes from


# Geometry from each model's published config.json (Hugging Face), the keys llama.cpp's converter writes.
PRESETS = {
    "qwen3-30b-a3b": Preset(
        "qwen3moe", 48, 2048, 128, 8, 768, 32, 4, 128, ("Q4_K", "Q4_K", "Q6_K"),
        {"context_length": 40960, "feed_forward_length": 6144, "rope.freq_base": 1e6,
         "attention.layer_norm_rms_epsilon": 1e-6},
        "Qwen/Qwen3-30B-A3B config.json"),
    # Qwen3-30B-A3B's depth, expert count and top-k at a quarter of its width: a token takes milliseconds, so
    # a per-layer cost (the hook's) shows in decode speed (tools/hook_overhead.py); its Q6_K down slices are
    # 107,520 bytes, no whole pages (like gpt-oss's), which matters under a budget only
    "qwen3-30b-a3b-narrow": Preset(
        "qwen3moe", 48, 512, 128, 8, 256, 8, 2, 64, ("Q4_K", "Q4_K", "Q6_K"),
        {"context_length": 40960, "feed_forward_length": 1536, "rope.freq_base": 1e6,
         "attention.layer_norm_rms_epsilon": 1e-6},
        "Qwen/Qwen3-30B-A3B config.json, width / 4"),
    "olmoe-1b-7b": Preset(
        "olmoe", 16, 2048, 64, 8, 1024, 16, 16, 128, ("Q4_K", "Q4_K", "Q6_K"),
        {"context_length": 4096, "feed_forward_length": 1024, "rope.freq_base": 1e4,
         "attention.layer_norm_rms_epsilon": 1e-5},
        "allenai/OLMoE-1B-7B-0924 config.json"),
    "deepseek-v2-lite": Preset(
        "deepseek2", 27, 2048, 64, 6, 1408, 16, 1, 192, ("Q4_K", "Q4_K", "Q6_K"),
        {"context_length": 163840, "feed_forward_length": 10944, "rope.freq_base": 1e4,
         "attention.layer_norm_rms_epsilon": 1e-6, "leading_dense_block_count": 1, "expert_shared_count": 2,
         "expert_weights_scale": 1.0, "attention.kv_lora_rank": 512, "attention.q_lora_rank": 0,
         "rope.dimension_count": 64, "attention.key_length_mla": 192, "attention.value_length_mla": 128,
         "attention.key_length": 512 + 64, "attention.value_length": 512},
        "deepseek-ai/DeepSeek-V2-Lite config.json (MLA written as llama.cpp's converter splits it)"),
    "gpt-oss-20b": Preset(
        "gpt-oss", 24, 2880, 32, 4, 2880, 64, 8, 64, ("MXFP4", "MXFP4", "MXFP4"),
        {"context_length": 131072, "rope.freq_base": 150000.0, "attention.layer_norm_rms_epsilon": 1e-5,
         "attention.sliding_window": 128},
        "openai/gpt-oss-20b config.json"),
    # gpt-oss-120b: gpt-oss-20b's width and attention, 36 layers of 128 experts (about 60 GB at MXFP4)
    "gpt-oss-120b": Preset(
        "gpt-oss", 36, 2880, 128, 4, 2880, 64, 8, 64, ("MXFP4", "MXFP4", "MXFP4"),
        {"context_length": 131072, "rope.freq_base": 150000.0, "attention.layer_norm_rms_epsilon": 1e-5,
         "attention.sliding_window": 128},
        "openai/gpt-oss-120b config.json"),
    "mixtral-8x7b": Preset(
        "llama", 32, 4096, 8, 2, 14336, 32, 8, 128, ("Q4_K", "Q4_K", "Q6_K"),
        {"context_length": 32768, "feed_forward_length": 14336, "rope.freq_base": 1e6,
         "attention.layer_norm_rms_epsilon": 1e-5},
        "mistralai/Mixtral-8x7B-v0.1 config.json"),
}


def dense_type(name: str, row: int) -> str:
    """Q4_K_M's choice for a non-expert weight, or Q8_0 where rows are no multiple of K-quants' 256."""
    wide = name.endswith(("attn_v.weight", "ffn_down.weight", "ffn_down_shexp.weight")) or name == "output.weight"
    return ("Q6_K" if wide else "Q4_K") if row % 256 == 0 else "Q8_0"


def expert_type(preferred: str, row: int) -> str:
    block = GGML_QUANT_SIZES[GGMLQuantizationType[preferred]][0]
    return preferred if row % block == 0 else "Q8_0"


def weight(name: str, ne: tuple[int, ...], typ: str | None = None) -> Tensor:
    """A matrix of random weights: std 1/sqrt(fan_in), fan_in being the row length ne[0]."""
    return Tensor(name, ne, typ or dense_type(name, ne[0]), 1 / math.sqrt(ne[0]))


def norm(name: str, n: int) -> Tensor:
    return Tensor(name, (n,), "F32", "ones")


def zeros(name: str, ne: tuple[int, ...]) -> Tensor:
    return Tensor(name, ne, "F32", "zeros")


def tensors(p: Preset, n_layer: int, n_vocab: int) -> list[Tensor]:
    """llama.cpp's tensor set for the preset's architecture (src/models/<arch>.cpp, load_arch_tensors)."""
    d, q_dim, kv_dim = p.n_embd, p.n_head * p.head_dim, p.n_head_kv * p.head_dim
    out = [Tensor("token_embd.weight", (d, n_vocab), dense_type("token_embd.weight", d), 1.0),
           norm("output_norm.weight", d), weight("output.weight", (d, n_vocab))]
    for i in range(n_layer):
        b = f"blk.{i}."
        out.append(norm(b + "attn_norm.weight", d))
        if p.arch == "deepseek2":
            out += _mla(p, b)
        else:
            out += [weight(b + "attn_q.weight", (d, q_dim)), weight(b + "attn_k.weight", (d, kv_dim)),
                    weight(b + "attn_v.weight", (d, kv_dim)), weight(b + "attn_output.weight", (q_dim, d))]
        if p.arch == "qwen3moe":
            out += [norm(b + "attn_q_norm.weight", p.head_dim), norm(b + "attn_k_norm.weight", p.head_dim)]
        elif p.arch == "olmoe":
            out += [norm(b + "attn_q_norm.weight", q_dim), norm(b + "attn_k_norm.weight", kv_dim)]
        elif p.arch == "gpt-oss":
            out += [norm(b + "post_attention_norm.weight", d), zeros(b + "attn_sinks.weight", (p.n_head,)),
                    zeros(b + "attn_output.bias", (d,))]
        if p.arch != "gpt-oss":
            out.append(norm(b + "ffn_norm.weight", d))
        if i < p.kv.get("leading_dense_block_count", 0):
            ff = p.kv["feed_forward_length"]
            out += [weight(b + "ffn_gate.weight", (d, ff)), weight(b + "ffn_up.weight", (d, ff)),
                    weight(b + "ffn_down.weight", (ff, d))]
            continue
        out += _moe(p, b)
    return out


def _mla(p: Preset, b: str) -> list[Tensor]:
    """DeepSeek-V2's multi-head latent attention without a q LoRA (the Lite model), k_b/v_b split."""
    rank, rope = p.kv["attention.kv_lora_rank"], p.kv["rope.dimension_count"]
    nope, v_dim = p.kv["attention.key_length_mla"] - rope, p.kv["attention.value_length_mla"]
    return [norm(b + "attn_kv_a_norm.weight", rank),
            weight(b + "attn_q.weight", (p.n_embd, p.n_head * p.head_dim)),
            weight(b + "attn_kv_a_mqa.weight", (p.n_embd, rank + rope)),
            weight(b + "attn_k_b.weight", (nope, rank, p.n_head)),
            weight(b + "attn_v_b.weight", (rank, v_dim, p.n_head)),
            weight(b + "attn_output.weight", (p.n_head * v_dim, p.n_embd))]


def _moe(p: Preset, b: str) -> list[Tensor]:
    d, ff, n = p.n_embd, p.n_ff_exp, p.n_expert
    gate, up, down = p.expert_types
    out = [Tensor(b + "ffn_gate_inp.weight", (d, n), "F32", 1 / math.sqrt(d)),
           weight(b + "ffn_gate_exps.weight", (d, ff, n), expert_type(gate, d)),
           weight(b + "ffn_up_exps.weight", (d, ff, n), expert_type(up, d)),
           weight(b + "ffn_down_exps.weight", (ff, d, n), expert_type(down, ff))]
    if p.arch == "gpt-oss":
        out += [zeros(b + "ffn_gate_inp.bias", (n,)), zeros(b + "ffn_gate_exps.bias", (ff, n)),
                zeros(b + "ffn_up_exps.bias", (ff, n)), zeros(b + "ffn_down_exps.bias", (d, n))]
    shared = p.kv.get("expert_shared_count", 0) * ff
    if shared:
        out += [weight(b + "ffn_gate_shexp.weight", (d, shared)), weight(b + "ffn_up_shexp.weight", (d, shared)),
                weight(b + "ffn_down_shexp.weight", (shared, d))]
    return out


# ------------------------------------------------------------------ random blocks of each type

class BlockFormat(NamedTuple):
    """Where a block keeps its scale(s) and how its sub-block scales are kept small."""
    scale_at: int                   # byte offset of the f16 d (or the e8m0 exponent)
    extra: tuple                    # (offset, f16 value relative to d) of further scales: Q4_K's dmin
    limit: tuple | None             # (start, end, bound): int8 sub-block scales drawn in [-bound, bound]
    mask: tuple | None              # (start, end, mask): AND these bytes with mask


# Block layouts from ggml-common.h: block_q4_K {d, dmin, scales[12], qs[128]}; block_q6_K {ql[128], qh[64],
# scales[16] (int8), d}; block_q8_0 {d, qs[32]}; block_mxfp4 {e (e8m0), qs[16]}. The sub-block scales are
# kept small so that d stays a normal f16 at the small standard deviations of wide matrices: Q4_K's packed
# 6-bit scales and mins lose their top two bits (the low nibbles of scales[0..7] leave every one in 0..15),
# Q6_K's int8 scales lie in -4..4. Q4_K's dmin = 7.5 d centres its values (d * sc * q - dmin * m, q in 0..15,
# m distributed like sc).
FORMATS = {
    "Q4_K": BlockFormat(0, ((2, 7.5),), None, (4, 12, 0x0F)),
    "Q6_K": BlockFormat(208, (), (192, 208, 4), None),
    "Q8_0": BlockFormat(0, (), None, None),
    "MXFP4": BlockFormat(0, (), None, None),
}


def _f16_bytes(x: float) -> np.ndarray:
    return np.frombuffer(np.float16(x).tobytes(), np.uint8)


def fill_scales(blocks: np.ndarray, typ: str, scale: float, rng: np.random.Generator) -> None:
    """Set the scale fields of random blocks (n, block bytes) in place."""
    fmt = FORMATS[typ]
    if typ == "MXFP4":
        blocks[:, fmt.scale_at] = scale                     # e8m0 exponent: 2^(e - 127); 255 would be NaN
        return
    blocks[:, fmt.scale_at:fmt.scale_at + 2] = _f16_bytes(scale)
    for at, rel in fmt.extra:
        blocks[:, at:at + 2] = _f16_bytes(scale * rel)
    if fmt.mask is not None:
        start, end, mask = fmt.mask
        blocks[:, start:end] &= mask
    if fmt.limit is not None:
        start, end, bound = fmt.limit
        blocks[:, start:end] = rng.integers(-bound, bound + 1, (len(blocks), end - start), dtype=np.int8).view(np.uint8)


@functools.cache
def block_scale(typ: str, std: float) -> float | int:
    """The scale field that gives random blocks of `typ` weights of standard deviation `std`."""
    rng = np.random.default_rng(0)
    size = GGML_QUANT_SIZES[GGMLQuantizationType[typ]][1]
    sample = rng.integers(0, 256, (4096, size), dtype=np.uint8)
    fill_scales(sample, typ, 127 if typ == "MXFP4" else 1.0, rng)
    unit = float(dequantize(sample.reshape(-1), typ, GGML_QUANT_SIZES[GGMLQuantizationType[typ]][0]).std())
    if typ == "MXFP4":
        return 127 + round(math.log2(std / unit))
    d = np.float16(std / unit)
    if not (np.isfinite(d) and d >= np.finfo(np.float16).tiny):
        raise EdgeMoEError(f"no normal f16 scale gives {typ} weights a standard deviation of {std:g}")
    return float(d)


def nbytes(t: Tensor) -> int:
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[t.type]]
    return math.prod(t.ne) // block * size


def chunks(t: Tensor, rng: np.random.Generator):
    """The tensor's data, in chunks of whole rows of at most CHUNK bytes."""
    total = nbytes(t)
    if t.type in ("F32", "F16"):
        dtype = np.float32 if t.type == "F32" else np.float16
        n, step = math.prod(t.ne), max(1, CHUNK // np.dtype(dtype).itemsize)
        for start in range(0, n, step):
            m = min(step, n - start)
            if t.init == "ones":
                yield np.ones(m, dtype)
            elif t.init == "zeros":
                yield np.zeros(m, dtype)
            else:
                yield (rng.standard_normal(m, np.float32) * t.init).astype(dtype)
        return
    block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[t.type]][1]
    scale = block_scale(t.type, t.init)
    step = max(1, CHUNK // block_bytes)
    n_blocks = total // block_bytes
    for start in range(0, n_blocks, step):
        blocks = rng.integers(0, 256, (min(step, n_blocks - start), block_bytes), dtype=np.uint8)
        fill_scales(blocks, t.type, scale, rng)
        yield blocks


# ------------------------------------------------------------------ the file

def tokenizer_fields(path: Path) -> tuple[list[tuple], int]:
    """The fixture's tokenizer.* metadata as (key, value, type, sub type), and its vocabulary size."""
    reader = gguf.GGUFReader(path)
    out = []
    for key, f in reader.fields.items():
        if key.startswith("tokenizer."):
            vtype = f.types[0]
            out.append((key, f.contents(), vtype, f.types[-1] if vtype == GGUFValueType.ARRAY else None))
    return out, len(reader.fields["tokenizer.ggml.tokens"].data)


def metadata(writer: gguf.GGUFWriter, p: Preset, name: str, n_layer: int, n_vocab: int, seed: int) -> None:
    a = p.arch
    writer.add_string("general.name", f"edgemoe scale model {name} (random weights)")
    writer.add_string("general.description", json.dumps({"tool": "tools/make_scale_model.py", "preset": name,
                                                         "layers": n_layer, "seed": seed, "geometry": p.source}))
    writer.add_uint32("general.file_type", LLAMA_FTYPE_MOSTLY_MXFP4_MOE if "MXFP4" in p.expert_types
                      else LLAMA_FTYPE_MOSTLY_Q4_K_M)
    writer.add_uint32(f"{a}.block_count", n_layer)
    writer.add_uint32(f"{a}.embedding_length", p.n_embd)
    writer.add_uint32(f"{a}.attention.head_count", p.n_head)
    writer.add_uint32(f"{a}.attention.head_count_kv", p.n_head_kv)
    writer.add_uint32(f"{a}.expert_count", p.n_expert)
    writer.add_uint32(f"{a}.expert_used_count", p.n_expert_used)
    if a not in ("olmoe", "llama"):               # those two size their experts by feed_forward_length
        writer.add_uint32(f"{a}.expert_feed_forward_length", p.n_ff_exp)
    if a in ("qwen3moe", "gpt-oss"):
        writer.add_uint32(f"{a}.attention.key_length", p.head_dim)
        writer.add_uint32(f"{a}.attention.value_length", p.head_dim)
    if a == "deepseek2":
        writer.add_uint32(f"{a}.vocab_size", n_vocab)
    for k, v in p.kv.items():
        if isinstance(v, float):
            writer.add_float32(f"{a}.{k}", v)
        else:
            writer.add_uint32(f"{a}.{k}", v)


def write(name: str, out: Path, *, layers: int | None = None, seed: int = 0, force: bool = False,
          progress: bool = True) -> dict:
    """Write the preset's file to `out` (atomically); returns what was written."""
    if name not in PRESETS:
        raise EdgeMoEError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    p = PRESETS[name]
    n_layer = p.n_layer if layers is None else layers
    dense_lead = p.kv.get("leading_dense_block_count", 0)
    if not dense_lead < n_layer <= p.n_layer:
        raise EdgeMoEError(f"{name} takes --layers {dense_lead + 1}..{p.n_layer}, not {n_layer}")
    out = files.check_output(out, force=force, what="model")
    tok, n_vocab = tokenizer_fields(FIXTURE)
    specs = tensors(p, n_layer, n_vocab)
    sizes = [nbytes(t) for t in specs]
    need = sum(-(-s // ALIGNMENT) * ALIGNMENT for s in sizes) + (16 << 20)
    free = shutil.disk_usage(out.parent).free
    if need > free:
        raise EdgeMoEError(f"{out}: {need / 1e9:.2f} GB to write, {free / 1e9:.2f} GB free on its disk")

    writer = gguf.GGUFWriter(None, p.arch)
    metadata(writer, p, name, n_layer, n_vocab, seed)
    for key, value, vtype, sub in tok:
        writer.add_key_value(key, value, vtype, sub_type=sub)
    writer.add_custom_alignment(ALIGNMENT)
    for t, size in zip(specs, sizes, strict=True):
        writer.add_tensor_info(t.name, tuple(reversed(t.ne)), np.float32, size,
                               raw_dtype=GGMLQuantizationType[t.type])
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    with files.atomic_output(out) as tmp:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        f = writer.fout[0]
        pos = -(-f.tell() // ALIGNMENT) * ALIGNMENT
        with tqdm(total=sum(sizes), unit="B", unit_scale=True, desc=f"write {name}", disable=not progress) as bar:
            for t, size in zip(specs, sizes, strict=True):
                f.seek(pos)
                for chunk in chunks(t, rng):
                    f.write(memoryview(chunk).cast("B"))
                    bar.update(chunk.nbytes)
                pos += -(-size // ALIGNMENT) * ALIGNMENT
        f.truncate(pos)
        f.flush()
        writer.close()
    return {"preset": name, "path": str(out), "layers": n_layer, "bytes": out.stat().st_size,
            "seconds": time.perf_counter() - start}


def check(path: Path, prompt: str = "import os\n\n\ndef ", n: int = 4) -> list[int]:
    """Greedy tokens through edgemoe_llamacpp.Llama; SystemExit if any logit is not finite."""
    from edgemoe_llamacpp.engine.generate import greedy
    from edgemoe_llamacpp.engine.llama import Llama

    llm = Llama(str(path), n_ctx=256, verbose=False)
    try:
        tokens, logits = greedy(llm, prompt, n)
    finally:
        llm.close()
    if not np.isfinite(logits).all():
        raise SystemExit(f"{path}: logits are not finite")
    return tokens


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", choices=PRESETS)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, help="write only the first N layers (default: the model's depth)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="replace --out if it exists")
    ap.add_argument("--check", action="store_true", help="then run a few greedy tokens and check the logits")
    args = ap.parse_args(argv)
    try:
        info = write(args.preset, args.out, layers=args.layers, seed=args.seed, force=args.force)
        from edgemoe_llamacpp.gguf.layout import read_layout

        layout = read_layout(args.out)
        info.update(n_expert=layout.n_expert, k=layout.n_expert_used, moe_layers=len(layout.moe_layers),
                    expert_bytes=layout.expert_bytes, dense_bytes=layout.dense_bytes,
                    expert_types=sorted({f"{t.name.split('.')[2]}:{t.type}" for t in layout.expert_tensors}))
        print(f"wrote {args.out}: {info['bytes'] / 1e9:.2f} GB in {info['seconds']:.0f} s; {layout.arch}, "
              f"{layout.n_layer} layers ({info['moe_layers']} MoE) x {layout.n_expert} experts, top-{layout.n_expert_used}; "
              f"experts {layout.expert_bytes / 1e9:.2f} GB ({len(layout.experts[0].ranges)} tensors, "
              f"{layout.experts[0].nbytes / 1e6:.2f} MB each), dense {layout.dense_bytes / 1e6:.0f} MB; "
              f"{', '.join(info['expert_types'])}")
        if args.check:
            print(f"greedy tokens (finite logits): {check(args.out)}")
        print(json.dumps(info))
    except EdgeMoEError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:                 # Ctrl-C or SIGTERM: the temporary is already gone
        return 130
    return 0


if __name__ == "__main__":
    files.clean_up_on_sigterm()
    sys.exit(main())

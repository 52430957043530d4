"""Widen every expert of a trained MoE GGUF so bytes and FLOPs per expert match a real model.

Each expert's FFN grows from n_ff to --ff hidden units. The new units' gate rows are zero, so
silu(gate . x) = 0 and they add exactly nothing: routing and output stay the trained model's. Their up
rows and down columns are noise, so every byte is real data to read and every FLOP is computed.
Works on Q8_0 experts (the fixture's type); new Q8_0 blocks are written directly.

    python tools/inflate_experts.py tests/fixtures/tiny-moe.gguf bench/models/io-moe.gguf --ff 20480 --check
"""
from __future__ import annotations

import argparse
from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

from edgemoe_llamacpp import files
from edgemoe_llamacpp.gguf.layout import STACKED_EXPERTS, read_layout

Q8_0 = gguf.GGMLQuantizationType.Q8_0
QK, BLOCK = gguf.GGML_QUANT_SIZES[Q8_0]     # 32 weights in 34 bytes: f16 scale + 32 int8
NOISE_SCALE = np.float16(0.02 / 127)


def noise_blocks(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Q8_0 blocks of small random weights, shape (..., BLOCK) uint8."""
    out = np.empty((*shape, BLOCK), dtype=np.uint8)
    out[..., :2] = np.frombuffer(NOISE_SCALE.tobytes(), dtype=np.uint8)
    out[..., 2:] = rng.integers(0, 256, size=(*shape, QK), dtype=np.uint8)
    return out


def inflate(name: str, data: np.ndarray, old_ff: int, ff: int, rng: np.random.Generator) -> np.ndarray:
    """data: (E, rows, row_bytes) Q8_0 bytes of a stacked expert tensor."""
    E, rows, row_bytes = data.shape
    proj = STACKED_EXPERTS.match(name).group(2)
    if proj in ("ffn_gate_exps", "ffn_up_exps"):            # (E, n_ff, n_embd): new rows
        extra = np.zeros((E, ff - old_ff, row_bytes), np.uint8) if proj == "ffn_gate_exps" else \
            noise_blocks(rng, (E, ff - old_ff, row_bytes // BLOCK)).reshape(E, ff - old_ff, row_bytes)
        return np.concatenate([data, extra], axis=1)
    if proj == "ffn_down_exps":                               # (E, n_embd, n_ff): new columns
        extra = noise_blocks(rng, (E, rows, (ff - old_ff) // QK)).reshape(E, rows, -1)
        return np.concatenate([data, extra], axis=2)
    raise SystemExit(f"{name}: no rule to widen this expert tensor")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--ff", type=int, required=True, help="new expert FFN width (multiple of 256)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="overwrite dst")
    ap.add_argument("--check", action="store_true", help="greedy output of dst must equal src's")
    args = ap.parse_args()
    files.tool_output(args.dst, "dst", inputs=[args.src], force=args.force)

    layout = read_layout(args.src)
    reader = gguf.GGUFReader(args.src)
    arch = layout.arch
    key = f"{arch}.expert_feed_forward_length"
    old_ff = int(reader.fields[key].contents())
    if args.ff % 256 or args.ff <= old_ff:
        raise SystemExit(f"--ff must be a multiple of 256 above the current {old_ff}")
    if {t.type for t in layout.expert_tensors} != {"Q8_0"}:
        raise SystemExit("only Q8_0 experts can be widened")
    tmp = files.temporary_beside(args.dst)

    writer = gguf.GGUFWriter(str(tmp), arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = args.ff if field.name == key else field.contents()
        writer.add_key_value(field.name, value, vtype, sub_type=sub)
    experts = {t.name for t in layout.expert_tensors}
    shapes = {}
    for t in reader.tensors:
        shape = list(t.data.shape)
        if t.name in experts:
            if STACKED_EXPERTS.match(t.name).group(2) == "ffn_down_exps":
                shape[2] = args.ff // QK * BLOCK
            else:
                shape[1] = args.ff
        shapes[t.name] = shape
        nbytes = int(np.prod(shape)) * t.data.dtype.itemsize
        writer.add_tensor_info(t.name, shape, t.data.dtype, nbytes, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(args.seed)
    total = sum(int(np.prod(s)) for s in shapes.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="inflate") as bar:
        for t in reader.tensors:
            data = inflate(t.name, np.asarray(t.data), old_ff, args.ff, rng) if t.name in experts else t.data
            writer.write_tensor_data(data)
            bar.update(data.nbytes)
    writer.close()
    files.commit(tmp, args.dst)
    new = read_layout(args.dst)
    print(f"wrote {args.dst}: {new.file_size / 1e9:.2f} GB, {len(new.experts)} experts of "
          f"{new.experts[0].nbytes / 1e6:.2f} MB (expert FFN {old_ff} -> {args.ff}), "
          f"dense {new.dense_bytes / 1e6:.1f} MB, experts {new.expert_bytes / 1e9:.2f} GB")
    if args.check:
        a, b = greedy_tokens(args.src), greedy_tokens(args.dst)
        print(f"greedy 32 tokens equal: {a == b}")
        if a != b:
            raise SystemExit(1)


def greedy_tokens(path: Path, prompt: str = "import os\nimport sys\n\n\ndef ", n: int = 32) -> list[int]:
    from edgemoe_llamacpp.engine.generate import greedy
    from edgemoe_llamacpp.engine.llama import stock_llama

    llm = stock_llama(path, use_extra_bufts=False, n_ctx=256, verbose=False)
    try:
        return greedy(llm, prompt, n)[0]
    finally:
        llm.close()


if __name__ == "__main__":
    main()

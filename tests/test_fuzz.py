"""Hostile GGUF files: every mutation ends in the project's clear error or a layout that stays in the file."""
import itertools
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from synthetic import moe_tensors, write_gguf

from edgemoe_llamacpp.errors import EdgeMoEError
from edgemoe_llamacpp.gguf.layout import read_layout


class Base(tuple):
    def __repr__(self) -> str:      # hypothesis prints the arguments of a failing case
        return f"<GGUF of {len(self[0])} bytes, tensor data at {self[1]}>"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Base:
    """A small valid MoE GGUF and where its tensor data starts (everything before is header/KV/infos)."""
    path = write_gguf(tmp_path_factory.mktemp("fuzz") / "m.gguf", "qwen3moe",
                      {"block_count": 2, "expert_count": 4, "expert_used_count": 2}, moe_tensors(2, 4, d=16, ff=8))
    return Base((path.read_bytes(), read_layout(path).data_offset))


def check(path) -> None:
    try:
        layout = read_layout(path)
    except EdgeMoEError:
        return
    size = path.stat().st_size
    ranges = sorted((r.offset, r.offset + r.size) for x in layout.experts for r in x.ranges)
    assert all(layout.data_offset <= a < b <= size for a, b in ranges)
    assert all(b1 <= a2 for (_, b1), (a2, _) in itertools.pairwise(ranges))


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(data=st.data())
def test_flipped_header_bytes(tmp_path, base, data):
    blob, header_end = base
    buf = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 8))):
        buf[data.draw(st.integers(0, header_end - 1))] = data.draw(st.integers(0, 255))
    path = tmp_path / "m.gguf"
    path.write_bytes(bytes(buf))
    check(path)


@FUZZ
@given(data=st.data())
def test_overwritten_integers(tmp_path, base, data):
    """Counts, lengths, dimensions and offsets replaced by extreme values."""
    blob, header_end = base
    buf = bytearray(blob)
    at = data.draw(st.integers(0, header_end - 8))
    value = data.draw(st.sampled_from([0, 1, 2**31 - 1, 2**32 - 1, 2**63 - 1, 2**64 - 1])
                      | st.integers(0, 2**64 - 1))
    buf[at:at + 8] = struct.pack("<Q", value)
    path = tmp_path / "m.gguf"
    path.write_bytes(bytes(buf))
    check(path)


@FUZZ
@given(cut=st.integers(0, 10**6))
def test_truncated_anywhere(tmp_path, base, cut):
    blob, _ = base
    path = tmp_path / "m.gguf"
    path.write_bytes(blob[: cut % len(blob)])
    check(path)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Base:
    """A file written by `edgemoe convert` with per-expert types (F32/F16 slots, edgemoe.* tables) and
    Q8_0 low-bit copies (smaller than every expert, as convert requires)."""
    from edgemoe_llamacpp.convert.rewrite import convert

    d = tmp_path_factory.mktemp("fuzzconv")
    src = write_gguf(d / "src.gguf", "qwen3moe", {"block_count": 2, "expert_count": 4, "expert_used_count": 2},
                     moe_tensors(2, 4, d=32, ff=32))
    layout = read_layout(src)
    plan = {t.name: [("F32", "F16")[e % 2] for e in range(t.count)] for t in layout.expert_tensors}
    out = convert(src, d / "conv.gguf", plan, progress=False, lowbit="Q8_0")
    assert out.mixed and out.lowbit_type == "Q8_0"
    return Base((Path(out.path).read_bytes(), out.data_offset))


def check_converted(path) -> None:
    from edgemoe_llamacpp.convert.verify import verify

    check(path)
    try:
        layout = read_layout(path)
        for t in layout.expert_tensors:
            for e in range(t.count):
                r = t.slice(e)
                assert t.offset + e * t.stride == r.offset and r.size <= t.stride   # inside its own slot
                if t.low is not None:
                    r = t.low_slice(e)
                    assert t.low.offset + e * t.low.stride == r.offset and r.size <= t.low.stride
                    assert t.low.offset + t.count * t.low.stride <= layout.file_size
        verify(path)
    except EdgeMoEError:
        pass


@FUZZ
@given(data=st.data())
def test_converted_file_mutations(tmp_path, converted, data):
    """Header, KV (edgemoe tables included), tensor infos, data and truncation of a converted file."""
    blob, header_end = converted
    buf = bytearray(blob)
    how = data.draw(st.sampled_from(["flip", "integer", "truncate", "data"]))
    if how == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            buf[data.draw(st.integers(0, header_end - 1))] = data.draw(st.integers(0, 255))
    elif how == "integer":
        at = data.draw(st.integers(0, header_end - 8))
        value = data.draw(st.sampled_from([0, 1, 7, 8, 10, 14, 40, 2**31 - 1, 2**64 - 1]) | st.integers(0, 2**64 - 1))
        buf[at:at + 8] = struct.pack("<Q", value)
    elif how == "data":
        buf[data.draw(st.integers(header_end, len(buf) - 1))] ^= data.draw(st.integers(1, 255))
    else:
        buf = buf[: data.draw(st.integers(0, len(buf) - 1))]
    path = tmp_path / "m.gguf"
    path.write_bytes(bytes(buf))
    check_converted(path)


RUN_MUTANTS = r"""
import sys
from edgemoe_llamacpp.errors import EdgeMoEError
from edgemoe_llamacpp.engine.llama import Llama
for path in sys.argv[1:]:
    print("case", path, flush=True)
    try:
        llm = Llama(path, memory_budget="50%", n_ctx=64, verbose=False)
    except (EdgeMoEError, ValueError, RuntimeError) as e:   # ours, or llama-cpp-python's "Failed to load"
        print("refused", type(e).__name__, e, flush=True)
        continue
    llm.eval(llm.tokenize(b"import os"))
    llm.close()
    print("ran", flush=True)
"""


def test_mutated_fixture_never_crashes_llama_cpp(fixture_path, tmp_path):
    """Header mutations of the real model, loaded and run by edgemoe (and llama.cpp) in a child process:
    each ends in a clear error or a run, never a signal."""
    import subprocess
    import sys

    import numpy as np

    blob = fixture_path.read_bytes()
    header_end = read_layout(fixture_path).data_offset
    rng = np.random.default_rng(8)
    paths = []
    for i in range(64):
        buf = bytearray(blob)
        for _ in range(int(rng.integers(1, 4))):
            at = int(rng.integers(0, header_end - 8))
            if rng.random() < 0.5:
                buf[at] = int(rng.integers(0, 256))
            else:
                extremes = (0, 1, 2**31 - 1, 2**64 - 1, int(rng.integers(0, 2**40)))
                buf[at:at + 8] = struct.pack("<Q", extremes[int(rng.integers(0, len(extremes)))])
        path = tmp_path / f"m{i}.gguf"
        path.write_bytes(bytes(buf))
        paths.append(str(path))
    r = subprocess.run([sys.executable, "-c", RUN_MUTANTS, *paths], capture_output=True, text=True, timeout=900,
                       check=False)
    assert r.returncode == 0, f"crashed after: {r.stdout.splitlines()[-1:]}\n{r.stderr[-2000:]}"
    outcomes = [" ".join(line.split()[:2]) for line in r.stdout.splitlines() if not line.startswith("case")]
    assert len(outcomes) == len(paths)
    assert "ran" in outcomes and any(o.startswith("refused") for o in outcomes)   # both paths were taken


def test_array_count_past_the_end_is_refused_before_parsing(tmp_path, converted):
    """gguf-py's reader would build parts for ever on such a count (found by the fuzz above: 24 GB, OOM)."""
    blob, _ = converted
    key = b"edgemoe.expert_types.blk.0.ffn_gate_exps.weight"
    at = blob.index(key) + len(key) + 8           # after the value type and the element type
    buf = bytearray(blob)
    buf[at:at + 8] = struct.pack("<Q", 2**40)
    path = tmp_path / "m.gguf"
    path.write_bytes(bytes(buf))
    with pytest.raises(EdgeMoEError, match="past the end"):
        read_layout(path)

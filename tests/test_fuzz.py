"""Hostile GGUF files: every mutation ends in the project's clear error or a layout that stays in the file."""
import itertools
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from synthetic import moe_tensors, write_gguf

from edgemoe_llamacpp.errors import EdgeMoEError
from edgemoe_llamacpp.layout import read_layout


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

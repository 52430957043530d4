"""tools/routing_fixture.py's prefill figures, and the windows routing is recorded in (never past the context the
model was trained on)."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from routing_fixture import batch_figures

from edgemoe_bench.routing import N_CTX, window_of


def test_batch_figures_count_the_experts_a_batch_touches_and_the_batch_before_touched_too():
    # one layer, 8 experts, batches of 2 tokens of top-2: batch 0 uses {0,1,2}, batch 1 {2,3}, batch 2 {2,3}
    ids = np.array([[[0, 1]], [[1, 2]], [[2, 3]], [[3, 2]], [[2, 3]], [[3, 2]]])
    got = batch_figures(ids, 8, 2)
    assert got["batches"] == 3
    assert got["experts_touched_share"] == pytest.approx(np.mean([3 / 8, 2 / 8, 2 / 8]))
    assert got["touched_by_previous_batch"] == pytest.approx(np.mean([1 / 2, 2 / 2]))


def test_routing_is_recorded_in_windows_no_longer_than_the_trained_context(fixture_path, tmp_path):
    import gguf

    assert window_of(str(fixture_path)) == min(N_CTX, 512)          # the fixture was trained on 512 tokens
    # the same model, saying it was trained on 256: its windows shrink to that
    reader = gguf.GGUFReader(fixture_path)
    key = "qwen3moe.context_length"
    field = reader.fields[key]
    data = bytearray(Path(fixture_path).read_bytes())
    offset = int(field.parts[field.data[0]].ctypes.data - reader.data.ctypes.data)
    data[offset:offset + 4] = np.uint32(256).tobytes()
    short = tmp_path / "short.gguf"
    short.write_bytes(bytes(data))
    assert window_of(str(short)) == 256

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGUFReader
from synthetic import moe_tensors, write_gguf

from edgemoe_llamacpp.layout import read_layout


def test_fixture_ranges_are_the_expert_slices(fixture_path):
    layout = read_layout(fixture_path)
    reader = GGUFReader(fixture_path)
    by_name = {t.name: t for t in reader.tensors}
    assert len(layout.experts) == layout.n_layer * layout.n_expert
    with open(fixture_path, "rb") as f:
        for x in layout.experts:
            assert len(x.ranges) == 3
            assert {r.tensor.split(".")[2] for r in x.ranges} == {"ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"}
            for r in x.ranges:
                f.seek(r.offset)
                # independent reading: gguf-py's view of the stacked tensor, indexed by expert
                assert f.read(r.size) == by_name[r.tensor].data[x.expert].tobytes()
                assert r.type == by_name[r.tensor].tensor_type.name


def test_fixture_ranges_disjoint_inside_file_and_sum_to_data(fixture_path):
    layout = read_layout(fixture_path)
    reader = GGUFReader(fixture_path)
    ranges = sorted((r.offset, r.offset + r.size) for x in layout.experts for r in x.ranges)
    assert ranges[0][0] >= reader.data_offset and ranges[-1][1] <= fixture_path.stat().st_size
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(ranges))
    assert layout.expert_bytes == sum(end - start for start, end in ranges)
    assert layout.dense_bytes + layout.expert_bytes == sum(int(t.n_bytes) for t in reader.tensors)
    assert layout.dense_bytes == sum(int(t.n_bytes) for t in reader.tensors if "_exps." not in t.name)


def test_inspect_json_cli(fixture_path):
    out = subprocess.run([sys.executable, "-m", "edgemoe_llamacpp", "inspect", str(fixture_path), "--json"],
                         capture_output=True, text=True, check=True).stdout
    doc = json.loads(out)
    for key in ("arch", "n_layer", "n_expert", "n_expert_used", "dense_bytes", "expert_bytes", "experts"):
        assert key in doc
    assert doc["arch"] == "qwen3moe"
    assert len(doc["experts"]) == doc["n_layer"] * doc["n_expert"]
    assert doc["dense_bytes"] + doc["expert_bytes"] == doc["tensor_data_bytes"]
    first = doc["experts"][0]
    assert set(first) == {"layer", "expert", "ranges"}
    assert set(first["ranges"][0]) == {"tensor", "offset", "size", "type"}


def test_inspect_table_cli(fixture_path):
    out = subprocess.run([sys.executable, "-m", "edgemoe_llamacpp", "inspect", str(fixture_path)],
                         capture_output=True, text=True, check=True).stdout
    assert "qwen3moe" in out and "top-2" in out
    assert len([line for line in out.splitlines() if "ffn_gate_exps:Q8_0" in line]) == 8


@pytest.mark.parametrize("arch", ["qwen3moe", "olmoe", "llama"])
def test_plain_moe_archs(tmp_path, arch):
    path = write_gguf(tmp_path / "m.gguf", arch, {"block_count": 3, "expert_count": 4, "expert_used_count": 2},
                      moe_tensors(3, 4))
    layout = read_layout(path)
    assert (layout.arch, layout.moe_layers, len(layout.experts)) == (arch, (0, 1, 2), 12)
    per_expert = (16 * 32 * 3) * 4   # gate + up + down of one expert, F32
    assert all(x.nbytes == per_expert for x in layout.experts)
    assert layout.expert_bytes == 12 * per_expert


@pytest.mark.parametrize("arch", ["qwen2moe", "deepseek2"])
def test_shared_experts_and_dense_layers_count_as_dense(tmp_path, arch):
    tensors = moe_tensors(4, 8, dense_layers=1, shared=True)
    path = write_gguf(tmp_path / "m.gguf", arch, {"block_count": 4, "expert_count": 8, "expert_used_count": 2},
                      tensors)
    layout = read_layout(path)
    assert layout.moe_layers == (1, 2, 3)
    assert len(layout.experts) == 3 * 8
    expert_elems = sum(np.prod(s) for n, s in tensors.items() if "_exps." in n)
    assert layout.expert_bytes == expert_elems * 4
    assert layout.dense_bytes == (sum(np.prod(s) for s in tensors.values()) - expert_elems) * 4


def test_gpt_oss_expert_biases_are_expert_ranges(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", "gpt-oss", {"block_count": 2, "expert_count": 4,
                                                       "expert_used_count": 2}, moe_tensors(2, 4, biases=True))
    layout = read_layout(path)
    x = layout.expert(1, 3)
    assert len(x.ranges) == 6
    assert {r.size for r in x.ranges if r.tensor.endswith(".bias")} == {16 * 4, 32 * 4}


def test_mixtral_per_expert_tensors(tmp_path):
    tensors = {"token_embd.weight": (64, 32)}
    for i in range(2):
        tensors[f"blk.{i}.ffn_gate_inp.weight"] = (4, 32)
        for e in range(4):
            for proj, shape in (("gate", (16, 32)), ("up", (16, 32)), ("down", (32, 16))):
                tensors[f"blk.{i}.ffn_{proj}.{e}.weight"] = shape
    path = write_gguf(tmp_path / "m.gguf", "llama", {"block_count": 2, "expert_count": 4, "expert_used_count": 2},
                      tensors)
    layout = read_layout(path)
    assert len(layout.experts) == 8
    assert layout.expert(1, 2).ranges[0].tensor.startswith("blk.1.ffn_") and \
        all(".2." in r.tensor for r in layout.expert(1, 2).ranges)

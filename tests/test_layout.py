import itertools
import json
import mmap
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGUFReader
from synthetic import moe_tensors, write_gguf

from edgemoe_llamacpp import pages
from edgemoe_llamacpp.errors import BadModelError
from edgemoe_llamacpp.gguf.layout import read_layout


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
    assert len([line for line in out.splitlines() if "ffn_gate_exps: 16 Q8_0" in line]) == 8


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


def resident(path) -> list[int]:
    """Indices of the file's pages in the page cache: mincore over the whole file."""
    size = path.stat().st_size
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as m:
        view = np.frombuffer(m, np.uint8)
        vec = pages.mincore_pages(view.ctypes.data, size)
        del view
    return [i for i, v in enumerate(vec) if v & 1]


def header_pages(path) -> int:
    """Pages holding the header (up to the end of the last tensor info), by gguf-py's own parse."""
    field = GGUFReader(path).tensors[-1].field
    return -(-(field.offset + sum(int(p.nbytes) for p in field.parts)) // pages.PAGE)


def evicted_copy(src, dst):
    shutil.copyfile(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    try:
        pages.flush(fd)                       # written pages are dirty: write them back so they can go
        pages.fadvise_dontneed(fd, 0, 0)
    finally:
        os.close(fd)
    if resident(dst):
        pytest.skip(f"{dst.parent}'s filesystem keeps the file's pages in memory")
    return dst


def read_pages(path, numbers) -> None:
    """Bring exactly the pages numbered `numbers` into the page cache (as another process using the file would)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for p in numbers:
            os.pread(fd, 1, p * pages.PAGE)
    finally:
        os.close(fd)


def long_header_moe(path):
    """A MoE GGUF whose metadata spans several pages (a tokenizer-like string array), like real models'."""
    return write_gguf(path, "qwen3moe", {"block_count": 2, "expert_count": 4, "expert_used_count": 2},
                      moe_tensors(2, 4, d=64, ff=64),
                      arrays={"tokenizer.ggml.tokens": [f"token-{i:05d}" for i in range(3000)]})


@pytest.fixture(params=["fixture", "long-header"])
def model_and_header(request, fixture_path, tmp_path):
    """(a copy of the model with none of its pages in the page cache, how many pages its header takes)"""
    src = fixture_path if request.param == "fixture" else long_header_moe(tmp_path / "src.gguf")
    n_header = header_pages(src)
    if request.param == "long-header":
        assert n_header >= 4
    return evicted_copy(src, tmp_path / "m.gguf"), n_header


def test_reading_the_layout_leaves_the_page_cache_as_it_was(model_and_header):
    """Issue 14: `edgemoe inspect` beside a server read the model's first 64 MiB and gguf-py faulted its
    header in with readahead, pushing the server's cached experts to twice its budget. Only the header is
    read now, and the pages that read brought in are dropped again."""
    path, n_header = model_and_header
    layout = read_layout(path)
    assert layout.path == str(path) and layout.file_size == path.stat().st_size
    cached = resident(path)
    assert [p for p in cached if p >= n_header] == [], f"{len(cached)} pages past the header's {n_header}"
    assert [p for p in cached if p < n_header] == [], "header pages that were not in the page cache stayed"


def test_pages_in_the_cache_before_stay(model_and_header):
    """Another process's pages (one in the header, one in the tensor data) are never dropped."""
    path, n_header = model_and_header
    n_pages = -(-path.stat().st_size // pages.PAGE)
    keep = [n_header - 1, (n_header + n_pages) // 2]
    read_pages(path, keep)
    assert resident(path) == keep
    read_layout(path)
    assert resident(path) == keep


def test_hostile_tensor_infos_are_refused_before_parsing(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", "qwen3moe", {"block_count": 2, "expert_count": 4,
                                                          "expert_used_count": 2}, moe_tensors(2, 4))
    blob = path.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(blob[:8] + struct.pack("<Q", 2**40) + blob[16:])       # the tensor count
    with pytest.raises(BadModelError, match="past the end"):
        read_layout(bad)
    name = b"token_embd.weight"
    at = blob.index(name) + len(name)                                       # its n_dims
    bad.write_bytes(blob[:at] + struct.pack("<I", 2**31) + blob[at + 4:])
    with pytest.raises(BadModelError, match="dimensions"):
        read_layout(bad)
    bad.write_bytes(blob[:4] + struct.pack("<I", 3 << 24) + blob[8:])      # version 3, big-endian
    with pytest.raises(BadModelError, match="version"):
        read_layout(bad)

"""Under a budget the load reads the dense bytes, not the file; without one it reads what llama.cpp reads."""
import shutil

import psutil
import pytest

from edgemoe_llamacpp import Llama, limits
from edgemoe_llamacpp.engine import loading
from edgemoe_llamacpp.gguf.layout import read_layout


@pytest.fixture
def private_copy(fixture_path, tmp_path):
    """A copy no other process maps, so that its pages drop and every read at load is a storage read."""
    path = tmp_path / "model.gguf"
    shutil.copyfile(fixture_path, path)
    return path


def load_reads(path, budget) -> tuple[int, Llama]:
    limits.drop_file_cache(path)
    io = psutil.Process().io_counters
    before = io().read_bytes
    llm = Llama(str(path), memory_budget=budget, n_ctx=256, verbose=False)
    return io().read_bytes - before, llm


def test_dense_spans_are_the_complement_of_the_experts(fixture_path):
    layout = read_layout(fixture_path)
    dense, experts = loading.dense_spans(layout), loading.expert_spans(layout)
    assert sum(b - a for a, b in dense) + sum(b - a for a, b in experts) == layout.file_size
    assert sum(b - a for a, b in experts) >= layout.expert_bytes
    assert dense[0][0] == 0 and dense[-1][1] <= layout.file_size


def test_budgeted_load_reads_the_dense_bytes_only(private_copy):
    layout = read_layout(private_copy)
    read, llm = load_reads(private_copy, "50%")
    try:
        text = llm.create_completion("import os\n", max_tokens=8, temperature=0.0)["choices"][0]["text"]
        resident = llm.edgemoe.cache.measured_resident_bytes()
        budget = llm.edgemoe_stats()["budget_bytes"]
    finally:
        llm.close()
    assert read <= 1.1 * loading.dense_read_bytes(layout), (read, loading.dense_read_bytes(layout))
    assert read < layout.file_size / 4
    assert resident <= budget                          # the budget holds after decoding, by mincore
    full, llm = load_reads(private_copy, None)           # no budget: llama.cpp's own whole-file read
    try:
        same = llm.create_completion("import os\n", max_tokens=8, temperature=0.0)["choices"][0]["text"]
    finally:
        llm.close()
    assert full >= 0.9 * layout.file_size
    assert same == text

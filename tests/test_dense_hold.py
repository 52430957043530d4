"""Under a budget the dense weights are held where the kernel cannot reclaim them (dense_hold.py): locked, or an
anonymous copy in place of the file's pages. Output stays identical, the budget holds, and the held pages stay
resident through generation."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from edgemoe_bench import cgroup
from edgemoe_bench.bench import kv_cache_bytes, measure_allowance
from edgemoe_llamacpp import Llama, limits, pages
from edgemoe_llamacpp.cache.dense_hold import held_pieces
from edgemoe_llamacpp.cache.residency import parse_budget
from edgemoe_llamacpp.errors import ArgumentError
from edgemoe_llamacpp.gguf.layout import read_layout

PROMPT = "import os\n\n\ndef"


def _greedy(llm, n=12):
    return llm.create_completion(PROMPT, max_tokens=n, temperature=0.0)["choices"][0]["text"]


def _anonymous(addr: int) -> bool:
    """Whether the mapping holding `addr` is anonymous (no file), from /proc/self/maps."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(None, 5)
        start, end = (int(x, 16) for x in parts[0].split("-"))
        if start <= addr < end:
            return len(parts) < 6 or not parts[5].startswith("/")
    raise AssertionError(f"{addr:#x} is not mapped")


@pytest.fixture(scope="module")
def reference(fixture_path):
    llm = Llama(str(fixture_path), n_ctx=256, verbose=False)
    try:
        return _greedy(llm)
    finally:
        llm.close()


@pytest.mark.parametrize("mode", ["mlock", "copy"])
def test_held_dense_pages_stay_resident_and_output_is_unchanged(fixture_path, reference, mode):
    layout = read_layout(fixture_path)
    llm = Llama(str(fixture_path), n_ctx=256, verbose=False, memory_budget="25%", hold_dense=mode)
    try:
        hold = llm.edgemoe.dense
        assert hold.mode == mode and hold.bytes >= layout.dense_bytes - 2 * pages.PAGE * len(hold.pieces)
        assert _greedy(llm) == reference
        stats = llm.edgemoe_stats()
        assert stats["dense_hold"] == {"mode": mode, "bytes": hold.bytes, "resident_bytes": hold.bytes}
        assert stats["resident_expert_bytes"] <= stats["budget_bytes"]
        assert llm.edgemoe.cache.measured_resident_bytes() <= stats["budget_bytes"]
        assert all(_anonymous(a) == (mode == "copy") for a, _ in hold.pieces)
    finally:
        llm.close()


def test_no_budget_holds_nothing(fixture_path):
    llm = Llama(str(fixture_path), n_ctx=256, verbose=False)
    try:
        assert llm.edgemoe_stats()["dense_hold"]["mode"] == "off"
    finally:
        llm.close()


def test_held_pieces_are_whole_pages_inside_the_mapping():
    # the file's mapping starts at 0x10000 for file offset 4096 and runs 3 pages; dense at [100, 5000), [9000, 9100)
    page = pages.PAGE
    mappings = [(0x10000, 0x10000 + 3 * page, page, "r--s")]
    assert held_pieces([(100, 5000), (9000, 9100)], mappings) == [
        (0x10000, page, page), (0x10000 + page, page, 2 * page)]


def test_a_bad_mode_is_refused(fixture_path):
    with pytest.raises(ArgumentError, match="hold_dense must be one of"):
        Llama(str(fixture_path), memory_budget="25%", hold_dense="pin")


CONTROLLER = cgroup.memory_controller()


@pytest.mark.skipif(CONTROLLER.kind == "none", reason=CONTROLLER.reason)
def test_under_a_tight_limit_dense_is_read_once_and_stays(fixture_path):
    """At a limit of dense + 25% + KV + the process's own needs, 128 tokens: the dense pages are all resident at the
    end, and decoding reads no more than the expert cache fetched (no dense byte read twice)."""
    model = str(fixture_path)
    layout = read_layout(model)
    limit = (layout.dense_bytes + parse_budget("25%", layout.expert_bytes) + kv_cache_bytes(model, 512)
             + measure_allowance(model, engines=("edgemoe",)))
    limits.drop_file_cache(model)
    run = cgroup.run_limited([sys.executable, "-m", "edgemoe_llamacpp", "run", model, "-p", PROMPT, "-n", "128",
                              "--memory-budget", "25%", "--repeat-penalty", "1.1", "--json"], limit, timeout=300)
    assert run.returncode == 0 and run.oom_kills == 0, run.stderr[-2000:]
    out = json.loads(run.stdout)
    hold = out["stats"]["dense_hold"]
    assert hold["mode"] in ("mlock", "copy") and hold["resident_bytes"] == hold["bytes"] > 0
    fetched = sum(x["bytes_fetched"] for x in out["stats"]["layers"])
    print(f"limit {limit:,}: decode read {out['decode_read_bytes']:,} bytes, the cache fetched {fetched:,} in all; "
          f"{out['decode_compute_major_faults']} major faults computing {out['decode_evals']} tokens; {hold}")
    assert out["decode_read_bytes"] <= fetched + (1 << 20), (out["decode_read_bytes"], fetched)
    assert out["decode_compute_major_faults"] <= out["decode_evals"], out

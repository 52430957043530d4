"""`edgemoe run` end to end on the fixture, as a user calls it."""
import json
import subprocess
import sys

import pytest
import stock


def edgemoe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgemoe_llamacpp", *args], capture_output=True, text=True,
                          check=False)


@pytest.mark.stock
def test_run_json_edgemoe_and_stock_agree(fixture_path):
    runs = {}
    for engine in ("stock", "edgemoe"):         # stock first: a stock that dies fails the test by its signal
        args = ("run", str(fixture_path), "-p", "def parse(self, ", "-n", "12", "--json")
        proc = edgemoe(*args, "--memory-budget", "25%", "--trace") if engine == "edgemoe" else \
            stock.edgemoe(*args, "--stock")
        assert proc.returncode == 0, proc.stderr
        runs[engine] = json.loads(proc.stdout)
    ed, st = runs["edgemoe"], runs["stock"]
    assert ed["text"] == st["text"] and ed["tokens"] == 12
    assert ed["decode_tok_s"] > 0 and ed["prefill_tok_s"] > 0
    stats = ed["stats"]
    assert stats["total"]["misses"] > 0 and stats["resident_expert_bytes"] <= stats["budget_bytes"]
    # one route per MoE layer per evaluation: the prompt batch, then 11 single tokens
    assert len(ed["trace"]) == 8 * 12
    assert all(len(ids[0]) == 2 for _, ids in ed["trace"])
    assert "stats" not in st


def test_run_text_prints_stats(fixture_path):
    proc = edgemoe("run", str(fixture_path), "-p", "import os\n", "-n", "8", "--memory-budget", "50%")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("import os\n")
    assert "--- experts: budget" in proc.stdout and "hit rate" in proc.stdout


@pytest.mark.parametrize(("budget", "needle"), [("-1", "not a size"), ("abc", "not a size"),
                                                ("200%", "over 100%"), ("10KB", "cannot hold one layer")])
def test_run_bad_budget(fixture_path, budget, needle):
    proc = edgemoe("run", str(fixture_path), "-p", "x", "--memory-budget", budget)
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr


def test_run_with_policy_and_predictor_reports_prefetch(fixture_path):
    args = ["run", str(fixture_path), "-p", "def parse(self, ", "-n", "12", "--json", "--memory-budget", "25%"]
    plain = json.loads(edgemoe(*args).stdout)
    proc = edgemoe(*args, "--policy", "hobbit", "--predictor", "gate", "--prefetch-depth", "2")
    assert proc.returncode == 0, proc.stderr
    ed = json.loads(proc.stdout)
    assert ed["text"] == plain["text"]
    stats = ed["stats"]
    assert stats["policy"] == "hobbit" and stats["predictor"] == "gate" and stats["prefetch_depth"] == 2
    assert stats["total"]["prefetches"] > 0 and stats["total"]["prefetch_used"] > 0
    assert plain["stats"]["total"]["prefetches"] == 0


def test_version_names_edgemoe_and_its_runtime():
    """`edgemoe --version`: the package's version (its metadata), llama-cpp-python's, and whether it is patched
    (the CPU backend says; no model is loaded)."""
    from importlib import metadata

    import llama_cpp

    from edgemoe_llamacpp import runtime

    proc = edgemoe("--version")
    assert proc.returncode == 0, proc.stderr
    patched = "patched (per-expert types, on-demand load)" if runtime.patched() else "stock"
    assert proc.stdout.splitlines() == [f"edgemoe {metadata.version('edgemoe-llamacpp')}",
                                        f"llama-cpp-python {llama_cpp.__version__}, {patched}"]

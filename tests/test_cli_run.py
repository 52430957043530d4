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
@pytest.mark.repack_off                         # `run --stock` computes without the repack unless told
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
    assert "--- predictor auto: prefetch " in proc.stdout          # the default's decision, said


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


def test_run_streams_the_text_as_it_is_generated(fixture_path):
    """`edgemoe run` writes each token's text as it is sampled, flushed, as llama-cli does (it used to print the
    text at the end): the child's stdout delivers the prompt and the first tokens in reads of their own while it
    is still running, before the summary; the streamed text is the completion --json gives, and --json still
    prints one object at the end."""
    import os

    args = ["run", str(fixture_path), "-p", "import os\n", "-n", "48", "--memory-budget", "50%"]
    proc = subprocess.Popen([sys.executable, "-m", "edgemoe_llamacpp", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    reads = []                                   # (bytes read, the child still running then)
    while chunk := os.read(proc.stdout.fileno(), 1 << 16):
        reads.append((chunk, proc.poll() is None))
    assert proc.wait(timeout=300) == 0
    out = b"".join(chunk for chunk, _ in reads)
    summary = out.index(b"\n--- edgemoe: ")
    ends = [sum(len(c) for c, _ in reads[:i + 1]) for i in range(len(reads))]
    streamed = [running for (_, running), end in zip(reads, ends) if end <= summary]
    assert len(streamed) >= 2 and all(streamed), [(c[:40], r) for c, r in reads]
    whole = edgemoe(*args, "--json")
    assert whole.returncode == 0, whole.stderr
    result = json.loads(whole.stdout)                       # one object, the last line, as before
    assert out[:summary + 1].decode() == "import os\n" + result["text"] + "\n"
    assert result["tokens"] == 48 and len(result["text"]) > 20


@pytest.mark.stock
@pytest.mark.repack_off
def test_run_stock_computes_on_edgemoes_path(fixture_path):
    """`run --stock` runs stock with llama.cpp's CPU repack off (it used to leave it on: another compute path,
    whose greedy text can differ): its text is edgemoe's, with no budget and at 50%, and the summary line and
    the JSON say which path ran."""
    args = ("run", str(fixture_path), "-p", "def parse(self, ", "-n", "24")
    proc = stock.edgemoe(*args, "--stock")
    assert proc.returncode == 0, proc.stderr
    text, summary = proc.stdout.split("\n--- ", 1)
    assert summary.startswith("stock, CPU repack off (edgemoe's compute path): 24 tokens"), summary
    st = json.loads(stock.edgemoe(*args, "--stock", "--json").stdout)
    assert st["engine"] == "stock" and st["cpu_repack"] is False and text == "def parse(self, " + st["text"]
    for budget in ((), ("--memory-budget", "50%")):
        ed = json.loads(edgemoe(*args, "--json", *budget).stdout)
        assert ed["text"] == st["text"] and ed["cpu_repack"] is False, budget


@pytest.mark.stock
def test_run_stock_repack_on_names_the_other_path(fixture_path):
    """--stock-repack on: llama.cpp's default, named as such; it is for --stock only."""
    args = ("run", str(fixture_path), "-p", "def parse(self, ", "-n", "4")
    proc = stock.edgemoe(*args, "--stock", "--stock-repack", "on")
    assert proc.returncode == 0, proc.stderr
    assert "\n--- stock, llama.cpp's CPU repack on (not edgemoe's compute path: greedy text can differ): 4 tokens" \
        in proc.stdout, proc.stdout
    assert json.loads(stock.edgemoe(*args, "--stock", "--stock-repack", "on", "--json").stdout)["cpu_repack"] is True
    proc = edgemoe(*args, "--stock-repack", "on")
    assert proc.returncode == 2 and proc.stderr == ("edgemoe: error: --stock-repack on is for --stock runs: edgemoe "
                                                    "computes without the repack\n"), proc.stderr

"""The benchmark: Belady's floor on a trace worked out by hand, the KV cache size; a stock that crashes, no
memory controller, stock with the repack off."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import stock

from edgemoe_bench import bench, cgroup
from edgemoe_bench import report as bench_report
from edgemoe_bench.bench import STOCK_RUNTIME_ENV, belady, kv_cache_bytes, run_bench
from edgemoe_bench.report import format_table
from edgemoe_llamacpp import limits, pages
from edgemoe_llamacpp.cli import main as cli
from edgemoe_llamacpp.engine import loading
from edgemoe_llamacpp.gguf.layout import read_layout


def test_belady_by_hand():
    # one layer, one expert per step: a b c a b c with room for two
    trace = [(0, [[e]]) for e in "abcabc"]
    # a, b miss; c misses and evicts b (next used at 4, after a at 3); a hits; b misses and evicts a (never
    # used again); c hits -> 4 misses, all in one-token steps. LRU would miss all 6.
    assert belady(trace, capacity=2) == (4, 4)


def test_belady_prompt_steps_are_not_decode():
    trace = [(0, [["a"], ["b"]]), (0, [["a"]]), (0, [["c"]]), (0, [["b"]])]
    # the prompt step (two tokens) loads a and b; a hits; c evicts a (never again); b hits
    assert belady(trace, capacity=2) == (3, 1)


def test_kv_cache_bytes_of_fixture(fixture_path):
    # F16 K and V: 2 x 8 layers x 512 positions x 4 kv heads x (64 + 64) dims = 4 MiB
    assert kv_cache_bytes(str(fixture_path), 512) == 2 * 8 * 512 * 4 * (64 + 64)


def report_section(tmp_path, result: dict) -> str:
    """BENCHMARKS.md's section for `result`, stored under tmp_path as tools/bench_report.py reads it (no plot)."""
    path = tmp_path / "result.json"
    path.write_text(json.dumps(result))
    return bench_report.section(path, json.loads(path.read_text()), root=tmp_path)


@pytest.mark.skipif(cgroup.memory_controller().kind == "none", reason=cgroup.memory_controller().reason)
def test_bench_records_a_crashed_stock_and_still_measures_edgemoe(fixture_path, tmp_path, monkeypatch):
    """Stock dies with SIGSEGV (a stand-in llama_cpp, as stock 0.3.36 does in its AMX repack): the runs are
    recorded with the signal, edgemoe is measured under the real memory limit, the ratio is marked absent."""
    monkeypatch.setenv(STOCK_RUNTIME_ENV, str(stock.write_crashing_standin(tmp_path / "standin")))
    result = run_bench(str(fixture_path), ["50%"], runs=1, tokens=4, progress=False)
    assert result["cgroup"] and result["memory_limit"]["kind"] == cgroup.memory_controller().kind
    assert result["stock_repack"] is True and result["stock_runtime"] == str(tmp_path / "standin")
    assert result["calibration"]["stock"]["signal"] == "SIGSEGV"          # calibrated on edgemoe alone
    assert result["calibration"]["edgemoe"]["ok"]
    b = result["budgets"][0]
    died = b["pairs"][0]["stock"]
    assert (died["ok"], died["returncode"], died["signal"]) == (False, -11, "SIGSEGV")
    assert died["error"] == ["stock llama.cpp died with SIGSEGV"]
    assert b["stock"]["died"] == {"SIGSEGV": 1} and b["stock"]["failed"] == 1
    assert b["edgemoe"]["failed"] == 0 and b["edgemoe"]["decode_tok_s"]["median"] > 0
    assert b["edgemoe"]["peak_bytes"]["median"] <= b["limit_bytes"]
    parts = b["edgemoe"]["decode_ms_per_token"]            # where a decoded token's time went, adding up
    total = sum(parts[k]["median"] for k in ("compute", "stall", "hook_cpu"))
    assert parts["stall"]["median"] > 0 and parts["compute"]["median"] > 0 and parts["hook_cpu"]["median"] > 0
    assert total == pytest.approx(1e3 / b["edgemoe"]["decode_tok_s"]["median"], rel=1e-6)
    assert b["decode_vs_bound"] > 0
    # reads judged by the time they add to compute alone (a run with every expert in memory), at the speed of
    # the disk measured beside the pair
    only = result["compute_only"]
    assert only["ok"] and 0 < only["ms_per_token"] == only["decode_ms_per_token"]["compute"]
    pair, run = b["pairs"][0], b["pairs"][0]["edgemoe"]
    assert pair["disk_bandwidth_bps"] > 0 and b["disk_bandwidth_bps"]["n"] == 1
    wait = 1e3 / run["decode_tok_s"] - run["decode_ms_per_token"]["hook_cpu"] - only["ms_per_token"]
    assert b["read_wait_ms_per_token"]["median"] == pytest.approx(wait)
    if wait > 0:
        read = run["decode_read_bytes"] / run["decode_evals"]
        assert b["fetch_efficiency"] == pytest.approx(read / (wait / 1e3) / pair["disk_bandwidth_bps"])
    assert "| compute alone | waiting for reads | of which in the hook | hook CPU |" in format_table(result)
    assert b["decode_ratio"]["median"] is None
    assert b["decode_ratio"]["absent"] == "stock llama.cpp died with SIGSEGV in 1 of 1 runs"
    table = format_table(result)
    assert "stock (1 failed: 1 died with SIGSEGV)" in table and "absent (stock llama.cpp died with SIGSEGV" in table
    assert "Stock llama.cpp died with SIGSEGV" in table.splitlines()[1]
    assert "stock llama.cpp died with SIGSEGV" in report_section(tmp_path, result)


def test_bench_without_a_memory_controller_says_why_and_runs_stock_with_repack_off(fixture_path, tmp_path,
                                                                                    monkeypatch, capsys):
    """`edgemoe bench --stock-repack off` where no cgroup can be written: the reason is in the JSON, the
    printed header and the report; stock really ran with use_extra_bufts=False, so a stock whose repack
    crashes (the stand-in) is measured."""
    reason = "cgroup v2: memory is not one of its controllers (a test)"
    monkeypatch.setenv(STOCK_RUNTIME_ENV, str(stock.write_crashing_standin(tmp_path / "standin")))
    monkeypatch.setattr(cgroup, "memory_controller", lambda: cgroup.Controller("none", None, reason))
    out = tmp_path / "bench.json"
    assert cli(["bench", str(fixture_path), "--memory-budget", "50%", "--runs", "1", "--tokens", "4",
                "--allowance", "1MB", "--stock-repack", "off", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["memory_limit"] == {"kind": "none", "path": None, "reason": reason} and not result["cgroup"]
    assert result["stock_repack"] is False
    b = result["budgets"][0]
    assert b["limit_bytes"] is None
    st = b["pairs"][0]["stock"]
    assert st["ok"] and st["stock_repack"] is False and st["use_extra_bufts"] is False, st
    assert b["decode_ratio"]["median"] > 0 and "absent" not in b["decode_ratio"]
    assert f"NOT memory-limited ({reason})" in printed
    assert f"Memory limit: none, runs are NOT memory-limited ({reason})." in printed
    assert "Stock: llama.cpp's CPU repack off (use_extra_bufts=False)" in printed
    section = report_section(tmp_path, result)
    assert f"NOT memory-limited: {reason}" in section
    assert "stock ran with llama.cpp's CPU repack off" in section and "--stock-repack off" in section


@pytest.mark.stock
def test_bench_stock_child_uses_llama_cpps_default_repack(fixture_path):
    """The stock run bench makes by default gives llama.cpp its default (the CPU repack on)."""
    run = bench.run_child(str(fixture_path), stock=True, tokens=2, prompt="import os\n", n_ctx=128, limit=None)
    if run.get("signal"):
        pytest.fail(run["error"][0], pytrace=False)
    assert run["ok"] and run["use_extra_bufts"] is True and run["stock_repack"] is True, run


def test_a_bench_of_one_token_has_no_decode_step_and_no_floor(fixture_path, tmp_path):
    """`--tokens 1` generates the first token from the prompt's evaluation alone: no decode step, so no
    Belady floor per decoded token (it divided by zero), and the run still completes and is reported."""
    out = tmp_path / "bench.json"
    assert cli(["bench", str(fixture_path), "--memory-budget", "50%", "--runs", "1", "--tokens", "1",
                "--allowance", "1", "--no-cgroup", "--json", str(out)]) == 0
    b = json.loads(out.read_text())["budgets"][0]
    assert b["pairs"][0]["edgemoe"]["ok"] and b["pairs"][0]["edgemoe"]["decode_evals"] == 0
    assert b.get("floor_bytes_per_token") is None


@pytest.mark.skipif(cgroup.memory_controller().path is None, reason="needs a writable cgroup memory controller")
def test_bench_baseline_runs_a_commit_beside_this_tree_and_stock(fixture_path, tmp_path):
    """tools/bench_baseline.py with this very commit as the baseline: its worktree's package runs, all three
    engines decode the same greedy text under the limit, the ratios pair the runs, and the report renders."""
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "baseline.json"
    subprocess.run([sys.executable, str(root / "tools/bench_baseline.py"), str(fixture_path), "--baseline", "HEAD",
                    "--budgets", "50%", "--runs", "1", "--tokens", "4", "--out", str(out)], check=True, cwd=root,
                   capture_output=True, text=True)
    r = json.loads(out.read_text())
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout
    assert r["kind"] == "bench_baseline" and r["baseline"] == r["head"] == head[:12]
    (b,) = r["budgets"]
    assert b["same_text"]
    for eng in ("stock", "baseline", "head"):
        assert b[eng]["decode_tok_s"] > 0 and b[eng]["decode_read_bytes_per_token"] >= 0, (eng, b)
    assert len(b["head_vs_baseline"]["runs"]) == len(b["head_vs_stock"]["runs"]) == 1
    assert b["head_vs_stock"]["median"] == pytest.approx(b["head"]["decode_tok_s"] / b["stock"]["decode_tok_s"])
    md = tmp_path / "b.md"
    subprocess.run([sys.executable, str(root / "tools/bench_report.py"), str(out), "--out", str(md)], check=True,
                   cwd=root, capture_output=True)
    assert "decode against an earlier commit" in md.read_text() and "| 50% |" in md.read_text()


def test_compute_alone_runs_from_a_warm_file_and_reads_nothing(fixture_path):
    """The reference every bound is built on: the file is read whole into the page cache first (from cold here),
    and the run then reads nothing from storage while it evaluates the prompt and decodes."""
    limits.drop_file_cache(fixture_path)
    only = bench.compute_alone(str(fixture_path), tokens=4, prompt=bench.PROMPT, n_ctx=128, n_threads=None,
                               route_trace=None)
    size = fixture_path.stat().st_size
    assert only["ok"] and only["warm"] and only["not_warm"] == [], only
    assert only["cached_bytes_before"] == only["file_bytes"] == size
    assert only["decode_read_bytes"] == 0 and only["prefill_read_bytes"] == 0
    assert only["ms_per_token"] > 0 and only["prefill_s"] > 0


def test_compute_alone_of_a_file_memory_cannot_hold_reads_in_what_the_run_touches(fixture_path, monkeypatch):
    """A model near or past RAM cannot be read whole: the reference is run twice, and before the second only the
    dense bytes and the experts the first one's routing chose are read in. The second then reads nothing while it
    evaluates, so it is compute alone still, though the file never was in memory whole."""
    import types

    from edgemoe_bench import warm

    size = fixture_path.stat().st_size
    monkeypatch.setattr(bench.psutil, "virtual_memory", lambda: types.SimpleNamespace(available=size - 1))
    limits.drop_file_cache(fixture_path)
    only = bench.compute_alone(str(fixture_path), tokens=2, prompt="x", n_ctx=64, n_threads=None, route_trace=None)
    layout = read_layout(fixture_path)
    assert only["ok"] and only["warm"] and only["not_warm"] == [] and only["warmed"] == "touched", only
    assert layout.dense_bytes < only["warmed_bytes"] < size                  # dense and some experts, not all
    assert only["cached_bytes_before"] >= 0.99 * only["warmed_bytes"]
    assert only["decode_read_bytes"] == 0 and only["prefill_read_bytes"] == 0
    assert pages.file_cached_bytes(fixture_path) < size                      # the file was never cached whole
    assert warm.span_bytes(warm.touched_spans(layout, [])) == sum(b - a for a, b in (
        pages.page_span(x, y - x) for x, y in loading.dense_spans(layout)))  # no routing: the dense bytes alone


def test_a_run_faster_than_compute_alone_is_flagged_not_reported_as_a_bound(tmp_path):
    """Compute alone is the floor of a token's time: a run below it means the reference was no floor. The result
    counts such runs per phase and warns, and the table shows no bound ratio below 1 as if it were one."""
    def run(decode_ms, prefill_s):
        return {"ok": True, "decode_tok_s": 1e3 / decode_ms, "prefill_s": prefill_s}

    only = {"ms_per_token": 20.0, "prefill_s": 1.0, "not_warm": []}
    fast = {"budget": "50%", "pairs": [{"edgemoe": run(10.0, 2.0)}, {"edgemoe": run(40.0, 3.0)},
                                       {"edgemoe": {"ok": False}}],
            "decode_vs_bound": 0.8, "prefill_vs_bound": 1.5}
    slow = {"budget": "25%", "pairs": [{"edgemoe": run(30.0, 1.5)}], "decode_vs_bound": 1.2, "prefill_vs_bound": 0.9}
    result = {"compute_only": only, "budgets": [fast, slow]}
    bench.check_compute_floor(result)
    assert fast["decode_below_compute"] == {"runs": 1, "of": 2}
    assert fast["prefill_below_compute"] == {"runs": 0, "of": 2}
    assert slow["decode_below_compute"] == slow["prefill_below_compute"] == {"runs": 0, "of": 1}
    assert result["warnings"] == [("50%: edgemoe's decode was faster than compute alone in 1 of 2 runs: the "
                                  "compute-alone reference is no floor, nor the bound on it")]
    assert bench_report.vs_bound(fast, "decode") == "no bound: faster than compute alone in 1 of 2 runs"
    assert bench_report.vs_bound(fast, "prefill") == "1.50x" and bench_report.vs_bound(slow, "decode") == "1.20x"
    assert bench_report.vs_bound(slow, "prefill").startswith("0.90x (below 1: faster than the bound allows")
    cold = {"compute_only": {**only, "not_warm": ["the run read 4,096 bytes from storage while it evaluated"]},
            "budgets": []}
    bench.check_compute_floor(cold)
    assert cold["warnings"] == [("compute alone is not compute alone: the run read 4,096 bytes from storage while "
                                "it evaluated")]


def test_bench_prompt_tokens_gives_a_prompt_of_that_many_tokens_and_a_prefill_ratio(fixture_path, tmp_path, capsys):
    """`edgemoe bench --prompt-tokens 300`: every run's prompt is 300 tokens of held-out text (the model's own
    count), the context holds it and the generated tokens, and prefill is compared pair by pair and with its
    bound: max(the prompt alone, its experts' bytes at disk speed)."""
    out = tmp_path / "bench.json"
    assert cli(["bench", str(fixture_path), "--memory-budget", "50%", "--runs", "1", "--tokens", "4",
                "--prompt-tokens", "300", "--allowance", "1", "--no-cgroup", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    r = json.loads(out.read_text())
    (b,) = r["budgets"]
    runs = [b["pairs"][0]["stock"], b["pairs"][0]["edgemoe"]]
    assert r["prompt_tokens"] == r["compute_only"]["prompt_tokens"] == 300
    assert all(x["ok"] and x["prompt_tokens"] == 300 for x in runs), runs
    assert r["n_ctx"] >= 304 and r["compute_only"]["warm"], r["compute_only"]
    edge, stock_run = runs[1], runs[0]
    assert b["prefill_ratio"]["median"] == pytest.approx(edge["prefill_tok_s"] / stock_run["prefill_tok_s"])
    assert 0 < b["prompt_expert_bytes"] == edge["prompt_expert_bytes"] <= r["expert_bytes"]
    bound = max(r["compute_only"]["prefill_s"], edge["prompt_expert_bytes"] / b["pairs"][0]["disk_bandwidth_bps"])
    assert b["prefill_vs_bound"] == pytest.approx(edge["prefill_s"] / bound)
    assert b["prefill_floor_tok_s"] == pytest.approx(300 / max(r["compute_only"]["prefill_s"], b["prompt_expert_bytes"]
                                                               / b["disk_bandwidth_bps"]["median"]))
    assert "prefill_below_compute" in b and "edgemoe/stock prefill" in printed
    assert "300-token prompt" in report_section(tmp_path, r)


def test_bench_refuses_a_context_too_small_for_its_prompt_in_one_line(fixture_path, capsys):
    assert cli(["bench", str(fixture_path), "--memory-budget", "50%", "--prompt-tokens", "300", "--tokens", "8",
                "--n-ctx", "256", "--no-cgroup"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("edgemoe: error: --n-ctx 256 cannot hold a prompt of 300 tokens and 8 generated: give at least "
                   "308, or leave --n-ctx out")


def test_prompt_of_cuts_held_out_text_at_exactly_n_tokens(fixture_path):
    import llama_cpp

    from edgemoe_llamacpp.corpus import prompt_of, split_texts

    llm = llama_cpp.Llama(model_path=str(fixture_path), vocab_only=True, verbose=False)
    try:
        for n in (2, 37, 300, 700):
            text = prompt_of(llm, n, split_texts("validation"))
            assert len(llm.tokenize(text.encode())) == n
    finally:
        llm.close()


def test_alternate_rotates_the_engines_round_by_round_and_probes_before_each_round():
    order = []

    def engine(name):
        def run(spec):
            order.append((spec, name))
            return {"engine": name, "budget": spec}
        return run

    probes = iter(range(100))
    rounds = bench.alternate({"a": engine("a"), "b": engine("b"), "c": engine("c")}, ["25%", "50%"], 3,
                             probe={"disk": lambda: next(probes)}, show=False)
    assert [n for s, n in order if s == "25%"] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert [[one["disk"] for one in rounds[s]] for s in ("25%", "50%")] == [[0, 1, 2], [3, 4, 5]]
    assert all(one[n] == {"engine": n, "budget": s} for s in rounds for one in rounds[s] for n in "abc")

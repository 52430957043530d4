"""On a host where stock llama.cpp crashes (stock llama-cpp-python 0.3.36 dies with SIGSEGV/SIGILL in its AMX
repack on some Intel Xeons), the suite runs to the end: the tests that compare against stock fail and name the
signal, and every other test passes.

Simulated with stand-ins for llama_cpp (tests/stock.py: the real package, but a Llama that would repack kills
itself with SIGSEGV as it loads), one for the stock runtime (EDGEMOE_STOCK_RUNTIME) and one first on
PYTHONPATH for everything else, pytest included, as on such a host. A pytest session in a subprocess runs
every test marked `stock`, then tests that do not compare against stock, the in-process stock with the repack
off among them (that one is about edgemoe's own output, and the repack is what crashes).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import stock

ROOT = Path(__file__).resolve().parent.parent
# run after the crashes, in the same session: they must still pass
OTHERS = ["tests/test_bench.py::test_belady_by_hand",
          "tests/test_hook.py::test_same_tokens_and_logits_as_stock_at_25_percent",
          "tests/test_cli_run.py::test_run_bad_budget[-1-not a size]"]
# stock comparisons the `stock` marker must reach (one per file that has them)
KNOWN = ["tests/test_generation.py::test_greedy_generation_is_stdlib_like",
         "tests/test_convert.py::test_uniform_file_loads_in_stock_llama_cpp",
         "tests/test_convert.py::test_per_layer_plan_file_loads_in_stock_llama_cpp",
         "tests/test_cli_run.py::test_run_stock_repack_on_names_the_other_path",
         "tests/test_bench.py::test_bench_stock_child_uses_llama_cpps_default_repack"]


def pytest(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800, check=False)


def test_a_crashing_stock_fails_the_stock_tests_by_signal_and_the_session_runs_on(tmp_path):
    real_stock = os.environ.get(stock.STOCK_RUNTIME_ENV)
    env = {**os.environ,
           stock.STOCK_RUNTIME_ENV: str(stock.write_crashing_standin(tmp_path / "stock", real=real_stock)),
           "PYTHONPATH": os.pathsep.join(p for p in (str(stock.write_crashing_standin(tmp_path / "here")),
                                                     os.environ.get("PYTHONPATH")) if p)}
    marked = collect("stock and not repack_off", env)
    assert set(KNOWN) <= set(marked), marked
    # stock with the repack off runs where the repack crashes: those comparisons must pass
    others = OTHERS + collect("stock and repack_off", env)

    junit = tmp_path / "junit.xml"
    run = pytest(f"--junitxml={junit}", *marked, *others, env=env)
    out = run.stdout
    print(out[out.rfind("short test summary info") - 32:])       # shown with -rA: the nested session's summary
    assert run.returncode == 1, out[-5000:] + run.stderr[-3000:]          # tests failed; pytest was not killed
    assert re.search(rf"=+ {len(marked)} failed, {len(others)} passed in ", out), out[-5000:]   # ran to the end
    results = outcomes(junit)
    failed = {k: v for k, v in results.items() if v is not None}
    assert set(failed) == set(marked), failed
    assert all(msg.startswith("Failed: stock llama.cpp died with SIGSEGV") for msg in failed.values()), failed
    assert {k for k, v in results.items() if v is None} == set(others)


def collect(expr: str, env: dict) -> list[str]:
    listed = pytest("--collect-only", "-q", "-m", expr, "tests", env=env)
    assert listed.returncode in (0, 5), listed.stdout[-3000:] + listed.stderr[-3000:]     # 5: none selected
    return [line.strip() for line in listed.stdout.splitlines() if "::" in line]


def outcomes(junit: Path) -> dict[str, str | None]:
    """node id -> None (passed) or the failure's message; an error or a skip is a failure here too."""
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        file = case.get("classname").replace(".", "/") + ".py"
        bad = next(iter([*case.iter("failure"), *case.iter("error"), *case.iter("skipped")]), None)
        out[f"{file}::{case.get('name')}"] = None if bad is None else f"{bad.tag}: {bad.get('message')}" \
            if bad.tag != "failure" else bad.get("message")
    return out

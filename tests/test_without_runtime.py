"""The parts of edgemoe that never run a model need no llama-cpp-python: reading and checking GGUFs, the planner,
profiles, importance matrices from a profile, the cache's policies, routing traces, and the CLI's parser. Here they
are imported, and their tests run, in processes where `import llama_cpp` fails."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
NO_RUNTIME = "import sys; sys.modules['llama_cpp'] = None\n"
WITHOUT = ["edgemoe_llamacpp.convert", "edgemoe_llamacpp.convert.plan", "edgemoe_llamacpp.gguf.header",
           "edgemoe_llamacpp.cache.storage", "edgemoe_llamacpp.cache.spans", "edgemoe_llamacpp.convert.profile",
           "edgemoe_llamacpp.convert.rewrite", "edgemoe_llamacpp.convert.verify", "edgemoe_llamacpp.convert.imatrix",
           "edgemoe_llamacpp.convert.calibrate", "edgemoe_llamacpp.gguf.layout", "edgemoe_llamacpp.gguf.quant",
           "edgemoe_llamacpp.cache.config", "edgemoe_llamacpp.cache.residency", "edgemoe_llamacpp.cli",
           "edgemoe_bench.routing_trace", "edgemoe_bench.trace_gen", "edgemoe_bench.replay"]
# test files that run without it (their `runtime` tests skip, saying why)
FILES = ["test_plan.py", "test_layout.py", "test_imatrix.py", "test_policies.py", "test_routing_trace.py",
         "test_trace_gen.py", "test_cache_config.py", "test_ledger.py", "test_storage.py", "test_structure.py"]


def python(code: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_RUNTIME + code], capture_output=True, text=True, timeout=300,
                          check=False, **kwargs)


def test_the_modules_that_run_no_model_import_without_llama_cpp():
    proc = python("import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in WITHOUT))
    assert proc.returncode == 0, proc.stderr
    proc = python("import edgemoe_llamacpp.convert.record")           # recording a profile runs the model
    assert proc.returncode == 1 and "ModuleNotFoundError" in proc.stderr


@pytest.mark.parametrize("name", FILES)
def test_the_tests_of_what_runs_no_model_pass_without_llama_cpp(name):
    env = {**os.environ, "EDGEMOE_WITHOUT_RUNTIME": "1"}
    env.pop("EDGEMOE_REQUIRE_PATCHED", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", str(TESTS / name)],
                          capture_output=True, text=True, timeout=600, check=False, env=env, cwd=TESTS.parent)
    assert proc.returncode == 0, proc.stdout[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert " passed" in last and "error" not in last, last
    # skipped only for want of the runtime, or where this machine's temp filesystem keeps a file's pages
    skipped = [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED")]
    assert all("needs llama-cpp-python" in line or "keeps the file's pages in memory" in line
               for line in skipped), skipped

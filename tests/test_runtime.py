"""The patched runtime: detected, stock behaviour unchanged, stock builds refuse mixed files, lazy load."""
import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgemoe_llamacpp import runtime
from edgemoe_llamacpp.convert.rewrite import convert
from edgemoe_llamacpp.gguf.layout import read_layout

STOCK = os.environ.get("EDGEMOE_STOCK_RUNTIME")
needs_stock = pytest.mark.skipif(not STOCK, reason="EDGEMOE_STOCK_RUNTIME (an unpatched llama-cpp-python "
                                 "installed with tools/build_runtime.py --stock --target DIR) is not set")


def test_runtime_is_patched_where_required():
    info = runtime.runtime_info()
    if os.environ.get("EDGEMOE_REQUIRE_PATCHED"):
        assert info["patched"] and "+edgemoe." in info["llama_cpp_python"], info
    # the file llama.cpp computes with (opening it by its resolved path maps no second copy)
    assert Path(info["libggml_cpu"]).is_file()
    assert info["patched"] == hasattr(ctypes.CDLL(info["libggml_cpu"]), "ggml_cpu_edgemoe_abi")


@pytest.fixture(scope="module")
def mixed(fixture_path, tmp_path_factory):
    layout = read_layout(fixture_path)
    plan = {t.name: [("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")[e % 6] for e in range(t.count)]
            for t in layout.expert_tensors}
    return convert(fixture_path, tmp_path_factory.mktemp("rt") / "mixed.gguf", plan, progress=False).path


def python(code: str, stock: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if stock:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(STOCK).resolve()), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600,
                          check=False)


@needs_stock
def test_stock_build_refuses_a_mixed_file(mixed):
    r = python(f"import llama_cpp; print(llama_cpp.__version__); llama_cpp.Llama({mixed!r})", stock=True)
    assert r.stdout.strip() == "0.3.36" and r.returncode != 0
    assert "wrong number of tensors" in r.stderr
    # and edgemoe, on that build, says why before llama.cpp gets to it
    r = python(f"from edgemoe_llamacpp.cli import main; raise SystemExit(main(['run', {mixed!r}, '-p', 'x']))",
               stock=True)
    assert r.returncode == 2 and "not built with edgemoe's patches" in r.stderr


GREEDY = """
import json
from edgemoe_llamacpp.engine.generate import greedy
from edgemoe_llamacpp.engine.llama import stock_llama
llm = stock_llama({path!r}, use_extra_bufts={bufts}, n_ctx=256, verbose=False)
tokens, logits = greedy(llm, "import os\\nimport sys\\n\\n\\ndef main(argv):\\n    ", 32)
print(json.dumps({{"tokens": tokens, "logits": logits.tolist()}}))
"""


@needs_stock
@pytest.mark.parametrize("bufts", [False, True])
def test_patched_build_computes_stock_files_exactly_as_stock(fixture_path, bufts):
    """Nothing registered: the patched kernel takes the stock path, bit for bit."""
    code = GREEDY.format(path=str(fixture_path), bufts=bufts)
    stock, patched = (python(code, stock=s) for s in (True, False))
    assert stock.returncode == 0 and patched.returncode == 0, stock.stderr + patched.stderr
    assert json.loads(stock.stdout) == json.loads(patched.stdout)


LOAD = """
import os, json, llama_cpp
from edgemoe_llamacpp import pages
from edgemoe_llamacpp import runtime
from edgemoe_llamacpp.engine.llama import llama_params
fd = os.open({path!r}, os.O_RDONLY); pages.flush(fd); pages.fadvise_dontneed(fd, 0, 0); os.close(fd)
def read(): return int(open("/proc/self/io").read().split("read_bytes: ")[1].split()[0])
before = read()
with llama_params(use_extra_bufts=False, mmap_prefetch={prefetch}):
    llm = llama_cpp.Llama({path!r}, n_ctx=64, verbose=False)
print(json.dumps({{"read": read() - before}}))
"""


@pytest.mark.skipif(not runtime.patched(), reason="needs llama-cpp-python built with patches/")
def test_load_time_read_is_switchable(fixture_path):
    """patches/0003: LLAMA_MMAP_PREFETCH=0 maps the model without reading it; unset, the load reads it all."""
    size = fixture_path.stat().st_size
    reads = {}
    for prefetch in (True, False):
        r = python(LOAD.format(path=str(fixture_path), prefetch=prefetch), stock=False)
        assert r.returncode == 0, r.stderr
        reads[prefetch] = json.loads(r.stdout)["read"]
    assert reads[True] >= 0.9 * size
    assert reads[False] <= 0.1 * size

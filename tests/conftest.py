import os
import sys
from pathlib import Path

import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "tiny-moe.gguf"
WITHOUT_RUNTIME = "EDGEMOE_WITHOUT_RUNTIME"      # set: run as if llama-cpp-python were not installed
if os.environ.get(WITHOUT_RUNTIME):
    sys.modules["llama_cpp"] = None               # `import llama_cpp` raises ModuleNotFoundError from here on


def pytest_configure(config):
    config.addinivalue_line("markers", "stock: compares against stock llama.cpp, run in a child process "
                            "(tests/stock.py; EDGEMOE_STOCK_RUNTIME selects its llama_cpp)")
    config.addinivalue_line("markers", "repack_off: a `stock` test whose stock runs with llama.cpp's CPU repack "
                            "off (edgemoe's compute path), which runs where the repack crashes")
    config.addinivalue_line("markers", "runtime: runs llama.cpp (llama-cpp-python); the others need only the "
                            "package's Python dependencies (tests/test_without_runtime.py runs them without it)")


def runtime_installed() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ModuleNotFoundError:
        return False
    return True


def pytest_collection_modifyitems(config, items):
    """Without llama-cpp-python, the `runtime` tests are skipped, saying why; `make test` (EDGEMOE_REQUIRE_PATCHED)
    never runs without it."""
    if runtime_installed():
        return
    if os.environ.get("EDGEMOE_REQUIRE_PATCHED"):
        raise pytest.UsageError("EDGEMOE_REQUIRE_PATCHED is set but llama-cpp-python is not importable")
    skip = pytest.mark.skip(reason="needs llama-cpp-python (edgemoe build-runtime)")
    for item in items:
        if "runtime" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def fixture_path() -> Path:
    assert FIXTURE.is_file(), f"{FIXTURE} is missing: it is committed; rebuild with tools/make_tiny_moe.py"
    return FIXTURE

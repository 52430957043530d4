from pathlib import Path

import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "tiny-moe.gguf"


def pytest_configure(config):
    config.addinivalue_line("markers", "stock: compares against stock llama.cpp, run in a child process "
                            "(tests/stock.py; EDGEMOE_STOCK_RUNTIME selects its llama_cpp)")
    config.addinivalue_line("markers", "repack_off: a `stock` test whose stock runs with llama.cpp's CPU repack "
                            "off (edgemoe's compute path), which runs where the repack crashes")


@pytest.fixture(scope="session")
def fixture_path() -> Path:
    assert FIXTURE.is_file(), f"{FIXTURE} is missing: it is committed; rebuild with tools/make_tiny_moe.py"
    return FIXTURE

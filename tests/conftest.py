from pathlib import Path

import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "tiny-moe.gguf"


@pytest.fixture(scope="session")
def fixture_path() -> Path:
    assert FIXTURE.is_file(), f"{FIXTURE} is missing: it is committed; rebuild with tools/make_tiny_moe.py"
    return FIXTURE

"""Bad input: one line saying what is wrong, exit code 2, no traceback."""
import subprocess
import sys

import pytest
from synthetic import write_gguf

from edgemoe_llamacpp import BadModelError, NotMoEError, read_layout


def run_inspect(path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgemoe_llamacpp", "inspect", str(path)],
                          check=False, capture_output=True, text=True)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgemoe: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0]


def test_not_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip, not a model" * 10)
    assert_one_line_error(run_inspect(path), "not a GGUF file")


@pytest.mark.parametrize("keep", [6, 2000, 0.5, 0.999])
def test_truncated(tmp_path, fixture_path, keep):
    data = fixture_path.read_bytes()
    n = keep if isinstance(keep, int) else int(len(data) * keep)
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:n])
    assert_one_line_error(run_inspect(path), "truncated")
    with pytest.raises(BadModelError):
        read_layout(path)


def test_no_experts(tmp_path):
    path = write_gguf(tmp_path / "dense.gguf", "llama", {"block_count": 2},
                      {"token_embd.weight": (64, 32), "blk.0.ffn_up.weight": (16, 32),
                       "blk.1.ffn_up.weight": (16, 32)})
    assert_one_line_error(run_inspect(path), "not a Mixture-of-Experts model")
    with pytest.raises(NotMoEError):
        read_layout(path)


def test_missing_file_and_directory(tmp_path):
    assert_one_line_error(run_inspect(tmp_path / "absent.gguf"), "no such file")
    assert_one_line_error(run_inspect(tmp_path), "not a regular file")


def test_expert_count_disagrees_with_tensors(tmp_path):
    from synthetic import moe_tensors
    path = write_gguf(tmp_path / "m.gguf", "qwen3moe", {"block_count": 2, "expert_count": 8,
                                                        "expert_used_count": 2}, moe_tensors(2, 4))
    assert_one_line_error(run_inspect(path), "stacks 4 experts")

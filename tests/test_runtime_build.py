"""`edgemoe build-runtime`: what keys the wheel cache, the CPU check, the patches shipped as package data, and the
commands that must work before any llama-cpp-python is installed."""
import os
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from edgemoe_llamacpp.engine import build as rb

ROOT = Path(__file__).resolve().parent.parent
NO_LLAMA = "import sys; sys.modules['llama_cpp'] = None\nfrom edgemoe_llamacpp.cli import main\nsys.exit(main({}))"


def test_patches_are_package_data_and_the_source_tree_points_there():
    names = [p.name for p in rb.patch_files()]
    assert names == sorted(names) and len(names) >= 4
    assert all(p.parent == ROOT / "edgemoe_llamacpp" / "patches" for p in rb.patch_files())
    assert sorted(p.name for p in (ROOT / "patches").glob("*.patch")) == names


def test_key_covers_patches_target_and_cmake_args(monkeypatch, tmp_path):
    portable = rb.target(native=False)
    key = rb.build_key(False, portable)
    assert rb.build_key(False, portable) == key
    assert rb.build_key(True, portable).startswith("stock-") and rb.build_key(True, portable)[6:] != key
    monkeypatch.setenv("CMAKE_ARGS", "-DGGML_BLAS=ON")
    assert rb.build_key(False, portable) != key
    monkeypatch.delenv("CMAKE_ARGS")
    other = rb.Target("other", portable.cmake_args, portable.needs)
    assert rb.build_key(False, other) != key
    # one patch byte changes the patched key, not the stock one
    copy = tmp_path / "patches"
    copy.mkdir()
    for p in rb.patch_files():
        (copy / p.name).write_bytes(p.read_bytes())
    stock = rb.build_key(True, portable)
    monkeypatch.setattr(rb, "PATCHES", copy)
    assert rb.build_key(False, portable) == key
    last = max(copy.glob("*.patch"))
    last.write_bytes(last.read_bytes() + b"\n")
    assert rb.build_key(False, portable) != key
    assert rb.build_key(True, portable) == stock


def test_native_key_differs_per_cpu(monkeypatch):
    monkeypatch.setattr(rb, "cpu_flags", lambda: {"sse4_2", "avx", "avx2"})
    a = rb.target(native=True)
    monkeypatch.setattr(rb, "cpu_flags", lambda: {"sse4_2", "avx", "avx2", "avx512f"})
    b = rb.target(native=True)
    assert a.label != b.label and a.label.startswith("native-")
    assert rb.build_key(False, a) != rb.build_key(False, b)
    assert a.cmake_args == ("-DGGML_NATIVE=ON",)


@pytest.mark.skipif(rb.target(False).label != "x86_64-v3", reason="the x86-64 baseline check")
def test_portable_build_is_refused_on_a_cpu_without_the_baseline(monkeypatch):
    t = rb.target(native=False)
    assert "-DGGML_NATIVE=OFF" in t.cmake_args and "-DGGML_AVX512=OFF" in t.cmake_args
    assert "-DGGML_AMX_INT8=OFF" in t.cmake_args
    monkeypatch.setattr(rb, "cpu_flags", lambda: {"sse4_2", "avx", "fma", "f16c"})
    with pytest.raises(rb.RuntimeBuildError, match=r"lacks avx2, bmi2.*edgemoe build-runtime --native"):
        rb.check_cpu(t)
    monkeypatch.setattr(rb, "cpu_flags", lambda: set(rb.X86_BASELINE) | {"avx512f"})
    rb.check_cpu(t)


def test_this_cpu_runs_the_portable_build():
    rb.check_cpu(rb.target(native=False))


@pytest.mark.skipif(not os.environ.get("EDGEMOE_REQUIRE_PATCHED"), reason="make test installs the patched runtime")
def test_the_installed_runtime_is_the_current_patches_portable_build():
    version = metadata.version("llama-cpp-python")
    assert version == f"{rb.VERSION}+edgemoe.{rb.build_key(False, rb.target(False))}", (
        f"llama-cpp-python {version} is not the build of these patches: run `edgemoe build-runtime`")


def _no_llama(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_LLAMA.format(args)], check=False, capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_print_key_needs_no_llama_cpp():
    out = _no_llama(["build-runtime", "--print-key"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == rb.build_key(False, rb.target(False))


def test_commands_without_llama_cpp_say_how_to_get_it(fixture_path):
    out = _no_llama(["run", str(fixture_path), "-p", "x", "-n", "1"])
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "edgemoe: error: llama-cpp-python is not installed; build edgemoe's runtime: edgemoe build-runtime"]
    code = "import sys; sys.modules['llama_cpp'] = None\nfrom edgemoe_llamacpp import Llama"
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 1 and "edgemoe build-runtime" in out.stderr.splitlines()[-1]


def test_a_failed_step_is_one_clear_error(monkeypatch):
    with pytest.raises(rb.RuntimeBuildError, match=r"exit 3.*edgemoe build-runtime"):
        rb._run([sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(rb.RuntimeBuildError, match="cannot run /nonexistent/cmake"):
        rb._run(["/nonexistent/cmake"])
    monkeypatch.setattr(rb.shutil, "which", lambda tool: None)
    with pytest.raises(rb.RuntimeBuildError, match="needs cmake, patch, a C/C.. compiler"):
        rb._require_tools()


def test_the_wheel_carries_the_patches(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=600)
    (wheel,) = tmp_path.glob("edgemoe_llamacpp-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert {f"edgemoe_llamacpp/patches/{p.name}" for p in rb.patch_files()} <= names
    assert "edgemoe_llamacpp/engine/build.py" in names
    assert "Requires-Dist: llama-cpp-python" not in meta        # build-runtime provides it, patched

"""`edgemoe build-runtime`: build llama-cpp-python with edgemoe's llama.cpp patches, cache the wheel, install it.

The patches ship inside this package (`edgemoe_llamacpp/patches/`). The build compiles llama.cpp once (~8 minutes
on 2 cores) and caches the wheel under $EDGEMOE_WHEEL_CACHE (default ~/.cache/edgemoe-llamacpp/wheels), keyed by
everything that decides what the wheel contains and where it can run: the llama-cpp-python version, every
patch's name and bytes, the target instruction set and any CMAKE_ARGS the user set.

Wheels are portable by default: GGML_NATIVE=OFF with a fixed instruction-set baseline (x86-64: SSE4.2, AVX, AVX2,
FMA, F16C, BMI2 and nothing newer, so no AVX-512 and no AMX; aarch64: armv8-a). A cache shared by several
machines then holds one wheel that runs on all of them, and the CPU is checked for the baseline before a wheel is
built or installed. `--native` builds for this CPU alone (-march=native); its key carries a digest of the CPU's
feature flags, so no other CPU is ever handed that wheel.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgemoe_llamacpp.errors import EdgeMoEError

VERSION = "0.3.36"
PATCHES = Path(__file__).resolve().parent.parent / "patches"
COMMAND = "edgemoe build-runtime"

# /proc/cpuinfo flag names of the instructions a portable x86-64 build uses, with the ggml options that enable them
X86_BASELINE = {"sse4_2": "GGML_SSE42", "avx": "GGML_AVX", "avx2": "GGML_AVX2", "fma": "GGML_FMA",
                "f16c": "GGML_F16C", "bmi2": "GGML_BMI2"}
X86_OFF = ("GGML_AVX_VNNI", "GGML_AVX512", "GGML_AVX512_VBMI", "GGML_AVX512_VNNI", "GGML_AVX512_BF16",
           "GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")


class RuntimeBuildError(EdgeMoEError):
    """The runtime cannot be built or installed here; the message says what to do."""


@dataclass(frozen=True)
class Target:
    """What a build compiles for: `label` names it in the cache key and the wheel's version label."""
    label: str
    cmake_args: tuple[str, ...]
    needs: tuple[str, ...]          # CPU flags the wheel's code executes


def cpu_flags() -> set[str]:
    """The CPU's feature flags as /proc/cpuinfo names them (x86 `flags`, arm `Features`)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def target(native: bool) -> Target:
    machine = platform.machine().lower()
    if native:
        digest = hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:12]
        return Target(f"native-{machine}-{digest}", ("-DGGML_NATIVE=ON",), ())
    if machine in ("x86_64", "amd64"):
        args = ["-DGGML_NATIVE=OFF"] + [f"-D{opt}=ON" for opt in X86_BASELINE.values()]
        args += [f"-D{opt}=OFF" for opt in X86_OFF]
        return Target("x86_64-v3", tuple(args), tuple(X86_BASELINE))
    if machine in ("aarch64", "arm64"):
        return Target("aarch64-armv8", ("-DGGML_NATIVE=OFF",), ())
    raise RuntimeBuildError(f"no portable build is defined for {machine}: build for this CPU with `{COMMAND} --native`")


def check_cpu(t: Target) -> None:
    flags = cpu_flags()
    missing = [f for f in t.needs if f not in flags] if flags else []
    if missing:
        raise RuntimeBuildError(f"this CPU lacks {', '.join(missing)}, which the portable {t.label} build uses: "
                                f"build for this CPU with `{COMMAND} --native`")


def patch_files() -> list[Path]:
    found = sorted(PATCHES.glob("*.patch"))
    if not found:
        raise RuntimeBuildError(f"no patches in {PATCHES}: this edgemoe installation is incomplete; reinstall it")
    return found


def build_key(stock: bool, t: Target) -> str:
    digest = hashlib.sha256(f"{VERSION}\0{t.label}\0{' '.join(t.cmake_args)}\0"
                            f"{os.environ.get('CMAKE_ARGS', '')}".encode())
    if not stock:
        for path in patch_files():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return ("stock-" if stock else "") + digest.hexdigest()[:16]


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "edgemoe-llamacpp" / "wheels"
    return Path(os.environ.get("EDGEMOE_WHEEL_CACHE", default))


def _run(cmd: list[str], **kwargs) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    try:
        subprocess.run(cmd, check=True, **kwargs)
    except subprocess.CalledProcessError as e:
        raise RuntimeBuildError(f"{Path(str(cmd[0])).name} {' '.join(map(str, cmd[1:3]))} ... failed "
                                f"(exit {e.returncode}); its output is above. Rerun `{COMMAND}` once fixed") from None
    except OSError as e:
        raise RuntimeBuildError(f"cannot run {cmd[0]}: {e.strerror}; `{COMMAND}` needs it") from None


def _require_tools() -> None:
    missing = [tool for tool in ("cmake", "patch") if shutil.which(tool) is None]
    if shutil.which("cc") is None and shutil.which("gcc") is None and shutil.which("clang") is None:
        missing.append("a C/C++ compiler")
    if missing:
        raise RuntimeBuildError(f"`{COMMAND}` compiles llama.cpp and needs {', '.join(missing)} on PATH "
                                "(cmake can also come from pip: pip install cmake)")


def _set_version(src: Path, key: str) -> None:
    init = src / "llama_cpp" / "__init__.py"
    text = init.read_text()
    marker = f'__version__ = "{VERSION}"'
    if marker not in text:
        raise RuntimeBuildError(f"{init} does not say {marker}: the sdist is not the one the patches target")
    init.write_text(text.replace(marker, f'__version__ = "{VERSION}+edgemoe.{key}"'))


def build_wheel(stock: bool, t: Target, key: str, out: Path) -> Path:
    """Compile llama-cpp-python (patched unless `stock`) for `t` and store the wheel atomically in `out`."""
    _require_tools()
    env = dict(os.environ)
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
    env["CMAKE_ARGS"] = " ".join([*t.cmake_args, env.get("CMAKE_ARGS", "")]).strip()
    pip = [sys.executable, "-m", "pip"]
    with tempfile.TemporaryDirectory(prefix="edgemoe-build-") as tmp:
        tmp = Path(tmp)
        _run([*pip, "download", "--no-deps", "--no-binary", ":all:", "-d", str(tmp), f"llama-cpp-python=={VERSION}"])
        (sdist,) = tmp.glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = tmp / f"llama_cpp_python-{VERSION}"
        if not stock:
            for path in patch_files():
                _run(["patch", "-p1", "--forward", "--batch", "-i", str(path)], cwd=src)
            _set_version(src, key)
        _run([*pip, "wheel", "--no-deps", "-w", str(tmp / "dist"), str(src)], env=env)
        (wheel,) = (tmp / "dist").glob("llama_cpp_python-*.whl")
        out.mkdir(parents=True, exist_ok=True)
        part = out / (wheel.name + ".part")
        shutil.copyfile(wheel, part)
        with open(part, "rb") as f:
            os.fsync(f.fileno())
        (out / "build.json").write_text(json.dumps({"target": t.label, "cmake_args": env["CMAKE_ARGS"],
                                                    "needs": list(t.needs), "stock": stock}) + "\n")
        final = out / wheel.name
        os.replace(part, final)
        return final


def cached_wheel(stock: bool, t: Target) -> Path:
    key = build_key(stock, t)
    where = cache_dir() / key
    found = sorted(where.glob("llama_cpp_python-*.whl")) if where.is_dir() else []
    if found:
        print(f"cached wheel {found[0]} (key {key}, {t.label})", flush=True)
        return found[0]
    print(f"building llama-cpp-python {VERSION} ({'stock' if stock else 'patched'}, {t.label}, key {key}); "
          "this compiles llama.cpp once, ~8 minutes on 2 cores", flush=True)
    return build_wheel(stock, t, key, where)


def installed_version(python: str, target_dir: str | None) -> str | None:
    code = ("import importlib.metadata as m\n"
            "try: print(m.version('llama-cpp-python'))\n"
            "except m.PackageNotFoundError: pass\n")
    env = dict(os.environ)
    if target_dir:
        env["PYTHONPATH"] = target_dir
        code = "import sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p]\n" + code
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env, check=False)
    return out.stdout.strip() or None


def install(wheel: Path, python: str, target_dir: str | None) -> None:
    want = wheel.name.split("-")[1]
    if installed_version(python, target_dir) == want:
        print(f"llama-cpp-python {want} already installed", flush=True)
        return
    cmd = [python, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel)]
    if target_dir:
        _run([*cmd, "--target", target_dir, "--upgrade"])
    else:
        _run(cmd)
        _run([python, "-m", "pip", "install", "-q", str(wheel)])     # llama-cpp-python's own dependencies
    print(f"installed llama-cpp-python {want}", flush=True)


HELP = "build llama-cpp-python with edgemoe's patches (cached) and install it"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stock", action="store_true", help="build llama-cpp-python without the patches")
    p.add_argument("--native", action="store_true",
                   help="build for this CPU only (-march=native) instead of the portable baseline")
    p.add_argument("--python", default=sys.executable, help="interpreter to install into (default: this one)")
    p.add_argument("--target", help="install into this directory (pip --target) instead of the interpreter")
    p.add_argument("--print-key", action="store_true", help="print the wheel cache key and exit")


def run(args: argparse.Namespace) -> int:
    t = target(args.native)
    if args.print_key:
        print(build_key(args.stock, t))
        return 0
    check_cpu(t)
    install(cached_wheel(args.stock, t), args.python, args.target)
    return 0

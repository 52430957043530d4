"""Build llama-cpp-python with edgemoe's llama.cpp patches, cache the wheel, install it.

    python tools/build_runtime.py [--python .venv/bin/python]        # patched build into that interpreter
    python tools/build_runtime.py --stock --target .runtime/stock      # unpatched build into a directory

The wheel is cached under $EDGEMOE_WHEEL_CACHE (default ~/.cache/edgemoe-llamacpp/wheels), keyed by the
sha256 of the llama-cpp-python version and every patch's name and bytes: a change to patches/ builds anew,
anything else reuses the cached wheel (the compile takes ~8 minutes on 2 cores). The patched wheel carries
the local version label `+edgemoe.<key>`, so `pip show llama-cpp-python` tells which build is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.3.36"
ROOT = Path(__file__).resolve().parent.parent
PATCHES = ROOT / "patches"


def patch_files() -> list[Path]:
    return sorted(PATCHES.glob("*.patch"))


def build_key(stock: bool) -> str:
    if stock:
        return f"stock-{VERSION}"
    digest = hashlib.sha256(VERSION.encode())
    for path in patch_files():
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "edgemoe-llamacpp" / "wheels"
    return Path(os.environ.get("EDGEMOE_WHEEL_CACHE", default))


def run(cmd: list[str], **kwargs) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run(cmd, check=True, **kwargs)


def build_wheel(stock: bool, key: str, out: Path) -> Path:
    env = dict(os.environ)
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
    with tempfile.TemporaryDirectory(prefix="edgemoe-build-") as tmp:
        tmp = Path(tmp)
        pip = [sys.executable, "-m", "pip"]
        if stock:
            run([*pip, "wheel", "--no-deps", "-w", str(tmp / "dist"), f"llama-cpp-python=={VERSION}"], env=env)
        else:
            run([*pip, "download", "--no-deps", "--no-binary", ":all:", "-d", str(tmp),
                 f"llama-cpp-python=={VERSION}"])
            (sdist,) = tmp.glob("llama_cpp_python-*.tar.gz")
            with tarfile.open(sdist) as tar:
                tar.extractall(tmp, filter="data")
            src = tmp / f"llama_cpp_python-{VERSION}"
            for path in patch_files():
                run(["patch", "-p1", "--forward", "--batch", "-i", str(path)], cwd=src)
            init = src / "llama_cpp" / "__init__.py"
            text = init.read_text()
            marker = f'__version__ = "{VERSION}"'
            if marker not in text:
                raise SystemExit(f"error: {init} does not say {marker}")
            init.write_text(text.replace(marker, f'__version__ = "{VERSION}+edgemoe.{key}"'))
            run([*pip, "wheel", "--no-deps", "-w", str(tmp / "dist"), str(src)], env=env)
        (wheel,) = (tmp / "dist").glob("llama_cpp_python-*.whl")
        out.mkdir(parents=True, exist_ok=True)
        part = out / (wheel.name + ".part")
        shutil.copyfile(wheel, part)
        with open(part, "rb") as f:
            os.fsync(f.fileno())
        final = out / wheel.name
        os.replace(part, final)
        return final


def cached_wheel(stock: bool) -> Path:
    key = build_key(stock)
    where = cache_dir() / key
    found = sorted(where.glob("llama_cpp_python-*.whl")) if where.is_dir() else []
    if found:
        print(f"cached wheel {found[0]} (key {key})", flush=True)
        return found[0]
    print(f"building llama-cpp-python {VERSION} ({'stock' if stock else 'patched'}, key {key}); "
          "this compiles llama.cpp once, ~8 minutes on 2 cores", flush=True)
    return build_wheel(stock, key, where)


def installed_version(python: str, target: str | None) -> str | None:
    code = ("import importlib.metadata as m, sys\n"
            "try: print(m.version('llama-cpp-python'))\n"
            "except m.PackageNotFoundError: pass\n")
    env = dict(os.environ)
    if target:
        env["PYTHONPATH"] = target
        code = "import sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p]\n" + code
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env, check=False)
    return out.stdout.strip() or None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stock", action="store_true", help="build llama-cpp-python without the patches")
    p.add_argument("--python", default=sys.executable, help="interpreter to install into (default: this one)")
    p.add_argument("--target", help="install into this directory (pip --target) instead of the interpreter")
    p.add_argument("--print-key", action="store_true", help="print the cache key and exit")
    args = p.parse_args(argv)
    if args.print_key:
        print(build_key(args.stock))
        return 0
    wheel = cached_wheel(args.stock)
    want = wheel.name.split("-")[1]
    if installed_version(args.python, args.target) == want:
        print(f"llama-cpp-python {want} already installed", flush=True)
        return 0
    cmd = [args.python, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel)]
    if args.target:
        cmd += ["--target", args.target, "--upgrade"]
    run(cmd)
    print(f"installed llama-cpp-python {want}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

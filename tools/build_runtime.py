"""Build llama-cpp-python with edgemoe's llama.cpp patches, cache the wheel, install it: `edgemoe build-runtime`.

    python tools/build_runtime.py [--python .venv/bin/python]        # patched build into that interpreter
    python tools/build_runtime.py --stock --target .runtime/stock      # unpatched build into a directory

This wrapper runs without edgemoe installed (the Makefile calls it before `pip install -e .`); the build logic and
the patches live in the package (edgemoe_llamacpp/engine/build.py, edgemoe_llamacpp/patches/).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgemoe_llamacpp.engine import build as runtime_build
from edgemoe_llamacpp.errors import EdgeMoEError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    runtime_build.add_arguments(p)
    try:
        return runtime_build.run(p.parse_args(argv))
    except EdgeMoEError as e:
        print(f"build_runtime: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

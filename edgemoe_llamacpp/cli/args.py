"""What every `edgemoe` command's arguments share: argparse types that name a bad value in one line, the expert
cache's options as flags (from CacheConfig), and the runtime's description. Plugins (cli.plugins) use them too."""
from __future__ import annotations

import argparse
import math

from edgemoe_llamacpp.cache.residency import parse_budget
from edgemoe_llamacpp.errors import BudgetError


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


MAX_CTX = 1 << 20           # no GGUF model trains longer contexts; larger values are typos


def int_range(lo: int, hi: int | None = None):
    """argparse type: an integer in [lo, hi], refused with a one-line message before llama.cpp sees it."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not an integer") from None
        if n < lo or (hi is not None and n > hi):
            raise argparse.ArgumentTypeError(f"{text[:40]} is out of range [{lo}, {hi if hi is not None else 'inf'}]")
        return n
    parse.__name__ = "integer"
    return parse


def byte_size(text: str) -> int:
    """argparse type: a size in bytes, with or without a unit (2G and 500M as llama.cpp's gguf-split takes them,
    1.5GiB, 4096)."""
    try:
        if text.strip().endswith("%") or text.strip().lower() == "none":
            raise BudgetError(text)
        return parse_budget(text, 0)
    except BudgetError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a size (e.g. 2G, 500M, 1.5GiB or bytes)") from None


byte_size.__name__ = "size"


def float_range(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False):
    """argparse type: a finite float in [lo, hi] (or open at either end)."""
    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a number") from None
        if not math.isfinite(x) or x < lo or x > hi or (lo_open and x == lo) or (hi_open and x == hi):
            raise argparse.ArgumentTypeError(f"{text[:40]} is out of range {'(' if lo_open else '['}{lo}, "
                                             f"{hi}{')' if hi_open else ']'}")
        return x
    parse.__name__ = "number"
    return parse


def add_cache_options(p: argparse.ArgumentParser, *, budgets: bool = False) -> None:
    """The expert cache's options as flags of `p`, made from CacheConfig's fields (CacheConfig.option); with
    `budgets`, --memory-budget takes several (bench measures each). --substitute alone may be given bare: the
    share engine.substitute defaults to."""
    from dataclasses import fields

    from edgemoe_llamacpp.cache.config import CacheConfig
    from edgemoe_llamacpp.engine.substitute import DEFAULT_THRESHOLD

    default = CacheConfig()
    for f in fields(CacheConfig):
        option, value = CacheConfig.option(f.name), getattr(default, f.name)
        flag = "--" + f.name.replace("_", "-")
        text = option["help"].replace("%", "%%") + ("" if value is None else f" (default: {value})")
        if f.name == "memory_budget":
            if budgets:
                p.add_argument(flag, dest=f.name, nargs="+", required=True, help="budgets, e.g. 25%% 50%% 100%%")
            else:
                p.add_argument(flag, dest=f.name, help=text)
        elif "choices" in option:       # an unset one is spelled "none"
            unset = value is None or option.get("unset", False)
            p.add_argument(flag, dest=f.name, choices=(*option["choices"], *(("none",) if unset else ())),
                           default="none" if value is None else value, help=text)
        elif isinstance(option["range"][0], int):
            p.add_argument(flag, dest=f.name, type=int_range(*option["range"]), default=value, help=text)
        else:
            lo, hi = option["range"]
            p.add_argument(flag, dest=f.name, type=float_range(lo, hi, hi_open=option.get("open_high", False)),
                           nargs="?", const=DEFAULT_THRESHOLD, default=value, metavar="SHARE",
                           help=f"{text} Without SHARE: {DEFAULT_THRESHOLD}.")


def cache_config(args: argparse.Namespace, **override):
    """The CacheConfig of the flags add_cache_options added (`override`: fields set otherwise, as bench's budget)."""
    from edgemoe_llamacpp.cache.config import CacheConfig

    options = {name: getattr(args, name) for name in CacheConfig.names()}
    options = {name: None if value == "none" and "choices" in CacheConfig.option(name) else value
               for name, value in options.items()}
    return CacheConfig(**{**options, **override})


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != "llama_cpp":
            raise
        return False
    return True


def runtime_line() -> str:
    """The llama-cpp-python this process imports and whether it carries edgemoe's patches (asked of its CPU
    backend: no model is loaded)."""
    if not llama_cpp_available():
        return "llama-cpp-python is not installed (edgemoe build-runtime)"
    from edgemoe_llamacpp.runtime import runtime_info

    info = runtime_info()
    return (f"llama-cpp-python {info['llama_cpp_python']}, "
            f"{'patched (per-expert types, on-demand load)' if info['patched'] else 'stock'}")

"""`edgemoe`: a module per command (cli/inspect.py, run.py, profile.py, convert.py, verify.py, ppl.py, serve.py,
and engine/build.py's build-runtime), each with its HELP, `add_arguments(parser)` and `run(args)`; plugins add
more (cli.plugins). Parse, call, print: errors a user caused print one line and exit 2."""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys

from edgemoe_llamacpp.cli import convert, inspect, ppl, profile, run, serve, verify
from edgemoe_llamacpp.cli.args import (  # noqa: F401  (the arguments' helpers, as plugins and tests import them)
    MAX_CTX,
    add_cache_options,
    cache_config,
    float_range,
    int_range,
    llama_cpp_available,
    mib,
    runtime_line,
)
from edgemoe_llamacpp.engine import build as runtime_build
from edgemoe_llamacpp.errors import EXIT_INTERRUPTED, EdgeMoEError

COMMANDS = {"inspect": inspect, "run": run, "profile": profile, "convert": convert, "verify": verify, "ppl": ppl,
            "build-runtime": runtime_build, "serve": serve}


class _Version(argparse.Action):
    """--version: edgemoe's version (its package metadata) and the runtime's, worked out only when asked."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib import metadata

        try:
            version = metadata.version("edgemoe-llamacpp")
        except metadata.PackageNotFoundError:       # run from a source tree
            from edgemoe_llamacpp import __version__ as version
        print(f"edgemoe {version}\n{runtime_line()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edgemoe", description="Run Mixture-of-Experts GGUFs larger than RAM "
                                 "with llama-cpp-python, experts streamed from storage.")
    ap.add_argument("--version", action=_Version, help="edgemoe's version, llama-cpp-python's, and whether it is "
                    "built with edgemoe's patches")
    sub = ap.add_subparsers(dest="command", required=True)
    parsers = {}
    for name, command in COMMANDS.items():
        parsers[name] = p = sub.add_parser(name, help=command.HELP)
        command.add_arguments(p)
        p.set_defaults(func=command.run)
    for plugin in plugins():
        plugin.add_commands(sub, parsers)
    return ap


PLUGINS = "edgemoe_llamacpp.commands"


def plugins() -> list:
    """Modules that add commands (entry points of group PLUGINS), e.g. edgemoe_bench's `bench` and `run
    --route-trace`. Each has `add_commands(subparsers, parsers)`, `parsers` naming the built-in commands' parsers
    it may extend (`run`: a plugin may set the default `route_injector`, a function of the parsed arguments
    giving an injector, engine.injection). One whose package is not installed is left out."""
    from importlib import metadata

    found = []
    for ep in metadata.entry_points(group=PLUGINS):
        try:
            found.append(ep.load())
        except ModuleNotFoundError as e:
            if e.name is None or e.name.split(".")[0] != ep.value.split(".")[0]:
                raise
    return found


NEGATIVE = re.compile(r"-[0-9.]")      # what argparse takes for an option, unless it is a plain negative number


def _attach_negative_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`--memory-budget -5GiB` as `--memory-budget=-5GiB`: argparse takes a value that starts with '-' and a
    digit or '.' (other than a plain number) for an option, and answers with the whole usage; attached, the
    value reaches the option's own check, which says what is wrong with it. Only for the options of the
    subcommand that take a value, and only before `--`."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    start = next((i for i, a in enumerate(argv) if a in sub.choices), None)
    if start is None:
        return argv
    options = sub.choices[argv[start]]._option_string_actions
    out, i = argv[:start + 1], start + 1
    while i < len(argv):
        action = options.get(argv[i])
        if argv[i] == "--":
            return out + argv[i:]
        if action is not None and action.nargs != 0 and i + 1 < len(argv) and NEGATIVE.match(argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def _run(argv: list[str]) -> int:
    """Parse and run one command; a user's error is one line and exit 2."""
    if argv[:1] == ["serve"]:
        if not llama_cpp_available():
            print("edgemoe: error: llama-cpp-python is not installed; build edgemoe's runtime: edgemoe build-runtime",
                  file=sys.stderr)
            return 2
        if not serve.server_available():
            print("edgemoe: error: serve needs the server extra: pip install 'edgemoe-llamacpp[server]'",
                  file=sys.stderr)
            return 2
        argv = serve.underscore_flags(argv)
    parser = build_parser()
    args = parser.parse_args(_attach_negative_values(parser, argv))
    try:
        return args.func(args)
    except EdgeMoEError as e:
        print(f"edgemoe: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if e.name != "llama_cpp":
            raise
        print("edgemoe: error: llama-cpp-python is not installed; build edgemoe's runtime: edgemoe build-runtime",
              file=sys.stderr)
        return 2
    except BrokenPipeError:             # `edgemoe inspect | head`: the reader left; so do we, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def main(argv: list[str] | None = None) -> int:
    """`edgemoe ARGV`: the exit code. Ctrl-C, wherever it lands (parsing imports llama-cpp-python for serve's
    flags; an error may be being printed), is exit 130 without a traceback."""
    try:
        return _run(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


_terminated: list[int] = []


def _stop_as_interrupted(signum: int, _frame) -> None:
    """SIGTERM (kill, timeout, a service manager) stops a command as Ctrl-C does: its outputs' temporaries are
    removed and llama.cpp stops at its next layer. Python's default would end the process where it stands,
    leaving a conversion's temporary (as large as the model) until the next conversion to that name."""
    _terminated.append(signum)
    if callable(signal.getsignal(signal.SIGINT)):
        signal.raise_signal(signal.SIGINT)      # through the SIGINT handler of the moment (engine.interrupt's
        return                                  # deferral while llama.cpp runs a Python callback)
    raise KeyboardInterrupt                     # SIGINT ignored (a job started in the background)


def entry() -> None:
    """The `edgemoe` command: main(), then exit with its code. Stopped by Ctrl-C, the process ends at once,
    without waiting for threads still inside C code that cannot be interrupted (ggml sets up an i-quant's tables
    in seconds, in the first call that quantizes to it); by SIGTERM, the same, with 128 + SIGTERM."""
    signal.signal(signal.SIGTERM, _stop_as_interrupted)
    code = main()
    if code == EXIT_INTERRUPTED:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(128 + _terminated[0] if _terminated else code)
    sys.exit(code)


if __name__ == "__main__":
    entry()

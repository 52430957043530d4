"""`edgemoe serve`: an OpenAI-compatible server (llama-cpp-python's) with experts streamed."""
from __future__ import annotations

import argparse
import sys

from edgemoe_llamacpp.cli.args import llama_cpp_available
from edgemoe_llamacpp.errors import BudgetError, EdgeMoEError

HELP = "OpenAI-compatible server (llama-cpp-python's) with experts streamed"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from edgemoe_llamacpp.cache.config import CacheConfig

    p.add_argument("model_path", nargs="?", metavar="MODEL", help="path to a MoE GGUF file")
    p.add_argument("--config_file", help="JSON or YAML config in llama-cpp-python's format (models may add "
                   f"{', '.join(CacheConfig.names())})")
    if server_available() and llama_cpp_available():
        from llama_cpp.server.cli import add_args_from_model

        from edgemoe_llamacpp.server import EdgeMoESettings

        n = len(p._actions)
        add_args_from_model(p, EdgeMoESettings)
        for action in p._actions[n:]:      # argparse formats help with %: "50% of the expert bytes" is not one
            if action.help:
                action.help = action.help.replace("%", "%%")


def run(args: argparse.Namespace) -> int:
    import os

    import uvicorn
    from llama_cpp.server.cli import parse_model_from_args
    from pydantic import ValidationError

    from edgemoe_llamacpp import server
    from edgemoe_llamacpp.gguf.layout import read_layout

    args.model = args.model_path or args.model
    config_file = args.config_file or (None if args.model else os.environ.get("CONFIG_FILE"))
    if config_file:
        server_settings, model_settings = server.load_config_file(config_file)
    elif not args.model:
        raise EdgeMoEError("serve needs a MODEL or --config_file")
    else:
        try:
            server_settings = parse_model_from_args(server.EdgeMoEServerSettings, args)
            model_settings = [parse_model_from_args(server.EdgeMoEModelSettings, args)]
        except ValidationError as e:
            raise server.settings_error(e) from None
    for m in model_settings:               # a bad file or cache option fails here, before the server starts
        layout = read_layout(m.model)
        try:
            m.cache_config().make_cache(layout).close()
        except BudgetError as e:
            raise BudgetError(f"{m.model}: {e}") from None
    warning = server.exposure_warning(server_settings)
    if warning:
        print(f"edgemoe: {warning}", file=sys.stderr)
    server.check_listen(server_settings.host, server_settings.port)
    app = server.create_app(server_settings, model_settings)
    # After a Ctrl-C shutdown uvicorn raises SIGINT again, as KeyboardInterrupt, which uvicorn.run() would
    # swallow (exit 0); from its Server it reaches main(), which exits 130 as an interrupted command does
    uvicorn.Server(uvicorn.Config(app, host=server_settings.host, port=server_settings.port,
                                  ssl_keyfile=server_settings.ssl_keyfile,
                                  ssl_certfile=server_settings.ssl_certfile)).run()
    return 0


def server_available() -> bool:
    import importlib.util

    def found(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):      # a parent missing, or a module blocked in sys.modules
            return False

    return all(map(found, ("fastapi", "uvicorn", "sse_starlette", "pydantic_settings", "starlette_context")))


def underscore_flags(argv: list[str]) -> list[str]:
    """`serve` takes llama-cpp-python's flags (--n_ctx, --api_key); accept --n-ctx, --api-key too."""
    return [a.split("=", 1)[0].replace("-", "_").replace("__", "--", 1) + a[len(a.split("=", 1)[0]):]
            if a.startswith("--") else a for a in argv]

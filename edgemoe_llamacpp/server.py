"""llama-cpp-python's OpenAI-compatible server running `edgemoe_llamacpp.Llama`, plus GET /edgemoe/stats.

The settings classes extend llama-cpp-python's (so every flag, environment variable and config-file key
users know still works) with the expert-streaming options; the routes, the request lock and the API-key
check are llama-cpp-python's own. The stats route takes the same lock as generation, so it never reads
the cache while a request is changing it.
"""
import functools
from typing import List, Optional  # llama-cpp-python's flag builder reads typing.Optional, not `X | None`

import llama_cpp
from fastapi import Depends
from llama_cpp.server import app as server_app
from llama_cpp.server.model import LlamaProxy
from llama_cpp.server.settings import ModelSettings, ServerSettings
from pydantic import Field

from .llama import Llama


class EdgeMoEModelSettings(ModelSettings):
    memory_budget: Optional[str] = Field(
        default=None, description="Expert memory: bytes, 800MB, 1.5GiB or 50% of the expert bytes; "
                                  "unset for no limit.")
    policy: str = Field(default="distance", description="Expert cache policy: distance or lru.")
    fetch_threads: int = Field(default=4, ge=1, description="Parallel readers for expert fetches.")
    use_mlock: bool = Field(default=False, description="Must stay off: experts are streamed, not locked.")


class EdgeMoEServerSettings(ServerSettings):
    host: str = Field(default="127.0.0.1", description="Listen address (loopback by default)")


class EdgeMoESettings(EdgeMoEServerSettings, EdgeMoEModelSettings):
    pass


class EdgeMoEConfigFileSettings(EdgeMoEServerSettings):
    models: List[EdgeMoEModelSettings] = Field(default=[], description="Model configs")


class EdgeMoELlamaProxy(LlamaProxy):
    """llama-cpp-python's model proxy, loading each model as an edgemoe Llama."""

    @staticmethod
    def load_llama_from_model_settings(settings: ModelSettings) -> llama_cpp.Llama:
        extra = {}
        if isinstance(settings, EdgeMoEModelSettings):
            extra = {"memory_budget": settings.memory_budget, "policy": settings.policy,
                     "fetch_threads": settings.fetch_threads}
        # llama-cpp-python's loader builds `llama_cpp.Llama(...)` from the settings: hand it ours
        original = llama_cpp.Llama
        llama_cpp.Llama = functools.partial(Llama, **extra)
        try:
            return LlamaProxy.load_llama_from_model_settings(settings)
        finally:
            llama_cpp.Llama = original


async def edgemoe_stats(llama_proxy: LlamaProxy = Depends(server_app.get_llama_proxy)) -> dict:  # noqa: B008
    """Residency statistics of the loaded model: hits, misses, bytes fetched/evicted, resident bytes."""
    model = llama_proxy._current_model
    return {"model": llama_proxy._current_model_alias,
            "stats": model.edgemoe_stats() if isinstance(model, Llama) else None}


def create_app(server_settings: ServerSettings, model_settings: List[ModelSettings]):
    """llama-cpp-python's app with edgemoe models (its create_app loads through its module's LlamaProxy)."""
    original = server_app.LlamaProxy
    server_app.LlamaProxy = EdgeMoELlamaProxy
    try:
        app = server_app.create_app(server_settings=server_settings, model_settings=model_settings)
    finally:
        server_app.LlamaProxy = original
    app.add_api_route("/edgemoe/stats", edgemoe_stats, methods=["GET"], tags=["edgemoe"],
                      dependencies=[Depends(server_app.authenticate)])
    return app


def load_config_file(path: str) -> tuple[ServerSettings, List[ModelSettings]]:
    """A JSON or YAML config file in llama-cpp-python's format, models with edgemoe's keys."""
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith((".yaml", ".yml")):
        import json

        import yaml

        data = json.dumps(yaml.safe_load(data))
    config = EdgeMoEConfigFileSettings.model_validate_json(data)
    return EdgeMoEServerSettings.model_validate(config.model_dump(exclude={"models"})), list(config.models)

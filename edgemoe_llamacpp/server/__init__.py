"""`edgemoe serve`: llama-cpp-python's OpenAI-compatible server running `edgemoe_llamacpp.Llama`.

This module holds what the user configures: the settings classes, which extend llama-cpp-python's (every
flag, environment variable and config-file key users know still works) with the expert-streaming options,
the config-file loader, and the checks `edgemoe serve` makes before it loads a model. The app itself is
assembled in `create_app`; its routes live in routes.py and its error answers in errors.py.
"""
import functools
import ipaddress
import json
import socket
from pathlib import Path

# llama-cpp-python's flag builder reads typing.Optional, not `X | None`
from typing import List, Literal, Optional, Union

import llama_cpp
from llama_cpp.server.model import LlamaProxy
from llama_cpp.server.settings import ModelSettings, ServerSettings
from pydantic import Field, ValidationError, create_model, field_validator, model_validator

from edgemoe_llamacpp import files
from edgemoe_llamacpp.cache.config import CacheConfig
from edgemoe_llamacpp.engine.llama import Llama
from edgemoe_llamacpp.errors import EdgeMoEError

CACHE_OPTIONS = CacheConfig.names()


def _cache_fields() -> dict:
    """The model settings of CacheConfig's fields, from their defaults, help and choices or range
    (CacheConfig.option), typed with typing.Optional/Union as llama-cpp-python's flag builder reads them;
    pydantic names a bad value by its bounds."""
    default = CacheConfig()
    out = {}
    for name in CACHE_OPTIONS:
        option, value = CacheConfig.option(name), getattr(default, name)
        bounds = {}
        if "choices" in option:
            kind = Literal[option["choices"]]
        elif "range" in option:
            lo, hi = option["range"]
            kind, bounds = type(lo), {"ge": lo, "lt" if option.get("open_high") else "le": hi}
        else:                               # memory_budget: a size or a share, read_budget's to check
            kind = Union[str, int]  # noqa: UP007
        out[name] = (Optional[kind] if value is None or option.get("unset") else kind,
                     Field(default=value, description=option["help"], **bounds))
    return out


class _ModelSettings(ModelSettings):
    use_mlock: bool = Field(default=False, description="Must stay off: experts are streamed, not locked.")

    @field_validator("predictor", mode="before", check_fields=False)
    @classmethod
    def _none_predictor(cls, value):
        return None if isinstance(value, str) and value.strip().lower() in ("", "none") else value

    @model_validator(mode="after")
    def _check_cache(self):
        try:
            self.cache_config()
        except EdgeMoEError as e:           # as a ValueError, pydantic's report says which model it is
            raise ValueError(str(e)) from None
        return self

    def cache_config(self) -> CacheConfig:
        return CacheConfig(**{name: getattr(self, name) for name in CACHE_OPTIONS})


# llama-cpp-python's model settings and the expert cache's, one field per CacheConfig field
EdgeMoEModelSettings = create_model("EdgeMoEModelSettings", __base__=_ModelSettings, **_cache_fields())


class EdgeMoEServerSettings(ServerSettings):
    host: str = Field(default="127.0.0.1", description="Listen address (loopback by default)")
    port: int = Field(default=8000, ge=1, le=65535, description="Listen port")
    api_key_file: Optional[str] = Field(
        default=None, description="Read the API key from this file (a key given with --api_key shows in ps; "
                                  "the API_KEY environment variable works too)")
    interrupt_requests: bool = Field(
        default=False, description="Must stay off: requests wait their turn (see queue_size) instead of cutting "
                                   "a running stream short")
    queue_size: int = Field(
        default=16, ge=0, le=100_000, description="Requests that may wait while the model serves another; "
                                                  "more are answered 503 with Retry-After")

    @field_validator("interrupt_requests")
    @classmethod
    def _no_interrupts(cls, value: bool) -> bool:
        if value:
            raise ValueError("interrupt_requests would end a running stream whenever another request arrives; "
                             "edgemoe queues requests instead (queue_size): leave it off")
        return value

    @model_validator(mode="after")
    def _read_api_key_file(self):
        if self.api_key_file is not None:
            if self.api_key is not None:
                raise ValueError("give the API key once: api_key (or API_KEY) or api_key_file, not both")
            try:
                key = files.read_bytes(self.api_key_file, "API key file").decode("utf-8").strip()
            except (EdgeMoEError, UnicodeDecodeError) as e:
                raise ValueError(f"cannot read the API key file {self.api_key_file}: {e}") from None
            if not key:
                raise ValueError(f"the API key file {self.api_key_file} is empty")
            self.api_key = key
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key is empty")
        return self


class EdgeMoESettings(EdgeMoEServerSettings, EdgeMoEModelSettings):
    pass


class EdgeMoEConfigFileSettings(EdgeMoEServerSettings):
    models: List[EdgeMoEModelSettings] = Field(default=[], description="Model configs")


def settings_error(err: ValidationError, source: Optional[str] = None) -> EdgeMoEError:
    """One line from pydantic's report: `--port 99999: ...` for flags, `FILE: models.0.policy: ...` for a file."""
    first, *rest = err.errors()
    msg = first["msg"].removeprefix("Value error, ")
    loc = ".".join(str(x) for x in first["loc"])
    if source is not None:
        where = f"{source}: {loc}: " if loc else f"{source}: "
    elif loc:
        value = first.get("input")
        where = f"--{loc} {value}: " if isinstance(value, (str, int, float)) and len(str(value)) < 80 else f"--{loc}: "
    else:
        where = ""
    return EdgeMoEError(where + msg + (f" (and {len(rest)} more)" if rest else ""))


def load_config_file(path: str) -> tuple[ServerSettings, List[ModelSettings]]:
    """A JSON or YAML config file in llama-cpp-python's format, models with edgemoe's keys; environment
    variables fill server settings the file leaves out, as they do for flags (API_KEY)."""
    data = files.read_bytes(path, "config file")
    if path.endswith((".yaml", ".yml")):
        import yaml

        try:
            config = yaml.safe_load(data)
        except yaml.YAMLError as e:
            raise EdgeMoEError(f"{path}: not valid YAML ({' '.join(str(e).split())[:200]})") from None
    else:
        try:
            config = json.loads(data)
        except ValueError as e:
            raise EdgeMoEError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or not all(isinstance(k, str) for k in config):
        raise EdgeMoEError(f"{path}: a config file is a mapping of settings, with a list of models")
    models = config.get("models")
    for i, m in enumerate(models if isinstance(models, list) else []):
        if not isinstance(m, dict) or not all(isinstance(k, str) for k in m):    # llama-cpp-python would crash
            raise EdgeMoEError(f"{path}: models.{i}: a model is a mapping of settings (model: PATH, ...), not "
                               f"{str(m)[:40]!r}")
    try:
        parsed = EdgeMoEConfigFileSettings(**config)
    except ValidationError as e:
        raise settings_error(e, path) from None
    if not parsed.models:
        raise EdgeMoEError(f"{path}: no models: give a list of models, each with a model path")
    server = EdgeMoEServerSettings.model_construct(**{k: getattr(parsed, k) for k in EdgeMoEServerSettings.model_fields})
    return server, list(parsed.models)


def exposure_warning(settings: ServerSettings) -> Optional[str]:
    """What to shout when the server listens beyond this machine with no API key."""
    if settings.api_key is not None or settings.host == "localhost":
        return None
    try:
        if ipaddress.ip_address(settings.host.strip("[]")).is_loopback:
            return None
    except ValueError:
        pass
    return (f"WARNING: listening on {settings.host}, which is not a loopback address, with no API key: anyone who "
            f"can reach port {settings.port} can run the model. Set API_KEY or pass --api_key_file PATH.")


def check_listen(host: str, port: int) -> None:
    """Fail now, before a model loads, if the address cannot be listened on (in use, not ours, unknown)."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(addr)
    except OSError as e:
        raise EdgeMoEError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


class EdgeMoELlamaProxy(LlamaProxy):
    """llama-cpp-python's model proxy, loading each model as an edgemoe Llama. A model without an alias is
    called by its file name, so that responses do not show where the server keeps its files."""

    def __init__(self, models: List[ModelSettings]) -> None:
        names = [Path(m.model).name for m in models]
        for m, name in zip(models, names):
            if not m.model_alias and names.count(name) == 1:
                m.model_alias = name
        super().__init__(models)

    def alias(self, model: Optional[str]) -> str:
        """The alias of the model a request naming `model` runs on (the default for an unknown name)."""
        return model if model in self._model_settings_dict else self._default_model_alias

    @staticmethod
    def load_llama_from_model_settings(settings: ModelSettings) -> llama_cpp.Llama:
        cache = settings.cache_config() if isinstance(settings, EdgeMoEModelSettings) else None
        # llama-cpp-python's loader builds `llama_cpp.Llama(...)` from the settings: hand it ours
        original = llama_cpp.Llama
        llama_cpp.Llama = functools.partial(Llama, cache=cache)
        try:
            return LlamaProxy.load_llama_from_model_settings(settings)
        except EdgeMoEError:
            raise
        except (ValueError, RuntimeError, AssertionError) as e:
            raise EdgeMoEError(f"{settings.model}: llama.cpp could not load it ({e})") from None
        finally:
            llama_cpp.Llama = original


def create_app(server_settings: ServerSettings, model_settings: List[ModelSettings]):
    """The FastAPI app: llama-cpp-python's routes with edgemoe's models, queue, errors and key check."""
    from edgemoe_llamacpp.server.routes import build_app

    return build_app(server_settings, EdgeMoELlamaProxy(models=model_settings))

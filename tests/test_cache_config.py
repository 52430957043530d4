"""CacheConfig: the expert cache's options, checked once, and the same record wherever they are given (Python
keywords, CLI flags, server settings and config files)."""
import dataclasses
import json

import pytest

from edgemoe_llamacpp.cache.config import CacheConfig
from edgemoe_llamacpp.errors import ArgumentError, BudgetError, EdgeMoEError
from edgemoe_llamacpp.gguf.layout import read_layout

EVERY_OPTION = CacheConfig(memory_budget="25%", policy="lru", predictor="gate", prefetch_depth=2,
                           prefetch_threads=3, fetch_threads=5, substitute=0.5)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"memory_budget": float("nan")}, BudgetError, "not a finite size"),
    ({"memory_budget": "150%"}, BudgetError, "over 100%"),
    ({"memory_budget": "12 parsecs"}, BudgetError, "unknown unit"),
    ({"memory_budget": "lots"}, BudgetError, "is not a size"),
    ({"memory_budget": 0}, BudgetError, "must be positive"),
    ({"memory_budget": True}, BudgetError, "is not a size"),
    ({"memory_budget": ""}, BudgetError, "memory budget '' is empty"),        # was: no limit
    ({"memory_budget": "  "}, BudgetError, "memory budget '  ' is empty"),
    ({"policy": "fifo"}, ArgumentError, "unknown cache policy 'fifo'; choose from nextuse, distance, lru, lfu, hobbit"),
    ({"policy": None}, ArgumentError, "unknown cache policy None"),
    ({"predictor": "oracle"}, ArgumentError, "unknown predictor 'oracle'; choose from auto, gate, table, frequency or None"),
    ({"predictor": "none"}, ArgumentError, "unknown predictor 'none'"),
    ({"prefetch_depth": 0}, ArgumentError, "prefetch_depth must be an integer from 1 to 3, not 0"),
    ({"prefetch_depth": 2.0}, ArgumentError, "prefetch_depth must be an integer"),
    ({"fetch_threads": 0}, ArgumentError, "fetch_threads must be an integer from 1 to 1024, not 0"),
    ({"prefetch_threads": 5000}, ArgumentError, "prefetch_threads must be an integer from 1 to 1024"),
    ({"fetch_threads": True}, ArgumentError, "fetch_threads must be an integer"),
    ({"substitute": 1.0}, ArgumentError, "substitute is a share of the gate weight in \\[0, 1\\), not 1.0"),
    ({"substitute": float("nan")}, ArgumentError, "substitute is a share"),
    # a bad name is reported as such, even beside a bad budget
    ({"policy": "fifo", "memory_budget": "lots"}, ArgumentError, "unknown cache policy"),
    ({"predictor": "oracle", "memory_budget": "150%"}, ArgumentError, "unknown predictor"),
])
def test_bad_options_are_refused_with_the_value(kwargs, error, match):
    with pytest.raises(error, match=match) as info:
        CacheConfig(**kwargs)
    assert isinstance(info.value, EdgeMoEError)
    assert error is BudgetError or not isinstance(info.value, BudgetError)


def test_frozen_and_json_round_trip():
    with pytest.raises(dataclasses.FrozenInstanceError):
        EVERY_OPTION.policy = "lfu"
    assert CacheConfig(**json.loads(json.dumps(EVERY_OPTION.to_dict()))) == EVERY_OPTION
    assert "memory_budget" not in EVERY_OPTION.to_dict(budget=False)
    assert set(EVERY_OPTION.to_dict(budget=False)) == set(CacheConfig.names()) - {"memory_budget"}


def test_take_reads_keywords_or_cache_but_not_both():
    kwargs = {"policy": "lru", "n_ctx": 64, "memory_budget": "50%"}
    assert CacheConfig.take(kwargs) == CacheConfig(policy="lru", memory_budget="50%")
    assert kwargs == {"n_ctx": 64}                      # llama.cpp's own keywords stay
    assert CacheConfig.take({}) == CacheConfig()
    assert CacheConfig.take({"n_ctx": 64}, EVERY_OPTION) is EVERY_OPTION
    with pytest.raises(ArgumentError, match="give the cache options once: .* policy=..."):
        CacheConfig.take({"policy": "lru"}, EVERY_OPTION)
    with pytest.raises(ArgumentError, match="cache must be a CacheConfig, not dict"):
        CacheConfig.take({}, {"policy": "lru"})


def test_make_cache_applies_the_budget_and_policy(fixture_path):
    from edgemoe_llamacpp.gguf.layout import read_layout

    layout = read_layout(fixture_path)
    cache = CacheConfig(memory_budget="50%", policy="lfu").make_cache(layout)
    try:
        assert cache.budget == layout.expert_bytes // 2 and cache.policy == "lfu"
    finally:
        cache.close()


@pytest.mark.parametrize("command", ["run", "ppl"])
def test_cli_flags_give_the_config(command):
    from edgemoe_llamacpp.cli import build_parser, cache_config

    parser = build_parser()
    base = [command, "m.gguf"] + (["-p", "x"] if command == "run" else [])
    assert cache_config(parser.parse_args(base)) == CacheConfig()
    args = parser.parse_args(base + ["--memory-budget", "25%", "--policy", "lru", "--predictor", "gate",
                                     "--prefetch-depth", "2", "--prefetch-threads", "3", "--fetch-threads", "5",
                                     "--substitute", "0.5"])
    assert cache_config(args) == EVERY_OPTION


def test_bench_flags_give_the_config_and_the_budgets():
    from edgemoe_llamacpp.cli import build_parser, cache_config

    args = build_parser().parse_args(["bench", "m.gguf", "--memory-budget", "25%", "50%", "--policy", "hobbit",
                                      "--substitute"])
    assert args.memory_budget == ["25%", "50%"]
    assert cache_config(args, memory_budget=None) == CacheConfig(policy="hobbit", substitute=0.6)


@pytest.mark.runtime
def test_server_settings_are_the_config(fixture_path, tmp_path):
    pytest.importorskip("pydantic_settings")
    from edgemoe_llamacpp.server import EdgeMoEModelSettings, load_config_file

    fields = EdgeMoEModelSettings.model_fields
    for name in CacheConfig.names():
        assert fields[name].default == getattr(CacheConfig(), name), name
        assert fields[name].description == CacheConfig.help(name), name
    settings = EdgeMoEModelSettings(model=str(fixture_path), predictor="none")
    assert settings.cache_config() == CacheConfig(predictor=None)
    assert EdgeMoEModelSettings(model=str(fixture_path)).cache_config() == CacheConfig()     # predictor "auto"
    path = tmp_path / "c.yaml"
    path.write_text(f"models:\n  - model: {fixture_path}\n    memory_budget: lots\n")
    with pytest.raises(EdgeMoEError, match=f"^{path}: models.0: memory budget 'lots' is not a size"):
        load_config_file(str(path))


@pytest.mark.runtime
def test_an_empty_budget_is_an_error_everywhere(fixture_path):
    """memory_budget="" (an unset variable, a lost argument) used to mean no limit; "none" still does."""
    import subprocess
    import sys

    from edgemoe_llamacpp import Llama

    with pytest.raises(BudgetError, match="memory budget '' is empty"):
        Llama(str(fixture_path), memory_budget="", n_ctx=64, verbose=False)
    assert CacheConfig(memory_budget="none").budget_for(read_layout(fixture_path)) is None
    proc = subprocess.run([sys.executable, "-m", "edgemoe_llamacpp", "run", str(fixture_path), "-p", "x", "-n", "1",
                           "--memory-budget", ""], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "edgemoe: error: memory budget '' is empty: give a size (800MB, 1.5GiB), a share of the expert bytes "
        "(50%), or none for no limit"), proc.stderr


def test_a_budget_over_every_expert_is_capped_as_100_percent(fixture_path, caplog):
    """1TiB for a model of a few MB of experts: the cache holds it to every expert, as it does 100%, and says
    so (it used to keep 1TiB as the budget)."""
    layout = read_layout(fixture_path)
    caches = {}
    for budget in ("100%", "1TiB", layout.expert_bytes):
        caplog.clear()
        caches[budget] = cache = CacheConfig(memory_budget=budget).make_cache(layout)
        cache.close()
        capped = [r.getMessage() for r in caplog.records if "capped" in r.getMessage()]
        note = (f"memory budget {2**40:,} bytes is more than every expert of {fixture_path} takes: capped at "
                f"{cache.budget:,} bytes (every expert, as 100%)")
        assert capped == ([note] if budget == "1TiB" else [])
    assert caches["1TiB"].budget == caches["100%"].budget == caches[layout.expert_bytes].budget
    assert layout.expert_bytes <= caches["1TiB"].budget < 2 * layout.expert_bytes
    assert caches["1TiB"].headroom == 0 and caches["1TiB"].substitute is None

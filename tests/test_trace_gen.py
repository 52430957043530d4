"""The trace generator: each preset's traces land within 10% of every published figure it targets (at another
seed than the one it was calibrated on), deterministically; bad parameters are refused. Pure numpy."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from edgemoe_bench.routing_trace import RoutingTrace
from edgemoe_bench.trace_gen import (
    PRESETS,
    TOLERANCE,
    Geometry,
    TraceParams,
    compare,
    generate,
    make_trace,
    preset,
)
from edgemoe_llamacpp.errors import EdgeMoEError

TOOL = Path(__file__).resolve().parent.parent / "tools" / "make_trace.py"
TOKENS = 4096


def _within(name: str, trace: RoutingTrace, geometry=None) -> list[dict]:
    p = preset(name, geometry)
    rows = [r for r in compare(trace.stats(**p.stats_args), p.targets) if r["target"] is not None]
    assert {r["statistic"] for r in rows} == set(p.targets)
    return [r for r in rows if abs(r["rel_error"]) > TOLERANCE]


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_hit_their_targets(name):
    trace = make_trace(name, TOKENS, seed=1)
    p = PRESETS[name]
    assert trace.ids.shape == (TOKENS, p.geometry.n_layers, p.geometry.k) and trace.n_expert == p.geometry.n_expert
    assert trace.source == f"generated:{name} seed=1"
    assert _within(name, trace) == []


@pytest.mark.parametrize("seed", [2, 3, 4, 5])
def test_olmoe_lands_on_other_seeds_too(seed):
    # its first fit hit the means, but its next-layer lift moved by 6% (s.d.) from trace to trace and missed on
    # some seeds; the refit's moves by 2.4% (20 seeds, none off by more than 9%). qwen3-30b-a3b's spread is
    # in bench/results/trace-stats.json: it does not land on every seed.
    assert _within("olmoe", make_trace("olmoe", TOKENS, seed=seed)) == []


def test_uniform_takes_another_geometry():
    g = Geometry(6, 64, 6, first_layer=1)
    trace = make_trace("uniform", TOKENS, seed=2, geometry=g)
    assert trace.layers == (1, 2, 3, 4, 5, 6) and trace.k == 6 and trace.n_expert == 64
    assert _within("uniform", trace, g) == []


def test_locality_is_what_separates_the_presets():
    qwen, uniform = (make_trace(n, 1024, seed=3).stats() for n in ("qwen3-30b-a3b", "uniform"))
    assert qwen["repeat_next"] > 5 * uniform["repeat_next"]
    assert qwen["lru_hit"] > 2 * uniform["lru_hit"]
    assert qwen["layer_recall"] > 2 * qwen["layer_recall_chance"] and qwen["layer_recall"] > qwen["layer_recall_popularity"]
    assert uniform["layer_recall"] < 1.2 * uniform["layer_recall_chance"]


def test_same_seed_same_trace():
    g, p = Geometry(4, 32, 4), PRESETS["qwen3-30b-a3b"].params
    a, b, c = generate(g, p, 300, seed=5), generate(g, p, 300, seed=5), generate(g, p, 300, seed=6)
    assert (a == b).all() and not (a == c).all()
    other_router = generate(g, replace(p, model_seed=1), 300, seed=5)
    assert not (a == other_router).all()
    RoutingTrace(a, g.layers, g.n_expert, "x")             # a valid trace: ids in range, no repeats in a row


def test_each_parameter_moves_its_statistic():
    g = Geometry(4, 64, 8)

    def stats(**kw):
        return RoutingTrace(generate(g, TraceParams(**kw), 2048, seed=0), g.layers, 64, "x").stats()

    flat = stats()
    held = stats(signal=8.0, fast_jump=0.1)
    assert held["repeat_next"] > 5 * flat["repeat_next"] and held["lru_hit"] > flat["lru_hit"] + 0.3
    working_set = stats(signal=4.0, slow_jump=0.01, slow_share=0.9)        # a new set every token, from few
    assert working_set["repeat_next"] < held["repeat_next"] and working_set["lru_hit"] > flat["lru_hit"] + 0.2
    assert stats(skew=1.5)["top_n_coverage"] > flat["top_n_coverage"] + 0.2
    linked, unlinked = stats(signal=8.0, link=1.0), stats(signal=8.0, link=0.0)
    # even unlinked, layers read the same context: linking their directions makes them more alike still
    assert linked["layer_recall"] > 0.65 and linked["layer_recall"] > unlinked["layer_recall"] + 0.2
    assert linked["layer_recall_popularity"] < 0.2 and linked["repeat_next"] < 0.2


@pytest.mark.parametrize("kwargs, message", [
    ({"signal": -1.0}, "signal must be finite and non-negative"),
    ({"skew": float("nan")}, "skew must be finite and non-negative"),
    ({"skew": (0.5, 0.5)}, "2 skews for 3 MoE layers"),
    ({"fast_jump": 0.0}, r"fast_jump must lie in \(0, 1\]"),
    ({"slow_jump": 1.5}, r"slow_jump must lie in \(0, 1\]"),
    ({"slow_share": 1.5}, r"slow_share must lie in \[0, 1\]"),
    ({"link": -0.1}, r"link must lie in \[0, 1\]"),
    ({"dims": 0}, "dims must be at least 1"),
])
def test_bad_parameters(kwargs, message):
    with pytest.raises(EdgeMoEError, match=message):
        generate(Geometry(3, 16, 2), TraceParams(**kwargs), 10)


def test_bad_requests():
    with pytest.raises(EdgeMoEError, match="unknown trace preset 'qwen'"):
        make_trace("qwen", 10)
    with pytest.raises(EdgeMoEError, match="top-9 of 8 experts"):
        make_trace("uniform", 10, geometry=Geometry(4, 8, 9))
    with pytest.raises(EdgeMoEError, match="at least one token"):
        make_trace("uniform", 0)


def _tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=300, check=False)


def test_make_trace_tool_writes_a_trace(tmp_path):
    out = tmp_path / "t.npz"
    proc = _tool("uniform", "--tokens", "512", "--layers", "4", "--experts", "32", "--k", "4", "--seed", "7",
                 "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    trace = RoutingTrace.load(out)
    assert trace.ids.shape == (512, 4, 4) and trace.source == "generated:uniform seed=7"
    measured = trace.stats()
    assert f"| uniform | repeat_next | {measured['repeat_next']:.4g} | 0.125 |" in proc.stdout
    again = _tool("uniform", "--tokens", "16", "--out", str(out))
    assert again.returncode == 2 and "exists; pass --force" in again.stderr
    assert _tool("--stats", "olmoe").returncode == 2


def test_make_trace_tool_writes_every_presets_table(tmp_path):
    stats = tmp_path / "stats.json"
    proc = _tool("--stats", "--tokens", "128", "--seed", "3", "--seeds", "2", "--stats-json", str(stats))
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(stats.read_text())
    assert doc["tokens"] == 128 and doc["tolerance"] == TOLERANCE and list(doc["presets"]) == list(PRESETS)
    for name, entry in doc["presets"].items():
        p = preset(name)
        assert entry["geometry"] == {"moe_layers": p.geometry.n_layers, "n_expert": p.geometry.n_expert,
                                     "k": p.geometry.k}
        assert entry["sources"] and entry["source"] == f"generated:{name} seed=3" and entry["seeds"] == [3, 4]
        rows = {r["statistic"]: r for r in entry["rows"]}
        seed3 = make_trace(name, 128, seed=3).stats(**p.stats_args)
        for key, target in p.targets.items():
            row = rows[key]
            assert row["measured"] == seed3[key] and row["target"] == target
            assert row["rel_error"] == pytest.approx((seed3[key] - target) / target)
            assert row["range"][0] <= seed3[key] <= row["range"][1]
            assert abs(row["worst_rel_error_over_seeds"]) >= abs(row["rel_error"])
            assert f"| {name} | {key} | {seed3[key]:.4g} | {target:.4g} |" in proc.stdout
        assert entry["within_tolerance"] == (entry["worst_rel_error"] <= TOLERANCE)
        assert entry["worst_rel_error_over_seeds"] >= entry["worst_rel_error"]
    assert doc["all_within_tolerance"] == all(e["within_tolerance"] for e in doc["presets"].values())
    # the range is over both seeds' traces (olmoe's are the cheapest to make again)
    p = preset("olmoe")
    seeds = [make_trace("olmoe", 128, seed=s).stats(**p.stats_args) for s in (3, 4)]
    for row in doc["presets"]["olmoe"]["rows"]:
        values = [s[row["statistic"]] for s in seeds]
        assert row["range"] == [min(values), max(values)]
        if row["target"] is not None:
            worst = max(abs(v - row["target"]) for v in values) / row["target"]
            assert abs(row["worst_rel_error_over_seeds"]) == pytest.approx(worst)


def test_a_preset_at_another_geometry_keeps_its_parameters_not_its_targets():
    p = preset("qwen3-30b-a3b", Geometry(6, 32, 4))
    assert p.params == preset("qwen3-30b-a3b").params and p.targets == {}
    trace = make_trace("qwen3-30b-a3b", 64, geometry=Geometry(6, 32, 4))
    assert (len(trace.layers), trace.n_expert, trace.k, trace.n_tokens) == (6, 32, 4, 64)

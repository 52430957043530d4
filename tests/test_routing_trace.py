"""The routing trace format: round trip, hostile files refused with one line, a real recorded run read
token-major, and each statistic on traces worked out by hand."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest

from edgemoe_bench.routing_trace import RoutingTrace
from edgemoe_llamacpp.errors import EdgeMoEError
from edgemoe_llamacpp.gguf.layout import read_layout


def _trace(n_tok=6, layers=(0, 1), n_expert=8, k=2, seed=0) -> RoutingTrace:
    rng = np.random.default_rng(seed)
    ids = np.stack([[rng.choice(n_expert, k, replace=False) for _ in layers] for _ in range(n_tok)])
    return RoutingTrace(ids, layers, n_expert, f"test seed={seed}")


def _npz(path, **arrays):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.write_bytes(buf.getvalue())
    return path


def test_round_trip(tmp_path):
    t = _trace()
    t.save(tmp_path / "t.npz")
    u = RoutingTrace.load(tmp_path / "t.npz")
    assert (u.ids == t.ids).all() and u.ids.dtype == np.int32 and u.ids.shape == (6, 2, 2)
    assert (u.layers, u.n_expert, u.source, u.k, u.n_tokens) == ((0, 1), 8, "test seed=0", 2, 6)
    with pytest.raises(ValueError):
        u.ids[0, 0, 0] = 1                               # frozen, ids included


def test_save_is_atomic_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "t.npz"
    _trace(seed=0).save(out)
    with pytest.raises(EdgeMoEError, match="exists; pass --force"):
        _trace(seed=1).save(out)
    assert RoutingTrace.load(out).source == "test seed=0"
    _trace(seed=1).save(out, force=True)
    assert RoutingTrace.load(out).source == "test seed=1"
    assert [p.name for p in tmp_path.iterdir()] == ["t.npz"]


GOOD = {"ids": np.array([[[0, 1]], [[1, 2]]], np.int32), "layers": np.array([3], np.int32),
        "n_expert": np.int32(4), "source": np.str_("s")}


@pytest.mark.parametrize("change, message", [
    ({"ids": np.array([[[0, 4]], [[1, 2]]], np.int32)}, r"expert id 4 outside \[0, 4\)"),
    ({"ids": np.array([[[0, -1]], [[1, 2]]], np.int32)}, r"expert id -1 outside"),
    ({"ids": np.array([[[0, 1]], [[2, 2]]], np.int32)}, r"token 1 chose expert 2 twice in layer 3"),
    ({"ids": np.array([[0, 1], [1, 2]], np.int32)}, r"must be \(tokens, MoE layers, k\)"),
    ({"ids": np.zeros((0, 1, 2), np.int32)}, r"all non-empty"),
    ({"ids": np.array([[[0.0, 1.0]]])}, r"ids must be integers, not float64"),
    ({"layers": np.array([3, 4], np.int32)}, r"2 layers named for 1 MoE layers"),
    ({"ids": np.zeros((1, 2, 1), np.int32), "layers": np.array([4, 3], np.int32)}, r"ascending"),
    ({"n_expert": np.int32(1)}, r"2 experts per token out of 1"),
    ({"n_expert": np.float32(4)}, r"n_expert and source must be an integer and a string"),
    ({"source": np.int32(0)}, r"n_expert and source must be an integer and a string"),
    ({"layers": np.array([[3]], np.int32)}, r"layers must be a list of integers"),
])
def test_load_refuses_a_damaged_trace(tmp_path, change, message):
    path = _npz(tmp_path / "bad.npz", **{**GOOD, **change})
    with pytest.raises(EdgeMoEError, match=message) as e:
        RoutingTrace.load(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_load_refuses_what_is_no_trace(tmp_path):
    (tmp_path / "garbage.npz").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(EdgeMoEError, match="not a readable routing trace"):
        RoutingTrace.load(tmp_path / "garbage.npz")
    missing = {k: v for k, v in GOOD.items() if k != "layers"}
    with pytest.raises(EdgeMoEError, match="not a readable routing trace"):
        RoutingTrace.load(_npz(tmp_path / "missing.npz", **missing))
    objects = {**GOOD, "source": np.array([{"a": 1}], dtype=object)}
    with pytest.raises(EdgeMoEError, match="not a readable routing trace"):   # a pickle is never loaded
        RoutingTrace.load(_npz(tmp_path / "pickle.npz", **objects))
    with pytest.raises(EdgeMoEError, match="no such trace"):
        RoutingTrace.load(tmp_path / "absent.npz")
    with pytest.raises(EdgeMoEError, match="not a regular trace"):
        RoutingTrace.load(tmp_path)
    with pytest.raises(EdgeMoEError, match="routes 4 experts per layer, not 8"):
        RoutingTrace.load(_npz(tmp_path / "ok.npz", **GOOD), n_expert=8)


def test_construction_checks_too():
    with pytest.raises(EdgeMoEError, match="chose expert 1 twice"):
        RoutingTrace(np.array([[[1, 1]]]), (0,), 4, "x")
    with pytest.raises(EdgeMoEError, match="n_expert must be a positive integer"):
        RoutingTrace(np.array([[[1, 2]]]), (0,), "4", "x")
    with pytest.raises(EdgeMoEError, match="non-negative and ascending"):
        RoutingTrace(np.array([[[1, 2]]]), (-1,), 4, "x")


def test_from_recorded_keeps_tokens_every_layer_routed():
    # a 3-token prompt (the last layer computes only the last token, as llama.cpp does) then one decode step
    run = {"model": "/somewhere/m.gguf", "trace": [
        [1, [[0, 1], [2, 3], [4, 5]]], [2, [[1, 2]]],
        [1, [[6, 7]]], [2, [[0, 7]]]]}
    t = RoutingTrace.from_recorded(run, 8)
    assert t.layers == (1, 2) and t.source == "recorded:m.gguf"
    assert t.ids.tolist() == [[[4, 5], [1, 2]], [[6, 7], [0, 7]]]


@pytest.mark.parametrize("run, message", [
    ({"model": "m"}, r"no routing in it \(record one with `edgemoe run --json --trace`\)"),
    ({"trace": [[0, [[0, 1], [2]]]]}, r"rows of 1 and 2 experts"),
    ({"trace": [["0", [[0, 1]]]]}, r"entry 0 is not \[layer, rows of expert ids\]"),
    ({"trace": [[0, [[0, "x"]]]]}, r"has a row that is not a list of ids"),
    ({"trace": []}, r"recorded no routing"),
    ({"trace": [[0, [[0, 9]]]]}, r"expert id 9 outside \[0, 8\)"),
    ({"trace": [[0, [[0, 1]]], [1, []]]}, r"no token was routed in every MoE layer"),
    ({"trace": [[0, [[0, 2 ** 70]]]]}, r"expert id 1180591620717411303424 outside \[0, 8\)"),
    ({"trace": [[0, [[0, True]]]]}, r"has a row that is not a list of ids"),
])
def test_from_recorded_refuses_bad_runs(run, message):
    with pytest.raises(EdgeMoEError, match=message):
        RoutingTrace.from_recorded(run, 8)


def test_from_recorded_needs_the_expert_count():
    with pytest.raises(EdgeMoEError, match="experts per layer are unknown"):
        RoutingTrace.from_recorded({"model": "/nonexistent/m.gguf", "trace": [[0, [[0, 1]]]]})


def test_a_real_recorded_run(tmp_path, fixture_path):
    """`edgemoe run --json --trace` on the fixture: the prompt's last token and every decoded token, each
    routed in all 8 layers, the rows the run recorded."""
    proc = subprocess.run([sys.executable, "-m", "edgemoe_llamacpp", "run", str(fixture_path), "-p",
                           "import os\ndef f(x):", "-n", "6", "--json", "--trace"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = json.loads(proc.stdout)
    (tmp_path / "run.json").write_text(proc.stdout)
    layout = read_layout(fixture_path)
    t = RoutingTrace.load(tmp_path / "run.json")         # n_expert from the model the run names
    assert t.for_layout(layout) is t
    assert t.source == f"recorded:{fixture_path.name}" and t.n_expert == 16 and t.layers == tuple(range(8))
    evals = [run["trace"][i:i + 8] for i in range(0, len(run["trace"]), 8)]
    assert len(evals) > 1 and len(evals[0][0][1]) == run["prompt_tokens"] > 1 and len(evals[0][7][1]) == 1
    assert t.n_tokens == len(evals)
    for token, ev in zip(t.ids, evals, strict=True):
        assert token.tolist() == [rows[-1] for _, rows in ev]
    assert (RoutingTrace.from_recorded(tmp_path / "run.json", 16).ids == t.ids).all()


def test_for_layout_names_the_mismatch(fixture_path):
    layout = read_layout(fixture_path)
    with pytest.raises(EdgeMoEError, match=r"routes 2 MoE layers \(0-1\) x 8 experts, top-2, but tiny-moe.gguf "
                                           r"has 8 MoE layers \(0-7\) x 16 experts, top-2"):
        _trace().for_layout(layout)
    wrong_k = RoutingTrace(np.tile(np.arange(3, dtype=np.int32), (1, 8, 1)), tuple(range(8)), 16, "x")
    with pytest.raises(EdgeMoEError, match="top-3"):
        wrong_k.for_layout(layout)


# ---------------------------------------------------------------- statistics on traces worked out by hand

def test_stats_of_a_constant_trace():
    ids = np.tile(np.array([0, 1], np.int32), (20, 3, 1))          # every token picks {0, 1} in 3 layers
    s = RoutingTrace(ids, (0, 1, 2), 8, "const").stats()
    assert s["repeat_next"] == s["within_window"] == s["adjacent_jaccard"] == 1.0
    assert s["experts_for_cover"] == 2 and s["top_n_coverage"] == 1.0
    assert s["lru_hit"] == pytest.approx(19 / 20)                 # the first token's misses are compulsory
    assert s["layer_recall"] == s["layer_recall_popularity"] == s["layer_recall_lift"] == 1.0
    assert s["layer_recall_chance"] == 0.25


def test_stats_of_alternating_sets():
    a, b = [0, 1, 2], [3, 4, 5]
    ids = np.array([[a if t % 2 == 0 else b] for t in range(40)], np.int32)   # (40, 1, 3)
    trace = RoutingTrace(ids, (0,), 12, "alt")
    s = trace.stats(residency=0.5)                                # 6 experts resident: both sets fit
    assert s["repeat_next"] == 0.0 and s["adjacent_jaccard"] == 0.0 and s["within_window"] == 1.0
    assert s["lru_hit"] == pytest.approx(38 / 40) and s["params"]["lru_capacity"] == 6
    assert s["experts_for_cover"] == 6 and s["top_n_coverage"] == 1.0
    # 5 resident: the current token's experts stay, so the other set loses its least recent expert each time
    assert trace.stats(residency=5 / 12)["lru_hit"] == pytest.approx(38 * 2 / 3 / 40)
    assert s["layer_recall"] is None                              # one MoE layer: no pair


def test_within_window_and_coverage_counts():
    # layer chooses 0 at t = 0, 10, 20, ...: never back within 8 tokens, back within 10
    ids = np.array([[[0 if t % 10 == 0 else 1 + t % 10]] for t in range(100)], np.int32)
    trace = RoutingTrace(ids, (0,), 11, "w")
    assert trace.stats()["within_window"] == 0.0
    assert trace.stats(window=10)["within_window"] == 1.0
    # 10 experts used 10 times each out of 11: 90% needs 9 of them; the top 5 hold half
    assert trace.stats()["experts_for_cover"] == 9 and trace.stats(top_n=5)["top_n_coverage"] == 0.5
    # expert 0 is chosen at tokens 0, 10, 20, ... but experts 1-10 alternate in blocks of 20 tokens
    blocks = np.array([[[0 if t % 10 == 0 else 1 + (t // 20) % 2]] for t in range(100)], np.int32)
    spans = RoutingTrace(blocks, (0,), 3, "b")
    assert spans.stats(cover=0.85)["experts_for_cover"] == 2                  # whole trace: 45 + 45 + 10
    assert spans.stats(cover=0.85, cover_tokens=20)["experts_for_cover"] == 1   # per span: 18 of 20
    assert spans.stats(cover_tokens=20, top_n=1)["top_n_coverage"] == 0.9
    assert spans.stats(cover_tokens=500)["params"]["cover_tokens"] == 500       # longer than the trace: all of it


def test_layer_recall_finds_a_fixed_mapping():
    rng = np.random.default_rng(0)
    first = np.stack([rng.choice(16, 2, replace=False) for _ in range(400)])
    perm = rng.permutation(16)
    ids = np.stack([first, perm[first]], axis=1).astype(np.int32)   # layer 1 is a relabelling of layer 0
    s = RoutingTrace(ids, (0, 1), 16, "map").stats()
    assert s["layer_recall"] == 1.0
    assert s["layer_recall_popularity"] < 0.3
    shuffled = np.stack([first, perm[first[rng.permutation(400)]]], axis=1).astype(np.int32)
    assert RoutingTrace(shuffled, (0, 1), 16, "x").stats()["layer_recall"] < 0.3


def test_a_file_that_is_no_trace_says_what_a_trace_is(fixture_path, tmp_path):
    """--route-trace given the model (or any file that is no trace): one whole line that says what a trace is;
    numpy's message, cut mid-word and offering allow_pickle, is never shown."""
    what = ("a routing trace is an .npz of ids, layers, n_expert and source (tools/make_trace.py) or the JSON of "
            "a recorded run (edgemoe run --json --trace)")
    proc = subprocess.run([sys.executable, "-m", "edgemoe_llamacpp", "run", str(fixture_path), "-p", "x",
                           "--route-trace", str(fixture_path)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 2
    assert proc.stderr == f"edgemoe: error: {fixture_path}: not a routing trace; {what}\n"
    objects = _npz(tmp_path / "pickle.npz", **{**GOOD, "source": np.array([{"a": 1}], dtype=object)})
    (tmp_path / "notzip.npz").write_bytes(b"\x93NUMPY not a zip")
    for path, why in ((objects, "it holds Python objects, which edgemoe never loads"),
                      (_npz(tmp_path / "two.npz", ids=GOOD["ids"], source=GOOD["source"]), "no layers, n_expert arrays"),
                      (tmp_path / "notzip.npz", None)):
        with pytest.raises(EdgeMoEError) as e:
            RoutingTrace.load(path)
        reason = "not a routing trace" if why is None else f"not a readable routing trace ({why})"
        assert str(e.value) == f"{path}: {reason}; {what}"

"""tools/prefetch_sweep.py's arithmetic: configurations as spelled, and the recall above which prefetch pays."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from prefetch_sweep import crossover, parse_config


def entry(points: dict[int, list[tuple[float, float]]]) -> dict:
    """A budget's entry with oracle configurations at (recall, decode ratio to no prediction) per depth."""
    return {"configs": [{"predictor": "oracle", "depth": d, "recall": r, "vs_no_prediction": {"median": v}}
                        for d, pts in points.items() for r, v in pts]}


def test_configurations():
    assert parse_config("none", injected=False) == {"label": "none", "predictor": None, "depth": 0, "recall": None}
    assert parse_config("auto", injected=False)["predictor"] == "auto"
    assert parse_config("gate:2", injected=False) == {"label": "gate:2", "predictor": "gate", "depth": 2,
                                                      "recall": None}
    assert parse_config("oracle:0.75:3", injected=True) == {"label": "oracle:0.75:3", "predictor": "oracle",
                                                            "depth": 3, "recall": 0.75}
    for bad, why in (("oracle:0.9", "give --route-trace"), ("oracle:1.5", "RECALL within"), ("gate:4", "DEPTH"),
                     ("psychic", "PREDICTOR one of"), ("oracle", "RECALL")):
        with pytest.raises(SystemExit, match=why):
            parse_config(bad, injected=bad != "oracle:0.9")


def test_crossover_interpolates_above_the_last_recall_that_does_not_pay():
    # depth 1: 0.5 -> 0.6x, 0.75 -> 0.9x, 0.9 -> 1.1x, 1.0 -> 1.3x: crosses 1 between 0.75 and 0.9, at 0.825
    # depth 2: all pay; depth 3: the highest recall does not pay
    got = crossover(entry({1: [(0.5, 0.6), (0.75, 0.9), (0.9, 1.1), (1.0, 1.3)], 2: [(0.75, 1.05), (1.0, 1.2)],
                           3: [(0.9, 0.8), (1.0, 0.95)]}))
    assert got["1"] == pytest.approx(0.825) and got["2"] == 0.75 and got["3"] is None
    # a dip after a win: the recall above which every measured one pays
    assert crossover(entry({1: [(0.5, 1.1), (0.75, 0.95), (1.0, 1.2)]}))["1"] == pytest.approx(0.75 + 0.05 / 0.25 * 0.25)

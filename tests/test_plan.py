"""The planner's math and the profile format, without llama.cpp: synthetic costs and routing on the fixture's
layout (its header only)."""
import itertools

import numpy as np
import pytest

from edgemoe_llamacpp.convert.plan import choose, make_plan
from edgemoe_llamacpp.convert.profile import FORMAT, Profile, write_profile
from edgemoe_llamacpp.errors import BudgetError, EdgeMoEError
from edgemoe_llamacpp.gguf.layout import read_layout

TYPES = ["Q2_K", "Q4_K", "Q8_0"]
BITS = np.array([2.625, 4.5, 8.5])


def brute_force(cost: np.ndarray, size: np.ndarray, budget: int) -> float:
    best = np.inf
    for pick in itertools.product(range(cost.shape[1]), repeat=len(cost)):
        rows = np.arange(len(cost))
        if size[rows, pick].sum() <= budget:
            best = min(best, cost[rows, pick].sum())
    return best


@pytest.mark.parametrize("seed", range(20))
def test_choose_holds_the_budget_within_one_item_of_the_optimum(seed):
    rng = np.random.default_rng(seed)
    size = np.sort(rng.integers(10, 100, (6, 3)), axis=1)
    cost = np.sort(rng.random((6, 3)), axis=1)[:, ::-1] * rng.random((6, 1))     # more bytes, less cost
    rows = np.arange(6)
    for budget in np.linspace(size[:, 0].sum(), size[:, -1].sum(), 7).astype(int):
        idx = choose(cost, size, int(budget))
        assert size[rows, idx].sum() <= budget
        # a Lagrangian search then a greedy fill: not always the optimum, but off by at most one item's span (the
        # item the relaxation would split between two types)
        span = (cost.max(axis=1) - cost.min(axis=1)).max()
        assert cost[rows, idx].sum() <= brute_force(cost, size, int(budget)) + span + 1e-12


def test_choose_takes_the_cheapest_types_when_all_fit_and_refuses_a_budget_below_the_smallest():
    size = np.array([[1, 2, 4]] * 3)
    cost = np.array([[3.0, 2.0, 1.0]] * 3)
    assert choose(cost, size, 12).tolist() == [2, 2, 2]
    assert choose(cost, size, 3).tolist() == [0, 0, 0]
    with pytest.raises(BudgetError, match="more than the budget"):
        choose(cost, size, 2)


def synthetic_costs(layout, share: np.ndarray) -> dict:
    """What measure_costs returns, made up: an expert's cost per scheme falls with its bits and grows with how often
    the router picks it (`share`, [layers, experts])."""
    n_l, n_e, n_t = len(layout.moe_layers), layout.n_expert, len(TYPES)
    t = next(t for t in layout.expert_tensors if t.layer == layout.moe_layers[0])
    per_tensor = t.nbytes // t.count * 8 / BITS.max()          # weights per tensor per expert (roughly)
    err = 2.0 ** -BITS
    cost = share[:, :, None, None] * (2 * err[:, None] + err[None, :])
    nb = (per_tensor * BITS / 8).astype(np.int64)
    nbytes = np.broadcast_to(2 * nb[:, None] + nb[None, :], (n_l, n_t, n_t)).copy()
    return {"types": TYPES, "cost": cost, "nbytes": nbytes, "n_weights": int(3 * per_tensor * n_l * n_e),
            "layers": list(layout.moe_layers), "layout": layout, "imatrix_off": np.zeros((n_l, n_e, 3, n_t), bool)}


@pytest.mark.parametrize("bits", [3.0, 4.5, 6.0])
def test_a_plan_spends_its_bits_on_the_experts_the_router_uses_most(fixture_path, bits):
    layout = read_layout(fixture_path)
    rng = np.random.default_rng(0)
    share = rng.dirichlet(np.full(layout.n_expert, 0.5), len(layout.moe_layers))
    costs = synthetic_costs(layout, share)
    plan, report = make_plan(costs, expert_bits=bits)
    assert report["bits_per_weight"] <= bits and report["expert_bytes"] <= report["budget_bytes"]
    assert set(plan) == {t.name for t in layout.expert_tensors}
    assert all(len(types) == layout.n_expert and set(types) <= set(TYPES) for types in plan.values())
    # per layer: the bits an expert got never fall as its share rises (its cost is share x a common curve)
    for t in layout.expert_tensors:
        li = costs["layers"].index(t.layer)
        got = np.array([BITS[TYPES.index(x)] for x in plan[t.name]])
        order = np.argsort(share[li], kind="stable")
        assert (np.diff(got[order]) >= 0).sum() >= len(order) - 2, (t.name, got[order])


def synthetic_profile(layout, tokens: int = 32, samples: int = 4, n_embd: int = 8, n_ff: int = 16) -> tuple:
    rng = np.random.default_rng(1)
    n_l, n_e, k = len(layout.moe_layers), layout.n_expert, layout.n_expert_used
    ids = np.stack([[rng.permutation(n_e)[:k] for _ in range(n_l)] for _ in range(tokens)]).astype(np.int16)
    weights = rng.random(ids.shape).astype(np.float32)
    arrays = {"ids": ids, "weights": weights / weights.sum(-1, keepdims=True),
              "inputs": rng.standard_normal((n_l, n_e, samples, n_embd)).astype(np.float16),
              "input_weights": rng.random((n_l, n_e, samples)).astype(np.float32),
              "input_count": np.full((n_l, n_e), samples, np.int32),
              "down_inputs": rng.standard_normal((n_l, n_e, samples, n_ff)).astype(np.float16)}
    meta = {"format": list(FORMAT), "model": str(layout.path), "moe_layers": list(layout.moe_layers),
            "n_expert": n_e, "n_expert_used": k, "n_embd": n_embd, "tokens": tokens}
    return meta, arrays


def test_a_profile_written_is_read_back_and_its_statistics_count_the_routing(fixture_path, tmp_path):
    layout = read_layout(fixture_path)
    meta, arrays = synthetic_profile(layout)
    write_profile(tmp_path / "p.npz", meta, arrays)
    prof = Profile(tmp_path / "p.npz", layout)
    assert prof.meta == meta
    np.testing.assert_array_equal(prof.ids, arrays["ids"])
    share = prof.expert_stats()["share"]
    k = layout.n_expert_used
    np.testing.assert_allclose(share.sum(axis=1), k)               # each token picks k experts per layer
    li, e = 1, int(arrays["ids"][0, 1, 0])
    assert share[li, e] == pytest.approx((arrays["ids"][:, li] == e).any(axis=1).mean())


def test_a_damaged_profile_is_refused_in_one_line(fixture_path, tmp_path):
    layout = read_layout(fixture_path)
    meta, arrays = synthetic_profile(layout)
    arrays["ids"][3, 0, 0] = layout.n_expert                       # an expert the model does not have
    write_profile(tmp_path / "bad.npz", meta, arrays)
    with pytest.raises(EdgeMoEError, match="expert ids outside"):
        Profile(tmp_path / "bad.npz", layout)
    with pytest.raises(ValueError, match="needs"):
        write_profile(tmp_path / "x.npz", meta, {k: v for k, v in arrays.items() if k != "down_inputs"})
    assert not (tmp_path / "x.npz").exists()
